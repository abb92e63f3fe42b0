"""The bundled digits classifier (``scripts/make_digits_model.py`` regenerates it).

An MLP (64 -> 128 -> 10) trained on scikit-learn's 8x8 handwritten digits, with its held-out test
split (450 samples). Input ``pixels`` float32 [N, 64] (intensities 0..16); outputs ``label`` int64
[N] and ``probabilities`` float32 [N, 10].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["MODEL_PATH", "TEST_SPLIT_PATH", "MODEL_NAME", "INPUT_NAME", "load_test_split"]

_HERE = Path(__file__).resolve().parent
#: The ONNX file.
MODEL_PATH = _HERE / "digits.onnx"
#: ``x`` float32 [450, 64], ``y`` int64 [450].
TEST_SPLIT_PATH = _HERE / "test_split.npz"
#: The name the demo serves it under.
MODEL_NAME = "digits"
#: The model's input name.
INPUT_NAME = "pixels"


def load_test_split() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The held-out test split ``(x, y)``."""
    with np.load(TEST_SPLIT_PATH, allow_pickle=False) as data:
        x = np.ascontiguousarray(data["x"], dtype=np.float32)
        y = np.ascontiguousarray(data["y"], dtype=np.int64)
    return x, y
