"""The client's parsing of a catalog entry (models.client.ModelInfo.from_wire): every field's
type is checked, so a malformed answer is an InferenceError naming the field, never a wrongly
typed ModelInfo (before: ``digest``, ``size`` and ``reason`` were copied unchecked, and a
missing name became the string "None")."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.client import ModelInfo
from models.errors import InferenceError, ModelError

GOOD: dict[str, Any] = {
    "name": "digits",
    "available": True,
    "digest": "ab" * 48,
    "size": 12345,
    "reason": None,
    "kind": "tensor",
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 64]}],
    "outputs": [{"name": "y", "dtype": "int64", "shape": ["N"]}],
    "batchable": True,
}


def test_a_good_entry_parses_with_every_field() -> None:
    info = ModelInfo.from_wire(GOOD)
    assert info.name == "digits"
    assert info.available is True
    assert info.digest == "ab" * 48
    assert info.size == 12345
    assert info.kind == "tensor"
    assert [s.name for s in info.inputs] == ["x"]
    assert info.batchable is True
    unavailable = ModelInfo.from_wire(
        {"name": "m", "available": False, "digest": None, "size": None, "reason": "bad seal"}
    )
    assert (unavailable.available, unavailable.reason, unavailable.kind) == (False, "bad seal", "")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", None),
        ("name", 7),
        ("digest", 12),
        ("size", "12"),
        ("size", True),  # a bool is not a size
        ("reason", ["x"]),
        ("kind", 1),
        ("text", "not a map"),
        ("inputs", "x"),
        ("outputs", {"a": 1}),
    ],
)
def test_a_wrongly_typed_field_is_an_error_that_names_it(field: str, value: object) -> None:
    with pytest.raises(InferenceError, match=f"malformed catalog entry: {field}"):
        ModelInfo.from_wire({**GOOD, field: value})


_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
) | st.binary(max_size=8)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from([*sorted(GOOD), "text"]), _values, max_size=10))
def test_any_entry_parses_or_is_a_model_error(entry: dict[str, object]) -> None:
    try:
        info = ModelInfo.from_wire({**GOOD, **entry})
    except ModelError:  # InferenceError, or InvalidInputError from a tensor spec
        return
    assert isinstance(info.name, str)
    assert info.digest is None or isinstance(info.digest, str)
    assert info.size is None or (isinstance(info.size, int) and not isinstance(info.size, bool))
    assert info.reason is None or isinstance(info.reason, str)
    assert isinstance(info.kind, str)
