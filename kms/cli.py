"""Command-line pieces shared by ``python -m kms`` and ``enclave kms ...``.

``serve``: ``[--listen HOST:PORT] [--state-dir DIR] [--config FILE] [--seed FILE]
[--trust-root SPEC ...] [--workers N] [--storage URL] [--start-despite-broken-audit-chain]``;
flags override the config file only when given (B9).
``audit verify [FILE | --storage URL] [--state-dir DIR]``: check the MAC chain (a file, or the
chain in a PostgreSQL store) with the master key (from ``ENCLAVE_KMS_MASTER_KEY`` or the state
directory's ``master.key``), name the first broken line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from transport.errors import ConfigurationError, EnclaveError
from transport.hostport import parse_host_port
from transport.logs import configure_logging

from .audit import is_legacy_audit_log, verify_audit_log, verify_legacy_audit_log
from .config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    MASTER_KEY_ENV,
    MAX_WORKERS,
    KmsConfig,
    KmsConfigChanges,
)
from .errors import AuditChainError

__all__ = [
    "one_line_errors",
    "add_serve_arguments",
    "config_from_args",
    "run_serve",
    "add_audit_verify_arguments",
    "run_audit_verify",
    "serve_main",
]


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report usage errors as ONE line, ``error: ...``, exit status 2 (argparse
    prints the whole usage first), unrecognized arguments included (argparse leaves those to
    the top-level parser). Returns ``parser``."""

    def error(message: str) -> NoReturn:
        print(f"error: {parser.prog}: {message} (see {parser.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    known = parser.parse_known_args

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = known(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    # Instance attributes shadow the methods for this parser only (argparse has no hook).
    parser.error = error  # type: ignore[method-assign]
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign,assignment]
    return parser


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
    p.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help=f"worker processes sharing the socket and the store, 1..{MAX_WORKERS} (default: "
        "one per CPU; 1 serves in the daemon's own process)",
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="where keys, aliases, grants and the audit chain live: sqlite (the default: the "
        "state directory) or postgresql://USER@HOST:PORT/DB, shared by every daemon given it. "
        "Put the password in PGPASSFILE/~/.pgpass or PGPASSWORD, not in the URL; it is never "
        "shown or logged",
    )
    p.add_argument(
        "--start-despite-broken-audit-chain",
        action="store_true",
        help="start even if the audit log's chain is broken (edited, or written by two "
        "daemons): the broken log is moved aside untouched and a new chain starts whose first "
        "line records the break. Without it the daemon refuses to start on a broken chain",
    )


def _workers(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of processes: {text!r}") from None
    if not 1 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be within 1..{MAX_WORKERS}, got {n}")
    return n


def add_audit_verify_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``audit verify``'s arguments to ``p``."""
    p.add_argument(
        "file",
        type=Path,
        nargs="?",
        help="the audit log (default: <state dir>/audit.jsonl)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="the daemon's state directory, for its master.key (default: the log's directory; "
        f"{MASTER_KEY_ENV} overrides the file, as for the daemon)",
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="check the chain in this PostgreSQL store (postgresql://...) instead of a file",
    )


def config_from_args(args: argparse.Namespace) -> KmsConfig:
    """The config file (if any) with the flags that were given applied on top."""
    config = KmsConfig.from_toml(args.config) if args.config else KmsConfig()
    changes: KmsConfigChanges = {}
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
    if getattr(args, "workers", None) is not None:
        changes["workers"] = args.workers
    if getattr(args, "storage", None):
        changes["storage"] = args.storage
    if getattr(args, "start_despite_broken_audit_chain", False):
        changes["start_despite_broken_audit_chain"] = True
    return config.with_overrides(**changes) if changes else config


def run_serve(args: argparse.Namespace) -> int:
    """``serve``: run the daemon until SIGTERM/SIGINT."""
    from .daemon import run_daemon

    config = config_from_args(args)
    config.resolve_credentials()  # fail closed before binding anything
    return run_daemon(config)


def run_audit_verify(args: argparse.Namespace) -> int:
    """``audit verify``: exit 0 and print the line count, or exit 1 naming the broken line.

    The chain is keyed, so verification needs the master key: ``ENCLAVE_KMS_MASTER_KEY``, else
    ``master.key`` in ``--state-dir`` (default: the directory holding the log). A schema-1 log
    (moved aside by the migration) is checked as the unkeyed chain it is, and says so.
    """
    import os

    from .app import AUDIT_FILE, read_master_key
    from .integrity import MasterKey

    state_dir: Path | None = args.state_dir
    path: Path | None = args.file
    if getattr(args, "storage", None) and args.storage != "sqlite":
        if path is not None:
            raise ConfigurationError("give an audit log FILE or --storage URL, not both")
        return _verify_pg(args.storage, state_dir or KmsConfig().resolved_state_dir)
    if path is None:
        state_dir = state_dir or KmsConfig().resolved_state_dir
        path = state_dir / AUDIT_FILE
    if state_dir is None:
        state_dir = path.resolve().parent
    if not path.is_file():
        raise ConfigurationError(f"cannot read the audit log {path}: no such file")
    try:
        if not _looks_like_audit_log(path):
            raise ConfigurationError(
                f"{path} is not an audit log: its first line is not a chain record"
            )
        if is_legacy_audit_log(path):
            count, _ = verify_legacy_audit_log(path)
            print(json.dumps({"ok": True, "lines": count, "keyed": False}))
            return 0
        master = MasterKey(read_master_key(state_dir, os.environ))
        count = verify_audit_log(path, master)
    except AuditChainError as exc:
        print(json.dumps({"ok": False, "line": exc.line, "reason": exc.reason}))
        print(f"audit log {path} is broken at line {exc.line}: {exc.reason}", file=sys.stderr)
        return 1
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
    print(json.dumps({"ok": True, "lines": count, "keyed": True}))
    return 0


def _verify_pg(url: str, state_dir: Path) -> int:
    """``audit verify --storage URL``: the chain in the database (its current one)."""
    import os

    from .app import read_master_key
    from .config import POSTGRES_SCHEMES, redact_url
    from .integrity import MasterKey
    from .storage import StoreUnavailable

    if not url.startswith(POSTGRES_SCHEMES):
        raise ConfigurationError(
            f"--storage must be sqlite or a postgresql:// URL, got {redact_url(url)!r}"
        )
    from .pg._connect import check_url
    from .pg.audit import verify_pg_audit

    check_url(url)
    master = MasterKey(read_master_key(state_dir, os.environ))
    try:
        chain, count = verify_pg_audit(url, master)
    except AuditChainError as exc:
        print(json.dumps({"ok": False, "line": exc.line, "reason": exc.reason}))
        print(
            f"audit chain in {redact_url(url)} is broken at line {exc.line}: {exc.reason}",
            file=sys.stderr,
        )
        return 1
    except StoreUnavailable as exc:
        raise ConfigurationError(str(exc)) from None
    print(json.dumps({"ok": True, "lines": count, "keyed": True, "chain": chain}))
    return 0


def _looks_like_audit_log(path: Path) -> bool:
    """Empty, or a first line that is a JSON object with a sequence number (bounded read)."""
    from .audit import MAX_LINE_BYTES

    with path.open("rb") as f:
        first = f.readline(MAX_LINE_BYTES)
    if not first:
        return True
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "seq" in record


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m kms`` (the daemon)."""
    parser = argparse.ArgumentParser(
        prog="python -m kms", description="local AWS KMS daemon", allow_abbrev=False
    )
    one_line_errors(parser)
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
