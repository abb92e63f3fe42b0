"""The answer to a text-embedding request (no numpy-heavy imports beyond numpy itself: the
client SDK returns it too, without onnxruntime or `tokenizers`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Embeddings"]


@dataclass(frozen=True, slots=True)
class Embeddings:
    """The answer to one request, in the caller's order.

    Attributes:
        vectors: float32 [texts, embedding_dim], L2-normalised when the bundle says so.
        truncated: per text, whether it was cut at the model's token cap.
    """

    vectors: npt.NDArray[np.float32]
    truncated: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.truncated)
