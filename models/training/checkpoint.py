"""The model state as bytes: what worker 0 seals every ``checkpoint_every`` steps.

``.npz`` without pickles: the step reached, the flat parameters, and the fingerprint of the
configuration (:meth:`TrainConfig.fingerprint`, as JSON) it belongs to. The sealed format
around it (:mod:`models.enclave_seal`) gives secrecy and integrity; this layer only checks that
a checkpoint fits the model and the plan (bounded, typed, finite).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.training.errors import CheckpointError

__all__ = ["Checkpoint", "encode_checkpoint", "decode_checkpoint", "checkpoint_name"]


def checkpoint_name(step: int, *, protected: bool = True) -> str:
    """The host-store name of the checkpoint taken after ``step`` steps."""
    return f"{'ckpt' if protected else 'plain-ckpt'}-{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    params: npt.NDArray[np.float32]


def encode_checkpoint(step: int, params: npt.NDArray[np.float32], fingerprint: Any) -> bytes:
    out = io.BytesIO()
    meta = np.frombuffer(json.dumps(fingerprint, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(out, step=np.int64(step), params=params, fingerprint=meta)
    return out.getvalue()


def decode_checkpoint(data: bytes | bytearray, *, fingerprint: Any, size: int) -> Checkpoint:
    """Parse and check a checkpoint for a model of ``size`` parameters.

    Raises:
        CheckpointError: malformed, or for another model or data set.
    """
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as npz:
            if sorted(npz.files) != ["fingerprint", "params", "step"]:
                raise CheckpointError(f"a checkpoint holds {sorted(npz.files)}")
            step, params, meta = npz["step"], npz["params"], npz["fingerprint"]
    except (ValueError, OSError, zipfile.BadZipFile, KeyError, EOFError) as exc:
        raise CheckpointError(f"malformed checkpoint: {exc}") from None
    if step.shape != () or step.dtype != np.int64 or int(step) < 0:
        raise CheckpointError("malformed checkpoint: bad step")
    if params.dtype != np.float32 or params.shape != (size,) or not np.isfinite(params).all():
        raise CheckpointError(f"the checkpoint's parameters do not fit a model of {size}")
    if meta.dtype != np.uint8 or meta.tobytes() != json.dumps(fingerprint, sort_keys=True).encode():
        raise CheckpointError("the checkpoint belongs to another model or data set")
    return Checkpoint(int(step), np.ascontiguousarray(params))
