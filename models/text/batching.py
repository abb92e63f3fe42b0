"""Batching texts by length: plan, pad, restore the caller's order. Pure, no I/O.

A transformer's cost grows with the padded length of its batch (linearly in the dense layers,
quadratically in attention), so a batch that mixes a 10-token text with a 200-token one spends
most of its time on padding. :func:`plan_batches` sorts the texts by token length (stably),
then cuts the sorted run into batches of at most ``max_batch_texts`` texts whose padded size
(texts x longest length) stays within ``max_batch_tokens``; every batch is padded only to its own
longest text (:func:`pad_batch`). Each :class:`Batch` remembers the caller's indices, so results
are scattered back into the caller's order.

:func:`naive_batches` (the caller's order, fixed-size chunks) and :func:`padding_waste` exist to
measure what the plan saves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_MAX_BATCH_TEXTS",
    "DEFAULT_MAX_BATCH_TOKENS",
    "Batch",
    "plan_batches",
    "naive_batches",
    "padding_waste",
    "pad_batch",
]

#: Texts per model call. 32 is where MiniLM's throughput on two cores stops improving (measured:
#: see the minilm report); larger batches only add latency for the first texts.
DEFAULT_MAX_BATCH_TEXTS: Final = 32
#: Padded tokens per model call (texts x padded length): 32 texts of 256 tokens. Bounds the
#: activations of one call (~12 MiB of attention scores per layer at this size).
DEFAULT_MAX_BATCH_TOKENS: Final = 32 * 256


@dataclass(frozen=True, slots=True)
class Batch:
    """One model call: which texts (the caller's indices) and the length they are padded to."""

    indices: tuple[int, ...]
    length: int


def plan_batches(
    lengths: Sequence[int],
    *,
    max_batch_texts: int = DEFAULT_MAX_BATCH_TEXTS,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> list[Batch]:
    """Group texts of similar token length into batches.

    Args:
        lengths: each text's token count (special tokens included), in the caller's order.
        max_batch_texts: texts per batch.
        max_batch_tokens: padded tokens per batch; must hold at least the longest text.

    Returns:
        Batches in ascending length; together their indices are each text exactly once.
    """
    _check_caps(lengths, max_batch_texts, max_batch_tokens)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[Batch] = []
    current: list[int] = []
    for i in order:
        # Ascending order: the text being added is the batch's longest so far.
        if current and (
            len(current) == max_batch_texts or (len(current) + 1) * lengths[i] > max_batch_tokens
        ):
            batches.append(Batch(tuple(current), lengths[current[-1]]))
            current = []
        current.append(i)
    if current:
        batches.append(Batch(tuple(current), lengths[current[-1]]))
    return batches


def naive_batches(lengths: Sequence[int], *, max_batch_texts: int) -> list[Batch]:
    """The baseline: the caller's order cut into chunks, each padded to its longest text."""
    _check_caps(lengths, max_batch_texts, max(lengths, default=1) * max_batch_texts)
    return [
        Batch(
            tuple(range(s, min(s + max_batch_texts, len(lengths)))),
            max(lengths[s : s + max_batch_texts]),
        )
        for s in range(0, len(lengths), max_batch_texts)
    ]


def padding_waste(batches: Sequence[Batch], lengths: Sequence[int]) -> float:
    """Fraction of the padded tokens that are padding (0 = none)."""
    padded = sum(len(b.indices) * b.length for b in batches)
    real = sum(lengths[i] for b in batches for i in b.indices)
    return 0.0 if padded == 0 else 1.0 - real / padded


def pad_batch(
    sequences: Sequence[npt.NDArray[np.int64]], batch: Batch, *, pad_id: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The model inputs of one batch: token ids and attention mask, int64 [texts, length].

    Args:
        sequences: every text's ids, in the caller's order.
        batch: which of them, and the padded length.
        pad_id: the ``[PAD]`` id.
    """
    ids = np.full((len(batch.indices), batch.length), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch.indices), batch.length), dtype=np.int64)
    for row, i in enumerate(batch.indices):
        seq = sequences[i]
        if len(seq) > batch.length:
            raise ValueError(f"text {i} has {len(seq)} tokens, over its batch's {batch.length}")
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


def _check_caps(lengths: Sequence[int], max_texts: int, max_tokens: int) -> None:
    if max_texts < 1 or max_tokens < 1:
        raise ValueError("batch caps must be positive")
    if any(n < 1 for n in lengths):
        raise ValueError("every text has at least one token")
    if lengths and max(lengths) > max_tokens:
        raise ValueError(f"max_batch_tokens {max_tokens} cannot hold a {max(lengths)}-token text")
