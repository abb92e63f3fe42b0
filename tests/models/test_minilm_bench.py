"""The minilm bench's inputs are what its figures claim (the timing itself is not tested)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from runtime.bench.minilm import (
    SHORT_SENTENCE,
    _schedstat,
    _task_schedstats,
    mixed_corpus,
    text_of_tokens,
    vm_hwm_mb,
)
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


def test_schedstat_sums_cpu_and_run_queue_time_of_threads(tmp_path: Path) -> None:
    own = ["/proc/thread-self/schedstat"]
    run0, wait0 = _schedstat(own)
    deadline = time.thread_time() + 0.02
    while time.thread_time() < deadline:  # 20 ms of CPU in this thread
        pass
    run1, wait1 = _schedstat(own)
    assert run1 - run0 >= 15_000_000  # ns; the kernel's clock, not a sample
    assert wait1 >= wait0
    # A thread that ended between listing and reading counts as nothing.
    assert _schedstat([str(tmp_path / "gone")]) == (0, 0)
    assert len(_task_schedstats(os.getpid())) >= 1
