"""What the RPC client and server adapters share: the outbox, failure, and event dispatch.

Theory of operation
-------------------

**Outbox (sending).** Sends are done by the calling task: encode (pure), wait for credit if
needed, commit to the core (pure), then :meth:`Connection.send`, which appends to a shared
outbox and, under a :class:`trio.StrictFIFOLock`, writes *everything* queued with one
``send_all``: frames queued by other tasks while a write was in progress go out together
(coalescing). Cancellation is checked before a batch leaves the outbox, so it can only
interrupt a write that blocked part-way (the peer is slow to read). On a socket (a
``SecureChannel`` on one, or a ``trio.SocketStream``, written through
:class:`~transport._sockwrite.SocketWriter`) the transport keeps the rest of such a write:
the connection notes it owes a write, a background flush (or the next writer, which sends the
rest first) completes it, and every other stream carries on. On any other transport half a
frame would be left on the wire, so the connection fails. Writes over
:data:`UNSHIELDED_WRITE_SIZE` are shielded anyway (with a deadline); a server never cancels a
handler in the middle of its own write (the cancel waits, see ``_server.py``); small writes
stay unshielded on the hot path (a shield costs ~15 µs per round trip here). Cleanup writes
(CANCEL, ERROR) are shielded with a deadline (:data:`CLOSE_TIMEOUT_S`).

**Dispatch (receiving).** Whoever reads (the server's reader task, or a client caller through
leader/follower, ``_client.py``) feeds the core and takes its events one at a time
(``next_event`` until ``NEED_DATA``); :meth:`Connection.dispatch` hands each to the
:class:`~transport.rpc._stream.StreamEndpoint` of its stream. Endpoints queue or act; nothing
here reaches into them.

**Failure.** A dead connection raises :class:`~transport.errors.ChannelClosed` (closed, peer
gone), :class:`~transport.errors.RemoteProtocolError` (the peer broke the protocol) or
:class:`~transport.errors.PeerTimeout` (the peer stalled) from every pending and later
operation, each time a fresh instance chained to the cause.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, NoReturn, cast

import structlog
import trio

from transport._sockwrite import SocketWriter, stdlib_socket
from transport.errors import ChannelClosed, PeerTimeout, RemoteProtocolError, TransportError
from transport.rpc._core import RpcConnection
from transport.rpc._errors import RpcError
from transport.rpc._events import (
    Event,
    GoAwayReceived,
    MessageReceived,
    PongReceived,
    RequestReceived,
    StreamCancelled,
    StreamEnded,
    StreamErrored,
    StreamOpened,
    WindowUpdated,
)
from transport.rpc._stream import ACTIVE_STATES, StreamEndpoint
from transport.sansio import NEED_DATA
from transport.sync import Parker

__all__ = [
    "Connection",
    "RpcStatistics",
    "RECEIVE_SIZE",
    "CLOSE_TIMEOUT_S",
    "UNSHIELDED_WRITE_SIZE",
    "LARGE_WRITE_TIMEOUT_S",
    "TRANSPORT_ERRORS",
    "unwrap_group",
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
#: Errors of the byte stream under the RPC connection that mean "it is gone".
TRANSPORT_ERRORS: Final = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    TransportError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class RpcStatistics:
    """State of one RPC connection (see :meth:`RpcClient.statistics`), like trio's statistics().

    Attributes:
        open_streams: streams not yet closed in both directions.
        streams_opened: streams opened (client) or accepted (server) so far.
        messages_sent / messages_received: DATA frames so far.
        bytes_sent / bytes_received: wire bytes so far, headers included.
        frames_sent / frames_received: frames of every type so far.
        queued_messages / queued_bytes: received on open streams, not yet taken by the
            application.
        send_credit_messages / send_credit_bytes: our send credit summed over open streams.
        blocked_senders: tasks waiting for send credit right now.
        running_handlers: server handler tasks running right now (0 on a client).
        closed: True once the connection failed or was closed.
        buffered_bytes: every received message byte not yet consumed, closed streams included
            (bounded by ``max_buffered_bytes``).
        inline_answers: unary requests a server answered in its reader task
            (:func:`~transport.rpc.unary_inline`), 0 on a client.
        deferred_answers: unary requests its inline function deferred to a handler task
            (:data:`~transport.rpc.DEFER`), 0 on a client.
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
    buffered_bytes: int = 0
    inline_answers: int = 0
    deferred_answers: int = 0


