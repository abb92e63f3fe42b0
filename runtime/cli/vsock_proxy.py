"""``enclave vsock-proxy``: Nitro's vsock-proxy (reference/nitro.md §7.1).

``enclave vsock-proxy LOCAL_PORT REMOTE_ADDR REMOTE_PORT [--config FILE] [-4|-6] [-w N]``
listens on the parent's vsock port ``LOCAL_PORT`` (CID 3) and pipes each connection to TCP
``REMOTE_ADDR:REMOTE_PORT``, which must be on the allowlist. Without ``--config`` the allowlist
is Nitro's default file; if that file does not exist the proxy refuses to start (fail closed).
Every user error (a bad port or worker count, a missing or invalid allowlist, a denied endpoint,
a busy vsock port, a missing argument) is one ``error:`` line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.cli.ingress import one_line_errors, parse_count, run_until_signal
from transport.errors import ConfigurationError
from transport.hostport import parse_host_port
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


def _local_port(value: str) -> int:
    """The vsock port to listen on (u32, as Nitro's proxy accepts)."""
    text = value.strip()
    if not text.isascii() or not text.isdigit() or int(text) > 0xFFFF_FFFF:
        raise ConfigurationError(f"LOCAL_PORT {value!r}: expected a vsock port 0 … 4294967295")
    return int(text)


def _remote(addr: str, port: str) -> tuple[str, int]:
    """REMOTE_ADDR and REMOTE_PORT through the one HOST:PORT parser (brackets added for v6)."""
    host = addr.strip()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return parse_host_port(f"{host}:{port.strip()}", what="REMOTE_ADDR REMOTE_PORT")


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "vsock-proxy",
        help="proxy the parent's vsock port to an allow-listed TCP endpoint (Nitro vsock-proxy)",
        description="Listen on vsock (3, LOCAL_PORT) and forward each connection to "
        "REMOTE_ADDR:REMOTE_PORT, which must be allowed by the YAML allowlist.",
    )
    one_line_errors(p)
    p.add_argument("local_port", metavar="LOCAL_PORT", help="vsock port on CID 3")
    p.add_argument("remote_addr", metavar="REMOTE_ADDR", help="remote host name or IP")
    p.add_argument("remote_port", metavar="REMOTE_PORT", help="remote TCP port")
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
        default=str(DEFAULT_NUM_WORKERS),
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


def run(args: argparse.Namespace) -> int:
    local_port = _local_port(args.local_port)
    remote_host, remote_port = _remote(args.remote_addr, args.remote_port)
    num_workers = parse_count(args.num_workers, "--num_workers")
    allowlist = load_allowlist(args.config)
    ip_version = IpVersion.IPV4 if args.ipv4 else IpVersion.IPV6 if args.ipv6 else IpVersion.ANY
    serve = partial(
        serve_vsock_proxy,
        local_port,
        remote_host,
        remote_port,
        allowlist=allowlist,
        num_workers=num_workers,
        fabric_dir=args.fabric_dir,
        ip_version=ip_version,
    )
    return run_until_signal(serve)
