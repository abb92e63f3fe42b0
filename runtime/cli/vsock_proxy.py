"""``enclave vsock-proxy``: Nitro's vsock-proxy (reference/nitro.md §7.1).

``enclave vsock-proxy LOCAL_PORT REMOTE_ADDR REMOTE_PORT [--config FILE] [-4|-6] [-w N]``
listens on the parent's vsock port ``LOCAL_PORT`` (CID 3) and pipes each connection to TCP
``REMOTE_ADDR:REMOTE_PORT``, which must be on the allowlist. Without ``--config`` the allowlist
is Nitro's default file; if that file does not exist the proxy refuses to start (fail closed).
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from transport.errors import ConfigurationError
from transport.proxy import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_NUM_WORKERS,
    Allowlist,
    IpVersion,
    serve_vsock_proxy,
)

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run", "load_allowlist", "run_until_signal"]


def _port(value: str) -> int:
    if not value.isdigit() or int(value) > 0xFFFF_FFFF:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number")
    return int(value)


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "vsock-proxy",
        help="proxy the parent's vsock port to an allow-listed TCP endpoint (Nitro vsock-proxy)",
        description="Listen on vsock (3, LOCAL_PORT) and forward each connection to "
        "REMOTE_ADDR:REMOTE_PORT, which must be allowed by the YAML allowlist.",
    )
    p.add_argument("local_port", type=_port, metavar="LOCAL_PORT", help="vsock port on CID 3")
    p.add_argument("remote_addr", metavar="REMOTE_ADDR", help="remote host name or IP")
    p.add_argument("remote_port", type=_port, metavar="REMOTE_PORT", help="remote TCP port")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"allowlist YAML (default {DEFAULT_CONFIG_PATH}; required if that does not exist)",
    )
    family = p.add_mutually_exclusive_group()
    family.add_argument("-4", "--ipv4", action="store_true", help="use IPv4 addresses only")
    family.add_argument("-6", "--ipv6", action="store_true", help="use IPv6 addresses only")
    p.add_argument(
        "-w",
        "--num_workers",
        "--num-workers",
        dest="num_workers",
        type=int,
        default=DEFAULT_NUM_WORKERS,
        help=f"connections served at once (default {DEFAULT_NUM_WORKERS})",
    )
    p.add_argument(
        "--fabric-dir",
        type=Path,
        default=None,
        help="emulated fabric directory (default $ENCLAVE_VSOCK_DIR or <state dir>/vsock)",
    )
    p.set_defaults(func=run)


def load_allowlist(config: Path | None) -> Allowlist:
    """The allowlist from ``config``, or from Nitro's default path (which must exist)."""
    if config is None:
        if not DEFAULT_CONFIG_PATH.exists():
            raise ConfigurationError(
                f"no allowlist: the default config {DEFAULT_CONFIG_PATH} does not exist; "
                "pass --config FILE (YAML: allowlist: [{address: HOST, port: PORT}])"
            )
        config = DEFAULT_CONFIG_PATH
    return Allowlist.from_file(config)


def run_until_signal(serve: Callable[[], Awaitable[object]]) -> int:
    """``trio.run(serve)`` until it returns or SIGTERM/SIGINT arrives; then cancel it, so
    listeners close and remove their socket files. Returns the exit status (0)."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch)
            await serve()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # Re-raise a lone error (e.g. "not allowed") as itself, for the CLI's error report.
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], Exception):
            raise leaves[0] from None
        raise
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def run(args: argparse.Namespace) -> int:
    if args.num_workers < 1:
        raise ConfigurationError("--num_workers must be at least 1")
    allowlist = load_allowlist(args.config)
    ip_version = IpVersion.IPV4 if args.ipv4 else IpVersion.IPV6 if args.ipv6 else IpVersion.ANY
    serve = partial(
        serve_vsock_proxy,
        args.local_port,
        args.remote_addr,
        args.remote_port,
        allowlist=allowlist,
        num_workers=args.num_workers,
        fabric_dir=args.fabric_dir,
        ip_version=ip_version,
    )
    return run_until_signal(serve)
