"""Request limits for text inference: pure checks, no I/O.

A request is a sequence of texts (``str``, or ``bytes`` that must be UTF-8). :func:`check_texts`
applies the limits in an order that keeps the work bounded by the caps, not by the input: the
count first (before looking at any text), then each text's size before decoding it, then the
running total. Each broken rule raises its own :class:`~models.text.errors.TextInputError`
subclass naming the text's index, never its content.

Inputs longer than the model's token cap are *not* an error: the tokenizer truncates them and
the result says so (:mod:`models.text.tokenizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from models.text.errors import (
    EmptyInputError,
    EmptyTextError,
    InvalidUtf8Error,
    RequestTooLargeError,
    TextInputError,
    TextTooLargeError,
    TooManyTextsError,
)

__all__ = [
    "DEFAULT_MAX_TEXTS",
    "DEFAULT_MAX_TEXT_BYTES",
    "DEFAULT_MAX_TOTAL_BYTES",
    "TextLimits",
    "check_texts",
]

#: Texts per request. 256 texts of 256 tokens is ~2 s of MiniLM on two cores: long enough for
#: one request, and the answer (256 x 384 float32 = 384 KiB) stays well inside one RPC message.
DEFAULT_MAX_TEXTS: Final = 256
#: UTF-8 bytes per text. 256 word pieces are ~1-2 KiB of English; 32 KiB leaves room for long
#: texts that will be truncated while bounding the tokenizer's work per text.
DEFAULT_MAX_TEXT_BYTES: Final = 32 << 10
#: UTF-8 bytes per request: 1 MiB, a quarter of the RPC layer's default 4 MiB message cap.
DEFAULT_MAX_TOTAL_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class TextLimits:
    """The caps one text request must respect (all in UTF-8 bytes or counts)."""

    max_texts: int = DEFAULT_MAX_TEXTS
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_text_bytes", "max_total_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        if self.max_text_bytes > self.max_total_bytes:
            raise ValueError("max_text_bytes must not exceed max_total_bytes")


def check_texts(items: Sequence[object], limits: TextLimits | None = None) -> list[str]:
    """Check a request's texts against ``limits`` and return them as ``str``.

    Args:
        items: the texts, each a ``str`` or UTF-8 ``bytes`` (anything else is refused).
        limits: the caps; the defaults when ``None``.

    Returns:
        The texts, decoded, in the caller's order.

    Raises:
        EmptyInputError: no texts.
        TooManyTextsError: more than ``limits.max_texts`` texts.
        TextTooLargeError: a text over ``limits.max_text_bytes`` UTF-8 bytes.
        RequestTooLargeError: the texts together over ``limits.max_total_bytes``.
        InvalidUtf8Error: a ``bytes`` text that is not UTF-8, or a ``str`` holding lone
            surrogates (it has no UTF-8 form).
        EmptyTextError: a text that is empty or only whitespace.
        TextInputError: an item that is neither ``str`` nor ``bytes``.
    """
    limits = limits or TextLimits()
    if len(items) == 0:
        raise EmptyInputError("the request holds no texts")
    if len(items) > limits.max_texts:
        raise TooManyTextsError(
            f"the request holds {len(items)} texts; at most {limits.max_texts} are accepted"
        )
    texts: list[str] = []
    total = 0
    for index, item in enumerate(items):
        text, size = _decode_one(item, index, limits.max_text_bytes)
        total += size
        if total > limits.max_total_bytes:
            raise RequestTooLargeError(
                f"the texts exceed {limits.max_total_bytes} bytes in total (at text {index})",
                index=index,
            )
        if not text.strip():
            raise EmptyTextError(f"text {index} is empty or only whitespace", index=index)
        texts.append(text)
    return texts


def _decode_one(item: object, index: int, max_bytes: int) -> tuple[str, int]:
    """One text as ``str`` and its UTF-8 size, the size checked before any decoding."""
    if isinstance(item, bytes | bytearray | memoryview):
        if memoryview(item).nbytes > max_bytes:  # sized before any copy
            raise _too_large(index, max_bytes)
        raw = bytes(item)
        try:
            return raw.decode("utf-8", errors="strict"), len(raw)
        except UnicodeDecodeError as exc:
            raise InvalidUtf8Error(
                f"text {index} is not valid UTF-8 (byte {exc.start})", index=index
            ) from None
    if isinstance(item, str):
        # Every code point is at least one UTF-8 byte: a str longer than the cap in code points
        # is refused before encoding it, so the encode below is bounded by 4 x the cap.
        if len(item) > max_bytes:
            raise _too_large(index, max_bytes)
        try:
            size = len(item.encode("utf-8", errors="strict"))
        except UnicodeEncodeError:
            raise InvalidUtf8Error(
                f"text {index} holds lone surrogates (no UTF-8 form)", index=index
            ) from None
        if size > max_bytes:
            raise _too_large(index, max_bytes)
        return item, size
    raise TextInputError(f"text {index} is a {type(item).__name__}, not a string", index=index)


def _too_large(index: int, max_bytes: int) -> TextTooLargeError:
    return TextTooLargeError(f"text {index} is larger than {max_bytes} bytes", index=index)
