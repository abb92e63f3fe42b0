"""The in-enclave init: the first code that runs inside an enclave (part of the measured
bootstrap ramdisk). It may import only the standard library and the public modules of the
enclave-side packages (``transport.blocking``, ...); never trio (it would cost every fresh
start ~90 ms), never the host runtime, never a package's private modules
(``tests/runtime/test_enclave_side.py`` checks every import).

As Nitro's init (``reference/nitro.md`` §1.7) it connects to the parent at (3, 9000), writes the
heartbeat byte 0xB7 and dies unless the parent echoes it. Our extension: init then writes one
``R`` byte on the same connection right before the application starts and waits for the
parent's one-byte acknowledgement, so the runtime knows (and has recorded) that the enclave is
running, not merely booted, before any app code runs. Then it runs ``cmd``:

* a Python command (``python``/``python3`` followed by ``-m MOD``, ``-c CODE`` or ``FILE``) runs
  in this process (``runpy``), so a pre-imported zygote's modules are reused;
* anything else is ``execvpe``'d (the app becomes PID 1 of the enclave's pid namespace).

The app's exit ends the enclave. A ``MemoryError`` escaping the app exits with
:data:`EXIT_OOM` so the runtime can report it as out-of-memory (RLIMIT_AS mode); the kernel
OOM killer (cgroup mode) is seen by the runtime directly.

The launch parameters arrive on an inherited pipe (``ENCLAVE_INIT_FD``, removed from the
environment before the app starts): JSON ``{"cmd": [...], "cwd": "...", "env": {...}}``
(:class:`LaunchParameters`, checked before use); without ``env`` the inherited environment is
kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import runpy
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn, TypedDict

__all__ = [
    "main",
    "run",
    "LaunchParameters",
    "HEARTBEAT",
    "READY",
    "HEARTBEAT_PORT",
    "EXIT_OOM",
    "INIT_FD_ENV",
]

#: Nitro's boot heartbeat byte and port (BOOT init.c: HEART_BEAT 0xB7, VSOCK_PORT 9000).
HEARTBEAT = 0xB7
HEARTBEAT_PORT = 9000
#: Our extension: sent after the echo, right before the app starts.
READY = ord("R")
#: Exit status meaning "the app ran out of memory" (RLIMIT_AS mode).
EXIT_OOM = 251
#: Environment variable naming the inherited launch-parameters fd.
INIT_FD_ENV = "ENCLAVE_INIT_FD"
#: Upper bound on the launch parameters (cmd + env): bounded read.
MAX_SPEC_BYTES = 1 << 20
_PR_SET_DUMPABLE = 4
_PYTHON_NAMES = frozenset({"python", "python3", os.path.basename(sys.executable)})


class _LaunchCommand(TypedDict):
    cmd: list[str]


# total=False on a subclass rather than NotRequired[]: Python 3.11 cannot see NotRequired in
# a string annotation (``from __future__ import annotations``).
class LaunchParameters(_LaunchCommand, total=False):
    """What to run (the JSON on ``ENCLAVE_INIT_FD``): ``cmd`` (argv), ``cwd`` (default ``/``)
    and ``env`` (the app's whole environment; absent or null: the inherited one)."""

    cwd: str
    env: dict[str, str]


def _parameters(obj: object) -> LaunchParameters:
    """Check the decoded launch parameters' shape. Raises ValueError."""
    if not isinstance(obj, dict):
        raise ValueError("launch parameters must be an object")
    unknown = set(obj) - {"cmd", "cwd", "env"}
    if unknown:
        raise ValueError(f"unknown launch parameters: {sorted(map(str, unknown))}")
    cmd = obj.get("cmd")
    if not isinstance(cmd, list) or not all(isinstance(a, str) for a in cmd):
        raise ValueError("launch parameter 'cmd' must be a list of strings")
    out: LaunchParameters = {"cmd": list(cmd)}
    cwd = obj.get("cwd")
    if cwd is not None:
        if not isinstance(cwd, str):
            raise ValueError("launch parameter 'cwd' must be a string")
        out["cwd"] = cwd
    env = obj.get("env")
    if env is not None:
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("launch parameter 'env' must map strings to strings")
        out["env"] = dict(env)
    return out


def _read_spec(fd: int) -> LaunchParameters:
    chunks: list[bytes] = []
    total = 0
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        total += len(b)
        if total > MAX_SPEC_BYTES:
            raise ValueError("launch parameters too large")
        chunks.append(b)
    os.close(fd)
    return _parameters(json.loads(b"".join(chunks)))


#: Bound on each step of the boot handshake (the parent answers at once).
HANDSHAKE_TIMEOUT_S = 30.0


def _heartbeat_and_ready() -> None:
    """The boot handshake, blocking: the same code on the emulated fabric and on real
    ``AF_VSOCK`` (:mod:`transport.blocking`). No event loop: importing trio here would cost
    ~90 ms of every fresh-interpreter start, for three bytes."""
    from transport.blocking import VMADDR_CID_PARENT, VsockAddr, connect_vsock_blocking

    addr = VsockAddr(VMADDR_CID_PARENT, HEARTBEAT_PORT)
    with connect_vsock_blocking(addr, timeout_s=HANDSHAKE_TIMEOUT_S) as conn:
        conn.sendall(bytes([HEARTBEAT]))
        echo = conn.recv(1)  # the parent answers at once; the socket's timeout bounds it
        if echo != bytes([HEARTBEAT]):
            raise RuntimeError(f"bad heartbeat echo {echo!r}")
        conn.sendall(bytes([READY]))
        conn.recv(1)  # acknowledged once readiness is recorded (or EOF)


def _not_dumpable() -> None:
    # execve resets "dumpable"; set it again here (the sandbox also set it before exec).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _run_python(argv: Sequence[str]) -> int:
    """Run a Python command line in-process; returns its exit status."""
    args = list(argv[1:])
    while args and args[0].startswith("-") and args[0] not in ("-m", "-c", "-"):
        args.pop(0)  # interpreter flags (-u, -B, ...) have no in-process meaning
    try:
        if not args:
            raise SystemExit("enclave_init: no python program given")
        if args[0] in ("-m", "-c"):
            sys.path.insert(0, os.getcwd())  # as the interpreter does for -m/-c
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(args)
            sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code & 0xFF
        print(exc.code, file=sys.stderr)
        return 1
    except MemoryError:
        with contextlib.suppress(Exception):
            print("enclave app: MemoryError (out of enclave memory)", file=sys.stderr)
        return EXIT_OOM
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def run(spec: LaunchParameters, *, heartbeat: bool = True) -> NoReturn:
    """Heartbeat, then run the app of ``spec`` with its environment; never returns."""
    _not_dumpable()
    signal.signal(signal.SIGTERM, _on_sigterm)
    cmd = [str(a) for a in spec.get("cmd") or []]
    raw_env = spec.get("env")
    env = dict(os.environ) if raw_env is None else {str(k): str(v) for k, v in raw_env.items()}
    cwd = str(spec.get("cwd") or "/")
    if not cmd:
        print("enclave_init: empty cmd", file=sys.stderr)
        _exit(127)
    os.environ.clear()
    os.environ.update(env)
    with contextlib.suppress(OSError):
        os.chdir(cwd)
    if heartbeat:
        try:
            _heartbeat_and_ready()
        except BaseException as exc:
            print(f"enclave_init: heartbeat failed: {exc!r}", file=sys.stderr)
            _exit(1)
    if os.path.basename(cmd[0]) in _PYTHON_NAMES:
        _exit(_run_python(cmd))
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as exc:
        print(f"enclave_init: cannot exec {cmd[0]!r}: {exc}", file=sys.stderr)
    _exit(127)


def main() -> NoReturn:
    """``python -m runtime.enclave_init``: read the launch parameters from ENCLAVE_INIT_FD."""
    try:
        fd = int(os.environ.pop(INIT_FD_ENV))
        spec = _read_spec(fd)
    except (KeyError, ValueError, OSError) as exc:
        print(f"enclave_init: bad launch parameters: {exc}", file=sys.stderr)
        _exit(127)
    run(spec)
