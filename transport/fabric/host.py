"""Host side of the emulated fabric: one Unix socket file per listener.

Layout: ``<fabric_dir>/<cid>/<port>`` (``addressing.socket_path``), directories 0700 and socket
files 0600, so no other user can reach any endpoint. The parent instance (CID 3) listens at
``<fabric_dir>/3/<port>``; host code reaches ``(cid, port)`` by connecting to
``<fabric_dir>/<cid>/<port>`` (an enclave's listeners are bound there by its broker).

A socket file appears only once it accepts connections: the socket is bound and listening under
a private temporary name in the same directory first, then published at its port's name with
``link()``. So whoever sees the file (a client waiting for it to appear, a concurrent binder's
stale-file probe) never finds it refusing in the instant between ``bind()`` and ``listen()``.

Binding is exclusive and stale-safe: ``link()`` onto an existing name fails, so the first binder
wins; if the file is left over from a dead listener (a connect probe is refused) it is unlinked
(only if it is still the very file that was probed) and the link retried once. A live listener
is never displaced: the bind fails with :class:`VsockAddressInUse`. Listeners remove their own
file on close, again only if the file is still theirs.
"""

from __future__ import annotations

import errno
import os
import random
import secrets
import socket as _stdlib_socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from transport.errors import AddressInUse, VsockConnectionRefused, VsockError
from transport.fabric.addressing import (
    FABRIC_DIR_ENV,
    MAX_SUN_PATH,
    VMADDR_CID_ANY,
    VMADDR_CID_PARENT,
    VMADDR_PORT_ANY,
    VsockAddr,
    cid_dir,
    socket_path,
)
from transport.fabric.listen_socket import DelegatingListenSocket
from transport.fabric.origin import bind_origin
from transport.paths import default_state_dir, ensure_private_dir

__all__ = [
    "VsockAddressInUse",
    "LISTEN_BACKLOG",
    "default_fabric_dir",
    "BoundSocket",
    "prepare_cid_dir",
    "bind_fabric_socket",
    "release_fabric_socket",
    "probe_listener",
    "connect_fabric",
    "open_fabric_stream",
    "open_fabric_listener",
]

#: Kernel accept backlog of fabric listeners: benchmarks and proxies open connections in bursts
#: and an AF_UNIX connect to a full backlog fails with EAGAIN instead of waiting.
LISTEN_BACKLOG: Final = 1024
#: Ports picked for VMADDR_PORT_ANY: the upper half of the signed range, far from well-known
#: ports (Nitro's are < 10000 + CID) and from anything a person types.
_EPHEMERAL_LOW: Final = 0x4000_0000
_EPHEMERAL_HIGH: Final = 0x7FFF_FFFF
#: Attempts at a random free ephemeral port before giving up (collisions are ~impossible).
_EPHEMERAL_TRIES: Final = 16
#: A connect to a listener whose backlog is full fails with EAGAIN; retry this long (seconds)
#: before reporting refusal, starting at the first delay and doubling.
_BACKLOG_RETRY_S: Final = 2.0
_BACKLOG_FIRST_DELAY_S: Final = 0.001
_BACKLOG_MAX_DELAY_S: Final = 0.05
#: Attempts at a free random temporary name for a socket being set up (collisions: ~never).
_TEMP_NAME_TRIES: Final = 16


class VsockAddressInUse(VsockError, AddressInUse):
    """Another live listener is bound at this vsock address (``EADDRINUSE``)."""


