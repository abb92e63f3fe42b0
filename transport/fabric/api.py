"""The fabric's public operations, dispatched to the backend chosen for this process."""

from __future__ import annotations

from pathlib import Path

import trio

from transport.fabric.addressing import VMADDR_CID_ANY, VsockAddr
from transport.fabric.backend import Backend, current_backend
from transport.fabric.host import default_fabric_dir, open_fabric_listener, open_fabric_stream

__all__ = ["open_vsock_stream", "open_vsock_listener"]


async def open_vsock_stream(
    addr: VsockAddr, *, fabric_dir: Path | None = None
) -> trio.SocketStream:
    """Open a stream to the vsock listener at ``addr``.

    Works the same on the host (the parent, CID 3) and inside an enclave; the backend is chosen
    from the environment (``ENCLAVE_FABRIC_FD``, ``ENCLAVE_VSOCK_BACKEND``). The returned stream
    is a kernel socket connected straight to the listener: nothing relays the data.

    Args:
        addr: where to connect.
        fabric_dir: use the emulated host backend with this fabric directory, whatever the
            environment says (tests, proxies started with an explicit directory).

    Raises:
        VsockConnectionRefused: nobody listens there, or the enclave's policy forbids it.
            Refusals are prompt, never a hang.
        VsockError: the fabric itself failed (broker gone, bad fabric directory...).
    """
    if fabric_dir is not None:
        return await open_fabric_stream(fabric_dir, addr)
    backend = current_backend()
    if backend is Backend.ENCLAVE:
        from transport.fabric.enclave import enclave_client

        return await (await enclave_client()).connect(addr)
    if backend is Backend.NATIVE:
        from transport.fabric.native import open_native_stream

        return await open_native_stream(addr)
    return await open_fabric_stream(default_fabric_dir(), addr)


async def open_vsock_listener(
    port: int, *, cid: int = VMADDR_CID_ANY, fabric_dir: Path | None = None
) -> trio.SocketListener:
    """Listen for vsock connections on ``port`` (``VMADDR_PORT_ANY``: any free port).

    On the host the listener is at ``(3, port)``; inside an enclave at ``(own CID, port)``.
    ``listener.socket.getsockname()`` gives the bound ``(cid, port)``. Closing the listener
    removes its fabric socket file (host) or tells the broker to (enclave).

    Args:
        port: the port, 32-bit.
        cid: ``VMADDR_CID_ANY`` or this machine's own CID.
        fabric_dir: force the emulated host backend with this fabric directory.

    Raises:
        VsockAddressInUse: a live listener already holds the address.
        VsockError: invalid port/CID, or the fabric failed.
    """
    VsockAddr(cid, port)  # validate before choosing a backend
    if fabric_dir is not None:
        return await open_fabric_listener(fabric_dir, port, cid=cid)
    backend = current_backend()
    if backend is Backend.ENCLAVE:
        from transport.fabric.enclave import enclave_client

        return await (await enclave_client()).listen(port, cid=cid)
    if backend is Backend.NATIVE:
        from transport.fabric.native import open_native_listener

        return await open_native_listener(port, cid=cid)
    return await open_fabric_listener(default_fabric_dir(), port, cid=cid)