class Connection:
    """The adapter state shared by the client and the server (private).

    Subclasses provide :meth:`wait_until` (how a task waits for input) and may override the
    hooks :meth:`on_open`, :meth:`on_reset`, :meth:`after_write` and :meth:`on_fail`.
    """

    def __init__(self, transport: trio.abc.Stream, core: RpcConnection) -> None:
        self.transport = transport
        self.write, self.send_eagerly, self.resume_write = _writers(transport)
        #: A write of ours was cancelled part-way and its rest waits in the transport
        #: (self.resume_write completes it; any later write sends it first).
        self.write_owed = False
        self.core = core
        self.streams: dict[int, StreamEndpoint] = {}
        self.outbox: list[bytes] = []
        self.write_waiters: list[Parker] = []  # tasks waiting while another one writes
        self.failure: tuple[type[TransportError], str, BaseException | None] | None = None
        self.blocked_senders = 0
        self.running_handlers = 0
        self.inline_answers = 0  # server only (see RpcStatistics)
        self.deferred_answers = 0
        self.pings: dict[bytes, Parker] = {}
        self.nursery: trio.Nursery | None = None  # where background flushes run
        self.background_flush = False
        self.flusher: trio.lowlevel.Task | None = None  # the background flush task, if any
        self.reader_writes = True  # False: frames the reader owes go to a background flush
        self.writer: trio.lowlevel.Task | None = None  # the task inside send_all, if any
        self.write_started: float | None = None  # when the write in progress began
        #: trio's clock (the run's ``current_time``, one call instead of three)
        self.clock = trio.lowlevel.current_clock().current_time
        self.last_received = self.clock()  # when bytes last arrived
        self.last_sent = self.last_received  # when a write last completed

    # ------------------------------------------------------------ failure

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
        endpoints = list(self.streams.values())
        self.streams.clear()
        for endpoint in endpoints:
            endpoint.connection_failed()
        for parker in self.pings.values():
            parker.unpark()
        for parker in self.write_waiters:
            parker.unpark()
        self.on_fail()

    def on_fail(self) -> None:
        """Hook: the connection just failed (wake whatever only the subclass knows about)."""

    # ------------------------------------------------------------ waiting

    async def wait_until(self, ready: Callable[[], bool], parker: Parker) -> None:
        """Return once ``ready()`` is true or the connection failed; wake-ups come through
        ``parker``. (How input gets read meanwhile is the subclass's business.)"""
        raise NotImplementedError

    def count_blocked_sender(self, delta: int) -> None:
        self.blocked_senders += delta

    def arm(self, deadline: float) -> None:
        """A timed wait begins (only clients time their waits; see ``_client.py``)."""

    def waited(self, timed_out: bool) -> None:
        """A timed wait ended."""

    def discard(self, stream_id: int, endpoint: StreamEndpoint) -> None:
        """Forget a stream that was reset locally (if ``endpoint`` still stands for it)."""
        if self.streams.get(stream_id) is endpoint:
            del self.streams[stream_id]

    def forget_if_done(self, stream_id: int) -> None:
        """Forget a stream once it finished in both directions."""
        if self.core.stream_state(stream_id) not in ACTIVE_STATES:
            self.streams.pop(stream_id, None)

    # ------------------------------------------------------------ sending

    async def send(self, data: bytes, *, then_wait: bool = False) -> None:
        """Queue ``data`` and write everything queued.

        ``then_wait``: the caller blocks right after (a unary call waits for its answer), so a
        write the transport takes at once needs no scheduler pass of its own.

        Raises the connection's error if it is dead before the data could be written.
        """
        if self.failure is not None:
            raise self.error()
        self.outbox.append(data)
        if self.writer is None:
            await self._write_outbox(then_wait)
        else:
            await self._wait_written()

    async def send_quietly(self, data: bytes) -> None:
        """Queue ``data`` and flush, shielded and bounded in time; never raises for a dead
        connection. For cleanup paths (CANCEL, ERROR, END after a handler, grants) that must
        go out even when the caller is being cancelled."""
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

    def queue(self, data: bytes) -> None:
        """Queue ``data`` to be written soon by a background flush; never blocks."""
        if self.failure is not None:
            return
        self.outbox.append(data)
        self.schedule_flush()

    async def flush(self) -> None:
        """Write the outbox (and the core's pending frames), or wait while the task already
        writing does; raises the connection's error if it died first."""
        if self.writer is None:
            await self._write_outbox()
        else:
            await self._wait_written()

    async def _wait_written(self) -> None:
        """Another task is writing: it writes everything queued, ours included, before it
        stops. Wait for that; take over if it stopped with frames still queued (it was
        cancelled before taking them)."""
        parker = Parker()
        self.write_waiters.append(parker)
        try:
            await parker.park()
        finally:
            if parker in self.write_waiters:
                self.write_waiters.remove(parker)
        if self.writer is None and (self.outbox or self.write_owed) and self.failure is None:
            await self._write_outbox()
        elif self.failure is not None:
            raise self.error()

    async def _write_outbox(self, then_wait: bool = False) -> None:
        """Become the writer: write *everything* queued with as few ``send_all`` as possible,
        looping until the outbox is empty, so frames queued by other tasks meanwhile go out
        in the same or the next batch. Cancellation is checked before a batch is taken from
        the outbox, so it can only interrupt a small write that blocked part-way (large ones
        are shielded); that leaves a partial frame on the wire, so the connection is failed
        (like trio's SSLStream after a cancelled ``send_all``)."""
        self.writer = trio.lowlevel.current_task()
        outbox = self.outbox
        core = self.core
        now = self.clock
        try:
            while self.failure is None:
                owed = self.write_owed
                if not owed:
                    if core.has_data_to_send():
                        outbox.append(core.data_to_send())
                    if not outbox:
                        break
                await trio.lowlevel.checkpoint_if_cancelled()  # raises with nothing taken
                if owed:
                    # The rest of a cancelled write goes out alone, before anything new is
                    # taken: a caller retrying against a peer that does not read cannot pile
                    # batches up behind it. Its clock keeps running from the first attempt
                    # (the watchdogs' "the peer did not read our data" rule).
                    batch = b""
                    if self.write_started is None:
                        self.write_started = now()
                else:
                    batch = outbox[0] if len(outbox) == 1 else b"".join(outbox)
                    outbox.clear()
                    self.write_started = now()
                self.write_owed = False
                try:
                    if not batch:
                        await self.resume_write()
                    elif len(batch) <= UNSHIELDED_WRITE_SIZE:
                        if then_wait:
                            await self.send_eagerly(batch)
                        else:
                            await self.write(batch)
                    else:
                        await self._send_all_shielded(batch)
                except TRANSPORT_ERRORS as exc:
                    self.fail(ChannelClosed, f"RPC connection lost while sending: {exc}", exc)
                    raise self.error()  # noqa: B904 (error() chains the cause itself)
                except trio.Cancelled:
                    if self.resume_write is _cannot_resume:
                        # Part of a frame may be on the wire and the rest is lost.
                        self.fail(
                            ChannelClosed, "RPC connection failed: a write was cancelled", None
                        )
                    else:
                        # The transport kept the rest of the batch: a background flush (or
                        # the next writer) completes it, and the connection lives on.
                        self.write_owed = True
                    raise
                finally:
                    if not self.write_owed:  # (a kept rest keeps its start time)
                        self.last_sent = self.write_started  # (when it began: close enough)
                        self.write_started = None
        finally:
            self.writer = None
            self.after_write()
            if self.write_waiters:
                for parker in self.write_waiters:
                    parker.unpark()
            elif (
                (outbox or self.write_owed)
                and self.failure is None
                and trio.lowlevel.current_task() is not self.flusher
            ):
                # We stopped (cancelled) with frames queued: a background flush writes them.
                # Not when we *are* that flush: only the connection's end cancels it, and a new
                # one would be cancelled at once and spawn the next, without end (a livelock
                # that grew memory by gigabytes; tests/models/test_service.py).
                self.schedule_flush()
        if outbox and self.failure is not None:
            # The connection died before these frames could be written (ours among them).
            outbox.clear()
            raise self.error()

    def after_write(self) -> None:
        """Hook: a ``send_all`` just finished (or failed)."""

    async def _send_all_shielded(self, batch: bytes) -> None:
        """A large write, shielded from the caller's cancellation (see flush) with a deadline."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + LARGE_WRITE_TIMEOUT_S
            await self.write(batch)
        if scope.cancelled_caught:
            self.fail(
                PeerTimeout,
                f"RPC connection failed: the peer did not read a write for "
                f"{LARGE_WRITE_TIMEOUT_S} s",
                None,
            )
            raise self.error()

    def schedule_flush(self) -> None:
        """Get queued frames written without blocking the calling task."""
        if self.background_flush or self.failure is not None or self.nursery is None:
            return
        self.background_flush = True
        self.nursery.start_soon(self._background_flush)

    async def _background_flush(self) -> None:
        self.background_flush = False
        self.flusher = trio.lowlevel.current_task()
        try:
            await self.flush()
        except TransportError:
            pass  # the connection failed; every stream learns it from fail()
        finally:
            self.flusher = None

    # ------------------------------------------------------------ receiving

    async def read_once(self) -> None:
        """One ``receive_some`` from the transport, then :meth:`process`; records failures.

        ``receive_some`` is cancellation-atomic on every stream this runs on (trio's
        SocketStream; the SecureChannel keeps a partly received record in its buffer), so a
        reader cancelled here loses nothing: the next reader carries on.
        """
        try:
            data = await self.transport.receive_some(RECEIVE_SIZE)
        except (RemoteProtocolError, PeerTimeout) as exc:
            # e.g. the secure channel's AuthenticationFailed, or its stalled-record timeout
            self.fail(type(exc), f"RPC transport failed: {exc}", exc)
            return
        except TRANSPORT_ERRORS as exc:
            self.fail(ChannelClosed, f"RPC connection lost: {exc}", exc)
            return
        if (
            self.process(data)
            and not self.reader_writes
            and (self.outbox or self.core.has_data_to_send())
        ):
            self.schedule_flush()  # the reader never writes: grants and PONGs go behind it

    def process(self, data: bytes | bytearray) -> bool:
        """Feed ``data`` to the core and dispatch every event; False once the connection is
        over (EOF or protocol violation, recorded by :meth:`fail`)."""
        core = self.core
        self.last_received = self.clock()
        try:
            core.receive_data(data)
            while (event := core.next_event()) is not NEED_DATA:
                # (not typing.cast: a Python call per event on the per-message path)
                self.dispatch(event)  # type: ignore[arg-type]
        except RemoteProtocolError as exc:
            log.warning("rpc_protocol_error", reason=str(exc), role=core.role.value)
            self.fail(RemoteProtocolError, f"RPC protocol violation by the peer: {exc}", exc)
            return False
        if not data:
            self.fail(ChannelClosed, self.eof_message(), None)
            return False
        return True

    def eof_message(self) -> str:
        n = len(self.streams)
        if n:
            return f"RPC connection closed by the peer with {n} stream(s) open"
        return "RPC connection closed by the peer"

    def dispatch(self, ev: Event) -> None:
        """Act on one event from the core: hand it to the endpoint of its stream."""
        kind = type(ev)
        # Narrowed by annotation, not typing.cast (a Python call per event on the hot path).
        if kind is MessageReceived:
            msg: MessageReceived = ev  # type: ignore[assignment]
            endpoint = self.streams.get(msg.stream_id)
            if endpoint is None:  # a stream we reset or forgot: drop, but account for it
                grant = self.core.message_consumed(msg.stream_id, msg.size)
                if grant:
                    self.outbox.append(grant)
            else:
                endpoint.deliver(msg.message, msg.size, msg.end)
            if msg.end:
                self.forget_if_done(msg.stream_id)
        elif kind is RequestReceived:
            self.on_request(ev)  # type: ignore[arg-type]
        elif kind is StreamOpened:
            self.on_open(ev)  # type: ignore[arg-type]
        elif kind is WindowUpdated:
            ev = cast("WindowUpdated", ev)
            endpoint = self.streams.get(ev.stream_id)
            if endpoint is not None:
                endpoint.credit_arrived()
        elif kind is StreamEnded:
            ev = cast("StreamEnded", ev)
            endpoint = self.streams.get(ev.stream_id)
            if endpoint is not None:
                endpoint.deliver_end()
            self.forget_if_done(ev.stream_id)
        elif kind is StreamCancelled or kind is StreamErrored:
            ev = cast("StreamCancelled | StreamErrored", ev)
            endpoint = self.streams.pop(ev.stream_id, None)
            if endpoint is not None:
                if isinstance(ev, StreamErrored):
                    endpoint.deliver_reset(RpcError(ev.code, ev.message))
                else:
                    endpoint.deliver_reset(
                        RpcError("cancelled", "the stream was cancelled by the peer")
                    )
            self.on_reset(ev.stream_id)
        elif kind is PongReceived:
            ev = cast("PongReceived", ev)
            parker = self.pings.pop(ev.payload, None)
            if parker is not None:
                parker.unpark()
        elif kind is GoAwayReceived:
            ev = cast("GoAwayReceived", ev)
            log.debug("rpc_goaway_received", code=ev.code, last_stream_id=ev.last_stream_id)
        # ConnectionEnded: process() fails the connection on EOF.

    def on_open(self, ev: StreamOpened) -> None:
        """Hook (server): the client opened a stream."""
        raise AssertionError("a client never receives OPEN")  # the core rejects it first

    def on_request(self, ev: RequestReceived) -> None:
        """Hook (server): the client opened a stream and its first message came with it."""
        raise AssertionError("a client never receives OPEN")

    def on_reset(self, stream_id: int) -> None:
        """Hook: the peer reset a stream (after its endpoint was told)."""

    # ------------------------------------------------------------ closing, statistics

    async def close_transport(self) -> None:
        """Close the byte stream, bounded in time even when the caller is cancelled."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
            try:
                await self.transport.aclose()
            except TRANSPORT_ERRORS:
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
            buffered_bytes=c.buffered_bytes,
            inline_answers=self.inline_answers,
            deferred_answers=self.deferred_answers,
        )


