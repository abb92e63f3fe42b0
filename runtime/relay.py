"""The enclave-to-enclave relay as a runtime service (``transport.peers`` on the state dir).

:func:`serve_relay` runs :func:`transport.peers.serve_peer_relay` with the runtime's records as
its directory: the relay learns each connecting enclave's CID from the fabric and its name from
the records, so allowlist rules can name enclaves (and replica groups) as ``describe-enclaves``
shows them. An application runs it with :meth:`runtime.api.Runtime.start_relay`; operators with
``enclave relay``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

import trio

from runtime.records import EnclaveState
from runtime.state import StateDir
from transport.peers import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_SOURCE,
    DEFAULT_RELAY_PORT,
    EnclaveEntry,
    RelayPolicy,
    RelayRule,
    serve_peer_relay,
)

__all__ = ["StateDirectory", "serve_relay"]


class StateDirectory:
    """The running enclaves of a state directory (``transport.peers.EnclaveDirectory``)."""

    def __init__(self, state: StateDir) -> None:
        self.state = state

    async def entries(self) -> Sequence[EnclaveEntry]:
        """CID and name of every RUNNING enclave (records read in a thread)."""
        records = await trio.to_thread.run_sync(self.state.records)
        return [
            EnclaveEntry(r.enclave_cid, r.enclave_name)
            for r in records
            if r.state == EnclaveState.RUNNING
        ]


async def serve_relay(
    state: StateDir,
    rules: Iterable[RelayRule | str],
    *,
    port: int = DEFAULT_RELAY_PORT,
    fabric_dir: Path | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_per_source: int = DEFAULT_MAX_PER_SOURCE,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Relay enclave-to-enclave connections on ``(3, port)`` for the enclaves of ``state``.

    Args:
        state: whose enclaves (names, CIDs).
        rules: the allowlist, ``FROM=TO:PORT`` strings or :class:`RelayRule`.
        port, fabric_dir, max_connections, max_per_source, task_status: as
            :func:`transport.peers.serve_peer_relay`.

    Raises:
        ConfigurationError: a malformed rule (the message names it) or a bad limit.
        VsockAddressInUse: something already listens on ``(3, port)``.
    """
    policy = RelayPolicy(rules)
    await serve_peer_relay(
        policy,
        StateDirectory(state),
        port=port,
        fabric_dir=fabric_dir,
        max_connections=max_connections,
        max_per_source=max_per_source,
        task_status=task_status,
    )
