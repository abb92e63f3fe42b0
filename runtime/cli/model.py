"""``enclave model seal|inspect``: sealed models (envelope-encrypted ONNX files).

``seal`` checks the ONNX file loads, asks KMS for a data key (GenerateDataKey under ``--key-id``,
encryption context naming the model) and writes the sealed file; ``inspect`` prints a sealed
file's header as JSON without any key. Credentials: ``ENCLAVE_KMS_ACCESS_KEY_ID`` /
``ENCLAVE_KMS_SECRET_ACCESS_KEY``, else ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
(``AWS_SESSION_TOKEN``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from transport.errors import ConfigurationError

if TYPE_CHECKING:
    from kms.client import Credentials
    from runtime.cli import SubParsers


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("model", help="seal or inspect sealed ONNX models")
    sub = p.add_subparsers(dest="model_command", metavar="COMMAND")
    sub.required = True
    seal = sub.add_parser("seal", help="envelope-encrypt an ONNX model under a KMS key")
    seal.add_argument("model", type=Path, metavar="MODEL.onnx")
    seal.add_argument("--key-id", required=True, help="KMS key id, ARN or alias/NAME")
    seal.add_argument("--kms-endpoint", required=True, help="http://HOST:PORT of the KMS")
    seal.add_argument("--name", help="model name (default: the file's stem)")
    seal.add_argument("--out", type=Path, required=True, metavar="FILE.sealed")
    seal.add_argument(
        "--region", default=None, help="SigV4 region (default AWS_REGION or us-east-1)"
    )
    seal.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra encryption context entries (repeatable)",
    )
    seal.set_defaults(func=run_seal)
    inspect = sub.add_parser("inspect", help="print a sealed model's header as JSON (no key)")
    inspect.add_argument("sealed", type=Path, metavar="FILE.sealed")
    inspect.set_defaults(func=run_inspect)
    store = sub.add_parser(
        "store",
        help="serve sealed models and KMS credentials to server enclaves (host side, vsock)",
        description="The host-side model store of models.store on vsock (3, --port): serves "
        "sealed files by name and the KMS credentials from the environment (as kmstool-instance "
        "does), and logs each server's start-up report. Runs until SIGTERM/SIGINT.",
    )
    store.add_argument(
        "--model",
        action="append",
        default=[],
        required=True,
        metavar="NAME=FILE.sealed",
        help="a model the store serves (repeatable)",
    )
    store.add_argument("--port", type=int, default=7000, help="vsock port on the parent (7000)")
    store.add_argument("--region", default=None, help="KMS region handed to the enclave")
    store.set_defaults(func=run_store)


def credentials_from_env() -> Credentials:
    """KMS credentials from ENCLAVE_KMS_* or AWS_* environment variables."""
    from kms.client import Credentials

    env = os.environ
    key = env.get("ENCLAVE_KMS_ACCESS_KEY_ID")
    secret = env.get("ENCLAVE_KMS_SECRET_ACCESS_KEY")
    token = None
    if not (key and secret):
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        token = env.get("AWS_SESSION_TOKEN")
    if not (key and secret):
        raise ConfigurationError(
            "no KMS credentials: set ENCLAVE_KMS_ACCESS_KEY_ID and ENCLAVE_KMS_SECRET_ACCESS_KEY "
            "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    return Credentials(key, secret, token)


def run_seal(args: argparse.Namespace) -> int:
    from kms.client import KmsClient
    from models.sealing import seal_model_file

    context: dict[str, str] = {}
    for item in args.context:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigurationError(f"--context wants KEY=VALUE, got {item!r}")
        context[k] = v
    if not args.model.is_file():
        raise ConfigurationError(f"no such model file: {args.model}")
    region = (
        args.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    )
    creds = credentials_from_env()

    async def main() -> dict[str, object]:
        async with KmsClient(endpoint=args.kms_endpoint, credentials=creds, region=region) as kms:
            result = await seal_model_file(
                args.model,
                args.out,
                kms=kms,
                key_id=args.key_id,
                name=args.name,
                encryption_context=context,
            )
        view = result.header.to_json()
        view["path"] = str(result.path)
        return view

    view = trio.run(main)
    print(f"sealed {args.model} -> {args.out}", file=sys.stderr)
    print(json.dumps(view, indent=2))
    return 0


def run_store(args: argparse.Namespace) -> int:
    from models.store import HostCredentials, ModelStore, serve_model_store
    from runtime.cli.vsock_proxy import run_until_signal

    models: dict[str, Path] = {}
    for item in args.model:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise ConfigurationError(f"--model wants NAME=FILE.sealed, got {item!r}")
        path = Path(file)
        if not path.is_file():
            raise ConfigurationError(f"no such sealed model: {path}")
        models[name] = path.resolve()
    creds = credentials_from_env()
    region = (
        args.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    )
    store = ModelStore(
        models,
        credentials=HostCredentials(
            creds.access_key_id, creds.secret_access_key, creds.session_token, region
        ),
        on_ready=lambda report: print(json.dumps(report), flush=True),
    )

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_model_store, store, args.port)
            print(json.dumps({"listen": f"vsock:3:{args.port}", "models": sorted(models)}),
                  flush=True)  # fmt: skip

    return run_until_signal(serve)


def run_inspect(args: argparse.Namespace) -> int:
    from models.sealing import inspect_sealed

    try:
        header = inspect_sealed(args.sealed)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {args.sealed}: {exc}") from exc
    view = header.to_json()
    view["file_size"] = args.sealed.stat().st_size
    print(json.dumps(view, indent=2))
    return 0
