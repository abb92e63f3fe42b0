"""Relaying byte streams: the one accept-loop-and-forward behind ``ingress`` and ``vsock-proxy``.

:func:`pipe_streams` copies two streams into each other until both directions ended;
:func:`serve_forwarding` accepts connections on listeners and pipes each to a target opened per
connection. Both proxies are :func:`serve_forwarding` with their own target (a vsock address
for ingress, an allow-listed TCP endpoint for vsock-proxy) and their own admission rules:

* at most ``max_connections`` forwarded at once. When full, ``when_full="wait"`` leaves the
  next clients in the listen backlog until a slot frees (Nitro's vsock-proxy ``num_workers``);
  ``when_full="refuse"`` accepts and closes them at once, so a new client is served or refused
  promptly and never left hanging (ingress);
* at most ``max_per_source`` at once from one source address (refused the same way), so one
  client cannot take every slot;
* a target that cannot be reached closes the client's connection without sending a byte (and
  the reason is logged): a client above the relay can tell "nothing answered" from a protocol
  failure (``transport.errors.PeerUnreachable`` in ``connect_channel``).

The target is opened per connection by ``open_target()`` (one fixed target, or a balancer's
pick), or by a ``route(conn, source)`` that first reads what the client asks for and answers it
(the enclave-to-enclave relay, ``transport.peers``). Either may hand back a :class:`Routed`
whose ``release`` runs when the connection ends (a balancer's connection count).

Data moves in chunks of at most ``chunk_size`` (:data:`PIPE_CHUNK_SIZE` by default) per read
with the other side's ``send_all`` as backpressure (one chunk in flight per direction), and
half-close is propagated: when one side finishes sending, the other sees EOF but may keep
answering. Between two socket streams the bytes are ``recv_into`` one preallocated buffer per
direction and sent from it: no allocation and no per-message work, whatever the protocol on top
(the enclave-to-enclave relay uses 1 MiB chunks and 1 MiB socket buffers for bulk transfers).
With TLS or the attested channel on top, a relay only ever sees ciphertext.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final, Literal, NoReturn

import structlog
import trio

from transport.errors import ConfigurationError, TransportError

__all__ = [
    "PIPE_CHUNK_SIZE",
    "BULK_CHUNK_SIZE",
    "PipeStats",
    "pipe_streams",
    "serve_forwarding",
    "OpenTarget",
    "Route",
    "Routed",
    "RouteRefused",
]

log = structlog.get_logger()

#: Bytes per receive_some when piping: large enough to move a whole TLS record or channel
#: record per call (64 KiB, the size the channel benchmark uses), small enough to bound memory.
PIPE_CHUNK_SIZE: Final = 64 * 1024
#: Chunk for bulk relays (enclave to enclave): 1 MiB per read moves a whole coalesced channel
#: write (four 64 KiB records) and more per wake-up, so the host's cost per byte stays small.
BULK_CHUNK_SIZE: Final = 1 << 20
#: Socket buffers set on the AF_UNIX sockets of a bulk pipe (bytes; the default ~208 KiB holds
#: less than one bulk chunk).
_BULK_SOCKET_BUFFER: Final = 1 << 20


@dataclass
class Routed:
    """A target stream plus what to do when the forwarded connection ends.

    Attributes:
        stream: the target (owned by the relay from now on).
        target: the target's description for the logs (None: ``serve_forwarding``'s).
        release: called once when the connection ends (a balancer's count); may be None.
    """

    stream: trio.abc.Stream
    target: str | None = None
    release: Callable[[], None] | None = None


OpenTarget = Callable[[], Awaitable[trio.abc.Stream | Routed]]
"""Opens the stream a connection is forwarded to; raises ``OSError``, ``trio.TooSlowError``
or a :class:`~transport.errors.TransportError` when the target cannot be reached."""

Route = Callable[[trio.abc.Stream, str], Awaitable[Routed]]
"""``route(conn, source)``: read what the client asks of the relay on ``conn``, answer it, and
open the target; raises :class:`RouteRefused` once it refused the client (after telling it),
or what :data:`OpenTarget` raises."""


class RouteRefused(TransportError):
    """A :data:`Route` refused the connection (and told the client why); close it."""


@dataclass
class PipeStats:
    """Bytes moved by :func:`pipe_streams`, per direction."""

    a_to_b: int = 0
    b_to_a: int = 0


async def _copy(
    src: trio.abc.ReceiveStream,
    dst: trio.abc.SendStream,
    stats: PipeStats,
    up: bool,
    chunk_size: int,
) -> None:
    if isinstance(src, trio.SocketStream) and isinstance(dst, trio.SocketStream):
        await _copy_socket(src, dst, stats, up, chunk_size)
    else:
        while True:
            data = await src.receive_some(chunk_size)
            if not data:
                break
            await dst.send_all(data)
            if up:
                stats.a_to_b += len(data)
            else:
                stats.b_to_a += len(data)
    if isinstance(dst, trio.abc.HalfCloseableStream):
        await dst.send_eof()  # propagate the half-close; the other direction goes on
    else:
        await dst.aclose()


async def _copy_socket(
    src: trio.SocketStream,
    dst: trio.SocketStream,
    stats: PipeStats,
    up: bool,
    chunk_size: int,
) -> None:
    """The socket fast path: ``recv_into`` one buffer, ``send_all`` from it, until EOF."""
    sock = src.socket
    buf = bytearray(chunk_size)
    with memoryview(buf) as view:
        while True:
            try:
                n = await sock.recv_into(view)
            except OSError as exc:  # a reset: what SocketStream.receive_some would raise
                raise trio.BrokenResourceError(str(exc)) from exc
            if not n:
                return
            await dst.send_all(view[:n])
            if up:
                stats.a_to_b += n
            else:
                stats.b_to_a += n


def _enlarge_unix_buffers(stream: trio.abc.Stream) -> None:
    """Raise an AF_UNIX stream's socket buffers for a bulk pipe (best effort; not on TCP,
    where it would switch off the kernel's auto-tuning)."""
    if not isinstance(stream, trio.SocketStream) or stream.socket.family != socket.AF_UNIX:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            if stream.socket.getsockopt(socket.SOL_SOCKET, option) < _BULK_SOCKET_BUFFER:
                stream.socket.setsockopt(socket.SOL_SOCKET, option, _BULK_SOCKET_BUFFER)
        except OSError:  # pragma: no cover - limits are advisory
            pass


async def pipe_streams(
    a: trio.abc.Stream, b: trio.abc.Stream, *, chunk_size: int = PIPE_CHUNK_SIZE
) -> PipeStats:
    """Copy ``a -> b`` and ``b -> a`` until both directions reach EOF or either side fails.

    EOF in one direction is propagated as ``send_eof`` (half-close). A broken or reset side
    stops both directions. The streams are not closed here (the caller owns them).

    Args:
        chunk_size: bytes moved per read and direction (the memory a pipe holds per
            direction); above :data:`PIPE_CHUNK_SIZE`, AF_UNIX socket buffers are raised too.
    """
    if chunk_size < 1:
        raise ConfigurationError("chunk_size must be at least 1")
    if chunk_size > PIPE_CHUNK_SIZE:
        _enlarge_unix_buffers(a)
        _enlarge_unix_buffers(b)
    stats = PipeStats()

    async def run(src: trio.abc.Stream, dst: trio.abc.Stream, up: bool) -> None:
        try:
            await _copy(src, dst, stats, up, chunk_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, TransportError, OSError):
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, a, b, True)
        nursery.start_soon(run, b, a, False)
    return stats


