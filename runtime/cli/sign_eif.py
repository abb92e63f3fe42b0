"""``enclave sign-eif``: add or replace the signature section of an existing EIF."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.eif import sign_eif
from runtime.errors import MissingArgumentError

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run"]


def register(subparsers: SubParsers) -> None:
    """Add ``sign-eif``."""
    p = subparsers.add_parser(
        "sign-eif", help="sign an enclave image (adds PCR8)", allow_abbrev=False
    )
    # Not argparse-required: a missing one is nitro-cli's E01 (MissingArgument), not exit 2.
    p.add_argument("--eif-path", metavar="PATH", help="the EIF to sign in place (required)")
    p.add_argument("--signing-certificate", metavar="PEM", help="certificate (required)")
    p.add_argument("--private-key", metavar="PEM", help="EC private key (required)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Sign and print the new measurements."""
    for flag in ("eif_path", "signing_certificate", "private_key"):
        if getattr(args, flag) is None:
            name = flag.replace("_", "-")
            raise MissingArgumentError(f"`{name}` argument not found", info=(name,))
    info = sign_eif(
        Path(args.eif_path),
        signing_certificate=Path(args.signing_certificate),
        private_key=Path(args.private_key),
    )
    print("Enclave Image successfully signed.", file=sys.stderr)
    print(json.dumps(info.build_output(), indent=2, ensure_ascii=False))
    return 0
