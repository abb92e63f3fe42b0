"""trio adapter for the sans-IO RPC core: :func:`open_rpc_client` and :func:`serve_rpc`.

Theory of operation
-------------------

Reading, server: the task running :func:`serve_rpc` reads the byte stream. It feeds the core
and takes events one at a time (:meth:`RpcConnection.next_event`), dispatching each straight
into the target :class:`RpcStream`: the message goes on the stream's deque and the one task
parked on it (if any) is rescheduled directly, without a memory channel. Methods declared with
:func:`unary_inline` are answered right there, in the reader, with no handler task at all;
frames the reader owes go out in one ``send_all`` per batch read. Other handlers run in
*reused* handler tasks (:meth:`_ServerConnection.worker`): a finished handler's task parks and
the next OPEN hands it the new stream with one reschedule, under the same cancel scope, instead
of spawning a task and entering a scope per call (~10 + ~12 µs here).

Reading, client: leader/follower, as in transport/fabric/enclave.py. A task waiting for input
on its stream (:meth:`RpcStream._lead`) that finds nobody reading becomes the reader: it reads,
dispatches every frame to its owner, and when its own input arrived hands the role to another
task parked for input, else back to the background reader. A unary reply therefore wakes the
caller itself instead of a reader task that then wakes the caller (a task hop). The background
reader (in the nursery of :func:`open_rpc_client`) reads only while no caller does: idle
connections still see PONGs, grants for blocked senders, GOAWAY and EOF. A caller that wants
the role while the background reader is in ``receive_some`` cancels that receive, which loses
nothing: trio's ``SocketStream.receive_some`` is cancellation-atomic and the SecureChannel keeps
a partly received record in its sans-IO buffer; the same holds when a caller holding the role
is cancelled (a user timeout) in the middle of a frame: the core keeps the partial frame and
the next reader continues it. Whoever reads never writes (grants and PONGs go to a background
flush) and never blocks on anything but the receive, so two sides blocked writing to each other
cannot deadlock. Queues need no bound of their own: the peer cannot send more than the stream's
credit (messages *and* bytes), so a slow consumer back-pressures only its own stream's sender.

Sends are done by the calling task: encode (pure), wait for credit if needed (cancellable),
commit to the core (pure), then flush. A flush appends to a shared outbox and, under a
:class:`trio.StrictFIFOLock`, writes *everything* queued with one ``send_all``: frames queued
by other tasks while a write was in progress go out together (coalescing). Cancellation is
checked before a batch leaves the outbox, so it can only interrupt a write that blocked
part-way, which would leave half a frame on the wire and fail the connection. Hence: writes
over :data:`UNSHIELDED_WRITE_SIZE` are shielded (with a deadline); a peer's CANCEL never
cancels a handler in the middle of its own write (the cancel waits for the write); small writes
stay unshielded on the hot path (a shield costs ~15 µs per round trip here) and only block when
the peer stopped reading. Cleanup writes (CANCEL, ERROR) are shielded with a deadline
(:data:`CLOSE_TIMEOUT_S`). Credit waits are cancellable and send nothing.

A unary :meth:`RpcClient.call` costs one ``send_all`` (OPEN + DATA|END coalesced) and one
``receive_some`` by the calling task itself.

Errors: a per-stream failure is an :class:`~transport.rpc.RpcError`; a dead connection raises
:class:`~transport.errors.ChannelClosed` (closed, peer gone) or
:class:`~transport.errors.RemoteProtocolError` (the peer broke the protocol) from every pending
and later operation, each time a fresh instance chained to the cause.
"""

from __future__ import annotations

import contextvars
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import outcome
import structlog
import trio

from transport.errors import (
    ChannelClosed,
    RemoteProtocolError,
    TransportError,
)
from transport.rpc._core import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_STREAMS,
    INITIAL_WINDOW_BYTES,
    INITIAL_WINDOW_MESSAGES,
    PING_PAYLOAD_SIZE,
    Role,
    RpcConnection,
    StreamCredit,
    StreamState,
)
from transport.rpc._errors import RpcError
from transport.rpc._events import (
    ConnectionEnded,
    Event,
    GoAwayReceived,
    MessageReceived,
    PongReceived,
    StreamCancelled,
    StreamEnded,
    StreamErrored,
    StreamOpened,
    WindowUpdated,
)

__all__ = [
    "EndOfStream",
    "RpcStream",
    "RpcClient",
    "RpcServerConnection",
    "RpcStatistics",
    "Handler",
    "open_rpc_client",
    "serve_rpc",
    "unary",
    "unary_inline",
    "route",
    "Router",
    "InlineUnary",
    "InlineFunction",
    "RECEIVE_SIZE",
    "CLOSE_TIMEOUT_S",
    "UNSHIELDED_WRITE_SIZE",
    "LARGE_WRITE_TIMEOUT_S",
    "DEFAULT_CLIENT_MAX_STREAMS",
    "BACKGROUND_IDLE_S",
    "BACKGROUND_IDLE_MAX_S",
]

log = structlog.get_logger()

#: Bytes asked of ``receive_some`` per read: 64 KiB stays under the allocation cliff of
#: ``recv(n)`` at 128 KiB (reference/perf-baseline.md §2.3).
RECEIVE_SIZE: Final = 64 << 10
#: Bound on cleanup writes (CANCEL, ERROR, GOAWAY) and on closing the transport, which are
#: shielded from cancellation: a peer that stopped reading cannot make cleanup hang.
CLOSE_TIMEOUT_S: Final = 2.0
#: Writes up to this size (bytes) are not shielded from cancellation: a shield costs ~15 µs per
#: round trip here, and a small write only blocks when the peer has stopped reading for a while.
#: Larger writes are shielded (with LARGE_WRITE_TIMEOUT_S), so a timeout or a CANCEL hitting a
#: task in the middle of writing a big message cannot cut a frame and fail the connection.
UNSHIELDED_WRITE_SIZE: Final = 16 << 10
#: A shielded write that makes no progress for this long fails the connection (the peer stopped
#: reading); generous, because a slow but live reader is legitimate backpressure.
LARGE_WRITE_TIMEOUT_S: Final = 30.0
#: A client's own cap on concurrently open streams (bounds its memory; servers refuse sooner).
DEFAULT_CLIENT_MAX_STREAMS: Final = 1024
#: Client: after callers stop reading, the background reader takes over within one to two of
#: these periods (seconds). Waking it after every call instead costs a task switch and a
#: scheduler pass per call (~5 µs here); the timer costs one wake-up per period. What a late
#: background read delays is only unsolicited input (the server's GOAWAY/EOF, replies nobody
#: waits for yet); waiting callers, blocked senders and pings get a reader at once.
BACKGROUND_IDLE_S: Final = 0.002
#: While one caller keeps the read role (a long call), the period doubles up to this (seconds),
#: so a pending call does not cost 500 wake-ups a second; the role's release wakes it at once.
BACKGROUND_IDLE_MAX_S: Final = 0.128

