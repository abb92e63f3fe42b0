"""The server side of ``enclave-rpc/1`` over trio: :func:`serve_rpc`.

Theory of operation
-------------------

The task running :func:`serve_rpc` reads the byte stream. It feeds the core and takes events
one at a time, so that acting on one (an inline answer frees its stream) happens before the
next OPEN counts against ``max_streams``, and dispatches each to its stream's endpoint:

* a method declared with :func:`~transport.rpc.unary_inline` gets an :class:`_InlineCall`,
  answered right there in the reader when its request arrives: no task, no cancel scope;
* any other method gets an :class:`~transport.rpc.RpcStream` and runs its handler in a reused
  task (:class:`transport.sync.TaskPool`: a finished handler's task parks and takes the next
  stream, ~6 µs cheaper per call here than a new task and cancel scope);
* a stream whose handler returned while the client still sends gets a :class:`_Drain`, which
  discards the client's messages while still granting credit, so the client never blocks on
  a finished stream.

Frames the reader owes (PONGs, refusals, grants, inline answers) go out with one write per
batch read. A client's CANCEL cancels its handler, but never in the middle of the handler's own
write (which would cut a frame and fail the connection): that cancel waits for the write.

A watchdog closes the connection when it is idle (nothing received or sent for
``idle_timeout``) or stalled (a write the client does not read, or a frame it started and does
not finish, for ``stall_timeout``), so idle and stalled clients do not hold a connection slot.
"""

from __future__ import annotations

from typing import Any, Final

import structlog
import trio

from transport.errors import ChannelClosed, PeerTimeout, RemoteProtocolError, TransportError
from transport.rpc._connection import (
    CLOSE_TIMEOUT_S,
    Connection,
    RpcStatistics,
    unwrap_group,
)
from transport.rpc._core import (
    DEFAULT_MAX_BUFFERED_BYTES,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_STREAMS,
    INITIAL_WINDOW_BYTES,
    INITIAL_WINDOW_MESSAGES,
    Role,
    RpcConnection,
)
from transport.rpc._errors import RpcError
from transport.rpc._events import RequestReceived, StreamOpened
from transport.rpc._routing import (
    DEFER,
    Handler,
    InlineFunction,
    has_otherwise,
    inline_function,
)
from transport.rpc._stream import ACTIVE_STATES, RpcStream
from transport.sync import Parker, TaskPool

__all__ = [
    "RpcServerConnection",
    "serve_rpc",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_STALL_TIMEOUT_S",
]

log = structlog.get_logger()

#: A connection with nothing received or sent for this long is closed (seconds): a client that
#: handshakes and sits idle must not hold a server slot for ever. Raise it for handlers that
#: compute longer than this without sending anything.
DEFAULT_IDLE_TIMEOUT_S: Final = 60.0
#: A write the client does not read, or a frame it started and does not finish, for this long
#: fails the connection (seconds).
DEFAULT_STALL_TIMEOUT_S: Final = 30.0


#: Methods whose inline-or-not answer is cached per connection: an application has a handful;
#: the cap bounds what a client can make us remember.
_INLINE_CACHE_SIZE: Final = 64


class _InlineView(RpcStream):
    """What an inline function gets as its ``stream`` argument on the unary fast path: an
    :class:`RpcStream` with only :attr:`stream_id`, :attr:`method` and :attr:`metadata` set,
    which is all :func:`~transport.rpc.unary_inline` promises it (made for every call, so it
    does no more work than that)."""

    __slots__ = ()

    def __init__(  # the parent's __init__ is deliberately not called (see the docstring)
        self, owner: _ServerConnection, stream_id: int, method: str, metadata: Any
    ) -> None:
        self._owner = owner
        self.stream_id = stream_id  # type: ignore[misc]
        self.method = method  # type: ignore[misc]
        self.metadata = metadata  # type: ignore[misc]


