"""``enclave console (--enclave-id ID | --enclave-name NAME) [--disconnect-timeout SECONDS]``.

Streams a debug-mode enclave's console (its app's stdout and stderr, from the start) until the
enclave exits or, with ``--disconnect-timeout``, after that many seconds without output.
Non-debug enclaves have no console (E44), as on Nitro.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING

import trio

from runtime._unixsock import short_path
from runtime.errors import NitroCliError
from runtime.records import EnclaveInfo
from runtime.state import StateDir
from transport.paths import default_state_dir

if TYPE_CHECKING:
    from runtime.cli import SubParsers

_E44 = (
    "The enclave was not started with the debug flag set, include '--debug-mode' in the "
    "run-enclave command"
)


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("console", help="attach to a debug enclave's console (nitro-cli)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--enclave-id", metavar="ID")
    g.add_argument("--enclave-name", metavar="NAME")
    p.add_argument(
        "--disconnect-timeout",
        metavar="SECONDS",
        type=int,
        help="disconnect after this many seconds without console output",
    )
    p.set_defaults(func=run)


def stream_console(state: StateDir, info: EnclaveInfo, *, disconnect_timeout: float | None) -> int:
    """Copy the console to stdout (binary) until the enclave exits or the idle timeout."""
    if not info.debug:
        raise NitroCliError("E44", _E44)
    idle = math.inf if disconnect_timeout is None else float(disconnect_timeout)
    out = sys.stdout.buffer

    async def go() -> None:
        try:
            with short_path(state.socket_path(info.enclave_id)) as connectable:
                stream = await trio.open_unix_socket(connectable)
        except OSError as exc:
            raise NitroCliError("E44", f"Failed to connect to the console: {exc}") from exc
        async with stream:
            await stream.send_all(b'{"op": "console"}\n')
            buf = b""
            while b"\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise NitroCliError("E44", "The enclave process closed the console")
                buf += chunk
            head, _, rest = buf.partition(b"\n")
            reply = json.loads(head)
            if not reply.get("ok"):
                raise NitroCliError(str(reply.get("code", "E44")), str(reply.get("message")))
            print("Successfully connected to the console.")
            sys.stdout.flush()
            if rest:
                out.write(rest)
                out.flush()
            while True:
                with trio.move_on_after(idle) as scope:
                    chunk = await stream.receive_some(65536)
                if scope.cancelled_caught or not chunk:
                    return
                out.write(chunk)
                out.flush()

    print(f"Connecting to the console for enclave {info.enclave_cid}...")
    sys.stdout.flush()
    trio.run(go)
    return 0


def run(args: argparse.Namespace) -> int:
    state = StateDir(default_state_dir())
    info = state.find(enclave_id=args.enclave_id, name=args.enclave_name)
    return stream_console(state, info, disconnect_timeout=args.disconnect_timeout)
