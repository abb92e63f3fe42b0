"""``enclave pcr``: the PCR value of a file (``--input``) or of a signing certificate (PCR8).

Both are ``SHA384(0^48 || SHA384(bytes))`` where bytes is the file's content or the
certificate's DER (``reference/nitro.md`` §1.3, §2.6).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from attest.pcrs import PCR_SIZE, pcr_extend
from runtime.eif import (
    MAX_INPUT_FILE_SIZE,
    EifFileError,
    EifSigningError,
    pcr8_from_certificate,
    read_regular_file,
)
from runtime.errors import HasherError

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run", "PCR_SIZE", "MAX_INPUT_FILE_SIZE"]


def register(subparsers: SubParsers) -> None:
    """Add ``pcr``."""
    p = subparsers.add_parser(
        "pcr",
        help="compute the PCR of a file, or PCR8 of a signing certificate",
        allow_abbrev=False,
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--input", metavar="FILE", help="file whose PCR to compute")
    group.add_argument("--signing-certificate", metavar="PEM", help="certificate for PCR8")
    p.set_defaults(func=run)


def _file_pcr(path: str) -> bytes:
    """PCR of a file of any size, hashed in chunks (the file is never loaded whole)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise EifFileError(
            f"cannot read {path}: {exc.strerror or exc}", info=(path, "Open")
        ) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen: a directory opens fine
        os.close(fd)
        raise EifFileError(f"{path} is not a regular file", info=(path, "Open"))
    with os.fdopen(fd, "rb") as f:
        try:
            digest = hashlib.file_digest(f, "sha384").digest()
        except OSError as exc:
            raise EifFileError(f"cannot read {path}: {exc}", info=(path, "Read")) from exc
    return pcr_extend(bytes(PCR_SIZE), digest)


def run(args: argparse.Namespace) -> int:
    """Print ``{"PCR": hex}`` or ``{"PCR8": hex}``."""
    if args.input is not None:
        out = {"PCR": _file_pcr(args.input).hex()}
    else:
        pem = read_regular_file(
            Path(args.signing_certificate), limit=MAX_INPUT_FILE_SIZE, what="certificate"
        )
        try:
            out = {"PCR8": pcr8_from_certificate(pem).hex()}
        except EifSigningError as exc:
            # nitro-cli reports an unusable certificate while hashing (HasherError)
            raise HasherError(exc.message) from None
    print(json.dumps(out, indent=2))
    return 0
