"""``enclave demo``: the whole mission on embedded defaults.

Temporary state, the KMS daemon, the runtime, a sealed copy of the bundled digits model served by
a non-debug enclave, the client streaming the test split through it; then a debug enclave refused
the model key. Implemented by ``runtime.demo`` once the inference stack exists.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.cli import SubParsers



def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("demo", help="run the end-to-end confidential inference demo")
    p.add_argument("--keep", action="store_true",
                   help="leave the stack running and print how to talk to it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("runtime.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "runtime.demo":
            raise
        print("enclave demo: the end-to-end path is not built yet (runtime/demo.py is missing).",
              file=sys.stderr)
        return 1
    result: int = demo.main(keep=args.keep)
    return result
