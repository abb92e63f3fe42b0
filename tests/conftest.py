"""Shared test configuration. Package tests live in tests/<package>/; real-process end-to-end
tests in tests/integration/. Fixtures of general use come from the ``runtime.testing`` plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

#: ../shared beside the checkout (CI has it there too).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared is missing (expected at {SHARED})")
    return SHARED
