"""The NSM client used by code inside an enclave (trio).

:meth:`NsmClient.open` finds the enclave's NSM the way the runtime provides it:

1. ``ENCLAVE_NSM_FD=<fd>``: an inherited ``AF_UNIX`` socket whose other end the supervisor
   serves with :func:`attest.nsm.server.serve_nsm`. The runtime creates it with
   ``socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)`` and passes one end to the child
   (``pass_fds``), so one datagram is one CBOR request or response. A ``SOCK_STREAM`` end is
   accepted too (messages then carry a u32 big-endian length prefix).
2. Otherwise the real ``/dev/nsm`` (inside a real Nitro enclave): one ``ioctl`` per request with
   nsm-api's ``struct nsm_message { struct iovec request; struct iovec response; }`` and
   request number ``_IOWR(0x0A, 0, struct nsm_message)``; run in a worker thread since it blocks.

Requests go one at a time per channel (the protocol has no request ids), so every client of a
process shares one channel per ``ENCLAVE_NSM_FD`` and a lock orders their requests. Errors from
the device surface as :class:`~attest.errors.NsmError` with the NSM's error name in ``.code``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from typing import Any, Final, Protocol, TypedDict

import trio

from attest.errors import NsmError, NsmUnavailableError
from attest.nsm.protocol import (
    NSM_REQUEST_MAX_SIZE,
    NSM_RESPONSE_MAX_SIZE,
    Attestation,
    AttestationResponse,
    DescribeNSM,
    DescribeNSMResponse,
    DescribePCR,
    DescribePCRResponse,
    ErrorResponse,
    ExtendPCR,
    ExtendPCRResponse,
    GetRandom,
    GetRandomResponse,
    LockPCR,
    LockPCRResponse,
    LockPCRs,
    LockPCRsResponse,
    MessageError,
    Request,
    Response,
    decode_response,
    encode_request,
)
from attest.nsm.server import FRAME_HEADER

__all__ = [
    "NSM_FD_ENV",
    "NSM_DEVICE_PATH",
    "NSM_IOCTL_REQUEST",
    "NsmClient",
    "NsmDescription",
    "NsmTransport",
    "SocketTransport",
    "StreamTransport",
    "DevNsmTransport",
    "nsm_ioctl",
]

#: Environment variable carrying the inherited NSM channel's file descriptor number.
NSM_FD_ENV: Final = "ENCLAVE_NSM_FD"
#: The real NSM character device inside a Nitro enclave.
NSM_DEVICE_PATH: Final = "/dev/nsm"
#: nsm-api driver: ``NSM_IOCTL_MAGIC`` 0x0A, command 0.
_NSM_IOCTL_MAGIC: Final = 0x0A


class _IoVec(ctypes.Structure):
    # Linux uapi ``struct nsm_iovec { __u64 addr; __u64 len; }`` (= ``struct iovec`` on 64-bit)
    _fields_ = (("iov_base", ctypes.c_uint64), ("iov_len", ctypes.c_uint64))


class _NsmMessage(ctypes.Structure):
    # Linux uapi ``struct nsm_raw { struct nsm_iovec request; struct nsm_iovec response; }``
    _fields_ = (("request", _IoVec), ("response", _IoVec))


def _iowr(magic: int, nr: int, size: int) -> int:
    # Linux asm-generic/ioctl.h: dir(2 bits, 3 = read|write) | size(14) | type(8) | nr(8).
    return (3 << 30) | (size << 16) | (magic << 8) | nr


#: ``_IOWR(0x0A, 0, struct nsm_message)`` = 0xC0200A00 on 64-bit Linux (struct is 32 bytes).
NSM_IOCTL_REQUEST: Final = _iowr(_NSM_IOCTL_MAGIC, 0, ctypes.sizeof(_NsmMessage))

IoctlFn = Callable[[int, int, Any, bool], int]


class NsmDescription(TypedDict):
    """:meth:`NsmClient.describe_nsm`'s answer: the NSM's DescribeNSM fields (nsm-api's
    ``Response::DescribeNSM``), ``locked_pcrs`` as a sorted list."""

    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: list[int]
    #: the PCR bank's hash ("SHA384")
    digest: str


def nsm_ioctl(fd: int, request: bytes, *, ioctl: IoctlFn = fcntl.ioctl) -> bytes:
    """One blocking NSM round trip through the nsm driver's ioctl.

    ``ioctl`` is injectable for tests. The driver writes the response into our 12288-byte
    buffer and its length into ``response.iov_len``.

    Raises:
        NsmError: ``InputTooLarge`` (request over 4096 bytes or errno EMSGSIZE), ``InternalError``
            (any other errno, or a response length the buffer cannot hold).
    """
    if len(request) > NSM_REQUEST_MAX_SIZE:
        raise NsmError("InputTooLarge")
    req_buf = ctypes.create_string_buffer(request, len(request))
    resp_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
    msg = _NsmMessage(
        _IoVec(ctypes.addressof(req_buf), len(request)),
        _IoVec(ctypes.addressof(resp_buf), NSM_RESPONSE_MAX_SIZE),
    )
    try:
        ioctl(fd, NSM_IOCTL_REQUEST, msg, True)
    except OSError as exc:
        if exc.errno == errno.EMSGSIZE:
            raise NsmError("InputTooLarge") from exc
        raise NsmError("InternalError", f"NSM ioctl failed: {exc}") from exc
    length = msg.response.iov_len
    if length > NSM_RESPONSE_MAX_SIZE:
        raise NsmError("InternalError", "NSM response longer than its buffer")
    return resp_buf.raw[:length]


class NsmTransport(Protocol):
    """Carries one request and returns its response; one request at a time."""

    async def roundtrip(self, request: bytes) -> bytes: ...

    async def aclose(self) -> None: ...


class SocketTransport:
    """An NSM channel on a socket (SEQPACKET/DGRAM datagrams or length-prefixed STREAM)."""

    def __init__(self, sock: socket.socket | trio.socket.SocketType) -> None:
        self._sock = (
            sock
            if isinstance(sock, trio.socket.SocketType)
            else trio.socket.from_stdlib_socket(sock)
        )
        self._datagram = self._sock.type != socket.SOCK_STREAM
        self._stream = None if self._datagram else trio.SocketStream(self._sock)
        self._lock = trio.Lock()
        self._users = 1

    async def roundtrip(self, request: bytes) -> bytes:
        async with self._lock:
            try:
                if self._datagram:
                    await self._sock.send(request)
                    buf = bytearray(NSM_RESPONSE_MAX_SIZE + 1)
                    n = await self._sock.recv_into(buf, len(buf), socket.MSG_TRUNC)
                    if n == 0:
                        raise NsmUnavailableError("the NSM channel was closed")
                    if n > NSM_RESPONSE_MAX_SIZE:
                        raise NsmError("InternalError", "NSM response exceeds 12288 bytes")
                    return bytes(buf[:n])
                assert self._stream is not None
                await self._stream.send_all(FRAME_HEADER.pack(len(request)) + request)
                (length,) = FRAME_HEADER.unpack(await _exactly(self._stream, FRAME_HEADER.size))
                if length > NSM_RESPONSE_MAX_SIZE:
                    raise NsmError("InternalError", "NSM response exceeds 12288 bytes")
                return await _exactly(self._stream, length)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise NsmUnavailableError(f"NSM channel failed: {exc}") from exc

    async def aclose(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self._sock.close()


class StreamTransport:
    """An NSM channel on any ``trio.abc.Stream`` (length-prefixed messages)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._lock = trio.Lock()

    async def roundtrip(self, request: bytes) -> bytes:
        async with self._lock:
            try:
                await self._stream.send_all(FRAME_HEADER.pack(len(request)) + request)
                (length,) = FRAME_HEADER.unpack(await _exactly(self._stream, FRAME_HEADER.size))
                if length > NSM_RESPONSE_MAX_SIZE:
                    raise NsmError("InternalError", "NSM response exceeds 12288 bytes")
                return await _exactly(self._stream, length)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise NsmUnavailableError(f"NSM channel failed: {exc}") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class DevNsmTransport:
    """The real ``/dev/nsm`` of a Nitro enclave (ioctl in a worker thread)."""

    def __init__(self, path: str = NSM_DEVICE_PATH, *, ioctl: IoctlFn = fcntl.ioctl) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NsmUnavailableError(f"cannot open {path}: {exc}") from exc
        self._ioctl = ioctl
        self._limiter = trio.CapacityLimiter(1)

    async def roundtrip(self, request: bytes) -> bytes:
        if self._fd < 0:
            raise NsmUnavailableError("the NSM device was closed")
        fd, ioctl = self._fd, self._ioctl
        return await trio.to_thread.run_sync(
            lambda: nsm_ioctl(fd, request, ioctl=ioctl), limiter=self._limiter
        )

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


