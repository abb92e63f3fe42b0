"""Trio adapter of ``enclave-channel/1``: :class:`SecureChannel`, ``connect_channel``,
``accept_channel``.

Theory of operation. The sans-IO core (``_connection.py``) does every check and all the
cryptography; this module only moves bytes and maps failures:

* **Handshake** under a timeout: send the hello / answer it with a document from the injected
  attester, loop ``next_event`` / ``receive_some`` until ``ChannelEstablished``. In mutual mode
  (``accept_channel(peer_verifier=...)``) the client answers the core's
  ``AttestationRequest`` with its own attester (``connect_channel(attester=...)``); a client
  without one fails there, before sending anything, and the enclave's ACCEPTED record ends the
  handshake.
* **send_all** seals the data into records of ≤ ``max_record_size`` bytes, several records per
  preallocated output buffer, and writes each buffer with one ``send_all`` (coalescing).
* **receive_some** decrypts *every* complete record available per wake-up and hands each
  record's plaintext out as is: one allocation of ≤ 64 KiB per record (under glibc's mmap
  threshold, so no page-fault cliff; perf-baseline §2.2) and no further copy. **receive_into**
  decrypts with ``decrypt_into`` straight into the caller's preallocated buffer (no allocation
  at all) for bulk readers. On a ``trio.SocketStream`` the ciphertext is ``recv_into``'d
  straight into the core's preallocated receive buffer; AF_UNIX socket buffers are raised to
  1 MiB so a coalesced write of four records goes out in one piece.
* **Socket I/O** (on a ``trio.SocketStream``): the channel calls the standard-library socket
  itself and waits with ``trio.lowlevel.wait_readable``/``wait_writable`` only when it would
  block, keeping trio's contract (every operation is a cancel point and a schedule point) but
  making *one* scheduler pass per operation where trio's socket wrapper makes two after a wait.
  :meth:`SecureChannel.send_all_eagerly` also skips the pass after a write the socket took at
  once, for callers that block right after (the RPC layer's unary calls and its reader). On
  the project's 2-vCPU VM this cut a channel round trip's CPU by ~15 µs per side
  (``enclave bench channel``: ``channel_calls`` 170 → 113, ``rpc_calls`` 254 → 198).
* **Cancellation mid-send** (on a ``trio.SocketStream``): a ``send_all`` cancelled while the
  socket is full raises ``Cancelled`` but does *not* break the channel: the records it had
  sealed stay with the :class:`~transport._sockwrite.SocketWriter` and go out first on the next
  ``send_all``/``send_eof``/:meth:`SecureChannel.flush`/``aclose``, so the record stream stays
  whole (as trio allows, some or all of the cancelled call's data is delivered; what it had not
  sealed is not). Any other transport cannot resume a write: the channel breaks there, as
  trio's ``SSLStream`` does.
* **Failures**: anything the peer did wrong (bad tag, rejected document, truncation, malformed
  or oversized frames) is logged here with its reason and raised as
  :class:`~transport.errors.AuthenticationFailed`, whose message says nothing more (also a
  ``trio.BrokenResourceError``, the vocabulary of ``trio.abc.Stream``). A transport
  that breaks before the peer's close record is a truncation too. What is *not* an
  authentication failure is kept apart, so that a user can be told what happened: during the
  handshake, a transport that ends or breaks before the enclave sent its first byte raises
  :class:`~transport.errors.PeerUnreachable` (nothing answered: a relay such as the ingress
  could not reach its target); one that ends after that raises
  :class:`~transport.errors.ChannelClosed`; a handshake that does not finish in time raises
  :class:`~transport.errors.PeerTimeout`. On the send side transport errors propagate as
  trio's own (``BrokenResourceError``, ``ClosedResourceError``).
* **Concurrency**: one sender and one receiver at a time, enforced with a ConflictDetector-style
  guard (``trio.BusyResourceError``), as trio's own streams do.
"""

from __future__ import annotations

import operator
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import structlog
import trio

