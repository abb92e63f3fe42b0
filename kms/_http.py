"""HTTP/1.1 serving shared by the KMS daemon (:mod:`kms.daemon`) and the XKS proxy
(:mod:`kms.xks.server`): h11 on trio, over TCP or TLS, with the bounds an Internet-facing key
service needs.

Theory of operation (shape of h11's ``examples/trio-server.py``, ``TrioHTTPWrapper``): one task
per connection, the h11 state machine fed from ``receive_some``.

* **Admission.** At most ``max_connections`` connections, at most ``max_connections_per_source``
  per peer address. A connection is *unproven* until it has sent a complete request; when a cap
  is reached the oldest unproven connection (of that source for the per-source cap) is closed to
  make room, so half-open or slow connections cannot hold the slots that callers need. When every
  slot is proven the newcomer is closed at once. With a :class:`LoadShare` (KMS worker
  processes) the count is published and a busier worker lets a sibling accept first.
* **Time.** A fresh connection has ``request_timeout_s`` to finish its TLS handshake and deliver
  its first complete request; each later request has ``request_timeout_s`` from its first byte;
  idle keep-alive time (``keep_alive_timeout_s``) is only granted after a request the app
  marked *authenticated*. A caller that did not authenticate gets its answer and the connection
  closes. A request that started but did not arrive in time is answered 408 or just closed
  (:attr:`HttpProfile.answer_slow`).
* **Size.** The request head is at most :data:`MAX_HEAD_BYTES` and the server never reads past
  it while the head is incomplete (h11 alone would accept a complete head as large as one
  receive); the body at most ``max_body_bytes`` (a ``Content-Length`` beyond it is refused
  before any body byte is read).
* **Shutdown.** When ``shutdown`` is set the listeners close, idle connections close at once,
  requests in flight finish within ``graceful_timeout_s`` (answered with ``Connection: close``).

What differs between the two servers is data: the app (:class:`HttpApp`, which also words the
error replies), :class:`HttpLimits`, :class:`HttpProfile` (log names, 408 or not, bounds of
sending and lingering), TLS, and the optional :class:`LoadShare`.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import h11
import structlog
import trio

__all__ = [
    "MAX_HEAD_BYTES",
    "HttpLimits",
    "HttpProfile",
    "HttpRequest",
    "HttpReply",
    "HttpApp",
    "LoadShare",
    "PeerCheck",
    "Admission",
    "Shutdown",
    "Connection",
    "serve_http",
]

log = structlog.get_logger()

#: Request line + headers. AWS SDK heads are ~1 KiB, KMS's XKS requests ~600 bytes; 16 KiB is
#: h11's own default order.
MAX_HEAD_BYTES = 16 * 1024
#: Bytes per receive once the head is in (perf-baseline §3.2: ≤ 64 KiB).
_RECEIVE_SIZE = 65536
#: Time allowed to push an error reply to a misbehaving client before dropping it.
_ERROR_SEND_TIMEOUT_S = 5.0
#: Lingering close after an error reply: at most this long (bytes: HttpProfile).
_LINGER_S = 1.0
#: accept() errors that mean "out of descriptors or memory": back off, keep serving.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: At most one admission warning per this many seconds (a flood must not flood the log).
_ADMISSION_LOG_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds of the HTTP layer (see the module docstring)."""

    max_body_bytes: int = 64 * 1024
    request_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 60.0
    max_connections: int = 1024
    max_connections_per_source: int = 128
    graceful_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class HttpProfile:
    """What one server does differently from another on this layer."""

    #: Prefix of the log events (``<name>_connection_evicted``, ...).
    name: str
    #: A request that started but did not arrive in time is answered with
    #: ``app.protocol_error(408, ...)``; otherwise the connection just closes.
    answer_slow: bool = False
    #: Bound on sending a normal reply (None: none; error replies always have one).
    reply_timeout_s: float | None = None
    #: Bytes discarded at most while lingering after an error reply.
    linger_max_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A complete request."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    #: The peer's address (logs; the per-source cap's unit).
    source: str


@dataclass(frozen=True, slots=True)
class HttpReply:
    """A complete reply (``Content-Length`` is added when it is sent)."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    #: The request passed authentication: the connection may be kept alive.
    authenticated: bool = False


class HttpApp(Protocol):
    """What :func:`serve_http` serves."""

    async def handle(self, request: HttpRequest) -> HttpReply:
        """Answer one complete request. Must not raise for bad input (answer it)."""
        ...

    def protocol_error(self, status: int, reason: str) -> HttpReply:
        """The reply to a request that never became one: malformed HTTP (400, 431), a body
        over the limit (413), too slow (408, with :attr:`HttpProfile.answer_slow`)."""
        ...


class LoadShare(Protocol):
    """Spreads connections over processes sharing a listening socket
    (:class:`kms.coherence.ConnectionShare`)."""

    def update(self, connections: int) -> None:
        """This process now holds ``connections``."""
        ...

    async def wait_turn(self, connections: Callable[[], int]) -> None:
        """Before accepting: wait (bounded) while this process is over its share."""
        ...


#: Checks a TLS peer after the handshake; returns why it is refused, or None to accept.
PeerCheck = Callable[[trio.SSLStream[trio.SocketStream]], str | None]


def _source_of(stream: trio.abc.Stream) -> str:
    """The peer's address (the unit of the per-source cap); "local" for non-socket streams."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "local"
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError):
        return "unknown"


