"""The demo as processes, and how it stops.

:func:`main` does not run the stack itself. It creates the state directory and runs the demo in
a child process (``python -m runtime.demo``, :func:`child_main`) in a process group of its own,
and forwards SIGINT and SIGTERM to that child alone. A Ctrl-C on a terminal signals the whole
foreground process group; with the stack's helpers (the zygote, the enclaves) outside it, only
the demo sees the signal, and it stops them in order (:func:`run_in_process`): enclaves
terminated, cgroups removed, services stopped, the state directory (CA root key, KMS database,
sealed model) deleted. The child also asks the kernel for SIGTERM if its parent dies (a closed
terminal), and the parent removes the state directory if the child could not.

Exit statuses: 0, 1 when a step failed, 128 + the signal's number when a signal stopped it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Final

import trio

from runtime.demo.narration import Console
from runtime.demo.results import DemoFailure, DemoResults
from runtime.demo.steps import run_demo

__all__ = ["main", "run_in_process", "child_main"]

#: Exit status after a signal stopped the demo: 128 + the signal's number (the shell's rule).
_SIGNAL_EXIT_BASE: Final = 128
#: Linux prctl(2) option: the signal this process gets when its parent dies.
_PR_SET_PDEATHSIG: Final = 1


def _flatten(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_flatten(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__


def _lone(exc: BaseException) -> BaseException:
    """The single leaf of nested one-member exception groups (``exc`` itself otherwise)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run_in_process(
    state_dir: Path,
    *,
    keep: bool = False,
    out: Console | None = None,
    debug: bool = False,
    on_ready: Callable[[], None] | None = None,
    replicas: int = 1,
) -> int:
    """Run the demo in this process until it ends or SIGINT/SIGTERM arrives; return the exit
    status: 0, 1 when a step failed, 128 + the signal's number when a signal stopped it.

    Either signal cancels the steps; the stack then stops in order (enclaves, cgroups,
    services). Signals arriving during that shutdown are absorbed, never raised.
    ``state_dir`` is used as is and not removed (see :func:`main`). ``on_ready`` is called
    once the signal handlers are in place.
    """
    out = out or Console()
    received: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    # Outside trio (before it starts, after it ends) a signal is only recorded: it must not
    # raise KeyboardInterrupt in the middle of the stack's shutdown.
    previous = {s: signal.signal(s, remember) for s in (signal.SIGINT, signal.SIGTERM)}
    if on_ready is not None:
        on_ready()

    async def until_signal() -> DemoResults | None:
        work = trio.CancelScope()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:  # every signal is consumed; the first stops
                        if not received:
                            out.step(f"{signal.Signals(signum).name}: stopping everything")
                        received.append(signum)
                        work.cancel()

                nursery.start_soon(watch)
                if received:  # arrived before the receiver was open
                    work.cancel()
                with work:
                    results = await run_demo(state_dir, keep=keep, out=out, replicas=replicas)
                nursery.cancel_scope.cancel()
        return None if received else results

    try:
        results = trio.run(until_signal)
    except Exception as exc:  # every failure ends the demo with a non-zero status
        lone = _lone(exc)
        if debug:
            traceback.print_exception(exc)
        text = (
            str(lone)
            if isinstance(lone, DemoFailure)
            else f"{type(lone).__name__}: {_flatten(lone)}"
        )
        out.fail(text)
        out.error(text)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if results is None:
        out.step("stopped; the enclaves, their cgroups and every service are gone")
        return _SIGNAL_EXIT_BASE + received[0]
    out.step(
        f"done: accuracy {results.accuracy:.2%}, p50 {results.p50_ms:.2f} ms, "
        f"{results.throughput:,.0f} samples/s; MiniLM query p50 {results.text_enclave_ms:.1f} ms "
        f"(in-process {results.text_inproc_ms:.1f} ms); nothing left running"
    )
    return 0


def _remove_tree(path: Path) -> None:
    """Remove ``path`` entirely; a leftover is reported (it holds the CA key and the KMS data)."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        print(f"error: could not remove the demo's state directory {path}", file=sys.stderr)


def main(*, keep: bool, debug: bool = False, replicas: int = 1) -> int:
    """``enclave demo [--keep] [--replicas N]``; returns the exit status (non-zero if any
    step fails).

    The demo runs in a child process of its own process group (see the module docstring); this
    process forwards SIGINT and SIGTERM to it once it is ready to handle them, waits, and
    makes sure the temporary state directory is gone.
    """
    state_dir = Path(tempfile.mkdtemp(prefix="enclave-demo-"))
    ready_r, ready_w = os.pipe()
    pending: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)  # delivered once the child handles signals
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        argv = [sys.executable, "-m", "runtime.demo", "--state-dir", str(state_dir),
                "--ready-fd", str(ready_w)]  # fmt: skip
        if keep:
            argv.append("--keep")
        if debug:
            argv.append("--debug")
        if replicas != 1:
            argv += ["--replicas", str(replicas)]
        proc = subprocess.Popen(argv, pass_fds=(ready_w,), process_group=0)
        os.close(ready_w)
        ready = os.read(ready_r, 1)  # b"" if the child ended before it was ready
        if ready:
            child = proc
            for signum in pending:
                forward(signum, None)
        status = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(ready_r)
        _remove_tree(state_dir)
    if status < 0:
        name = signal.Signals(-status).name
        print(f"error: the demo process was killed by {name}", file=sys.stderr)
        return _SIGNAL_EXIT_BASE - status
    return status


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies (a closed terminal), so the stack stops."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime.demo --state-dir DIR [--ready-fd FD] [--keep] [--debug]
    [--replicas N]``: the child :func:`main` starts; runs the demo, then removes DIR."""
    parser = argparse.ArgumentParser(prog="python -m runtime.demo", allow_abbrev=False)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args(argv)
    parent = os.getppid()
    _die_with_parent()
    from transport.logs import configure_logging

    # The demo prints its own progress; service logs only when something is wrong, unless
    # ENCLAVE_LOG_LEVEL asks for more (info shows them all).
    configure_logging(None if "ENCLAVE_LOG_LEVEL" in os.environ else "error")
    ready_fd: int | None = args.ready_fd

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"r")
            os.close(ready_fd)

    try:
        if os.getppid() != parent:  # the parent died before the death signal was armed
            return 1
        return run_in_process(
            args.state_dir,
            keep=args.keep,
            out=Console(),
            debug=args.debug,
            on_ready=ready,
            replicas=args.replicas,
        )
    finally:
        _remove_tree(args.state_dir)
