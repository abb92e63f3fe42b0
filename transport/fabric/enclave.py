"""Enclave side of the emulated fabric: a thin trio adapter over the broker codec (``wire``).

Theory of operation
-------------------
The enclave inherits ``ENCLAVE_FABRIC_FD``, a ``SOCK_SEQPACKET`` socket to its broker. Each
``connect``/``listen`` sends one request with a fresh request id and waits for the reply with that
id; connections to the enclave's listeners arrive unsolicited as ``Incoming`` messages. Any number
of tasks may wait at once, so there is no background task (``open_vsock_stream`` needs no nursery):
reading is leader/follower (:class:`transport.sync.LeaderFollower`): whichever waiting task finds
nobody reading becomes the *reader*, receives datagrams and files each one where it belongs (the
waiter's slot for a reply; the listener's backlog for an incoming connection), waking the
others to look, until its own wait is over; then it hands the role on. Closing a listener
interrupts the reader's wait so its acceptors see the close at once. Replies
to requests whose waiter was cancelled are undone (fds closed, a listener bound for a cancelled
``listen`` released), connections for listeners that are closed or full are dropped. An invalid
message or the broker's EOF breaks the client for good: every waiter and every later call raises
:class:`VsockError` (fail closed).

One client per ``trio.run`` (a ``RunVar``); the socket is shared by every run of the process.
Only one process may use it: a grandchild that inherited the fd must not (replies go to whoever
reads first).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket as _stdlib_socket
from collections import deque
from collections.abc import Callable
from typing import Final

import structlog
import trio

from transport.errors import RemoteProtocolError, VsockConnectionRefused, VsockError
from transport.fabric import wire
from transport.fabric.addressing import (
    ENCLAVE_CID_ENV,
    FABRIC_FD_ENV,
    U32_MAX,
    VMADDR_CID_ANY,
    VsockAddr,
)
from transport.fabric.fdpass import close_fds, recv_message, send_message
from transport.fabric.host import VsockAddressInUse
from transport.fabric.listen_socket import CallbackListenSocket
from transport.sync import LeaderFollower

__all__ = ["EnclaveFabricClient", "enclave_client", "MAX_PENDING_INCOMING"]

log = structlog.get_logger()

#: Accepted-but-not-yet-accept()ed connections kept per listener, like a kernel backlog;
#: beyond it new connections are closed (the peer sees EOF).
MAX_PENDING_INCOMING: Final = 1024

_REFUSED_ERRNOS: Final = frozenset({errno.ECONNREFUSED, errno.EACCES, errno.EPERM})


class _Slot:
    """Where the reader files the reply to one request."""

    __slots__ = ("fd", "is_listen", "reply")

    def __init__(self, *, is_listen: bool) -> None:
        self.is_listen = is_listen
        self.reply: wire.Reply | None = None
        self.fd: int | None = None


class _Backlog:
    """Connections delivered for one listener and not yet accepted."""

    __slots__ = ("closed", "queue")

    def __init__(self) -> None:
        self.closed = False
        self.queue: deque[tuple[int, VsockAddr]] = deque()


class EnclaveFabricClient:
    """The enclave's connection to its broker (see the module docstring).

    Args:
        sock: the ``AF_UNIX``/``SOCK_SEQPACKET`` socket to the broker (made non-blocking).
        cid: this enclave's CID if known (for ``getsockname`` and bind checks).
    """

    def __init__(self, sock: _stdlib_socket.socket, *, cid: int | None = None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._cid = cid
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {}
        self._backlogs: dict[int, _Backlog] = {}
        # Interruptible: closing a listener must wake a reader waiting for its connections.
        self._reading = LeaderFollower(self._read_one, interruptible=True)
        self._send_lock = trio.Lock()
        self._deferred: list[bytes] = []
        self._broken: VsockError | None = None

    # -- request ids, sending -----------------------------------------------------------------
    def _next_id(self) -> int:
        while True:
            request_id = next(self._ids) & U32_MAX
            if request_id and request_id not in self._pending:
                return request_id

    def _send_nowait(self, data: bytes) -> bool:
        try:
            send_message(self._sock, data)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._break(VsockError(f"fabric broker socket failed: {exc.strerror}"))
            return True
        return True

    async def _send(self, data: bytes) -> None:
        if not self._send_lock.locked() and not self._deferred and self._send_nowait(data):
            return  # the common case: no task switch
        async with self._send_lock:
            while self._deferred and self._send_nowait(self._deferred[0]):
                self._deferred.pop(0)
            while True:
                self._check_broken()
                if not self._deferred and self._send_nowait(data):
                    return
                await trio.lowlevel.wait_writable(self._sock)
                while self._deferred and self._send_nowait(self._deferred[0]):
                    self._deferred.pop(0)

    # -- receiving and dispatch ---------------------------------------------------------------
    def _check_broken(self) -> None:
        if self._broken is not None:
            raise VsockError(str(self._broken)) from self._broken

    def _break(self, exc: VsockError) -> None:
        if self._broken is None:
            self._broken = exc
            log.error("vsock_fabric_broken", reason=str(exc))
        self._notify()

    def _notify(self) -> None:
        self._reading.wake_all()  # waiters look again (few waiters, rare messages)

    def _dispatch(self, data: bytes, fds: list[int], truncated: bool) -> None:
        try:
            if truncated:
                raise RemoteProtocolError("oversized fabric message or ancillary data")
            reply = wire.decode_reply(data, fd_count=len(fds))
        except RemoteProtocolError as exc:
            close_fds(fds)
            self._break(VsockError(f"invalid message from the vsock fabric broker: {exc}"))
            return
        fd = fds[0] if fds else None
        if isinstance(reply, wire.Incoming):
            backlog = self._backlogs.get(reply.port)
            if fd is None or backlog is None or len(backlog.queue) >= MAX_PENDING_INCOMING:
                close_fds(fds)
                log.warning("vsock_incoming_dropped", port=reply.port)
            else:
                backlog.queue.append((fd, reply.peer))
        else:
            slot = self._pending.pop(reply.request_id, None)
            if slot is None:  # its waiter was cancelled: undo what the broker did for it
                close_fds(fds)
                if isinstance(reply, wire.Listening):
                    self._release_listener(reply.port)
                return
            slot.reply, slot.fd = reply, fd
            if slot.is_listen and isinstance(reply, wire.Listening):
                # Register before any Incoming for this port can be dispatched.
                self._backlogs.setdefault(reply.port, _Backlog())
        self._notify()

    async def _read_one(self) -> None:
        while self._deferred and self._send_nowait(self._deferred[0]):
            self._deferred.pop(0)
        while True:
            try:
                data, fds, truncated = recv_message(self._sock)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                continue
            except EOFError:
                self._break(VsockError("the vsock fabric broker closed the connection"))
                return
            except OSError as exc:
                self._break(VsockError(f"fabric broker socket failed: {exc.strerror}"))
                return
            self._dispatch(data, fds, truncated)
            return

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        # close() of a listener interrupts the reader, so a reader waiting for its own
        # listener's connections re-checks ``ready`` (no data is lost: the receive itself is
        # synchronous, only the wait is cancelled).
        await self._reading.wait_until(lambda: ready() or self._broken is not None)
        if not ready():
            self._check_broken()

    async def _request(self, message: wire.Connect | wire.Listen) -> tuple[wire.Reply, int | None]:
        slot = _Slot(is_listen=isinstance(message, wire.Listen))
        self._pending[message.request_id] = slot
        try:
            await self._send(wire.encode(message))
            await self._wait_until(lambda: slot.reply is not None)
        except BaseException:
            # Cancelled (or failed) while waiting: a reply that comes later is dropped by
            # _dispatch; one that already came must not leak its fd or its listener.
            self._pending.pop(message.request_id, None)
            if slot.fd is not None:
                close_fds([slot.fd])
            if isinstance(slot.reply, wire.Listening):
                self._release_listener(slot.reply.port)
            raise
        assert slot.reply is not None
        return slot.reply, slot.fd

    def _release_listener(self, port: int) -> None:
        """Forget the listener on ``port``: close queued connections, wake its acceptors, and
        tell the broker (without blocking: close() is synchronous)."""
        backlog = self._backlogs.pop(port, None)
        if backlog is not None:
            backlog.closed = True
            close_fds([fd for fd, _ in backlog.queue])
            backlog.queue.clear()
        data = wire.encode(wire.Unlisten(self._next_id(), port))
        if self._broken is None and not self._send_nowait(data):
            self._deferred.append(data)
        self._reading.interrupt()
        self._notify()

    # -- public operations --------------------------------------------------------------------
    async def connect(self, addr: VsockAddr) -> trio.SocketStream:
        """Ask the broker for a connection to ``addr`` (one round trip)."""
        # Waiting for the reply is the scheduling point; this makes it a cancel point at once.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_broken()
        reply, fd = await self._request(wire.Connect(self._next_id(), addr))
        if isinstance(reply, wire.Connected) and fd is not None:
            return trio.SocketStream(trio.socket.from_stdlib_socket(_adopt_stream_fd(fd)))
        if fd is not None:
            close_fds([fd])
        code = reply.errno if isinstance(reply, wire.Refused) else errno.EPROTO
        if code in _REFUSED_ERRNOS:
            raise VsockConnectionRefused(f"connection to {addr} refused")
        raise VsockError(f"connection to {addr} failed: {os.strerror(code)}")

    async def listen(self, port: int, *, cid: int = VMADDR_CID_ANY) -> trio.SocketListener:
        """Ask the broker to listen on ``(own CID, port)`` for this enclave."""
        await trio.lowlevel.checkpoint_if_cancelled()
        VsockAddr(cid, port)
        if cid != VMADDR_CID_ANY and self._cid is not None and cid != self._cid:
            raise VsockError(f"cannot bind CID {cid}: this enclave is CID {self._cid}")
        self._check_broken()
        reply, fd = await self._request(wire.Listen(self._next_id(), port))
        if fd is not None:
            close_fds([fd])
        if isinstance(reply, wire.Refused):
            if reply.errno == errno.EADDRINUSE:
                raise VsockAddressInUse(f"vsock port {port} is already in use")
            raise VsockError(f"cannot listen on vsock port {port}: {os.strerror(reply.errno)}")
        if not isinstance(reply, wire.Listening):
            raise VsockError("unexpected reply from the vsock fabric broker")
        bound = reply.port
        backlog = self._backlogs.setdefault(bound, _Backlog())
        local = VsockAddr(self._cid if self._cid is not None else VMADDR_CID_ANY, bound)

        async def accept() -> tuple[_stdlib_socket.socket, tuple[int, int]]:
            await self._wait_until(lambda: bool(backlog.queue) or backlog.closed)
            if backlog.closed:
                raise trio.ClosedResourceError
            fd_in, peer = backlog.queue.popleft()
            return _adopt_stream_fd(fd_in), peer.as_tuple()

        def close() -> None:
            if self._backlogs.get(bound) is backlog:
                self._release_listener(bound)

        return trio.SocketListener(CallbackListenSocket(local, accept, close))


def _adopt_stream_fd(fd: int) -> _stdlib_socket.socket:
    """Wrap an fd the broker passed; it must be a connected stream socket (else closed)."""
    try:
        sock = _stdlib_socket.socket(fileno=fd)
    except OSError as exc:
        close_fds([fd])
        raise VsockError("the vsock fabric broker passed something that is not a socket") from exc
    if sock.type != _stdlib_socket.SOCK_STREAM:
        sock.close()
        raise VsockError("the vsock fabric broker passed a socket that is not a stream")
    return sock


# The broker socket is per process (one inherited fd); the client (trio objects) per run.
_process_socket: _stdlib_socket.socket | None = None
_client_var: trio.lowlevel.RunVar[EnclaveFabricClient] = trio.lowlevel.RunVar("enclave_fabric")


def _open_process_socket() -> _stdlib_socket.socket:
    global _process_socket
    if _process_socket is None:
        raw = os.environ.get(FABRIC_FD_ENV, "")
        try:
            fd = int(raw)
            sock = _stdlib_socket.socket(fileno=fd)
        except (ValueError, OSError) as exc:
            raise VsockError(f"{FABRIC_FD_ENV}={raw!r} is not an open socket fd") from exc
        if sock.family != _stdlib_socket.AF_UNIX or sock.type != _stdlib_socket.SOCK_SEQPACKET:
            sock.detach()
            raise VsockError(f"{FABRIC_FD_ENV}={raw!r} is not an AF_UNIX SOCK_SEQPACKET socket")
        _process_socket = sock
    return _process_socket


def _enclave_cid() -> int | None:
    raw = os.environ.get(ENCLAVE_CID_ENV)
    if raw is None or not raw.isdigit():
        return None
    cid = int(raw)
    return cid if cid <= U32_MAX else None


async def enclave_client() -> EnclaveFabricClient:
    """The fabric client of this ``trio.run`` (created on first use from the environment)."""
    try:
        return _client_var.get()
    except LookupError:
        pass
    client = EnclaveFabricClient(_open_process_socket(), cid=_enclave_cid())
    _client_var.set(client)
    await trio.lowlevel.checkpoint()
    return client