_ACTIVE: Final = frozenset(
    {StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE}
)
#: read_holder value while the client's background reader holds the read role.
_BACKGROUND: Final = object()
_TRANSPORT_ERRORS: Final = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    TransportError,
    OSError,
)


class EndOfStream(trio.EndOfChannel):
    """The peer ended the stream (END): no more messages will arrive on it.

    A subclass of :class:`trio.EndOfChannel`, so ``async for msg in stream`` stops on it.
    """


Handler = Callable[["RpcStream"], Awaitable[None]]
"""A server handler: called once per stream, in its own task, with the stream."""


@dataclass(frozen=True, slots=True)
class RpcStatistics:
    """State of one RPC connection (see :meth:`RpcClient.statistics`), like trio's statistics().

    Attributes:
        open_streams: streams not yet closed in both directions.
        streams_opened: streams opened (client) or accepted (server) so far.
        messages_sent / messages_received: DATA frames so far.
        bytes_sent / bytes_received: wire bytes so far, headers included.
        frames_sent / frames_received: frames of every type so far.
        queued_messages / queued_bytes: received, not yet taken by the application.
        send_credit_messages / send_credit_bytes: our send credit summed over open streams.
        blocked_senders: tasks waiting for send credit right now.
        running_handlers: server handler tasks running right now (0 on a client).
        closed: True once the connection failed or was closed.
    """

    open_streams: int
    streams_opened: int
    messages_sent: int
    messages_received: int
    bytes_sent: int
    bytes_received: int
    frames_sent: int
    frames_received: int
    queued_messages: int
    queued_bytes: int
    send_credit_messages: int
    send_credit_bytes: int
    blocked_senders: int
    running_handlers: int
    closed: bool