class Admission:
    """Connection slots: a global cap, a per-source cap, eviction of unproven connections.

    Every structure is an insertion-ordered dict, so admitting and evicting are O(1).
    """

    def __init__(
        self, limits: HttpLimits, profile: HttpProfile, share: LoadShare | None = None
    ) -> None:
        self._limits = limits
        self._name = profile.name
        self._share = share
        self._total = 0
        self._per_source: dict[str, int] = {}
        self._unproven: dict[Connection, None] = {}  # oldest first
        self._unproven_by_source: dict[str, dict[Connection, None]] = {}
        self._admitted: set[Connection] = set()
        self.evicted = 0
        self.refused = 0
        self._last_log = -float("inf")

    @property
    def total(self) -> int:
        """Connections admitted now."""
        return self._total

    def admit(self, conn: Connection) -> bool:
        """Take a slot for ``conn``, evicting the oldest unproven connection if a cap is hit.
        False: every slot is held by a proven connection (refuse ``conn``)."""
        src = conn.source
        if self._per_source.get(src, 0) >= self._limits.max_connections_per_source:
            victims = self._unproven_by_source.get(src)
            if not victims:
                return self._refuse(src)
            self._evict(next(iter(victims)))
        if self._total >= self._limits.max_connections:
            if not self._unproven:
                return self._refuse(src)
            self._evict(next(iter(self._unproven)))
        self._total += 1
        if self._share is not None:
            self._share.update(self._total)
        self._per_source[src] = self._per_source.get(src, 0) + 1
        self._admitted.add(conn)
        self._unproven[conn] = None
        self._unproven_by_source.setdefault(src, {})[conn] = None
        return True

    def proven(self, conn: Connection) -> None:
        """``conn`` delivered a complete request: no longer evictable."""
        self._unproven.pop(conn, None)
        by_source = self._unproven_by_source.get(conn.source)
        if by_source is not None:
            by_source.pop(conn, None)
            if not by_source:
                del self._unproven_by_source[conn.source]

    def leave(self, conn: Connection) -> None:
        """Free ``conn``'s slot (idempotent)."""
        if conn not in self._admitted:
            return
        self._admitted.discard(conn)
        self.proven(conn)
        self._total -= 1
        if self._share is not None:
            self._share.update(self._total)
        left = self._per_source[conn.source] - 1
        if left:
            self._per_source[conn.source] = left
        else:
            del self._per_source[conn.source]

    def _evict(self, victim: Connection) -> None:
        self.leave(victim)
        victim.scope.cancel()
        self.evicted += 1
        self._warn(f"{self._name}_connection_evicted", victim.source)

    def _refuse(self, source: str) -> bool:
        self.refused += 1
        self._warn(f"{self._name}_connection_refused", source)
        return False

    def _warn(self, event: str, source: str) -> None:
        now = trio.current_time()
        if now - self._last_log >= _ADMISSION_LOG_INTERVAL_S:
            self._last_log = now
            log.warning(
                event,
                source=source,
                evicted_total=self.evicted,
                refused_total=self.refused,
                connections=self._total,
                reason="connection limits reached (slow or partial requests are displaced)",
            )


class Shutdown:
    """Shared shutdown state: which connections are idle (safe to close now)."""

    def __init__(self) -> None:
        self.requested = False
        self.idle_scopes: set[trio.CancelScope] = set()

    def trigger(self) -> None:
        self.requested = True
        for scope in list(self.idle_scopes):
            scope.cancel()


class _TooSlow(Exception):
    """A request (or a TLS handshake) did not complete in time (private control flow)."""


