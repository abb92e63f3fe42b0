"""Listening "sockets" that let the fabric hand out genuine :class:`trio.SocketListener` objects.

``trio.SocketListener`` is final and closes its socket with a plain ``socket.close()``, but the
fabric must run code on close (remove the listener's socket file; tell the broker that an
enclave's listener is gone) and, inside an enclave, ``accept()`` does not come from a kernel
listening socket at all: the broker delivers each accepted connection as a message carrying its
fd. trio supports custom socket classes (``trio.socket.SocketType`` is meant to be subclassed, as
for ``set_custom_socket_factory``), so both cases are ``SocketType`` subclasses implementing the
small surface ``SocketListener`` uses: ``type``, ``getsockopt(SO_ACCEPTCONN)``, ``accept()`` and
``close()``. The connections they return are ordinary kernel sockets, so data never passes
through this code.
"""

from __future__ import annotations

import builtins
import socket as _stdlib_socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import overload

import trio

from transport.fabric.addressing import VMADDR_CID_PARENT, VMADDR_PORT_ANY, VsockAddr

__all__ = ["FabricListenSocket", "DelegatingListenSocket", "CallbackListenSocket"]

#: ``AddressFormat`` as trio spells it (``Any`` in its stubs); ours are ``(cid, port)`` tuples.
_Address = tuple[int, int]


class FabricListenSocket(trio.socket.SocketType):
    """Common part: a listening ``SOCK_STREAM`` socket bound at a vsock address."""

    def __init__(self, local: VsockAddr) -> None:
        super().__init__()
        self._local = local
        self._closed = False

    # -- what SocketListener and callers look at ---------------------------------------------
    @property
    def family(self) -> _stdlib_socket.AddressFamily:
        return _stdlib_socket.AF_UNIX

    @property
    def type(self) -> _stdlib_socket.SocketKind:
        return _stdlib_socket.SOCK_STREAM

    @property
    def proto(self) -> int:
        return 0

    @property
    def did_shutdown_SHUT_WR(self) -> bool:
        return False

    @property
    def vsock_address(self) -> VsockAddr:
        """The vsock address this listener is bound at (the port is never a wildcard)."""
        return self._local

    def getsockname(self) -> _Address:
        """``(cid, port)`` of the listener, as an ``AF_VSOCK`` socket would report it."""
        return self._local.as_tuple()

    @overload
    def getsockopt(self, level: int, optname: int) -> int: ...

    @overload
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> int | bytes:
        if (
            level == _stdlib_socket.SOL_SOCKET
            and optname == _stdlib_socket.SO_ACCEPTCONN
            and buflen is None
        ):
            return 0 if self._closed else 1
        raise OSError(92, "option not supported by a vsock fabric listener")  # ENOPROTOOPT

    def __enter__(self) -> FabricListenSocket:
        return self

    def __exit__(
        self,
        exc_type: builtins.type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "listening"
        return f"<{type(self).__name__} {self._local} {state}>"


class DelegatingListenSocket(FabricListenSocket):
    """A real kernel listening socket plus an ``on_close`` hook (host side: unlink the file)."""

    def __init__(
        self, inner: trio.socket.SocketType, local: VsockAddr, on_close: Callable[[], None]
    ) -> None:
        super().__init__(local)
        self._inner = inner
        self._on_close = on_close

    def fileno(self) -> int:
        return self._inner.fileno()

    def is_readable(self) -> bool:
        return self._inner.is_readable()

    async def accept(self) -> tuple[trio.socket.SocketType, _Address]:
        sock, _ = await self._inner.accept()
        # Unix peers are unnamed: report the port as unknown (VMADDR_PORT_ANY) and the CID as
        # the parent's, since the fabric cannot tell the host's own clients from enclaves.
        return sock, (VMADDR_CID_PARENT, VMADDR_PORT_ANY)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._on_close()
        finally:
            self._inner.close()


class CallbackListenSocket(FabricListenSocket):
    """A listener whose connections come from elsewhere (an enclave's broker messages).

    ``accept_fn`` waits for the next connection; ``close_fn`` releases the listener. After
    ``close()``, ``accept()`` raises ``OSError(EBADF)``, which ``SocketListener`` reports as
    :class:`trio.ClosedResourceError`, like a real closed socket.
    """

    def __init__(
        self,
        local: VsockAddr,
        accept_fn: Callable[[], Awaitable[tuple[_stdlib_socket.socket, _Address]]],
        close_fn: Callable[[], None],
    ) -> None:
        super().__init__(local)
        self._accept_fn = accept_fn
        self._close_fn = close_fn

    def fileno(self) -> int:
        return -1

    def is_readable(self) -> bool:
        return False

    async def accept(self) -> tuple[trio.socket.SocketType, _Address]:
        if self._closed:
            raise OSError(9, "listener is closed")  # EBADF -> trio.ClosedResourceError
        try:
            sock, peer = await self._accept_fn()
        except trio.ClosedResourceError:
            raise OSError(9, "listener is closed") from None
        return trio.socket.from_stdlib_socket(sock), peer

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_fn()