class _Connection:
    """The adapter state shared by the client and the server (private)."""

    def __init__(self, transport: trio.abc.Stream, core: RpcConnection) -> None:
        self.transport = transport
        self.core = core
        self.streams: dict[int, RpcStream] = {}
        self.outbox: list[bytes] = []
        self.send_lock = trio.StrictFIFOLock()
        self.failure: tuple[type[TransportError], str, BaseException | None] | None = None
        self.reader_scope = trio.CancelScope()
        self.blocked_senders = 0
        self.running_handlers = 0
        self.pings: dict[bytes, trio.Event] = {}
        self.nursery: trio.Nursery | None = None  # where background flushes run
        self.background_flush = False
        self.reader_writes = False  # True on the server (see read_loop)
        self.leader_reads = False  # True on the client (see RpcStream._lead)
        self.writer: trio.lowlevel.Task | None = None  # the task inside send_all, if any
        self.deferred_cancels: list[trio.CancelScope] = []  # see cancel_handler
        # Client "leader/follower" reading (see RpcStream._lead): who holds the read role
        # (a stream whose receiving task reads, _BACKGROUND, or None), the streams whose tasks
        # are parked waiting for input, and the background reader's state.
        self.read_holder: object | None = None
        self.role_waiters: dict[RpcStream, None] = {}
        self.bg_scope: trio.CancelScope | None = None  # around the background reader's receive
        self.bg_parked: trio.lowlevel.Task | None = None  # the background reader, when parked
        self.leads = 0  # bumped whenever a caller reads or is about to (see background_reader)
        self.bg_urgent = False  # someone needs the background reader to read now
        self.bg_period = BACKGROUND_IDLE_S  # its current idle timer (see background_reader)

    # -------------------------------------------------------------- failure

    def error(self) -> TransportError:
        """A fresh exception describing why the connection is unusable."""
        assert self.failure is not None
        cls, message, cause = self.failure
        exc = cls(message)
        exc.__cause__ = cause
        return exc

    def fail(self, cls: type[TransportError], message: str, cause: BaseException | None) -> None:
        """Declare the connection dead: every stream and waiter fails promptly."""
        if self.failure is not None:
            return
        self.failure = (cls, message, cause)
        for st in list(self.streams.values()):
            st._wake_all()
            if st._scope is not None:
                st._scope.cancel()
        self.streams.clear()
        for ev in self.pings.values():
            ev.set()
        self.reader_scope.cancel()

    # -------------------------------------------------------------- sending

    async def send(self, data: bytes) -> None:
        """Queue ``data`` and write everything queued.

        Raises the connection's error if it is dead before the data could be written.
        """
        if self.failure is not None:
            raise self.error()
        self.outbox.append(data)
        await self.flush()

    async def send_quietly(self, data: bytes) -> None:
        """Queue ``data`` and flush, shielded and bounded in time; never raises for a dead
        connection. For cleanup paths (CANCEL, ERROR, END after a handler) that must go out
        even when the caller is being cancelled."""
        if self.failure is not None:
            return
        self.outbox.append(data)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
            try:
                await self.flush()
            except TransportError:
                pass
        if scope.cancelled_caught:
            self.fail(ChannelClosed, "RPC connection failed: a write did not complete", None)

    async def flush(self) -> None:
        """Write the outbox (and the core's pending frames) with as few ``send_all`` as possible.

        Whoever holds the send lock writes *everything* queued, looping until the outbox is
        empty, so frames queued by other tasks meanwhile go out in the same or the next batch,
        and a task whose lock wait is cancelled still gets its frames written. Cancellation is
        checked before a batch is taken from the outbox, so it can only interrupt a small
        write that blocked part-way (large ones are shielded); that leaves a partial frame on
        the wire, so the connection is failed (like trio's SSLStream after a cancelled
        ``send_all``).
        """
        lock = self.send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        outbox = self.outbox
        try:
            while self.failure is None:
                pending = self.core.data_to_send()
                if pending:
                    outbox.append(pending)
                if not outbox:
                    break
                await trio.lowlevel.checkpoint_if_cancelled()  # raises with nothing taken
                batch = outbox[0] if len(outbox) == 1 else b"".join(outbox)
                outbox.clear()
                self.writer = trio.lowlevel.current_task()
                try:
                    if len(batch) <= UNSHIELDED_WRITE_SIZE:
                        await self.transport.send_all(batch)
                    else:
                        await self._send_all_shielded(batch)
                except _TRANSPORT_ERRORS as exc:
                    self.fail(ChannelClosed, f"RPC connection lost while sending: {exc}", exc)
                    raise self.error()  # noqa: B904 (error() chains the cause itself)
                except trio.Cancelled:
                    self.fail(ChannelClosed, "RPC connection failed: a write was cancelled", None)
                    raise
                finally:
                    self.writer = None
                    for scope in self.deferred_cancels:
                        scope.cancel()
                    self.deferred_cancels.clear()
        finally:
            lock.release()
        if outbox and self.failure is not None:
            # The connection died before these frames could be written (ours among them).
            outbox.clear()
            raise self.error()

    async def _send_all_shielded(self, batch: bytes) -> None:
        """A large write, shielded from the caller's cancellation (see flush) with a deadline."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + LARGE_WRITE_TIMEOUT_S
            await self.transport.send_all(batch)
        if scope.cancelled_caught:
            self.fail(
                ChannelClosed,
                f"RPC connection failed: a write did not complete in {LARGE_WRITE_TIMEOUT_S} s",
                None,
            )
            raise self.error()

    def cancel_handler(self, st: RpcStream) -> None:
        """Cancel a server handler, but never in the middle of its own write (which would cut
        a frame and fail the whole connection): then the cancel waits for the write."""
        scope = st._scope
        if scope is None:
            return
        if self.writer is not None and self.writer is st._task:
            self.deferred_cancels.append(scope)
        else:
            scope.cancel()

    # -------------------------------------------------------------- reading

    async def read_once(self) -> None:
        """One ``receive_some`` from the transport, then :meth:`process`.

        ``receive_some`` is cancellation-atomic on every stream this runs on (trio's
        SocketStream; the SecureChannel keeps a partly received record in its buffer), so a
        reader cancelled here loses nothing: the next reader carries on.
        """
        try:
            data = await self.transport.receive_some(RECEIVE_SIZE)
        except RemoteProtocolError as exc:  # e.g. the secure channel's AuthenticationFailed
            self.fail(type(exc), f"RPC transport failed: {exc}", exc)
            return
        except _TRANSPORT_ERRORS as exc:
            self.fail(ChannelClosed, f"RPC connection lost: {exc}", exc)
            return
        self.process(data)

    def process(self, data: bytes | bytearray) -> bool:
        """Feed ``data`` to the core and dispatch every event; False once the connection is
        over (EOF or protocol violation, recorded by :meth:`fail`).

        The client's reader never writes: frames it owes (PONGs, grants) go to a background
        flush, so the client always drains the server and two sides each blocked writing to
        the other cannot deadlock. The server's reader writes them itself (see read_loop).
        """
        core = self.core
        try:
            if self.reader_writes:
                # Server: one event at a time, so that acting on one (an inline answer frees
                # its stream) happens before the next OPEN counts against max_streams.
                core.feed(data)
                while (event := core.next_event()) is not None:
                    self.dispatch(event)
            else:
                for event in core.receive_data(data):
                    self.dispatch(event)
        except RemoteProtocolError as exc:
            log.warning("rpc_protocol_error", reason=str(exc), role=core.role.value)
            self.fail(RemoteProtocolError, f"RPC protocol violation by the peer: {exc}", exc)
            return False
        if not data:
            self.fail(ChannelClosed, self.eof_message(), None)
            return False
        if not self.reader_writes and (self.outbox or core.has_data_to_send()):
            self.schedule_flush()
        return True

    async def read_loop(self) -> None:
        """Server: read and dispatch until EOF, failure or cancellation; never raises on peer
        faults. Frames the reader must send (PONGs, refusals, grants, inline answers) are
        written by the reader itself, once per batch read (coalesced)."""
        core = self.core
        transport = self.transport
        with self.reader_scope:
            while True:
                try:
                    data = await transport.receive_some(RECEIVE_SIZE)
                except RemoteProtocolError as exc:
                    self.fail(type(exc), f"RPC transport failed: {exc}", exc)
                    return
                except _TRANSPORT_ERRORS as exc:
                    self.fail(ChannelClosed, f"RPC connection lost: {exc}", exc)
                    return
                if not self.process(data):
                    return
                if self.outbox or core.has_data_to_send():
                    try:
                        await self.flush()
                    except TransportError:
                        return  # the connection failed; fail() recorded why

    # -------------------------------------------------------------- client reading

    async def background_reader(self) -> None:
        """Client: read whenever no caller does (idle connection: PONGs, the server's EOF or
        GOAWAY, grants for blocked senders, replies nobody is waiting for yet).

        A task waiting for its own input takes the read role instead (RpcStream._lead): it
        cancels this reader's receive (which loses nothing) and gets the role handed over, so
        the reply wakes the caller itself, not a reader task that then wakes the caller.
        """
        seen = self.leads
        last_holder: object | None = None
        with self.reader_scope:
            while self.failure is None:
                if (
                    self.read_holder is None
                    and not self.waiters_parked()
                    and (self.leads == seen or self.bg_urgent)
                ):
                    self.bg_urgent = False
                    self.read_holder = _BACKGROUND
                    with trio.CancelScope() as scope:
                        self.bg_scope = scope
                        try:
                            await self.read_once()
                        finally:
                            self.bg_scope = None
                            self.read_holder = None
                    continue
                if self.read_holder is None and self.waiters_parked():
                    self.pass_role()  # parked waiters and nobody reading: one of them reads
                # Callers were active since we last looked (or one is reading): they read
                # their replies themselves. Look again after an idle period, or when woken
                # because someone needs a reader now (wake_reader).
                seen = self.leads
                if self.read_holder is not None and self.read_holder is last_holder:
                    # The same caller is still reading (a long call): look less often.
                    self.bg_period = min(self.bg_period * 2, BACKGROUND_IDLE_MAX_S)
                else:
                    self.bg_period = BACKGROUND_IDLE_S
                last_holder = self.read_holder
                self.bg_parked = trio.lowlevel.current_task()

                def abort(_: Any) -> trio.lowlevel.Abort:
                    self.bg_parked = None
                    return trio.lowlevel.Abort.SUCCEEDED

                with trio.move_on_after(self.bg_period):
                    await trio.lowlevel.wait_task_rescheduled(abort)

    def waiters_parked(self) -> bool:
        return any(st._recv_task is not None for st in self.role_waiters)

    def pass_role(self) -> None:
        """The read role is free: wake a task parked for input (it reads), else the
        background reader."""
        for st in self.role_waiters:
            if st._recv_task is not None:
                st._wake_recv()
                return
        if self.blocked_senders or self.pings or self.bg_period > BACKGROUND_IDLE_S:
            # They wait for grants / PONGs, or the background reader backed off during a long
            # call and would take long to notice: read now.
            self.wake_reader()
        # Otherwise the background reader's idle timer takes over: the caller that released
        # the role is usually back with its next call before then, and reads itself.

    def wake_reader(self) -> None:
        """Client: have the background reader read now (if nobody else does) rather than
        after its idle period."""
        self.bg_urgent = True
        task = self.bg_parked
        if task is not None:
            self.bg_parked = None
            trio.lowlevel.reschedule(task)

    def schedule_flush(self) -> None:
        """Get queued frames written without blocking the calling (reader) task."""
        if self.background_flush or self.failure is not None or self.nursery is None:
            return
        self.background_flush = True
        self.nursery.start_soon(self._background_flush)

    async def _background_flush(self) -> None:
        self.background_flush = False
        try:
            await self.flush()
        except TransportError:
            pass  # the connection failed; every stream learns it from fail()

    def eof_message(self) -> str:
        n = len(self.streams)
        if n:
            return f"RPC connection closed by the peer with {n} stream(s) open"
        return "RPC connection closed by the peer"

    def dispatch(self, ev: Event) -> None:
        """Act on one event from the core: wake the stream it concerns."""
        core = self.core
        streams = self.streams
        if type(ev) is MessageReceived:
            st = streams.get(ev.stream_id)
            if st is None or st._draining:
                grant = core.message_consumed(ev.stream_id, ev.size)
                if grant:
                    self.outbox.append(grant)
            elif st._inline is not None:
                self.run_inline(st, ev.message, ev.size)
            else:
                st._queue.append((ev.message, ev.size))
                if ev.end:
                    st._ended = True
                st._wake_recv()
            if ev.end:
                self.forget_if_done(ev.stream_id)
        elif type(ev) is StreamOpened:
            self.on_open(ev)
        elif type(ev) is WindowUpdated:
            st = streams.get(ev.stream_id)
            if st is not None:
                st._wake_send()
        elif type(ev) is StreamEnded:
            st = streams.get(ev.stream_id)
            if st is not None:
                st._ended = True
                st._wake_recv()
                if st._inline is not None:  # a unary method that got no request
                    st._inline = None
                    self.outbox.append(
                        core.send_error(
                            ev.stream_id, "invalid_argument", "a unary method needs one request"
                        )
                    )
            self.forget_if_done(ev.stream_id)
        elif type(ev) is StreamCancelled or type(ev) is StreamErrored:
            st = streams.pop(ev.stream_id, None)
            if st is not None:
                if type(ev) is StreamErrored:
                    st._reset(RpcError(ev.code, ev.message), keep_queue=True)
                else:
                    st._reset(
                        RpcError("cancelled", "the stream was cancelled by the peer"),
                        keep_queue=True,
                    )
                self.cancel_handler(st)
        elif type(ev) is PongReceived:
            waiter = self.pings.pop(ev.payload, None)
            if waiter is not None:
                waiter.set()
        elif type(ev) is GoAwayReceived:
            log.debug("rpc_goaway_received", code=ev.code, last_stream_id=ev.last_stream_id)
        elif type(ev) is ConnectionEnded:
            pass

    def on_open(self, ev: StreamOpened) -> None:  # overridden by the server
        raise AssertionError("a client never receives OPEN")  # the core rejects it first

    def run_inline(self, st: RpcStream, request: Any, size: int) -> None:  # server only
        raise AssertionError("client streams are never inline")

    def forget_if_done(self, stream_id: int) -> None:
        if self.core.stream_state(stream_id) not in _ACTIVE:
            self.streams.pop(stream_id, None)

    async def close_transport(self) -> None:
        """Close the byte stream, bounded in time even when the caller is cancelled."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
            try:
                await self.transport.aclose()
            except _TRANSPORT_ERRORS:
                pass
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.transport)

    def statistics(self) -> RpcStatistics:
        c = self.core.statistics()
        credits = [self.core.stream_credit(sid) for sid in self.streams]
        return RpcStatistics(
            open_streams=c.open_streams,
            streams_opened=c.streams_opened,
            messages_sent=c.messages_sent,
            messages_received=c.messages_received,
            bytes_sent=c.bytes_sent,
            bytes_received=c.bytes_received,
            frames_sent=c.frames_sent,
            frames_received=c.frames_received,
            queued_messages=c.queued_messages,
            queued_bytes=c.queued_bytes,
            send_credit_messages=sum(x.send_messages for x in credits if x is not None),
            send_credit_bytes=sum(x.send_bytes for x in credits if x is not None),
            blocked_senders=self.blocked_senders,
            running_handlers=self.running_handlers,
            closed=self.failure is not None,
        )


