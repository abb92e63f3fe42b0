"""``enclave model seal|inspect``: sealed models (envelope-encrypted ONNX files and text model
bundles).

``seal`` checks the model loads (an ONNX graph, or a text bundle: graph + ``tokenizer.json`` +
config, sealed and digested as one unit), asks KMS for a data key (GenerateDataKey under
``--key-id``, encryption context naming the model) and writes the sealed file; ``inspect``
describes a sealed file (its header as JSON, without any key) or a plaintext bundle (its
config and members). Credentials: ``ENCLAVE_KMS_ACCESS_KEY_ID`` /
``ENCLAVE_KMS_SECRET_ACCESS_KEY``, else ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
(``AWS_SESSION_TOKEN``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import structlog
import trio

from transport.errors import ConfigurationError, EnclaveError, TransportError

if TYPE_CHECKING:
    from kms.client import Credentials
    from runtime.cli import SubParsers

__all__ = [
    "register",
    "run_seal",
    "run_store",
    "run_inspect",
    "credentials_from_env",
    "kms_endpoint",
    "KMS_TIMEOUT_S",
]

log = structlog.get_logger()

#: Bound on the KMS call of ``seal`` (GenerateDataKey), seconds.
KMS_TIMEOUT_S: Final = 30.0


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "model", help="seal or inspect sealed ONNX models", allow_abbrev=False
    )
    sub = p.add_subparsers(dest="model_command", metavar="COMMAND")
    sub.required = True
    seal = sub.add_parser(
        "seal", help="envelope-encrypt an ONNX model under a KMS key", allow_abbrev=False
    )
    seal.add_argument("model", type=Path, metavar="MODEL.onnx|MODEL.bundle")
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
    inspect = sub.add_parser(
        "inspect",
        help="describe a sealed model (its header, no key) or a text model bundle, as JSON",
        allow_abbrev=False,
    )
    inspect.add_argument("sealed", type=Path, metavar="FILE.sealed|FILE.bundle")
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


def kms_endpoint(value: str, *, what: str = "--kms-endpoint") -> str:
    """Check an ``http://HOST:PORT`` KMS endpoint; returns it normalised.

    Raises:
        ConfigurationError: not an http URL with a valid ``HOST:PORT`` authority.
    """
    from transport.hostport import format_host_port, parse_host_port

    parts = urlsplit(value.strip())
    if "://" not in value:
        hint = f" (did you mean http://{value.strip()}?)" if value.strip() else ""
        raise ConfigurationError(f"{what} {value!r}: expected http://HOST:PORT{hint}")
    if parts.scheme != "http":
        raise ConfigurationError(
            f"{what} {value!r}: only http:// is supported (the local KMS speaks plain HTTP)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigurationError(f"{what} {value!r}: expected http://HOST:PORT, nothing after")
    host, port = parse_host_port(parts.netloc, what=what)
    return f"http://{format_host_port(host, port)}"


def run_seal(args: argparse.Namespace) -> int:
    from kms.client import KmsClient
    from kms.errors import KmsApiError, KmsError
    from models.errors import ModelLoadError
    from models.sealing import seal_model_file

    context: dict[str, str] = {}
    for item in args.context:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigurationError(f"--context wants KEY=VALUE, got {item!r}")
        context[k] = v
    endpoint = kms_endpoint(args.kms_endpoint)
    if not args.model.is_file():
        raise ConfigurationError(f"no such model file: {args.model}")
    if not args.out.parent.is_dir():
        raise ConfigurationError(f"--out {args.out}: no such directory {args.out.parent}")
    region = (
        args.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    )
    creds = credentials_from_env()

    async def main() -> dict[str, object]:
        async with KmsClient(endpoint=endpoint, credentials=creds, region=region) as kms:
            with trio.move_on_after(KMS_TIMEOUT_S):
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
        raise TransportError(f"the KMS at {endpoint} did not answer within {KMS_TIMEOUT_S:g} s")

    try:
        view = trio.run(main)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{args.model}: {_one_line(exc)[:300]}") from exc
    except KmsApiError as exc:
        raise KmsError(
            f"KMS at {endpoint} refused a data key under {args.key_id!r}: {exc}"
        ) from exc
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("seal_failed", exc_info=exc)
        reason = "connection refused" if _refused(exc) else _one_line(exc)
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError) and exc.filename:
            raise ConfigurationError(f"cannot write {args.out}: {_one_line(exc)}") from exc
        raise TransportError(f"KMS unreachable at {endpoint}: {reason}") from exc
    except Exception as exc:
        if isinstance(exc, EnclaveError):
            raise
        log.debug("seal_failed", exc_info=exc)  # h11 and other peer faults: one line
        raise TransportError(f"the KMS at {endpoint} failed: {_one_line(exc)}") from exc
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
        _check_sealed(path)
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


def _check_sealed(path: Path) -> None:
    """Refuse, before serving, a file that is not a sealed model (its header is read and
    checked; the enclave would otherwise find out only when it fetches the file)."""
    from models.errors import SealedFormatError
    from models.sealed import read_header

    try:
        with path.open("rb") as f:
            read_header(f)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except SealedFormatError as exc:
        raise ConfigurationError(f"{path} is not a sealed model: {exc}") from exc


def _refused(exc: BaseException) -> bool:
    seen: list[BaseException] = [exc]
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        seen.extend(cause.exceptions)
    elif cause is not None:
        seen.append(cause)
    return any(isinstance(e, ConnectionRefusedError) for e in seen)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def run_inspect(args: argparse.Namespace) -> int:
    from models.errors import SealedFormatError
    from models.sealing import CONTENT_CONTEXT_KEY, TEXT_BUNDLE, inspect_sealed, is_bundle

    try:
        if is_bundle(args.sealed):
            view = _inspect_bundle(args.sealed)
        else:
            header = inspect_sealed(args.sealed)
            view = header.to_json()
            context = header.encryption_context
            view["content"] = (
                "text model bundle (graph + tokenizer + config)"
                if context.get(CONTENT_CONTEXT_KEY) == TEXT_BUNDLE
                else "ONNX model"
            )
        view["file_size"] = args.sealed.stat().st_size
    except OSError as exc:
        raise ConfigurationError(f"cannot read {args.sealed}: {exc.strerror or exc}") from exc
    except SealedFormatError as exc:
        raise SealedFormatError(f"{args.sealed} is not a sealed model: {exc}") from exc
    print(json.dumps(view, indent=2))
    return 0


def _inspect_bundle(path: Path) -> dict[str, object]:
    """A plaintext bundle's config and members (sizes, SHA-384s) and its own SHA-384 (what a
    sealed copy's header and PCR16 carry)."""
    import hashlib

    from models.text.bundle import read_bundle
    from models.text.errors import BundleFormatError

    try:
        bundle = read_bundle(path)
    except BundleFormatError as exc:
        raise BundleFormatError(f"{path} is not a valid model bundle: {exc}") from exc
    digest = hashlib.sha384()
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return {
        "content": "text model bundle (graph + tokenizer + config), not sealed",
        "config": bundle.config.to_map(),
        "members": {
            "tokenizer.json": {
                "size": len(bundle.tokenizer_json),
                "sha384": bundle.tokenizer_sha384.hex(),
            },
            "model.onnx": {"size": len(bundle.onnx), "sha384": bundle.onnx_sha384.hex()},
        },
        "sha384": digest.hexdigest(),
    }
