"""``enclave kms xks-proxy --config FILE [--listen HOST:PORT]``: the owner's side of an external
key store (hold your own key), registered under ``enclave kms`` by :mod:`runtime.cli.kms`.

Runs until SIGTERM/SIGINT; SIGHUP re-reads the configuration (a key disabled there is refused
from then on). Every user error (a missing or invalid config file, a key file readable by
others, a wrong token PIN, a busy port) is one ``error:`` line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["add_subcommand", "run"]


def add_subcommand(kms_subparsers: SubParsers) -> None:
    """Add ``xks-proxy`` to the ``enclave kms`` subcommands."""
    p = kms_subparsers.add_parser(
        "xks-proxy",
        help="serve the XKS Proxy API for an external key store (hold your own key)",
        description="Serve the XKS Proxy API (GetKeyMetadata, Encrypt, Decrypt, "
        "GetHealthStatus) under <uri_path> for AWS KMS or this project's KMS. SIGHUP reloads "
        "the configuration; SIGTERM stops.",
        allow_abbrev=False,
    )
    p.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (overrides the file's listen; port 0 = ephemeral)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the configuration, open the keys, serve."""
    from kms.xks.config import DEFAULT_HOST, XksProxyConfig
    from kms.xks.server import run_xks_proxy
    from transport.hostport import parse_host_port

    config = XksProxyConfig.from_toml(args.config)
    if args.listen:
        host, port = parse_host_port(
            args.listen, default_host=DEFAULT_HOST, allow_port_zero=True, what="--listen"
        )
        config = config.with_overrides(host=host, port=port)
    return run_xks_proxy(config)
