"""Sans-IO core of ``enclave-channel/1``: framing, handshake state machine, records.

Theory of operation (h11 style; the wire format is specified in ``transport/PROTOCOL.md``):

* Bytes in: :meth:`ChannelConnection.receive_data` (``b""`` marks the transport's EOF), then
  :meth:`~ChannelConnection.next_event` until it returns :data:`NEED_DATA`. Bytes out:
  :meth:`~ChannelConnection.send` returns the bytes for an event, and
  :meth:`~ChannelConnection.data_to_send` returns what the core produced on its own (the
  client's key message, emitted once the attestation document verified).
* The client core calls the injected :class:`DocumentVerifier` itself, before it produces
  anything secret, so no adapter can skip it. The enclave's :class:`Attester` is async, so the
  server core instead returns an :class:`AttestationRequest` event and waits for
  ``send(Attestation(document))``.
* **Mutual mode** (PROTOCOL.md §3.4): a server core given a ``peer_verifier`` sends
  MUTUAL_ATTESTATION instead of ATTESTATION. The client core then verifies as usual, seals the
  secret, and returns an :class:`AttestationRequest` of its own (nonce = SHA-384 of HELLO ‖
  MUTUAL_ATTESTATION ‖ KEY); ``send(Attestation(document))`` returns KEY ‖ CLIENT_ATTESTATION.
  The server core verifies the client's document with ``peer_verifier`` before it opens the
  secret, then queues an ACCEPTED record (``data_to_send``); the client is established only
  once that record authenticates.
* Every failure caused by the peer's bytes raises
  :class:`~transport.errors.AuthenticationFailed`, whose message says nothing, with the detailed
  ``reason`` as an attribute for the adapter to log. The core then stays in ``ERROR``. Misuse of
  the API raises :class:`~transport.errors.LocalProtocolError`.
* Every length read from the peer is checked against a per-state bound as soon as the 5-byte
  header is in, before any body is buffered or processed.
* Fast paths for the adapter: :meth:`~ChannelConnection.seal_record` (one small message, one
  record), :meth:`~ChannelConnection.seal_data_into` (many records into a preallocated buffer),
  :meth:`~ChannelConnection.read_records` (every complete record opened, one plaintext object
  per record), :meth:`~ChannelConnection.read_into` (every complete record decrypted into a
  caller's preallocated buffer) and :meth:`~ChannelConnection.receive_buffer` /
  :meth:`~ChannelConnection.commit_received` (``recv_into`` straight into the core's buffer).
  They share the state checks and counters of the event API and can be mixed with it.

The core never logs, never sleeps and never does I/O.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from transport.channel._record import (
    DEFAULT_MAX_RECORDS,
    HEADER,
    HEADER_SIZE,
    HPKE_INFO_PREFIX,
    MAX_RECORD_PLAINTEXT,
    TAG_SIZE,
    EphemeralKey,
    FrameType,
    InvalidTag,
    RecordOpener,
    RecordSealer,
    derive_traffic_keys,
    public_key_binding,
    public_key_size,
    seal_channel_secret,
    sealed_secret_size,
)
from transport.channel._types import DocumentVerifier, PeerAttestation, Suite
from transport.errors import AuthenticationFailed, LocalProtocolError
from transport.sansio import NEED_DATA

__all__ = [
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "NONCE_SIZE",
    "MAX_DOCUMENT_SIZE",
    "MAX_FRAME_SIZE",
    "USER_DATA_PREFIX",
    "CLIENT_USER_DATA_PREFIX",
    "NEED_DATA",
    "Role",
    "State",
    "Event",
    "Hello",
    "AttestationRequest",
    "Attestation",
    "ChannelEstablished",
    "Data",
    "Close",
    "ChannelConnection",
    "ClientConnection",
    "ServerConnection",
]

PROTOCOL_NAME: Final = "enclave-channel/1"
#: Version number carried in the hello.
PROTOCOL_VERSION: Final = 1
#: Client hello nonce (bytes): 256 bits of freshness.
NONCE_SIZE: Final = 32
#: Most suite ids a hello may list; more is a malformed hello.
MAX_SUITES: Final = 16
_HELLO_FIXED: Final = struct.Struct("!H32sB")  # version, nonce, suite count
_MAX_HELLO_BODY: Final = _HELLO_FIXED.size + MAX_SUITES  # 51 bytes
#: Largest attestation document accepted (bytes). Nitro documents are ~4.5 KiB with a 4-deep
#: cabundle; 16 KiB leaves room for user data, longer chains and the NSM's 1 KiB public_key.
MAX_DOCUMENT_SIZE: Final = 16 * 1024
_MAX_PUBLIC_KEY: Final = 1216  # the hybrid key; X25519's is 32
_ATT_KEY: Final = struct.Struct("!BH")  # suite, public key length
_ATT_DOC: Final = struct.Struct("!I")  # document length
_MAX_ATTESTATION_BODY: Final = _ATT_KEY.size + _MAX_PUBLIC_KEY + _ATT_DOC.size + MAX_DOCUMENT_SIZE
#: Largest encrypted record on the wire (bytes), header included.
MAX_FRAME_SIZE: Final = HEADER_SIZE + MAX_RECORD_PLAINTEXT + TAG_SIZE
#: ``user_data`` the enclave puts in its document: this prefix then the chosen suite's id byte.
USER_DATA_PREFIX: Final = b"enclave-channel/1 suite "
#: ``user_data`` of the client's document in mutual mode: this prefix then the suite's id byte.
#: Another prefix than the enclave's, so neither document can stand for the other.
CLIENT_USER_DATA_PREFIX: Final = b"enclave-channel/1 client suite "
#: Receive buffer (bytes): starts at 16 KiB (a handshake, small messages) and grows under bulk
#: traffic to four full records, so one ``recv_into`` can bring several.
_RECEIVE_BUFFER_INITIAL: Final = 16 * 1024
_RECEIVE_BUFFER_MAX: Final = 4 * MAX_FRAME_SIZE
#: Free space ensured for each ``recv_into`` (bytes).
_RECEIVE_MIN_FREE: Final = 4 * 1024


_UNPACK_HEADER: Final = HEADER.unpack_from
_DATA: Final = int(FrameType.DATA)
_CLOSE: Final = int(FrameType.CLOSE)
_MIN_DATA_BODY: Final = TAG_SIZE + 1  # data records carry at least one byte
_MAX_DATA_BODY: Final = MAX_RECORD_PLAINTEXT + TAG_SIZE
#: Records up to this body size are opened from copies (bytes): cheaper than memoryviews.
_COPY_BELOW: Final = 2048
#: Marker returned by _read_record for the close record.
_CLOSED: Final = b"<close>"


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Connection states. Handshake states are per role; after it, ``OPEN`` then half-closes."""

    CLIENT_START = "client_start"
    CLIENT_WAIT_ATTESTATION = "client_wait_attestation"
    CLIENT_ATTESTING = "client_attesting"  # mutual: AttestationRequest emitted, KEY held back
    CLIENT_WAIT_ACCEPT = "client_wait_accept"  # mutual: KEY and document sent
    SERVER_WAIT_HELLO = "server_wait_hello"
    SERVER_ATTESTING = "server_attesting"  # AttestationRequest emitted, document not yet sent
    SERVER_WAIT_KEY = "server_wait_key"
    SERVER_WAIT_MUTUAL_KEY = "server_wait_mutual_key"  # mutual: MUTUAL_ATTESTATION sent
    SERVER_WAIT_CLIENT_ATTESTATION = "server_wait_client_attestation"  # mutual: KEY held
    OPEN = "open"
    SEND_CLOSED = "send_closed"  # we sent close; the peer may still send
    RECV_CLOSED = "recv_closed"  # the peer closed; we may still send
    CLOSED = "closed"
    ERROR = "error"


