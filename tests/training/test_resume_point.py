"""Which checkpoint a run resumes from after a lost member: only those it wrote itself (or
the one it started from), never one another run left on the host."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from models.training.config import TrainConfig
from models.training.host import Coordinator, Training


def _training(outputs: Path) -> Training:
    stack: Any = None  # _resume_point reads the outputs directory only
    return Training(stack, TrainConfig(), Coordinator(), [], outputs, b"")


def test_a_checkpoint_left_by_another_run_is_not_resumed_from(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        (tmp_path / f"ckpt-{step:08d}").write_bytes(b"an earlier run's")
    (tmp_path / "plain-ckpt-00000040").write_bytes(b"the baseline's")
    training = _training(tmp_path)
    before = training.checkpoints()
    assert sorted(before) == [10, 20, 30]
    # This run (from step 0) rewrote step 10, then lost a member before step 20.
    os.utime(tmp_path / "ckpt-00000010", ns=(1, before[10] + 1_000_000))
    assert training._resume_point(before, 0, 400, True) == 10
    # A run that started from step 20 may go back to it, not to 30.
    assert training._resume_point(before, 20, 400, True) == 20
    # Nothing written yet: from the start.
    assert training._resume_point(training.checkpoints(), 0, 400, True) == 0
    assert list(training.checkpoints(protected=False)) == [40]