class RpcStream(trio.abc.Channel[Any]):
    """One RPC stream: messages in both directions, then END, CANCEL or an error.

    Client side: from :meth:`RpcClient.open_stream`. Server side: passed to the handler, with
    :attr:`method` and :attr:`metadata` from the client's OPEN.

    ``receive()`` returns messages in order and raises :class:`EndOfStream` after the peer's
    END; ``async for msg in stream`` iterates until then. ``send()`` waits for credit when the
    peer is slow (backpressure). After a reset, both raise :class:`~transport.rpc.RpcError`
    (``code == "cancelled"`` for cancellation); after the connection died they raise
    :class:`~transport.errors.ChannelClosed` or :class:`~transport.errors.RemoteProtocolError`.
    A stream is used by one receiving task and one sending task at a time
    (:class:`trio.BusyResourceError` otherwise).
    """

    def __init__(
        self, conn: _Connection, stream_id: int, method: str, metadata: Mapping[str, Any]
    ) -> None:
        self._conn = conn
        #: the stream's id on the wire (odd, increasing)
        self.stream_id: Final = stream_id
        #: the method named in OPEN
        self.method: Final = method
        #: the OPEN frame's metadata (string keys, scalar values)
        self.metadata: Final = metadata
        self._queue: deque[tuple[Any, int]] = deque()
        self._ended = False  # the peer's END arrived (messages may still be queued)
        self._local_ended = False  # we sent END
        self._error: RpcError | None = None  # stream-level failure (reset)
        self._recv_task: trio.lowlevel.Task | None = None
        self._send_task: trio.lowlevel.Task | None = None
        self._scope: trio.CancelScope | None = None  # the server handler's scope
        self._task: trio.lowlevel.Task | None = None  # the server handler's task
        self._draining = False  # server: handler returned, the client's input is discarded
        self._inline: InlineFunction | None = None  # server: answer in the reader task
        self._reading = False  # client: our receiving task holds the read role

    def __repr__(self) -> str:
        return f"<RpcStream {self.stream_id} {self.method!r}>"

    # -------------------------------------------------------------- waking

    def _wake_recv(self) -> None:
        task = self._recv_task
        if task is not None:
            self._recv_task = None
            trio.lowlevel.reschedule(task)

    def _wake_send(self) -> None:
        task = self._send_task
        if task is not None:
            self._send_task = None
            trio.lowlevel.reschedule(task)

    def _wake_all(self) -> None:
        self._wake_recv()
        self._wake_send()

    def _reset(self, error: RpcError, *, keep_queue: bool) -> None:
        if self._error is None:
            self._error = error
        if not keep_queue:
            self._queue.clear()
        self._wake_all()

    async def _park_recv(self) -> None:
        if self._recv_task is not None:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._recv_task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._recv_task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _park_send(self) -> None:
        if self._send_task is not None:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._send_task = trio.lowlevel.current_task()
        self._conn.blocked_senders += 1
        if self._conn.leader_reads and self._conn.read_holder is None:
            self._conn.wake_reader()  # the grant we wait for must be read by someone

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._send_task = None
            self._conn.blocked_senders -= 1
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        self._conn.blocked_senders -= 1

    def _copy_error(self) -> RpcError:
        err = self._error
        assert err is not None
        return RpcError(err.code, err.message)  # a fresh instance per raise

    def _raise_if_unusable(self) -> None:
        if self._error is not None:
            raise self._copy_error()
        if self._conn.failure is not None:
            raise self._conn.error()

    @property
    def _active(self) -> bool:
        return self._conn.core.stream_state(self.stream_id) in _ACTIVE

    # -------------------------------------------------------------- receiving

    async def receive(self) -> Any:
        """The next message from the peer.

        Raises:
            EndOfStream: the peer ended the stream and every message was received.
            RpcError: the stream was cancelled or failed (by either side).
            ChannelClosed / RemoteProtocolError: the connection died.
            trio.BusyResourceError: another task is receiving on this stream.
        """
        if self._queue or self._ended or self._error or self._conn.failure:
            await trio.lowlevel.checkpoint()
        while True:
            if self._queue:
                message, size = self._queue.popleft()
                grant = self._conn.core.message_consumed(self.stream_id, size)
                if grant:
                    await self._conn.send_quietly(grant)
                return message
            if self._error is not None:
                raise self._copy_error()
            if self._ended:
                raise EndOfStream
            if self._conn.failure is not None:
                raise self._conn.error()
            if self._conn.leader_reads:
                await self._lead()
            else:
                await self._park_recv()

    def _has_input(self) -> bool:
        return bool(self._queue) or self._ended or self._error is not None

    async def _lead(self) -> None:
        """Client: wait for input by reading the connection ourselves when nobody else is
        (leader/follower): the reply then wakes this task directly, with no hop through a
        reader task. Frames for other streams are dispatched to them on the way. When our
        input arrived (or we are cancelled, or fail) the role passes to another waiting task
        or back to the background reader. Otherwise park until a reader hands us our input
        or the role."""
        conn = self._conn
        if self._reading or self._recv_task is not None:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        holder = conn.read_holder
        if holder is None:
            conn.read_holder = self
            conn.leads += 1
            self._reading = True
            try:
                while not self._has_input() and conn.failure is None:
                    await conn.read_once()
            finally:
                self._reading = False
                conn.read_holder = None
                conn.pass_role()
            return
        if holder is _BACKGROUND and conn.bg_scope is not None:
            conn.bg_scope.cancel()  # it hands the role over (to us) as it unwinds
        conn.role_waiters[self] = None
        handover = True
        try:
            await self._park_recv()
            # Woken with our input: if the role is free meanwhile, pass it on, since we
            # will not read. Woken for the role: keep it free, we take it next.
            handover = self._has_input() or conn.failure is not None
        finally:
            del conn.role_waiters[self]
            if handover and conn.read_holder is None:
                conn.pass_role()

    def receive_nowait(self) -> Any:
        """The next message if one is already queued, else raise :class:`trio.WouldBlock`.

        Raises the same errors as :meth:`receive` when the stream has finished.
        """
        if self._queue:
            message, size = self._queue.popleft()
            grant = self._conn.core.message_consumed(self.stream_id, size)
            if grant:
                self._conn.outbox.append(grant)
                self._conn.schedule_flush()  # written in the background, without blocking us
            return message
        if self._error is not None:
            raise self._copy_error()
        if self._ended:
            raise EndOfStream
        if self._conn.failure is not None:
            raise self._conn.error()
        raise trio.WouldBlock

    # -------------------------------------------------------------- sending

    async def send(self, value: Any, *, end: bool = False) -> None:
        """Send one message; ``end=True`` also half-closes (one frame, like :meth:`send_end`).

        Waits while the peer has granted no credit (backpressure); cancelling that wait sends
        nothing.

        Raises:
            TypeError: the value is not msgpack-able.
            LocalProtocolError: the encoded message exceeds ``max_message_size``.
            trio.ClosedResourceError: :meth:`send_end` was already called.
            RpcError / ChannelClosed / RemoteProtocolError: as for :meth:`receive`.
        """
        core = self._conn.core
        payload = core.pack_message(value)
        while True:
            self._raise_if_unusable()
            if self._local_ended:
                raise trio.ClosedResourceError("send() after send_end() on this stream")
            if core.has_send_credit(self.stream_id):
                break
            await self._park_send()
        data = core.send_data(self.stream_id, payload, end=end)
        if end:
            self._local_ended = True
            self._conn.forget_if_done(self.stream_id)
        await self._conn.send(data)

    async def send_end(self) -> None:
        """Half-close: tell the peer we send no more messages. Idempotent."""
        if self._local_ended:
            await trio.lowlevel.checkpoint()
            return
        self._raise_if_unusable()
        data = self._conn.core.send_end(self.stream_id)
        self._local_ended = True
        self._conn.forget_if_done(self.stream_id)
        await self._conn.send(data)

    async def cancel(self) -> None:
        """Abandon the stream in both directions and tell the peer (server: the handler is
        cancelled). Later operations raise ``RpcError("cancelled", ...)``. Does nothing if the
        stream already finished."""
        if self._error is None and self._conn.failure is None and self._active:
            data = self._conn.core.send_cancel(self.stream_id)
            self._conn.streams.pop(self.stream_id, None)
            self._reset(RpcError("cancelled", "the stream was cancelled locally"), keep_queue=False)
            await self._conn.send_quietly(data)
        else:
            self._reset(RpcError("cancelled", "the stream was cancelled locally"), keep_queue=False)
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Cancel the stream if it has not finished (see :meth:`cancel`)."""
        if self._active and self._error is None and self._conn.failure is None:
            await self.cancel()
        else:
            await trio.lowlevel.checkpoint()

    def statistics(self) -> StreamCredit:
        """Credit and queue sizes of this stream (zeros once it is closed)."""
        credit = self._conn.core.stream_credit(self.stream_id)
        if credit is not None:
            return credit
        state = self._conn.core.stream_state(self.stream_id) or StreamState.CLOSED
        return StreamCredit(state, 0, 0, 0, 0, len(self._queue), 0)


class RpcClient:
    """The client side of an RPC connection; get one from :func:`open_rpc_client`."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def _open(self, method: str, metadata: Mapping[str, Any] | None) -> tuple[RpcStream, bytes]:
        conn = self._conn
        if conn.failure is not None:
            raise conn.error()
        if conn.core.goaway_received:
            raise RpcError("unavailable", "the server is shutting down this connection")
        if conn.core.open_streams >= conn.core.max_streams:
            raise RpcError(
                "resource_exhausted",
                f"too many concurrent streams on this connection ({conn.core.max_streams})",
            )
        stream_id, data = conn.core.send_open(method, metadata)
        st = RpcStream(conn, stream_id, method, dict(metadata or {}))
        conn.streams[stream_id] = st
        return st, data

    async def call(
        self, method: str, request: Any, *, metadata: Mapping[str, Any] | None = None
    ) -> Any:
        """Unary call: send ``request``, return the single response message.

        Costs one write (OPEN and the request in one ``send_all``) and one wake-up.
        Cancellation sends CANCEL, which cancels the server's handler.

        Raises:
            RpcError: the handler failed (its code and message), the call was refused, or the
                handler did not answer with exactly one message (``"internal"``).
            ChannelClosed / RemoteProtocolError: the connection died.
            TypeError / ValueError / LocalProtocolError: bad arguments, oversized request.
        """
        conn = self._conn
        payload = conn.core.pack_message(request)
        st, data = self._open(method, metadata)
        data += conn.core.send_data(st.stream_id, payload, end=True)
        st._local_ended = True
        conn.leads += 1  # tells the background reader a caller is about to read (see _lead)
        try:
            await conn.send(data)
            if st._queue:
                # send_all checkpointed already: the reply arrived meanwhile, take it now.
                response = st.receive_nowait()
            else:
                response = await st.receive()
            if not st._ended or st._queue:
                try:
                    await st.receive()
                except EndOfStream:
                    pass
                else:
                    raise RpcError(
                        "internal", f"unary method {method!r} sent more than one message"
                    )
        except EndOfStream:
            raise RpcError("internal", f"unary method {method!r} sent no response") from None
        finally:
            if conn.failure is None and st._active:
                await st.cancel()
        return response

    @asynccontextmanager
    async def open_stream(
        self, method: str, metadata: Mapping[str, Any] | None = None
    ) -> AsyncIterator[RpcStream]:
        """Open a stream for ``method``; the stream is cancelled on exit unless it finished.

        Usage::

            async with rpc.open_stream("infer_stream", {"model": "digits"}) as st:
                await st.send(first); await st.send(second); await st.send_end()
                async for out in st:
                    ...
        """
        st, data = self._open(method, metadata)
        try:
            await self._conn.send(data)
            yield st
        finally:
            if st._active and self._conn.failure is None:
                await st.cancel()

    async def ping(self) -> float:
        """Round-trip a PING frame; return the time it took, in seconds.

        Raises ChannelClosed / RemoteProtocolError if the connection dies meanwhile.
        """
        conn = self._conn
        token = os.urandom(PING_PAYLOAD_SIZE)
        done = trio.Event()
        conn.pings[token] = done
        start = trio.current_time()
        try:
            await conn.send(conn.core.send_ping(token))
            if conn.read_holder is None:
                conn.wake_reader()
            await done.wait()
        finally:
            conn.pings.pop(token, None)
        if conn.failure is not None:
            raise conn.error()
        return trio.current_time() - start

    def statistics(self) -> RpcStatistics:
        """Counters and current state of the connection."""
        return self._conn.statistics()

    @property
    def closed(self) -> bool:
        """True once the connection failed or was closed."""
        return self._conn.failure is not None


