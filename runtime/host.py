"""The host daemon: the process that owns the CLI's enclaves (nitro-cli's "enclave process").

``enclave run-enclave`` does not start enclaves itself. It asks the host daemon of its state
directory, which runs one :class:`~runtime.api.Runtime` (zygotes and image cache included) and
starts every enclave through :meth:`~runtime.api.Runtime.launch`: the same launch path as an
embedding application, so CLI-started enclaves get the warm start too (the first start of an
image pays for its zygote; the next ones fork it). The daemon is started on demand, detached
(its own session: a Ctrl-C in the terminal does not reach it), and exits once it has had no
enclave and no client for ``ENCLAVE_HOST_LINGER_S`` seconds (default :data:`DEFAULT_LINGER_S`).
Its enclaves end with it: it terminates them on SIGTERM/SIGINT; if it is killed, the sandbox
kills them (parent-death signals).

Files in the state directory::

    host.sock        the daemon's socket (0600; the directory is 0700: same user only)
    host.lock        flock(2) held by the running daemon (one per state directory)
    host.start.lock  flock(2) held by a client while it starts a daemon
    logs/host.log    the daemon's structured log (JSON lines)

Protocol on ``host.sock``: one JSON line per connection, bounded (:data:`MAX_REQUEST_BYTES`,
:data:`REQUEST_TIMEOUT_S`)::

    -> {"op": "run", "request": LaunchRequest, "wait_ready": bool, "ready_timeout_s": float,
        "console": bool}
    <- {"accepted": true}                        at once (a client retries only without it)
    <- {"ok": true, "info": {...}} | {"ok": false, "code": "Exx", "message": ..., "info": [...]}
    <- raw console bytes until the enclave ends  (only with "console": true and ok)

A client that goes away before the reply cancels the start (nothing is left running); after
the reply, the enclave is the daemon's, whatever the client does (a Ctrl-C during
``--attach-console`` never kills it). Each enclave's own control socket (terminate, console)
is served by its supervisor inside the daemon, as before.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from runtime._unixsock import bind_private, short_path
from runtime.errors import (
    EnclaveProcessConnectionError,
    InvalidCommandError,
    NitroCliError,
    ProcessSpawnError,
    error_for_code,
)
from runtime.launch import LaunchRequest
from runtime.records import EnclaveInfo
from runtime.state import StateDir

if TYPE_CHECKING:
    from runtime.api import Runtime

__all__ = [
    "HostReply",
    "launch_via_host",
    "serve_host",
    "main",
    "DEFAULT_LINGER_S",
    "LINGER_ENV",
]

log = structlog.get_logger("runtime.host")

#: Environment variable: seconds the daemon stays up with no enclave and no client.
LINGER_ENV: Final = "ENCLAVE_HOST_LINGER_S"
#: Default linger: long enough for a script's next ``run-enclave`` to find the warm zygote.
DEFAULT_LINGER_S: Final = 30.0
#: Shortest linger honoured: the client that started the daemon connects right after.
MIN_LINGER_S: Final = 1.0
#: Bound on a request line (a launch request is well under 1 KiB).
MAX_REQUEST_BYTES: Final = 64 * 1024
#: A client must send its request within this time.
REQUEST_TIMEOUT_S: Final = 10.0
#: How long a client waits for a daemon it started to listen (imports take ~0.5 s here).
DAEMON_START_TIMEOUT_S: Final = 60.0
#: Clients served at once (more wait in the listen backlog).
MAX_CLIENTS: Final = 64
#: Extra wait for the reply beyond the boot and ready timeouts (reservation, image checks).
REPLY_SLACK_S: Final = 30.0
_SOCKET_NAME, _LOCK_NAME, _START_LOCK_NAME = "host.sock", "host.lock", "host.start.lock"


# -- daemon side -------------------------------------------------------------------------------


async def serve_host(
    state: StateDir,
    *,
    linger_s: float = DEFAULT_LINGER_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve launch requests for ``state`` until idle for ``linger_s`` (or cancelled).

    Every enclave started here is terminated when this returns (the runtime block closes).
    """
    from runtime.api import open_runtime

    path = state.path / _SOCKET_NAME
    async with open_runtime(state.path, zygote=True) as rt:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = trio.socket.from_stdlib_socket(bind_private(path))
        sock.listen(MAX_CLIENTS)
        listener = trio.SocketListener(sock)
        clients = _Clients()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_accept_loop, listener, rt, clients, nursery)
                task_status.started()
                await _wait_idle(rt, clients, linger_s)
                # Stop accepting first (and unlink under the start lock, so that a client
                # either reaches us before this or starts a fresh daemon after it). The lock
                # is taken in a thread: a client may hold it while it starts a daemon.
                fd = await trio.to_thread.run_sync(_lock_fd, state.path / _START_LOCK_NAME)
                try:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    await listener.aclose()
                finally:
                    os.close(fd)
                nursery.cancel_scope.cancel()
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    log.info("host_exited", reason="idle")


