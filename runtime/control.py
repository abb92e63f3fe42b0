"""The control socket of a running enclave (``<state>/enclaves/<slot>.sock``, 0600).

How other processes (``terminate-enclave``, ``console``, a runtime on the same state
directory) reach the supervisor that owns an enclave. One JSON line per connection::

    {"op": "terminate"}  ->  {"ok": true, "exit_reason": {...}}       once the enclave is gone
    {"op": "console"}    ->  {"ok": true, "cid": N}, then the raw console bytes until it exits
    anything else        ->  {"ok": false, "code": "E14", "message": ...}
    a failure            ->  {"ok": false, "code": "Exx", "message": ..., "info": [...]}

The server never lets a client take the supervisor down: a client that sends nothing, sends
garbage, or vanishes mid-request (Ctrl-C in ``console``) costs one bounded handler, logged, and
nothing else. Requests are bounded in size and time.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Final, Protocol

import structlog
import trio

from runtime._unixsock import bind_private, short_path
from runtime.errors import (
    ConsoleConnectionError,
    EnclaveProcessConnectionError,
    InvalidCommandError,
    NitroCliError,
    error_for_code,
)
from runtime.records import ExitReason
from runtime.state import StateDir

__all__ = [
    "ControlTarget",
    "ControlServer",
    "serve_control",
    "terminate_via_control",
    "open_console",
    "MAX_CONTROL_LINE",
    "REQUEST_TIMEOUT_S",
]

log = structlog.get_logger("runtime.control")

#: Bound on a request or reply header line (bytes).
MAX_CONTROL_LINE: Final = 4096
#: A client must send its request line within this time.
REQUEST_TIMEOUT_S: Final = 5.0
#: A reply header (``console``'s first line) must arrive within this time.
REPLY_TIMEOUT_S: Final = 10.0


class ControlTarget(Protocol):
    """What a control socket serves: the supervisor of one enclave."""

    @property
    def cid(self) -> int:
        """The enclave's CID."""
        ...

    async def terminate(self) -> ExitReason:
        """Terminate the enclave; return once it is gone."""
        ...

    async def console_stream(self) -> trio.MemoryReceiveChannel[bytes]:
        """History plus live console bytes (E44 ConsoleConnectionError without debug mode)."""
        ...


class ControlServer:
    """Serves one target's control socket. ``await nursery.start(server.run)``; :meth:`stop`
    stops accepting and gives requests in flight (a terminate waiting to answer) a bounded
    grace to finish."""

    def __init__(self, path: Path, target: ControlTarget) -> None:
        self.path = path
        self.target = target
        self._accepting = trio.CancelScope()
        self._handlers: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind (mode 0600) and serve until :meth:`stop` (then drain) or cancellation."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = trio.socket.from_stdlib_socket(bind_private(self.path))
        sock.listen(16)
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            async with listener:
                task_status.started()
                with self._accepting:
                    while True:
                        try:
                            stream = await listener.accept()
                        except OSError as exc:  # EMFILE and the like: back off, keep serving
                            log.warning("control_accept_failed", error=repr(exc))
                            await trio.sleep(0.1)
                            continue
                        handlers.start_soon(_handle, stream, self.target)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def stop(self, grace_s: float) -> None:
        """Stop accepting; requests in flight get ``grace_s`` more, then are cancelled."""
        self._accepting.cancel()
        if self._handlers is not None:
            self._handlers.cancel_scope.deadline = trio.current_time() + grace_s


