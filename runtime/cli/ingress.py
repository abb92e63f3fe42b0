"""``enclave ingress``: forward a host TCP port to an enclave's vsock port.

``enclave ingress --listen 127.0.0.1:5005 --cid 16 --port 5005`` accepts TCP connections and pipes
each one to vsock ``(16, 5005)``. In front of replicas, give several targets instead
(``--target 16:5005 --target 17:5005``) or a group (``--target-name server --port 5005``: every
running enclave named ``server``, ``server_1``...): new connections go to the replica with the
fewest, a replica that ended is skipped and removed, one (re)started under the name is added
(health from the state directory's records, see ``runtime.targets``). Once listening it prints
one JSON line on stdout with the bound address (useful with port 0). Every user error (a bad or
busy ``--listen``, a bad CID or port, a missing or conflicting flag, an unusable fabric
directory) is one ``error:`` line on stderr and a non-zero exit, never a traceback.

(This module also holds :func:`run_until_signal`, shared with ``enclave vsock-proxy``: ingress
must not import the proxy module and its YAML dependency.)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import trio

from transport.errors import ConfigurationError
from transport.hostport import format_host_port, parse_host_port
from transport.ingress import (
    DEFAULT_LISTEN_HOST,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_SOURCE,
    TargetPool,
    serve_ingress,
)
from transport.paths import ensure_private_dir
from transport.vsock import VsockAddr, is_enclave_cid

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = [
    "register",
    "run",
    "run_until_signal",
    "one_line_errors",
    "parse_count",
    "parse_vsock_number",
    "usable_fabric_dir",
]


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report its own usage errors (a missing argument, an unknown flag) as
    one ``error:`` line on stderr with exit status 2, instead of argparse's usage block."""

    def error(message: str) -> NoReturn:
        print(f"error: {parser.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)

    setattr(parser, "error", error)  # noqa: B010 (an instance override of argparse's method)
    return parser


def usable_fabric_dir(path: Path) -> Path:
    """``--fabric-dir``: created private if missing; a ConfigurationError naming it if it
    cannot be used (so a bad one is one error line at start, not a failure per connection)."""
    try:
        return ensure_private_dir(path)
    except OSError as exc:
        raise ConfigurationError(
            f"--fabric-dir {path}: not a usable directory ({exc.strerror or exc})"
        ) from None


def parse_count(value: str, flag: str) -> int:
    """A positive integer flag value, or a ConfigurationError naming the flag."""
    text = value.strip()
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise ConfigurationError(f"{flag} {value!r}: expected a positive integer")
    return int(text)


def parse_vsock_number(value: str | None, flag: str, *, maximum: int = 0xFFFF_FFFF) -> int:
    """A vsock CID or port flag value (0 … ``maximum``), or a ConfigurationError naming the
    flag (also when it is missing)."""
    if value is None:
        raise ConfigurationError(f"{flag} is required")
    text = value.strip()
    if not text.isascii() or not text.isdigit() or int(text) > maximum:
        raise ConfigurationError(f"{flag} {value!r}: expected a number 0 … {maximum}")
    return int(text)


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "ingress",
        help="forward a host TCP port to an enclave's vsock port (or to replicas)",
        description="Accept TCP connections on --listen and pipe each to vsock (--cid, --port), "
        "or to the least busy healthy replica (--target ..., --target-name).",
    )
    one_line_errors(p)
    p.add_argument(
        "--listen",
        default=f"{DEFAULT_LISTEN_HOST}:0",
        metavar="HOST:PORT",
        help=f"TCP address to listen on (default {DEFAULT_LISTEN_HOST}:0, any free port)",
    )
    p.add_argument("--cid", metavar="CID", help="the enclave's CID (one target)")
    p.add_argument(
        "--port", metavar="PORT", help="the enclave's vsock port (with --cid or --target-name)"
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="CID:PORT",
        help="a replica's vsock address; repeatable (least connections, health, failover)",
    )
    p.add_argument(
        "--target-name",
        metavar="NAME",
        help="every running enclave of this name (NAME, NAME_1...) on --port, followed as "
        "replicas start and end",
    )
    p.add_argument(
        "--max-connections",
        default=str(DEFAULT_MAX_CONNECTIONS),
        metavar="N",
        help=f"connections forwarded at once; more are refused (default {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--max-per-source",
        default=str(DEFAULT_MAX_PER_SOURCE),
        metavar="N",
        help=f"connections forwarded at once from one source IP (default {DEFAULT_MAX_PER_SOURCE})",
    )
    p.add_argument(
        "--fabric-dir",
        type=Path,
        default=None,
        help="emulated fabric directory (default $ENCLAVE_VSOCK_DIR or <state dir>/vsock)",
    )
    p.set_defaults(func=run)


