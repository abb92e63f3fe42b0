"""``enclave ingress``: forward a host TCP port to an enclave's vsock port.

``enclave ingress --listen 127.0.0.1:5005 --cid 16 --port 5005`` accepts TCP connections and pipes
each one to vsock ``(16, 5005)``. Once listening it prints one JSON line on stdout with the bound
address (useful with port 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from runtime.cli.vsock_proxy import run_until_signal
from transport.errors import ConfigurationError
from transport.ingress import (
    DEFAULT_LISTEN_HOST,
    DEFAULT_MAX_CONNECTIONS,
    parse_listen,
    serve_ingress,
)
from transport.vsock import VsockAddr

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run"]


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "ingress",
        help="forward a host TCP port to an enclave's vsock port",
        description="Accept TCP connections on --listen and pipe each to vsock (--cid, --port).",
    )
    p.add_argument(
        "--listen",
        default=f"{DEFAULT_LISTEN_HOST}:0",
        metavar="HOST:PORT",
        help=f"TCP address to listen on (default {DEFAULT_LISTEN_HOST}:0, any free port)",
    )
    p.add_argument("--cid", type=int, required=True, help="the enclave's CID")
    p.add_argument("--port", type=int, required=True, help="the enclave's vsock port")
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"connections forwarded at once (default {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--fabric-dir",
        type=Path,
        default=None,
        help="emulated fabric directory (default $ENCLAVE_VSOCK_DIR or <state dir>/vsock)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    target = VsockAddr(args.cid, args.port)  # VsockError (exit 1) if out of range
    if args.max_connections < 1:
        raise ConfigurationError("--max-connections must be at least 1")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                lambda task_status: serve_ingress(
                    host,
                    port,
                    target,
                    fabric_dir=args.fabric_dir,
                    max_connections=args.max_connections,
                    task_status=task_status,
                )
            )
            print(json.dumps({"listen": f"{host}:{bound}", "target": str(target)}), flush=True)

    return run_until_signal(main)
