"""Sans-IO core of the streaming RPC protocol ``enclave-rpc/1`` (wire format: transport/RPC.md).

Theory of operation
-------------------

One :class:`RpcConnection` per side of a byte stream. It does no I/O, keeps no clock and never
logs (h2's "no I/O and no context switches"):

* ``receive_data(data)`` buffers bytes from the peer (``b""`` = EOF) and ``next_event()``
  parses up to the next event (:mod:`transport.rpc._events`) or returns
  :data:`~transport.sansio.NEED_DATA`: h11's contract, shared with the channel core
  (:mod:`transport.sansio`). Anything the peer gets wrong raises
  :class:`~transport.errors.RemoteProtocolError`; the connection is then dead and every later
  call raises :class:`~transport.errors.LocalProtocolError`.
* ``send_*()`` methods return the bytes of the frames they encode. Misuse (sending on a closed
  stream, without credit, a message over the size limit) raises ``LocalProtocolError`` *before*
  any state changes, so the caller may recover.
* Frames the protocol owes the peer on its own (PONG for a PING, the refusal of a stream over
  ``max_streams``, window grants) accumulate in an internal buffer drained by
  :meth:`RpcConnection.data_to_send`.

Frames are ``length:u32 type:u8 flags:u8 stream_id:u32`` followed by ``length`` payload bytes.
Each length is checked against its type's cap as soon as the 10-byte header is complete, before
a byte of the payload is buffered, so memory per connection stays under
``max_message_size + receive chunk``.

Each stream is a state machine whose transitions live in :data:`_TRANSITIONS`; a pair that is
not in the table is a local error (for ``SEND_*`` inputs) or a protocol violation (for
``RECV_*`` inputs). Some pairs are legal but *ignored*: frames that cross on the wire with our own
CANCEL or END (the peer sent them before it could know), which produce no event.

Flow control is per stream and per direction, in two units: messages and payload bytes. Each
stream starts with :data:`INITIAL_WINDOW_MESSAGES` / :data:`INITIAL_WINDOW_BYTES` of credit in
each direction. A DATA frame may be sent while the sender holds at least one message credit
and a *positive* byte credit; it costs one message and its payload length in bytes, so the byte
credit may go negative by less than one message (a message larger than the window still
goes through, one at a time). The receiver grants credit back with WINDOW frames as the
application consumes messages (:meth:`RpcConnection.message_consumed`), never sooner.

Buffered bytes are bounded per stream by that window and per connection by
``max_buffered_bytes``, without a connection-level window on the wire. A stream whose peer may
still send DATA can make us hold at most its *reservation*, ``min(window_bytes - 1 +
max_message_size, window_messages * max_message_size)`` (its queue included, since queue and
credit together never exceed the window); a stream whose peer has ended holds only what it has
queued. A new stream is accepted (server) or opened (client) only if every peer-open stream's
reservation, the queues of the others and the new stream's own reservation (just its bytes,
for a request that arrived whole with its END) fit in ``max_buffered_bytes``;
a server refuses the others with ERROR ``resource_exhausted`` (the connection stays up). So
the bytes received and not yet consumed never exceed ``max_buffered_bytes``, plus at most one
partly received frame.
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import msgpack

from transport.errors import LocalProtocolError, RemoteProtocolError
from transport.rpc._errors import MAX_ERROR_MESSAGE_LENGTH, validate_code
from transport.rpc._events import (
    ConnectionEnded,
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
from transport.sansio import NEED_DATA

__all__ = [
    "PROTOCOL_NAME",
    "HEADER",
    "HEADER_SIZE",
    "FrameType",
    "FLAG_END",
    "Role",
    "StreamState",
    "StreamInput",
    "RpcConnection",
    "CoreStatistics",
    "StreamCredit",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_MESSAGE_SIZE_LIMIT",
    "MAX_CONTROL_PAYLOAD",
    "INITIAL_WINDOW_MESSAGES",
    "INITIAL_WINDOW_BYTES",
    "MAX_WINDOW",
    "MAX_METHOD_LENGTH",
    "MAX_METADATA_ENTRIES",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_MAX_BUFFERED_BYTES",
    "MAX_STREAMS_LIMIT",
    "MAX_STREAM_ID",
    "PING_PAYLOAD_SIZE",
    "DEFAULT_CLOSED_STREAMS_REMEMBERED",
    "MAX_PENDING_OUTPUT",
]

#: Protocol name and version, for documentation and logs.
PROTOCOL_NAME: Final = "enclave-rpc/1"

#: Frame header: payload length (u32), frame type (u8), flags (u8), stream id (u32), big endian.
HEADER: Final = struct.Struct("!IBBI")
#: Size of :data:`HEADER` in bytes.
HEADER_SIZE: Final = HEADER.size


class FrameType(enum.IntEnum):
    """Frame types of ``enclave-rpc/1`` (the ``type`` byte of the header)."""

    #: client opens a stream; payload msgpack ``[method, metadata]``
    OPEN = 0x01
    #: one message; payload is one msgpack value; flag END may close the sender's side
    DATA = 0x02
    #: the sender half-closes the stream; empty payload
    END = 0x03
    #: the sender abandons the stream (both directions); empty payload
    CANCEL = 0x04
    #: the sender fails the stream (both directions); payload msgpack ``[code, message]``
    ERROR = 0x05
    #: credit grant; payload ``messages:u32 bytes:u32``
    WINDOW = 0x06
    #: the sender will accept no new streams; stream id 0; payload ``[last_id, code, message]``
    GOAWAY = 0x07
    #: liveness probe; stream id 0; payload 8 opaque bytes
    PING = 0x08
    #: answer to PING; stream id 0; payload echoes the PING's 8 bytes
    PONG = 0x09


#: DATA flag: this message is the sender's last one on the stream (DATA + END in one frame).
FLAG_END: Final = 0x01

#: Default cap on one message's encoded size, in bytes. 4 MiB holds a batch of a few
#: 224x224x3 float32 images (602 KB each); raise it on both sides for larger tensors.
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 << 20
#: Upper bound accepted for ``max_message_size`` (bytes): keeps every credit sum inside u32.
MAX_MESSAGE_SIZE_LIMIT: Final = 1 << 30
#: Cap on the payload of OPEN, ERROR and GOAWAY frames (bytes): method names, metadata and error
#: texts are small; 16 KiB leaves room for metadata while bounding what a peer can make us parse.
MAX_CONTROL_PAYLOAD: Final = 16 << 10
#: Credit each stream starts with, per direction, in messages. 16 keeps a pipelined stream of
#: small inference requests flowing for 16 messages before the first grant is needed.
INITIAL_WINDOW_MESSAGES: Final = 16
#: Credit each stream starts with, per direction, in payload bytes (1 MiB: a few tensors in flight).
INITIAL_WINDOW_BYTES: Final = 1 << 20
#: Largest credit a sender may hold, messages or bytes (h2: 2^31-1); more is a violation.
MAX_WINDOW: Final = (1 << 31) - 1
#: Longest method name in UTF-8 bytes.
MAX_METHOD_LENGTH: Final = 256
#: Most entries in an OPEN frame's metadata map.
MAX_METADATA_ENTRIES: Final = 32
#: Default cap on concurrently open streams per connection (server: more are refused with
#: ``resource_exhausted``). With the default windows this bounds a server's buffered input per
#: connection to about 32 x (1 MiB + 4 MiB).
DEFAULT_MAX_STREAMS: Final = 32
#: Default bound on the bytes a server connection holds received but not yet consumed (see
#: the module docstring). 64 MiB admits twelve streams whose client may still send, at the
#: default windows (1 MiB + one 4 MiB message each), while bounding what one connection can
#: pin to an eighth of a 512 MiB enclave; unary calls release their share as soon as the
#: request is in, so they are not limited by it.
DEFAULT_MAX_BUFFERED_BYTES: Final = 64 << 20
#: Upper bound accepted for ``max_streams``.
MAX_STREAMS_LIMIT: Final = 65536
#: Largest stream id (31 bits, as in h2); a client that exhausts them opens a new connection.
MAX_STREAM_ID: Final = (1 << 31) - 1
#: PING and PONG payloads are exactly this many bytes.
PING_PAYLOAD_SIZE: Final = 8
#: Most bytes of frames owed to the peer (PONGs, refusals, grants) not yet taken by
#: data_to_send(): a peer flooding PINGs without reading the PONGs is cut off (h2 does the same).
MAX_PENDING_OUTPUT: Final = 1 << 20
#: How many closed streams each side remembers, to tell a late frame that crossed our CANCEL
#: (ignored) from a frame after END (a violation). Older closed ids are ignored silently.
DEFAULT_CLOSED_STREAMS_REMEMBERED: Final = 1024

#: Deepest nesting of arrays/maps accepted by the msgpack decoder is bounded by msgpack itself
#: (its C stack limit, ``StackError``); lengths of containers are bounded by these:
_MAX_CONTAINER_LEN: Final = 1 << 20  # entries per array or map in a message
_WINDOW: Final = struct.Struct("!II")
#: Method names whose metadata-less OPEN payload is cached per connection (encode and decode):
#: an application has a handful of methods; the cap bounds what a peer can make us remember.
_OPEN_CACHE_SIZE: Final = 64
_FRAME_TYPES: Final = {int(t): t for t in FrameType}
_T_DATA: Final = int(FrameType.DATA)
_T_OPEN: Final = int(FrameType.OPEN)
_HEADER_PACK: Final = HEADER.pack
_HEADER_UNPACK: Final = HEADER.unpack_from


def _frame_name(ftype: int) -> str:
    known = _FRAME_TYPES.get(ftype)
    return known.name if known is not None else f"0x{ftype:02x}"


class Role(enum.Enum):
    """Which side of the connection this is. Only the client opens streams."""

    CLIENT = "client"
    SERVER = "server"


class StreamState(enum.Enum):
    """State of one stream, seen from this side (h2's stream states, without IDLE/RESERVED)."""

    __hash__ = object.__hash__  # identity hash in C: these key the transition table

    OPEN = "open"
    #: we sent END; the peer may still send
    HALF_CLOSED_LOCAL = "half_closed_local"
    #: the peer sent END; we may still send
    HALF_CLOSED_REMOTE = "half_closed_remote"
    #: both sides sent END
    CLOSED = "closed"
    #: we sent CANCEL or ERROR
    RESET_LOCAL = "reset_local"
    #: the peer sent CANCEL or ERROR
    RESET_REMOTE = "reset_remote"


class StreamInput(enum.Enum):
    """Inputs of the per-stream state machine."""

    __hash__ = object.__hash__  # identity hash in C: these key the transition table

    SEND_DATA = "send_data"
    SEND_END = "send_end"
    SEND_CANCEL = "send_cancel"
    SEND_ERROR = "send_error"
    SEND_WINDOW = "send_window"
    RECV_DATA = "recv_data"
    RECV_END = "recv_end"
    RECV_CANCEL = "recv_cancel"
    RECV_ERROR = "recv_error"
    RECV_WINDOW = "recv_window"


_S = StreamState
_I = StreamInput
_TERMINAL: Final = frozenset({_S.CLOSED, _S.RESET_LOCAL, _S.RESET_REMOTE})
#: States in which the peer may still send DATA on the stream (it holds a reservation).
_PEER_OPEN: Final = frozenset({_S.OPEN, _S.HALF_CLOSED_LOCAL})
#: Payloads up to this size (bytes) are decoded from a copy, larger ones from a buffer view:
#: below it, copying is cheaper than making and releasing a memoryview.
_COPY_BELOW: Final = 4096

#: (state, input) -> (next state, deliver an event?). Anything not in this table is invalid:
#: LocalProtocolError for SEND_* inputs, RemoteProtocolError for RECV_* inputs (h2's rule).
#: ``deliver=False`` marks frames that legitimately cross our own END/CANCEL on the wire.
_TRANSITIONS: Final[dict[tuple[StreamState, StreamInput], tuple[StreamState, bool]]] = {
    # OPEN: everything goes.
    (_S.OPEN, _I.SEND_DATA): (_S.OPEN, True),
    (_S.OPEN, _I.SEND_END): (_S.HALF_CLOSED_LOCAL, True),
    (_S.OPEN, _I.SEND_CANCEL): (_S.RESET_LOCAL, True),
    (_S.OPEN, _I.SEND_ERROR): (_S.RESET_LOCAL, True),
    (_S.OPEN, _I.SEND_WINDOW): (_S.OPEN, True),
    (_S.OPEN, _I.RECV_DATA): (_S.OPEN, True),
    (_S.OPEN, _I.RECV_END): (_S.HALF_CLOSED_REMOTE, True),
    (_S.OPEN, _I.RECV_CANCEL): (_S.RESET_REMOTE, True),
    (_S.OPEN, _I.RECV_ERROR): (_S.RESET_REMOTE, True),
    (_S.OPEN, _I.RECV_WINDOW): (_S.OPEN, True),
    # We ended: we may still grant credit and reset; the peer may still send.
    (_S.HALF_CLOSED_LOCAL, _I.SEND_CANCEL): (_S.RESET_LOCAL, True),
    (_S.HALF_CLOSED_LOCAL, _I.SEND_ERROR): (_S.RESET_LOCAL, True),
    (_S.HALF_CLOSED_LOCAL, _I.SEND_WINDOW): (_S.HALF_CLOSED_LOCAL, True),
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): (_S.HALF_CLOSED_LOCAL, True),
    (_S.HALF_CLOSED_LOCAL, _I.RECV_END): (_S.CLOSED, True),
    (_S.HALF_CLOSED_LOCAL, _I.RECV_CANCEL): (_S.RESET_REMOTE, True),
    (_S.HALF_CLOSED_LOCAL, _I.RECV_ERROR): (_S.RESET_REMOTE, True),
    (_S.HALF_CLOSED_LOCAL, _I.RECV_WINDOW): (_S.HALF_CLOSED_LOCAL, False),  # nothing left to send
    # The peer ended: DATA/END from it are violations; it may still grant credit or reset.
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): (_S.HALF_CLOSED_REMOTE, True),
    (_S.HALF_CLOSED_REMOTE, _I.SEND_END): (_S.CLOSED, True),
    (_S.HALF_CLOSED_REMOTE, _I.SEND_CANCEL): (_S.RESET_LOCAL, True),
    (_S.HALF_CLOSED_REMOTE, _I.SEND_ERROR): (_S.RESET_LOCAL, True),
    (_S.HALF_CLOSED_REMOTE, _I.RECV_CANCEL): (_S.RESET_REMOTE, True),
    (_S.HALF_CLOSED_REMOTE, _I.RECV_ERROR): (_S.RESET_REMOTE, True),
    (_S.HALF_CLOSED_REMOTE, _I.RECV_WINDOW): (_S.HALF_CLOSED_REMOTE, True),
    # Both ended: a grant or a reset may cross our END; DATA/END are violations.
    (_S.CLOSED, _I.RECV_WINDOW): (_S.CLOSED, False),
    (_S.CLOSED, _I.RECV_CANCEL): (_S.CLOSED, False),
    (_S.CLOSED, _I.RECV_ERROR): (_S.CLOSED, False),
    # We reset: whatever the peer sent before it saw our reset is dropped.
    (_S.RESET_LOCAL, _I.RECV_DATA): (_S.RESET_LOCAL, False),
    (_S.RESET_LOCAL, _I.RECV_END): (_S.RESET_LOCAL, False),
    (_S.RESET_LOCAL, _I.RECV_CANCEL): (_S.RESET_LOCAL, False),
    (_S.RESET_LOCAL, _I.RECV_ERROR): (_S.RESET_LOCAL, False),
    (_S.RESET_LOCAL, _I.RECV_WINDOW): (_S.RESET_LOCAL, False),
    # The peer reset: it must send nothing more on the stream (RESET_REMOTE has no entries).
}