class Connection:
    """One client connection: h11 fed from the stream, one request at a time."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        app: HttpApp,
        limits: HttpLimits,
        profile: HttpProfile,
        shutdown: Shutdown,
        admission: Admission | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        peer_check: PeerCheck | None = None,
    ) -> None:
        self.tcp = stream
        self.stream: trio.abc.Stream = stream
        self.app = app
        self.limits = limits
        self.profile = profile
        self.shutdown = shutdown
        self.admission = admission
        self.ssl_context = ssl_context
        self.peer_check = peer_check
        self.source = _source_of(stream)
        self.scope = trio.CancelScope()
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._head_room = MAX_HEAD_BYTES + 1
        self._in_head = True

    async def serve(self) -> None:
        """Serve until the connection ends. A failure is confined to this connection: logged,
        connection closed, the server keeps serving others."""
        try:
            with self.scope:
                await self._serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError, _TooSlow):
            pass
        except Exception:
            log.exception(f"{self.profile.name}_connection_failed", source=self.source)
        finally:
            if self.admission is not None:
                self.admission.leave(self)
            with trio.move_on_after(1.0) as scope:
                scope.shield = True
                await self.stream.aclose()

    async def _handshake(self) -> bool:
        """TLS handshake and peer check, within the first request's time. False: refused."""
        if self.ssl_context is None:
            return True
        name = self.profile.name
        tls = trio.SSLStream(self.tcp, self.ssl_context, server_side=True, https_compatible=True)
        self.stream = tls
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            log.info(f"{name}_tls_handshake_failed", source=self.source, reason=str(exc.__cause__))
            return False
        if self.peer_check is not None:
            refused = self.peer_check(tls)  # type: ignore[arg-type]  # an SSLStream over TCP
            if refused is not None:
                log.warning(f"{name}_tls_peer_refused", source=self.source, reason=refused)
                return False
        return True

    async def _serve(self) -> None:
        # The whole first request, TLS handshake included, has request_timeout_s from here.
        first = trio.CancelScope(deadline=trio.current_time() + self.limits.request_timeout_s)
        with first:
            if not await self._handshake():
                return
        if first.cancelled_caught:
            log.info(f"{self.profile.name}_tls_handshake_timeout", source=self.source)
            return
        deadline = first.deadline
        while True:
            try:
                got = await self._read_request(deadline)
            except h11.RemoteProtocolError as exc:
                await self._send_error(self.app.protocol_error(exc.error_status_hint, str(exc)))
                return
            except _TooSlow:
                if self.profile.answer_slow:
                    await self._send_error(self.app.protocol_error(408, "request too slow"))
                return
            if got is None:
                return
            if isinstance(got, HttpReply):  # refused before the body was read (413)
                await self._send_error(got)
                return
            if self.admission is not None:
                self.admission.proven(self)
            reply = await self.app.handle(got)
            # A caller that did not authenticate gets its answer and the connection closes:
            # only authenticated callers keep connections (and their slots) alive.
            close = (
                self.shutdown.requested
                or not reply.authenticated
                or self.conn.our_state is not h11.SEND_RESPONSE
            )
            with trio.move_on_after(self.profile.reply_timeout_s or float("inf")) as send_scope:
                await self._reply(reply, close=close)
            if send_scope.cancelled_caught:
                # A client that does not read its answers holds no task for longer than this.
                log.info(
                    f"{self.profile.name}_reply_timeout",
                    source=self.source,
                    timeout_s=self.profile.reply_timeout_s,
                )
                return
            if close or self.conn.our_state is h11.MUST_CLOSE:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
            deadline = trio.current_time() + self.limits.keep_alive_timeout_s

    async def _read_request(self, deadline: float) -> HttpRequest | HttpReply | None:
        """The next request; an :class:`HttpReply` to send if it was refused before its body;
        None when the connection should end (closed, idle too long, shutting down).

        Raises:
            _TooSlow: the request started but did not arrive in time.
            h11.RemoteProtocolError: malformed HTTP.
        """
        leftover = len(self.conn.trailing_data[0])  # pipelined bytes already buffered
        self._head_room = MAX_HEAD_BYTES + 1 - leftover
        self._in_head = True
        started = leftover > 0
        request_timeout = self.limits.request_timeout_s
        scope = trio.CancelScope(deadline=deadline)
        if started:
            scope.deadline = min(deadline, trio.current_time() + request_timeout)
        else:
            self.shutdown.idle_scopes.add(scope)
            if self.shutdown.requested:
                scope.cancel()

        def first_bytes() -> None:
            """From the first byte a request has request_timeout_s to finish, and shutdown no
            longer counts the connection as idle."""
            nonlocal started
            if not started:
                started = True
                self.shutdown.idle_scopes.discard(scope)
                scope.deadline = min(scope.deadline, trio.current_time() + request_timeout)

        try:
            with scope:
                return await self._read_within(first_bytes)
        finally:
            self.shutdown.idle_scopes.discard(scope)
        # Only reached when the scope expired or shutdown cancelled it.
        if started and not self.shutdown.requested:
            raise _TooSlow
        return None

    async def _next_event(
        self, on_bytes: Callable[[], None]
    ) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.Request):
                    self._in_head = False
                return event
            size = _RECEIVE_SIZE
            if self._in_head:
                size = self._head_room  # never buffer past the head limit (+1: h11 sees it)
                if size <= 0:
                    raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            data = await self.stream.receive_some(size)
            if data:
                on_bytes()
            if self._in_head:
                self._head_room -= len(data)
            self.conn.receive_data(bytes(data))

    async def _read_within(self, on_bytes: Callable[[], None]) -> HttpRequest | HttpReply | None:
        event = await self._next_event(on_bytes)
        if not isinstance(event, h11.Request):
            return None
        limit = self.limits.max_body_bytes
        for name, value in event.headers:
            if name == b"content-length" and int(value) > limit:
                return self.app.protocol_error(413, f"declared body of {int(value)} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            ev = await self._next_event(on_bytes)
            if isinstance(ev, h11.Data):
                size += len(ev.data)
                if size > limit:
                    return self.app.protocol_error(413, f"body over {limit} bytes")
                chunks.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                return HttpRequest(
                    method=event.method.decode("ascii", "replace"),
                    target=event.target.decode("latin-1"),
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
                    body=b"".join(chunks),
                    source=self.source,
                )
            else:
                return None

    async def _reply(self, reply: HttpReply, *, close: bool) -> None:
        """Head, body and end in ONE send_all: each send that wakes the peer costs a cross-CPU
        wake-up (measured 0.2-0.4 ms here), so a reply is never split (perf-baseline §3.3)."""
        headers = [*reply.headers, ("Content-Length", str(len(reply.body)))]
        if close:
            headers.append(("Connection", "close"))
        data = self.conn.send(h11.Response(status_code=reply.status, headers=headers))
        data += self.conn.send(h11.Data(data=reply.body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def _send_error(self, reply: HttpReply) -> None:
        with trio.move_on_after(_ERROR_SEND_TIMEOUT_S):
            try:
                if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._reply(reply, close=True)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                return
        await self._linger()

    async def _linger(self) -> None:
        """After an error reply the peer may still be sending (an oversized head or body):
        closing with unread bytes makes the kernel send a reset, which can destroy our reply
        before the peer reads it. Half-close, then discard what arrives, bounded in time and
        bytes. TLS has no half-close (its reply was flushed by send_all)."""
        send_eof = getattr(self.stream, "send_eof", None)
        if send_eof is None:
            return
        with trio.move_on_after(_LINGER_S):
            try:
                await send_eof()
                drained = 0
                while drained < self.profile.linger_max_bytes:
                    chunk = await self.stream.receive_some(_RECEIVE_SIZE)
                    if not chunk:
                        return
                    drained += len(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return


async def serve_http(
    app: HttpApp,
    listeners: Sequence[trio.SocketListener],
    limits: HttpLimits,
    profile: HttpProfile,
    *,
    ssl_context: ssl.SSLContext | None = None,
    peer_check: PeerCheck | None = None,
    share: LoadShare | None = None,
    shutdown: trio.Event | None = None,
    on_ready: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve ``app`` on ``listeners`` until cancelled, or until ``shutdown`` is set (then drain
    within ``limits.graceful_timeout_s`` and return). The listeners are closed on return.

    Args:
        ssl_context: serve HTTPS (server side) instead of HTTP.
        peer_check: after a TLS handshake, may refuse the peer (mutual TLS subject rules).
        share: spreads connections over worker processes on one listening socket.
        on_ready: awaited once the accept loops run.
    """
    state = Shutdown()
    admission = Admission(limits, profile, share)
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as handlers:

            async def accept(listener: trio.SocketListener) -> None:
                async with listener:
                    while True:
                        if share is not None:  # a less loaded sibling takes the next one
                            await share.wait_turn(lambda: admission.total)
                        try:
                            stream = await listener.accept()
                        except OSError as exc:
                            if exc.errno in _OUT_OF_RESOURCES:
                                log.error(f"{profile.name}_accept_failed", errno=exc.errno)
                                await trio.sleep(0.1)  # back off while out of descriptors
                                continue
                            raise
                        conn = Connection(
                            stream,
                            app,
                            limits,
                            profile,
                            state,
                            admission,
                            ssl_context=ssl_context,
                            peer_check=peer_check,
                        )
                        if not admission.admit(conn):
                            stream.socket.close()  # every slot is a proven caller's
                            continue
                        handlers.start_soon(conn.serve)

            accept_scope = trio.CancelScope()

            async def accept_all() -> None:
                with accept_scope:
                    async with trio.open_nursery() as n:
                        for listener in listeners:
                            n.start_soon(accept, listener)

            handlers.start_soon(accept_all)
            if on_ready is not None:
                await on_ready()
            if shutdown is not None:

                async def drain() -> None:
                    await shutdown.wait()
                    log.info(f"{profile.name}_shutting_down")
                    accept_scope.cancel()
                    state.trigger()
                    handlers.cancel_scope.deadline = trio.current_time() + limits.graceful_timeout_s

                outer.start_soon(drain)
        outer.cancel_scope.cancel()
