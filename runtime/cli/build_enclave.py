"""``enclave build-enclave``: build a measured EIF from an application directory.

nitro-cli builds from a Docker image (``--docker-uri``); we build from ``--app-dir`` plus
``--cmd``/``--env`` and refuse the Docker flags. Output as nitro-cli: progress on stderr, the
``{"Measurements": ...}`` JSON on stdout (2-space indent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.eif import (
    MAX_INPUT_FILE_SIZE,
    EifArgumentError,
    EifMetadataError,
    build_eif,
    read_regular_file,
)
from runtime.errors import MissingArgumentError, UsageError

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run", "MAX_INPUT_FILE_SIZE"]


def register(subparsers: SubParsers) -> None:
    """Add ``build-enclave``."""
    p = subparsers.add_parser(
        "build-enclave",
        help="build a measured enclave image (EIF) from an app directory",
        description="Build an EIF v4 image: the project's enclave-side code (bootstrap ramdisk) "
        "and APP_DIR with COMMAND and its environment (app ramdisk). Prints its PCRs as JSON.",
        allow_abbrev=False,
    )
    p.add_argument("--app-dir", metavar="DIR", help="application directory (required)")
    p.add_argument(
        "--cmd", metavar="COMMAND", help="command to run, split with shell rules (required)"
    )
    p.add_argument(
        "--env", metavar="K=V", action="append", default=[], help="environment entry (repeat)"
    )
    p.add_argument("--output-file", metavar="PATH", required=True, help="where to write the EIF")
    p.add_argument("--name", metavar="IMG_NAME", help="image name (default: app dir name)")
    p.add_argument("--version", metavar="IMG_VERSION", help="image version (default: content id)")
    p.add_argument("--metadata", metavar="JSON_FILE", help="custom metadata JSON file")
    p.add_argument("--signing-certificate", metavar="PEM", help="signing certificate (PCR8)")
    p.add_argument("--private-key", metavar="PEM", help="EC private key of the certificate")
    p.add_argument("--docker-uri", metavar="URI", help=argparse.SUPPRESS)
    p.add_argument("--docker-dir", metavar="DIR", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _parse_env(entries: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in entries:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EifArgumentError(f"--env expects KEY=VALUE, got {item!r}", info=("env", item))
        env[key] = value
    return env


def _load_metadata(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    raw = read_regular_file(Path(path), limit=MAX_INPUT_FILE_SIZE, what="metadata file")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise EifMetadataError(f"the metadata file {path} is not valid JSON") from None
    if not isinstance(value, dict):
        raise EifMetadataError(f"the metadata file {path} must hold a JSON object")
    return value


def run(args: argparse.Namespace) -> int:
    """Build the image and print its measurements."""
    if args.docker_uri is not None or args.docker_dir is not None:
        raise EifArgumentError(
            "--docker-uri/--docker-dir are not supported: enclave-runtime builds images from an "
            "application directory; use --app-dir DIR --cmd COMMAND [--env K=V]..."
        )
    if args.app_dir is None or args.cmd is None:
        raise UsageError("the following arguments are required: --app-dir, --cmd")
    # nitro-cli: a certificate without its key (or the reverse) is E01 MissingArgument
    if args.signing_certificate is not None and args.private_key is None:
        raise MissingArgumentError("`private-key` argument not found", info=("private-key",))
    if args.private_key is not None and args.signing_certificate is None:
        raise MissingArgumentError(
            "`signing-certificate` argument not found", info=("signing-certificate",)
        )
    env = _parse_env(args.env)
    metadata = _load_metadata(args.metadata)
    print("Start building the Enclave Image...", file=sys.stderr)
    info = build_eif(
        app_dir=Path(args.app_dir),
        cmd=args.cmd,
        env=env,
        output=Path(args.output_file),
        name=args.name,
        version=args.version,
        metadata=metadata,
        signing_certificate=None
        if args.signing_certificate is None
        else Path(args.signing_certificate),
        private_key=None if args.private_key is None else Path(args.private_key),
    )
    print("Enclave Image successfully created.", file=sys.stderr)
    print(json.dumps(info.build_output(), indent=2, ensure_ascii=False))
    return 0
