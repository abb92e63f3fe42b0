"""The parent side of enclave-to-enclave traffic: the relay on ``(3, port)``.

On Nitro an enclave reaches nothing but its parent, so two enclaves talk through a process on
the parent instance that copies bytes between two vsock connections. :func:`serve_peer_relay` is
that process's service (the runtime runs it in-process, ``enclave relay`` as a command):

1. an enclave connects to ``(3, port)``; the fabric says which CID it is
   (:func:`~transport.fabric.origin.peer_cid`), and the runtime's records which name it has
   (:class:`EnclaveDirectory`); a connection from no enclave is refused;
2. it sends one ``enclave-relay/1`` request (:mod:`transport.peers._wire`), read under a
   deadline and bounded in size: a peer by CID, by exact name, or any enclave of a name;
3. the allowlist (:class:`~transport.peers.RelayPolicy`) must allow (source, target, port);
   everything else is refused with a status and logged with both identities;
4. the relay connects to the peer's vsock port (for a group: the allowed enclave with the fewest
   relayed connections, then the next if it does not answer), answers OK with the peer's CID,
   and pipes bytes both ways with 1 MiB buffers (``transport.relay.pipe_streams``): no per
   message work. The enclaves run mutually attested ``enclave-channel/1`` over it, so from
   here on the relay sees ciphertext only, and each enclave, not the relay, decides whom it
   trusts.

Connection slots are bounded overall and per source enclave; a full relay refuses at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, NoReturn, Protocol

import structlog
import trio

from transport.errors import ConfigurationError, RemoteProtocolError, TransportError
from transport.fabric.addressing import VsockAddr
from transport.fabric.api import open_vsock_listener, open_vsock_stream
from transport.fabric.origin import peer_cid
from transport.peers._rules import EnclaveEntry, RelayPolicy, in_group
from transport.peers._wire import (
    MAX_REQUEST,
    RelayRequest,
    RelayStatus,
    RequestReader,
    TargetKind,
    encode_reply,
)
from transport.relay import BULK_CHUNK_SIZE, Routed, RouteRefused, serve_forwarding

__all__ = [
    "DEFAULT_RELAY_PORT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PER_SOURCE",
    "REQUEST_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "EnclaveDirectory",
    "StaticDirectory",
    "serve_peer_relay",
]

log = structlog.get_logger()

#: The relay's vsock port on the parent (CID 3); next to the model store (7000) and below the
#: vsock-proxy (8000) and the runtime's own ports (9000, 9001).
DEFAULT_RELAY_PORT: Final = 7200
#: Relayed connections at once (each is two sockets and a 2 MiB pair of buffers at most).
DEFAULT_MAX_CONNECTIONS: Final = 256
#: Relayed connections at once from one enclave, so one enclave cannot take every slot.
DEFAULT_MAX_PER_SOURCE: Final = 64
#: An enclave must send its whole request within this time (seconds).
REQUEST_TIMEOUT_S: Final = 5.0
#: Bound on reaching the peer's vsock port (seconds): the fabric answers at once, so this only
#: bounds a stuck broker.
CONNECT_TIMEOUT_S: Final = 10.0


class EnclaveDirectory(Protocol):
    """Who is running: the runtime's view (``runtime.relay`` reads the state directory)."""

    async def entries(self) -> Sequence[EnclaveEntry]:
        """The running enclaves (CID and name)."""
        ...


@dataclass
class StaticDirectory:
    """A fixed directory (tests; a deployment whose enclaves never change)."""

    enclaves: Sequence[EnclaveEntry]

    async def entries(self) -> Sequence[EnclaveEntry]:
        """The configured enclaves."""
        await trio.lowlevel.checkpoint()
        return self.enclaves