#: next_event's fast path, read off the table: the state after a delivered DATA (with END).
_AFTER_DATA: Final = {
    st: new for (st, inp), (new, deliver) in _TRANSITIONS.items() if inp is _I.RECV_DATA and deliver
}
_AFTER_SEND_DATA: Final = {
    st: new for (st, inp), (new, _) in _TRANSITIONS.items() if inp is _I.SEND_DATA
}
_AFTER_SEND_DATA_END: Final = {
    st: _TRANSITIONS[(mid, _I.SEND_END)][0]
    for st, mid in _AFTER_SEND_DATA.items()
    if (mid, _I.SEND_END) in _TRANSITIONS
}
_AFTER_DATA_END: Final = {
    st: _TRANSITIONS[(mid, _I.RECV_END)][0]
    for st, mid in _AFTER_DATA.items()
    if (mid, _I.RECV_END) in _TRANSITIONS and _TRANSITIONS[(mid, _I.RECV_END)][1]
}


def transition(state: StreamState, event: StreamInput) -> tuple[StreamState, bool]:
    """Look up ``(state, event)`` in the transition table.

    Returns:
        ``(next_state, deliver)``; ``deliver`` is False for frames that are legal but ignored.

    Raises:
        LocalProtocolError: a ``SEND_*`` input not allowed in ``state``.
        RemoteProtocolError: a ``RECV_*`` input not allowed in ``state``.
    """
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        if event.name.startswith("SEND_"):
            raise LocalProtocolError(
                f"cannot {event.name.lower().removeprefix('send_')} on a stream in state "
                f"{state.value}"
            ) from None
        raise RemoteProtocolError(
            f"peer sent {event.name.removeprefix('RECV_')} on a stream in state {state.value}"
        ) from None


