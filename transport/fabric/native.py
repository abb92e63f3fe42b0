"""Native backend: real ``AF_VSOCK`` sockets (inside a real Nitro enclave, or forced).

Python's ``AF_VSOCK`` sockets take ``(cid, port)`` tuples as addresses; errors are mapped onto the
project's tree (a refused or reset connect is :class:`VsockConnectionRefused`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket as _stdlib_socket
import struct
from typing import Final

import trio

from transport.errors import VsockConnectionRefused, VsockError
from transport.fabric.addressing import VMADDR_CID_ANY, VsockAddr

__all__ = [
    "IOCTL_VM_SOCKETS_GET_LOCAL_CID",
    "VSOCK_DEVICE",
    "af_vsock_supported",
    "local_cid",
    "native_sockaddr",
    "open_native_stream",
    "open_native_listener",
]

#: ``_IO(7, 0xb9)`` from linux/vm_sockets.h: ask /dev/vsock for this machine's CID.
IOCTL_VM_SOCKETS_GET_LOCAL_CID: Final = 0x7B9
#: The vsock control device.
VSOCK_DEVICE: Final = "/dev/vsock"
#: Backlog of native listeners (same reasoning as the emulated host backend).
_LISTEN_BACKLOG: Final = 1024
#: A connect that fails with one of these means "nobody there" (vsock reports ECONNRESET
#: for a missing listener on some transports).
_REFUSED_ERRNOS: Final = frozenset({errno.ECONNREFUSED, errno.ECONNRESET})


def af_vsock_supported() -> bool:
    """True if this Python and kernel can create ``AF_VSOCK`` stream sockets."""
    family = getattr(_stdlib_socket, "AF_VSOCK", None)
    if family is None:
        return False
    try:
        _stdlib_socket.socket(family, _stdlib_socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def local_cid(device: str = VSOCK_DEVICE) -> int | None:
    """This machine's CID from ``/dev/vsock`` (None when unavailable)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, b"\0" * 4)
    except OSError:
        return None
    finally:
        os.close(fd)
    (cid,) = struct.unpack("=I", raw)
    return int(cid)


def native_sockaddr(addr: VsockAddr) -> tuple[int, int]:
    """The sockaddr Python's ``AF_VSOCK`` sockets take for ``addr``."""
    return addr.as_tuple()


def _family() -> int:
    family = getattr(_stdlib_socket, "AF_VSOCK", None)
    if family is None:
        raise VsockError("AF_VSOCK is not available on this platform")
    return int(family)


async def open_native_stream(addr: VsockAddr) -> trio.SocketStream:
    """Connect a real ``AF_VSOCK`` stream to ``addr``."""
    sock = trio.socket.socket(_family(), _stdlib_socket.SOCK_STREAM)
    try:
        await sock.connect(native_sockaddr(addr))
    except OSError as exc:
        sock.close()
        if exc.errno in _REFUSED_ERRNOS:
            raise VsockConnectionRefused(f"connection to {addr} refused") from exc
        raise VsockError(f"cannot connect to {addr}: {exc.strerror}") from exc
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def open_native_listener(port: int, *, cid: int = VMADDR_CID_ANY) -> trio.SocketListener:
    """Listen on a real ``AF_VSOCK`` socket at ``(cid, port)``."""
    addr = VsockAddr(cid, port)
    sock = trio.socket.socket(_family(), _stdlib_socket.SOCK_STREAM)
    try:
        await sock.bind(native_sockaddr(addr))
        sock.listen(_LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise VsockError(f"cannot listen at {addr}: {exc.strerror}") from exc
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)
