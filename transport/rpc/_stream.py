"""One RPC stream as the application sees it (:class:`RpcStream`), and the interface through
which the connection feeds it (:class:`StreamEndpoint`).

The connection (``_connection.py``) owns the sans-IO core and the transport; it never touches a
stream's fields. It calls the five ``deliver_*`` / ``*_arrived`` / ``connection_failed`` methods
of :class:`StreamEndpoint` when the core reports something for the stream, and the stream calls
the connection's small :class:`StreamOwner` interface to send, wait and check for failure.
Other endpoints implement the same interface for streams that need no :class:`RpcStream`
(a unary call on the client, an inline method or a finished handler on the server).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import trio

from transport.errors import EnclaveError, PeerTimeout, TransportError
from transport.rpc._core import RpcConnection, StreamCredit, StreamState
from transport.rpc._errors import RpcError
from transport.sync import Parker

__all__ = ["EndOfStream", "RpcStream", "StreamEndpoint", "StreamOwner", "ACTIVE_STATES"]

#: Stream states in which a stream is not finished in both directions.
ACTIVE_STATES: Final = frozenset(
    {StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE}
)


class EndOfStream(trio.EndOfChannel, EnclaveError):
    """The peer ended the stream (END): no more messages will arrive on it.

    A subclass of :class:`trio.EndOfChannel`, so ``async for msg in stream`` stops on it (and
    of the project's root error, as every exception the project raises).
    """


class StreamEndpoint(Protocol):
    """What the connection calls on whatever stands for one stream (RpcStream and others)."""

    def deliver(self, message: Any, size: int, end: bool) -> None:
        """A message arrived (``end``: the peer's last one). The endpoint owns reporting it
        consumed to the core (``message_consumed``) exactly once."""

    def deliver_end(self) -> None:
        """The peer ended its direction (END frame)."""

    def deliver_reset(self, error: RpcError) -> None:
        """The peer cancelled or failed the stream; it is gone from the connection."""

    def credit_arrived(self) -> None:
        """The peer granted send credit."""

    def connection_failed(self) -> None:
        """The connection died; the owner's ``error()`` says why."""


class StreamOwner(Protocol):
    """What a stream needs of its connection (``_connection.Connection`` implements it)."""

    @property
    def core(self) -> RpcConnection:
        """The connection's sans-IO core."""

    @property
    def failure(self) -> object | None:
        """Not None once the connection failed."""

    def error(self) -> TransportError:
        """A fresh exception describing why the connection is unusable."""

    async def send(self, data: bytes) -> None:
        """Write frames (coalesced with others); raises the connection's error."""

    async def send_quietly(self, data: bytes) -> None:
        """Write cleanup frames, shielded and bounded; never raises."""

    def queue(self, data: bytes) -> None:
        """Write frames soon, without blocking the caller."""

    async def wait_until(self, ready: Callable[[], bool], parker: Parker) -> None:
        """Return once ``ready()`` (or the connection failed), waking on ``parker``."""

    def count_blocked_sender(self, delta: int) -> None:
        """A sender starts (+1) or stops (-1) waiting for credit (for statistics)."""

    def arm(self, deadline: float) -> None:
        """A wait with this deadline (trio time) begins: make sure it is enforced."""

    def waited(self, timed_out: bool) -> None:
        """A wait armed with :meth:`arm` ended (``timed_out``: the deadline expired it)."""

    def forget_if_done(self, stream_id: int) -> None:
        """Drop the stream from the connection's table once it finished both ways."""

    def discard(self, stream_id: int, endpoint: StreamEndpoint) -> None:
        """Drop the stream from the table (it was reset locally)."""


class RpcStream(trio.abc.Channel[Any]):
    """One RPC stream: messages in both directions, then END, CANCEL or an error.

    Client side: from :meth:`RpcClient.open_stream`. Server side: passed to the handler, with
    :attr:`method` and :attr:`metadata` from the client's OPEN.

    ``receive()`` returns messages in order and raises :class:`EndOfStream` after the peer's
    END; ``async for msg in stream`` iterates until then. ``send()`` waits for credit when the
    peer is slow (backpressure). After a reset, both raise :class:`~transport.rpc.RpcError`
    (``code == "cancelled"`` for cancellation); after the connection died they raise
    :class:`~transport.errors.ChannelClosed`, :class:`~transport.errors.RemoteProtocolError` or
    :class:`~transport.errors.PeerTimeout`. A stream is used by one receiving task and one
    sending task at a time (:class:`trio.BusyResourceError` otherwise).

    Read-ahead and memory: messages the peer sends before the application asks for them wait
    in this stream's queue, which the flow-control window bounds (``window_messages`` /
    ``window_bytes`` of the connection, plus at most one message over the byte window). Credit
    goes back to the peer only as :meth:`receive` / :meth:`receive_nowait` hand messages out,
    so this queue *is* the read-ahead: an application that batches with
    ``first = await stream.receive()`` then ``stream.receive_nowait()`` until
    :class:`trio.WouldBlock` needs no queue of its own, and is bounded in bytes by the window
    it configured on ``serve_rpc`` / ``open_rpc_client``. :meth:`statistics` shows the queue.

    Args (internal; streams are made by the connection):
        owner: the connection.
        stream_id / method / metadata: from the OPEN frame.
        timeout: bound on each wait of :meth:`receive` and :meth:`send` (seconds), or None:
            a peer that stops mid-stream ends in :class:`~transport.errors.PeerTimeout`.
    """

    __slots__ = (
        "_ended",
        "_error",
        "_local_ended",
        "_owner",
        "_queue",
        "_receiving",
        "_recv_parker",
        "_send_parker",
        "_sending",
        "_timed_out",
        "_timeout",
        "_waiting_for",
        "deadline",
        "limit",
        "metadata",
        "method",
        "stream_id",
    )

    def __init__(
        self,
        owner: StreamOwner,
        stream_id: int,
        method: str,
        metadata: Mapping[str, Any],
        *,
        timeout: float | None = None,
    ) -> None:
        self._owner = owner
        #: the stream's id on the wire (odd, increasing)
        self.stream_id: Final = stream_id
        #: the method named in OPEN
        self.method: Final = method
        #: the OPEN frame's metadata (string keys, scalar values)
        self.metadata: Final = metadata
        self._timeout = timeout
        self._queue: deque[tuple[Any, int]] = deque()
        self._ended = False  # the peer's END arrived (messages may still be queued)
        self._local_ended = False  # we sent END
        self._error: RpcError | None = None  # stream-level failure (reset)
        self._recv_parker = Parker()
        self._send_parker = Parker()
        self._receiving = False  # a task is inside receive() (BusyResourceError guard)
        self._sending = False
        #: when the wait in progress expires (trio time), or None (read by the client's
        #: watchdog, which calls :meth:`expire`)
        self.deadline: float | None = None
        self._timed_out: str | None = None  # what expired (the PeerTimeout message)
        self._waiting_for = ""
        #: the timeout of each wait (seconds), for the watchdog's stall rule
        self.limit = timeout

    def __repr__(self) -> str:
        return f"<RpcStream {self.stream_id} {self.method!r}>"

    # ------------------------------------------------------------ the endpoint interface

    def deliver(self, message: Any, size: int, end: bool) -> None:
        self._queue.append((message, size))
        if end:
            self._ended = True
        self._recv_parker.unpark()

    def deliver_end(self) -> None:
        self._ended = True
        self._recv_parker.unpark()

    def deliver_reset(self, error: RpcError) -> None:
        # Messages that arrived before the reset stay receivable (they were sent first).
        if self._error is None:
            self._error = error
        self._recv_parker.unpark()
        self._send_parker.unpark()

    def credit_arrived(self) -> None:
        self._send_parker.unpark()

    def connection_failed(self) -> None:
        self._recv_parker.unpark()
        self._send_parker.unpark()

    # ------------------------------------------------------------ state helpers

    @property
    def local_ended(self) -> bool:
        """True once this side sent END (or the stream was reset)."""
        return self._local_ended

    @property
    def active(self) -> bool:
        """True while the stream is not finished in both directions (nor reset)."""
        return self._owner.core.stream_state(self.stream_id) in ACTIVE_STATES

    def _has_input(self) -> bool:
        return bool(self._queue) or self._ended or self._error is not None

    def _can_send(self) -> bool:
        return self._owner.core.has_send_credit(self.stream_id) or self._error is not None

    def _copy_error(self) -> RpcError:
        err = self._error
        assert err is not None
        return RpcError(err.code, err.message)  # a fresh instance per raise

    def _raise_if_unusable(self) -> None:
        if self._error is not None:
            raise self._copy_error()
        if self._owner.failure is not None:
            raise self._owner.error()

    def _take(self) -> Any:
        message, size = self._queue.popleft()
        return message, self._owner.core.message_consumed(self.stream_id, size)

    def discard_queue(self) -> None:
        """Drop queued messages, reporting each as consumed (the connection's byte budget
        counts them until then); credit is granted if the stream is still open."""
        core = self._owner.core
        grants = b""
        while self._queue:
            _, size = self._queue.popleft()
            grants += core.message_consumed(self.stream_id, size)
        if grants:
            self._owner.queue(grants)

    def _reset_locally(self, error: RpcError) -> None:
        if self._error is None:
            self._error = error
        self.discard_queue()
        self._local_ended = True
        self._recv_parker.unpark()
        self._send_parker.unpark()

    async def _wait(self, ready: Callable[[], bool], parker: Parker, what: str) -> None:
        owner = self._owner
        if self._timeout is None:
            await owner.wait_until(ready, parker)
            return
        self._waiting_for = what
        self.deadline = deadline = trio.current_time() + self._timeout
        owner.arm(deadline)
        try:
            await owner.wait_until(ready, parker)
        finally:
            self.deadline = None
            owner.waited(self._timed_out is not None)
        if self._timed_out is not None:
            raise PeerTimeout(self._timed_out)

    def expire(self) -> None:
        """The wait in progress passed its deadline (called by the client's watchdog): the
        peer stalled mid-stream. Cancel the stream (best effort) and wake the waiter, which
        raises PeerTimeout."""
        self.deadline = None
        message = (
            f"the peer sent nothing on stream {self.stream_id} ({self.method!r}) for "
            f"{self._timeout} s while we waited to {self._waiting_for}"
        )
        self._timed_out = message
        owner = self._owner
        if self.active and self._error is None:
            owner.queue(owner.core.send_cancel(self.stream_id))
        self._reset_locally(RpcError("deadline_exceeded", message))
        owner.discard(self.stream_id, self)

    # ------------------------------------------------------------ receiving

    async def receive(self) -> Any:
        """The next message from the peer.

        Raises:
            EndOfStream: the peer ended the stream and every message was received.
            RpcError: the stream was cancelled or failed (by either side).
            ChannelClosed / RemoteProtocolError: the connection died.
            PeerTimeout: nothing arrived within the stream's timeout (the stream is cancelled).
            trio.BusyResourceError: another task is receiving on this stream.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if self._has_input() or self._owner.failure is not None:
                await trio.lowlevel.checkpoint()
            else:
                await self._wait(self._has_input, self._recv_parker, "receive")
            if self._queue:
                message, grant = self._take()
                if grant:
                    await self._owner.send_quietly(grant)
                return message
            if self._error is not None:
                raise self._copy_error()
            if self._ended:
                raise EndOfStream
            raise self._owner.error()
        finally:
            self._receiving = False

    def receive_nowait(self) -> Any:
        """The next message if one is already queued, else raise :class:`trio.WouldBlock`.

        Raises the same errors as :meth:`receive` when the stream has finished.
        """
        if self._queue:
            message, grant = self._take()
            if grant:
                self._owner.queue(grant)  # written soon, without blocking us
            return message
        if self._error is not None:
            raise self._copy_error()
        if self._ended:
            raise EndOfStream
        if self._owner.failure is not None:
            raise self._owner.error()
        raise trio.WouldBlock

    # ------------------------------------------------------------ sending

    async def send(self, value: Any, *, end: bool = False) -> None:
        """Send one message; ``end=True`` also half-closes (one frame, like :meth:`send_end`).

        Waits while the peer has granted no credit (backpressure); cancelling that wait sends
        nothing.

        Raises:
            TypeError: the value is not msgpack-able.
            LocalProtocolError: the encoded message exceeds ``max_message_size``.
            trio.ClosedResourceError: :meth:`send_end` was already called.
            RpcError / ChannelClosed / RemoteProtocolError / PeerTimeout: as for
                :meth:`receive` (PeerTimeout: no credit came within the timeout).
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        owner = self._owner
        core = owner.core
        payload = core.pack_message(value)
        self._sending = True
        try:
            while True:
                self._raise_if_unusable()
                if self._local_ended:
                    raise trio.ClosedResourceError("send() after send_end() on this stream")
                if core.has_send_credit(self.stream_id):
                    break
                owner.count_blocked_sender(1)
                try:
                    await self._wait(self._can_send, self._send_parker, "send (no credit)")
                finally:
                    owner.count_blocked_sender(-1)
            data = core.send_data(self.stream_id, payload, end=end)
            if end:
                self._local_ended = True
                owner.forget_if_done(self.stream_id)
            await owner.send(data)
        finally:
            self._sending = False

    async def send_end(self) -> None:
        """Half-close: tell the peer we send no more messages. Idempotent."""
        if self._local_ended and self._error is None:
            await trio.lowlevel.checkpoint()
            return
        self._raise_if_unusable()
        data = self._owner.core.send_end(self.stream_id)
        self._local_ended = True
        self._owner.forget_if_done(self.stream_id)
        await self._owner.send(data)

    async def cancel(self) -> None:
        """Abandon the stream in both directions and tell the peer (server: the handler is
        cancelled). Later operations raise ``RpcError("cancelled", ...)``. Does nothing if the
        stream already finished."""
        error = RpcError("cancelled", "the stream was cancelled locally")
        owner = self._owner
        if self._error is None and owner.failure is None and self.active:
            data = owner.core.send_cancel(self.stream_id)
            self._reset_locally(error)
            owner.discard(self.stream_id, self)
            await owner.send_quietly(data)
        else:
            self._reset_locally(error)
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Cancel the stream if it has not finished (see :meth:`cancel`)."""
        if self.active and self._error is None and self._owner.failure is None:
            await self.cancel()
        else:
            self.discard_queue()
            await trio.lowlevel.checkpoint()

    def statistics(self) -> StreamCredit:
        """Credit and queue sizes of this stream (zeros once it is closed)."""
        core = self._owner.core
        credit = core.stream_credit(self.stream_id)
        if credit is not None:
            return credit
        state = core.stream_state(self.stream_id) or StreamState.CLOSED
        queued = sum(size for _, size in self._queue)
        return StreamCredit(state, 0, 0, 0, 0, len(self._queue), queued)
