"""Batching texts by length: plan, pad, restore the caller's order. Pure, no I/O.

A transformer's cost grows with the padded length of its batch (linearly in the dense layers,
quadratically in attention), so a batch that mixes a 10-token text with a 200-token one spends
most of its time on padding. :func:`plan_batches` sorts the texts by token length (stably),
then walks the sorted run, closing a batch when the next text would make it hold more than
``max_batch_texts`` texts, more than ``max_batch_tokens`` padded tokens (texts x longest
length), or a padding fraction above ``max_padding``. Every batch is padded only to its own
longest text (:func:`pad_batch`). Each :class:`Batch` remembers the caller's indices, so results
are scattered back into the caller's order.

Why a padding cap and not only a size cap: on a CPU, batching saves little per token (one
session call costs ~0.5 ms, and per-token cost stops falling at a few hundred tokens per call),
while padding costs in full. Filling 32 slots from a realistic mix of 32 texts pads every one
of them to the longest (about 75 % padding, 4x the work); with the cap the same texts run as a
handful of batches of similar lengths.

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
    "DEFAULT_MAX_PADDING",
    "Batch",
    "plan_batches",
    "naive_batches",
    "padding_waste",
    "pad_batch",
]

#: Texts per model call. 32 is where MiniLM's throughput on two cores stops improving (measured:
#: see the minilm report); larger batches only add latency for the first texts.
DEFAULT_MAX_BATCH_TEXTS: Final = 32
#: Padded tokens per model call (texts x padded length): 8 texts of 256, 32 of 64. Bounds the
#: activations of one call: a process embedding 32 texts of 256 tokens peaks at 415 MB RSS with
#: this cap (the session's own load peak) and 605 MB with 32 x 256; per-token cost is no lower
#: above a few hundred tokens per call on two cores (measured: see the minilm report).
DEFAULT_MAX_BATCH_TOKENS: Final = 2048
#: Largest padding fraction of a batch of several texts. 0.2 measured best with 0.1 on the
#: realistic mix of the minilm bench (0.5 or no cap: up to 4x slower in calls of 32 texts).
DEFAULT_MAX_PADDING: Final = 0.2


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
    max_padding: float = DEFAULT_MAX_PADDING,
) -> list[Batch]:
    """Group texts of similar token length into batches.

    Args:
        lengths: each text's token count (special tokens included), in the caller's order.
        max_batch_texts: texts per batch.
        max_batch_tokens: padded tokens per batch; must hold at least the longest text.
        max_padding: largest padding fraction of a batch of two or more texts (0 allows only
            equal lengths together, 1 disables the cap).

    Returns:
        Batches in ascending length; together their indices are each text exactly once.
    """
    _check_caps(lengths, max_batch_texts, max_batch_tokens)
    if not 0.0 <= max_padding <= 1.0:
        raise ValueError("max_padding must be a fraction in [0, 1]")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[Batch] = []
    current: list[int] = []
    real = 0  # tokens of the texts in ``current``
    for i in order:
        # Ascending order: the text being added is the batch's longest so far.
        padded = (len(current) + 1) * lengths[i]
        if current and (
            len(current) == max_batch_texts
            or padded > max_batch_tokens
            or padded - (real + lengths[i]) > max_padding * padded
        ):
            batches.append(Batch(tuple(current), lengths[current[-1]]))
            current, real = [], 0
        current.append(i)
        real += lengths[i]
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