from transport._sockwrite import SocketWriter, stdlib_socket
from transport.channel._connection import (
    MAX_FRAME_SIZE,
    NEED_DATA,
    Attestation,
    AttestationRequest,
    ChannelConnection,
    ChannelEstablished,
    ClientConnection,
    Close,
    Hello,
    ServerConnection,
    State,
)
from transport.channel._record import (
    DEFAULT_MAX_RECORDS,
    HEADER_SIZE,
    MAX_RECORD_PLAINTEXT,
    TAG_SIZE,
)
from transport.channel._types import Attester, DocumentVerifier, PeerAttestation, Suite
from transport.errors import (
    AuthenticationFailed,
    ChannelClosed,
    LocalProtocolError,
    PeerTimeout,
    PeerUnreachable,
)

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "CLOSE_TIMEOUT_S",
    "SOCKET_BUFFER_SIZE",
    "ChannelStatistics",
    "SecureChannel",
    "accept_channel",
    "connect_channel",
]

log = structlog.get_logger()

#: Whole-handshake deadline (seconds): a real NSM document takes ~0.1-0.3 s (perf-baseline
#: §1c), a local one a few ms; a peer slower than this is treated as failed.
HANDSHAKE_TIMEOUT_S = 10.0
#: Bound on sending our close record from ``aclose`` (seconds): a peer that stopped reading
#: must not keep a closing task alive.
CLOSE_TIMEOUT_S = 1.0
#: Socket buffer size set on AF_UNIX transports (bytes); see _enlarge_socket_buffers.
SOCKET_BUFFER_SIZE = 1 << 20
#: Records coalesced per transport write: 4 x 64 KiB keeps writes at 256 KiB, the size where
#: the trio batch numbers of perf-baseline §2.3 peak.
_RECORDS_PER_WRITE = 4
#: Bytes asked of a generic transport per read: ≤ 64 KiB avoids the recv allocation cliff.
_RECEIVE_SIZE = 64 * 1024
_BUSY_SENDING: Final = "another task is sending on this channel"
_BUSY_RECEIVING: Final = "another task is receiving on this channel"


@dataclass(frozen=True, slots=True)
class ChannelStatistics:
    """What :meth:`SecureChannel.statistics` reports.

    Attributes:
        suite: the negotiated suite's name.
        records_sent / records_received: records under the current keys, close included.
        data_records_left: data records this side may still send before its limit.
        bytes_buffered: received bytes not yet returned (ciphertext and plaintext).
        bytes_unsent: sealed bytes a cancelled send left unwritten (they go out first on the
            next send, :meth:`SecureChannel.flush` or ``aclose``); at most one write's records.
    """

    suite: str
    records_sent: int
    records_received: int
    data_records_left: int
    bytes_buffered: int
    bytes_unsent: int = 0


def _enlarge_socket_buffers(sock: trio.socket.SocketType) -> None:
    """Raise an AF_UNIX socket's buffers to ``SOCKET_BUFFER_SIZE`` (best effort).

    Unix stream sockets default to ~208 KiB, less than one coalesced write of four records;
    1 MiB roughly doubled bulk channel throughput in ``enclave bench channel`` here. Not done
    on TCP, where it would disable the kernel's buffer auto-tuning.
    """
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, option) < SOCKET_BUFFER_SIZE:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_SIZE)
        except OSError:  # pragma: no cover - limits are advisory
            pass


class _StreamAuthenticationFailed(AuthenticationFailed, trio.BrokenResourceError):
    """:class:`~transport.errors.AuthenticationFailed` as a :class:`SecureChannel` raises it:
    also a ``trio.BrokenResourceError``, the vocabulary ``trio.abc.Stream`` requires of a stream
    that broke (``trio.testing.check_two_way_stream`` holds the channel to it). Not a name of
    its own: it shows as, and is caught as, ``AuthenticationFailed`` (``transport.errors``
    cannot derive from trio: it is imported where trio is not, such as enclave boot)."""


_StreamAuthenticationFailed.__name__ = "AuthenticationFailed"
_StreamAuthenticationFailed.__qualname__ = "AuthenticationFailed"
_StreamAuthenticationFailed.__module__ = "transport.errors"


def _failed(role: str, reason: str, **fields: object) -> AuthenticationFailed:
    log.warning("channel_failed", role=role, reason=reason, **fields)
    return _StreamAuthenticationFailed(reason)


