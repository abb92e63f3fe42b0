"""``enclave bench [SUITE...] [--json] [--quick]``: the performance suites.

Each suite is a module of :mod:`runtime.bench` (kept out of the product packages) and exposes
``run(*, quick: bool) -> dict[str, float | int | str | None]``. A suite measures its anchors
(raw ``cryptography``, a plain trio round trip, in-process ``session.run``...) in the same run and
reports ratios against them, so the figures mean the same on any machine
(``../shared/reference/perf-baseline.md``). Budgets are checked here and shown, never asserted in
tests.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run", "SUITES", "BenchResult"]


#: suite name -> module that implements it.
SUITES: dict[str, str] = {
    "channel": "runtime.bench.channel",
    "attest": "runtime.bench.attest",
    "kms": "runtime.bench.kms",
    "runtime": "runtime.bench.start",
    "inference": "runtime.bench.inference",
    "fleet": "runtime.bench.fleet",
    "minilm": "runtime.bench.minilm",
    "training": "runtime.bench.training",
}

BenchResult = dict[str, float | int | str | None]


def register(subparsers: SubParsers) -> None:
    """Add ``enclave bench [SUITE...] [--json] [--quick]``."""
    p = subparsers.add_parser("bench", help="run the performance suites (ratios against anchors)")
    p.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run (default: all): {', '.join(SUITES)}",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    p.set_defaults(func=run)


def _load(suite: str) -> Callable[..., BenchResult] | None:
    try:
        module = importlib.import_module(SUITES[suite])
    except ModuleNotFoundError as exc:
        if exc.name == SUITES[suite]:
            return None
        raise
    return cast("Callable[..., BenchResult]", module.run)


def _fmt(value: float | int | str | None) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def run(args: argparse.Namespace) -> int:
    """Run the chosen suites and print their figures; returns the exit status."""
    suites = list(args.suites) or list(SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        print(
            f"error: bench: unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}",
            file=sys.stderr,
        )
        return 2
    results: dict[str, BenchResult] = {}
    missing: list[str] = []
    for suite in suites:
        fn = _load(suite)
        if fn is None:
            missing.append(suite)
            continue
        print(f"running bench suite {suite!r}...", file=sys.stderr)
        results[suite] = fn(quick=args.quick)
    if missing:
        print(f"not built yet: {', '.join(missing)}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for suite, figures in results.items():
            print(f"\n[{suite}]")
            width = max((len(k) for k in figures), default=0)
            for key, value in figures.items():
                print(f"  {key:<{width}}  {_fmt(value)}")
    return 0 if results or not suites else 1