def _parse_target(text: str) -> VsockAddr:
    cid, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigurationError(f"--target {text!r}: expected CID:PORT (e.g. 16:5005)")
    addr = VsockAddr(
        parse_vsock_number(cid, "--target CID"), parse_vsock_number(port, "--target PORT")
    )
    if not is_enclave_cid(addr.cid):
        raise ConfigurationError(f"--target {text!r}: {addr.cid} is not an enclave CID (4 …)")
    return addr


def _targets(args: argparse.Namespace) -> VsockAddr | TargetPool:
    """The one target, or a pool following the state directory (flags checked here)."""
    given = [f for f in ("--cid", "--target", "--target-name") if getattr(args, _dest(f))]
    if len(given) != 1:
        raise ConfigurationError(
            "give one of --cid (with --port), --target CID:PORT (repeatable) or --target-name "
            "(with --port)" + (f", not {' and '.join(given)}" if given else "")
        )
    if args.cid is not None:
        # VsockError (one error line) if out of range
        return VsockAddr(
            parse_vsock_number(args.cid, "--cid"), parse_vsock_number(args.port, "--port")
        )
    from runtime.cli._common import open_state_dir
    from runtime.targets import RuntimeTargets

    if args.target_name is not None:
        port = parse_vsock_number(args.port, "--port")
        source = RuntimeTargets(open_state_dir(), name=args.target_name, port=port)
        return TargetPool(fabric_dir=args.fabric_dir, source=source)
    if args.port is not None:
        raise ConfigurationError("--port goes with --cid or --target-name; --target has its own")
    addrs = list(dict.fromkeys(_parse_target(t) for t in args.target))
    source = RuntimeTargets(open_state_dir(), addrs=addrs, fabric_dir=args.fabric_dir)
    return TargetPool(addrs, fabric_dir=args.fabric_dir, source=source)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def run(args: argparse.Namespace) -> int:
    host, port = parse_host_port(
        args.listen, default_host=DEFAULT_LISTEN_HOST, allow_port_zero=True, what="--listen"
    )
    if args.fabric_dir is not None:
        usable_fabric_dir(args.fabric_dir)
    target = _targets(args)
    max_connections = parse_count(args.max_connections, "--max-connections")
    max_per_source = parse_count(args.max_per_source, "--max-per-source")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                lambda task_status: serve_ingress(
                    host,
                    port,
                    target,
                    fabric_dir=args.fabric_dir,
                    max_connections=max_connections,
                    max_per_source=max_per_source,
                    task_status=task_status,
                )
            )
            listen = format_host_port(host, bound)
            if isinstance(target, VsockAddr):
                described: str | list[str] = str(target)
            elif args.target_name is not None:
                described = f"{args.target_name} (every replica) port {args.port}"
            else:
                described = [str(t) for t in target.targets]
            print(json.dumps({"listen": listen, "target": described}), flush=True)

    return run_until_signal(main)


def run_until_signal(serve: Callable[[], Awaitable[object]]) -> int:
    """``trio.run(serve)`` until it returns or SIGTERM/SIGINT arrives; then cancel it, so
    listeners close and remove their socket files. Returns the exit status (0).

    A lone error out of ``serve`` (say, "address already in use") is re-raised as itself, not
    inside an exception group, so the CLI reports it as one ``error:`` line.
    """

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
