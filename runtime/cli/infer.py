"""``enclave infer``: run inference on a confidential server through its attested channel.

Connects to ``--endpoint`` (the host ingress), verifies the enclave's attestation document
against ``--root`` and ``--policy`` before sending anything, then sends the inputs. Prints what
it verified (module id, PCR0, PCR16 and the model digest it binds) and the results as JSON on
stdout; ``--output`` also saves them.

Tensor models: ``--input`` is an ``.npz`` whose array names are the model's input names
(``enclave infer`` lists them when they do not match), or, for a model with a single input, an
``.npy`` array or an ``.npz`` holding one array (or an array named ``x``). Each array's dtype and
shape must match the model's signature as the catalog reports it; the first dimension is the
batch (rows). ``--output FILE.npz`` saves the output tensors.

Text models (the catalog says ``text-embedding``): ``--text "..."`` (repeatable) or ``--input
FILE`` with one UTF-8 text per line (any file that is not ``.npy``/``.npz``). The answer is one
float32 embedding per text, in order: printed summarised (the first rows, rounded), or whole
with ``--json`` (``{"embeddings": [[...], ...], "truncated": [...], ...}``); ``--output
FILE.npy`` saves them as one float32 [texts, dim] array. A text longer than the model's token
cap is embedded from its first tokens; the answer says which were (``truncated``).

Errors are one line on stderr, naming what failed: ``enclave unreachable`` (nothing answered at
the endpoint, or the ingress could not reach the enclave) is told apart from ``attestation
failed`` (the enclave did not prove what the policy requires). Every wait is bounded by
``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import structlog
import trio

from transport.errors import (
    AuthenticationFailed,
    ConfigurationError,
    EnclaveError,
    PeerUnreachable,
    TransportError,
)

if TYPE_CHECKING:
    from models.client import InferenceClient, ModelInfo
    from runtime.cli import SubParsers

__all__ = [
    "register",
    "run",
    "read_texts",
    "check_texts_given",
    "read_arrays",
    "model_inputs",
    "DEFAULT_TIMEOUT_S",
    "TENSOR_SUFFIXES",
    "MAX_TEXT_FILE_BYTES",
]

log = structlog.get_logger()

#: Rows printed per output before eliding (the rest goes to --output).
_PRINT_ROWS: Final = 10
#: Leading dimensions of each embedding in the default summary (--json or --output: all).
_PRINT_DIMS: Final = 8
#: Default bound on each wait (connect + handshake, then each call), seconds.
DEFAULT_TIMEOUT_S: Final = 30.0


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "infer",
        help="attested inference against an enclave server",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        allow_abbrev=False,
    )
    p.add_argument("--endpoint", required=True, metavar="HOST:PORT", help="the host ingress")
    p.add_argument(
        "--root",
        required=True,
        action="append",
        metavar="PEM",
        help="trust root: a PEM file, 'local' (this state dir's CA) or 'aws' (repeatable)",
    )
    p.add_argument("--policy", required=True, type=Path, metavar="FILE", help="PCR policy file")
    p.add_argument("--model", required=True, help="the model's name in the server's catalog")
    p.add_argument(
        "--input",
        type=Path,
        metavar="FILE",
        help="tensors: an .npz named after the model's inputs, or one .npy array; "
        "text models: a file of UTF-8 texts, one per line",
    )
    p.add_argument(
        "--text",
        action="append",
        metavar="TEXT",
        help="a text to embed (text models; repeatable, in order)",
    )
    p.add_argument("--stream", action="store_true", help="stream the rows (texts) in chunks")
    p.add_argument(
        "--chunk", type=int, default=32, help="rows (texts) per stream message (--stream)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="text models: print every embedding in full (default: a summary)",
    )
    p.add_argument(
        "--output",
        type=Path,
        metavar="FILE.npz|FILE.npy",
        help="save the outputs (.npz of the output tensors; .npy of the embeddings)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"bound on connecting and on each answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.set_defaults(func=run)


#: Extensions of tensor input files; any other ``--input`` is a text file.
TENSOR_SUFFIXES: Final = (".npy", ".npz")
#: Largest text file read for ``--input`` (the server's own cap is smaller: 1 MiB a request by
#: default; a bigger file is refused before reading, with --stream it may be sent in chunks).
MAX_TEXT_FILE_BYTES: Final = 64 << 20


def read_texts(path: Path) -> list[str]:
    """The texts of a text file, one per line (UTF-8; a final newline is optional).

    Raises:
        ConfigurationError: missing, unreadable, too large or not UTF-8, a blank line, or no
            text at all.
    """
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_TEXT_FILE_BYTES:
                raise ConfigurationError(
                    f"--input {path} is {size} bytes; at most {MAX_TEXT_FILE_BYTES} are read"
                )
            raw = f.read(MAX_TEXT_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read --input {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[: exc.start].count(b"\n") + 1
        raise ConfigurationError(f"--input {path}: line {bad} is not valid UTF-8") from None
    lines = text.splitlines()
    if not lines:
        raise ConfigurationError(f"--input {path} holds no text (one text per line)")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ConfigurationError(
                f"--input {path}: line {number} is blank (one text per line, none empty)"
            )
    return lines


def check_texts_given(texts: list[str]) -> list[str]:
    """``--text`` values, checked: a value the shell passed in another encoding than UTF-8
    arrives with lone surrogates (Python's surrogateescape) and has no UTF-8 form.

    Raises:
        ConfigurationError: an empty or non-UTF-8 ``--text``.
    """
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise ConfigurationError(f"--text number {number} is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigurationError(f"--text number {number} is not valid UTF-8") from None
    return texts


def read_arrays(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """The arrays of an ``.npz`` by name, or of an ``.npy`` under the name ``""``.

    Raises:
        ConfigurationError: missing, unreadable or malformed file (pickled objects included).
    """
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                return {k: data[k] for k in data.files}
        return {"": np.asarray(data)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ConfigurationError(f"cannot read --input {path}: {_one_line(exc)}") from exc


def model_inputs(
    arrays: dict[str, np.ndarray[Any, Any]], info: ModelInfo, *, source: Path
) -> dict[str, np.ndarray[Any, Any]]:
    """Map the arrays of ``source`` to the model's inputs (see the module docstring).

    Raises:
        ConfigurationError: the names do not match the model's inputs.
    """
    names = [s.name for s in info.inputs]
    if set(names) <= set(arrays):
        return {k: arrays[k] for k in names}
    if len(names) == 1 and ("x" in arrays or len(arrays) == 1):
        return {names[0]: arrays.get("x", next(iter(arrays.values())))}
    held = sorted(arrays) if "" not in arrays else "one unnamed array"
    raise ConfigurationError(
        f"--input {source} holds {held}; model {info.name!r} takes {names}: give an .npz with "
        "those names"
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _summary(arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"dtype": arr.dtype.name, "shape": list(arr.shape)}
    rows = arr[:_PRINT_ROWS] if arr.ndim else arr
    out["values"] = np.round(rows, 6).tolist() if arr.dtype.kind == "f" else rows.tolist()
    if arr.ndim and arr.shape[0] > _PRINT_ROWS:
        out["elided_rows"] = int(arr.shape[0] - _PRINT_ROWS)
    return out


def _embedding_summary(vectors: np.ndarray[Any, Any]) -> dict[str, Any]:
    """The default view of embeddings: shape, and the first dimensions of the first rows (a
    384-wide row printed whole is 384 lines of JSON)."""
    out = _summary(vectors[:, :_PRINT_DIMS])
    out["shape"] = list(vectors.shape)
    if vectors.shape[1] > _PRINT_DIMS:
        out["elided_dims"] = int(vectors.shape[1] - _PRINT_DIMS)
    return out


async def _infer(
    client: InferenceClient,
    args: argparse.Namespace,
    arrays: dict[str, np.ndarray[Any, Any]] | list[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    catalog = await client.list_models()
    info = next((m for m in catalog if m.name == args.model), None)
    if info is None:
        served = ", ".join(repr(m.name) for m in catalog) or "none"
        raise ConfigurationError(f"the server has no model {args.model!r} (it has {served})")
    if not info.available:
        raise ConfigurationError(f"model {args.model!r} is unavailable: {info.reason}")
    if isinstance(arrays, list) != info.is_text:
        if info.is_text:
            raise ConfigurationError(
                f"model {args.model!r} takes text: give --text TEXT or --input FILE (one text "
                "per line), not arrays"
            )
        raise ConfigurationError(
            f"model {args.model!r} takes tensors, not text: give --input FILE.npz (or .npy)"
        )
    if isinstance(arrays, list):
        return await _embed(client, args, arrays, info, catalog)
    inputs = model_inputs(arrays, info, source=args.input)
    if args.stream:
        n = next(iter(inputs.values())).shape[0] if inputs else 0
        chunks = (
            {k: v[i : i + args.chunk] for k, v in inputs.items()} for i in range(0, n, args.chunk)
        )
        parts = [out async for out in client.stream(args.model, chunks)]
        outputs = {
            k: np.concatenate([p[k] for p in parts], axis=0) for k in (parts[0] if parts else {})
        }
    else:
        outputs = await client.infer(args.model, inputs)
    result = {
        "attestation": _attestation(client, info, catalog),
        "model": args.model,
        "outputs": {k: _summary(v) for k, v in outputs.items()},
    }
    return result, outputs


def _attestation(
    client: InferenceClient, info: ModelInfo, catalog: list[ModelInfo]
) -> dict[str, Any]:
    """What was verified: module id, PCR0, PCR16, and whether PCR16 binds the served models."""
    from models.server import expected_pcr16

    peer = client.attestation
    served_digests = [bytes.fromhex(m.digest) for m in catalog if m.available and m.digest]
    pcr16 = peer.pcrs.get(16, b"")
    return {
        "module_id": peer.module_id,
        "pcr0": peer.pcrs[0].hex(),
        "pcr16": pcr16.hex(),
        "model_digest": info.digest,
        "pcr16_matches_catalog": expected_pcr16(served_digests) == pcr16,
    }


async def _embed(
    client: InferenceClient,
    args: argparse.Namespace,
    texts: list[str],
    info: ModelInfo,
    catalog: list[ModelInfo],
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """A text model's answer: the embeddings (summarised, or whole with --json)."""
    if args.stream:
        chunks = [texts[i : i + args.chunk] for i in range(0, len(texts), args.chunk)]
        parts = [e async for e in client.embed_stream(args.model, chunks)]
        vectors = np.concatenate([p.vectors for p in parts], axis=0)
        truncated = [t for p in parts for t in p.truncated]
    else:
        answer = await client.embed(args.model, texts)
        vectors, truncated = answer.vectors, list(answer.truncated)
    for index, cut in enumerate(truncated):
        if cut:
            cap = (info.text or {}).get("max_seq_length", "its")
            print(f"note: text {index} was longer than the model's {cap} tokens: "
                  "embedded from its first tokens", file=sys.stderr)  # fmt: skip
    result: dict[str, Any] = {
        "attestation": _attestation(client, info, catalog),
        "model": args.model,
        "embeddings": vectors.tolist() if args.json else _embedding_summary(vectors),
        "truncated": truncated,
    }
    return result, {"embeddings": vectors}


def run(args: argparse.Namespace) -> int:
    from attest.policy import Policy
    from attest.roots import load_roots
    from models.client import make_verifier, open_inference_client
    from transport.hostport import parse_host_port
    from transport.paths import default_state_dir

    if args.chunk < 1:
        raise ConfigurationError(f"--chunk must be a positive number of rows, got {args.chunk}")
    if not 0 < args.timeout <= 3600:
        raise ConfigurationError(f"--timeout must be in (0, 3600] seconds, got {args.timeout:g}")
    if (args.input is None) == (args.text is None):
        raise ConfigurationError("give the inputs: --input FILE, or --text TEXT (not both)")
    parse_host_port(args.endpoint, what="--endpoint")
    # Inputs are read before connecting: a bad file costs no round trip.
    arrays: dict[str, np.ndarray[Any, Any]] | list[str]
    if args.text is not None:
        arrays = check_texts_given(list(args.text))
    elif args.input.suffix.lower() in TENSOR_SUFFIXES:
        arrays = read_arrays(args.input)
    else:
        arrays = read_texts(args.input)
    if args.output is not None:
        _check_output(args.output, text=isinstance(arrays, list))
    roots = load_roots(args.root, state_dir=default_state_dir())
    verifier = make_verifier(roots, Policy.from_file(args.policy))
    endpoint = args.endpoint

    async def main() -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
        connected = False
        try:
            async with open_inference_client(
                endpoint,
                verifier=verifier,
                connect_timeout_s=args.timeout,
                timeout_s=args.timeout,
            ) as client:
                connected = True
                return await _infer(client, args, arrays)
        except (EnclaveError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            mapped = _for_the_user(exc, endpoint, args.policy, connected=connected)
            if mapped is exc:
                raise
            raise mapped from exc

    try:
        result, arrays = trio.run(main)
    except EnclaveError as exc:
        log.debug("infer_failed", exc_info=exc)  # the traceback, with ENCLAVE_LOG_LEVEL=debug
        raise
    if args.output is not None:
        try:
            if "embeddings" in result:
                with args.output.open("wb") as f:  # np.save(path) would append ".npy"
                    np.save(f, arrays["embeddings"], allow_pickle=False)
            else:
                named: dict[str, Any] = dict(arrays)  # (numpy's stub types **kwds as its flag)
                np.savez(args.output, **named)
        except OSError as exc:
            raise ConfigurationError(f"cannot write --output {args.output}: {exc}") from exc
        print(f"outputs saved to {args.output}", file=sys.stderr)
    att = result["attestation"]
    print(
        f"verified enclave {att['module_id']}: PCR0 {att['pcr0'][:16]}..., model digest "
        f"{(att['model_digest'] or '?')[:16]}... bound by PCR16: {att['pcr16_matches_catalog']}",
        file=sys.stderr,
    )
    if args.json and "embeddings" in result:
        print(json.dumps(result))  # one line: every embedding in full, for jq and scripts
    else:
        print(json.dumps(result, indent=2))
    return 0


def _check_output(path: Path, *, text: bool) -> None:
    """Refuse an --output that cannot be written, before connecting."""
    want = ".npy" if text else ".npz"
    if path.suffix.lower() != want:
        kind = "embeddings" if text else "output tensors"
        raise ConfigurationError(f"--output {path}: the {kind} are saved as {want}")
    if not path.parent.is_dir():
        raise ConfigurationError(f"--output {path}: no such directory {path.parent}")


def _for_the_user(
    exc: BaseException, endpoint: str, policy: Path, *, connected: bool
) -> EnclaveError:
    """The error ``enclave infer`` reports for ``exc``: one line saying what failed where."""
    if isinstance(exc, PeerUnreachable):
        text = _one_line(exc)
        if not text.startswith("enclave unreachable"):
            text = f"enclave unreachable at {endpoint}: {text}"
        return PeerUnreachable(text)
    if isinstance(exc, AuthenticationFailed):
        if not connected:
            # AuthenticationFailed's str() is opaque by design; the user's line is a plain
            # EnclaveError that says which stage failed (the log says which check).
            return EnclaveError(
                f"attestation failed: the enclave at {endpoint} did not prove what {policy} "
                "requires (root, PCRs, debug mode, freshness); the log says which check failed"
            )
        return EnclaveError(
            f"the channel to the enclave at {endpoint} failed its integrity check (tampering "
            "on the way, or the enclave went away mid-record)"
        )
    if isinstance(exc, TransportError | trio.BrokenResourceError | OSError):
        return TransportError(f"connection to the enclave at {endpoint} lost: {_one_line(exc)}")
    if isinstance(exc, EnclaveError):
        return exc  # the server's refusals and our own checks already say what is wrong
    return EnclaveError(_one_line(exc))