class _Clients:
    """Connections in progress (the daemon does not leave while one is open)."""

    def __init__(self) -> None:
        self.active = 0
        self.changed = trio.Event()

    def add(self, n: int) -> None:
        self.active += n
        self.changed.set()
        self.changed = trio.Event()


async def _wait_idle(rt: Runtime, clients: _Clients, linger_s: float) -> None:
    """Return once no enclave ran and no client was connected for ``linger_s`` seconds."""
    idle_since: float | None = None
    while True:
        busy = clients.active > 0 or rt.running > 0
        now = trio.current_time()
        if busy:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= linger_s:
            return
        # poll: enclaves end inside the runtime (no event for "none left"); 0.1 s is cheap
        with trio.move_on_after(0.1 if linger_s > 0 else 0.02):
            await clients.changed.wait()


async def _accept_loop(
    listener: trio.SocketListener, rt: Runtime, clients: _Clients, nursery: trio.Nursery
) -> None:
    limiter = trio.CapacityLimiter(MAX_CLIENTS)
    while True:
        try:
            stream = await listener.accept()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        except OSError as exc:  # EMFILE and the like: back off, keep serving
            log.warning("host_accept_failed", error=repr(exc))
            await trio.sleep(0.1)
            continue
        clients.add(1)
        nursery.start_soon(_client, stream, rt, clients, limiter)


async def _client(
    stream: trio.SocketStream, rt: Runtime, clients: _Clients, limiter: trio.CapacityLimiter
) -> None:
    try:
        async with limiter, stream:
            await _serve_client(stream, rt)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.info("host_client_gone", error=repr(exc))
    except Exception as exc:  # a bug must not take the daemon (and its enclaves) down
        log.warning("host_request_failed", error=repr(exc))
    finally:
        clients.add(-1)


async def _read_request(stream: trio.SocketStream) -> bytes:
    buf = b""
    with trio.move_on_after(REQUEST_TIMEOUT_S):
        while b"\n" not in buf and len(buf) <= MAX_REQUEST_BYTES:
            chunk = await stream.receive_some(MAX_REQUEST_BYTES + 1 - len(buf))
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\n", 1)[0] if b"\n" in buf else b""


async def _send(stream: trio.SocketStream, obj: Any) -> None:
    await stream.send_all((json.dumps(obj) + "\n").encode())


async def _serve_client(stream: trio.SocketStream, rt: Runtime) -> None:
    line = await _read_request(stream)
    try:
        msg = json.loads(line)
        if not isinstance(msg, dict) or msg.get("op") != "run":
            raise ValueError('expected {"op": "run", ...}')
        request = LaunchRequest.from_json(msg.get("request"))  # type: ignore[arg-type]
        wait_ready = bool(msg.get("wait_ready", False))
        ready_timeout_s = float(msg.get("ready_timeout_s", 60.0))
        console = bool(msg.get("console", False))
    except NitroCliError as exc:
        await _send(stream, {"accepted": True})
        await _send(stream, {"ok": False, **exc.to_json()})
        return
    except (ValueError, TypeError) as exc:
        await _send(stream, {"accepted": True})
        err = InvalidCommandError(f"bad request to the host daemon: {exc}")
        await _send(stream, {"ok": False, **err.to_json()})
        return
    await _send(stream, {"accepted": True})
    info = await _launch_unless_client_leaves(stream, rt, request, wait_ready, ready_timeout_s)
    if info is None:
        return
    if console:
        await _stream_console(stream, rt, info.enclave_id)