class _Input(enum.Enum):
    SEND_HELLO = enum.auto()
    RECV_HELLO = enum.auto()
    SEND_ATTESTATION = enum.auto()
    SEND_MUTUAL_ATTESTATION = enum.auto()
    RECV_ATTESTATION = enum.auto()
    RECV_MUTUAL_ATTESTATION = enum.auto()
    RECV_KEY = enum.auto()
    RECV_CLIENT_ATTESTATION = enum.auto()
    RECV_ACCEPTED = enum.auto()
    SEND_DATA = enum.auto()
    RECV_DATA = enum.auto()
    SEND_CLOSE = enum.auto()
    RECV_CLOSE = enum.auto()


#: The state machine. Anything not in this table is an error: a ``SEND_*`` raises
#: LocalProtocolError (state unchanged), a ``RECV_*`` rejects the peer (state -> ERROR).
_TRANSITIONS: Final[dict[tuple[State, _Input], State]] = {
    (State.CLIENT_START, _Input.SEND_HELLO): State.CLIENT_WAIT_ATTESTATION,
    (State.CLIENT_WAIT_ATTESTATION, _Input.RECV_ATTESTATION): State.OPEN,
    (State.CLIENT_WAIT_ATTESTATION, _Input.RECV_MUTUAL_ATTESTATION): State.CLIENT_ATTESTING,
    (State.CLIENT_ATTESTING, _Input.SEND_ATTESTATION): State.CLIENT_WAIT_ACCEPT,
    (State.CLIENT_WAIT_ACCEPT, _Input.RECV_ACCEPTED): State.OPEN,
    (State.SERVER_WAIT_HELLO, _Input.RECV_HELLO): State.SERVER_ATTESTING,
    (State.SERVER_ATTESTING, _Input.SEND_ATTESTATION): State.SERVER_WAIT_KEY,
    (State.SERVER_ATTESTING, _Input.SEND_MUTUAL_ATTESTATION): State.SERVER_WAIT_MUTUAL_KEY,
    (State.SERVER_WAIT_KEY, _Input.RECV_KEY): State.OPEN,
    (State.SERVER_WAIT_MUTUAL_KEY, _Input.RECV_KEY): State.SERVER_WAIT_CLIENT_ATTESTATION,
    (State.SERVER_WAIT_CLIENT_ATTESTATION, _Input.RECV_CLIENT_ATTESTATION): State.OPEN,
    (State.OPEN, _Input.SEND_DATA): State.OPEN,
    (State.OPEN, _Input.RECV_DATA): State.OPEN,
    (State.OPEN, _Input.SEND_CLOSE): State.SEND_CLOSED,
    (State.OPEN, _Input.RECV_CLOSE): State.RECV_CLOSED,
    (State.SEND_CLOSED, _Input.RECV_DATA): State.SEND_CLOSED,
    (State.SEND_CLOSED, _Input.RECV_CLOSE): State.CLOSED,
    (State.RECV_CLOSED, _Input.SEND_DATA): State.RECV_CLOSED,
    (State.RECV_CLOSED, _Input.SEND_CLOSE): State.CLOSED,
}

#: States in which data may be sent / records received (RECV_DATA is a self-loop in each).
_SEND_DATA_STATES: Final = frozenset(st for (st, inp) in _TRANSITIONS if inp is _Input.SEND_DATA)
_RECV_RECORD_STATES: Final = frozenset(st for (st, inp) in _TRANSITIONS if inp is _Input.RECV_DATA)
assert all(_TRANSITIONS[(st, _Input.RECV_DATA)] is st for st in _RECV_RECORD_STATES)