class SecureChannel(trio.abc.HalfCloseableStream):
    """A byte stream of AEAD records over ``transport_stream`` (create with
    :func:`connect_channel` / :func:`accept_channel`).

    Attributes:
        peer: the verified attestation of the other end: the enclave's (client side), or the
            client's (enclave side, mutual mode; None when the client is anonymous). Its
            ``pcrs``, ``module_id`` (and ``pcr0``/``pcr8``/``pcr16``) are what an application
            authorizes a caller by.
        suite: the negotiated key-establishment suite.
        transport_stream: the underlying stream; don't use it directly.

    ``send_eof`` sends the authenticated close record (the peer's ``receive_some`` then returns
    ``b""``); ``aclose`` sends it too when it can, then closes the transport. A transport EOF
    without that record makes ``receive_some`` raise :class:`AuthenticationFailed`.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        connection: ChannelConnection,
        *,
        peer: PeerAttestation | None,
        suite: Suite,
        max_record_size: int = MAX_RECORD_PLAINTEXT,
    ) -> None:
        if not 1 <= max_record_size <= MAX_RECORD_PLAINTEXT:
            raise ValueError(f"max_record_size must be in [1, {MAX_RECORD_PLAINTEXT}]")
        self.transport_stream = transport_stream
        self.peer = peer
        self.suite = suite
        self._conn = connection
        self._role = connection.role.value
        self._max_record = max_record_size
        # One task per direction (trio's ConflictDetector, inlined as flags: a context manager
        # is two Python calls per send and per receive on the per-message path).
        self._sending = False
        self._receiving = False
        self._out = bytearray()  # coalescing buffer, allocated by the first multi-record send
        self._pending: deque[bytes | memoryview] = deque()  # decrypted, not yet returned
        self._peer_eof = False
        self._closed = False
        self._send_broken = False
        self._recv_failed = False
        # On a trio socket the channel does its own socket I/O (one scheduler pass per
        # operation; a cancelled send keeps its unwritten rest instead of breaking the stream).
        self._raw = stdlib_socket(transport_stream)
        self._writer = None if self._raw is None else SocketWriter(self._raw)
        if (
            isinstance(transport_stream, trio.SocketStream)
            and transport_stream.socket.family == socket.AF_UNIX
        ):
            _enlarge_socket_buffers(transport_stream.socket)

    # ------------------------------------------------------------------ send side
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send ``data`` as one or more records.

        Raises:
            trio.BusyResourceError: another task is in ``send_all``/``send_eof``/
                ``wait_send_all_might_not_block``.
            trio.ClosedResourceError: after ``send_eof`` or ``aclose``.
            trio.BrokenResourceError: the transport broke, or an earlier send was cancelled
                mid-way (the record stream can't be resumed).
        """
        await self._send_all(data, True)

    async def send_all_eagerly(self, data: bytes | bytearray | memoryview) -> None:
        """:meth:`send_all` without the schedule point after a write the transport took at
        once (it is still a cancel point, and it still yields while the transport is full).

        For a caller that blocks right after, such as an RPC call about to wait for its answer
        or a server going back to read: the scheduler pass ``send_all`` makes for fairness is
        one that caller makes a moment later anyway, and on a small round trip it is a few
        microseconds of every call (``enclave bench channel``, ``rpc_rtt_us``). Raises as
        :meth:`send_all`.
        """
        await self._send_all(data, False)

    async def _send_all(self, data: bytes | bytearray | memoryview, fair: bool) -> None:
        if self._sending:
            raise trio.BusyResourceError(_BUSY_SENDING)
        self._sending = True
        try:
            conn = self._conn
            if self._closed or conn.our_closed:  # (_check_send, inlined: per-message path)
                raise trio.ClosedResourceError("the channel is closed for sending")
            if self._send_broken:
                raise trio.BrokenResourceError("the channel is broken")
            await trio.lowlevel.checkpoint_if_cancelled()
            writer = self._writer
            if writer is not None and writer.unsent:
                await self._finish_cancelled_send()
            view = data if type(data) is bytes else memoryview(data).cast("B")
            if not view:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            n = len(view)
            if n <= self._max_record:  # one record: skip the coalescing buffer
                try:
                    # The sealer refuses a record past the limit before sealing anything (the
                    # close keeps its reserved slot), so no separate check is needed here.
                    record = conn.seal_record(view)
                except LocalProtocolError:
                    if conn.data_records_left < 1:
                        log.warning("channel_record_limit", role=self._role)
                    raise
                try:
                    await self._send_transport(record, fair)
                except BaseException as exc:
                    self._send_broken = self._broken_by(exc)
                    raise
                return
            if -(-n // self._max_record) > conn.data_records_left:
                # Checked before sealing anything: the channel can still be closed cleanly.
                log.warning("channel_record_limit", role=self._role)
                raise LocalProtocolError("record limit for this key reached; open a new channel")
            if not self._out:
                per_record = HEADER_SIZE + self._max_record + TAG_SIZE
                self._out = bytearray(_RECORDS_PER_WRITE * per_record)
            out = memoryview(self._out)
            view = memoryview(view)
            try:
                while view:
                    consumed, written = self._conn.seal_data_into(
                        view, out, max_record=self._max_record
                    )
                    view = view[consumed:]
                    try:
                        await self._send_transport(out[:written], fair)
                    except BaseException as exc:
                        # Records were sealed (counters advanced) but maybe not all sent: the
                        # stream continues only if the writer kept the rest (a cancellation on
                        # a socket); what was not sealed yet is simply not sent.
                        self._send_broken = self._broken_by(exc)
                        raise
            finally:
                out.release()
        finally:
            self._sending = False

    async def _send_transport(self, data: bytes | memoryview, fair: bool = True) -> None:
        """Write all of ``data`` to the transport (the caller checked for cancellation).

        On a trio socket through :class:`~transport._sockwrite.SocketWriter`: one scheduler
        pass (none if ``fair`` is False), and a cancellation while the socket is full keeps the
        sealed rest for the next write instead of breaking the record stream.
        """
        writer = self._writer
        if writer is None:
            await self.transport_stream.send_all(data)
        else:
            await writer.send_all(data, fair=fair)

    @property
    def resumes_sends(self) -> bool:
        """True if a cancelled send leaves the channel usable (on a socket; see
        :meth:`flush`), False if it breaks it (any other transport)."""
        return self._writer is not None

    def _broken_by(self, exc: BaseException) -> bool:
        """Whether a send that raised ``exc`` left the record stream unusable: yes, unless it
        was cancelled with its sealed bytes kept by the writer (they go out first next time)."""
        return self._writer is None or not isinstance(exc, trio.Cancelled)

    async def _finish_cancelled_send(self) -> None:
        """Write what a cancelled send kept *before* sealing anything new: a caller that keeps
        retrying with short deadlines against a peer that does not read then holds at most one
        write's records (``_RECORDS_PER_WRITE``), not one more batch per attempt."""
        assert self._writer is not None
        try:
            await self._writer.flush()
        except BaseException as exc:
            self._send_broken = self._broken_by(exc)
            raise

    async def flush(self) -> None:
        """Write what a cancelled ``send_all``/``send_eof`` left unwritten (records it had
        sealed); only a checkpoint if nothing is left. The next ``send_all`` does it too.

        Raises:
            as :meth:`send_all`.
        """
        if self._sending:
            raise trio.BusyResourceError(_BUSY_SENDING)
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the channel is closed")
            if self._send_broken:
                raise trio.BrokenResourceError("the channel is broken")
            if self._writer is None or not self._writer.unsent:
                await trio.lowlevel.checkpoint()
                return
            await trio.lowlevel.checkpoint_if_cancelled()
            await self._finish_cancelled_send()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Send the authenticated close record; idempotent. Receiving stays possible."""
        if self._sending:
            raise trio.BusyResourceError(_BUSY_SENDING)
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the channel is closed")
            if self._send_broken:
                raise trio.BrokenResourceError("the channel is broken")
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._writer is not None and self._writer.unsent and not self._conn.our_closed:
                await self._finish_cancelled_send()
            if self._conn.our_closed:
                # Idempotent, but a close record a cancelled send_eof left half written still
                # has to go out (the writer sends it; nothing else to send).
                record = b""
                if self._writer is None or not self._writer.unsent:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return
            else:
                record = self._conn.send(Close())
            try:
                await self._send_transport(record)
            except BaseException as exc:
                self._send_broken = self._broken_by(exc)
                raise
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the transport might accept more data."""
        if self._sending:
            raise trio.BusyResourceError(_BUSY_SENDING)
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the channel is closed")
            await self.transport_stream.wait_send_all_might_not_block()
        finally:
            self._sending = False

    # ------------------------------------------------------------------ receive side
    @staticmethod
    def _check_max_bytes(max_bytes: int) -> int:
        max_bytes = operator.index(max_bytes)
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        return max_bytes

    def _check_receive(self, max_bytes: int | None) -> int | None:
        if max_bytes is not None:
            max_bytes = self._check_max_bytes(max_bytes)
        if self._closed:
            raise trio.ClosedResourceError("the channel is closed")
        if self._recv_failed:
            raise _StreamAuthenticationFailed("the channel failed earlier")
        return max_bytes

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Return up to ``max_bytes`` decrypted bytes (at most one record's worth if None);
        ``b""`` once the peer's authenticated close arrived.

        Every complete record available is decrypted per wake-up; their plaintexts are handed
        out without a further copy.

        Raises:
            AuthenticationFailed: a record failed authentication, the transport ended
                without a close record, or the peer broke the protocol. The channel stays failed.
            trio.BusyResourceError: another task is in ``receive_some``/``receive_into``.
            trio.ClosedResourceError: after ``aclose``.
        """
        if self._receiving:
            raise trio.BusyResourceError(_BUSY_RECEIVING)
        self._receiving = True
        try:
            if max_bytes is not None:
                max_bytes = self._check_max_bytes(max_bytes)
            if self._closed:
                raise trio.ClosedResourceError("the channel is closed")
            if self._recv_failed:
                raise _StreamAuthenticationFailed("the channel failed earlier")
            pending = self._pending
            if pending or self._peer_eof:
                await trio.lowlevel.checkpoint()
            else:
                await self._fill()
            if not pending:
                return b""
            data = pending[0]
            if max_bytes is None or len(data) <= max_bytes:
                pending.popleft()
                return data if type(data) is bytes else bytes(data)
            view = memoryview(data)
            pending[0] = view[max_bytes:]
            return bytes(view[:max_bytes])
        finally:
            self._receiving = False

    async def receive_into(self, buffer: bytearray | memoryview) -> int:
        """Decrypt straight into ``buffer`` (no allocation); return the bytes written, 0 at
        the peer's close. Every complete record that fits is decrypted per wake-up.

        For bulk consumers; ``buffer`` should hold at least ``MAX_RECORD_PLAINTEXT`` bytes
        (smaller buffers work, through an intermediate copy). Raises as :meth:`receive_some`.
        """
        out = memoryview(buffer).cast("B")
        if not out:
            raise ValueError("buffer must not be empty")
        if self._pending or len(out) < MAX_RECORD_PLAINTEXT:
            data = await self.receive_some(len(out))
            out[: len(data)] = data
            return len(data)
        if self._receiving:
            raise trio.BusyResourceError(_BUSY_RECEIVING)
        self._receiving = True
        try:
            self._check_receive(None)
            conn = self._conn
            awaited = False
            while True:
                try:
                    n = conn.read_into(out)
                except AuthenticationFailed as exc:
                    self._recv_failed = True
                    raise _failed(self._role, exc.reason) from None
                if n or conn.their_closed:
                    self._peer_eof = conn.their_closed
                    if not awaited:
                        await trio.lowlevel.checkpoint()
                    return n
                awaited = True
                await self._receive_transport()
        finally:
            self._receiving = False

    async def _fill(self) -> None:
        """Receive until at least one record decrypted or the peer closed; always checkpoints.

        Records that authenticated before a bad one are delivered first; the failure is
        raised on the following call (the core stays failed).
        """
        conn = self._conn
        pending = self._pending
        awaited = False
        if not conn.buffered:  # nothing to decrypt yet: go straight to the transport
            awaited = True
            await self._receive_transport()
        while True:
            try:
                self._peer_eof = conn.read_records(pending)
            except AuthenticationFailed as exc:
                if not pending:
                    self._recv_failed = True
                    raise _failed(self._role, exc.reason) from None
            if pending or self._peer_eof:
                if not awaited:
                    await trio.lowlevel.checkpoint()
                return
            awaited = True
            await self._receive_transport()

    async def _receive_transport(self) -> None:
        """One read from the transport into the core (``recv_into`` its buffer on sockets).

        A cancel point, then one schedule point: after a read that succeeded at once, or the
        wait for readability (trio's wrapper would add a second pass after that wait). Nothing
        is consumed before the wait, so a cancelled read loses nothing. A transport that breaks
        before the peer's close record is a truncation.
        """
        conn = self._conn
        try:
            raw = self._raw
            if raw is None:
                conn.receive_data(await self.transport_stream.receive_some(_RECEIVE_SIZE))
                return
            await trio.lowlevel.checkpoint_if_cancelled()
            buf = conn.receive_buffer()
            try:
                try:
                    got = raw.recv_into(buf)
                except BlockingIOError:
                    while True:
                        await trio.lowlevel.wait_readable(raw)
                        try:
                            got = raw.recv_into(buf)
                            break
                        except BlockingIOError:
                            pass
                else:
                    await trio.lowlevel.cancel_shielded_checkpoint()
            finally:
                buf.release()
        except OSError as exc:  # raw socket errors (SocketStream would map these itself)
            if self._closed:
                raise trio.ClosedResourceError("the channel was closed") from None
            self._recv_failed = True
            raise _failed(
                self._role, f"transport failed before the close record: {exc!r}"
            ) from None
        except trio.BrokenResourceError as exc:
            self._recv_failed = True
            raise _failed(self._role, f"transport broke before the close record: {exc!r}") from None
        conn.commit_received(got)

    # ------------------------------------------------------------------ closing
    async def aclose(self) -> None:
        """Send the close record (bounded by ``CLOSE_TIMEOUT_S``) if possible, then close the
        transport. Idempotent; a cancelled ``aclose`` still closes (without the record)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if not (self._sending or self._send_broken or self._recv_failed):
                record = b""
                if not self._conn.our_closed:
                    try:
                        record = self._conn.send(Close())
                    except LocalProtocolError:
                        pass
                unsent = self._writer is not None and self._writer.unsent
                if record or unsent:
                    with trio.move_on_after(CLOSE_TIMEOUT_S):
                        # A cancelled aclose sends nothing (the writer's first try is no
                        # cancel point): a forceful close is a truncation for the peer.
                        await trio.lowlevel.checkpoint_if_cancelled()
                        try:
                            # (what a cancelled send left goes first: the writer keeps order)
                            await self._send_transport(record, False)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
        finally:
            await self.transport_stream.aclose()

    def statistics(self) -> ChannelStatistics:
        """An immutable snapshot of counters for diagnostics (no secrets)."""
        return ChannelStatistics(
            suite=self.suite.name,
            records_sent=self._conn.records_sent,
            records_received=self._conn.records_received,
            data_records_left=self._conn.data_records_left,
            bytes_buffered=self._conn.buffered + sum(map(len, self._pending)),
            bytes_unsent=0 if self._writer is None else self._writer.unsent,
        )


class _TransportEnded(Exception):
    """The transport ended or broke during the handshake (internal; mapped by the callers)."""

    def __init__(self, received: int, detail: str) -> None:
        super().__init__(detail)
        self.received = received  # bytes the peer had sent until then


class _Handshake:
    """The handshake's I/O: loop ``next_event`` / ``receive_some``, counting what arrived."""

    def __init__(self, stream: trio.abc.Stream, conn: ChannelConnection) -> None:
        self.stream = stream
        self.conn = conn
        self.received = 0

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _TransportEnded(self.received, f"sending failed: {exc!r}") from None

    async def next(self) -> ChannelEstablished | AttestationRequest:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                try:
                    data = await self.stream.receive_some(MAX_FRAME_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise _TransportEnded(self.received, f"receiving failed: {exc!r}") from None
                if not data:
                    raise _TransportEnded(self.received, "the transport ended")
                self.received += len(data)
                conn.receive_data(data)
                continue
            if isinstance(event, ChannelEstablished | AttestationRequest):
                return event
            raise AuthenticationFailed(
                f"unexpected event {type(event).__name__} during the handshake"
            )


async def _fail_handshake(stream: trio.abc.Stream) -> None:
    await trio.aclose_forcefully(stream)


async def connect_channel(
    stream: trio.abc.Stream,
    *,
    verifier: DocumentVerifier,
    attester: Attester | None = None,
    suites: Sequence[Suite] = (Suite.X25519,),
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    max_record_size: int = MAX_RECORD_PLAINTEXT,
    max_records: int = DEFAULT_MAX_RECORDS,
) -> SecureChannel:
    """Client side: open ``enclave-channel/1`` over ``stream`` to an attested enclave.

    The enclave's document is fully checked by ``verifier`` before anything secret is sent.

    Args:
        stream: a connected transport (vsock, Unix socket, TCP ingress...). Owned by the
            returned channel; closed if the handshake fails.
        verifier: verifies the document (chain, signature, PCR policy, debug rule, age, nonce).
        attester: this client's own NSM (an enclave calling another enclave), used only if the
            enclave asks the client to attest (mutual mode, PROTOCOL.md §3.4). Without one, a
            handshake with such an enclave fails with :class:`AuthenticationFailed`.
        suites: suites offered, preferred first.
        handshake_timeout: seconds for the whole handshake.
        max_record_size: plaintext bytes per record this side sends (≤ 64 KiB).
        max_records: records per key and direction (tests inject small values).

    Raises:
        AuthenticationFailed: the document was rejected or the enclave's handshake messages
            were malformed: a verification or integrity failure; in mutual mode also: this
            client has no attester, or the enclave closed the connection instead of accepting
            this client's document (its policy refused it). The reason is logged, not raised
            (``exc.reason`` holds it for the caller's own log).
        PeerUnreachable: the transport ended, broke or was reset before the enclave sent a
            single byte: nothing answered (a relay such as the ingress accepted the
            connection but could not reach the enclave, or nothing listens behind it).
        ChannelClosed: the transport ended or broke later in the handshake.
        PeerTimeout: the handshake did not complete within ``handshake_timeout``.
    """
    conn = ClientConnection(verifier=verifier, suites=suites, max_records=max_records)
    io = _Handshake(stream, conn)
    started = time.perf_counter()
    try:
        with trio.fail_after(handshake_timeout):
            await io.send(conn.send(Hello()))
            event = await io.next()
            if isinstance(event, AttestationRequest):  # mutual: the enclave wants ours too
                if attester is None:
                    raise AuthenticationFailed(
                        "the enclave requires the client to attest and this client has no "
                        "attester (NSM)"
                    )
                document = await attester(
                    nonce=event.nonce, public_key=event.public_key, user_data=event.user_data
                )
                await io.send(conn.send(Attestation(document)))
                event = await io.next()
            else:
                await io.send(conn.data_to_send())
            assert isinstance(event, ChannelEstablished)
    except AuthenticationFailed as exc:
        await _fail_handshake(stream)
        raise _failed("client", exc.reason) from None
    except trio.TooSlowError:
        await _fail_handshake(stream)
        log.warning("channel_handshake_timeout", role="client", received=io.received)
        raise PeerTimeout(
            f"the enclave did not complete the handshake within {handshake_timeout} s"
        ) from None
    except _TransportEnded as exc:
        await _fail_handshake(stream)
        if conn.state is State.CLIENT_WAIT_ACCEPT:
            # The enclave got our document and closed instead of accepting it: its policy
            # refused us (PROTOCOL.md §3.4; silent on the wire, like every rejection).
            raise _failed(
                "client",
                "the enclave closed the connection instead of accepting this client's "
                f"attestation (refused by its policy, or gone): {exc}",
            ) from None
        if exc.received == 0:
            log.warning("channel_peer_unreachable", role="client", detail=str(exc))
            raise PeerUnreachable(
                "enclave unreachable: the connection closed before the enclave answered"
            ) from None
        log.warning("channel_handshake_interrupted", role="client", detail=str(exc))
        raise ChannelClosed("the connection closed during the channel handshake") from None
    except BaseException:
        await _fail_handshake(stream)
        raise
    peer = event.peer
    log.info(
        "channel_established",
        role="client",
        suite=event.suite.name,
        module_id=peer.module_id if peer else None,
        mutual=conn.mutual,
        handshake_ms=round((time.perf_counter() - started) * 1e3, 3),
    )
    return SecureChannel(
        stream, conn, peer=peer, suite=event.suite, max_record_size=max_record_size
    )


async def accept_channel(
    stream: trio.abc.Stream,
    *,
    attester: Attester,
    peer_verifier: DocumentVerifier | None = None,
    suites: Sequence[Suite] = (Suite.MLKEM768_X25519, Suite.X25519),
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    max_record_size: int = MAX_RECORD_PLAINTEXT,
    max_records: int = DEFAULT_MAX_RECORDS,
) -> SecureChannel:
    """Enclave side: answer a client's ``enclave-channel/1`` handshake on ``stream``.

    A fresh ephemeral HPKE key is generated per handshake and attested through ``attester``
    (the NSM), bound to the client's hello.

    Args:
        stream: the accepted transport; owned by the returned channel, closed on failure.
        attester: obtains the attestation document (``attest.channel.nsm_attester``).
        peer_verifier: mutual mode: the client must attest too, and its document must pass
            this verifier (root, chain, signature, the caller policy with its debug rule, age,
            and this handshake's nonce) before the channel opens; the verified client is
            ``channel.peer``. A client without an NSM, a debug client the policy does not
            allow, or a document from another handshake fail with
            :class:`AuthenticationFailed`. None: one-sided (the client stays anonymous).
        suites: suites accepted, in order of preference.
        handshake_timeout, max_record_size, max_records: as for :func:`connect_channel`.
            ``handshake_timeout`` bounds how long a client that connects and says nothing
            (or stalls half-way) holds the connection.

    Raises:
        AuthenticationFailed: the client's messages were malformed, its sealed secret did
            not open, or (mutual mode) its attestation document was refused.
        ChannelClosed: the client closed or broke the connection during the handshake.
        PeerTimeout: the handshake did not complete within ``handshake_timeout``.
        Exception: whatever ``attester`` raises (a local failure) propagates unchanged.
    """
    conn = ServerConnection(suites=suites, max_records=max_records, peer_verifier=peer_verifier)
    io = _Handshake(stream, conn)
    started = time.perf_counter()
    try:
        with trio.fail_after(handshake_timeout):
            request = await io.next()
            assert isinstance(request, AttestationRequest)
            document = await attester(
                nonce=request.nonce, public_key=request.public_key, user_data=request.user_data
            )
            await io.send(conn.send(Attestation(document)))
            event = await io.next()
            assert isinstance(event, ChannelEstablished)
            accepted = conn.data_to_send()  # mutual mode: the ACCEPTED record
            if accepted:
                await io.send(accepted)
    except AuthenticationFailed as exc:
        await _fail_handshake(stream)
        raise _failed("server", exc.reason) from None
    except trio.TooSlowError:
        await _fail_handshake(stream)
        log.info("channel_handshake_timeout", role="server", received=io.received)
        raise PeerTimeout(
            f"the client did not complete the handshake within {handshake_timeout} s"
        ) from None
    except _TransportEnded as exc:
        await _fail_handshake(stream)
        log.info("channel_handshake_interrupted", role="server", detail=str(exc))
        raise ChannelClosed("the client closed the connection during the handshake") from None
    except BaseException:
        await _fail_handshake(stream)
        raise
    peer = event.peer
    log.info(
        "channel_established",
        role="server",
        suite=event.suite.name,
        mutual=conn.mutual,
        peer_module_id=peer.module_id if peer else None,
        handshake_ms=round((time.perf_counter() - started) * 1e3, 3),
    )
    return SecureChannel(
        stream, conn, peer=peer, suite=event.suite, max_record_size=max_record_size
    )
