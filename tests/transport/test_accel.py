"""The compiled sans-IO cores (transport/accel.py): used only when the build matches this very
tree, and the interpreted cores keep passing their own tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import transport.channel._connection
import transport.rpc._core
from tests.interpreted import run_pytest_interpreted
from transport import accel

ROOT = Path(__file__).resolve().parents[2]


def _fake_build(directory: Path, *, digest: str, root: str, with_files: bool = True) -> None:
    directory.mkdir(parents=True)
    modules = {}
    for name, rel in accel.COMPILED_MODULES:
        so = Path(rel).with_suffix(".so")
        modules[name] = so.as_posix()
        if with_files:
            (directory / so).parent.mkdir(parents=True, exist_ok=True)
            (directory / so).write_bytes(b"not really a shared object")
    stamp = {"digest": digest, "source_root": root, "modules": modules}
    (directory / accel.STAMP_NAME).write_text(json.dumps(stamp))


def test_a_build_is_used_only_if_it_matches_this_tree(tmp_path: Path) -> None:
    here = str(ROOT)
    digest = accel.source_digest()

    files, detail = accel.check_build(tmp_path / "none")
    assert files is None
    assert "not built" in detail

    _fake_build(tmp_path / "foreign", digest=digest, root="/somewhere/else")
    files, detail = accel.check_build(tmp_path / "foreign")
    assert files is None
    assert "not this tree" in detail

    _fake_build(tmp_path / "stale", digest="0" * 64, root=here)
    files, detail = accel.check_build(tmp_path / "stale")
    assert files is None
    assert "stale" in detail

    _fake_build(tmp_path / "partial", digest=digest, root=here, with_files=False)
    files, detail = accel.check_build(tmp_path / "partial")
    assert files is None
    assert "incomplete" in detail

    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / accel.STAMP_NAME).write_text("{not json")
    files, detail = accel.check_build(tmp_path / "garbled")
    assert files is None
    assert "unreadable" in detail

    _fake_build(tmp_path / "good", digest=digest, root=here)
    files, detail = accel.check_build(tmp_path / "good")
    assert files is not None
    assert set(files) == {name for name, _ in accel.COMPILED_MODULES}


def test_the_digest_follows_every_transport_source(tmp_path: Path) -> None:
    """Any edit under transport/ (not only the compiled modules: they may inline constants from
    the others) makes the build stale."""
    (tmp_path / "transport" / "rpc").mkdir(parents=True)
    source = tmp_path / "transport" / "rpc" / "_stream.py"
    source.write_text("X = 1\n")
    before = accel.source_digest(tmp_path)
    source.write_text("X = 2\n")
    assert accel.source_digest(tmp_path) != before


def test_this_process_runs_the_compiled_cores_when_they_are_built() -> None:
    """scripts/test builds them (scripts/build_accel.py); then the whole suite runs on them."""
    status = accel.status()
    if not status.compiled:
        pytest.skip(f"compiled cores not in use: {status.detail}")
    for module in (transport.rpc._core, transport.channel._connection):
        assert module.__file__ is not None
        assert module.__file__.endswith(".so")


def test_the_interpreted_cores_pass_the_core_tests() -> None:
    """The same core tests, in a process that runs the interpreted modules."""
    env = dict(os.environ, **{accel.DISABLE_ENV: "1"})
    check = subprocess.run(
        [sys.executable, "-c", "import transport.rpc._core as c; print(c.__file__)"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.stdout.strip().endswith("_core.py"), check.stderr
    run = run_pytest_interpreted(
        "tests/transport/test_rpc_core.py", "tests/transport/test_channel_core.py"
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