@dataclass(frozen=True, slots=True)
class StreamCredit:
    """Flow-control view of one stream (see :meth:`RpcConnection.stream_credit`).

    Attributes:
        state: the stream's state.
        send_messages / send_bytes: credit we hold to send (bytes may be negative after a
            message larger than the remaining credit).
        peer_messages / peer_bytes: credit the peer holds to send to us.
        queued_messages / queued_bytes: received and not yet reported consumed.
    """

    state: StreamState
    send_messages: int
    send_bytes: int
    peer_messages: int
    peer_bytes: int
    queued_messages: int
    queued_bytes: int


@dataclass(frozen=True, slots=True)
class CoreStatistics:
    """Counters of one :class:`RpcConnection` (see :meth:`RpcConnection.statistics`).

    ``queued_*`` count what open streams hold unconsumed; ``buffered_bytes`` every received
    byte not yet reported consumed (closed streams included); ``reserved_bytes`` what the
    buffer budget counts (see the module docstring).
    """

    open_streams: int
    streams_opened: int
    frames_sent: int
    frames_received: int
    messages_sent: int
    messages_received: int
    bytes_sent: int
    bytes_received: int
    queued_messages: int
    queued_bytes: int
    buffered_bytes: int = 0
    reserved_bytes: int = 0


class _Stream:
    """Per-stream bookkeeping (private; the public view is :class:`StreamCredit`)."""

    __slots__ = (
        "peer_bytes",
        "peer_msgs",
        "queued_bytes",
        "queued_msgs",
        "send_bytes",
        "send_msgs",
        "state",
    )

    def __init__(self) -> None:
        self.state = StreamState.OPEN
        self.send_msgs = INITIAL_WINDOW_MESSAGES
        self.send_bytes = INITIAL_WINDOW_BYTES
        self.peer_msgs = INITIAL_WINDOW_MESSAGES
        self.peer_bytes = INITIAL_WINDOW_BYTES
        self.queued_msgs = 0
        self.queued_bytes = 0


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def _check_int(name: str, value: int, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


_SCALARS: Final = (str, bytes, int, float, bool, type(None))


class RpcConnection:
    """One side of an ``enclave-rpc/1`` connection, without I/O.

    Args:
        role: :attr:`Role.CLIENT` (opens streams) or :attr:`Role.SERVER` (accepts them).
        max_message_size: largest encoded message accepted or sent, in bytes. Both sides must
            use the same value (an oversized frame from the peer kills the connection).
        window_messages / window_bytes: receive window per stream; at least the protocol's
            initial window (16 messages, 1 MiB). Larger values are granted at stream open.
        max_streams: concurrently open streams. A server refuses more with an ERROR
            ``resource_exhausted``; a client raises :class:`LocalProtocolError` instead of
            opening more.
        max_buffered_bytes: bound on bytes received and not yet consumed, for the whole
            connection (see the module docstring), or None (the default here; ``serve_rpc``
            uses :data:`DEFAULT_MAX_BUFFERED_BYTES`) for no bound beyond ``max_streams``
            reservations. Streams over it are refused like over ``max_streams``. Must hold
            at least one stream's reservation.
        closed_streams_remembered: how many closed stream ids to remember (see module doc).
        merge_first_message: (server) when an OPEN and the stream's first DATA are both
            buffered, report them as one :class:`RequestReceived` instead of
            :class:`StreamOpened` then :class:`MessageReceived` (one event per unary call).

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        window_messages: int = INITIAL_WINDOW_MESSAGES,
        window_bytes: int = INITIAL_WINDOW_BYTES,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_buffered_bytes: int | None = None,
        closed_streams_remembered: int = DEFAULT_CLOSED_STREAMS_REMEMBERED,
        merge_first_message: bool = False,
    ) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, got {role!r}")
        self.role: Final = role
        self.max_message_size: Final = _check_int(
            "max_message_size", max_message_size, 1, MAX_MESSAGE_SIZE_LIMIT
        )
        self.window_messages: Final = _check_int(
            "window_messages", window_messages, INITIAL_WINDOW_MESSAGES, 1 << 20
        )
        self.window_bytes: Final = _check_int(
            "window_bytes", window_bytes, INITIAL_WINDOW_BYTES, MAX_MESSAGE_SIZE_LIMIT
        )
        self.max_streams: Final = _check_int("max_streams", max_streams, 1, MAX_STREAMS_LIMIT)
        self._remembered: Final = _check_int(
            "closed_streams_remembered", closed_streams_remembered, 0, 1 << 20
        )
        #: What one stream whose peer may still send can make us hold (bytes).
        self.stream_reservation: Final = min(
            self.window_bytes - 1 + self.max_message_size,
            self.window_messages * self.max_message_size,
        )
        if max_buffered_bytes is not None:
            _check_int("max_buffered_bytes", max_buffered_bytes, self.stream_reservation, 1 << 40)
        self.max_buffered_bytes: Final = max_buffered_bytes
        # Whether our window exceeds the protocol's initial one (granted at stream open).
        self._extra_window = (
            self.window_messages > INITIAL_WINDOW_MESSAGES
            or self.window_bytes > INITIAL_WINDOW_BYTES
        )
        self._merge_first = bool(merge_first_message)
        self._peer_open = 0  # streams whose peer may still send DATA (OPEN, HALF_CLOSED_LOCAL)
        self._buffered = 0  # bytes received, not yet reported consumed (every stream)
        # ...of which held by streams whose peer can send no more (no reservation covers them)
        self._buffered_ended = 0
        self._streams: dict[int, _Stream] = {}
        self._closed: OrderedDict[int, StreamState] = OrderedDict()
        self._last_stream_id = 0  # highest id opened so far (all streams are client-initiated)
        self._buf = bytearray()
        self._pos = 0  # parse position in _buf (consumed bytes are dropped lazily)
        self._pending = bytearray()  # frames owed to the peer, drained by data_to_send()
        self._broken: str | None = None  # set once a protocol error killed the connection
        self._eof = False
        self._eof_reported = False
        self._goaway_sent = False
        self._goaway_received = False
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True, datetime=False)
        # OPEN payloads without metadata, encoded / validated once per method name.
        self._open_cache: dict[str, bytes] = {}
        self._open_decoded: dict[bytes, str] = {}
        limit = self.max_message_size
        self._unpack_limits: dict[str, Any] = {
            "raw": False,
            "strict_map_key": True,
            "use_list": True,
            "max_str_len": limit,
            "max_bin_len": limit,
            "max_array_len": min(limit, _MAX_CONTAINER_LEN),
            "max_map_len": min(limit, _MAX_CONTAINER_LEN),
            "max_ext_len": 0,
            "ext_hook": _reject_ext,
        }
        self._control_limits: dict[str, Any] = {
            **self._unpack_limits,
            "max_str_len": MAX_CONTROL_PAYLOAD,
            "max_bin_len": MAX_CONTROL_PAYLOAD,
            "max_array_len": MAX_METADATA_ENTRIES,
            "max_map_len": MAX_METADATA_ENTRIES,
        }
        self._streams_opened = 0
        self._frames_sent = 0
        self._frames_received = 0
        self._messages_sent = 0
        self._messages_received = 0
        self._bytes_sent = 0
        self._bytes_received = 0

    # ------------------------------------------------------------------ introspection

    @property
    def broken(self) -> bool:
        """True once a protocol error (ours or the peer's) killed the connection."""
        return self._broken is not None

    @property
    def goaway_received(self) -> bool:
        """True once the peer sent GOAWAY."""
        return self._goaway_received

    @property
    def open_streams(self) -> int:
        """Number of streams not yet in a terminal state."""
        return len(self._streams)

    def stream_state(self, stream_id: int) -> StreamState | None:
        """State of a stream, or None if it is unknown or forgotten."""
        st = self._streams.get(stream_id)
        if st is not None:
            return st.state
        return self._closed.get(stream_id)

    def stream_credit(self, stream_id: int) -> StreamCredit | None:
        """Flow-control view of an open stream, or None once it is closed."""
        st = self._streams.get(stream_id)
        if st is None:
            return None
        return StreamCredit(
            st.state,
            st.send_msgs,
            st.send_bytes,
            st.peer_msgs,
            st.peer_bytes,
            st.queued_msgs,
            st.queued_bytes,
        )

    def has_send_credit(self, stream_id: int) -> bool:
        """True if a DATA frame may be sent on the stream now (≥ 1 message, > 0 bytes)."""
        st = self._streams.get(stream_id)
        return st is not None and st.send_msgs >= 1 and st.send_bytes >= 1

    def statistics(self) -> CoreStatistics:
        """Counters since the connection was created."""
        return CoreStatistics(
            open_streams=len(self._streams),
            streams_opened=self._streams_opened,
            frames_sent=self._frames_sent,
            frames_received=self._frames_received,
            messages_sent=self._messages_sent,
            messages_received=self._messages_received,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            queued_messages=sum(s.queued_msgs for s in self._streams.values()),
            queued_bytes=sum(s.queued_bytes for s in self._streams.values()),
            buffered_bytes=self._buffered,
            reserved_bytes=self._reserved(),
        )

    # ------------------------------------------------------------------ sending

    def _frame(self, ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
        self._frames_sent += 1
        self._bytes_sent += HEADER_SIZE + len(payload)
        if payload:
            return HEADER.pack(len(payload), ftype, flags, stream_id) + payload
        return HEADER.pack(0, ftype, flags, stream_id)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise LocalProtocolError(f"the RPC connection is broken: {self._broken}")

    def _stream_for_send(self, stream_id: int) -> _Stream:
        self._check_usable()
        st = self._streams.get(stream_id)
        if st is None:
            state = self._closed.get(stream_id)
            what = f"closed ({state.value})" if state is not None else "unknown"
            raise LocalProtocolError(f"stream {stream_id} is {what}")
        return st

    def _retire(self, stream_id: int, state: StreamState) -> None:
        del self._streams[stream_id]
        if self._remembered:
            self._closed[stream_id] = state
            if len(self._closed) > self._remembered:
                self._closed.popitem(last=False)

    def _apply(self, stream_id: int, st: _Stream, event: StreamInput) -> bool:
        new, deliver = transition(st.state, event)
        self._set_state(stream_id, st, new)
        return deliver

    def _set_state(self, stream_id: int, st: _Stream, new: StreamState) -> None:
        if st.state in _PEER_OPEN and new not in _PEER_OPEN:
            # The peer can send no more here: its reservation ends, its queue is all it holds.
            self._peer_open -= 1
            self._buffered_ended += st.queued_bytes
        st.state = new
        if new in _TERMINAL:
            self._retire(stream_id, new)

    def open_refusal(self, reservation: int | None = None) -> tuple[str, str] | None:
        """Why a new stream cannot be opened (client) or accepted (server) right now, as an
        RPC error ``(code, message)``; None if it can. Per-stream refusals, not failures.

        ``reservation``: what the new stream can make us hold, if less than a full
        :attr:`stream_reservation` (a request that arrived complete with its END)."""
        if self._goaway_sent or self._goaway_received:
            return ("unavailable", "the connection is shutting down")
        if len(self._streams) >= self.max_streams:
            return ("resource_exhausted", f"too many concurrent streams ({self.max_streams})")
        if not self._fits_another_stream(reservation):
            return (
                "resource_exhausted",
                f"too much data buffered on this connection ({self._buffered} bytes queued, "
                f"max_buffered_bytes={self.max_buffered_bytes})",
            )
        return None

    def _fits_another_stream(self, reservation: int | None = None) -> bool:
        """Whether one more stream fits the buffer budget (module docstring)."""
        budget = self.max_buffered_bytes
        if budget is None:
            return True
        extra = self.stream_reservation if reservation is None else reservation
        return self._reserved() + extra <= budget

    def _reserved(self) -> int:
        # Each peer-open stream can hold at most its reservation (queue included: queued +
        # credit <= window); the others hold what they queued.
        return self._peer_open * self.stream_reservation + self._buffered_ended

    def _initial_grant(self, st: _Stream) -> tuple[int, int]:
        """Credit beyond the protocol's initial window that our configuration promises."""
        extra_m = self.window_messages - INITIAL_WINDOW_MESSAGES
        extra_b = self.window_bytes - INITIAL_WINDOW_BYTES
        st.peer_msgs += extra_m
        st.peer_bytes += extra_b
        return extra_m, extra_b

    def send_open(
        self,
        method: str,
        metadata: Mapping[str, Any] | None = None,
        *,
        first: bytes | None = None,
        end: bool = False,
    ) -> tuple[int, bytes]:
        """Open a new stream (client only), optionally with its first message in the same call.

        Args:
            method, metadata: the OPEN frame's content.
            first: an encoded message (:meth:`pack_message`) sent right after the OPEN, as
                :meth:`send_data` would; a unary call is ``first=request, end=True``.
            end: with ``first``: half-close after it (DATA with the END flag).

        Returns:
            ``(stream_id, bytes to send)``.

        Raises:
            TypeError / ValueError: ``method`` or ``metadata`` is malformed or too large.
            LocalProtocolError: not a client, the connection is broken or going away, too many
                open streams, the buffer budget is full, ``first`` is over the size limit, or
                stream ids are exhausted.
        """
        self._check_usable()
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the client opens streams")
        if (
            self._goaway_sent
            or self._goaway_received
            or len(self._streams) >= self.max_streams
            or self.max_buffered_bytes is not None
        ):  # (the common case needs none of open_refusal's work)
            refusal = self.open_refusal()
            if refusal is not None:
                raise LocalProtocolError(f"cannot open a stream: {refusal[1]}")
        if first is not None and len(first) > self.max_message_size:
            raise LocalProtocolError(
                f"message of {len(first)} bytes exceeds max_message_size "
                f"({self.max_message_size} bytes)"
            )
        if end and first is None:
            raise ValueError("end=True needs a first message")
        payload = self._encode_open(method, metadata)
        stream_id = self._last_stream_id + 2 if self._last_stream_id else 1  # 1, 3, 5, ...
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted; open a new connection")
        st = _Stream()
        self._streams[stream_id] = st
        self._peer_open += 1
        self._last_stream_id = stream_id
        self._streams_opened += 1
        self._frames_sent += 1
        self._bytes_sent += HEADER_SIZE + len(payload)
        parts = [_HEADER_PACK(len(payload), _T_OPEN, 0, stream_id), payload]
        if self._extra_window:
            extra_m, extra_b = self._initial_grant(st)
            parts.append(
                self._frame(FrameType.WINDOW, 0, stream_id, _WINDOW.pack(extra_m, extra_b))
            )
        if first is not None:
            # A fresh stream: OPEN, with its initial credit (send_data's checks hold).
            size = len(first)
            st.send_msgs -= 1
            st.send_bytes -= size
            if end:
                st.state = StreamState.HALF_CLOSED_LOCAL  # the peer may still send: no change
            self._messages_sent += 1
            self._frames_sent += 1
            self._bytes_sent += HEADER_SIZE + size
            parts.append(_HEADER_PACK(size, _T_DATA, FLAG_END if end else 0, stream_id))
            parts.append(first)
        return stream_id, b"".join(parts)

    def _encode_open(self, method: str, metadata: Mapping[str, Any] | None) -> bytes:
        if not metadata and type(method) is str:
            cached = self._open_cache.get(method)
            if cached is not None:
                return cached
        if not isinstance(method, str):
            raise TypeError(f"method must be a str, got {type(method).__name__}")
        if not 1 <= len(method.encode("utf-8")) <= MAX_METHOD_LENGTH:
            raise ValueError(f"method name must be 1 to {MAX_METHOD_LENGTH} bytes of UTF-8")
        meta: dict[str, Any] = {}
        if metadata is not None:
            if len(metadata) > MAX_METADATA_ENTRIES:
                raise ValueError(f"metadata has more than {MAX_METADATA_ENTRIES} entries")
            for k, v in metadata.items():
                if not isinstance(k, str):
                    raise TypeError(f"metadata keys must be str, got {type(k).__name__}")
                if not isinstance(v, _SCALARS):
                    raise TypeError(
                        f"metadata values must be str, bytes, int, float, bool or None; "
                        f"{k!r} is {type(v).__name__}"
                    )
                meta[k] = v
        try:
            payload: bytes = self._packer.pack([method, meta])
        except (OverflowError, ValueError) as exc:
            raise ValueError(f"metadata cannot be encoded: {exc}") from exc
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise ValueError(f"method and metadata exceed {MAX_CONTROL_PAYLOAD} bytes encoded")
        if not meta and len(self._open_cache) < _OPEN_CACHE_SIZE:
            self._open_cache[method] = payload
        return payload

    def pack_message(self, message: Any) -> bytes:
        """Encode one message with msgpack and check its size.

        Raises:
            TypeError: the value is not msgpack-able (dict/list/str/int/float/bytes/bool/None).
            LocalProtocolError: the encoded message exceeds ``max_message_size``.
        """
        try:
            payload: bytes = self._packer.pack(message)
        except (OverflowError, ValueError) as exc:
            raise TypeError(f"message cannot be encoded with msgpack: {exc}") from exc
        if len(payload) > self.max_message_size:
            raise LocalProtocolError(
                f"message of {len(payload)} bytes exceeds max_message_size "
                f"({self.max_message_size} bytes)"
            )
        return payload

    def send_data(self, stream_id: int, payload: bytes, *, end: bool = False) -> bytes:
        """Send one already-encoded message (from :meth:`pack_message`); ``end`` half-closes.

        Raises:
            LocalProtocolError: the stream is not open for sending, there is no send credit
                (check :meth:`has_send_credit` first), or the payload is over the size limit.
        """
        st = self._streams.get(stream_id)
        if st is None or self._broken is not None:
            st = self._stream_for_send(stream_id)  # raises
        size = len(payload)
        if size > self.max_message_size:
            raise LocalProtocolError(
                f"message of {size} bytes exceeds max_message_size ({self.max_message_size} bytes)"
            )
        # Validate every transition before touching credit or state (the common ones are
        # read off the table in advance; the rest go through transition(), which raises).
        state = (_AFTER_SEND_DATA_END if end else _AFTER_SEND_DATA).get(st.state)
        if state is None:
            state = transition(st.state, StreamInput.SEND_DATA)[0]
            if end:
                state = transition(state, StreamInput.SEND_END)[0]
        if st.send_msgs < 1 or st.send_bytes < 1:
            raise LocalProtocolError(f"no send credit on stream {stream_id}")
        st.send_msgs -= 1
        st.send_bytes -= size
        if state is not st.state:
            self._set_state(stream_id, st, state)
        self._messages_sent += 1
        self._frames_sent += 1
        self._bytes_sent += HEADER_SIZE + size
        return _HEADER_PACK(size, _T_DATA, FLAG_END if end else 0, stream_id) + payload

    def send_message(self, stream_id: int, message: Any, *, end: bool = False) -> bytes:
        """:meth:`pack_message` then :meth:`send_data`."""
        return self.send_data(stream_id, self.pack_message(message), end=end)

    def send_end(self, stream_id: int) -> bytes:
        """Half-close our side of the stream."""
        st = self._stream_for_send(stream_id)
        self._apply(stream_id, st, StreamInput.SEND_END)
        return self._frame(FrameType.END, 0, stream_id)

    def send_cancel(self, stream_id: int) -> bytes:
        """Abandon the stream in both directions."""
        st = self._stream_for_send(stream_id)
        self._apply(stream_id, st, StreamInput.SEND_CANCEL)
        return self._frame(FrameType.CANCEL, 0, stream_id)

    def send_error(self, stream_id: int, code: str, message: str) -> bytes:
        """Fail the stream in both directions with ``code`` and ``message``.

        ``message`` is truncated to 1024 characters. Raises ValueError for a malformed code.
        """
        validate_code(code)
        payload = self._packer.pack([code, str(message)[:MAX_ERROR_MESSAGE_LENGTH]])
        st = self._stream_for_send(stream_id)
        self._apply(stream_id, st, StreamInput.SEND_ERROR)
        return self._frame(FrameType.ERROR, 0, stream_id, payload)

    def send_goaway(self, code: str = "ok", message: str = "") -> bytes:
        """Tell the peer we accept no new streams (server) or open none (client)."""
        self._check_usable()
        validate_code(code)
        self._goaway_sent = True
        payload = self._packer.pack(
            [self._last_stream_id, code, str(message)[:MAX_ERROR_MESSAGE_LENGTH]]
        )
        return self._frame(FrameType.GOAWAY, 0, 0, payload)

    def send_ping(self, payload: bytes) -> bytes:
        """A PING carrying exactly 8 opaque bytes; the peer answers with a PONG echoing them."""
        self._check_usable()
        if not isinstance(payload, bytes) or len(payload) != PING_PAYLOAD_SIZE:
            raise ValueError(f"ping payload must be {PING_PAYLOAD_SIZE} bytes")
        return self._frame(FrameType.PING, 0, 0, payload)

    def message_consumed(self, stream_id: int, size: int) -> bytes:
        """Report that the application took one received message of ``size`` bytes, or that
        it was discarded (a reset stream's queue): either way we no longer hold it.

        Call it exactly once for every :class:`MessageReceived`, even after the stream closed:
        the connection's buffer budget counts every message until then.

        Returns:
            A WINDOW frame to send if the peer's credit fell to half the window or less,
            else ``b""``. Closed or unknown streams return ``b""``.
        """
        self._buffered -= size
        st = self._streams.get(stream_id)
        if st is None or st.state not in _PEER_OPEN:
            self._buffered_ended -= size
        if st is None or self._broken is not None:
            return b""
        st.queued_msgs -= 1
        st.queued_bytes -= size
        if st.state is not StreamState.OPEN and st.state is not StreamState.HALF_CLOSED_LOCAL:
            return b""  # the peer ended: it needs no more credit
        return self._maybe_grant(stream_id, st)

    def _maybe_grant(self, stream_id: int, st: _Stream) -> bytes:
        # Grant back what the application consumed once it reaches half the window (in
        # messages or in bytes), h2-style: few WINDOW frames, and never a deadlock, because a
        # sender out of credit means queued + consumed >= window on this side.
        grant_m = self.window_messages - st.peer_msgs - st.queued_msgs
        grant_b = self.window_bytes - st.peer_bytes - st.queued_bytes
        if grant_m * 2 < self.window_messages and grant_b * 2 < self.window_bytes:
            return b""
        grant_m = max(0, grant_m)
        grant_b = max(0, grant_b)
        st.peer_msgs += grant_m
        st.peer_bytes += grant_b
        self._apply(stream_id, st, StreamInput.SEND_WINDOW)
        return self._frame(FrameType.WINDOW, 0, stream_id, _WINDOW.pack(grant_m, grant_b))

    def _owe(self, frame: bytes) -> None:
        """Queue a frame the protocol owes the peer, refusing to let a peer that floods us
        with PINGs or refused OPENs while not reading our answers grow the queue forever."""
        if len(self._pending) + len(frame) > MAX_PENDING_OUTPUT:
            self._fail(
                f"the peer keeps asking for answers it does not read "
                f"(more than {MAX_PENDING_OUTPUT} bytes owed)"
            )
        self._pending += frame

    @property
    def receive_buffered(self) -> int:
        """Bytes received and not yet parsed into events (a partly received frame, or more)."""
        return len(self._buf) - self._pos

    def has_data_to_send(self) -> bool:
        """True if :meth:`data_to_send` would return frames."""
        return bool(self._pending)

    def data_to_send(self) -> bytes:
        """Frames the protocol owes the peer (PONGs, refusals, window grants); drains them."""
        if not self._pending:
            return b""
        data = bytes(self._pending)
        self._pending.clear()
        return data

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes received from the peer; ``b""`` marks the peer's end-of-file.

        Nothing is parsed until :meth:`next_event` (h11's contract, :mod:`transport.sansio`).

        Raises:
            LocalProtocolError: called after the connection broke or after EOF.
        """
        self._check_usable()
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if not data:
            self._eof = True
            return
        self._bytes_received += len(data)
        if self._pos:
            del self._buf[: self._pos]  # cheap: CPython drops a bytearray's head in place
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | type[NEED_DATA]:
        """Parse buffered bytes up to the next event; :data:`NEED_DATA` if more are needed.

        Frames that produce no event (legal ones crossing our own END/CANCEL, PINGs, which
        only owe a PONG to :meth:`data_to_send`) are consumed on the way. After the peer's
        end-of-file, one :class:`ConnectionEnded` comes once every complete frame was taken.

        Raises:
            RemoteProtocolError: the peer violated the protocol (the connection is then dead).
            LocalProtocolError: called after the connection broke.
        """
        if self._broken is not None:
            raise LocalProtocolError(f"the RPC connection is broken: {self._broken}")
        buf = self._buf
        try:
            while True:
                pos = self._pos
                n = len(buf)
                if n - pos < HEADER_SIZE:
                    break
                length, ftype, flags, stream_id = _HEADER_UNPACK(buf, pos)
                # Every length is checked as soon as the header is complete, before the
                # payload is waited for, so a peer cannot make us buffer more than one frame.
                limit = self.max_message_size if ftype == _T_DATA else MAX_CONTROL_PAYLOAD
                if length > limit:
                    self._fail(
                        f"{_frame_name(ftype)} frame of {length} bytes exceeds the limit of "
                        f"{limit} bytes"
                    )
                start = pos + HEADER_SIZE
                end = start + length
                if end > n:
                    break
                self._pos = end
                self._frames_received += 1
                st = self._streams.get(stream_id)
                if ftype == _T_OPEN and self._merge_first:
                    request = self._unary_request(stream_id, start, end)
                    if request is not None:
                        return request
                if ftype == _T_DATA and st is not None:
                    # Fast path, inline: a message on a stream whose peer may send.
                    after = (_AFTER_DATA_END if flags == FLAG_END else _AFTER_DATA).get(st.state)
                    if after is not None and flags & ~FLAG_END == 0:
                        if st.peer_msgs < 1 or st.peer_bytes < 1:
                            self._fail(f"DATA on stream {stream_id} without credit")
                        if length <= _COPY_BELOW:
                            message = self._decode(buf[start:end], self._unpack_limits, "message")
                        else:
                            with memoryview(buf) as view, view[start:end] as payload:
                                message = self._decode(payload, self._unpack_limits, "message")
                        st.peer_msgs -= 1
                        st.peer_bytes -= length
                        self._messages_received += 1
                        self._buffered += length
                        st.queued_msgs += 1
                        st.queued_bytes += length
                        if after is not st.state:
                            self._set_state(stream_id, st, after)  # (after queuing: see there)
                        return MessageReceived(stream_id, message, length, flags == FLAG_END)
                # Everything else. The payload is a view into the buffer, released before the
                # buffer can change.
                event: Event | None
                with memoryview(buf) as view, view[start:end] as payload:
                    if ftype == _T_DATA and st is not None:
                        event = self._receive_message(stream_id, st, flags, payload)
                    else:
                        ft = _FRAME_TYPES.get(ftype)
                        if ft is None:
                            self._fail(f"unknown frame type 0x{ftype:02x}")
                        event = self._handle(ft, flags, stream_id, payload)
                if event is not None:
                    return event
            if self._pos and self._pos == len(buf):
                buf.clear()
                self._pos = 0
            if self._eof:
                if len(buf) > self._pos:  # whatever is left is an incomplete frame
                    self._fail(
                        f"connection closed in the middle of a frame ({len(buf) - self._pos} bytes)"
                    )
                if not self._eof_reported:
                    self._eof_reported = True
                    return ConnectionEnded()
            return NEED_DATA
        except RemoteProtocolError as exc:
            self._broken = str(exc)
            raise
        except LocalProtocolError as exc:  # an internal check tripped by peer input
            self._broken = str(exc)
            raise RemoteProtocolError(str(exc)) from exc

    def _fail(self, reason: str) -> NoReturn:
        self._broken = reason
        raise RemoteProtocolError(reason)

    def _receive_message(
        self, stream_id: int, st: _Stream, flags: int, payload: memoryview
    ) -> MessageReceived:
        # The general path (next_event inlines the common case): errors for DATA where the
        # table does not allow it, and flags that are not ours.
        if flags & ~FLAG_END:
            self._fail(f"DATA frame with unknown flags 0x{flags:02x}")
        state = transition(st.state, StreamInput.RECV_DATA)[0]
        end = bool(flags & FLAG_END)
        if end:
            state = transition(state, StreamInput.RECV_END)[0]
        if st.peer_msgs < 1 or st.peer_bytes < 1:
            self._fail(f"DATA on stream {stream_id} without credit")
        size = len(payload)
        message = self._decode(payload, self._unpack_limits, "message")
        st.peer_msgs -= 1
        st.peer_bytes -= size
        self._messages_received += 1
        self._buffered += size
        st.queued_msgs += 1
        st.queued_bytes += size
        self._set_state(stream_id, st, state)
        return MessageReceived(stream_id, message, size, end)

    def _handle(
        self,
        ftype: FrameType,
        flags: int,
        stream_id: int,
        payload: memoryview,
    ) -> Event | None:
        if flags & ~(FLAG_END if ftype is FrameType.DATA else 0):
            self._fail(f"{ftype.name} frame with unknown flags 0x{flags:02x}")
        if ftype in (FrameType.GOAWAY, FrameType.PING, FrameType.PONG):
            if stream_id != 0:
                self._fail(f"{ftype.name} frame on stream {stream_id} (must be 0)")
            return self._handle_connection_frame(ftype, payload)
        if stream_id == 0:
            self._fail(f"{ftype.name} frame on stream 0")
        if ftype is FrameType.OPEN:
            return self._handle_open(stream_id, payload)
        st = self._streams.get(stream_id)
        if st is None:
            self._handle_closed_stream(ftype, stream_id)
            return None
        if ftype is FrameType.DATA:
            return self._receive_message(stream_id, st, flags, payload)
        if ftype is FrameType.END:
            self._expect_empty(ftype, payload)
            return StreamEnded(stream_id) if self._apply(stream_id, st, _I.RECV_END) else None
        if ftype is FrameType.CANCEL:
            self._expect_empty(ftype, payload)
            if self._apply(stream_id, st, _I.RECV_CANCEL):
                return StreamCancelled(stream_id)
            return None
        if ftype is FrameType.ERROR:
            code, message = self._decode_error(payload)
            if self._apply(stream_id, st, _I.RECV_ERROR):
                return StreamErrored(stream_id, code, message)
            return None
        # WINDOW
        if len(payload) != _WINDOW.size:
            self._fail(f"WINDOW frame payload of {len(payload)} bytes (must be 8)")
        grant_m, grant_b = _WINDOW.unpack(payload)
        if not self._apply(stream_id, st, _I.RECV_WINDOW):
            return None
        if st.send_msgs + grant_m > MAX_WINDOW or st.send_bytes + grant_b > MAX_WINDOW:
            self._fail(f"WINDOW on stream {stream_id} overflows the credit limit")
        st.send_msgs += grant_m
        st.send_bytes += grant_b
        return WindowUpdated(stream_id, grant_m, grant_b)

    def _handle_closed_stream(self, ftype: FrameType, stream_id: int) -> None:
        """A frame for a stream that is not open: ignore, or reject as unknown/after close."""
        if stream_id % 2 == 0 or stream_id > self._last_stream_id:
            self._fail(f"{ftype.name} frame for unknown stream {stream_id}")
        state = self._closed.get(stream_id)
        if state is None:
            return  # closed long ago and forgotten: drop (bounded memory, see module doc)
        transition(state, _RECV_INPUT[ftype])  # raises RemoteProtocolError if not allowed

    def _handle_open(
        self, stream_id: int, payload: memoryview
    ) -> StreamOpened | RequestReceived | None:
        if self.role is not Role.SERVER:
            self._fail("the server sent OPEN (only the client opens streams)")
        if stream_id % 2 == 0 or stream_id <= self._last_stream_id or stream_id > MAX_STREAM_ID:
            self._fail(
                f"OPEN with stream id {stream_id}: ids must be odd and increasing "
                f"(last was {self._last_stream_id})"
            )
        if self._goaway_received:
            self._fail("OPEN after the client sent GOAWAY")
        raw = bytes(payload)
        method = self._open_decoded.get(raw)  # validated before: [method, {}] seen already
        if method is not None:
            metadata: dict[str, Any] = {}
        else:
            decoded = self._decode(payload, self._control_limits, "OPEN payload")
            if not (isinstance(decoded, list) and len(decoded) == 2):
                self._fail("OPEN payload must be [method, metadata]")
            # Checked while still untyped (Any): compiled (transport/accel.py), a typed name
            # checks its type on assignment, which would raise TypeError, not our error.
            peer_method, peer_metadata = decoded
            if (
                not isinstance(peer_method, str)
                or not 1 <= len(peer_method.encode()) <= MAX_METHOD_LENGTH
            ):
                self._fail("OPEN method must be a string of 1 to 256 UTF-8 bytes")
            if not isinstance(peer_metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, _SCALARS) for k, v in peer_metadata.items()
            ):
                self._fail("OPEN metadata must map strings to scalar values")
            method, metadata = peer_method, peer_metadata
            if not metadata and len(self._open_decoded) < _OPEN_CACHE_SIZE:
                self._open_decoded[raw] = method
        self._last_stream_id = stream_id
        # A request that came complete with its END holds only its own bytes, not a whole
        # stream's reservation: unary calls are admitted while streams hold the budget.
        complete = self._peek_first_message(stream_id) if self._merge_first else None
        refusal = self.open_refusal(None if complete is None else complete)
        if refusal is not None:
            code, text = refusal
            payload_out = self._packer.pack([code, text])
            self._owe(self._frame(FrameType.ERROR, 0, stream_id, payload_out))
            if self._remembered:
                self._closed[stream_id] = StreamState.RESET_LOCAL
                if len(self._closed) > self._remembered:
                    self._closed.popitem(last=False)
            return None
        st = _Stream()
        self._streams[stream_id] = st
        self._peer_open += 1
        self._streams_opened += 1
        if self._extra_window:
            extra_m, extra_b = self._initial_grant(st)
            self._owe(self._frame(FrameType.WINDOW, 0, stream_id, _WINDOW.pack(extra_m, extra_b)))
        if self._merge_first:
            first = self._take_first_message(stream_id, st)
            if first is not None:
                message, size, end = first
                return RequestReceived(stream_id, method, metadata, message, size, end)
        return StreamOpened(stream_id, method, metadata)

    def _unary_request(self, stream_id: int, start: int, end: int) -> RequestReceived | None:
        """next_event's fast path for the common unary call (server, ``merge_first_message``):
        an OPEN seen before (cached) for a new, valid id, directly followed in the buffer by the
        whole request with its END, admitted by every limit. Consumes both frames and returns
        one event; returns None, consuming nothing, for anything else (the general path then
        handles the OPEN, with every check and error)."""
        if (
            stream_id % 2 == 0
            or stream_id <= self._last_stream_id
            or stream_id > MAX_STREAM_ID
            or self._goaway_received
            or self._goaway_sent
            or len(self._streams) >= self.max_streams
        ):
            return None
        buf = self._buf
        method = self._open_decoded.get(bytes(buf[start:end]))
        if method is None:
            return None
        n = len(buf)
        if n - end < HEADER_SIZE:
            return None
        length, ftype, flags, sid = _HEADER_UNPACK(buf, end)
        data_start = end + HEADER_SIZE
        data_end = data_start + length
        if (
            ftype != _T_DATA
            or sid != stream_id
            or flags != FLAG_END
            or length > self.max_message_size
            or data_end > n
        ):
            return None
        budget = self.max_buffered_bytes
        if budget is not None and self._reserved() + length > budget:
            return None
        if length <= _COPY_BELOW:
            message = self._decode(buf[data_start:data_end], self._unpack_limits, "message")
        else:
            with memoryview(buf) as view, view[data_start:data_end] as data:
                message = self._decode(data, self._unpack_limits, "message")
        # The stream is born half-closed by the peer, holding its one message (what the
        # general path reaches through OPEN then DATA|END; the peer never held a reservation).
        st = _Stream()
        st.state = StreamState.HALF_CLOSED_REMOTE
        st.peer_msgs -= 1
        st.peer_bytes -= length
        st.queued_msgs = 1
        st.queued_bytes = length
        if self._extra_window:  # (the grant is owed even though the peer will not use it)
            extra_m, extra_b = self._initial_grant(st)
            self._owe(self._frame(FrameType.WINDOW, 0, stream_id, _WINDOW.pack(extra_m, extra_b)))
        self._streams[stream_id] = st
        self._last_stream_id = stream_id
        self._streams_opened += 1
        self._pos = data_end
        self._frames_received += 1  # (the OPEN was counted by next_event)
        self._messages_received += 1
        self._buffered += length
        self._buffered_ended += length
        return RequestReceived(stream_id, method, {}, message, length, True)

    def _peek_first_message(self, stream_id: int) -> int | None:
        """The size of the next buffered frame if it is a complete DATA with END for
        ``stream_id`` (a whole unary request), else None."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        length, ftype, flags, sid = _HEADER_UNPACK(buf, pos)
        if (
            ftype != _T_DATA
            or sid != stream_id
            or flags != FLAG_END
            or length > self.max_message_size
            or pos + HEADER_SIZE + length > len(buf)
        ):
            return None
        return int(length)

    def _take_first_message(self, stream_id: int, st: _Stream) -> tuple[Any, int, bool] | None:
        """If the next buffered frame is a complete, plain DATA for the stream just opened,
        consume it (see ``merge_first_message``); anything else is left to next_event."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        length, ftype, flags, sid = _HEADER_UNPACK(buf, pos)
        start = pos + HEADER_SIZE
        end = start + length
        if (
            ftype != _T_DATA
            or sid != stream_id
            or flags & ~FLAG_END
            or length > self.max_message_size
            or end > len(buf)
        ):
            return None
        self._pos = end
        self._frames_received += 1
        if length <= _COPY_BELOW:
            message = self._decode(buf[start:end], self._unpack_limits, "message")
        else:
            with memoryview(buf) as view, view[start:end] as data:
                message = self._decode(data, self._unpack_limits, "message")
        # A fresh stream holds its initial credit and is OPEN (see next_event's fast path).
        st.peer_msgs -= 1
        st.peer_bytes -= length
        self._messages_received += 1
        self._buffered += length
        st.queued_msgs += 1
        st.queued_bytes += length
        if flags:
            self._set_state(stream_id, st, StreamState.HALF_CLOSED_REMOTE)
        return message, length, bool(flags)

    def _handle_connection_frame(
        self, ftype: FrameType, payload: memoryview
    ) -> PongReceived | GoAwayReceived | None:
        if ftype is FrameType.PING or ftype is FrameType.PONG:
            if len(payload) != PING_PAYLOAD_SIZE:
                self._fail(f"{ftype.name} payload of {len(payload)} bytes (must be 8)")
            if ftype is FrameType.PING:
                self._owe(self._frame(FrameType.PONG, 0, 0, bytes(payload)))
                return None
            return PongReceived(bytes(payload))
        decoded = self._decode(payload, self._control_limits, "GOAWAY payload")
        if not (
            isinstance(decoded, list)
            and len(decoded) == 3
            and isinstance(decoded[0], int)
            and not isinstance(decoded[0], bool)
            and 0 <= decoded[0] <= MAX_STREAM_ID
            and isinstance(decoded[1], str)
            and isinstance(decoded[2], str)
        ):
            self._fail("GOAWAY payload must be [last_stream_id, code, message]")
        last_id, code, message = decoded
        self._check_code(code, "GOAWAY")
        self._goaway_received = True
        return GoAwayReceived(last_id, code, message[:MAX_ERROR_MESSAGE_LENGTH])

    def _decode_error(self, payload: memoryview) -> tuple[str, str]:
        decoded = self._decode(payload, self._control_limits, "ERROR payload")
        if not (
            isinstance(decoded, list)
            and len(decoded) == 2
            and isinstance(decoded[0], str)
            and isinstance(decoded[1], str)
        ):
            self._fail("ERROR payload must be [code, message]")
        self._check_code(decoded[0], "ERROR")
        return decoded[0], decoded[1][:MAX_ERROR_MESSAGE_LENGTH]

    def _check_code(self, code: str, what: str) -> None:
        try:
            validate_code(code)
        except ValueError:
            self._fail(f"{what} frame with a malformed code")

    def _expect_empty(self, ftype: FrameType, payload: memoryview) -> None:
        if len(payload):
            self._fail(f"{ftype.name} frame with a {len(payload)}-byte payload (must be empty)")

    def _decode(self, payload: memoryview | bytearray, limits: dict[str, Any], what: str) -> Any:
        try:
            return msgpack.unpackb(payload, **limits)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # ExtraData, FormatError, StackError, UnicodeDecodeError, limit errors, ext types
            self._fail(f"malformed msgpack in {what}: {type(exc).__name__}: {exc}")


_RECV_INPUT: Final = {
    FrameType.DATA: StreamInput.RECV_DATA,
    FrameType.END: StreamInput.RECV_END,
    FrameType.CANCEL: StreamInput.RECV_CANCEL,
    FrameType.ERROR: StreamInput.RECV_ERROR,
    FrameType.WINDOW: StreamInput.RECV_WINDOW,
}
