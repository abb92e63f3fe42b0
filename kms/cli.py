"""Command-line pieces shared by ``python -m kms`` and ``enclave kms ...``.

``serve``: ``[--listen HOST:PORT] [--state-dir DIR] [--config FILE] [--seed FILE]
[--trust-root SPEC ...]``; flags override the config file only when given (B9).
``audit verify FILE``: check the hash chain, name the first broken line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from transport.errors import ConfigurationError, EnclaveError
from transport.hostport import parse_host_port
from transport.logs import configure_logging

from .audit import verify_audit_log
from .config import DEFAULT_HOST, DEFAULT_PORT, KmsConfig
from .errors import AuditChainError

__all__ = [
    "add_serve_arguments",
    "config_from_args",
    "run_serve",
    "run_audit_verify",
    "serve_main",
]


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Add the daemon's flags to ``p``."""
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_HOST}:{DEFAULT_PORT}; port 0 = ephemeral)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="database, master key and audit log (default: <state dir>/kms)",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--seed", type=Path, help="seed file (JSON/YAML) of keys, aliases, policies")
    p.add_argument(
        "--trust-root",
        action="append",
        metavar="SPEC",
        help='attestation trust root for Recipient: "aws", "local" or a PEM path (repeatable)',
    )


def config_from_args(args: argparse.Namespace) -> KmsConfig:
    """The config file (if any) with the flags that were given applied on top."""
    config = KmsConfig.from_toml(args.config) if args.config else KmsConfig()
    changes: dict[str, Any] = {}
    if args.listen:
        changes["host"], changes["port"] = parse_host_port(
            args.listen, default_host=DEFAULT_HOST, allow_port_zero=True, what="--listen"
        )
    if args.state_dir:
        changes["state_dir"] = args.state_dir.resolve()
    if args.seed:
        changes["seed_file"] = args.seed.resolve()
    if args.trust_root:
        changes["trust_roots"] = tuple(
            r if r in ("aws", "local") else str(Path(r).resolve()) for r in args.trust_root
        )
    return config.with_overrides(**changes) if changes else config


def run_serve(args: argparse.Namespace) -> int:
    """``serve``: run the daemon until SIGTERM/SIGINT."""
    from .daemon import run_daemon

    config = config_from_args(args)
    config.resolve_credentials()  # fail closed before binding anything
    return run_daemon(config)


def run_audit_verify(args: argparse.Namespace) -> int:
    """``audit verify FILE``: exit 0 and print the line count, or exit 1 naming the line."""
    path: Path = args.file
    try:
        count = verify_audit_log(path)
    except AuditChainError as exc:
        print(json.dumps({"ok": False, "line": exc.line, "reason": exc.reason}))
        print(f"audit log {path} is broken at line {exc.line}: {exc.reason}", file=sys.stderr)
        return 1
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    print(json.dumps({"ok": True, "lines": count}))
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m kms`` (the daemon)."""
    parser = argparse.ArgumentParser(prog="python -m kms", description="local AWS KMS daemon")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        return run_serve(args)
    except EnclaveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
