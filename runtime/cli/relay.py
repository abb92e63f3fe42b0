"""``enclave relay``: the parent's enclave-to-enclave relay, next to ``vsock-proxy`` and
``ingress``.

``enclave relay --allow front=model:5005 --allow worker=worker:6000`` listens on vsock
``(3, 7200)`` and relays an enclave's connection to another enclave's port when a rule allows
it (``transport/RELAY.md``): ``FROM=TO:PORT``, where ``FROM``/``TO`` are CIDs or enclave names (a
name covers its replicas ``NAME_1``...). Everything else is refused and logged. The enclaves are
those of the state directory (``ENCLAVE_STATE_DIR``), as ``describe-enclaves`` shows them. Once
listening it prints one JSON line on stdout (port and rules). Every user error (a malformed rule,
a busy port, an unusable fabric directory, a bad number) is one ``error:`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from runtime.cli.ingress import (
    one_line_errors,
    parse_count,
    parse_vsock_number,
    run_until_signal,
    usable_fabric_dir,
)
from transport.errors import ConfigurationError
from transport.peers import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_SOURCE,
    DEFAULT_RELAY_PORT,
    RelayPolicy,
)
from transport.vsock import VMADDR_PORT_ANY

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run"]


def register(subparsers: SubParsers) -> None:
    """Add ``enclave relay``."""
    p = subparsers.add_parser(
        "relay",
        help="relay enclave-to-enclave connections that an allowlist permits",
        description="Listen on vsock (3, --port) and connect enclaves to each other's ports "
        "when an --allow rule permits it; the enclaves attest to each other over it.",
        allow_abbrev=False,
    )
    one_line_errors(p)
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="FROM=TO:PORT",
        help="let enclave FROM reach vsock PORT of enclave TO (CIDs or names; a name covers "
        "its replicas); repeatable; nothing else is relayed",
    )
    p.add_argument(
        "--port",
        default=str(DEFAULT_RELAY_PORT),
        metavar="PORT",
        help=f"vsock port on the parent (CID 3) to listen on (default {DEFAULT_RELAY_PORT})",
    )
    p.add_argument(
        "--max-connections",
        default=str(DEFAULT_MAX_CONNECTIONS),
        metavar="N",
        help=f"relayed connections at once (default {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--max-per-source",
        default=str(DEFAULT_MAX_PER_SOURCE),
        metavar="N",
        help=f"relayed connections at once from one enclave (default {DEFAULT_MAX_PER_SOURCE})",
    )
    p.add_argument(
        "--fabric-dir",
        type=Path,
        default=None,
        help="emulated fabric directory (default $ENCLAVE_VSOCK_DIR or <state dir>/vsock)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve the relay until SIGINT/SIGTERM."""
    from runtime.cli._common import open_state_dir
    from runtime.relay import serve_relay

    if not args.allow:
        raise ConfigurationError(
            "relay: give at least one --allow FROM=TO:PORT rule (nothing is relayed otherwise)"
        )
    policy = RelayPolicy(args.allow)  # a malformed rule: one error line naming it
    port = parse_vsock_number(args.port, "--port", maximum=VMADDR_PORT_ANY - 1)  # a real port
    max_connections = parse_count(args.max_connections, "--max-connections")
    max_per_source = parse_count(args.max_per_source, "--max-per-source")
    if args.fabric_dir is not None:
        usable_fabric_dir(args.fabric_dir)
    state = open_state_dir()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                partial(
                    serve_relay,
                    state,
                    policy.rules,
                    port=port,
                    fabric_dir=args.fabric_dir,
                    max_connections=max_connections,
                    max_per_source=max_per_source,
                )
            )
            print(json.dumps({"port": bound, "rules": [str(r) for r in policy.rules]}), flush=True)

    return run_until_signal(main)