#: Which frame types may arrive in each state, and their (min, max) body lengths in bytes.
_RECORD_BOUNDS: Final = (TAG_SIZE + 1, MAX_RECORD_PLAINTEXT + TAG_SIZE)
_RECEIVABLE: Final[dict[State, dict[FrameType, tuple[int, int]]]] = {
    State.SERVER_WAIT_HELLO: {FrameType.HELLO: (_HELLO_FIXED.size + 1, _MAX_HELLO_BODY)},
    State.CLIENT_WAIT_ATTESTATION: {
        FrameType.ATTESTATION: (_ATT_KEY.size + 32 + _ATT_DOC.size, _MAX_ATTESTATION_BODY),
        FrameType.MUTUAL_ATTESTATION: (_ATT_KEY.size + 32 + _ATT_DOC.size, _MAX_ATTESTATION_BODY),
    },
    State.CLIENT_WAIT_ACCEPT: {FrameType.ACCEPTED: (TAG_SIZE, TAG_SIZE)},
    State.SERVER_WAIT_CLIENT_ATTESTATION: {FrameType.CLIENT_ATTESTATION: (1, MAX_DOCUMENT_SIZE)},
    # SERVER_WAIT_KEY / SERVER_WAIT_MUTUAL_KEY: the exact size depends on the suite; see
    # _frame_bounds.
    State.OPEN: {FrameType.DATA: _RECORD_BOUNDS, FrameType.CLOSE: (TAG_SIZE, TAG_SIZE)},
    State.SEND_CLOSED: {FrameType.DATA: _RECORD_BOUNDS, FrameType.CLOSE: (TAG_SIZE, TAG_SIZE)},
}


