"""``enclave describe-eif``: nitro-cli's EIF description (PCRs, CRC and signature checks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.eif import read_eif

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run"]


def register(subparsers: SubParsers) -> None:
    """Add ``describe-eif``."""
    p = subparsers.add_parser(
        "describe-eif",
        help="describe an enclave image: measurements, CRC and signature checks, metadata",
        allow_abbrev=False,
    )
    p.add_argument("--eif-path", metavar="PATH", required=True, help="the EIF to describe")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the describe-eif JSON (the CRC is reported as ``CheckCRC``, not enforced)."""
    eif = read_eif(Path(args.eif_path), verify_crc=False)
    print(json.dumps(eif.describe(), indent=2, ensure_ascii=False))
    return 0
