"""Request limits for text inference: each rule its own error, work bounded by the caps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.errors import InvalidInputError, error_from_code
from models.text.errors import (
    EmptyInputError,
    EmptyTextError,
    InvalidUtf8Error,
    RequestTooLargeError,
    TextInputError,
    TextTooLargeError,
    TooManyTextsError,
)
from models.text.limits import TextLimits, check_texts

SMALL = TextLimits(max_texts=4, max_text_bytes=10, max_total_bytes=25)


def test_accepts_str_and_utf8_bytes_in_order() -> None:
    assert check_texts(["héllo", b"w\xc3\xb6rld", bytearray(b"x")], SMALL) == [
        "héllo",
        "wörld",
        "x",
    ]


@pytest.mark.parametrize(
    ("items", "error", "index"),
    [
        ([], EmptyInputError, None),
        (["a"] * 5, TooManyTextsError, None),
        (["a", "b" * 11], TextTooLargeError, 1),
        (["a", b"b" * 11], TextTooLargeError, 1),
        (["é" * 6], TextTooLargeError, 0),  # 6 code points, 12 UTF-8 bytes
        (["a" * 10, "b" * 10, "c" * 10], RequestTooLargeError, 2),
        (["ok", b"\xff\xfe"], InvalidUtf8Error, 1),
        ([b"\xc3"], InvalidUtf8Error, 0),  # truncated multi-byte sequence
        (["\ud800"], InvalidUtf8Error, 0),  # lone surrogate: no UTF-8 form
        (["ok", ""], EmptyTextError, 1),
        ([" \t\n "], EmptyTextError, 0),
        (["ok", 3], TextInputError, 1),
        ([None], TextInputError, 0),
    ],
)
def test_each_rule_has_its_error(
    items: list[object], error: type[Exception], index: int | None
) -> None:
    with pytest.raises(error) as info:
        check_texts(items, SMALL)
    assert type(info.value) is error
    assert isinstance(info.value, InvalidInputError)  # travels as "invalid_argument"
    code = info.value.code  # type: ignore[attr-defined]
    assert code.split(".")[0] == "invalid_argument"  # a client that knows no better
    # A refined code names the very class on the client side (models.errors.error_from_code).
    assert type(error_from_code(code, "message")) is error
    assert info.value.index == index  # type: ignore[attr-defined]


def test_errors_never_echo_the_text() -> None:
    secret = "patient-4711-diagnosis"
    with pytest.raises(TextTooLargeError) as info:
        check_texts([secret * 10], SMALL)
    assert "4711" not in str(info.value)


def test_count_is_checked_before_any_text_is_looked_at() -> None:
    class Exploding:
        def __len__(self) -> int:
            return 10**9

        def __getitem__(self, i: int) -> object:
            raise AssertionError("a text was read")

    with pytest.raises(TooManyTextsError):
        check_texts(Exploding(), SMALL)  # type: ignore[arg-type]


def test_a_huge_str_is_refused_without_encoding_it() -> None:
    with pytest.raises(TextTooLargeError):
        check_texts(["x" * (1 << 26)], TextLimits())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_texts": 0},
        {"max_text_bytes": -1},
        {"max_total_bytes": 1.5},
        {"max_text_bytes": 10, "max_total_bytes": 5},
    ],
)
def test_limits_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TextLimits(**kwargs)  # type: ignore[arg-type]


_items = st.lists(
    st.one_of(st.text(max_size=14), st.binary(max_size=14), st.integers(), st.none()), max_size=6
)


@settings(max_examples=300, deadline=None)
@given(_items)
def test_any_request_is_accepted_within_the_caps_or_refused_with_a_text_error(
    items: list[object],
) -> None:
    try:
        texts = check_texts(items, SMALL)
    except TextInputError:
        return
    assert 1 <= len(texts) <= SMALL.max_texts
    sizes = [len(t.encode()) for t in texts]
    assert max(sizes) <= SMALL.max_text_bytes
    assert sum(sizes) <= SMALL.max_total_bytes
    assert all(t.strip() for t in texts)