class Event:
    """Base class of channel events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """Client → enclave: start the handshake (the core picks the nonce; public APIs never do)."""


@dataclass(frozen=True, slots=True)
class AttestationRequest(Event):
    """Ask the NSM for a document binding exactly these values (the server always; the client
    in mutual mode), then ``send(Attestation(document))``.

    Attributes:
        nonce: server: SHA-384 of the exact hello frame; client (mutual): SHA-384 of the hello,
            mutual attestation and key frames. Either binds this handshake.
        public_key: what the document's ``public_key`` must hold: the enclave's ephemeral key
            binding (raw X25519 key, or SHA-384 of the hybrid key), on both sides.
        user_data: :data:`USER_DATA_PREFIX` (server) or :data:`CLIENT_USER_DATA_PREFIX`
            (client), followed by the chosen suite's id.
    """

    nonce: bytes
    public_key: bytes
    user_data: bytes


@dataclass(frozen=True, slots=True)
class Attestation(Event):
    """The attestation document answering an :class:`AttestationRequest` (either side)."""

    document: bytes


@dataclass(frozen=True, slots=True)
class ChannelEstablished(Event):
    """The handshake completed; records can flow. ``peer`` is the verified attestation of the
    other end: always on the client side, on the server side in mutual mode (else None)."""

    suite: Suite
    peer: PeerAttestation | None


@dataclass(frozen=True, slots=True)
class Data(Event):
    """Application bytes (one record's plaintext when received)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close(Event):
    """Authenticated end of one direction (received: the peer will send nothing more)."""


class _ReceiveBuffer:
    """Received bytes with read/write offsets; compacts in place instead of reallocating.

    It starts small (idle connections stay cheap) and grows by 4x, up to ``max_capacity``, each
    time a ``recv_into`` fills all its free space (bulk traffic: a bigger read would have brought
    more). Growth replaces the bytearray rather than resizing it, so a lingering view of the old
    one can never block it.
    """

    __slots__ = ("_buf", "_grow", "_max", "_r", "_w")

    def __init__(self, capacity: int, max_capacity: int) -> None:
        self._buf = bytearray(capacity)
        self._max = max_capacity
        self._grow = False
        self._r = 0
        self._w = 0

    def __len__(self) -> int:
        return self._w - self._r

    @property
    def start(self) -> int:
        return self._r

    @property
    def raw(self) -> bytearray:
        return self._buf

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def consume(self, n: int) -> None:
        self._r += n
        if self._r == self._w:
            self._r = self._w = 0

    def _compact(self) -> None:
        if self._r:
            n = self._w - self._r
            view = memoryview(self._buf)
            view[:n] = view[self._r : self._w]
            view.release()
            self._r, self._w = 0, n

    def _reallocate(self, capacity: int) -> None:
        old, held = self._buf, self._w
        self._buf = bytearray(capacity)
        self._buf[:held] = old[:held]

    def append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if self._w + n > len(self._buf):
            self._compact()
            if self._w + n > len(self._buf):
                # The caller fed a chunk larger than the buffer: the caller controls that size
                # (the generic path), not the peer.
                self._reallocate(self._w + n)
        self._buf[self._w : self._w + n] = data
        self._w += n

    def writable(self, min_free: int) -> memoryview:
        if self._grow or len(self._buf) - self._w < min_free:
            self._compact()
            capacity = len(self._buf)
            if self._grow and capacity < self._max:
                capacity = min(self._max, 4 * capacity)
            capacity = max(capacity, self._w + min_free)
            if capacity != len(self._buf):
                self._reallocate(capacity)
            self._grow = False
        return memoryview(self._buf)[self._w :]

    def commit(self, n: int) -> None:
        free = len(self._buf) - self._w
        if not 0 <= n <= free:
            raise ValueError("committed more bytes than the buffer holds")
        self._grow = n == free
        self._w += n


class ChannelConnection:
    """State shared by both roles; use :class:`ClientConnection` or :class:`ServerConnection`."""

    role: Role

    def __init__(
        self,
        *,
        initial: State,
        suites: Sequence[Suite],
        max_records: int,
        random: Callable[[int], bytes],
    ) -> None:
        suites = tuple(suites)
        if not suites or not all(isinstance(s, Suite) for s in suites):
            raise ValueError("suites must be a non-empty sequence of Suite")
        if len(set(suites)) != len(suites):
            raise ValueError("suites must not repeat")
        if not 2 <= max_records <= DEFAULT_MAX_RECORDS:
            raise ValueError(f"max_records must be in [2, {DEFAULT_MAX_RECORDS}]")
        self._set_state(initial)
        self._suites = suites
        self._suite: Suite | None = None
        self._max_records = max_records
        self._random = random
        self._buf = _ReceiveBuffer(_RECEIVE_BUFFER_INITIAL, _RECEIVE_BUFFER_MAX)
        self._eof = False
        self._out = bytearray()
        self._transcript = hashlib.sha256()
        self._hello_hash = b""
        self._sealer: RecordSealer | None = None
        self._opener: RecordOpener | None = None
        self._failure: str | None = None

    # ----------------------------------------------------------------- state
    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._state

    @property
    def suite(self) -> Suite | None:
        """The negotiated suite (None before it is chosen)."""
        return self._suite

    @property
    def their_closed(self) -> bool:
        """True once the peer's authenticated close has been received."""
        return self._state in (State.RECV_CLOSED, State.CLOSED)

    @property
    def our_closed(self) -> bool:
        """True once this side has sent its close record."""
        return self._state in (State.SEND_CLOSED, State.CLOSED)

    @property
    def data_records_left(self) -> int:
        """Data records this side may still send under its key (0 before the handshake)."""
        return self._sealer.data_records_left if self._sealer else 0

    @property
    def buffered(self) -> int:
        """Received bytes not yet processed."""
        buf = self._buf
        return buf._w - buf._r  # not len(): this sits on the per-message path

    @property
    def records_sent(self) -> int:
        """Records sealed under the current send key (0 before the handshake)."""
        return self._sealer.seq if self._sealer else 0

    @property
    def records_received(self) -> int:
        """Records opened under the current receive key (0 before the handshake)."""
        return self._opener.seq if self._opener else 0

    def _transition(self, inp: _Input) -> None:
        new = _TRANSITIONS.get((self._state, inp))
        if new is None:
            if inp.name.startswith("SEND"):
                raise LocalProtocolError(f"cannot {inp.name.lower()} in state {self._state.name}")
            raise AuthenticationFailed(f"unexpected {inp.name.lower()} in state {self._state.name}")
        self._set_state(new)

    def _set_state(self, new: State) -> None:
        self._state = new
        # Cached from the table for the per-record hot paths (enum hashing is slow in Python).
        self._can_send_data = new in _SEND_DATA_STATES
        self._reads_records = new in _RECV_RECORD_STATES

    def _reject(self, reason: str) -> AuthenticationFailed:
        return AuthenticationFailed(reason)

    # ----------------------------------------------------------------- input
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the transport; ``b""`` means the transport reached EOF."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        self._buf.append(data)

    def receive_buffer(self, min_free: int = _RECEIVE_MIN_FREE) -> memoryview:
        """A writable view of the receive buffer's free space (for ``recv_into``), at least
        ``min_free`` bytes; it grows while reads keep filling it.

        Pass the number of bytes written to :meth:`commit_received`; don't keep the view.
        """
        return self._buf.writable(min_free)

    def commit_received(self, n: int) -> None:
        """Account ``n`` bytes written into :meth:`receive_buffer`; ``0`` means EOF."""
        if n == 0:
            self._eof = True
        elif self._eof:
            raise LocalProtocolError("receive_data after EOF")
        else:
            self._buf.commit(n)

    def data_to_send(self) -> bytes:
        """Bytes the core produced by itself (the client's key message); empty if none."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _frame_bounds(self, ftype: int) -> tuple[int, int] | None:
        if self._state in (State.SERVER_WAIT_KEY, State.SERVER_WAIT_MUTUAL_KEY):
            if ftype != FrameType.KEY or self._suite is None:
                return None
            size = sealed_secret_size(self._suite)
            return (size, size)
        allowed = _RECEIVABLE.get(self._state)
        if allowed is None:
            return None
        try:
            return allowed.get(FrameType(ftype))
        except ValueError:
            return None

    def _peek_frame(self) -> tuple[int, int] | None:
        """(type, body length) of the next complete, in-bounds frame; None if incomplete."""
        if len(self._buf) < HEADER_SIZE:
            if self._eof:
                raise self._reject(
                    "transport EOF without close record (truncation)"
                    if self._state in (State.OPEN, State.SEND_CLOSED)
                    else f"transport EOF in state {self._state.name}"
                )
            return None
        ftype, length = HEADER.unpack_from(self._buf.raw, self._buf.start)
        bounds = self._frame_bounds(ftype)
        if bounds is None:
            raise self._reject(f"unexpected frame type {ftype:#04x} in state {self._state.name}")
        if not bounds[0] <= length <= bounds[1]:
            raise self._reject(f"frame type {ftype:#04x} has out-of-bounds length {length}")
        if len(self._buf) < HEADER_SIZE + length:
            if self._eof:
                raise self._reject("transport EOF inside a frame (truncation)")
            return None
        return ftype, length

    def _guard(self) -> None:
        if self._failure is not None:
            raise AuthenticationFailed(f"channel already failed: {self._failure}")

    def next_event(self) -> Event | type[NEED_DATA]:
        """The next event from received bytes, or :data:`NEED_DATA`.

        Raises:
            AuthenticationFailed: (an ``AuthenticationFailed``) the peer's bytes failed a check, or
                the transport ended without an authenticated close; the state becomes ERROR.
            LocalProtocolError: called in a state where this side must send first.
        """
        self._guard()
        try:
            return self._next_event()
        except AuthenticationFailed as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: AuthenticationFailed) -> None:
        self._set_state(State.ERROR)
        self._failure = exc.reason
        self._sealer = self._opener = None
        self._out.clear()
        self._forget_handshake_secrets()

    def _forget_handshake_secrets(self) -> None:
        """Drop what the handshake holds secret (the roles override it)."""

    def _next_event(self) -> Event | type[NEED_DATA]:
        while True:
            state = self._state
            if state is State.CLIENT_START:
                raise LocalProtocolError("send the Hello first")
            if state is State.SERVER_ATTESTING or state is State.CLIENT_ATTESTING:
                # Nothing can be processed until our document is sent; the peer must wait too.
                if len(self._buf):
                    raise self._reject("peer sent bytes before the attestation document")
                return NEED_DATA
            if self.their_closed:
                if len(self._buf):
                    raise self._reject("bytes after the close record")
                return Close()
            if self._reads_records:
                record = self._read_record()
                if record is None:
                    return NEED_DATA
                return Close() if record is _CLOSED else Data(record)
            frame = self._peek_frame()
            if frame is None:
                return NEED_DATA
            ftype, length = frame
            start = self._buf.start
            frame_bytes = bytes(self._buf.raw[start : start + HEADER_SIZE + length])
            self._buf.consume(HEADER_SIZE + length)
            event = self._handshake_frame(ftype, frame_bytes)
            if event is not None:
                return event
            # A handshake frame that produces no event (the mutual server's KEY): go on.

    def _read_record(self) -> bytes | None:
        """Open the next record (states that read records only): its plaintext, ``_CLOSED``
        for the close record, None if incomplete. The per-record hot path: no enums, no events.
        """
        buf = self._buf
        # Direct slot access, not the properties/len(): Python-level calls per record add up.
        raw = buf._buf
        r = buf._r
        avail = buf._w - r
        if avail < HEADER_SIZE:
            if self._eof:
                raise self._reject(
                    "transport EOF without close record (truncation)"
                    if not avail
                    else "transport EOF inside a frame (truncation)"
                )
            return None
        ftype, length = _UNPACK_HEADER(raw, r)
        if ftype == _DATA:
            if not _MIN_DATA_BODY <= length <= _MAX_DATA_BODY:
                raise self._reject(f"data record has out-of-bounds length {length}")
        elif ftype == _CLOSE:
            if length != TAG_SIZE:
                raise self._reject(f"close record has length {length}")
        else:
            raise self._reject(f"unexpected frame type {ftype:#04x} in state {self._state.name}")
        end = r + HEADER_SIZE + length
        if avail < HEADER_SIZE + length:
            if self._eof:
                raise self._reject("transport EOF inside a frame (truncation)")
            return None
        opener = self._opener
        assert opener is not None
        try:
            if length <= _COPY_BELOW:  # small: slicing copies are cheaper than memoryviews
                plaintext = opener.open(raw[r : r + HEADER_SIZE], raw[r + HEADER_SIZE : end])
            else:
                with memoryview(raw) as view:
                    plaintext = opener.open(view[r : r + HEADER_SIZE], view[r + HEADER_SIZE : end])
        except InvalidTag:
            raise self._reject("record failed authentication") from None
        buf.consume(HEADER_SIZE + length)
        if ftype == _CLOSE:
            self._transition(_Input.RECV_CLOSE)
            return _CLOSED
        return plaintext

    def read_records(self, out: deque[bytes | memoryview]) -> bool:
        """Open every complete record buffered, appending each plaintext to ``out``.

        The adapter's receive path. Returns True once the peer's close record was read (then
        nothing more is read). Records that authenticated before a failure stay in ``out``.

        Raises:
            AuthenticationFailed: as :meth:`next_event`.
            LocalProtocolError: before the handshake completed.
        """
        self._guard()
        if not self._reads_records:
            if self.their_closed:
                if len(self._buf):
                    exc = self._reject("bytes after the close record")
                    self._fail(exc)
                    raise exc
                return True
            raise LocalProtocolError(f"no records to read in state {self._state.name}")
        try:
            while (record := self._read_record()) is not None:
                if record is _CLOSED:
                    return True
                out.append(record)
        except AuthenticationFailed as exc:
            self._fail(exc)
            raise
        return False

    def _handshake_frame(self, ftype: int, frame: bytes) -> Event | None:
        raise NotImplementedError  # pragma: no cover - per role

    # ----------------------------------------------------------------- output
    def send(self, event: Event) -> bytes:
        """Bytes to transmit for ``event``.

        Raises:
            LocalProtocolError: the event is not allowed in the current state (e.g. ``Data``
                after ``Close``, anything after a failure), or a record limit was reached.
        """
        if self._state is State.ERROR:
            raise LocalProtocolError("the channel failed; nothing more can be sent")
        if isinstance(event, Data):
            return self._send_data(event.data)
        if isinstance(event, Close):
            self._transition(_Input.SEND_CLOSE)
            assert self._sealer is not None
            out = bytearray(HEADER_SIZE + TAG_SIZE)
            self._sealer.seal_into(FrameType.CLOSE, b"", memoryview(out))
            return bytes(out)
        return self._send_handshake(event)

    def _send_handshake(self, event: Event) -> bytes:
        raise LocalProtocolError(f"{type(event).__name__} cannot be sent by the {self.role.value}")

    def _check_can_send_data(self) -> RecordSealer:
        if not self._can_send_data:
            if self._state is State.ERROR:
                raise LocalProtocolError("the channel failed; nothing more can be sent")
            raise LocalProtocolError(f"cannot send data in state {self._state.name}")
        assert self._sealer is not None
        return self._sealer

    def _send_data(self, data: bytes | bytearray | memoryview) -> bytes:
        view = memoryview(data).cast("B")
        sealer = self._check_can_send_data()
        n = len(view)
        records = -(-n // MAX_RECORD_PLAINTEXT)
        if records > sealer.data_records_left:
            raise LocalProtocolError("record limit for this key reached; open a new channel")
        out = bytearray(n + records * (HEADER_SIZE + TAG_SIZE))
        consumed, written = self.seal_data_into(view, memoryview(out))
        assert consumed == n
        assert written == len(out)
        return bytes(out)

    def seal_record(self, data: bytes | bytearray | memoryview) -> bytes:
        """Seal 1..``MAX_RECORD_PLAINTEXT`` bytes as exactly one data record (small-message path).

        Raises:
            LocalProtocolError: sending is not allowed now, or the record limit was reached.
            ValueError: ``data`` is empty or larger than one record.
        """
        sealer = self._check_can_send_data()
        if not 0 < len(data) <= MAX_RECORD_PLAINTEXT:
            raise ValueError(f"a record carries 1..{MAX_RECORD_PLAINTEXT} bytes")
        return sealer.seal(FrameType.DATA, data)

    def seal_data_into(
        self,
        data: memoryview,
        out: memoryview,
        *,
        max_record: int = MAX_RECORD_PLAINTEXT,
    ) -> tuple[int, int]:
        """Seal as much of ``data`` as fits into ``out`` as records of ≤ ``max_record`` bytes.

        Returns:
            (bytes of ``data`` consumed, bytes written to ``out``). The caller sends
            ``out[:written]`` and calls again with ``data[consumed:]``.

        Raises:
            LocalProtocolError: sending is not allowed now, or the record limit was reached.
            ValueError: ``max_record`` out of range, or ``out`` too small for one record.
        """
        sealer = self._check_can_send_data()
        if not 1 <= max_record <= MAX_RECORD_PLAINTEXT:
            raise ValueError(f"max_record must be in [1, {MAX_RECORD_PLAINTEXT}]")
        overhead = HEADER_SIZE + TAG_SIZE
        total, room = len(data), len(out)
        if total and room < overhead + 1:
            raise ValueError("output buffer too small for one record")
        consumed = written = 0
        while consumed < total and room - written > overhead:
            n = min(total - consumed, max_record, room - written - overhead)
            written += sealer.seal_into(
                FrameType.DATA, data[consumed : consumed + n], out[written:]
            )
            consumed += n
        return consumed, written

    def read_into(self, out: memoryview) -> int:
        """Decrypt every complete data record that fits into ``out``; return the bytes written.

        Stops after an authenticated close (then :attr:`their_closed` is true) and when the next
        record would not fit; ``out`` must hold at least one full record
        (``MAX_RECORD_PLAINTEXT`` bytes) so progress is always possible. Returns 0 when more
        bytes must be received, or after the peer's close.

        Raises:
            AuthenticationFailed: as :meth:`next_event`.
        """
        self._guard()
        if len(out) < MAX_RECORD_PLAINTEXT:
            raise ValueError(f"out must hold at least {MAX_RECORD_PLAINTEXT} bytes")
        if self._state not in (State.OPEN, State.SEND_CLOSED):
            if self.their_closed:
                if len(self._buf):
                    exc = self._reject("bytes after the close record")
                    self._fail(exc)
                    raise exc
                return 0
            raise LocalProtocolError(f"read_into before the handshake completed ({self._state})")
        opener = self._opener
        assert opener is not None
        written = 0
        try:
            while True:
                try:
                    frame = self._peek_frame()
                except AuthenticationFailed:
                    if written:  # hand over what was authentic; the failure repeats next call
                        return written
                    raise
                if frame is None:
                    return written
                ftype, length = frame
                plen = length - TAG_SIZE
                if ftype == FrameType.DATA and written + plen > len(out):
                    return written
                start = self._buf.start
                view = memoryview(self._buf.raw)
                header = view[start : start + HEADER_SIZE]
                body = view[start + HEADER_SIZE : start + HEADER_SIZE + length]
                try:
                    if ftype == FrameType.DATA:
                        written += opener.open_into(header, body, out[written:])
                    else:
                        opener.open(header, body)
                except InvalidTag:
                    raise self._reject("record failed authentication") from None
                finally:
                    header.release()
                    body.release()
                    view.release()
                self._buf.consume(HEADER_SIZE + length)
                if ftype == FrameType.CLOSE:
                    self._transition(_Input.RECV_CLOSE)
                    return written
                self._transition(_Input.RECV_DATA)
        except AuthenticationFailed as exc:
            self._fail(exc)
            raise

    def _install_keys(self, channel_secret: bytes) -> None:
        keys = derive_traffic_keys(channel_secret, self._transcript.digest())
        if self.role is Role.CLIENT:
            self._sealer = RecordSealer(keys.c2s_key, keys.c2s_iv, self._max_records)
            self._opener = RecordOpener(keys.s2c_key, keys.s2c_iv, self._max_records)
        else:
            self._sealer = RecordSealer(keys.s2c_key, keys.s2c_iv, self._max_records)
            self._opener = RecordOpener(keys.c2s_key, keys.c2s_iv, self._max_records)


def _frame(ftype: FrameType, body: bytes) -> bytes:
    return HEADER.pack(ftype, len(body)) + body


class ClientConnection(ChannelConnection):
    """The client side: sends the hello, verifies the enclave's document, seals the secret.

    In mutual mode (the enclave answered with MUTUAL_ATTESTATION) it then asks for a document of
    its own with an :class:`AttestationRequest`; ``send(Attestation(document))`` returns the KEY
    and CLIENT_ATTESTATION frames, and the channel is established once the enclave's ACCEPTED
    record authenticates. An adapter whose client cannot attest (no NSM) fails the handshake
    there.

    Args:
        verifier: full verification of the enclave's document (called before anything secret
            is produced); any exception it raises rejects the handshake.
        suites: suites offered, in the client's order.
        max_records: records per key and direction, close included (tests inject small ones).
    """

    role = Role.CLIENT

    def __init__(
        self,
        *,
        verifier: DocumentVerifier,
        suites: Sequence[Suite] = (Suite.X25519,),
        max_records: int = DEFAULT_MAX_RECORDS,
        _random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        super().__init__(
            initial=State.CLIENT_START, suites=suites, max_records=max_records, random=_random
        )
        self._verifier = verifier
        self.peer: PeerAttestation | None = None
        #: mutual mode: the sealed secret and its KEY frame, held until our document is sent
        self._secret: bytes | None = None
        self._key_frame = b""
        self._mutual_hash = hashlib.sha384()  # HELLO ‖ MUTUAL_ATTESTATION ‖ KEY
        self._mutual = False

    @property
    def mutual(self) -> bool:
        """True once the enclave asked this client to attest too (mutual mode)."""
        return self._mutual

    def _forget_handshake_secrets(self) -> None:
        self._secret = None
        self._key_frame = b""

    def _send_handshake(self, event: Event) -> bytes:
        if isinstance(event, Hello):
            self._transition(_Input.SEND_HELLO)
            nonce = self._random(NONCE_SIZE)
            ids = bytes(s.value for s in self._suites)
            body = _HELLO_FIXED.pack(PROTOCOL_VERSION, nonce, len(ids)) + ids
            frame = _frame(FrameType.HELLO, body)
            self._transcript.update(frame)
            self._hello_hash = hashlib.sha384(frame).digest()
            self._mutual_hash.update(frame)
            return frame
        if isinstance(event, Attestation):
            return self._send_own_attestation(event.document)
        return super()._send_handshake(event)

    def _handshake_frame(self, ftype: int, frame: bytes) -> Event | None:
        if ftype == FrameType.ACCEPTED:
            return self._on_accepted(frame)
        # Otherwise ATTESTATION or MUTUAL_ATTESTATION (see _RECEIVABLE).
        mutual = ftype == FrameType.MUTUAL_ATTESTATION
        body = memoryview(frame)[HEADER_SIZE:]
        suite_id, key_len = _ATT_KEY.unpack_from(body)
        suite = next((s for s in self._suites if s.value == suite_id), None)
        if suite is None:
            raise self._reject(f"enclave chose suite {suite_id:#04x}, which was not offered")
        if key_len != public_key_size(suite):
            raise self._reject("public key has the wrong size for the suite")
        pos = _ATT_KEY.size + key_len
        if len(body) < pos + _ATT_DOC.size:
            raise self._reject("attestation message too short")
        public_key = bytes(body[_ATT_KEY.size : pos])
        (doc_len,) = _ATT_DOC.unpack_from(body, pos)
        pos += _ATT_DOC.size
        if doc_len > MAX_DOCUMENT_SIZE or pos + doc_len != len(body):
            raise self._reject("attestation document length is inconsistent")
        document = bytes(body[pos:])
        # 1-2. Full verification (root, chain, signature, PCR policy, debug, age, nonce), then
        # the nonce, key and suite bindings.
        binding = public_key_binding(suite, public_key)
        peer = _verify_document(
            self,
            self._verifier,
            document,
            nonce=self._hello_hash,
            public_key=binding,
            user_data=USER_DATA_PREFIX + bytes([suite.value]),
            who="the enclave's",
        )
        # 3. Only now produce the secret, sealed to the attested key.
        self._transcript.update(frame)
        info = HPKE_INFO_PREFIX + self._transcript.digest()
        secret = self._random(32)
        try:
            sealed = seal_channel_secret(suite, public_key, secret, info=info)
        except ValueError:
            raise self._reject("the enclave's public key is not a valid key") from None
        key_frame = _frame(FrameType.KEY, sealed)
        self._transcript.update(key_frame)
        self._suite = suite
        self.peer = peer
        if not mutual:
            self._install_keys(secret)
            self._transition(_Input.RECV_ATTESTATION)
            self._out += key_frame
            return ChannelEstablished(suite=suite, peer=peer)
        # Mutual: our own document binds every byte so far, KEY included (PROTOCOL.md §3.4).
        self._transition(_Input.RECV_MUTUAL_ATTESTATION)
        self._mutual = True
        self._secret = secret
        self._key_frame = key_frame
        self._mutual_hash.update(frame)
        self._mutual_hash.update(key_frame)
        return AttestationRequest(
            nonce=self._mutual_hash.digest(),
            public_key=binding,
            user_data=CLIENT_USER_DATA_PREFIX + bytes([suite.value]),
        )

    def _send_own_attestation(self, document: bytes) -> bytes:
        if len(document) > MAX_DOCUMENT_SIZE:
            raise LocalProtocolError(f"attestation document exceeds {MAX_DOCUMENT_SIZE} bytes")
        if not document:
            raise LocalProtocolError("the attestation document is empty")
        self._transition(_Input.SEND_ATTESTATION)  # LocalProtocolError unless CLIENT_ATTESTING
        assert self._secret is not None
        frame = _frame(FrameType.CLIENT_ATTESTATION, bytes(document))
        self._transcript.update(frame)
        self._install_keys(self._secret)
        out = self._key_frame + frame
        self._forget_handshake_secrets()
        return out

    def _on_accepted(self, frame: bytes) -> Event:
        opener = self._opener
        assert opener is not None
        try:
            opener.open(frame[:HEADER_SIZE], frame[HEADER_SIZE:])
        except InvalidTag:
            raise self._reject("the enclave's acceptance record failed authentication") from None
        self._transition(_Input.RECV_ACCEPTED)
        assert self._suite is not None
        return ChannelEstablished(suite=self._suite, peer=self.peer)


def _verify_document(
    conn: ChannelConnection,
    verifier: DocumentVerifier,
    document: bytes,
    *,
    nonce: bytes,
    public_key: bytes,
    user_data: bytes,
    who: str,
) -> PeerAttestation:
    """Full verification of the peer's ``document``, then its three bindings in constant time.

    Raises:
        AuthenticationFailed: any failure (the reason names the step and whose document).
    """
    try:
        peer = verifier(document, nonce=nonce)
    except Exception as exc:  # any verifier failure, including its bugs, fails closed
        raise conn._reject(
            f"{who} attestation document rejected by the verifier: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(peer, PeerAttestation):
        raise conn._reject("verifier returned no PeerAttestation")
    # Belt and braces: the nonce, key and suite/role bindings, in constant time.
    if peer.nonce is None or not hmac.compare_digest(peer.nonce, nonce):
        raise conn._reject(f"{who} document nonce does not bind this handshake")
    if peer.public_key is None or not hmac.compare_digest(peer.public_key, public_key):
        raise conn._reject(f"{who} document public_key does not bind the enclave's key")
    if peer.user_data is None or not hmac.compare_digest(peer.user_data, user_data):
        raise conn._reject(f"{who} document user_data does not bind the suite and role")
    return peer


class ServerConnection(ChannelConnection):
    """The enclave side: answers the hello with an attested ephemeral key, opens the secret.

    Args:
        suites: suites accepted, in the enclave's order of preference.
        max_records: records per key and direction, close included (tests inject small ones).
        peer_verifier: mutual mode: the client must attest too, and this verifies its document
            (root, chain, signature, PCR policy, debug rule, age, nonce) before the secret is
            opened. None: the client stays anonymous (one-sided attestation).
    """

    role = Role.SERVER

    def __init__(
        self,
        *,
        suites: Sequence[Suite] = (Suite.MLKEM768_X25519, Suite.X25519),
        max_records: int = DEFAULT_MAX_RECORDS,
        peer_verifier: DocumentVerifier | None = None,
        _random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        super().__init__(
            initial=State.SERVER_WAIT_HELLO, suites=suites, max_records=max_records, random=_random
        )
        self._key: EphemeralKey | None = None
        self._peer_verifier = peer_verifier
        #: the verified client (mutual mode), else None
        self.peer: PeerAttestation | None = None
        self._key_binding = b""
        self._mutual_hash = hashlib.sha384()
        self._held_key = b""  # mutual: the KEY body, opened once the client's document verified
        self._hpke_info = b""

    @property
    def mutual(self) -> bool:
        """True if the client must attest too (a ``peer_verifier`` was given)."""
        return self._peer_verifier is not None

    def _forget_handshake_secrets(self) -> None:
        self._key = None
        self._held_key = b""

    def _handshake_frame(self, ftype: int, frame: bytes) -> Event | None:
        if ftype == FrameType.HELLO:
            return self._on_hello(frame)
        if ftype == FrameType.CLIENT_ATTESTATION:
            return self._on_client_attestation(frame)
        return self._on_key(frame)

    def _on_hello(self, frame: bytes) -> Event:
        body = frame[HEADER_SIZE:]
        version, _nonce, count = _HELLO_FIXED.unpack_from(body)
        if version != PROTOCOL_VERSION:
            raise self._reject(f"unsupported protocol version {version}")
        if not 1 <= count <= MAX_SUITES or len(body) != _HELLO_FIXED.size + count:
            raise self._reject("hello suite list is malformed")
        offered = set(body[_HELLO_FIXED.size :])  # unknown ids are ignored (forward compatible)
        suite = next((s for s in self._suites if s.value in offered), None)
        if suite is None:
            raise self._reject("no suite in common with the client")
        self._transition(_Input.RECV_HELLO)
        self._transcript.update(frame)
        self._mutual_hash.update(frame)
        self._hello_hash = hashlib.sha384(frame).digest()
        self._suite = suite
        self._key = EphemeralKey(suite)
        self._key_binding = public_key_binding(suite, self._key.public_bytes)
        return AttestationRequest(
            nonce=self._hello_hash,
            public_key=self._key_binding,
            user_data=USER_DATA_PREFIX + bytes([suite.value]),
        )

    def _send_handshake(self, event: Event) -> bytes:
        if not isinstance(event, Attestation):
            return super()._send_handshake(event)
        if len(event.document) > MAX_DOCUMENT_SIZE:
            raise LocalProtocolError(f"attestation document exceeds {MAX_DOCUMENT_SIZE} bytes")
        if self.mutual:
            self._transition(_Input.SEND_MUTUAL_ATTESTATION)
            ftype = FrameType.MUTUAL_ATTESTATION
        else:
            self._transition(_Input.SEND_ATTESTATION)
            ftype = FrameType.ATTESTATION
        assert self._key is not None
        assert self._suite is not None
        key = self._key.public_bytes
        body = (
            _ATT_KEY.pack(self._suite.value, len(key))
            + key
            + _ATT_DOC.pack(len(event.document))
            + event.document
        )
        frame = _frame(ftype, body)
        self._transcript.update(frame)
        self._mutual_hash.update(frame)
        return frame

    def _on_key(self, frame: bytes) -> Event | None:
        assert self._key is not None
        assert self._suite is not None
        info = HPKE_INFO_PREFIX + self._transcript.digest()
        if self.mutual:
            # Held, not opened, until the client's document (which binds this frame) verified.
            self._transcript.update(frame)
            self._mutual_hash.update(frame)
            self._held_key = frame[HEADER_SIZE:]
            self._hpke_info = info
            self._transition(_Input.RECV_KEY)
            return None
        secret = self._open_secret(frame[HEADER_SIZE:], info)
        self._transcript.update(frame)
        self._install_keys(secret)
        self._transition(_Input.RECV_KEY)
        return ChannelEstablished(suite=self._suite, peer=None)

    def _open_secret(self, sealed: bytes, info: bytes) -> bytes:
        assert self._key is not None
        try:
            return self._key.open_channel_secret(sealed, info=info)
        except InvalidTag:
            raise self._reject("sealed channel secret failed to open") from None
        finally:
            self._key = None  # the ephemeral private key is used exactly once

    def _on_client_attestation(self, frame: bytes) -> Event:
        assert self._suite is not None
        assert self._peer_verifier is not None
        peer = _verify_document(
            self,
            self._peer_verifier,
            frame[HEADER_SIZE:],
            nonce=self._mutual_hash.digest(),
            public_key=self._key_binding,
            user_data=CLIENT_USER_DATA_PREFIX + bytes([self._suite.value]),
            who="the client's",
        )
        secret = self._open_secret(self._held_key, self._hpke_info)
        self._held_key = b""
        self._transcript.update(frame)
        self._install_keys(secret)
        self._transition(_Input.RECV_CLIENT_ATTESTATION)
        assert self._sealer is not None
        # Key confirmation and the verdict in one: the first enclave -> client record.
        self._out += self._sealer.seal(FrameType.ACCEPTED, b"")
        self.peer = peer
        return ChannelEstablished(suite=self._suite, peer=peer)
