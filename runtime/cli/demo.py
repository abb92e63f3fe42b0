"""``enclave demo``: the whole mission on embedded defaults (run by ``./scripts/demo``).

Temporary state, the KMS daemon, the runtime, a sealed copy of the bundled digits model served by
a non-debug enclave, the client streaming the test split through it; then a debug enclave refused
the model key. See :mod:`runtime.demo` for the steps. Exits non-zero if any step fails; SIGINT
(Ctrl-C) and SIGTERM stop everything it started and remove its state directory (exit 130/143).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run", "MAX_DEMO_REPLICAS"]

#: Most replicas the demo runs (each is a 512 MiB enclave; the pool is sized for them).
MAX_DEMO_REPLICAS = 8


def register(subparsers: SubParsers) -> None:
    """Add ``enclave demo [--keep] [--replicas N]``."""
    p = subparsers.add_parser("demo", help="run the end-to-end confidential inference demo")
    p.add_argument(
        "--keep", action="store_true", help="leave the stack running and print how to talk to it"
    )
    p.add_argument(
        "--replicas",
        default="1",
        metavar="N",
        help="run the inference server as N replicas of one image behind one ingress (1..8)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo (see :func:`runtime.demo.main`); returns the exit status."""
    from runtime.demo import main
    from transport.errors import ConfigurationError

    text = str(args.replicas).strip()
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_DEMO_REPLICAS:
        raise ConfigurationError(
            f"demo: --replicas {args.replicas!r}: expected an integer in 1..{MAX_DEMO_REPLICAS}"
        )
    return main(keep=args.keep, debug=bool(getattr(args, "debug", False)), replicas=int(text))