class RpcServerConnection:
    """A view of one connection served by :func:`serve_rpc` (from ``nursery.start``)."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def statistics(self) -> RpcStatistics:
        """Counters and current state of the connection (see :class:`RpcStatistics`)."""
        return self._conn.statistics()

    @property
    def closed(self) -> bool:
        """True once the connection failed or was closed."""
        return self._conn.failure is not None


def _unwrap_group(eg: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise a lone exception out of the group our private nursery wrapped it in."""
    if len(eg.exceptions) == 1 and not isinstance(eg.exceptions[0], BaseExceptionGroup):
        exc = eg.exceptions[0]
        raise exc from exc.__cause__
    raise eg


@asynccontextmanager
async def open_rpc_client(
    stream: trio.abc.Stream,
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    window_messages: int = INITIAL_WINDOW_MESSAGES,
    window_bytes: int = INITIAL_WINDOW_BYTES,
    max_streams: int = DEFAULT_CLIENT_MAX_STREAMS,
) -> AsyncIterator[RpcClient]:
    """Run the client side of ``enclave-rpc/1`` over ``stream``.

    Usage::

        async with open_rpc_client(channel) as rpc:
            catalog = await rpc.call("list_models", {})

    Args:
        stream: any :class:`trio.abc.Stream`, normally an attested ``SecureChannel``.
        max_message_size: largest message in either direction (bytes); match the server's.
        window_messages / window_bytes: receive window per stream (≥ 16 messages / 1 MiB).
        max_streams: this client's cap on concurrent streams.

    Resource handling:
        A nursery inside owns the reader task. On exit every open stream fails with
        :class:`~transport.errors.ChannelClosed`, the reader stops and ``stream`` is closed
        (bounded by :data:`CLOSE_TIMEOUT_S`). The connection failing (peer gone, protocol
        violation) does not cancel the body; the next RPC operation raises instead.
    """
    core = RpcConnection(
        Role.CLIENT,
        max_message_size=max_message_size,
        window_messages=window_messages,
        window_bytes=window_bytes,
        max_streams=max_streams,
    )
    conn = _Connection(stream, core)
    conn.leader_reads = True

    async def reader() -> None:
        try:
            await conn.background_reader()
        finally:
            await conn.close_transport()

    try:
        async with trio.open_nursery() as nursery:
            conn.nursery = nursery
            nursery.start_soon(reader)
            try:
                yield RpcClient(conn)
            finally:
                conn.fail(ChannelClosed, "the RPC connection was closed locally", None)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        _unwrap_group(eg)


