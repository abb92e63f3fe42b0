"""The broker protocol: sans-IO codec for the messages between an enclave and its broker.

Theory of operation
-------------------
Inside an emulated enclave, ``ENCLAVE_FABRIC_FD`` is one end of an ``AF_UNIX``/``SOCK_SEQPACKET``
socket pair; the other end belongs to the enclave's supervisor (the broker). SEQPACKET keeps
message boundaries, so one message is one datagram and there is nothing to re-chunk. The enclave
sends requests; the broker answers each one with exactly one reply carrying the same request id,
and sends an unsolicited ``Incoming`` message per connection accepted on an enclave listener.
Connected sockets travel as ``SCM_RIGHTS`` ancillary data next to ``Connected`` and ``Incoming``:
after that one round trip the two ends talk over a kernel socket, the broker is out of the path.

Wire format (all integers unsigned big-endian)::

    offset size  field
    0      1     version          1
    1      1     kind             see below
    2      2     reserved         0
    4      4     request_id       1 … 2**32-1 for requests and their replies, 0 for Incoming
    8      n     body             fixed size per kind

    enclave -> broker
    0x01 Connect    cid u32, port u32           reply Connected (1 fd) or Refused
    0x02 Listen     port u32 (0xFFFFFFFF: any)  reply Listening or Refused
    0x03 Unlisten   port u32                    no reply (sent from a synchronous close())
    broker -> enclave
    0x81 Connected  local_port u32              + exactly one fd: the connected socket
    0x82 Listening  port u32                    the bound port (resolves a wildcard)
    0x83 Refused    errno u32                   ECONNREFUSED, EADDRINUSE, EINVAL, ...
    0x84 Incoming   port u32, peer_cid u32, peer_port u32   + exactly one fd

Every message has a fixed size no larger than :data:`MAX_MESSAGE_SIZE`; anything else (another
version, an unknown kind, a wrong length, a non-zero reserved field, the wrong number of fds for
the kind, a request id of 0 on a request) is a :class:`~transport.errors.RemoteProtocolError`.
Decoding does bounded work on any input. This module does no I/O and holds no state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from transport.errors import LocalProtocolError, RemoteProtocolError
from transport.fabric.addressing import U32_MAX, VsockAddr

__all__ = [
    "VERSION",
    "MAX_MESSAGE_SIZE",
    "MAX_ERRNO",
    "Kind",
    "Connect",
    "Listen",
    "Unlisten",
    "Connected",
    "Listening",
    "Refused",
    "Incoming",
    "Request",
    "Reply",
    "Message",
    "encode",
    "decode_request",
    "decode_reply",
    "fds_carried",
]

#: Protocol version in every header; a peer speaking another version is refused.
VERSION: Final = 1
#: Largest message on the wire (bytes): the header plus the largest body (Incoming, 12 bytes),
#: rounded up. Receivers read at most this much; a longer datagram is truncated and rejected.
MAX_MESSAGE_SIZE: Final = 32
#: Largest errno a Refused may carry (Linux errnos are < 4096, see MAX_ERRNO in linux/err.h).
MAX_ERRNO: Final = 4095

_HEADER: Final = struct.Struct("!BBHI")
_U32: Final = struct.Struct("!I")
_U32X2: Final = struct.Struct("!II")
_U32X3: Final = struct.Struct("!III")


class Kind:
    """Message kind codes (byte 1 of the header)."""

    CONNECT: Final = 0x01
    LISTEN: Final = 0x02
    UNLISTEN: Final = 0x03
    CONNECTED: Final = 0x81
    LISTENING: Final = 0x82
    REFUSED: Final = 0x83
    INCOMING: Final = 0x84


def _check_u32(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
        raise LocalProtocolError(f"{name} must be a 32-bit unsigned int, got {value!r}")


def _check_request_id(request_id: int) -> None:
    _check_u32("request_id", request_id)
    if request_id == 0:
        raise LocalProtocolError("request_id 0 is reserved for unsolicited messages")


@dataclass(frozen=True, slots=True)
class Connect:
    """Enclave asks for a connection to ``addr``."""

    request_id: int
    addr: VsockAddr


@dataclass(frozen=True, slots=True)
class Listen:
    """Enclave asks to listen on ``port`` of its own CID (``VMADDR_PORT_ANY``: any port)."""

    request_id: int
    port: int


@dataclass(frozen=True, slots=True)
class Unlisten:
    """Enclave closed its listener on ``port`` (no reply)."""

    request_id: int
    port: int


@dataclass(frozen=True, slots=True)
class Connected:
    """The connect succeeded; the connected socket travels with this message."""

    request_id: int
    local_port: int


@dataclass(frozen=True, slots=True)
class Listening:
    """The listen succeeded on ``port``."""

    request_id: int
    port: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The request failed with ``errno`` (policy denials are ``ECONNREFUSED``, like vsock)."""

    request_id: int
    errno: int


@dataclass(frozen=True, slots=True)
class Incoming:
    """A connection to the enclave's listener on ``port`` from ``peer``; carries its socket."""

    port: int
    peer: VsockAddr


Request = Connect | Listen | Unlisten
Reply = Connected | Listening | Refused | Incoming
Message = Request | Reply


def fds_carried(message: Message) -> int:
    """How many file descriptors travel with ``message`` (0 or 1)."""
    return 1 if isinstance(message, Connected | Incoming) else 0


