"""Wire tensors and signature validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.digits import MODEL_PATH
from models.engine import create_session
from models.errors import InvalidInputError
from models.tensors import (
    DTYPES,
    ModelSignature,
    decode_tensor,
    decode_tensors,
    encode_tensor,
)

from .helpers import fixed_model


@settings(max_examples=100, deadline=None)
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
)
def test_round_trip(dtype: str, shape: list[int]) -> None:
    arr = (np.arange(int(np.prod(shape)) if shape else 1) % 7).astype(dtype).reshape(tuple(shape))
    wire = encode_tensor(arr)
    back = decode_tensor(wire)
    assert back.dtype == arr.dtype
    assert back.shape == arr.shape
    assert np.array_equal(back, arr)


def test_big_endian_input_is_normalised() -> None:
    arr = np.arange(4, dtype=">f4")
    wire = encode_tensor(arr)
    assert wire["data"] == np.arange(4, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    ("wire", "msg"),
    [
        ({"dtype": "float32", "shape": [2]}, "exactly"),
        ({"dtype": "complex64", "shape": [1], "data": b"\x00" * 8}, "unsupported dtype"),
        ({"dtype": "float32", "shape": [-1], "data": b""}, "non-negative"),
        ({"dtype": "float32", "shape": [1.5], "data": b""}, "non-negative"),
        ({"dtype": "float32", "shape": "12", "data": b""}, "shape"),
        ({"dtype": "float32", "shape": [1] * 9, "data": b"\x00" * 4}, "shape"),
        ({"dtype": "float32", "shape": [3], "data": b"\x00" * 8}, "needs 12"),
        ({"dtype": "float32", "shape": [2], "data": "text"}, "bytes"),
        ({"dtype": "float32", "shape": [1 << 40, 1 << 40], "data": b""}, "exceeds"),
        (["not", "a", "map"], "exactly"),
    ],
)
def test_malformed(wire: object, msg: str) -> None:
    with pytest.raises(InvalidInputError, match=msg):
        decode_tensor(wire)


def test_total_size_cap() -> None:
    wire = encode_tensor(np.zeros(100, np.float32))
    with pytest.raises(InvalidInputError, match="exceeds"):
        decode_tensors({"a": wire, "b": wire}, max_bytes=600)
    with pytest.raises(InvalidInputError):
        decode_tensors({})


@pytest.fixture(scope="module")
def digits_sig() -> ModelSignature:
    return ModelSignature.from_session(create_session(MODEL_PATH.read_bytes()))


def test_digits_signature(digits_sig: ModelSignature) -> None:
    assert [(s.name, s.dtype, s.shape) for s in digits_sig.inputs] == [
        ("pixels", "float32", (None, 64))
    ]
    assert [s.name for s in digits_sig.outputs] == ["label", "probabilities"]
    assert digits_sig.batchable


def test_validate(digits_sig: ModelSignature) -> None:
    assert digits_sig.validate({"pixels": np.zeros((5, 64), np.float32)}) == 5
    cases = [
        ({"pixels": np.zeros((5, 64), np.float64)}, "dtype float64"),
        ({"pixels": np.zeros((5, 63), np.float32)}, "dimension 1 is 63"),
        ({"pixels": np.zeros((64,), np.float32)}, "rank 1"),
        ({"pixel": np.zeros((1, 64), np.float32)}, "unknown input"),
        ({}, "missing input"),
        ({"pixels": np.zeros((0, 64), np.float32)}, "empty"),
    ]
    for inputs, msg in cases:
        with pytest.raises(InvalidInputError, match=msg):
            digits_sig.validate(inputs)
    with pytest.raises(InvalidInputError, match="exceeds the limit"):
        digits_sig.validate({"pixels": np.zeros((9, 64), np.float32)}, max_batch=8)


def test_fixed_signature() -> None:
    sig = ModelSignature.from_session(create_session(fixed_model()))
    assert not sig.batchable
    ok = {"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 3), np.int64)}
    assert sig.validate(ok) == 1
    with pytest.raises(InvalidInputError, match="dimension 0 is 3"):
        sig.validate({**ok, "a": np.zeros((3, 3), np.float32)})
