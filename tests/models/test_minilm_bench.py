"""The minilm bench's inputs are what its figures claim (the timing itself is not tested)."""

from __future__ import annotations

from runtime.bench.minilm import SHORT_SENTENCE, mixed_corpus, text_of_tokens, vm_hwm_mb
from tests.models.minilm_support import minilm_embedder


def test_sentences_have_the_token_counts_the_figures_name() -> None:
    tok = minilm_embedder().tokenizer
    short, long = tok.encode([SHORT_SENTENCE, text_of_tokens(128)])
    assert len(short) == 12
    assert len(long) == 128
    assert not long.truncated


def test_the_mix_is_deterministic_and_spans_short_to_truncated() -> None:
    corpus = mixed_corpus()
    assert corpus == mixed_corpus()
    lengths = sorted(len(t) for t in minilm_embedder().tokenizer.encode(corpus))
    assert lengths[0] < 16
    assert lengths[-1] == 256  # some documents are cut at the cap
    assert 40 < sum(lengths) / len(lengths) < 100


def test_peak_rss_reads_this_process() -> None:
    assert 10 < vm_hwm_mb() < 1 << 20