def default_fabric_dir() -> Path:
    """The fabric directory: ``$ENCLAVE_VSOCK_DIR``, else ``default_state_dir()/vsock``."""
    explicit = os.environ.get(FABRIC_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser().absolute()
    return default_state_dir() / "vsock"


@dataclass(frozen=True, slots=True)
class BoundSocket:
    """A listening stdlib socket bound at ``path``; ``ident`` is the file's ``(st_dev, st_ino)``."""

    sock: _stdlib_socket.socket
    addr: VsockAddr
    path: Path
    ident: tuple[int, int]


def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def probe_listener(path: Path) -> bool:
    """True if a live listener accepts connections at ``path`` (a connect probe).

    A live listener sees the probe as a connection that closes at once. A full backlog
    (EAGAIN) counts as live.
    """
    probe = _stdlib_socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        rc = probe.connect_ex(os.fsencode(path))
    finally:
        probe.close()
    return rc in (0, errno.EAGAIN, errno.EINPROGRESS)


def _bind_temporary(sock: _stdlib_socket.socket, directory: Path, dir_fd: int) -> str:
    """Bind ``sock`` at a fresh private name in ``directory``; returns the name.

    The name starts with a dot, so it is never taken for a port (``parse_socket_name``).
    """
    for _ in range(_TEMP_NAME_TRIES):
        name = f".{secrets.token_hex(6)}"
        target = os.fsencode(directory / name)
        if len(target) > MAX_SUN_PATH:  # longer than the port's own name: via the dir fd
            target = os.fsencode(f"/proc/self/fd/{dir_fd}/{name}")
        try:
            sock.bind(target)
            return name
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise VsockError(f"no free temporary socket name in {directory}")  # pragma: no cover


def _publish_exclusive(dir_fd: int, tmp_name: str, path: Path, addr: VsockAddr) -> None:
    """Give the listening socket file ``tmp_name`` its public name ``path`` (same directory).

    ``link()`` is atomic and fails if ``path`` exists, so the first binder wins and a live
    listener is never displaced; a stale file is replaced (see the module docstring).
    """
    try:
        os.link(tmp_name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    except FileExistsError:
        pass
    # The file exists: a live listener, a stale file from a dead one, or not a socket at all.
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise VsockError(f"{path} exists and is not a socket; refusing to replace it")
        if probe_listener(path):
            raise VsockAddressInUse(f"{addr} is already in use")
        try:
            again = os.lstat(path)
        except FileNotFoundError:
            again = None
        if again is not None and _ident(again) == _ident(st):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    try:
        os.link(tmp_name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileExistsError as exc:  # someone else published it between our probe and now
        raise VsockAddressInUse(f"{addr} is already in use") from exc


def prepare_cid_dir(fabric_dir: Path, cid: int) -> Path:
    """Create ``<fabric_dir>/<cid>`` (and the fabric directory), both 0700 and ours.

    Raises:
        VsockError: a directory cannot be created or belongs to another user.
    """
    try:
        ensure_private_dir(fabric_dir)
        return ensure_private_dir(cid_dir(fabric_dir, cid))
    except OSError as exc:
        raise VsockError(f"unusable vsock fabric directory {fabric_dir}: {exc}") from exc


def bind_fabric_socket(
    fabric_dir: Path, addr: VsockAddr, *, backlog: int = LISTEN_BACKLOG
) -> BoundSocket:
    """Create, bind (0600) and listen on the fabric socket for ``addr`` (sync, non-blocking).

    ``addr.port`` may be ``VMADDR_PORT_ANY``: a free port is chosen.

    Raises:
        VsockAddressInUse: a live listener holds the address.
        VsockError: the path is unusable (too long, not a socket, permissions).
    """
    prepare_cid_dir(fabric_dir, addr.cid)
    if addr.port == VMADDR_PORT_ANY:
        for _ in range(_EPHEMERAL_TRIES):
            candidate = VsockAddr(addr.cid, random.randint(_EPHEMERAL_LOW, _EPHEMERAL_HIGH))
            try:
                return bind_fabric_socket(fabric_dir, candidate, backlog=backlog)
            except VsockAddressInUse:
                continue
        raise VsockAddressInUse(f"no free port for CID {addr.cid}")
    path = socket_path(fabric_dir, addr)
    sock = _stdlib_socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    tmp_name: str | None = None
    dir_fd = -1
    try:
        sock.setblocking(False)
        dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # Bind and listen under a private name, then publish: a file at ``path`` always
        # accepts connections (bind() creates the file, but connects are refused until
        # listen(); a client that saw the file appear, or another binder's stale-file probe,
        # must never see that). The directory is 0700, so nobody else can reach the file in
        # the instant before the chmod (bind() takes its mode from the umask).
        tmp_name = _bind_temporary(sock, path.parent, dir_fd)
        sock.listen(backlog)
        os.chmod(tmp_name, 0o600, dir_fd=dir_fd)
        ident = _ident(os.lstat(tmp_name, dir_fd=dir_fd))  # the same inode once published
        _publish_exclusive(dir_fd, tmp_name, path, addr)
    except VsockError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise VsockError(f"cannot listen at {addr} ({path}): {exc.strerror}") from exc
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
        if dir_fd >= 0:
            os.close(dir_fd)
    return BoundSocket(sock=sock, addr=addr, path=path, ident=ident)


def release_fabric_socket(path: Path, ident: tuple[int, int]) -> None:
    """Unlink ``path`` if it is still the socket file identified by ``ident`` (never another's)."""
    try:
        if _ident(os.lstat(path)) == ident:
            os.unlink(path)
    except FileNotFoundError:
        pass


async def connect_fabric(
    path: Path, addr: VsockAddr, *, origin: int | None = None
) -> trio.socket.SocketType:
    """Connect a Unix socket to the fabric file ``path`` (standing for ``addr``); ``origin``:
    the enclave CID a broker connects for (``transport.fabric.origin.bind_origin``).

    A non-blocking ``AF_UNIX`` connect completes at once or fails with ``EAGAIN`` when the
    listener's backlog is full. (trio's ``connect`` treats ``EAGAIN`` like ``EINPROGRESS`` and
    would return an *unconnected* socket, so this does its own loop.) A full backlog is retried
    with backoff for a bounded time, as a blocking vsock connect would wait.

    Raises:
        VsockConnectionRefused: no file, nobody listening, or the backlog stayed full.
        VsockError: any other failure (permissions, ...).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    raw_path = os.fsencode(path)
    delay = _BACKLOG_FIRST_DELAY_S
    deadline = trio.current_time() + _BACKLOG_RETRY_S
    sock = _stdlib_socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if origin is not None:
            bind_origin(sock, origin)
        while True:
            rc = sock.connect_ex(raw_path)
            if rc == 0:
                break
            if rc in (errno.ENOENT, errno.ECONNREFUSED):
                raise VsockConnectionRefused(f"connection to {addr} refused")
            if rc != errno.EAGAIN:
                raise VsockError(f"cannot connect to {addr}: {os.strerror(rc)}")
            if trio.current_time() >= deadline:
                raise VsockConnectionRefused(f"connection to {addr} refused (backlog full)")
            await trio.sleep(delay)
            delay = min(delay * 2, _BACKLOG_MAX_DELAY_S)
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


async def open_fabric_stream(fabric_dir: Path, addr: VsockAddr) -> trio.SocketStream:
    """Host backend of ``open_vsock_stream``: a stream to the listener at ``addr``."""
    sock = await connect_fabric(socket_path(fabric_dir, addr), addr)
    return trio.SocketStream(sock)


async def open_fabric_listener(
    fabric_dir: Path, port: int, *, cid: int = VMADDR_CID_ANY
) -> trio.SocketListener:
    """Host backend of ``open_vsock_listener``: listen at ``(3, port)`` in the fabric.

    The host is the parent instance, CID 3: ``cid`` must be ``VMADDR_CID_ANY`` or 3, as a real
    ``bind()`` to another machine's CID fails with ``EADDRNOTAVAIL``.
    """
    if cid not in (VMADDR_CID_ANY, VMADDR_CID_PARENT):
        raise VsockError(f"cannot bind CID {cid} on the host (it is CID {VMADDR_CID_PARENT})")
    await trio.lowlevel.checkpoint()
    bound = bind_fabric_socket(fabric_dir, VsockAddr(VMADDR_CID_PARENT, port))
    inner = trio.socket.from_stdlib_socket(bound.sock)
    path, ident = bound.path, bound.ident
    return trio.SocketListener(
        DelegatingListenSocket(inner, bound.addr, lambda: release_fabric_socket(path, ident))
    )
