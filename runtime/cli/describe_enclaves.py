"""``enclave describe-enclaves [--metadata]``: the running enclaves as nitro-cli prints them.

The default output is byte-compatible with nitro-cli (a JSON array, ``[]`` when none). With
``--metadata`` each object also gets ``ImageName``, ``ImageVersion``, ``Metadata`` and, as the
last key, our ``Isolation`` report (which sandbox layers are in force, or missing and why).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from runtime.cli._common import open_state_dir, print_json
from runtime.records import EnclaveState

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run"]


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "describe-enclaves", help="list running enclaves (nitro-cli)", allow_abbrev=False
    )
    p.add_argument(
        "--metadata",
        action="store_true",
        help="add ImageName/ImageVersion/Metadata, the Isolation report and the AppStatus",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    state = open_state_dir()
    infos = [
        r for r in state.records() if r.state in (EnclaveState.RUNNING, EnclaveState.TERMINATING)
    ]
    print_json([i.describe_json(metadata=args.metadata) for i in infos])
    return 0