def encode(message: Message) -> bytes:
    """Serialize ``message``. Raises :class:`LocalProtocolError` on out-of-range fields."""
    if isinstance(message, Connect):
        _check_request_id(message.request_id)
        return _HEADER.pack(VERSION, Kind.CONNECT, 0, message.request_id) + _U32X2.pack(
            message.addr.cid, message.addr.port
        )
    if isinstance(message, Incoming):
        return _HEADER.pack(VERSION, Kind.INCOMING, 0, 0) + _U32X3.pack(
            _u32("port", message.port), message.peer.cid, message.peer.port
        )
    kind, value = _single_field(message)
    _check_request_id(message.request_id)
    return _HEADER.pack(VERSION, kind, 0, message.request_id) + _U32.pack(value)


def _u32(name: str, value: int) -> int:
    _check_u32(name, value)
    return value


def _single_field(message: Listen | Unlisten | Connected | Listening | Refused) -> tuple[int, int]:
    if isinstance(message, Listen):
        return Kind.LISTEN, _u32("port", message.port)
    if isinstance(message, Unlisten):
        return Kind.UNLISTEN, _u32("port", message.port)
    if isinstance(message, Connected):
        return Kind.CONNECTED, _u32("local_port", message.local_port)
    if isinstance(message, Listening):
        return Kind.LISTENING, _u32("port", message.port)
    if not 1 <= message.errno <= MAX_ERRNO:
        raise LocalProtocolError(f"errno must be 1 … {MAX_ERRNO}, got {message.errno!r}")
    return Kind.REFUSED, message.errno


#: Body size of each kind (bytes); the whole message is header + body exactly.
_BODY_SIZE: Final[dict[int, int]] = {
    Kind.CONNECT: _U32X2.size,
    Kind.LISTEN: _U32.size,
    Kind.UNLISTEN: _U32.size,
    Kind.CONNECTED: _U32.size,
    Kind.LISTENING: _U32.size,
    Kind.REFUSED: _U32.size,
    Kind.INCOMING: _U32X3.size,
}
_REQUEST_KINDS: Final = frozenset({Kind.CONNECT, Kind.LISTEN, Kind.UNLISTEN})
_REPLY_KINDS: Final = frozenset({Kind.CONNECTED, Kind.LISTENING, Kind.REFUSED, Kind.INCOMING})


def _split(data: bytes, allowed: frozenset[int]) -> tuple[int, int, memoryview]:
    if len(data) < _HEADER.size:
        raise RemoteProtocolError(f"fabric message too short ({len(data)} bytes)")
    if len(data) > MAX_MESSAGE_SIZE:
        raise RemoteProtocolError(f"fabric message too long ({len(data)} bytes)")
    version, kind, reserved, request_id = _HEADER.unpack_from(data)
    if version != VERSION:
        raise RemoteProtocolError(f"unsupported fabric protocol version {version}")
    if kind not in allowed:
        raise RemoteProtocolError(f"unexpected fabric message kind 0x{kind:02x}")
    if reserved != 0:
        raise RemoteProtocolError("reserved header field is not zero")
    body = memoryview(data)[_HEADER.size :]
    if len(body) != _BODY_SIZE[kind]:
        raise RemoteProtocolError(
            f"fabric message kind 0x{kind:02x} has a {len(body)}-byte body, "
            f"expected {_BODY_SIZE[kind]}"
        )
    if kind == Kind.INCOMING:
        if request_id != 0:
            raise RemoteProtocolError("Incoming must carry request id 0")
    elif request_id == 0:
        raise RemoteProtocolError("request id 0 on a request or reply")
    return kind, request_id, body


def _check_fds(kind: int, expected: int, fd_count: int) -> None:
    if fd_count != expected:
        raise RemoteProtocolError(
            f"fabric message kind 0x{kind:02x} came with {fd_count} fds, expected {expected}"
        )


def decode_request(data: bytes, *, fd_count: int = 0) -> Request:
    """Parse a message an enclave sent to its broker (requests never carry fds).

    Raises:
        RemoteProtocolError: anything that is not exactly one valid request.
    """
    kind, request_id, body = _split(data, _REQUEST_KINDS)
    _check_fds(kind, 0, fd_count)
    if kind == Kind.CONNECT:
        cid, port = _U32X2.unpack(body)
        return Connect(request_id, VsockAddr(cid, port))
    (port,) = _U32.unpack(body)
    if kind == Kind.LISTEN:
        return Listen(request_id, port)
    return Unlisten(request_id, port)


def decode_reply(data: bytes, *, fd_count: int = 0) -> Reply:
    """Parse a message a broker sent to its enclave; ``fd_count`` fds came with it.

    Raises:
        RemoteProtocolError: anything that is not exactly one valid reply.
    """
    kind, request_id, body = _split(data, _REPLY_KINDS)
    if kind == Kind.INCOMING:
        _check_fds(kind, 1, fd_count)
        port, peer_cid, peer_port = _U32X3.unpack(body)
        return Incoming(port, VsockAddr(peer_cid, peer_port))
    (value,) = _U32.unpack(body)
    if kind == Kind.CONNECTED:
        _check_fds(kind, 1, fd_count)
        return Connected(request_id, value)
    _check_fds(kind, 0, fd_count)
    if kind == Kind.LISTENING:
        return Listening(request_id, value)
    if not 1 <= value <= MAX_ERRNO:
        raise RemoteProtocolError(f"Refused carries an invalid errno {value}")
    return Refused(request_id, value)
