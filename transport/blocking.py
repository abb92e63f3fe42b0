"""A blocking vsock connect, for code that runs before any event loop (an enclave's init).

:func:`transport.vsock.open_vsock_stream` is the API for applications; it needs trio. An
enclave's init (``runtime.enclave_init``) does one tiny exchange with the parent (the boot
heartbeat on ``(3, 9000)``) before the application starts, and importing trio for it would cost
~90 ms of every fresh-interpreter enclave start. So this module offers the same connection as a
plain blocking ``socket.socket``, importing only the standard library and the fabric's pure
codecs, with the same two enclave-side backends as :mod:`transport.vsock`:

- inside an emulated enclave (``ENCLAVE_FABRIC_FD`` set): one ``Connect`` round trip with the
  runtime's broker over the inherited fabric socket, which answers with the connected socket;
- inside a real Nitro enclave: a real ``AF_VSOCK`` connect.

The host side (socket files in a fabric directory) has no use for it and is not served.
"""

from __future__ import annotations

import os
import socket
from typing import Final

from transport.errors import VsockConnectionRefused, VsockError
from transport.fabric import fdpass, wire
from transport.fabric.addressing import FABRIC_FD_ENV, VMADDR_CID_PARENT, VsockAddr

__all__ = ["connect_vsock_blocking", "BLOCKING_REQUEST_ID", "VsockAddr", "VMADDR_CID_PARENT"]

#: Request id used for the broker round trip. The trio enclave client numbers its requests from
#: 1 upward, so a blocking connect made before it (or beside it) never shares an id with one.
BLOCKING_REQUEST_ID: Final = 0xFFFFFFFF


def connect_vsock_blocking(addr: VsockAddr, *, timeout_s: float) -> socket.socket:
    """Connect to ``addr`` and return a blocking socket whose timeout is ``timeout_s``.

    Raises:
        VsockConnectionRefused: nobody listens there, or the fabric's policy forbids it.
        VsockError: no enclave-side backend here, or the broker answered nonsense.
        TimeoutError: the broker or the peer did not answer within ``timeout_s``.
    """
    fabric_fd = os.environ.get(FABRIC_FD_ENV)
    if fabric_fd is not None:
        try:
            fd = int(fabric_fd)
        except ValueError:
            raise VsockError(f"{FABRIC_FD_ENV}={fabric_fd!r} is not a file descriptor") from None
        return _connect_through_broker(fd, addr, timeout_s)
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise VsockError("no enclave-side vsock backend here (no fabric socket, no AF_VSOCK)")
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect((addr.cid, addr.port))
    except ConnectionRefusedError:
        sock.close()
        raise VsockConnectionRefused(f"connection to {addr} refused") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_through_broker(fabric_fd: int, addr: VsockAddr, timeout_s: float) -> socket.socket:
    # A duplicate, so closing it leaves the inherited descriptor to the app's own client.
    broker = socket.socket(fileno=os.dup(fabric_fd))
    try:
        broker.settimeout(timeout_s)
        fdpass.send_message(broker, wire.encode(wire.Connect(BLOCKING_REQUEST_ID, addr)))
        data, fds, truncated = fdpass.recv_message(broker)
    finally:
        broker.close()
    if truncated or not data:
        fdpass.close_fds(fds)
        raise VsockError("bad reply from the vsock broker")
    try:
        reply = wire.decode_reply(data, fd_count=len(fds))
    except Exception:
        fdpass.close_fds(fds)
        raise
    if isinstance(reply, wire.Refused):
        fdpass.close_fds(fds)
        raise VsockConnectionRefused(f"connection to {addr} refused")
    if not isinstance(reply, wire.Connected) or len(fds) != 1:
        fdpass.close_fds(fds)
        raise VsockError(f"unexpected reply from the vsock broker: {type(reply).__name__}")
    conn = socket.socket(fileno=fds[0])
    conn.settimeout(timeout_s)
    return conn
