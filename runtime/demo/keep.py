"""``enclave demo --keep``: once the steps are done, a client policy and one example input per
served model written to the state directory, and one ready-to-run ``enclave infer`` line per
model printed (the stack stays up until Ctrl-C or SIGTERM)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from runtime.demo.digits import Array
from runtime.demo.narration import Console

if TYPE_CHECKING:
    from models.client import ModelInfo
    from runtime.stack import ServerHandle, Stack

__all__ = ["KEEP_INPUT_ROWS", "KEEP_TEXT", "keep_instructions"]

#: Rows of the digits test split written as the ``--keep`` example input.
KEEP_INPUT_ROWS: Final = 5
#: The ``--keep`` example for a text model: one text on the command line.
KEEP_TEXT: Final = "Which patient gets chest pain going up the stairs?"


def _enclave_command() -> list[str]:
    """How to run ``enclave`` from any directory: this interpreter's console script."""
    script = Path(sys.executable).with_name("enclave")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "runtime.cli"]


def _example_input(model: ModelInfo, x: Array) -> dict[str, Array]:
    """An input for ``model``: rows of the digits test split for the bundled model, zeros of
    the declared shape (dynamic dimensions as 1) for any other."""
    if model.name == "digits" and [s.name for s in model.inputs] == ["pixels"]:
        return {"pixels": x[:KEEP_INPUT_ROWS]}
    return {
        spec.name: np.zeros(
            tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape), spec.dtype
        )
        for spec in model.inputs
    }


def keep_instructions(
    out: Console,
    state_dir: Path,
    stack: Stack,
    server: ServerHandle,
    endpoint: str,
    policy: dict[str, object],
    catalog: Sequence[ModelInfo],
    x: Array,
) -> None:
    """Write a client policy and one input per served model; print how to use them."""
    policy_file = state_dir / "client-policy.json"
    policy_file.write_text(json.dumps(policy, indent=2) + "\n")
    enclave = _enclave_command()
    out.info(f"export ENCLAVE_STATE_DIR={shlex.quote(str(state_dir))}")
    for model in catalog:
        if not model.available:
            continue
        argv = [*enclave, "infer", "--endpoint", endpoint, "--root", str(stack.ca_root_pem),
                "--policy", str(policy_file), "--model", model.name]  # fmt: skip
        if model.is_text:
            argv += ["--text", KEEP_TEXT]
        else:
            input_file = state_dir / "inputs" / f"{model.name}.npz"
            input_file.parent.mkdir(exist_ok=True)
            np.savez(input_file, **_example_input(model, x))  # type: ignore[arg-type]
            argv += ["--input", str(input_file)]
        out.info(shlex.join(argv))
    out.info(f"{shlex.join([*enclave, 'describe-enclaves'])}   # enclave {server.enclave_id}")
    out.info(f"KMS at {stack.kms_endpoint}; audit log {stack.kms_state_dir}/audit.jsonl")