class _Refuse(Exception):
    def __init__(self, status: RelayStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Relay:
    def __init__(
        self, policy: RelayPolicy, directory: EnclaveDirectory, fabric_dir: Path | None
    ) -> None:
        self.policy = policy
        self.directory = directory
        self.fabric_dir = fabric_dir
        self.active: dict[int, int] = {}  # target CID -> relayed connections

    async def route(self, conn: trio.abc.Stream, source: str) -> Routed:
        src_cid = peer_cid(conn)
        request: RelayRequest | None = None
        try:
            request = await _read_request(conn)  # read first: a reply, not a reset
            if src_cid is None:
                raise _Refuse(RelayStatus.DENIED, "the connection comes from no enclave")
            entries = await self.directory.entries()
            src = next((e for e in entries if e.cid == src_cid), EnclaveEntry(src_cid, None))
            candidates = self._allowed_targets(src, request, entries)
            for target in candidates:
                stream = await self._connect(target, request.port)
                if stream is None:
                    continue
                await conn.send_all(encode_reply(RelayStatus.OK, target.cid))
                self.active[target.cid] = self.active.get(target.cid, 0) + 1
                log.info(
                    "peer_relay_connected",
                    source_cid=src.cid,
                    source_name=src.name,
                    target_cid=target.cid,
                    target_name=target.name,
                    port=request.port,
                )
                return Routed(
                    stream,
                    target=f"{target.name or '?'} (cid {target.cid}) port {request.port}",
                    release=partial(self._release, target.cid),
                )
            raise _Refuse(RelayStatus.UNREACHABLE, "nothing answered on that port")
        except _Refuse as refusal:
            log.warning(
                "peer_relay_refused",
                source=source,
                request=request.describe() if request else None,
                status=refusal.status.name,
                reason=refusal.reason,
            )
            # A refused enclave that already went away is not told.
            with (
                trio.move_on_after(1),
                suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await conn.send_all(encode_reply(refusal.status))
            raise RouteRefused(refusal.reason) from None

    def _allowed_targets(
        self, src: EnclaveEntry, request: RelayRequest, entries: Sequence[EnclaveEntry]
    ) -> list[EnclaveEntry]:
        """The enclaves ``src`` may reach for ``request``, least busy first; refusals raise."""
        port = request.port
        if request.kind is TargetKind.CID:
            assert isinstance(request.target, int)
            found = [e for e in entries if e.cid == request.target]
            probe = found[0] if found else EnclaveEntry(request.target, None)
            if self.policy.allowing(src, probe, port) is None:
                raise _Refuse(RelayStatus.DENIED, "no rule allows it")
            if not found:
                raise _Refuse(RelayStatus.NOT_FOUND, "no running enclave has that CID")
            return found
        assert isinstance(request.target, str)
        name = request.target
        if request.kind is TargetKind.NAME:
            found = [e for e in entries if e.name == name]
        else:
            found = [e for e in entries if e.name is not None and in_group(name, e.name)]
        allowed = [e for e in found if self.policy.allowing(src, e, port) is not None]
        if not allowed:
            if found or not self.policy.names_target(src, name, port):
                raise _Refuse(RelayStatus.DENIED, "no rule allows it")
            raise _Refuse(RelayStatus.NOT_FOUND, "no running enclave has that name")
        # Least connections first; the CID breaks ties so the order is stable.
        return sorted(allowed, key=lambda e: (self.active.get(e.cid, 0), e.cid))

    async def _connect(self, target: EnclaveEntry, port: int) -> trio.SocketStream | None:
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                return await open_vsock_stream(
                    VsockAddr(target.cid, port), fabric_dir=self.fabric_dir
                )
        except (OSError, TransportError, trio.TooSlowError) as exc:
            log.info("peer_relay_target_unreachable", cid=target.cid, port=port, error=str(exc))
            return None

    def _release(self, cid: int) -> None:
        left = self.active.get(cid, 1) - 1
        if left > 0:
            self.active[cid] = left
        else:
            self.active.pop(cid, None)


async def _read_request(conn: trio.abc.Stream) -> RelayRequest:
    reader = RequestReader()
    with trio.move_on_after(REQUEST_TIMEOUT_S):
        try:
            while True:
                data = await conn.receive_some(MAX_REQUEST)
                if not data:
                    raise _Refuse(RelayStatus.MALFORMED, "the connection ended mid-request")
                request = reader.feed(data)
                if request is not None:
                    return request
        except RemoteProtocolError as exc:
            raise _Refuse(RelayStatus.MALFORMED, str(exc)) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Refuse(
                RelayStatus.MALFORMED, f"the connection broke mid-request: {exc}"
            ) from None
    raise _Refuse(RelayStatus.MALFORMED, f"no complete request within {REQUEST_TIMEOUT_S:g} s")


def _source_label(conn: trio.abc.Stream) -> str:
    cid = peer_cid(conn)
    return "host" if cid is None else f"cid {cid}"


async def serve_peer_relay(
    policy: RelayPolicy,
    directory: EnclaveDirectory,
    *,
    port: int = DEFAULT_RELAY_PORT,
    fabric_dir: Path | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_per_source: int = DEFAULT_MAX_PER_SOURCE,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Relay enclave-to-enclave connections on ``(3, port)`` (see the module docstring).

    Args:
        policy: the allowlist; nothing else is relayed.
        directory: the running enclaves (CIDs and names).
        port: the relay's vsock port on the parent.
        fabric_dir: the emulated fabric to serve on and reach peers through (default: this
            process's backend).
        max_connections / max_per_source: relayed connections at once, overall / per enclave;
            beyond them a new connection is refused at once.
        task_status: ``started(port)`` once listening.

    Never returns; cancel it to stop (every relayed connection is closed).

    Raises:
        ConfigurationError: a limit below 1.
        VsockAddressInUse: something already listens on ``(3, port)``.
    """
    if max_connections < 1 or max_per_source < 1:
        raise ConfigurationError("relay connection limits must be at least 1")
    relay = _Relay(policy, directory, fabric_dir)
    listener = await open_vsock_listener(port, fabric_dir=fabric_dir)
    log.info("peer_relay_listening", port=port, rules=[str(r) for r in policy.rules])
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_forwarding,
                [listener],
                route=relay.route,
                name="peer_relay",
                target="a peer enclave",
                max_connections=max_connections,
                max_per_source=max_per_source,
                when_full="refuse",
                source_of=_source_label,
                chunk_size=BULK_CHUNK_SIZE,
            )
        )
        task_status.started(port)
    raise AssertionError("unreachable")  # pragma: no cover