async def _exactly(stream: trio.abc.Stream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise NsmUnavailableError("the NSM channel was closed mid-message")
        data += chunk
    return bytes(data)


#: Shared per-process channel for ENCLAVE_NSM_FD (the protocol allows one request in flight).
_shared: dict[int, SocketTransport] = {}


class NsmClient:
    """Talks to the enclave's NSM. Create with :meth:`open` (or the ``from_*`` constructors).

    Methods mirror nsm-api's requests; each raises :class:`~attest.errors.NsmError` (``.code`` =
    the NSM error name) when the device refuses, and :class:`~attest.errors.NsmUnavailableError`
    when the channel is gone.
    """

    def __init__(self, transport: NsmTransport) -> None:
        self._transport = transport
        self._closed = False

    @classmethod
    async def open(cls) -> NsmClient:
        """Connect to this enclave's NSM: ``ENCLAVE_NSM_FD`` if set, else ``/dev/nsm``.

        Raises:
            NsmUnavailableError: neither is available.
        """
        fd_text = os.environ.get(NSM_FD_ENV)
        if fd_text:
            try:
                fd = int(fd_text)
            except ValueError as exc:
                raise NsmUnavailableError(f"{NSM_FD_ENV}={fd_text!r} is not a number") from exc
            transport = _shared.get(fd)
            if transport is not None and transport._users > 0:
                transport._users += 1
                return cls(transport)
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError as exc:
                raise NsmUnavailableError(
                    f"{NSM_FD_ENV}={fd} is not a usable socket: {exc}"
                ) from exc
            transport = SocketTransport(sock)
            _shared[fd] = transport
            return cls(transport)
        if await trio.Path(NSM_DEVICE_PATH).exists():
            return cls(DevNsmTransport())
        raise NsmUnavailableError(
            f"no NSM: {NSM_FD_ENV} is not set and {NSM_DEVICE_PATH} is absent"
        )

    @classmethod
    def from_socket(cls, sock: socket.socket | trio.socket.SocketType) -> NsmClient:
        """A client on an NSM socket this caller owns (closed by :meth:`aclose`)."""
        return cls(SocketTransport(sock))

    @classmethod
    def from_stream(cls, stream: trio.abc.Stream) -> NsmClient:
        """A client on a byte stream served by :func:`~attest.nsm.server.serve_nsm`."""
        return cls(StreamTransport(stream))

    async def request(self, request: Request) -> Response:
        """Send one request; returns the response or raises :class:`NsmError` for errors."""
        if self._closed:
            raise NsmUnavailableError("the NSM client is closed")
        data = encode_request(request)
        if len(data) > NSM_REQUEST_MAX_SIZE:
            raise NsmError("InputTooLarge", f"NSM request of {len(data)} bytes exceeds 4096")
        raw = await self._transport.roundtrip(data)
        try:
            response = decode_response(raw)
        except MessageError as exc:
            raise NsmError(exc.code, str(exc)) from exc
        if isinstance(response, ErrorResponse):
            raise NsmError(response.code)
        return response

    async def _expect(self, request: Request, kind: type[Any]) -> Any:
        response = await self.request(request)
        if not isinstance(response, kind):
            raise NsmError(
                "InvalidResponse", f"expected {kind.__name__}, got {type(response).__name__}"
            )
        return response

    async def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """Ask for an attestation document (COSE_Sign1 bytes) binding the given fields."""
        r: AttestationResponse = await self._expect(
            Attestation(user_data=user_data, nonce=nonce, public_key=public_key),
            AttestationResponse,
        )
        return r.document

    async def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data``; returns the new value."""
        r: ExtendPCRResponse = await self._expect(ExtendPCR(index, bytes(data)), ExtendPCRResponse)
        return r.data

    async def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        """Return ``(locked, value)`` of PCR ``index``."""
        r: DescribePCRResponse = await self._expect(DescribePCR(index), DescribePCRResponse)
        return r.lock, r.data

    async def lock_pcr(self, index: int) -> None:
        """Lock PCR ``index`` (it then appears in attestation documents)."""
        await self._expect(LockPCR(index), LockPCRResponse)

    async def lock_pcrs(self, range_: int) -> None:
        """Lock PCRs ``[0, range_)``."""
        await self._expect(LockPCRs(range_), LockPCRsResponse)

    async def describe_nsm(self) -> NsmDescription:
        """Return DescribeNSM's fields (``locked_pcrs`` as a sorted list)."""
        r: DescribeNSMResponse = await self._expect(DescribeNSM(), DescribeNSMResponse)
        return {
            "version_major": r.version_major,
            "version_minor": r.version_minor,
            "version_patch": r.version_patch,
            "module_id": r.module_id,
            "max_pcrs": r.max_pcrs,
            "locked_pcrs": sorted(r.locked_pcrs),
            "digest": r.digest,
        }

    async def get_random(self) -> bytes:
        """Return random bytes from the NSM (256 per call)."""
        r: GetRandomResponse = await self._expect(GetRandom(), GetRandomResponse)
        return r.random

    async def aclose(self) -> None:
        """Release the channel (idempotent)."""
        if not self._closed:
            self._closed = True
            await self._transport.aclose()

    async def __aenter__(self) -> NsmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
