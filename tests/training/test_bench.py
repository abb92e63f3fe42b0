"""``enclave bench training`` end to end, shortened: every figure is measured, and the
protected run and its unprotected baseline end with the same accuracy and the same weights,
bit for bit. Budgets are reported by ``enclave bench``, never asserted here (shared machine)."""

from __future__ import annotations

import pytest
import trio

from runtime.bench import training

pytestmark = pytest.mark.slow


async def test_a_short_training_bench_measures_every_figure() -> None:
    with trio.fail_after(300):
        figures = await training.measure(reps=1, steps=12, scaling_steps=0, scaling_reps=0)
    for phase in ("load", "compute", "exchange", "checkpoint", "total"):
        assert figures[f"{phase}_s"] > 0
        assert figures[f"{phase}_s_unprotected"] > 0
        # one repetition: the median of one pair is that pair's ratio
        assert figures[f"{phase}_ratio"] == pytest.approx(
            figures[f"{phase}_s"] / figures[f"{phase}_s_unprotected"]
        )
    assert figures["key_release_s"] > 0
    assert figures["key_release_s_unprotected"] == 0  # the baseline asks KMS nothing
    assert figures["accuracy_protected"] == figures["accuracy_unprotected"]
    assert figures["weights_identical"] == 1
