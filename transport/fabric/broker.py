"""The supervisor-side broker of one emulated enclave: :func:`serve_enclave_fabric`.

Theory of operation
-------------------
The per-enclave supervisor creates ``socket.socketpair(AF_UNIX, SOCK_SEQPACKET)``, gives one end
to the enclave as ``ENCLAVE_FABRIC_FD`` and runs this broker on the other. The broker reads the
enclave's requests (``wire``) and

* **Connect(cid, port)**: checks :class:`FabricPolicy` (the parent's allowed ports, allowed peer
  enclaves; ports in ``parent_handlers`` are always reachable). Allowed connects to a parent
  handler get a fresh ``socketpair``: one end goes to the enclave, the other is served in-process
  as a ``trio.SocketStream``. Other allowed connects are made by the broker to the fabric file
  ``<fabric_dir>/<cid>/<port>``; the connected socket is passed to the enclave with SCM_RIGHTS and
  the broker closes its copy. Denials and failures are a prompt ``Refused``; denials are logged.
  A connect to the parent is made from a socket bound to an origin name carrying the enclave's
  CID (``origin.py``), so a host listener can tell which enclave connected, as ``accept()``
  on AF_VSOCK does. The enclave can never reach an IP address: the broker only connects to
  fabric files.
* **Listen(port)**: binds ``<fabric_dir>/<cid>/<port>`` (0600, stale-safe, see ``host``) for the
  enclave, replies, then accepts connections and passes each accepted socket to the enclave as an
  ``Incoming`` message.
* **Unlisten(port)**: closes that listener and removes its file.

Data never flows through the broker: every stream it hands over is a kernel socket whose other
end is the peer itself. The broker returns when the enclave closes its end; on return or
cancellation every listener is closed and every socket file it created is removed.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket as _stdlib_socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog
import trio

from transport.errors import RemoteProtocolError, VsockConnectionRefused, VsockError
from transport.fabric import wire
from transport.fabric.addressing import (
    ENCLAVE_CID_ENV,
    FABRIC_FD_ENV,
    VMADDR_CID_PARENT,
    VMADDR_PORT_ANY,
    VsockAddr,
    cid_dir,
    socket_path,
)
from transport.fabric.fdpass import close_fds, recv_message, send_message
from transport.fabric.host import (
    BoundSocket,
    VsockAddressInUse,
    bind_fabric_socket,
    connect_fabric,
    prepare_cid_dir,
    release_fabric_socket,
)
from transport.fabric.origin import bind_origin
from transport.fabric.policy import FabricPolicy

__all__ = [
    "FabricPolicy",
    "ParentHandler",
    "serve_enclave_fabric",
    "fabric_socketpair",
    "enclave_fabric_env",
    "MAX_INFLIGHT_REQUESTS",
]

log = structlog.get_logger()

#: A parent-side service the broker runs in-process for the enclave's connects to (3, port).
ParentHandler = Callable[[trio.SocketStream], Awaitable[None]]

#: Requests of one enclave being served at once; beyond it the broker stops reading, so an
#: enclave that floods requests without reading replies only stalls itself.
MAX_INFLIGHT_REQUESTS: Final = 64
#: Listeners one enclave may hold at once (each is a socket file and an accept task).
MAX_LISTENERS: Final = 256
#: Invalid requests logged per enclave; a flood of garbage must not become a flood of logs.
_MAX_LOGGED_BAD_REQUESTS: Final = 20
#: Pause after an accept() error such as EMFILE before trying again (seconds), as trio's
#: serve_listeners does, so a resource shortage does not become a busy loop.
_ACCEPT_ERROR_SLEEP_S: Final = 0.1
#: First local port reported for the enclave's outgoing connections (Linux vsock hands out
#: ephemeral ports above 1023; the value is informational only).
_FIRST_LOCAL_PORT: Final = 49152
#: Peer address reported for incoming connections: Unix peers are unnamed, and every
#: connection into an enclave comes from the parent side of the fabric.
_INCOMING_PEER: Final = VsockAddr(VMADDR_CID_PARENT, VMADDR_PORT_ANY)


class _EnclaveGone(Exception):
    """The enclave's end of the broker socket is closed; stop serving."""


@dataclass
class _Listener:
    bound: BoundSocket
    sock: trio.socket.SocketType
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def close(self) -> None:
        self.scope.cancel()
        self.sock.close()
        release_fabric_socket(self.bound.path, self.bound.ident)


