"""The training data: a deterministic synthetic classification set, its shards, and each
worker's share of every step's global batch.

The data set (:func:`make_dataset`) is a function of its seed only: ``classes`` classes, each a
mixture of ``modes`` Gaussian blobs in a ``latent``-dimensional space, mapped through a fixed
random ``tanh`` layer into ``features`` dimensions (so a linear model does not solve it and the
MLP has work to do). The first ``train`` samples train, the rest test.

Shards are contiguous ranges of the training samples, serialised as ``.npy`` pairs in an
``.npz`` without pickles (:func:`encode_shard` / :func:`decode_shard`, bounded on read); the
host seals each one. Worker ``r`` of ``world`` owns shards ``s`` with ``s % world == r``.

Every step's global batch (:func:`batch_indices`) is a function of ``(seed, step)`` alone: a
permutation per epoch. A worker computes its gradient on the batch samples it owns, scaled by
the global batch size, so the ring's sum is the mean gradient of the whole batch whatever the
number of workers, and a run resumed at step ``t`` sees exactly the batches an uninterrupted
run would.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from models.training.errors import TrainingError

__all__ = [
    "DataSpec",
    "Dataset",
    "Shard",
    "make_dataset",
    "split_shards",
    "encode_shard",
    "decode_shard",
    "owned_shards",
    "batch_indices",
    "MAX_SHARD_BYTES",
]

#: A shard's serialised size bound (checked before it is parsed; the host store bounds the
#: fetch itself).
MAX_SHARD_BYTES: Final = 256 << 20

Floats = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class DataSpec:
    """Shape of the synthetic data set (all of it is measured with the plan)."""

    seed: int = 20250121
    train: int = 32768
    test: int = 4096
    features: int = 64
    classes: int = 10
    latent: int = 16
    modes: int = 3


@dataclass(frozen=True, slots=True)
class Dataset:
    x_train: Floats
    y_train: Labels
    x_test: Floats
    y_test: Labels


@dataclass(frozen=True, slots=True)
class Shard:
    """Training samples ``[start, start + len(y))`` of the data set."""

    index: int
    start: int
    x: Floats
    y: Labels


def make_dataset(spec: DataSpec) -> Dataset:
    """The synthetic data set of ``spec`` (deterministic from ``spec.seed``)."""
    rng = np.random.default_rng([spec.seed, 1])
    total = spec.train + spec.test
    centers = rng.normal(0.0, 2.0, size=(spec.classes, spec.modes, spec.latent))
    mixing = rng.normal(0.0, 1.0 / np.sqrt(spec.latent), size=(spec.latent, spec.features))
    labels = rng.integers(0, spec.classes, size=total)
    modes = rng.integers(0, spec.modes, size=total)
    latent = centers[labels, modes] + rng.normal(0.0, 1.0, size=(total, spec.latent))
    x = np.tanh(latent @ mixing) * 4.0 + rng.normal(0.0, 0.25, size=(total, spec.features))
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    y = labels.astype(np.int64)
    return Dataset(x32[: spec.train], y[: spec.train], x32[spec.train :], y[spec.train :])


def split_shards(x: Floats, y: Labels, count: int) -> list[Shard]:
    """``count`` contiguous shards of equal size (the last takes the remainder)."""
    if count < 1 or count > len(y):
        raise TrainingError(f"cannot cut {len(y)} samples into {count} shards")
    size = len(y) // count
    bounds = [i * size for i in range(count)] + [len(y)]
    return [
        Shard(i, bounds[i], x[bounds[i] : bounds[i + 1]], y[bounds[i] : bounds[i + 1]])
        for i in range(count)
    ]


def encode_shard(shard: Shard) -> bytes:
    """A shard as ``.npz`` bytes (no pickles)."""
    out = io.BytesIO()
    np.savez(out, index=np.int64(shard.index), start=np.int64(shard.start), x=shard.x, y=shard.y)
    return out.getvalue()


def decode_shard(data: bytes | bytearray | memoryview, *, features: int, classes: int) -> Shard:
    """Parse :func:`encode_shard`'s bytes, checking shapes, types and label range.

    Raises:
        TrainingError: anything malformed (the message says what).
    """
    if len(data) > MAX_SHARD_BYTES:
        raise TrainingError(f"a shard of {len(data)} bytes is over {MAX_SHARD_BYTES}")
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as npz:
            if sorted(npz.files) != ["index", "start", "x", "y"]:
                raise TrainingError(f"a shard holds {sorted(npz.files)}")
            index, start = npz["index"], npz["start"]
            x, y = npz["x"], npz["y"]
    except (ValueError, OSError, zipfile.BadZipFile, KeyError, EOFError) as exc:
        raise TrainingError(f"malformed shard: {exc}") from None
    if index.shape != () or start.shape != () or index.dtype != np.int64:
        raise TrainingError("malformed shard: index and start must be int64 scalars")
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != features:
        raise TrainingError(
            f"malformed shard: x is {x.dtype} {x.shape}, want float32 [n, {features}]"
        )
    if y.dtype != np.int64 or y.shape != (x.shape[0],):
        raise TrainingError("malformed shard: y must be int64 [n]")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise TrainingError("malformed shard: a label is out of range")
    if not np.isfinite(x).all():
        raise TrainingError("malformed shard: x holds a non-finite value")
    return Shard(int(index), int(start), np.ascontiguousarray(x), np.ascontiguousarray(y))


def owned_shards(rank: int, world: int, shards: int) -> list[int]:
    """The shards worker ``rank`` of ``world`` loads and computes on."""
    if not 0 <= rank < world <= shards:
        raise TrainingError(f"rank {rank} of {world} workers over {shards} shards")
    return [s for s in range(shards) if s % world == rank]


def batch_indices(seed: int, step: int, samples: int, batch: int) -> npt.NDArray[np.int64]:
    """The global batch of step ``step`` (0-based): a function of ``(seed, step)`` only."""
    per_epoch = samples // batch
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng([seed, 2, epoch]).permutation(samples)
    return order[within * batch : (within + 1) * batch].astype(np.int64)