async def serve_control(
    path: Path,
    target: ControlTarget,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``target`` on a Unix socket at ``path`` (mode 0600) until cancelled."""
    await ControlServer(path, target).run(task_status=task_status)


async def _handle(stream: trio.SocketStream, target: ControlTarget) -> None:
    """One control connection; no exception leaves this function (the caller's nursery is
    the supervisor's own)."""
    try:
        async with stream:
            await _serve_one(stream, target)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("control_client_gone", error=repr(exc))
    except Exception as exc:  # a bug here must not take the enclave down
        log.warning("control_request_failed", error=repr(exc))


async def _serve_one(stream: trio.SocketStream, target: ControlTarget) -> None:
    line = await _read_line(stream, REQUEST_TIMEOUT_S)
    try:
        req = json.loads(line)
        op = req["op"]
    except (ValueError, KeyError, TypeError):
        await _send_json(stream, _error(InvalidCommandError("bad control request")))
        return
    try:
        if op == "terminate":
            reason = await target.terminate()
            await _send_json(stream, {"ok": True, "exit_reason": reason.to_json()})
        elif op == "console":
            recv = await target.console_stream()
            async with recv:
                await _send_json(stream, {"ok": True, "cid": target.cid})
                async for chunk in recv:
                    await stream.send_all(chunk)
        else:
            await _send_json(stream, _error(InvalidCommandError(f"unknown op {op!r}")))
    except NitroCliError as exc:
        await _send_json(stream, _error(exc))


def _error(exc: NitroCliError) -> dict[str, Any]:
    return {"ok": False, **exc.to_json()}


async def _read_line(stream: trio.abc.ReceiveStream, timeout_s: float) -> bytes:
    """One line (without its newline), bounded in size and time; b"" on EOF/timeout."""
    buf = b""
    with trio.move_on_after(timeout_s):
        while b"\n" not in buf and len(buf) < MAX_CONTROL_LINE:
            chunk = await stream.receive_some(MAX_CONTROL_LINE - len(buf))
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\n", 1)[0]


async def _send_json(stream: trio.abc.SendStream, obj: Any) -> None:
    await stream.send_all((json.dumps(obj) + "\n").encode())


def _reply_error(reply: Any, default: type[NitroCliError]) -> NitroCliError:
    if isinstance(reply, dict) and isinstance(reply.get("code"), str):
        raw = reply.get("info")
        info = [str(i) for i in raw] if isinstance(raw, list) else []
        return error_for_code(str(reply["code"]), str(reply.get("message", "")), info=info)
    return default("bad reply from the enclave process")


async def _connect(state: StateDir, enclave_id: str) -> trio.SocketStream:
    path = state.socket_path(enclave_id)
    try:
        with short_path(path) as connectable:
            return await trio.open_unix_socket(connectable)
    except OSError as exc:
        raise EnclaveProcessConnectionError(
            f"Failed to connect to the enclave process of {enclave_id}: {exc.strerror or exc}"
        ) from exc


async def terminate_via_control(state: StateDir, enclave_id: str) -> ExitReason:
    """Ask the supervisor of an enclave (any process) to terminate it; returns its exit
    reason once it is gone.

    Raises:
        EnclaveProcessConnectionError: E39, the supervisor cannot be reached or answered
            nothing usable.
        NitroCliError: what the supervisor reported.
    """
    stream = await _connect(state, enclave_id)
    async with stream:
        await stream.send_all(b'{"op": "terminate"}\n')
        buf = b""
        # no timeout of our own: terminate is bounded by the enclave's grace period + kill
        while b"\n" not in buf and len(buf) < MAX_CONTROL_LINE:
            chunk = await stream.receive_some(MAX_CONTROL_LINE)
            if not chunk:
                break
            buf += chunk
    try:
        reply = json.loads(buf.split(b"\n", 1)[0])
    except ValueError as exc:
        raise EnclaveProcessConnectionError(
            f"bad reply from the enclave process of {enclave_id}"
        ) from exc
    if isinstance(reply, dict) and reply.get("ok"):
        try:
            return ExitReason.from_json(reply["exit_reason"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EnclaveProcessConnectionError(
                f"bad reply from the enclave process of {enclave_id}"
            ) from exc
    raise _reply_error(reply, EnclaveProcessConnectionError)


async def open_console(state: StateDir, enclave_id: str) -> tuple[trio.SocketStream, bytes]:
    """Connect to an enclave's console: the stream (positioned after the reply header) and
    the console bytes already received with the header. The caller closes the stream.

    Raises:
        ConsoleConnectionError: E44, no console (not debug mode) or the supervisor is gone.
    """
    try:
        stream = await _connect(state, enclave_id)
    except EnclaveProcessConnectionError as exc:
        raise ConsoleConnectionError(f"Failed to connect to the console: {exc.message}") from exc
    try:
        try:
            await stream.send_all(b'{"op": "console"}\n')
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConsoleConnectionError("The enclave process closed the console") from exc
        buf = b""
        with trio.move_on_after(REPLY_TIMEOUT_S):
            while b"\n" not in buf and len(buf) < MAX_CONTROL_LINE:
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                if not chunk:
                    break
                buf += chunk
        head, newline, rest = buf.partition(b"\n")
        if not newline:
            raise ConsoleConnectionError("The enclave process closed the console")
        try:
            reply = json.loads(head)
        except ValueError:
            reply = None
        if not (isinstance(reply, dict) and reply.get("ok")):
            raise _reply_error(reply, ConsoleConnectionError)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return stream, rest