async def _launch_unless_client_leaves(
    stream: trio.SocketStream,
    rt: Runtime,
    request: LaunchRequest,
    wait_ready: bool,
    ready_timeout_s: float,
) -> EnclaveInfo | None:
    """Launch; a client that disconnects before the reply cancels the start (the supervisor
    tears everything down). Returns the info once the reply is sent, else None."""
    result: dict[str, Any] = {}
    async with trio.open_nursery() as n:

        async def watch() -> None:
            # The client sends nothing more: EOF (or a reset) means it is gone.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.receive_some(1)
            log.info("host_client_left_during_start", eif=request.eif_path)
            n.cancel_scope.cancel()

        async def launch() -> None:
            try:
                result["info"] = await rt.launch(
                    request, wait_ready=wait_ready, ready_timeout_s=ready_timeout_s
                )
            except NitroCliError as exc:
                result["error"] = exc
            n.cancel_scope.cancel()

        n.start_soon(watch)
        n.start_soon(launch)
    if "error" in result:
        exc: NitroCliError = result["error"]
        reply: dict[str, Any] = {"ok": False, **exc.to_json()}
        if hasattr(exc, "detail"):
            reply["detail"] = exc.detail
        await _send(stream, reply)
        return None
    if "info" not in result:
        return None  # the client left: the start was cancelled
    info: EnclaveInfo = result["info"]
    await _send(stream, {"ok": True, "info": info.to_record()})
    return info


async def _stream_console(stream: trio.SocketStream, rt: Runtime, enclave_id: str) -> None:
    """History plus live console bytes until the enclave ends or the client leaves."""
    try:
        recv = await rt.console(enclave_id)
    except NitroCliError:
        return
    async with recv:
        async for chunk in recv:
            await stream.send_all(chunk)


def _lock_fd(path: Path) -> int:
    """flock(2) ``path`` (blocking); returns the fd holding the lock (close it to release)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _flock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold flock(2) on ``path`` (created 0600); yields whether it was taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.host --state-dir D --ready-fd N [--log-file F]``.

    Writes one JSON line to the ready fd: ``{"ok": true, "pid": N}`` once listening,
    ``{"ok": false, "busy": true}`` when another daemon holds this state directory, or
    ``{"ok": false, "message": ...}``; then serves until idle (see the module docstring).
    """
    from transport.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m runtime.host", allow_abbrev=False)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--log-file")
    args = p.parse_args(argv)
    stream = open(args.log_file, "a", buffering=1) if args.log_file else sys.stderr  # noqa: SIM115
    configure_logging(json=True, stream=stream)
    ready = os.fdopen(args.ready_fd, "w", buffering=1)

    def report(obj: dict[str, Any]) -> None:
        with contextlib.suppress(OSError, ValueError):
            ready.write(json.dumps(obj) + "\n")
            ready.close()

    try:
        linger = float(os.environ.get(LINGER_ENV, DEFAULT_LINGER_S))
    except ValueError:
        linger = DEFAULT_LINGER_S
    # at least MIN_LINGER_S: the client that started us must have time to connect
    linger = max(linger, MIN_LINGER_S) if linger == linger else DEFAULT_LINGER_S
    state = StateDir(Path(args.state_dir))
    with _flock(state.path / _LOCK_NAME, blocking=False) as mine:
        if not mine:
            report({"ok": False, "busy": True})
            return 0

        async def amain() -> None:
            async with trio.open_nursery() as nursery:

                async def on_signals() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                        async for signum in sigs:
                            log.info("host_signal", signal=int(signum))
                            nursery.cancel_scope.cancel()  # the runtime terminates enclaves

                async def serve(task_status: trio.TaskStatus[None]) -> None:
                    await serve_host(state, linger_s=linger, task_status=task_status)
                    nursery.cancel_scope.cancel()  # idle: stop listening for signals too

                nursery.start_soon(on_signals)
                await nursery.start(serve)
                log.info("host_listening", pid=os.getpid(), linger_s=linger)
                report({"ok": True, "pid": os.getpid()})

        try:
            trio.run(amain)
        except BaseException as exc:
            report({"ok": False, "message": f"the host daemon failed: {exc!r}"})
            log.exception("host_failed")
            return 1
    return 0


# -- client side -------------------------------------------------------------------------------


@dataclass
class HostReply:
    """A launch the daemon carried out: the enclave and, with ``console``, the connection on
    which its console bytes follow (``leftover`` first: what arrived with the reply). The
    caller reads and closes ``conn``."""

    info: EnclaveInfo
    conn: socket.socket | None = None
    leftover: bytes = b""


class _LineConn:
    """A blocking client connection read line by line, with deadlines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read_line(self, deadline: float) -> bytes | None:
        """One line before ``deadline`` (monotonic); None on EOF, error or timeout."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or len(self.buf) > MAX_REQUEST_BYTES:
                return None
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


def _connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(path) as connectable:
            s.connect(connectable)
    except OSError:
        s.close()
        return None
    return s


