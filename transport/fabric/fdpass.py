"""Non-blocking SOCK_SEQPACKET send/receive with SCM_RIGHTS fd passing (sync helpers).

Callers wait with ``trio.lowlevel.wait_readable`` / ``wait_writable`` on ``BlockingIOError``.
Received fds are created close-on-exec (``MSG_CMSG_CLOEXEC``) so they never leak into
subprocesses by accident, and every fd that is not handed to the caller is closed here.
"""

from __future__ import annotations

import array
import os
import select
import socket
from typing import Final

from transport.fabric.wire import MAX_MESSAGE_SIZE

__all__ = ["MAX_FDS_PER_MESSAGE", "send_message", "recv_message", "close_fds"]

#: No fabric message carries more than one fd; room for a few more lets us see (and close)
#: extras a confused peer attached instead of having the kernel silently truncate them.
MAX_FDS_PER_MESSAGE: Final = 4
_INT_SIZE: Final = array.array("i").itemsize
_ANC_SPACE: Final = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _INT_SIZE)


def close_fds(fds: list[int]) -> None:
    """Close every fd in ``fds`` (ignoring ones already closed)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send_message(sock: socket.socket, data: bytes, fd: int | None = None) -> None:
    """Send one datagram, with ``fd`` as SCM_RIGHTS if given. Raises ``BlockingIOError``."""
    if fd is None:
        sock.send(data)
    else:
        fds = array.array("i", [fd])
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])


def recv_message(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """Receive one datagram: ``(data, fds, truncated)``.

    ``truncated`` is true when the datagram or its ancillary data did not fit (both are
    protocol errors). An *empty datagram* is returned as ``(b"", fds, False)``: it is not
    end-of-file (fabric messages are never empty, so the caller rejects it like any malformed
    message and keeps serving).

    Raises:
        BlockingIOError: nothing is queued (non-blocking socket).
        EOFError: the peer has closed its end.
    """
    data, ancdata, flags, _ = sock.recvmsg(
        MAX_MESSAGE_SIZE + 1, _ANC_SPACE, socket.MSG_CMSG_CLOEXEC
    )
    if not data and not ancdata and _peer_closed(sock):
        raise EOFError("the peer closed the fabric socket")
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _INT_SIZE
            fds.extend(array.array("i", payload[:usable]))
    truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)) or len(data) > MAX_MESSAGE_SIZE
    return data, fds, truncated


def _peer_closed(sock: socket.socket) -> bool:
    """True if the peer has closed: on SOCK_SEQPACKET, ``recvmsg`` returns no bytes both for
    end-of-file and for an empty datagram; only the hang-up flags tell them apart."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(mask & (select.POLLRDHUP | select.POLLHUP) for _, mask in poller.poll(0))
