"""A numpy MLP (ReLU hidden layers, softmax cross-entropy) and plain SGD, float32.

The parameters live in one flat float32 vector (:class:`Mlp.params`) and the layers are views
into it, so the gradient the ring sums is one contiguous buffer, a checkpoint is that vector,
and an update is one ``axpy``. Everything is deterministic for a given seed: initialisation
draws from ``numpy.random.default_rng([seed, 3])``, and the arithmetic is single-threaded
numpy (the image pins BLAS to one thread, see ``models/train_app``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from models.training.data import Shard
from models.training.errors import TrainingError

__all__ = ["Mlp", "LocalData", "param_count"]

Floats = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


def param_count(sizes: Sequence[int]) -> int:
    """Parameters of an MLP with layer widths ``sizes`` (input first, classes last)."""
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


@dataclass
class Mlp:
    """Layer widths ``sizes`` and the flat parameter vector ``params`` (see module docs)."""

    sizes: tuple[int, ...]
    params: Floats

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise TrainingError(f"bad layer sizes {self.sizes}")
        if self.params.dtype != np.float32 or self.params.shape != (param_count(self.sizes),):
            raise TrainingError("parameters do not match the layer sizes")
        self._layers = self._views(self.params)

    @classmethod
    def initial(cls, sizes: Sequence[int], seed: int) -> Mlp:
        """He-normal weights, zero biases, from ``seed``."""
        sizes = tuple(sizes)
        params = np.zeros(param_count(sizes), dtype=np.float32)
        model = cls(sizes, params)
        rng = np.random.default_rng([seed, 3])
        for w, _b in model._layers:
            w[...] = rng.normal(0.0, np.sqrt(2.0 / w.shape[0]), size=w.shape)
        return model

    def _views(self, flat: Floats) -> list[tuple[Floats, Floats]]:
        layers = []
        at = 0
        for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=False):
            w = flat[at : at + a * b].reshape(a, b)
            at += a * b
            layers.append((w, flat[at : at + b]))
            at += b
        return layers

    def logits(self, x: Floats) -> Floats:
        h = x
        for i, (w, b) in enumerate(self._layers):
            h = h @ w + b
            if i < len(self._layers) - 1:
                np.maximum(h, 0.0, out=h)
        return h

    def accuracy(self, x: Floats, y: Labels) -> float:
        """Fraction of ``x`` classified as ``y``."""
        if not len(y):
            return 0.0
        return float(np.mean(np.argmax(self.logits(x), axis=1) == y))

    def gradient(self, x: Floats, y: Labels, scale: int, out: Floats) -> float:
        """Write into ``out`` the gradient of the summed cross-entropy over ``(x, y)`` divided
        by ``scale`` (the global batch size: the ring's sum is then the batch mean); returns
        that scaled loss. No samples: a zero gradient."""
        out[...] = 0.0
        if not len(y):
            return 0.0
        grads = self._views(out)
        acts = [x]
        h = x
        for i, (w, b) in enumerate(self._layers):
            h = h @ w + b
            if i < len(self._layers) - 1:
                np.maximum(h, 0.0, out=h)
            acts.append(h)
        logits = acts[-1]
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        total = exp.sum(axis=1, keepdims=True)
        rows = np.arange(len(y))
        loss = float(np.sum(np.log(total[:, 0]) - shifted[rows, y])) / scale
        delta = exp / total
        delta[rows, y] -= 1.0
        delta /= np.float32(scale)
        for i in range(len(self._layers) - 1, -1, -1):
            w, _b = self._layers[i]
            gw, gb = grads[i]
            np.matmul(acts[i].T, delta, out=gw)
            gb[...] = delta.sum(axis=0)
            if i:
                delta = delta @ w.T
                delta *= acts[i] > 0
        return loss

    def sgd(self, gradient: Floats, lr: float) -> None:
        """``params -= lr * gradient`` (in place)."""
        self.params -= np.float32(lr) * gradient


class LocalData:
    """The shards one worker holds, addressed by global sample index."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        ordered = sorted(shards, key=lambda s: s.start)
        self.starts = np.asarray([s.start for s in ordered], dtype=np.int64)
        self.ends = np.asarray([s.start + len(s.y) for s in ordered], dtype=np.int64)
        self.offsets = np.cumsum([0] + [len(s.y) for s in ordered])[:-1].astype(np.int64)
        self.x = np.concatenate([s.x for s in ordered]) if ordered else np.zeros((0, 0), np.float32)
        self.y = np.concatenate([s.y for s in ordered]) if ordered else np.zeros(0, np.int64)

    def select(self, indices: npt.NDArray[np.int64]) -> tuple[Floats, Labels]:
        """The samples of ``indices`` this worker holds (in ``indices``' order)."""
        if not len(self.starts):
            return self.x[:0], self.y[:0]
        which = np.searchsorted(self.starts, indices, side="right") - 1
        inside = (which >= 0) & (indices < self.ends[np.maximum(which, 0)])
        local = indices[inside] - self.starts[which[inside]] + self.offsets[which[inside]]
        return self.x[local], self.y[local]
