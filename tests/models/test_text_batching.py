"""Batching by length: every text once, caps kept, order restored, less padding than naive."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.text.batching import (
    Batch,
    naive_batches,
    pad_batch,
    padding_waste,
    plan_batches,
)


def realistic_lengths(n: int, seed: int = 0) -> list[int]:
    """A mix of short queries, sentences, paragraphs and a few truncated documents (tokens)."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(4, size=n, p=[0.35, 0.4, 0.2, 0.05])
    ranges = [(4, 16), (12, 48), (48, 200), (256, 257)]
    return [int(rng.integers(*ranges[k])) for k in kinds]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 256), max_size=200),
    st.integers(1, 40),
    st.integers(256, 4096),
    st.floats(0.0, 1.0),
)
def test_plan_covers_every_text_once_within_the_caps(
    lengths: list[int], max_texts: int, max_tokens: int, max_padding: float
) -> None:
    batches = plan_batches(
        lengths, max_batch_texts=max_texts, max_batch_tokens=max_tokens, max_padding=max_padding
    )
    seen = sorted(i for b in batches for i in b.indices)
    assert seen == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b.indices) <= max_texts
        assert len(b.indices) * b.length <= max_tokens
        assert b.length == max(lengths[i] for i in b.indices)
        if len(b.indices) > 1:
            assert padding_waste([b], lengths) <= max_padding + 1e-12
    # Ascending: no batch is padded longer than the next one's shortest text needs.
    assert [b.length for b in batches] == sorted(b.length for b in batches)


def test_plan_fills_batches_greedily() -> None:
    assert plan_batches([5, 3, 9, 3], max_batch_texts=2, max_batch_tokens=100, max_padding=1) == [
        Batch((1, 3), 3),
        Batch((0, 2), 9),
    ]
    # The token budget closes a batch early: 3 x 40 > 100.
    assert plan_batches([40, 40, 40], max_batch_texts=8, max_batch_tokens=100) == [
        Batch((0, 1), 40),
        Batch((2,), 40),
    ]
    # The padding cap keeps a long text away from short ones: [10, 11] pads 1 of 22 tokens,
    # adding 100 would pad 279 of 300.
    assert plan_batches([100, 10, 11], max_padding=0.2) == [Batch((1, 2), 11), Batch((0,), 100)]


@pytest.mark.parametrize(
    ("lengths", "kwargs"),
    [
        ([300], {"max_batch_texts": 4, "max_batch_tokens": 256}),
        ([0, 3], {"max_batch_texts": 4, "max_batch_tokens": 256}),
        ([3], {"max_batch_texts": 0, "max_batch_tokens": 256}),
        ([3], {"max_padding": 1.5}),
        ([3], {"max_padding": -0.1}),
    ],
)
def test_plan_rejects_impossible_caps(lengths: list[int], kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        plan_batches(lengths, **kwargs)


@pytest.mark.parametrize("call_size", [32, 512])
def test_length_batching_wastes_far_less_padding_than_naive_on_a_realistic_mix(
    call_size: int,
) -> None:
    """Texts arriving in calls of ``call_size``, each call planned on its own."""
    lengths = realistic_lengths(512)
    naive = padding_waste(naive_batches(lengths, max_batch_texts=32), lengths)
    planned = [
        Batch(tuple(i + start for i in b.indices), b.length)
        for start in range(0, len(lengths), call_size)
        for b in plan_batches(lengths[start : start + call_size])
    ]
    by_length = padding_waste(planned, lengths)
    assert naive > 0.5  # one long text in a batch of 32 pads the rest to its length
    assert by_length < 0.2


def test_pad_batch_and_restoring_order() -> None:
    seqs = [np.array(s, np.int64) for s in ([101, 7, 102], [101, 102], [101, 5, 6, 7, 102])]
    batches = plan_batches([len(s) for s in seqs], max_batch_texts=2, max_batch_tokens=100)
    out = np.zeros(len(seqs), np.int64)
    for b in batches:
        ids, mask = pad_batch(seqs, b, pad_id=0)
        assert ids.shape == mask.shape == (len(b.indices), b.length)
        assert ids.dtype == mask.dtype == np.int64
        for row, i in enumerate(b.indices):
            n = len(seqs[i])
            assert ids[row, :n].tolist() == seqs[i].tolist()
            assert (ids[row, n:] == 0).all()
            assert mask[row].tolist() == [1] * n + [0] * (b.length - n)
        out[list(b.indices)] = mask.sum(axis=1)  # a per-row "result", scattered back
    assert out.tolist() == [3, 2, 5]


def test_pad_batch_refuses_a_text_longer_than_its_batch() -> None:
    with pytest.raises(ValueError):
        pad_batch([np.arange(5, dtype=np.int64)], Batch((0,), 3))


def test_padding_waste_of_nothing_is_zero() -> None:
    assert padding_waste([], []) == 0.0
