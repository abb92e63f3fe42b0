#!/usr/bin/env python3
"""Regenerate the bundled digits model: ``models/digits/digits.onnx`` + ``test_split.npz``.

Trains a small MLP classifier (64 -> 128 -> 10, ReLU, with a standard scaler in front) on the
8x8 handwritten digits data set that scikit-learn ships (1797 samples, no download), exports it to
ONNX with a dynamic batch dimension and writes the held-out test split beside it.

Deterministic: fixed seeds for the split and the MLP, single-threaded BLAS. Needs the ``dev``
extra (scikit-learn, skl2onnx); the product itself only needs onnxruntime.

Model signature:
    input  ``pixels``        float32 [N, 64]   raw pixel intensities 0..16 (the data set's scale)
    output ``label``         int64   [N]       predicted digit
    output ``probabilities`` float32 [N, 10]   class probabilities

Usage: ``.venv/bin/python scripts/make_digits_model.py [--out-dir models/digits]``
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Single-threaded BLAS so training is bit-for-bit repeatable on one machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np

SEED = 20240611  # fixed: the split and the MLP initialisation
TEST_FRACTION = 0.25  # 450 of the 1797 samples held out
HIDDEN = 128  # one hidden layer; small enough to batch well, big enough for ~97 % accuracy
INPUT_NAME = "pixels"
OPSET = 17  # supported by every onnxruntime >= 1.14


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--out-dir", type=Path, default=root / "models" / "digits")
    args = parser.parse_args(argv)

    from onnxruntime import InferenceSession
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y
    )
    model = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "mlp",
                MLPClassifier(
                    hidden_layer_sizes=(HIDDEN,),
                    alpha=1e-3,
                    max_iter=400,
                    random_state=SEED,
                ),
            ),
        ]
    )
    model.fit(x_train, y_train)
    sk_acc = float((model.predict(x_test) == y_test).mean())

    onx = to_onnx(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, 64]))],
        options={id(model.steps[-1][1]): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    onx.doc_string = "MLP digits classifier (scikit-learn digits, 8x8, 0..16 intensities)"
    onx.producer_name = "enclave-runtime scripts/make_digits_model.py"
    onx.producer_version = "1"
    data = onx.SerializeToString()

    sess = InferenceSession(data, providers=["CPUExecutionProvider"])
    label, _probs = sess.run(None, {INPUT_NAME: x_test})
    ort_acc = float((label == y_test).mean())

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "digits.onnx").write_bytes(data)
    np.savez(args.out_dir / "test_split.npz", x=x_test, y=y_test)
    print(
        f"wrote {args.out_dir / 'digits.onnx'} ({len(data)} bytes) and test_split.npz "
        f"({len(y_test)} samples); test accuracy sklearn {sk_acc:.4f}, onnxruntime {ort_acc:.4f}"
    )
    return 0 if ort_acc > 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
