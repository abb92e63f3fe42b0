"""Serve an :class:`~attest.nsm.device.NsmDevice` to one enclave (host side, trio).

The runtime creates ``socket.socketpair(AF_UNIX, SOCK_SEQPACKET)`` per enclave, passes one end
to the child (its number in ``ENCLAVE_NSM_FD``) and runs ``serve_nsm(other_end, device)`` in the
enclave's supervisor. On a ``SOCK_SEQPACKET`` (or ``SOCK_DGRAM``) socket one datagram is one CBOR
request and one datagram is its response, the way one ioctl carries one request/response pair on
``/dev/nsm``. Requests larger than 4096 bytes are detected with ``MSG_TRUNC`` (the kernel reports
the full datagram length) and answered ``{"Error": "InputTooLarge"}``.

On a byte stream (a ``SOCK_STREAM`` socket or any ``trio.abc.Stream``, e.g. in tests) each
message is framed with a 4-byte big-endian length prefix; a request whose declared length
exceeds the cap is answered ``InputTooLarge`` and the stream is closed (it cannot be resynced
without reading an attacker-chosen amount).

``serve_nsm`` returns when the enclave closes its end.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

import structlog
import trio

from attest.nsm.device import NsmDevice
from attest.nsm.protocol import NSM_REQUEST_MAX_SIZE, ErrorResponse, encode_response

__all__ = ["serve_nsm", "FRAME_HEADER"]


def _log() -> structlog.typing.FilteringBoundLogger:
    # Looked up per use, not cached at import: the few events here are rare (channel closed),
    # and a fresh proxy always follows the process's current logging configuration.
    return structlog.get_logger()  # type: ignore[no-any-return]


#: Length prefix of a message on a byte stream: u32 big-endian.
FRAME_HEADER: Final = struct.Struct(">I")
#: Receive buffer: one byte more than the largest request, to tell "full" from "too big".
_RECV_SIZE: Final = NSM_REQUEST_MAX_SIZE + 1
_TOO_LARGE: Final = encode_response(ErrorResponse("InputTooLarge"))


async def serve_nsm(
    sock: socket.socket | trio.socket.SocketType | trio.abc.Stream,
    device: NsmDevice,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer NSM requests from ``sock`` with ``device`` until the peer closes it.

    Args:
        sock: the supervisor's end of the enclave's NSM channel: a stdlib or trio socket
            (SEQPACKET/DGRAM: datagram per message; STREAM: length-prefixed) or a trio Stream.
        device: the enclave's NSM.
        task_status: ``started()`` once serving (for ``nursery.start``).

    Resource handling: the socket or stream is closed when this returns or is cancelled.
    """
    if isinstance(sock, trio.abc.Stream):
        async with sock:
            task_status.started()
            await _serve_stream(sock, device)
        return
    tsock = (
        sock if isinstance(sock, trio.socket.SocketType) else trio.socket.from_stdlib_socket(sock)
    )
    with tsock:
        if tsock.type == socket.SOCK_STREAM:
            stream = trio.SocketStream(tsock)
            task_status.started()
            await _serve_stream(stream, device)
            return
        task_status.started()
        await _serve_datagrams(tsock, device)


async def _serve_datagrams(tsock: trio.socket.SocketType, device: NsmDevice) -> None:
    buf = bytearray(_RECV_SIZE)
    while True:
        try:
            n = await tsock.recv_into(buf, _RECV_SIZE, socket.MSG_TRUNC)
        except OSError as exc:  # the enclave died mid-datagram: nothing left to serve
            _log().info("nsm_channel_closed", reason=str(exc))
            return
        if n == 0:
            return
        response = _TOO_LARGE if n > NSM_REQUEST_MAX_SIZE else device.handle(bytes(buf[:n]))
        try:
            await tsock.send(response)
        except OSError as exc:
            _log().info("nsm_channel_closed", reason=str(exc))
            return


async def _receive_exactly(stream: trio.abc.Stream, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            if data:
                _log().info("nsm_stream_truncated", received=len(data), expected=n)
            return None
        data += chunk
    return bytes(data)


async def _serve_stream(stream: trio.abc.Stream, device: NsmDevice) -> None:
    try:
        while True:
            header = await _receive_exactly(stream, FRAME_HEADER.size)
            if header is None:
                return
            (length,) = FRAME_HEADER.unpack(header)
            if length > NSM_REQUEST_MAX_SIZE:
                await stream.send_all(FRAME_HEADER.pack(len(_TOO_LARGE)) + _TOO_LARGE)
                _log().info("nsm_request_too_large", length=length)
                return
            request = await _receive_exactly(stream, length)
            if request is None:
                return
            response = device.handle(request)
            await stream.send_all(FRAME_HEADER.pack(len(response)) + response)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        _log().info("nsm_channel_closed", reason=str(exc))
