"""``enclave-relay/1``: what an enclave asks the parent's relay, and the answer (pure).

The enclave connects to the relay on ``(3, port)`` and sends one request; the relay answers with
one reply and, if it connected the peer, relays bytes both ways from then on (the enclaves run
``enclave-channel/1`` over it, so the relay only sees the handshake's public documents and then
ciphertext). Integers are unsigned big-endian (``transport/RELAY.md`` is the specification)::

    request = "ERL1" ‖ kind (u8) ‖ port (u32) ‖ length (u8) ‖ target (length bytes)
        kind 1 CID:   target = the CID (u32, length 4)
        kind 2 NAME:  target = an enclave's exact name (UTF-8, 1..MAX_NAME bytes)
        kind 3 GROUP: target = a name; any running enclave of that name (the name or its
                      de-duplicated replicas NAME_1, NAME_2...), the least busy
    reply   = status (u8) ‖ cid (u32)        cid: the enclave connected (0 if refused)

Everything is bounded before it is buffered: a request is at most :data:`MAX_REQUEST` bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from transport.errors import ConfigurationError, RemoteProtocolError
from transport.fabric.addressing import MAX_ENCLAVE_CID, MIN_ENCLAVE_CID, U32_MAX

__all__ = [
    "MAGIC",
    "MAX_NAME",
    "MAX_REQUEST",
    "REPLY_SIZE",
    "TargetKind",
    "RelayStatus",
    "RelayRequest",
    "RequestReader",
    "encode_reply",
    "decode_reply",
]

#: First bytes of every request: protocol and version.
MAGIC: Final = b"ERL1"
#: Longest enclave name a request may carry (bytes of UTF-8).
MAX_NAME: Final = 128
_HEAD: Final = struct.Struct("!4sBIB")  # magic, kind, port, target length
_REPLY: Final = struct.Struct("!BI")  # status, cid
#: Largest request (bytes).
MAX_REQUEST: Final = _HEAD.size + MAX_NAME
#: Size of the reply (bytes).
REPLY_SIZE: Final = _REPLY.size


class TargetKind(enum.IntEnum):
    """How a request names the peer."""

    CID = 1
    NAME = 2
    GROUP = 3


class RelayStatus(enum.IntEnum):
    """The relay's answer."""

    OK = 0  #: connected: bytes flow from now on
    DENIED = 1  #: no allowlist rule allows it
    NOT_FOUND = 2  #: no running enclave has that name / CID
    UNREACHABLE = 3  #: found, but nothing answered on that port
    BUSY = 4  #: no free connection slot
    MALFORMED = 5  #: the request broke the protocol


def _check_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= MAX_NAME or not name.isprintable():
        raise ConfigurationError(
            f"an enclave name must be 1..{MAX_NAME} bytes of printable UTF-8, got {name!r}"
        )
    return raw


@dataclass(frozen=True, slots=True)
class RelayRequest:
    """One request: the peer (by CID, exact name, or any enclave of a name) and its port.

    Raises:
        ConfigurationError: a CID that is not an enclave's, a bad name, a port out of range.
    """

    kind: TargetKind
    target: int | str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port < U32_MAX:
            raise ConfigurationError(f"port {self.port} is out of range 0..{U32_MAX - 1}")
        if self.kind is TargetKind.CID:
            if not isinstance(self.target, int) or not (
                MIN_ENCLAVE_CID <= self.target <= MAX_ENCLAVE_CID
            ):
                raise ConfigurationError(f"{self.target!r} is not an enclave CID")
        elif not isinstance(self.target, str):
            raise ConfigurationError("a name target must be a string")
        else:
            _check_name(self.target)

    def encode(self) -> bytes:
        """The request's bytes."""
        if isinstance(self.target, int):
            body = self.target.to_bytes(4, "big")
        else:
            body = _check_name(self.target)
        return _HEAD.pack(MAGIC, self.kind, self.port, len(body)) + body

    def describe(self) -> str:
        """For logs and messages: ``cid 17 port 5005``, ``name 'model' port 5005``..."""
        return f"{self.kind.name.lower()} {self.target!r} port {self.port}"


class RequestReader:
    """Sans-IO parser of one request: :meth:`feed` bytes until it returns the request.

    Raises :class:`~transport.errors.RemoteProtocolError` as soon as the bytes cannot start a
    valid request (wrong magic, unknown kind, a length out of bounds, bytes after the request),
    never buffering more than :data:`MAX_REQUEST`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = _HEAD.size
        self.request: RelayRequest | None = None

    def feed(self, data: bytes | bytearray) -> RelayRequest | None:
        """Add received bytes; the request once complete, else None."""
        if self.request is not None:
            raise RemoteProtocolError("bytes after the relay request (wait for the reply)")
        self._buf += data
        if len(self._buf) >= _HEAD.size and self._need == _HEAD.size:
            magic, kind, _port, length = _HEAD.unpack_from(self._buf)
            if magic != MAGIC:
                raise RemoteProtocolError("not an enclave-relay/1 request")
            if kind not in TargetKind.__members__.values():
                raise RemoteProtocolError(f"unknown target kind {kind}")
            if kind == TargetKind.CID and length != 4:
                raise RemoteProtocolError("a CID target must be 4 bytes")
            if not 1 <= length <= MAX_NAME:
                raise RemoteProtocolError(f"target length {length} is out of bounds")
            self._need = _HEAD.size + length
        if len(self._buf) < self._need:
            return None
        if len(self._buf) > self._need:
            raise RemoteProtocolError("bytes after the relay request (wait for the reply)")
        _magic, kind, port, _length = _HEAD.unpack_from(self._buf)
        body = bytes(self._buf[_HEAD.size :])
        try:
            if kind == TargetKind.CID:
                target: int | str = int.from_bytes(body, "big")
            else:
                target = body.decode("utf-8")
            self.request = RelayRequest(TargetKind(kind), target, port)
        except (UnicodeDecodeError, ConfigurationError) as exc:
            raise RemoteProtocolError(f"bad relay request: {exc}") from None
        return self.request


def encode_reply(status: RelayStatus, cid: int = 0) -> bytes:
    """The reply's bytes."""
    return _REPLY.pack(status, cid)


def decode_reply(data: bytes) -> tuple[RelayStatus, int]:
    """``(status, cid)`` from exactly :data:`REPLY_SIZE` bytes.

    Raises:
        RemoteProtocolError: wrong size or unknown status.
    """
    if len(data) != REPLY_SIZE:
        raise RemoteProtocolError("relay reply has the wrong size")
    status, cid = _REPLY.unpack(data)
    try:
        return RelayStatus(status), cid
    except ValueError:
        raise RemoteProtocolError(f"unknown relay status {status}") from None