class _ServerConnection(_Connection):
    def __init__(
        self,
        transport: trio.abc.Stream,
        core: RpcConnection,
        handler: Handler,
        handler_nursery: trio.Nursery,
    ) -> None:
        super().__init__(transport, core)
        self.handler = handler
        self.handler_nursery = handler_nursery
        self.nursery = handler_nursery
        self.reader_writes = True
        self.idle_workers: list[trio.lowlevel.Task] = []  # parked handler tasks (see worker)
        lookup = getattr(handler, "inline_handler", None)
        self.inline_lookup: Callable[[str], InlineFunction | None] | None = (
            lookup if callable(lookup) else None
        )

    def on_open(self, ev: StreamOpened) -> None:
        st = RpcStream(self, ev.stream_id, ev.method, ev.metadata)
        self.streams[ev.stream_id] = st
        if self.inline_lookup is not None:
            st._inline = self.inline_lookup(ev.method)
            if st._inline is not None:
                return  # answered by run_inline() when the request arrives
        self.running_handlers += 1
        if self.idle_workers:  # a parked worker task: one reschedule, no task creation
            worker = self.idle_workers.pop()
            # Each handler starts from a fresh copy of our context, as with start_soon:
            # context variables a previous handler set on this task do not leak into it.
            worker.context = contextvars.copy_context()
            trio.lowlevel.reschedule(worker, outcome.Value(st))
        else:
            self.handler_nursery.start_soon(self.worker, st)

    def run_inline(self, st: RpcStream, request: Any, size: int) -> None:
        """Answer a unary request in the reader task: no task, no cancel scope, no hop."""
        fn = st._inline
        assert fn is not None
        st._inline = None
        core = self.core
        grant = core.message_consumed(st.stream_id, size)
        if grant:
            self.outbox.append(grant)
        try:
            data = core.send_message(st.stream_id, fn(request, st), end=True)
        except RpcError as exc:
            data = core.send_error(st.stream_id, exc.code, exc.message)
        except Exception as exc:
            log.error(
                "rpc_handler_failed",
                method=st.method,
                stream_id=st.stream_id,
                error_type=type(exc).__name__,
                exc_info=exc,
            )
            data = core.send_error(st.stream_id, "internal", "internal error")
        self.outbox.append(data)
        st._local_ended = True
        if st._active:
            st._draining = True  # the client is still sending: discard the rest
        else:
            self.streams.pop(st.stream_id, None)

    async def worker(self, st: RpcStream) -> None:
        """A handler task, reused: run handlers one after the other, parked in between.

        Spawning a task and entering a cancel scope per call cost ~10 and ~12 µs here
        (reference/perf-baseline.md §2.3: each trio primitive costs several µs on this VM), so
        a worker keeps both: the scope is shared by its successive handlers and only replaced
        after a handler's stream was cancelled through it. At most ``max_streams`` handlers
        run at once, so at most that many workers exist (running or parked).
        """
        job: RpcStream | None = st
        while job is not None:
            with trio.CancelScope() as scope:
                while job is not None:
                    await self.run_handler(job, scope)
                    if scope.cancel_called:
                        break  # this scope is spent: take the next job in a fresh one
                    job = await self.next_job()
            if job is not None:
                job = await self.next_job()

    async def next_job(self) -> RpcStream | None:
        """Park until on_open hands this worker a stream; None once the connection failed
        (and the handler nursery's cancellation ends parked workers)."""
        if self.failure is not None:
            return None
        task = trio.lowlevel.current_task()
        self.idle_workers.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.idle_workers.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        job: RpcStream = await trio.lowlevel.wait_task_rescheduled(abort)
        return job

    async def run_handler(self, st: RpcStream, scope: trio.CancelScope) -> None:
        """Run the handler for ``st`` under ``scope`` (cancelled by a CANCEL for ``st``, or
        when the connection fails); errors become ERROR frames (see serve_rpc)."""
        try:
            st._scope = scope
            st._task = trio.lowlevel.current_task()
            if self.failure is not None or st._error is not None:
                scope.cancel()
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
                    stream_id=st.stream_id,
                    error_type=type(exc).__name__,
                    exc_info=exc,
                )
                await self.finish_with_error(st, "internal", "internal error")
            else:
                if not st._local_ended and st._error is None and st._active:
                    await self.send_quietly(self.core.send_end(st.stream_id))
                    st._local_ended = True
        finally:
            self.running_handlers -= 1
            st._scope = None
            st._task = None
            self.finish(st)

    async def finish_with_error(self, st: RpcStream, code: str, message: str) -> None:
        if st._error is None and self.failure is None and st._active:
            data = self.core.send_error(st.stream_id, code, message)
            st._reset(RpcError(code, message), keep_queue=False)
            await self.send_quietly(data)

    def finish(self, st: RpcStream) -> None:
        """After the handler: forget the stream, or drain the client's remaining input."""
        if self.failure is not None:
            return
        if st._active:
            st._draining = True
            while st._queue:
                _, size = st._queue.popleft()
                grant = self.core.message_consumed(st.stream_id, size)
                if grant:
                    self.outbox.append(grant)
            if self.outbox:
                self.schedule_flush()
        else:
            self.streams.pop(st.stream_id, None)


