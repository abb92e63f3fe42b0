"""``enclave infer``: run inference on a confidential server through its attested channel.

Connects to ``--endpoint`` (the host ingress), verifies the enclave's attestation document
against ``--root`` and ``--policy`` before sending anything, then sends ``--input`` (an ``.npy``
array for a single-input model, or an ``.npz`` whose names are the model's inputs; for an
``.npz`` with an ``x`` array and a single-input model, ``x`` is used). Prints what it verified
(module id, PCR0, PCR16 and the model digest it binds) and the results as JSON on stdout;
``--output FILE.npz`` also saves the output tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from transport.errors import ConfigurationError

if TYPE_CHECKING:
    from runtime.cli import SubParsers

#: Rows printed per output before eliding (the rest goes to --output).
_PRINT_ROWS = 10


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("infer", help="attested inference against an enclave server")
    p.add_argument("--endpoint", required=True, metavar="HOST:PORT", help="the host ingress")
    p.add_argument(
        "--root",
        required=True,
        action="append",
        metavar="PEM",
        help="trust root: a PEM file, 'local' (this state dir's CA) or 'aws' (repeatable)",
    )
    p.add_argument("--policy", required=True, type=Path, metavar="FILE", help="PCR policy file")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, type=Path, metavar="FILE.npy|FILE.npz")
    p.add_argument("--stream", action="store_true", help="stream the rows in chunks")
    p.add_argument("--chunk", type=int, default=32, help="rows per stream message (--stream)")
    p.add_argument("--output", type=Path, metavar="FILE.npz", help="save the outputs")
    p.set_defaults(func=run)


def _load_inputs(path: Path, input_names: list[str]) -> dict[str, np.ndarray[Any, Any]]:
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if len(input_names) != 1:
                raise ConfigurationError(
                    f"the model takes {input_names}; give an .npz with those names"
                )
            return {input_names[0]: arr}
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    if set(input_names) <= set(arrays):
        return {k: arrays[k] for k in input_names}
    if len(input_names) == 1 and ("x" in arrays or len(arrays) == 1):
        return {input_names[0]: arrays.get("x", next(iter(arrays.values())))}
    raise ConfigurationError(f"{path} holds {sorted(arrays)}; the model takes {input_names}")


def _summary(name: str, arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"dtype": arr.dtype.name, "shape": list(arr.shape)}
    rows = arr[:_PRINT_ROWS] if arr.ndim else arr
    out["values"] = np.round(rows, 6).tolist() if arr.dtype.kind == "f" else rows.tolist()
    if arr.ndim and arr.shape[0] > _PRINT_ROWS:
        out["elided_rows"] = int(arr.shape[0] - _PRINT_ROWS)
    return out


def run(args: argparse.Namespace) -> int:
    from attest.policy import Policy
    from attest.roots import load_roots
    from models.client import make_verifier, open_inference_client
    from models.server import expected_pcr16
    from transport.paths import default_state_dir

    roots = load_roots(args.root, state_dir=default_state_dir())
    policy = Policy.from_file(args.policy)
    verifier = make_verifier(roots, policy)
    if args.chunk < 1:
        raise ConfigurationError("--chunk must be positive")

    async def main() -> dict[str, Any]:
        async with open_inference_client(args.endpoint, verifier=verifier) as client:
            peer = client.attestation
            catalog = await client.list_models()
            info = next((m for m in catalog if m.name == args.model), None)
            names = [s.name for s in info.inputs] if info is not None else []
            inputs = _load_inputs(args.input, names) if names else {}
            if args.stream and inputs:
                n = next(iter(inputs.values())).shape[0]
                chunks = (
                    {k: v[i : i + args.chunk] for k, v in inputs.items()}
                    for i in range(0, n, args.chunk)
                )
                parts = [out async for out in client.stream(args.model, chunks)]
                outputs = {
                    k: np.concatenate([p[k] for p in parts], axis=0)
                    for k in (parts[0] if parts else {})
                }
            else:
                outputs = await client.infer(args.model, inputs)
            served = [bytes.fromhex(m.digest) for m in catalog if m.available and m.digest]
            pcr16 = peer.pcrs.get(16, b"")
            return {
                "attestation": {
                    "module_id": peer.module_id,
                    "pcr0": peer.pcrs[0].hex(),
                    "pcr16": pcr16.hex(),
                    "model_digest": info.digest if info else None,
                    "pcr16_matches_catalog": expected_pcr16(served) == pcr16,
                },
                "model": args.model,
                "outputs": {k: _summary(k, v) for k, v in outputs.items()},
                "_arrays": outputs,
            }

    result = trio.run(main)
    arrays = result.pop("_arrays")
    if args.output is not None:
        np.savez(args.output, **arrays)
        print(f"outputs saved to {args.output}", file=sys.stderr)
    att = result["attestation"]
    print(
        f"verified enclave {att['module_id']}: PCR0 {att['pcr0'][:16]}..., model digest "
        f"{(att['model_digest'] or '?')[:16]}... bound by PCR16: {att['pcr16_matches_catalog']}",
        file=sys.stderr,
    )
    print(json.dumps(result, indent=2))
    return 0
