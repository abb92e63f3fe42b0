"""Run pytest in a child process on the interpreted sans-IO cores (transport.accel off): for
tests that must see the Python source even when this process runs the compiled cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from transport import accel

ROOT = Path(__file__).resolve().parents[1]


def run_pytest_interpreted(*paths: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m pytest -q PATHS`` from the repository root with ``ENCLAVE_PURE_PYTHON=1``."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths],
        env=dict(os.environ, **{accel.DISABLE_ENV: "1"}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