async def serve_rpc(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    max_streams: int = DEFAULT_MAX_STREAMS,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    window_messages: int = INITIAL_WINDOW_MESSAGES,
    window_bytes: int = INITIAL_WINDOW_BYTES,
    task_status: trio.TaskStatus[RpcServerConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``enclave-rpc/1`` on ``stream`` until the client goes away.

    Each stream the client opens runs ``await handler(stream)`` in its own task, in a handler
    nursery owned by this call, at most ``max_streams`` at once (more are refused with
    ``RpcError("resource_exhausted", ...)`` on the client). A handler that raises
    ``RpcError(code, message)`` fails its stream with that code; any other exception is logged
    here and sent as ``"internal"`` with a generic message. Either way the connection stays up.
    A handler that returns without calling ``send_end()`` has its stream ended for it. A client
    CANCEL cancels the handler.

    Args:
        stream: the accepted byte stream (normally a ``SecureChannel``).
        handler: called once per stream (see :func:`route` and :func:`unary`).
        max_streams: concurrent streams (and handler tasks) on this connection.
        max_message_size: largest message in either direction (bytes); match the client's.
        window_messages / window_bytes: receive window per stream.
        task_status: ``started(connection)`` once serving (for ``nursery.start``), with an
            :class:`RpcServerConnection` whose ``statistics()`` describes this connection.

    Returns:
        When the client closed the connection (running handlers are cancelled).

    Raises:
        RemoteProtocolError: the client violated the protocol (logged; handlers cancelled).

    Resource handling:
        ``stream`` is closed before this returns or raises, within :data:`CLOSE_TIMEOUT_S`.
        On cancellation (server shutdown) a GOAWAY is attempted first.
    """
    core = RpcConnection(
        Role.SERVER,
        max_message_size=max_message_size,
        window_messages=window_messages,
        window_bytes=window_bytes,
        max_streams=max_streams,
    )
    conn: _ServerConnection | None = None
    try:
        async with trio.open_nursery() as handler_nursery:
            conn = _ServerConnection(stream, core, handler, handler_nursery)
            task_status.started(RpcServerConnection(conn))
            try:
                await conn.read_loop()
            finally:
                handler_nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        _unwrap_group(eg)
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


async def _unary_request(stream: RpcStream) -> Any:
    try:
        try:
            # The request usually arrived with the OPEN: skip a checkpoint (this task was just
            # started, so it has just been scheduled anyway).
            return stream.receive_nowait()
        except trio.WouldBlock:
            return await stream.receive()
    except EndOfStream:
        raise RpcError("invalid_argument", "a unary method needs one request") from None


def unary(fn: Callable[[Any, RpcStream], Awaitable[Any]]) -> Handler:
    """Adapt ``async def fn(request, stream) -> response`` into a stream handler.

    The handler reads one request, awaits ``fn`` and sends its result with END in one frame.
    A stream that ends without a request fails with ``invalid_argument``.
    """

    async def handler(stream: RpcStream) -> None:
        request = await _unary_request(stream)
        response = await fn(request, stream)
        await stream.send(response, end=True)

    return handler


InlineFunction = Callable[[Any, "RpcStream"], Any]
"""A synchronous unary function ``fn(request, stream) -> response`` (see :func:`unary_inline`)."""


class InlineUnary:
    """A unary method answered synchronously inside the server's reader task.

    Made by :func:`unary_inline`. Used as a handler (directly or in :func:`route`), the server
    runs ``fn(request, stream)`` as soon as the request arrives, with no task, no cancel scope
    and no hop between tasks, and writes the answer with the rest of the batch. ``stream`` is
    only for :attr:`RpcStream.method` / :attr:`RpcStream.metadata`; ``fn`` must not block.
    """

    def __init__(self, fn: InlineFunction) -> None:
        self.fn = fn

    def inline_handler(self, method: str) -> InlineFunction | None:
        """The function to run inline for ``method`` (every method, for a bare InlineUnary)."""
        return self.fn

    async def __call__(self, stream: RpcStream) -> None:
        """Run as an ordinary handler (when not dispatched inline)."""
        request = await _unary_request(stream)
        await stream.send(self.fn(request, stream), end=True)


def unary_inline(fn: InlineFunction) -> InlineUnary:
    """Declare a *synchronous* unary method, answered in the server's reader task.

    The fastest path: no handler task is spawned. Use it for work that takes well under a
    millisecond and never blocks (a catalog lookup, a small model run inline as
    reference/perf-baseline.md §3 advises); while ``fn`` runs, the connection reads nothing
    else. ``fn`` raising :class:`RpcError` fails the call with its code; other exceptions are
    logged and sent as ``internal``.
    """
    return InlineUnary(fn)


class Router:
    """A handler dispatching on :attr:`RpcStream.method` (see :func:`route`)."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers: Final = dict(handlers)

    def inline_handler(self, method: str) -> InlineFunction | None:
        """The synchronous function for ``method`` if it was declared with
        :func:`unary_inline`; unknown methods are refused inline too."""
        target = self.handlers.get(method)
        if target is None:
            return _unimplemented
        if isinstance(target, InlineUnary):
            return target.fn
        return None

    async def __call__(self, stream: RpcStream) -> None:
        target = self.handlers.get(stream.method)
        if target is None:
            _unimplemented(None, stream)
        else:
            await target(stream)


def _unimplemented(request: Any, stream: RpcStream) -> NoReturn:
    raise RpcError("unimplemented", f"unknown method {stream.method!r}")


def route(handlers: Mapping[str, Handler]) -> Router:
    """A handler dispatching on :attr:`RpcStream.method`; unknown methods fail with
    ``unimplemented``. Methods made with :func:`unary_inline` are answered inline."""
    return Router(handlers)
