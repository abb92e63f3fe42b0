"""Events produced by :meth:`transport.rpc.RpcConnection.receive_data`.

One frozen dataclass per protocol event, as in h11 and wsproto. The adapter dispatches on the
class; each field is documented on the class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Event",
    "StreamOpened",
    "MessageReceived",
    "RequestReceived",
    "StreamEnded",
    "StreamCancelled",
    "StreamErrored",
    "WindowUpdated",
    "GoAwayReceived",
    "PongReceived",
    "ConnectionEnded",
]


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every RPC event."""


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The client opened a stream (server side only).

    Attributes:
        stream_id: the new stream's id (odd, strictly increasing).
        method: the method name, 1 to 256 bytes of UTF-8.
        metadata: string keys to scalar values (str, bytes, int, float, bool, None).
    """

    stream_id: int
    method: str
    metadata: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """One message arrived on a stream.

    Attributes:
        stream_id: the stream it belongs to.
        message: the decoded msgpack value.
        size: its encoded size in bytes (what it cost in byte credit). Pass it back to
            :meth:`~transport.rpc.RpcConnection.message_consumed` once the application took it.
        end: True if the sender half-closed with this message (DATA frame with the END flag);
            no :class:`StreamEnded` follows in that case.
    """

    stream_id: int
    message: Any
    size: int
    end: bool = False


@dataclass(frozen=True, slots=True)
class RequestReceived(Event):
    """A stream opened and its first message arrived together: :class:`StreamOpened` and
    :class:`MessageReceived` in one event (a unary call's OPEN and DATA|END usually share a
    read). Only a core made with ``merge_first_message=True`` produces it; the fields are
    those of the two events.
    """

    stream_id: int
    method: str
    metadata: Mapping[str, Any]
    message: Any
    size: int
    end: bool = False


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer half-closed the stream: it sends no more messages on it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamCancelled(Event):
    """The peer cancelled the stream; both directions are closed."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamErrored(Event):
    """The peer failed the stream with an error; both directions are closed.

    Attributes:
        code: machine-readable error code (``[a-z][a-z0-9_.-]{0,63}``).
        message: human-readable text (at most 1024 characters).
    """

    stream_id: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class WindowUpdated(Event):
    """The peer granted more send credit on a stream.

    Attributes:
        messages: additional messages we may send.
        nbytes: additional payload bytes we may send.
    """

    stream_id: int
    messages: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer is shutting the connection down: no new streams will be accepted.

    Attributes:
        last_stream_id: the highest stream id the peer processed or will process.
        code: why (``"ok"`` for a graceful shutdown).
        message: human-readable text.
    """

    last_stream_id: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """The answer to one of our PINGs; ``payload`` echoes the 8 bytes we sent."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class ConnectionEnded(Event):
    """The peer closed the byte stream cleanly, at a frame boundary."""
