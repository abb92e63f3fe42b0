"""``enclave train`` as a user runs it, and the baseline's reach (the benchmark's image only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.training.config import TrainConfig
from models.training.host import TRAIN_APP_DIR, build_training_image
from runtime.bench.training import bench_app

pytestmark = pytest.mark.slow


def test_enclave_train_prints_accuracy_and_the_phases() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.cli",
            "train",
            "--workers",
            "1",
            "--steps",
            "12",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["workers"] == 1
    assert result["steps"] == 12
    assert result["accuracy"] > 0.5
    for phase in ("load_s", "compute_s", "exchange_s", "checkpoint_s", "wall_s"):
        assert result[phase] >= 0
    assert result["checkpoint_s"] > 0  # 12 steps: sealed at step 10 and at the end
    assert len(result["final_checkpoint_sha384"]) == 96
    assert "Traceback" not in proc.stderr


def test_only_the_benchmarks_image_allows_the_baseline(tmp_path: Path) -> None:
    product = TrainConfig.from_file(TRAIN_APP_DIR / "train.toml")
    assert product.allow_unprotected is False
    bench = bench_app(tmp_path / "bench_app")
    assert TrainConfig.from_file(bench / "train.toml").allow_unprotected is True
    # The switch is measured: the benchmark's image is another image, and no key bound to the
    # product's PCR0 is ever released to it.
    pcr0_product = build_training_image(tmp_path / "p.eif").pcrs[0]
    pcr0_bench = build_training_image(tmp_path / "b.eif", app_dir=bench).pcrs[0]
    assert pcr0_product != pcr0_bench


def test_a_training_config_with_unknown_or_wrong_keys_is_refused(tmp_path: Path) -> None:
    from models.training import TrainingError

    for text, match in (
        ("nope = 1", "unknown"),
        ("batch = 'x'", "batch"),
        ("hidden = [0]", "hidden"),
        ("[data]\nseed = -1", "data"),
        ("batch = 0", "batch"),
    ):
        path = tmp_path / "t.toml"
        path.write_text(text + "\n")
        with pytest.raises(TrainingError, match=match):
            TrainConfig.from_file(path)
