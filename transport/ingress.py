"""Ingress: a host TCP listener forwarding each connection to an enclave's vsock port.

Clients outside the machine (or on it, without access to the fabric directory) reach an enclave
service through ingress: TCP ``listen_host:listen_port`` → vsock ``target``. It is
:func:`transport.relay.serve_forwarding` with a vsock target: bytes are piped unchanged both
ways (with the attested channel on top, ingress only ever relays ciphertext), a client is
served or refused at once (never left waiting in the backlog), one source address holds at most
``max_per_source`` connections, and a target that cannot be reached closes the client's
connection without a byte, with the reason logged (the client then reports "enclave
unreachable", not an authentication failure). The default listen address is loopback: exposing
an enclave beyond the machine is an explicit choice.

**Several targets** (replicas of one image): a :class:`TargetPool` spreads new connections by
least connections over the targets it believes healthy. A target whose connect fails is taken
out at once (and retried after a backoff that doubles up to :data:`MAX_BACKOFF_S`) and the next
one is tried, so a client is never sent to a dead replica while another is up. With a
:class:`TargetSource` (the runtime's view of its enclaves: ``runtime.targets``) the pool follows
it every :data:`HEALTH_INTERVAL_S`: replicas that ended are removed, new or restarted ones added.
Connections already open are never moved (the bytes are an attested channel bound to one
enclave); a client whose replica dies reconnects, and gets a healthy one.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, NoReturn, Protocol

import structlog
import trio

from transport.errors import (
    AddressInUse,
    ConfigurationError,
    EnclaveError,
    PeerUnreachable,
    VsockError,
)
from transport.fabric.addressing import VsockAddr
from transport.fabric.api import open_vsock_stream
from transport.hostport import format_host_port
from transport.relay import OpenTarget, Routed, serve_forwarding

__all__ = [
    "DEFAULT_LISTEN_HOST",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PER_SOURCE",
    "CONNECT_TIMEOUT_S",
    "HEALTH_INTERVAL_S",
    "MAX_BACKOFF_S",
    "TargetSource",
    "TargetPool",
    "TargetState",
    "NoHealthyTarget",
    "serve_ingress",
]

log = structlog.get_logger()

#: Loopback by default: reaching an enclave from other machines must be asked for.
DEFAULT_LISTEN_HOST: Final = "127.0.0.1"
#: Connections forwarded at once; further clients are refused at once. Each costs two sockets
#: and two small tasks, so this bounds fds well below common RLIMIT_NOFILE (1024).
DEFAULT_MAX_CONNECTIONS: Final = 256
#: Connections forwarded at once from one source address: half the inference server's 64
#: connection slots, so one source cannot take them all, while leaving room for many local
#: clients (every local client is 127.0.0.1).
DEFAULT_MAX_PER_SOURCE: Final = 32
#: Bound on reaching the enclave's vsock port, per connection (seconds): the fabric answers
#: at once, so this only bounds a stuck enclave broker.
CONNECT_TIMEOUT_S: Final = 10.0
#: How often a pool asks its TargetSource which targets are healthy (seconds): a replica that
#: ended is gone from the runtime's records at once, so this bounds how long it may still be
#: tried first (each try fails in microseconds and moves on to the next replica).
HEALTH_INTERVAL_S: Final = 0.5
#: A target whose connect failed is skipped for 0.25 s, then twice as long after each further
#: failure, up to this (seconds); one success resets it.
MAX_BACKOFF_S: Final = 8.0
_FIRST_BACKOFF_S: Final = 0.25


class NoHealthyTarget(PeerUnreachable):
    """No target of the pool could be reached (all down, or none known)."""


class TargetSource(Protocol):
    """Which targets are healthy now (the runtime's view: ``runtime.targets``)."""

    async def healthy(self) -> Sequence[VsockAddr]:
        """The targets to use; raise ``OSError``/``EnclaveError`` if it cannot tell (the pool
        then keeps what it had)."""
        ...


@dataclass
class TargetState:
    """One target of a pool, as :meth:`TargetPool.statistics` reports it."""

    addr: VsockAddr
    active: int = 0  #: connections forwarded to it now
    total: int = 0  #: connections forwarded to it since it joined
    failures: int = 0  #: consecutive failed connects
    down_until: float = 0.0  #: trio time before which it is skipped


class TargetPool:
    """The targets behind one ingress: least connections, health, failover on connect.

    Args:
        targets: the initial targets.
        fabric_dir: reach them through this fabric directory (default: this process's).
        source: if given, :meth:`watch` follows it (targets added and removed).
    """

    def __init__(
        self,
        targets: Iterable[VsockAddr] = (),
        *,
        fabric_dir: Path | None = None,
        source: TargetSource | None = None,
    ) -> None:
        self.fabric_dir = fabric_dir
        self.source = source
        self._targets: dict[VsockAddr, TargetState] = {}
        self.update(targets)

    @property
    def targets(self) -> list[VsockAddr]:
        """The targets in the pool now."""
        return list(self._targets)

    def statistics(self) -> list[TargetState]:
        """A snapshot of every target's counters."""
        return [TargetState(**vars(t)) for t in self._targets.values()]

    def update(self, healthy: Iterable[VsockAddr]) -> None:
        """Make ``healthy`` the pool's targets: new ones join, missing ones leave (their open
        connections are left alone and no longer counted)."""
        wanted = list(dict.fromkeys(healthy))
        for addr in [a for a in self._targets if a not in wanted]:
            del self._targets[addr]
            log.info("ingress_target_removed", target=str(addr))
        for addr in wanted:
            if addr not in self._targets:
                self._targets[addr] = TargetState(addr)
                log.info("ingress_target_added", target=str(addr))

    def _candidates(self) -> list[TargetState]:
        now = trio.current_time()
        up = [t for t in self._targets.values() if t.down_until <= now]
        if not up:  # everything is backing off: try them all rather than refuse at once
            up = list(self._targets.values())
        return sorted(up, key=lambda t: (t.active, t.total))

    async def open(self) -> Routed:
        """Connect to the least busy healthy target, trying the next on failure.

        Raises:
            NoHealthyTarget: no target could be reached (the client is then closed without a
                byte, as with one target).
        """
        errors: list[str] = []
        for state in self._candidates():
            try:
                stream = await _open_target(state.addr, self.fabric_dir)
            except (OSError, trio.TooSlowError, VsockError) as exc:
                self._failed(state, exc)
                errors.append(f"{state.addr}: {exc}")
                continue
            state.failures = 0
            state.down_until = 0.0
            state.active += 1
            state.total += 1
            return Routed(stream, target=str(state.addr), release=partial(self._release, state))
        if not errors:
            raise NoHealthyTarget("no target is known to be healthy")
        raise NoHealthyTarget("no target could be reached: " + "; ".join(errors))

    def _failed(self, state: TargetState, exc: BaseException) -> None:
        state.failures += 1
        backoff = min(MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2 ** (state.failures - 1))
        state.down_until = trio.current_time() + backoff
        log.warning(
            "ingress_target_down",
            target=str(state.addr),
            error=str(exc) or type(exc).__name__,
            retry_in_s=backoff,
        )

    @staticmethod
    def _release(state: TargetState) -> None:
        state.active -= 1

    async def watch(self, *, interval_s: float = HEALTH_INTERVAL_S) -> NoReturn:
        """Follow :attr:`source` for ever (start it in a nursery)."""
        if self.source is None:
            raise ConfigurationError("this pool has no target source to watch")
        while True:
            try:
                healthy = await self.source.healthy()
            except (OSError, EnclaveError) as exc:
                log.warning("ingress_health_unknown", error=str(exc))
            else:
                self.update(healthy)
            await trio.sleep(interval_s)


async def _open_target(target: VsockAddr, fabric_dir: Path | None) -> trio.SocketStream:
    with trio.fail_after(CONNECT_TIMEOUT_S):
        return await open_vsock_stream(target, fabric_dir=fabric_dir)


async def open_tcp_listeners_or_explain(host: str, port: int) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` with failures turned into one clear error.

    Raises:
        AddressInUse: something already listens on ``host:port``.
        ConfigurationError: the address cannot be listened on (unknown host, not ours...).
    """
    where = format_host_port(host, port)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"cannot listen on {where}: address already in use") from exc
        reason = exc.strerror or str(exc)
        raise ConfigurationError(f"cannot listen on {where}: {reason}") from exc


async def serve_ingress(
    listen_host: str,
    listen_port: int,
    target: VsockAddr | Sequence[VsockAddr] | TargetPool,
    *,
    fabric_dir: Path | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_per_source: int | None = DEFAULT_MAX_PER_SOURCE,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Forward TCP connections on ``listen_host:listen_port`` to ``target``. Never returns.

    Args:
        listen_host: address to bind (default in the CLI: loopback).
        listen_port: TCP port, 0 for any free port.
        target: the enclave's vsock address; or several (replicas), or a :class:`TargetPool`
            (whose source, if any, is watched while this runs): least connections, failover
            on connect, health (see the module docstring).
        fabric_dir: reach ``target`` through this fabric directory (default: the backend of
            this process).
        max_connections: connections forwarded at once; more are refused at once.
        max_per_source: connections forwarded at once from one source IP; None: no cap.
        task_status: ``started(bound_port)`` once listening.

    Raises:
        AddressInUse / ConfigurationError: the listen address cannot be used (before
            anything is accepted), or a limit is below 1.

    A client whose target cannot be reached is disconnected without a byte (and the reason
    logged); ingress keeps serving the others.
    """
    if max_connections < 1:
        raise ConfigurationError("max_connections must be at least 1")
    if max_per_source is not None and max_per_source < 1:
        raise ConfigurationError("max_per_source must be at least 1")
    pool: TargetPool | None = None
    if isinstance(target, TargetPool):
        pool = target
    elif not isinstance(target, VsockAddr):
        pool = TargetPool(target, fabric_dir=fabric_dir)
    listeners = await open_tcp_listeners_or_explain(listen_host, listen_port)
    bound_port = int(listeners[0].socket.getsockname()[1])
    described = str(target) if pool is None else ", ".join(map(str, pool.targets)) or "(none yet)"
    log.info(
        "ingress_listening",
        listen=format_host_port(listen_host, bound_port),
        target=described,
        max_connections=max_connections,
        max_per_source=max_per_source,
    )
    async with trio.open_nursery() as nursery:
        if pool is not None and pool.source is not None:
            nursery.start_soon(pool.watch)
        open_target: OpenTarget
        if pool is None:
            assert isinstance(target, VsockAddr)
            open_target = partial(_open_target, target, fabric_dir)
        else:
            open_target = pool.open
        await nursery.start(
            partial(
                serve_forwarding,
                listeners,
                open_target,
                name="ingress",
                target="a replica" if pool is not None else str(target),
                max_connections=max_connections,
                max_per_source=max_per_source,
                when_full="refuse",
            )
        )
        task_status.started(bound_port)
    raise AssertionError("unreachable")  # pragma: no cover