def _start_daemon(state: StateDir) -> None:
    """Start a host daemon for ``state`` and wait until it listens (or says one already does).

    Raises:
        ProcessSpawnError: E05, it could not be started or did not come up.
    """
    logs = state.path / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    r, w = os.pipe()
    try:
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "runtime.host",
                    "--state-dir",
                    str(state.path),
                    "--ready-fd",
                    str(w),
                    "--log-file",
                    str(logs / "host.log"),
                ],
                pass_fds=(w,),
                start_new_session=True,  # a Ctrl-C in the terminal is not the daemon's
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError as exc:
            raise ProcessSpawnError(f"Failed to start the host daemon: {exc}") from exc
        os.close(w)
        w = -1
        line = _read_fd_line(r, DAEMON_START_TIMEOUT_S)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    try:
        reply = json.loads(line) if line else None
    except ValueError:
        reply = None
    if isinstance(reply, dict) and (reply.get("ok") or reply.get("busy")):
        return
    with contextlib.suppress(OSError):
        proc.kill()
    raise ProcessSpawnError(
        "The host daemon did not start"
        + (f": {reply.get('message')}" if isinstance(reply, dict) else "")
        + f" (see {logs / 'host.log'})"
    )


def _read_fd_line(fd: int, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    buf = b""
    while b"\n" not in buf and len(buf) < MAX_REQUEST_BYTES:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0]


def _connect_or_start(state: StateDir) -> socket.socket:
    path = state.path / _SOCKET_NAME
    conn = _connect(path)
    if conn is not None:
        return conn
    with _flock(state.path / _START_LOCK_NAME):
        conn = _connect(path)
        if conn is None:
            _start_daemon(state)
            conn = _connect(path)
    if conn is None:
        raise EnclaveProcessConnectionError(f"Failed to connect to the host daemon at {path}")
    return conn


def launch_via_host(
    state: StateDir,
    request: LaunchRequest,
    *,
    wait_ready: bool = False,
    ready_timeout_s: float = 60.0,
    console: bool = False,
    boot_timeout_s: float = 60.0,
    on_started: Callable[[], None] | None = None,
) -> HostReply:
    """Have the state directory's host daemon (started if need be) launch ``request``.

    Blocking (the CLI's side). A KeyboardInterrupt before the reply closes the connection,
    which cancels the start.

    Raises:
        ProcessSpawnError: E05, no daemon could be started.
        EnclaveProcessConnectionError: E39, the daemon could not be reached or did not answer.
        NitroCliError: the typed error of the failed launch (E01..E60).
    """
    message = (
        json.dumps(
            {
                "op": "run",
                "request": request.to_json(),
                "wait_ready": wait_ready,
                "ready_timeout_s": ready_timeout_s,
                "console": console,
            }
        ).encode()
        + b"\n"
    )
    for _attempt in range(3):  # a daemon that was just leaving: start a fresh one
        conn = _LineConn(_connect_or_start(state))
        try:
            conn.sock.sendall(message)
            accepted = conn.read_line(time.monotonic() + REQUEST_TIMEOUT_S)
        except OSError:
            accepted = None
        if accepted is not None:
            break
        conn.sock.close()
    else:
        raise EnclaveProcessConnectionError("The host daemon did not accept the request")
    if on_started is not None:
        on_started()
    deadline = (
        time.monotonic()
        + (request.boot_timeout_s or boot_timeout_s)
        + (ready_timeout_s if wait_ready else 0.0)
        + REPLY_SLACK_S
    )
    try:
        line = conn.read_line(deadline)
        reply = json.loads(line) if line else None
    except ValueError:
        reply = None
    except BaseException:
        conn.sock.close()  # KeyboardInterrupt: the daemon sees EOF and cancels the start
        raise
    if not isinstance(reply, dict):
        conn.sock.close()
        raise EnclaveProcessConnectionError("The host daemon gave no reply (see logs/host.log)")
    if not reply.get("ok"):
        conn.sock.close()
        raw = reply.get("info")
        info = [str(i) for i in raw] if isinstance(raw, list) else []
        err = error_for_code(str(reply.get("code", "E00")), str(reply.get("message")), info=info)
        if "detail" in reply and hasattr(err, "detail"):
            err.detail = str(reply["detail"])
        raise err
    try:
        info_rec = EnclaveInfo.from_record(reply["info"])
    except (KeyError, TypeError, ValueError) as exc:
        conn.sock.close()
        raise EnclaveProcessConnectionError("The host daemon gave a malformed reply") from exc
    if console:
        return HostReply(info_rec, conn.sock, conn.buf)
    conn.sock.close()
    return HostReply(info_rec)


if __name__ == "__main__":
    sys.exit(main())