class _Broker:
    def __init__(
        self,
        sock: _stdlib_socket.socket,
        policy: FabricPolicy,
        fabric_dir: Path,
        parent_handlers: Mapping[int, ParentHandler],
        nursery: trio.Nursery,
    ) -> None:
        self.sock = sock
        self.policy = policy
        self.fabric_dir = fabric_dir
        self.parent_handlers = dict(parent_handlers)
        self.handled_ports = frozenset(parent_handlers)
        self.nursery = nursery
        self.listeners: dict[int, _Listener] = {}
        self.send_lock = trio.Lock()
        self.inflight = trio.Semaphore(MAX_INFLIGHT_REQUESTS)
        self.local_ports = itertools.count(_FIRST_LOCAL_PORT)
        self.log = log.bind(cid=policy.cid)
        self.bad_requests = 0

    # -- sending ------------------------------------------------------------------------------
    async def send(self, message: wire.Reply, fd: int | None = None) -> None:
        data = wire.encode(message)
        async with self.send_lock:
            while True:
                try:
                    send_message(self.sock, data, fd)
                    return
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                except OSError as exc:
                    raise _EnclaveGone from exc

    def send_nowait(self, message: wire.Reply, fd: int | None = None) -> bool:
        """Send at once if nobody else is sending and the socket has room; else False."""
        if self.send_lock.locked():
            return False
        try:
            send_message(self.sock, wire.encode(message), fd)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _EnclaveGone from exc
        return True

    async def refuse(self, request_id: int, code: int) -> None:
        await self.send(wire.Refused(request_id, code))

    async def send_owned(self, message: wire.Reply, sock: _stdlib_socket.socket | None) -> None:
        """Send ``message`` with ``sock`` attached (if any) and close our copy of ``sock``."""
        try:
            await self.send(message, None if sock is None else sock.fileno())
        except _EnclaveGone:
            pass
        finally:
            if sock is not None:
                sock.close()
            self.inflight.release()

    # -- the request loop ---------------------------------------------------------------------
    async def serve(self) -> None:
        while True:
            try:
                data, fds, truncated = recv_message(self.sock)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except EOFError:
                self.log.debug("vsock_fabric_enclave_closed")
                return
            except OSError as exc:
                self.log.info("vsock_fabric_enclave_gone", error=exc.strerror)
                return
            try:
                if truncated:
                    raise RemoteProtocolError("oversized message or ancillary data")
                request = wire.decode_request(data, fd_count=len(fds))
            except RemoteProtocolError as exc:
                self.bad_requests += 1
                if self.bad_requests <= _MAX_LOGGED_BAD_REQUESTS:
                    self.log.warning("vsock_fabric_bad_request", error=str(exc))
                    if self.bad_requests == _MAX_LOGGED_BAD_REQUESTS:
                        self.log.warning("vsock_fabric_bad_requests_suppressed")
                continue
            finally:
                close_fds(fds)
            if isinstance(request, wire.Unlisten):
                self.unlisten(request.port)
                continue
            if isinstance(request, wire.Connect):
                # Fast path: connects to Unix sockets complete at once, so most are answered
                # here without a task switch (one broker round trip is the whole cost).
                outcome = self.connect_nowait(request)
                if outcome is not None:
                    reply, peer = outcome
                    try:
                        sent = self.send_nowait(reply, None if peer is None else peer.fileno())
                    except _EnclaveGone:
                        sent = True  # nothing more to do; EOF comes next
                    if sent:
                        if peer is not None:
                            peer.close()
                        continue
                    await self.inflight.acquire()
                    self.nursery.start_soon(self.send_owned, reply, peer)
                    continue
            await self.inflight.acquire()
            self.nursery.start_soon(self.handle, request)

    async def handle(self, request: wire.Connect | wire.Listen) -> None:
        try:
            if isinstance(request, wire.Connect):
                await self.connect(request)
            else:
                await self.listen(request)
        except _EnclaveGone:
            pass
        finally:
            self.inflight.release()

    # -- connect ------------------------------------------------------------------------------
    def connect_nowait(
        self, request: wire.Connect
    ) -> tuple[wire.Reply, _stdlib_socket.socket | None] | None:
        """Decide a connect without blocking: the reply and the socket to pass along, or None
        when the target's backlog is full (the async path retries for a while)."""
        addr = request.addr
        if not self.policy.allows(addr, handled_ports=self.handled_ports):
            self.log.warning("vsock_connect_denied", target=str(addr))
            return wire.Refused(request.request_id, errno.ECONNREFUSED), None
        handler = self.parent_handlers.get(addr.port) if addr.cid == VMADDR_CID_PARENT else None
        if handler is not None:
            ours, theirs = _stdlib_socket.socketpair(
                _stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM
            )
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
            self.nursery.start_soon(self.run_handler, handler, stream, addr.port)
            return wire.Connected(request.request_id, self.next_local_port()), theirs
        try:
            path = os.fsencode(socket_path(self.fabric_dir, addr))
        except VsockError:
            return wire.Refused(request.request_id, errno.ECONNREFUSED), None
        peer = _stdlib_socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
        peer.setblocking(False)
        if addr.cid == VMADDR_CID_PARENT:  # tell the host listener who connects (origin.py)
            bind_origin(peer, self.policy.cid)
        rc = peer.connect_ex(path)
        if rc == 0:
            self.log.debug("vsock_connected", target=str(addr))
            return wire.Connected(request.request_id, self.next_local_port()), peer
        peer.close()
        if rc in (errno.EAGAIN, errno.EINPROGRESS):
            return None
        if rc not in (errno.ENOENT, errno.ECONNREFUSED):
            self.log.warning("vsock_connect_failed", target=str(addr), error=os.strerror(rc))
        return wire.Refused(request.request_id, errno.ECONNREFUSED), None

    async def connect(self, request: wire.Connect) -> None:
        """Slow path of a connect: the target's backlog was full; retry with backoff."""
        addr = request.addr
        if not self.policy.allows(addr, handled_ports=self.handled_ports):
            self.log.warning("vsock_connect_denied", target=str(addr))
            await self.refuse(request.request_id, errno.ECONNREFUSED)
            return
        handler = self.parent_handlers.get(addr.port) if addr.cid == VMADDR_CID_PARENT else None
        if handler is not None:
            await self.connect_handler(request, handler)
            return
        try:
            origin = self.policy.cid if addr.cid == VMADDR_CID_PARENT else None
            peer = await connect_fabric(socket_path(self.fabric_dir, addr), addr, origin=origin)
        except VsockConnectionRefused:
            self.log.debug("vsock_connect_refused", target=str(addr))
            await self.refuse(request.request_id, errno.ECONNREFUSED)
            return
        except VsockError as exc:
            self.log.warning("vsock_connect_failed", target=str(addr), error=str(exc))
            await self.refuse(request.request_id, errno.ECONNREFUSED)
            return
        try:
            await self.send(
                wire.Connected(request.request_id, self.next_local_port()), peer.fileno()
            )
        finally:
            peer.close()
        self.log.debug("vsock_connected", target=str(addr))

    async def connect_handler(self, request: wire.Connect, handler: ParentHandler) -> None:
        ours, theirs = _stdlib_socket.socketpair(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
        try:
            try:
                await self.send(
                    wire.Connected(request.request_id, self.next_local_port()), theirs.fileno()
                )
            finally:
                theirs.close()
        except BaseException:
            ours.close()
            raise
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        self.nursery.start_soon(self.run_handler, handler, stream, request.addr.port)

    async def run_handler(
        self, handler: ParentHandler, stream: trio.SocketStream, port: int
    ) -> None:
        try:
            async with stream:
                await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.log.debug("vsock_parent_handler_disconnected", port=port, error=repr(exc))
        except Exception:
            self.log.exception("vsock_parent_handler_failed", port=port)

    def next_local_port(self) -> int:
        port = next(self.local_ports)
        if port >= VMADDR_PORT_ANY:  # pragma: no cover - 4 billion connects
            self.local_ports = itertools.count(_FIRST_LOCAL_PORT)
            port = next(self.local_ports)
        return port

    # -- listen -------------------------------------------------------------------------------
    async def listen(self, request: wire.Listen) -> None:
        if request.port in self.listeners:
            await self.refuse(request.request_id, errno.EADDRINUSE)
            return
        if len(self.listeners) >= MAX_LISTENERS:
            self.log.warning("vsock_listen_refused", port=request.port, reason="too many listeners")
            await self.refuse(request.request_id, errno.EMFILE)
            return
        try:
            bound = bind_fabric_socket(self.fabric_dir, VsockAddr(self.policy.cid, request.port))
        except VsockAddressInUse:
            await self.refuse(request.request_id, errno.EADDRINUSE)
            return
        except (VsockError, OSError) as exc:
            self.log.warning("vsock_listen_refused", port=request.port, error=str(exc))
            await self.refuse(request.request_id, errno.EINVAL)
            return
        listener = _Listener(bound, trio.socket.from_stdlib_socket(bound.sock))
        port = bound.addr.port
        self.listeners[port] = listener
        try:
            await self.send(wire.Listening(request.request_id, port))
        except BaseException:
            self.unlisten(port)
            raise
        self.log.debug("vsock_listening", port=port)
        self.nursery.start_soon(self.accept_loop, listener)

    async def accept_loop(self, listener: _Listener) -> None:
        port = listener.bound.addr.port
        with listener.scope:
            while True:
                try:
                    conn, _ = await listener.sock.accept()
                except (OSError, trio.ClosedResourceError) as exc:
                    if listener.scope.cancel_called or isinstance(exc, trio.ClosedResourceError):
                        return
                    self.log.error("vsock_accept_failed", port=port, error=str(exc))
                    await trio.sleep(_ACCEPT_ERROR_SLEEP_S)
                    continue
                try:
                    await self.send(wire.Incoming(port, _INCOMING_PEER), conn.fileno())
                except _EnclaveGone:
                    return
                finally:
                    conn.close()

    def unlisten(self, port: int) -> None:
        listener = self.listeners.pop(port, None)
        if listener is not None:
            listener.close()
            self.log.debug("vsock_unlistened", port=port)

    def cleanup(self) -> None:
        for port in list(self.listeners):
            self.unlisten(port)
        try:
            cid_dir(self.fabric_dir, self.policy.cid).rmdir()
        except OSError:
            pass  # not empty (someone else's files) or already gone


async def serve_enclave_fabric(
    sock: _stdlib_socket.socket,
    *,
    policy: FabricPolicy,
    fabric_dir: Path,
    parent_handlers: Mapping[int, ParentHandler] = {},  # read-only, copied
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one enclave's fabric requests until it closes its end (see the module docstring).

    Args:
        sock: the supervisor's end of ``socketpair(AF_UNIX, SOCK_SEQPACKET)``; the enclave
            inherited the other end as ``ENCLAVE_FABRIC_FD``. Made non-blocking; not closed.
        policy: what this enclave may connect to; ``policy.cid`` is its CID.
        fabric_dir: the fabric directory (its listeners appear at ``<fabric_dir>/<cid>/<port>``).
        parent_handlers: ``port -> async handler(stream)`` for the enclave's connects to
            ``(3, port)``, served in this process (e.g. the boot heartbeat on 9000). These ports
            are reachable whatever ``policy.parent_ports`` says.
        task_status: ``started()`` once the fabric directory is ready.

    Resource handling:
        Returns when the enclave closes its end of ``sock``. On return or cancellation every
        listener is closed and every socket file this broker created is removed; handler tasks
        are cancelled. Exceptions from a handler are logged and never stop the broker.
    """
    if sock.type != _stdlib_socket.SOCK_SEQPACKET:
        raise ValueError("serve_enclave_fabric needs an AF_UNIX SOCK_SEQPACKET socket")
    sock.setblocking(False)
    prepare_cid_dir(fabric_dir, policy.cid)
    broker: _Broker | None = None
    try:
        async with trio.open_nursery() as nursery:
            broker = _Broker(sock, policy, fabric_dir, parent_handlers, nursery)
            broker.log.debug("vsock_fabric_serving", fabric_dir=str(fabric_dir))
            task_status.started()
            await broker.serve()
            nursery.cancel_scope.cancel()
    finally:
        if broker is not None:
            broker.cleanup()


def fabric_socketpair() -> tuple[_stdlib_socket.socket, _stdlib_socket.socket]:
    """``(broker_end, enclave_end)``: a fresh ``AF_UNIX``/``SOCK_SEQPACKET`` pair for one enclave.

    Give ``enclave_end`` to the child (``pass_fds=(enclave_end.fileno(),)`` and
    :func:`enclave_fabric_env`), close it in the parent once the child is spawned, and run
    :func:`serve_enclave_fabric` on ``broker_end``.
    """
    return _stdlib_socket.socketpair(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_SEQPACKET)


def enclave_fabric_env(enclave_end: _stdlib_socket.socket, cid: int) -> dict[str, str]:
    """The environment variables that point a child at its fabric end and name its CID."""
    VsockAddr(cid, 0)
    return {FABRIC_FD_ENV: str(enclave_end.fileno()), ENCLAVE_CID_ENV: str(cid)}
