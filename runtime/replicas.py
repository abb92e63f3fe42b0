"""Replicas: N enclaves of one image, and the group they form.

Each replica is an ordinary enclave started through the one launch path
(:meth:`runtime.api.Runtime.launch`): its own CID, its own module id (so its own attestation
documents and NSM), the same image and so the same PCR0/1/2 (and PCR8 if signed). They are
named the way the runtime already names enclaves started under one name: ``NAME``,
``NAME_1``, ``NAME_2``... That set is the **group** ``NAME`` (:func:`group_members`), which
``enclave ingress --target-name``, the peer relay's rules and ``runtime.targets`` use: a replica
started later under the same name (a restart) joins the group, one that ended leaves it.

Replicas are started concurrently (the state directory's lock serialises the reservations); if
one fails to start, those already started are terminated and the error is raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import trio

from runtime.errors import InvalidArgumentError
from runtime.launch import LaunchRequest
from runtime.records import EnclaveInfo, EnclaveRunInfo, EnclaveState
from transport.peers import in_group

if TYPE_CHECKING:
    from runtime.api import Runtime
    from runtime.state import StateDir

__all__ = ["MAX_REPLICAS", "start_replicas", "group_members", "in_group"]

#: Most replicas one request may start (the state directory caps enclaves anyway: 4 by
#: default, as on Nitro).
MAX_REPLICAS: Final = 64


async def start_replicas(
    rt: Runtime,
    request: LaunchRequest,
    count: int,
    *,
    wait_ready: bool = False,
    ready_timeout_s: float | None = None,
) -> list[EnclaveInfo]:
    """Start ``count`` replicas of ``request`` (its ``name`` is the group's; ``cid`` must be
    None: each replica gets a free one). Returns them in start order.

    Raises:
        InvalidArgumentError: E03, ``count`` out of 1..:data:`MAX_REPLICAS`, or a fixed CID.
        NitroCliError: what one launch raised (the others are terminated first).
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_REPLICAS:
        raise InvalidArgumentError(
            f"`replicas` must be an integer in 1..{MAX_REPLICAS}, got {count!r}",
            info=("replicas", repr(count)),
        )
    if request.cid not in (None, 0) and count > 1:
        raise InvalidArgumentError(
            "`enclave-cid` cannot be given with several replicas: each gets its own CID",
            info=("enclave-cid", str(request.cid)),
        )
    started: list[EnclaveInfo | None] = [None] * count
    extra = {} if ready_timeout_s is None else {"ready_timeout_s": ready_timeout_s}

    async def one(index: int) -> None:
        started[index] = await rt.launch(request, wait_ready=wait_ready, **extra)

    try:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as cleanup:
                for info in started:
                    if info is not None:
                        cleanup.start_soon(rt.terminate, info.enclave_id)
        lone = _lone(exc)
        if lone is not exc:
            raise lone from None
        raise
    return [info for info in started if info is not None]


def _lone(exc: BaseException) -> BaseException:
    """The one non-cancellation error inside ``exc`` (else ``exc``)."""
    if isinstance(exc, BaseExceptionGroup):
        errors = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        if len(errors) == 1:
            return _lone(errors[0])
    return exc


def group_members(state: StateDir, name: str) -> list[EnclaveInfo]:
    """The running enclaves of group ``name`` (``NAME`` and ``NAME_<n>``), oldest first."""
    return [
        r
        for r in state.records()
        if r.state == EnclaveState.RUNNING and in_group(name, r.enclave_name)
    ]


def describe_group(members: Sequence[EnclaveInfo]) -> list[EnclaveRunInfo]:
    """``run-enclave --replicas`` output: nitro-cli's run JSON of each member."""
    return [m.run_json() for m in members]
