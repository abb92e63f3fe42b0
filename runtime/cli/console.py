"""``enclave console (--enclave-id ID | --enclave-name NAME) [--disconnect-timeout SECONDS]``.

Streams a debug-mode enclave's console (its app's stdout and stderr, from the start) until the
enclave exits or, with ``--disconnect-timeout``, after that many seconds without output.
Non-debug enclaves have no console (E44), as on Nitro. Ctrl-C detaches; the enclave keeps
running.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import TYPE_CHECKING

import trio

from runtime.cli._common import open_state_dir, parse_u64
from runtime.errors import ConsoleConnectionError
from runtime.records import EnclaveInfo
from runtime.state import StateDir

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run", "stream_console"]

_E44 = (
    "The enclave was not started with the debug flag set, include '--debug-mode' in the "
    "run-enclave command"
)


def register(subparsers: SubParsers) -> None:
    """Add ``console``."""
    p = subparsers.add_parser(
        "console", help="attach to a debug enclave's console (nitro-cli)", allow_abbrev=False
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--enclave-id", metavar="ID")
    g.add_argument("--enclave-name", metavar="NAME")
    p.add_argument(
        "--disconnect-timeout",
        metavar="SECONDS",
        help="disconnect after this many seconds without console output",
    )
    p.set_defaults(func=run)


def stream_console(state: StateDir, info: EnclaveInfo, *, disconnect_timeout: float | None) -> int:
    """Copy the console to stdout (binary) until the enclave exits or the idle timeout.

    Raises:
        ConsoleConnectionError: E44, not a debug-mode enclave, or its supervisor is gone.
    """
    from runtime.control import open_console

    if not info.debug:
        raise ConsoleConnectionError(_E44)
    idle = math.inf if disconnect_timeout is None else float(disconnect_timeout)
    out = sys.stdout.buffer

    async def go() -> None:
        stream, first = await open_console(state, info.enclave_id)
        async with stream:
            print("Successfully connected to the console.", flush=True)
            if first:
                out.write(first)
                out.flush()
            while True:
                with trio.move_on_after(idle) as scope:
                    try:
                        chunk = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        chunk = b""
                if scope.cancelled_caught or not chunk:
                    return
                out.write(chunk)
                out.flush()

    print(f"Connecting to the console for enclave {info.enclave_cid}...", flush=True)
    try:
        trio.run(go)
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            out.flush()
        print(
            f"\nDetached from the console. The enclave {info.enclave_id} is still running.",
            file=sys.stderr,
        )
        return 130
    return 0


def run(args: argparse.Namespace) -> int:
    """Find the enclave, then stream its console."""
    timeout = (
        None
        if args.disconnect_timeout is None
        else parse_u64(args.disconnect_timeout, "disconnect-timeout")
    )
    state = open_state_dir()
    info = state.find(enclave_id=args.enclave_id, name=args.enclave_name)
    return stream_console(state, info, disconnect_timeout=timeout)