def _source_of(stream: trio.abc.Stream) -> str:
    """The peer's address without its port (what ``max_per_source`` counts), or ``"?"``."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "?"
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple) and peer:
        return str(peer[0])  # IP (TCP) or CID (vsock)
    return str(peer) or "?"


class _Admission:
    """Who may be forwarded now: the global and per-source counts (private)."""

    def __init__(self, max_connections: int, max_per_source: int | None) -> None:
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self.active = 0
        self.per_source: dict[str, int] = {}
        self.freed = trio.Event()

    def refusal(self, source: str) -> str | None:
        if self.active >= self.max_connections:
            return f"all {self.max_connections} connection slots are busy"
        if self.max_per_source is not None and self.per_source.get(source, 0) >= (
            self.max_per_source
        ):
            return f"{self.max_per_source} connections from {source} already"
        return None

    def take(self, source: str) -> None:
        self.active += 1
        self.per_source[source] = self.per_source.get(source, 0) + 1

    def release(self, source: str) -> None:
        self.active -= 1
        left = self.per_source[source] - 1
        if left:
            self.per_source[source] = left
        else:
            del self.per_source[source]
        self.freed.set()
        self.freed = trio.Event()


async def _forward(
    conn: trio.abc.Stream,
    opener: Callable[[], Awaitable[trio.abc.Stream | Routed]],
    *,
    name: str,
    conn_id: int,
    source: str,
    target: str,
    admission: _Admission,
    chunk_size: int,
) -> None:
    started = trio.current_time()
    try:
        async with conn:
            try:
                opened = await opener()
            except RouteRefused:
                return  # the route told the client and logged why
            except (OSError, trio.TooSlowError, TransportError) as exc:
                # Closed without a byte: the client sees "nothing answered", not garbage.
                log.warning(
                    f"{name}_target_unreachable",
                    conn=conn_id,
                    source=source,
                    target=target,
                    error=str(exc) or type(exc).__name__,
                )
                return
            routed = opened if isinstance(opened, Routed) else Routed(opened)
            try:
                async with routed.stream:
                    stats = await pipe_streams(conn, routed.stream, chunk_size=chunk_size)
            finally:
                if routed.release is not None:
                    routed.release()
            log.info(
                f"{name}_connection_closed",
                conn=conn_id,
                source=source,
                target=routed.target or target,
                bytes_to_target=stats.a_to_b,
                bytes_from_target=stats.b_to_a,
                duration_s=round(trio.current_time() - started, 6),
            )
    finally:
        admission.release(source)


async def serve_forwarding(
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    open_target: OpenTarget | None = None,
    *,
    route: Route | None = None,
    name: str,
    target: str,
    max_connections: int,
    max_per_source: int | None = None,
    when_full: Literal["wait", "refuse"] = "refuse",
    source_of: Callable[[trio.abc.Stream], str] | None = None,
    chunk_size: int = PIPE_CHUNK_SIZE,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept connections on ``listeners`` and pipe each to a stream from ``open_target()``
    (or from ``route(conn, source)``).

    Args:
        listeners: where clients connect (closed when this returns).
        open_target: opens the target for one connection (see :data:`OpenTarget`).
        route: instead of ``open_target``: reads the client's request first (see :data:`Route`).
        name: prefix of the log events (``ingress``, ``vsock_proxy``, ``peer_relay``).
        target: the target, for logs.
        max_connections: connections forwarded at once.
        max_per_source: connections forwarded at once from one source; None: no cap.
        when_full: ``"wait"``: leave further clients in the backlog until a slot frees;
            ``"refuse"``: accept and close them at once (logged). Over ``max_per_source`` a
            client is always refused.
        source_of: who a connection comes from, for ``max_per_source`` and the logs
            (default: the peer's IP address, or its CID on vsock).
        chunk_size: bytes per read and direction (see :func:`pipe_streams`).
        task_status: ``started()`` once accepting.

    Never returns; cancel it to stop (listeners and forwarded connections are closed).

    Raises:
        ConfigurationError: ``max_connections`` < 1 or ``max_per_source`` < 1, or not exactly
            one of ``open_target`` and ``route``.
    """
    if (open_target is None) == (route is None):
        raise ConfigurationError("give exactly one of open_target and route")
    if chunk_size < 1:
        raise ConfigurationError("chunk_size must be at least 1")
    identify = source_of or _source_of
    if max_connections < 1:
        raise ConfigurationError("max_connections must be at least 1")
    if max_per_source is not None and max_per_source < 1:
        raise ConfigurationError("max_per_source must be at least 1")
    if when_full not in ("wait", "refuse"):
        raise ConfigurationError(f"when_full must be 'wait' or 'refuse', not {when_full!r}")
    admission = _Admission(max_connections, max_per_source)
    ids = itertools.count(1)

    async def accept_loop(listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        async with listener:
            while True:
                if when_full == "wait":
                    while admission.active >= max_connections:
                        await admission.freed.wait()
                conn = await listener.accept()
                conn_id = next(ids)
                source = identify(conn)
                refusal = admission.refusal(source)
                if refusal is not None:
                    log.warning(
                        f"{name}_connection_refused", conn=conn_id, source=source, reason=refusal
                    )
                    await trio.aclose_forcefully(conn)
                    continue
                admission.take(source)
                log.debug(f"{name}_connection_opened", conn=conn_id, source=source)
                handlers.start_soon(
                    _forward_one, conn, conn_id, source, name=f"{name} connection {conn_id}"
                )

    async def _forward_one(conn: trio.abc.Stream, conn_id: int, source: str) -> None:
        opener: Callable[[], Awaitable[trio.abc.Stream | Routed]]
        if route is not None:
            opener = partial(route, conn, source)
        else:
            assert open_target is not None
            opener = open_target
        await _forward(
            conn,
            opener,
            name=name,
            conn_id=conn_id,
            source=source,
            target=target,
            admission=admission,
            chunk_size=chunk_size,
        )

    async with trio.open_nursery() as handlers:
        for listener in listeners:
            handlers.start_soon(accept_loop, listener)
        task_status.started()
    raise AssertionError("unreachable")  # pragma: no cover
