"""``enclave sign-eif``: add or replace the signature section of an existing EIF."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.eif import sign_eif

if TYPE_CHECKING:
    from runtime.cli import SubParsers


def register(subparsers: SubParsers) -> None:
    """Add ``sign-eif``."""
    p = subparsers.add_parser("sign-eif", help="sign an enclave image (adds PCR8)")
    p.add_argument("--eif-path", metavar="PATH", required=True, help="the EIF to sign in place")
    p.add_argument("--signing-certificate", metavar="PEM", required=True, help="certificate")
    p.add_argument("--private-key", metavar="PEM", required=True, help="EC private key")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Sign and print the new measurements."""
    info = sign_eif(
        Path(args.eif_path),
        signing_certificate=Path(args.signing_certificate),
        private_key=Path(args.private_key),
    )
    print("Enclave Image successfully signed.", file=sys.stderr)
    print(json.dumps(info.build_output(), indent=2, ensure_ascii=False))
    return 0
