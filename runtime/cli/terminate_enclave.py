"""``enclave terminate-enclave (--enclave-id ID | --enclave-name NAME | --all)``.

Asks each enclave's supervisor (through its control socket) to terminate it: SIGTERM, a
bounded grace period, then SIGKILL; returns once processes, sockets and records are gone.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import trio

from runtime.cli._common import open_state_dir, print_json
from runtime.control import terminate_via_control
from runtime.errors import EnclaveProcessConnectionError
from runtime.records import EnclaveInfo, EnclaveState
from runtime.state import StateDir

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run", "TERMINATE_TIMEOUT_S"]

#: Bound on one terminate round trip (grace period + kill + cleanup).
TERMINATE_TIMEOUT_S = 30.0


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "terminate-enclave", help="terminate enclaves (nitro-cli)", allow_abbrev=False
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--enclave-id", metavar="ID")
    g.add_argument("--enclave-name", metavar="NAME")
    g.add_argument("--all", action="store_true")
    p.set_defaults(func=run)


def _terminate(state: StateDir, info: EnclaveInfo) -> dict[str, Any]:
    async def go() -> None:
        with trio.fail_after(TERMINATE_TIMEOUT_S):
            await terminate_via_control(state, info.enclave_id)

    try:
        trio.run(go)
    except trio.TooSlowError as exc:
        raise EnclaveProcessConnectionError(f"Timed out terminating {info.enclave_id}") from exc
    print(f"Successfully terminated enclave {info.enclave_id}.", file=sys.stderr)
    return {"EnclaveName": info.enclave_name, "EnclaveID": info.enclave_id, "Terminated": True}


def run(args: argparse.Namespace) -> int:
    state = open_state_dir()
    if args.all:
        out = []
        for info in state.records():
            if info.state in (EnclaveState.RUNNING, EnclaveState.TERMINATING):
                out.append(_terminate(state, info))
        print_json(out)
        return 0
    info = state.find(enclave_id=args.enclave_id, name=args.enclave_name)
    print_json(_terminate(state, info))
    return 0
