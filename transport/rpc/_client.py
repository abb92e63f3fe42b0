"""The client side of ``enclave-rpc/1`` over trio: :func:`open_rpc_client` and :class:`RpcClient`.

Theory of operation
-------------------

Reading is leader/follower (:class:`transport.sync.LeaderFollower`): a task waiting for input
on its stream that finds nobody reading reads itself, dispatching every frame to its owner on
the way, until its own input arrived; then it hands the role to another waiting task. A unary
reply therefore wakes the caller itself instead of a reader task that then wakes the caller (a
task hop). A background task (in the nursery of :func:`open_rpc_client`) reads only while no
caller does, so idle connections still see PONGs, grants, GOAWAY and EOF, and a server blocked
writing to us is always drained. Whoever reads never writes (grants and PONGs go to a
background flush) and never blocks on anything but the receive, so two sides blocked writing
to each other cannot deadlock.

A unary :meth:`RpcClient.call` costs one ``send_all`` (OPEN and DATA|END in one write), one
``receive_some`` by the calling task itself, and no :class:`~transport.rpc.RpcStream`: a small
endpoint (:class:`_UnaryCall`) collects the answer.

Deadlines: every call has one (``timeout_s``, 30 s by default, None to wait for ever); an
expired call cancels its stream and raises :class:`~transport.errors.PeerTimeout`. A stream
bounds each of its waits the same way (a peer that stops mid-stream). Deadlines are enforced
by a watchdog task, not by a cancel scope per call (a scope around each lead measured +9 µs
per call here, a quarter of the whole client): a call records its deadline; the watchdog
sleeps until the earliest one and expires what is due, waking its task. A caller that was
reading for everyone when its deadline passed is blocked in the transport and cannot be
woken that way; so the watchdog sends a PING: a live server answers at once, the PONG wakes
the reader, which sees its call expired. A peer that answers nothing within
:data:`LIVENESS_TIMEOUT_S` (or leaves one of our writes unread for a whole deadline) has
stalled: the watchdog fails the connection and closes the transport, which wakes everyone.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from transport.errors import ChannelClosed, LocalProtocolError, PeerTimeout
from transport.rpc._connection import Connection, RpcStatistics, unwrap_group
from transport.rpc._core import (
    DEFAULT_MAX_MESSAGE_SIZE,
    INITIAL_WINDOW_BYTES,
    INITIAL_WINDOW_MESSAGES,
    PING_PAYLOAD_SIZE,
    Role,
    RpcConnection,
)
from transport.rpc._errors import RpcError
from transport.rpc._stream import ACTIVE_STATES, RpcStream
from transport.sync import LeaderFollower, Parker

__all__ = [
    "RpcClient",
    "open_rpc_client",
    "DEFAULT_CLIENT_MAX_STREAMS",
    "DEFAULT_CALL_TIMEOUT_S",
    "BACKGROUND_IDLE_S",
    "BACKGROUND_IDLE_MAX_S",
]

#: A client's own cap on concurrently open streams (bounds its memory; servers refuse sooner).
DEFAULT_CLIENT_MAX_STREAMS: Final = 1024
#: Default deadline of a call, and of each wait on a stream (seconds): a peer that stalls
#: ends in PeerTimeout instead of a hang. Long enough for a large model's cold inference.
DEFAULT_CALL_TIMEOUT_S: Final = 30.0
#: After callers stop reading, the background reader takes over within one to two of these
#: periods (seconds). Waking it after every call instead costs a task switch and a scheduler
#: pass per call (~5 µs here); the timer costs one wake-up per period. What a late background
#: read delays is only unsolicited input (the server's GOAWAY/EOF, replies nobody waits for
#: yet); waiting callers, blocked senders and pings read for themselves.
BACKGROUND_IDLE_S: Final = 0.002
#: While one caller keeps the read role (a long call), the period doubles up to this (seconds),
#: so a pending call does not cost 500 wake-ups a second.
BACKGROUND_IDLE_MAX_S: Final = 0.128


class _Default:
    """Marker: "use the client's default timeout"."""


_DEFAULT: Final = _Default()


#: The watchdog's longest sleep when no deadline is pending (seconds).
_WATCHDOG_IDLE_S: Final = 60.0
#: After a deadline expired a caller that is blocked reading, a PING checks the peer is alive;
#: no byte at all within this long (or the call's own timeout, if shorter; seconds) means it
#: stalled, and the connection is failed. A live peer answers in one round trip.
LIVENESS_TIMEOUT_S: Final = 5.0


class _ClientConnection(Connection):
    def __init__(self, transport: trio.abc.Stream, core: RpcConnection, timeout: float | None):
        super().__init__(transport, core)
        self.timeout = timeout
        self.reader_writes = False
        self.reading = LeaderFollower(
            self.read_once, idle_period=BACKGROUND_IDLE_S, idle_period_max=BACKGROUND_IDLE_MAX_S
        )
        self.wait_until = self.reading.wait_until  # type: ignore[method-assign]
        self.watchdog_next = float("inf")  # when the watchdog looks next
        self.watchdog_parker = Parker()
        self.expired_waiting = 0  # expired waits whose task has not returned yet
        self.expired_limit = float("inf")  # the shortest timeout among them
        self.probe_sent: float | None = None  # when the liveness PING left (see watchdog)

    def on_fail(self) -> None:
        self.reading.close()
        self.watchdog_parker.unpark()

    def arm(self, deadline: float) -> None:
        if deadline < self.watchdog_next:
            self.watchdog_parker.unpark()  # sooner than it planned to look (a short timeout)

    def waited(self, timed_out: bool) -> None:
        if timed_out:
            self.expired_waiting -= 1
            if not self.expired_waiting:
                self.expired_limit = float("inf")
                self.probe_sent = None

    def expired(self, limit: float) -> None:
        self.expired_waiting += 1
        self.expired_limit = min(self.expired_limit, limit)

    async def watchdog(self) -> None:
        """Expire due deadlines; fail the connection if the peer stalled (module docstring)."""
        while self.failure is None:
            now = self.clock()
            wake = now + (self.timeout if self.timeout is not None else _WATCHDOG_IDLE_S)
            for endpoint in list(self.streams.values()):
                deadline = getattr(endpoint, "deadline", None)
                if deadline is None:
                    continue
                if deadline <= now:
                    limit = getattr(endpoint, "limit", None) or self.timeout or 0.0
                    expire = endpoint.expire  # type: ignore[attr-defined]
                    expire()
                    self.expired(limit)
                else:
                    wake = min(wake, deadline)
            if self.expired_waiting:
                # A task whose deadline passed may be blocked reading for everyone: a PING
                # makes a live peer send something, which wakes it.
                grace = min(LIVENESS_TIMEOUT_S, self.expired_limit)
                if self.probe_sent is None:
                    self.probe_sent = now
                    self.queue(self.core.send_ping(os.urandom(PING_PAYLOAD_SIZE)))
                elif self.last_received < self.probe_sent and now - self.probe_sent >= grace:
                    await self.close_stalled(
                        f"the peer answered nothing (not even a PING) for {grace} s"
                    )
                    return
                wake = min(wake, self.probe_sent + grace)
            started = self.write_started
            limit = self.timeout
            if started is not None and limit is not None:
                if now - started >= limit:
                    await self.close_stalled(f"the peer did not read our data for {limit} s")
                    return
                wake = min(wake, started + limit)
            self.watchdog_next = wake
            with trio.move_on_after(max(wake - now, 0.0)):
                await self.watchdog_parker.park()

    async def close_stalled(self, reason: str) -> None:
        self.fail(PeerTimeout, f"RPC connection failed: {reason}", None)
        await trio.aclose_forcefully(self.transport)  # wakes a task blocked in the transport


class _UnaryCall:
    """The endpoint of a unary call's stream: collects its one answer, wakes the caller."""

    __slots__ = (
        "_conn",
        "deadline",
        "ended",
        "error",
        "has_response",
        "limit",
        "parker",
        "response",
        "stream_id",
        "timed_out",
    )

    def __init__(self, conn: _ClientConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.parker = Parker()
        self.response: Any = None
        self.has_response = False
        self.ended = False
        self.error: RpcError | None = None
        self.deadline: float | None = None  # read by the watchdog
        self.limit: float | None = None
        self.timed_out = False

    def done(self) -> bool:
        return self.ended or self.error is not None or self.timed_out

    def expire(self) -> None:
        """The deadline passed (called by the watchdog): cancel the stream, wake the caller."""
        conn = self._conn
        self.deadline = None
        self.timed_out = True
        if conn.core.stream_state(self.stream_id) in ACTIVE_STATES:
            conn.queue(conn.core.send_cancel(self.stream_id))
        conn.discard(self.stream_id, self)
        self.parker.unpark()

    def deliver(self, message: Any, size: int, end: bool) -> None:
        grant = self._conn.core.message_consumed(self.stream_id, size)
        if grant:
            self._conn.queue(grant)
        if self.has_response:
            if self.error is None:
                self.error = RpcError("internal", "the unary method sent more than one message")
        else:
            self.response = message
            self.has_response = True
        if end:
            self.ended = True
        self.parker.unpark()

    def deliver_end(self) -> None:
        self.ended = True
        self.parker.unpark()

    def deliver_reset(self, error: RpcError) -> None:
        if self.error is None:
            self.error = error
        self.parker.unpark()

    def credit_arrived(self) -> None:
        pass

    def connection_failed(self) -> None:
        self.parker.unpark()


class RpcClient:
    """The client side of an RPC connection; get one from :func:`open_rpc_client`."""

    def __init__(self, conn: _ClientConnection) -> None:
        self._conn = conn

    def _check_open(self) -> None:
        conn = self._conn
        if conn.failure is not None:
            raise conn.error()
        refusal = conn.core.open_refusal()
        if refusal is not None:
            raise RpcError(*refusal)

    async def call(
        self,
        method: str,
        request: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        timeout_s: float | _Default | None = _DEFAULT,
    ) -> Any:
        """Unary call: send ``request``, return the single response message.

        Costs one write (OPEN and the request in one ``send_all``) and one wake-up.
        Cancellation sends CANCEL, which cancels the server's handler.

        Args:
            method, request, metadata: what to call, with what.
            timeout_s: deadline of the whole call in seconds (default: the client's, 30 s);
                None waits for ever.

        Raises:
            RpcError: the handler failed (its code and message), the call was refused, or the
                handler did not answer with exactly one message (``"internal"``).
            PeerTimeout: no answer before the deadline (the call was cancelled).
            ChannelClosed / RemoteProtocolError: the connection died.
            TypeError / ValueError / LocalProtocolError: bad arguments, oversized request.
        """
        conn = self._conn
        if conn.failure is not None:
            raise conn.error()
        core = conn.core
        payload = core.pack_message(request)
        try:
            stream_id, data = core.send_open(method, metadata, first=payload, end=True)
        except LocalProtocolError:
            refusal = core.open_refusal()
            if refusal is not None:
                raise RpcError(*refusal) from None
            raise
        call = _UnaryCall(conn, stream_id)
        conn.streams[stream_id] = call
        limit = conn.timeout if isinstance(timeout_s, _Default) else timeout_s
        if limit is not None:
            call.limit = limit
            call.deadline = deadline = conn.clock() + limit
            if deadline < conn.watchdog_next:  # conn.arm(deadline), inlined (per-call path)
                conn.watchdog_parker.unpark()
        try:
            await conn.send(data, then_wait=True)
            await conn.wait_until(call.done, call.parker)
        finally:
            call.deadline = None
            if call.timed_out:
                conn.waited(True)
            elif not call.ended and conn.failure is None:
                # Cancelled by the caller (or failed): abandon the stream.
                if core.stream_state(stream_id) in ACTIVE_STATES:
                    cancel = core.send_cancel(stream_id)
                    conn.discard(stream_id, call)
                    await conn.send_quietly(cancel)
                else:
                    conn.discard(stream_id, call)
        if call.timed_out:
            raise PeerTimeout(f"no answer to {method!r} within {limit} s")
        if call.error is not None:
            raise RpcError(call.error.code, call.error.message)
        if not call.ended:
            raise conn.error()
        if not call.has_response:
            raise RpcError("internal", f"unary method {method!r} sent no response")
        return call.response

    @asynccontextmanager
    async def open_stream(
        self,
        method: str,
        metadata: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | _Default | None = _DEFAULT,
    ) -> AsyncIterator[RpcStream]:
        """Open a stream for ``method``; the stream is cancelled on exit unless it finished.

        Args:
            method, metadata: the OPEN frame's content.
            timeout_s: bound on each wait of the stream's ``receive``/``send`` in seconds
                (default: the client's, 30 s); None waits for ever.

        Usage::

            async with rpc.open_stream("infer_stream", {"model": "digits"}) as st:
                await st.send(first); await st.send(second); await st.send_end()
                async for out in st:
                    ...
        """
        conn = self._conn
        self._check_open()
        stream_id, data = conn.core.send_open(method, metadata)
        limit = conn.timeout if isinstance(timeout_s, _Default) else timeout_s
        st = RpcStream(conn, stream_id, method, dict(metadata or {}), timeout=limit)
        conn.streams[stream_id] = st
        try:
            await conn.send(data)
            yield st
        finally:
            if st.active and conn.failure is None:
                await st.cancel()
            else:
                st.discard_queue()

    async def ping(self, *, timeout_s: float | _Default | None = _DEFAULT) -> float:
        """Round-trip a PING frame; return the time it took, in seconds.

        Raises:
            PeerTimeout: no PONG within ``timeout_s`` (default: the client's).
            ChannelClosed / RemoteProtocolError: the connection died meanwhile.
        """
        conn = self._conn
        token = os.urandom(PING_PAYLOAD_SIZE)
        parker = Parker()
        conn.pings[token] = parker
        start = trio.current_time()
        limit = conn.timeout if isinstance(timeout_s, _Default) else timeout_s
        try:
            with trio.move_on_after(float("inf") if limit is None else limit):
                await conn.send(conn.core.send_ping(token))
                await conn.wait_until(lambda: token not in conn.pings, parker)
        finally:
            answered = token not in conn.pings
            conn.pings.pop(token, None)
        if conn.failure is not None:
            raise conn.error()
        if not answered:
            raise PeerTimeout(f"no PONG within {limit} s")
        return trio.current_time() - start

    def statistics(self) -> RpcStatistics:
        """Counters and current state of the connection."""
        return self._conn.statistics()

    @property
    def closed(self) -> bool:
        """True once the connection failed or was closed."""
        return self._conn.failure is not None


@asynccontextmanager
async def open_rpc_client(
    stream: trio.abc.Stream,
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    window_messages: int = INITIAL_WINDOW_MESSAGES,
    window_bytes: int = INITIAL_WINDOW_BYTES,
    max_streams: int = DEFAULT_CLIENT_MAX_STREAMS,
    max_buffered_bytes: int | None = None,
    timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S,
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
        max_buffered_bytes: bound on answers received and not yet consumed, for the whole
            connection (see transport/RPC.md §4); None (the default: the server is attested)
            bounds it only by ``max_streams`` windows. Streams over it are refused with
            ``RpcError("resource_exhausted")``.
        timeout_s: default deadline of every call and of each wait on a stream, in seconds
            (at most 30 s by default); None waits for ever.

    Resource handling:
        A nursery inside owns the background reader. On exit every open stream fails with
        :class:`~transport.errors.ChannelClosed`, the reader stops and ``stream`` is closed
        (bounded by :data:`~transport.rpc.CLOSE_TIMEOUT_S`). The connection failing (peer gone,
        protocol violation) does not cancel the body; the next RPC operation raises instead.
    """
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError("timeout_s must be positive seconds or None")
    core = RpcConnection(
        Role.CLIENT,
        max_message_size=max_message_size,
        window_messages=window_messages,
        window_bytes=window_bytes,
        max_streams=max_streams,
        max_buffered_bytes=max_buffered_bytes,
    )
    conn = _ClientConnection(stream, core, timeout_s)

    async def background() -> None:
        try:
            await conn.reading.run_background()
        finally:
            await conn.close_transport()

    try:
        async with trio.open_nursery() as nursery:
            conn.nursery = nursery
            nursery.start_soon(background)
            nursery.start_soon(conn.watchdog)
            try:
                yield RpcClient(conn)
            finally:
                conn.fail(ChannelClosed, "the RPC connection was closed locally", None)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        unwrap_group(eg)