class _InlineCall:
    """Endpoint of a stream whose method is answered inline (see :func:`unary_inline`)."""

    __slots__ = ("_conn", "fn", "stream")

    def __init__(self, conn: _ServerConnection, stream: RpcStream, fn: InlineFunction) -> None:
        self._conn = conn
        self.stream = stream
        self.fn = fn

    def deliver(self, message: Any, size: int, end: bool) -> None:
        self._conn.answer_inline(self.stream, self.fn, message, size, end)

    def deliver_end(self) -> None:  # the stream ended without a request
        conn = self._conn
        stream_id = self.stream.stream_id
        conn.outbox.append(
            conn.core.send_error(stream_id, "invalid_argument", "a unary method needs one request")
        )
        conn.streams.pop(stream_id, None)

    def deliver_reset(self, error: RpcError) -> None:
        pass

    def credit_arrived(self) -> None:
        pass

    def connection_failed(self) -> None:
        pass


class _Drain:
    """Endpoint of a stream whose handler is done while the client still sends: its messages
    are dropped and credited, so the client never blocks on a finished stream."""

    __slots__ = ("_conn", "stream_id")

    def __init__(self, conn: _ServerConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id

    def deliver(self, message: Any, size: int, end: bool) -> None:
        grant = self._conn.core.message_consumed(self.stream_id, size)
        if grant:
            self._conn.outbox.append(grant)

    def deliver_end(self) -> None:
        pass

    def deliver_reset(self, error: RpcError) -> None:
        pass

    def credit_arrived(self) -> None:
        pass

    def connection_failed(self) -> None:
        pass


class _ServerConnection(Connection):
    def __init__(
        self,
        transport: trio.abc.Stream,
        core: RpcConnection,
        handler: Handler,
        handler_nursery: trio.Nursery,
    ) -> None:
        super().__init__(transport, core)
        self.handler = handler
        self.nursery = handler_nursery
        self.pool: TaskPool[RpcStream] = TaskPool(handler_nursery, self.run_handler)
        # Running handlers: stream id -> (its cancel scope, its task), for the peer's CANCEL.
        self.handlers: dict[int, tuple[trio.CancelScope, trio.lowlevel.Task]] = {}
        self.deferred_cancels: list[trio.CancelScope] = []
        self.reader_scope = trio.CancelScope()
        self.closed_reason: str | None = None  # why the watchdog closed the connection
        # method -> (its inline fn, whether that fn has an `otherwise` handler)
        self.inline_cache: dict[str, tuple[InlineFunction | None, bool]] = {}

    # ------------------------------------------------------------ hooks

    async def wait_until(self, ready: Any, parker: Parker) -> None:
        # The reader task does all the reading: just park until the dispatch wakes us.
        while not ready() and self.failure is None:
            await parker.park()

    def on_fail(self) -> None:
        self.reader_scope.cancel()

    def after_write(self) -> None:
        if self.deferred_cancels:
            for scope in self.deferred_cancels:
                scope.cancel()
            self.deferred_cancels.clear()

    def inline_for(self, method: str) -> tuple[InlineFunction | None, bool]:
        try:
            return self.inline_cache[method]
        except KeyError:
            found = (inline_function(self.handler, method), has_otherwise(self.handler, method))
            if len(self.inline_cache) < _INLINE_CACHE_SIZE:
                self.inline_cache[method] = found
            return found

    def on_open(self, ev: StreamOpened) -> None:
        stream = RpcStream(self, ev.stream_id, ev.method, ev.metadata)
        fn, otherwise = self.inline_for(ev.method)
        if fn is not None and not otherwise:
            self.streams[ev.stream_id] = _InlineCall(self, stream, fn)
            return  # answered by answer_inline() when the request arrives
        self.streams[ev.stream_id] = stream
        self.running_handlers += 1
        self.pool.start(stream)

    def on_request(self, ev: RequestReceived) -> None:
        # The unary fast path: an inline method whose request came with the OPEN is answered
        # at once, without registering anything for the stream.
        fn, otherwise = self.inline_for(ev.method)
        if fn is not None and ev.end:
            view = _InlineView(self, ev.stream_id, ev.method, ev.metadata)
            self.answer_inline(view, fn, ev.message, ev.size, True)
            return
        stream = RpcStream(self, ev.stream_id, ev.method, ev.metadata)
        if fn is not None and not otherwise:
            # An inline method whose client keeps sending: answer, then drain.
            call = _InlineCall(self, stream, fn)
            self.streams[ev.stream_id] = call
            call.deliver(ev.message, ev.size, ev.end)
            return
        self.streams[ev.stream_id] = stream
        stream.deliver(ev.message, ev.size, ev.end)
        self.running_handlers += 1
        self.pool.start(stream)

    def on_reset(self, stream_id: int) -> None:
        """Cancel the stream's handler, but never in the middle of its own write (which would
        cut a frame and fail the whole connection): then the cancel waits for the write."""
        entry = self.handlers.get(stream_id)
        if entry is None:
            return
        scope, task = entry
        if self.writer is task:
            self.deferred_cancels.append(scope)
        else:
            scope.cancel()

    # ------------------------------------------------------------ inline methods

    def answer_inline(
        self, stream: RpcStream, fn: InlineFunction, request: Any, size: int, end: bool
    ) -> None:
        """Answer a unary request in the reader task: no task, no cancel scope, no hop; or, if
        ``fn`` returns DEFER, hand the request to a handler task (:meth:`defer`)."""
        core = self.core
        stream_id = stream.stream_id
        try:
            response = fn(request, stream)
            if response is DEFER:
                self.defer(stream, request, size, end)
                return
            data = core.send_message(stream_id, response, end=True)
        except RpcError as exc:
            data = core.send_error(stream_id, exc.code, exc.message)
        except Exception as exc:
            log.error(
                "rpc_handler_failed",
                method=stream.method,
                stream_id=stream_id,
                error_type=type(exc).__name__,
                exc_info=exc,
            )
            data = core.send_error(stream_id, "internal", "internal error")
        self.inline_answers += 1
        grant = core.message_consumed(stream_id, size)
        if grant:
            self.outbox.append(grant)
        self.outbox.append(data)
        if core.stream_state(stream_id) in ACTIVE_STATES:
            self.streams[stream_id] = _Drain(self, stream_id)  # the client still sends
        else:
            self.streams.pop(stream_id, None)

    def defer(self, stream: RpcStream, request: Any, size: int, end: bool) -> None:
        """Run the method's handler for a request its inline function deferred: the stream
        becomes an ordinary one, with the request as its first message (not yet consumed: the
        handler's receive reports it, as for any handler), in a handler task."""
        if type(stream) is _InlineView:  # the fast path's view: make the real stream
            stream = RpcStream(self, stream.stream_id, stream.method, stream.metadata)
        self.deferred_answers += 1
        self.streams[stream.stream_id] = stream
        stream.deliver(request, size, end)
        self.running_handlers += 1
        self.pool.start(stream)

    # ------------------------------------------------------------ handler tasks

    async def run_handler(self, st: RpcStream, scope: trio.CancelScope) -> None:
        """Run the handler for ``st`` under ``scope`` (cancelled by a CANCEL for ``st``, or
        when the connection fails); errors become ERROR frames (see serve_rpc)."""
        stream_id = st.stream_id
        self.handlers[stream_id] = (scope, trio.lowlevel.current_task())
        try:
            if self.failure is not None or self.streams.get(stream_id) is not st:
                scope.cancel()  # reset (or the connection died) before the handler started
            try:
                await self.handler(st)
            except RpcError as exc:
                await self.finish_with_error(st, exc.code, exc.message)
            except Exception as exc:
                if self.failure is not None:
                    # The connection died under the handler: not the handler's bug.
                    log.debug("rpc_handler_aborted", method=st.method, error=str(exc))
                    return
                log.error(
                    "rpc_handler_failed",
                    method=st.method,
                    stream_id=stream_id,
                    error_type=type(exc).__name__,
                    exc_info=exc,
                )
                await self.finish_with_error(st, "internal", "internal error")
            else:
                if not st.local_ended and self.streams.get(stream_id) is st and st.active:
                    await self.send_quietly(self.core.send_end(stream_id))
        finally:
            self.running_handlers -= 1
            del self.handlers[stream_id]
            self.finish(st)

    async def finish_with_error(self, st: RpcStream, code: str, message: str) -> None:
        stream_id = st.stream_id
        if self.failure is None and self.streams.get(stream_id) is st and st.active:
            data = self.core.send_error(stream_id, code, message)
            st.deliver_reset(RpcError(code, message))
            st.discard_queue()
            self.discard(stream_id, st)
            await self.send_quietly(data)

    def finish(self, st: RpcStream) -> None:
        """After the handler: forget the stream, or drain the client's remaining input."""
        if self.failure is not None:
            return
        stream_id = st.stream_id
        if self.streams.get(stream_id) is st and st.active:
            self.streams[stream_id] = _Drain(self, stream_id)
        else:
            self.discard(stream_id, st)
        st.discard_queue()

    # ------------------------------------------------------------ reading, watchdog

    async def read_loop(self) -> None:
        """Read and dispatch until EOF, failure or cancellation; never raises on peer
        faults. Frames the reader must send (PONGs, refusals, grants, inline answers) are
        written by the reader itself, once per batch read (coalesced)."""
        core = self.core
        with self.reader_scope:
            while True:
                await self.read_once()
                if self.failure is not None:
                    return
                if self.outbox or core.has_data_to_send():
                    try:  # self.flush(), inlined: one coroutine fewer per answer
                        if self.writer is None:
                            await self._write_outbox(then_wait=True)  # then: read again
                        else:
                            await self._wait_written()
                    except TransportError:
                        return  # the connection failed; fail() recorded why

    async def watchdog(self, idle_timeout: float | None, stall_timeout: float | None) -> None:
        """Close the connection when idle or stalled (see the module docstring)."""
        while self.failure is None:
            now = trio.current_time()
            wake = now + 3600.0
            if stall_timeout is not None:
                started = self.write_started
                if started is not None:
                    if now - started >= stall_timeout:
                        self.close_for("the client stopped reading", stall_timeout, PeerTimeout)
                        return
                    wake = min(wake, started + stall_timeout)
                if self.core.receive_buffered or _transport_holds_partial(self.transport):
                    if now - self.last_received >= stall_timeout:
                        self.close_for("the client stalled mid-frame", stall_timeout, PeerTimeout)
                        return
                    wake = min(wake, self.last_received + stall_timeout)
                else:
                    wake = min(wake, now + stall_timeout)  # look again for a partial frame
            if idle_timeout is not None:
                last = max(self.last_received, self.last_sent)
                if now - last >= idle_timeout and self.writer is None:
                    await self.send_quietly(self.core.send_goaway("unavailable", "idle timeout"))
                    self.close_for("idle", idle_timeout, ChannelClosed)
                    return
                wake = min(wake, last + idle_timeout)
            await trio.sleep_until(wake)

    def close_for(self, reason: str, seconds: float, cls: type[TransportError]) -> None:
        log.info("rpc_connection_closed", reason=reason, after_s=seconds)
        self.closed_reason = reason
        self.fail(cls, f"RPC server closed the connection: {reason} ({seconds} s)", None)


def _transport_holds_partial(transport: trio.abc.Stream) -> bool:
    """Whether the byte stream under us holds bytes it has not handed up yet (a secure
    channel's partly received record): a stall below the RPC frames."""
    statistics = getattr(transport, "statistics", None)
    if not callable(statistics):
        return False
    buffered = getattr(statistics(), "bytes_buffered", 0)
    return isinstance(buffered, int) and buffered > 0


class RpcServerConnection:
    """A view of one connection served by :func:`serve_rpc` (from ``nursery.start``)."""

    def __init__(self, conn: _ServerConnection) -> None:
        self._conn = conn

    def statistics(self) -> RpcStatistics:
        """Counters and current state of the connection (see :class:`RpcStatistics`)."""
        return self._conn.statistics()

    @property
    def closed(self) -> bool:
        """True once the connection failed or was closed."""
        return self._conn.failure is not None


async def serve_rpc(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    max_streams: int = DEFAULT_MAX_STREAMS,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    window_messages: int = INITIAL_WINDOW_MESSAGES,
    window_bytes: int = INITIAL_WINDOW_BYTES,
    max_buffered_bytes: int | None = DEFAULT_MAX_BUFFERED_BYTES,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_S,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT_S,
    task_status: trio.TaskStatus[RpcServerConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``enclave-rpc/1`` on ``stream`` until the client goes away.

    Each stream the client opens runs ``await handler(stream)`` in its own task, in a handler
    nursery owned by this call, at most ``max_streams`` at once (more are refused with
    ``RpcError("resource_exhausted", ...)`` on the client). A handler that raises
    ``RpcError(code, message)`` fails its stream with that code; any other exception is logged
    here and sent as ``"internal"`` with a generic message. Either way the connection stays up.
    A handler that returns without calling ``send_end()`` has its stream ended for it. A client
    CANCEL cancels the handler. Methods declared with :func:`~transport.rpc.unary_inline`
    (directly or through :func:`~transport.rpc.route`) are answered in the reader task.

    Args:
        stream: the accepted byte stream (normally a ``SecureChannel``).
        handler: called once per stream (see :func:`route` and :func:`unary`).
        max_streams: concurrent streams (and handler tasks) on this connection.
        max_message_size: largest message in either direction (bytes); match the client's.
        window_messages / window_bytes: receive window per stream: what a stream's queue (the
            handler's read-ahead) may hold before the client must wait.
        max_buffered_bytes: bound on the client's messages received and not yet consumed by
            handlers, for the whole connection (transport/RPC.md §4); streams that would not
            fit are refused with ``resource_exhausted``. None: only the per-stream windows.
        idle_timeout: close the connection after this many seconds with nothing received or
            sent (a GOAWAY ``unavailable`` first); None never.
        stall_timeout: close it when a write stays unread, or a frame unfinished, this long;
            None never.
        task_status: ``started(connection)`` once serving (for ``nursery.start``), with an
            :class:`RpcServerConnection` whose ``statistics()`` describes this connection.

    Returns:
        When the client closed the connection, or it was closed for being idle or stalled
        (logged as ``rpc_connection_closed``); running handlers are cancelled.

    Raises:
        RemoteProtocolError: the client violated the protocol (logged; handlers cancelled).

    Resource handling:
        ``stream`` is closed before this returns or raises, within :data:`CLOSE_TIMEOUT_S`.
        On cancellation (server shutdown) a GOAWAY is attempted first.
    """
    for name, value in (("idle_timeout", idle_timeout), ("stall_timeout", stall_timeout)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive seconds or None")
    core = RpcConnection(
        Role.SERVER,
        max_message_size=max_message_size,
        window_messages=window_messages,
        window_bytes=window_bytes,
        max_streams=max_streams,
        max_buffered_bytes=max_buffered_bytes,
        merge_first_message=True,
    )
    conn: _ServerConnection | None = None
    try:
        async with trio.open_nursery() as handler_nursery:
            conn = _ServerConnection(stream, core, handler, handler_nursery)
            if idle_timeout is not None or stall_timeout is not None:
                handler_nursery.start_soon(conn.watchdog, idle_timeout, stall_timeout)
            task_status.started(RpcServerConnection(conn))
            try:
                await conn.read_loop()
            finally:
                conn.pool.close()
                handler_nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        unwrap_group(eg)
    finally:
        if conn is not None and conn.failure is None and not core.broken:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
                await conn.send_quietly(core.send_goaway("unavailable", "server shutting down"))
        if conn is not None:
            conn.fail(ChannelClosed, "the RPC server closed the connection", None)
            await conn.close_transport()
        else:
            await trio.aclose_forcefully(stream)
    assert conn is not None
    if conn.failure is not None and issubclass(conn.failure[0], RemoteProtocolError):
        raise conn.error()
