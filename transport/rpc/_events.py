"""Events produced by :meth:`transport.rpc.RpcConnection.next_event`.

One immutable value class per protocol event, as in h11 and wsproto. The adapter dispatches on
the class; each field is documented on the class. Events compare equal when their class and
fields are equal, and show their fields in ``repr``.

Why not frozen dataclasses (what they were until stop 20): a frozen dataclass's ``__init__``
sets each field through ``object.__setattr__``, ~1.1-1.4 µs for a ``RequestReceived`` here,
which ``perf`` put at ~38% of the compiled core's ``next_event`` for a unary call, on the
critical path of every round trip. These classes assign their ``__slots__`` directly (~0.3 µs
interpreted), and they are compiled with the cores (``transport.accel``), where construction
is ~0.03 µs and the ``Final`` fields refuse assignment at run time (``AttributeError``); run
interpreted, mypy enforces ``Final``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

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


class Event:
    """Base class of every RPC event: equality, ``repr`` and hashing over the fields."""

    __slots__ = ()
    #: the event's fields, in constructor order
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Event)
        return self._values() == other._values()

    def __hash__(self) -> int:  # (a TypeError for events holding a dict, as with dataclasses)
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__match_args__)
        return f"{type(self).__name__}({fields})"


class StreamOpened(Event):
    """The client opened a stream (server side only).

    Attributes:
        stream_id: the new stream's id (odd, strictly increasing).
        method: the method name, 1 to 256 bytes of UTF-8.
        metadata: string keys to scalar values (str, bytes, int, float, bool, None).
    """

    __slots__ = ("metadata", "method", "stream_id")
    __match_args__ = ("stream_id", "method", "metadata")

    def __init__(self, stream_id: int, method: str, metadata: Mapping[str, Any]) -> None:
        self.stream_id: Final = stream_id
        self.method: Final = method
        self.metadata: Final = metadata


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

    __slots__ = ("end", "message", "size", "stream_id")
    __match_args__ = ("stream_id", "message", "size", "end")

    def __init__(self, stream_id: int, message: Any, size: int, end: bool = False) -> None:
        self.stream_id: Final = stream_id
        self.message: Final[Any] = message
        self.size: Final = size
        self.end: Final = end


class RequestReceived(Event):
    """A stream opened and its first message arrived together: :class:`StreamOpened` and
    :class:`MessageReceived` in one event (a unary call's OPEN and DATA|END usually share a
    read). Only a core made with ``merge_first_message=True`` produces it; the fields are
    those of the two events.
    """

    __slots__ = ("end", "message", "metadata", "method", "size", "stream_id")
    __match_args__ = ("stream_id", "method", "metadata", "message", "size", "end")

    def __init__(
        self,
        stream_id: int,
        method: str,
        metadata: Mapping[str, Any],
        message: Any,
        size: int,
        end: bool = False,
    ) -> None:
        self.stream_id: Final = stream_id
        self.method: Final = method
        self.metadata: Final = metadata
        self.message: Final[Any] = message
        self.size: Final = size
        self.end: Final = end


class StreamEnded(Event):
    """The peer half-closed the stream: it sends no more messages on it."""

    __slots__ = ("stream_id",)
    __match_args__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id: Final = stream_id


class StreamCancelled(Event):
    """The peer cancelled the stream; both directions are closed."""

    __slots__ = ("stream_id",)
    __match_args__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id: Final = stream_id


class StreamErrored(Event):
    """The peer failed the stream with an error; both directions are closed.

    Attributes:
        code: machine-readable error code (``[a-z][a-z0-9_.-]{0,63}``).
        message: human-readable text (at most 1024 characters).
    """

    __slots__ = ("code", "message", "stream_id")
    __match_args__ = ("stream_id", "code", "message")

    def __init__(self, stream_id: int, code: str, message: str) -> None:
        self.stream_id: Final = stream_id
        self.code: Final = code
        self.message: Final = message


class WindowUpdated(Event):
    """The peer granted more send credit on a stream.

    Attributes:
        messages: additional messages we may send.
        nbytes: additional payload bytes we may send.
    """

    __slots__ = ("messages", "nbytes", "stream_id")
    __match_args__ = ("stream_id", "messages", "nbytes")

    def __init__(self, stream_id: int, messages: int, nbytes: int) -> None:
        self.stream_id: Final = stream_id
        self.messages: Final = messages
        self.nbytes: Final = nbytes


class GoAwayReceived(Event):
    """The peer is shutting the connection down: no new streams will be accepted.

    Attributes:
        last_stream_id: the highest stream id the peer processed or will process.
        code: why (``"ok"`` for a graceful shutdown).
        message: human-readable text.
    """

    __slots__ = ("code", "last_stream_id", "message")
    __match_args__ = ("last_stream_id", "code", "message")

    def __init__(self, last_stream_id: int, code: str, message: str) -> None:
        self.last_stream_id: Final = last_stream_id
        self.code: Final = code
        self.message: Final = message


class PongReceived(Event):
    """The answer to one of our PINGs; ``payload`` echoes the 8 bytes we sent."""

    __slots__ = ("payload",)
    __match_args__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload: Final = payload


class ConnectionEnded(Event):
    """The peer closed the byte stream cleanly, at a frame boundary."""

    __slots__ = ()