def unwrap_group(eg: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise a lone exception out of the group our private nursery wrapped it in."""
    if len(eg.exceptions) == 1 and not isinstance(eg.exceptions[0], BaseExceptionGroup):
        exc = eg.exceptions[0]
        raise exc from exc.__cause__
    raise eg


_Write = Callable[[bytes], Awaitable[None]]


async def _cannot_resume() -> None:
    raise AssertionError("this transport keeps nothing from a cancelled write")


def _writers(transport: trio.abc.Stream) -> tuple[_Write, _Write, Callable[[], Awaitable[None]]]:
    """How the connection writes to ``transport``: (write, write eagerly, resume).

    * a :class:`~transport.channel.SecureChannel` on a socket: its ``send_all``,
      ``send_all_eagerly`` (no scheduler pass after a write taken at once; only for a writer
      that blocks right after) and ``flush`` (a cancelled write keeps its sealed rest);
    * a ``trio.SocketStream``: a :class:`~transport._sockwrite.SocketWriter` on its socket,
      for the same two properties;
    * anything else: its ``send_all``; a cancelled write there fails the connection.
    """
    eager = getattr(transport, "send_all_eagerly", None)
    flush = getattr(transport, "flush", None)
    if eager is not None and flush is not None and getattr(transport, "resumes_sends", False):
        return transport.send_all, eager, flush
    raw = stdlib_socket(transport)
    if raw is not None:
        writer = SocketWriter(raw)

        async def write(data: bytes) -> None:
            await writer.send_all(data)

        async def write_eagerly(data: bytes) -> None:
            await writer.send_all(data, fair=False)

        return write, write_eagerly, writer.flush
    return transport.send_all, eager or transport.send_all, _cannot_resume
