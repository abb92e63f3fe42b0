"""Fixtures shared by the transport tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def fabric_dir() -> Iterator[Path]:
    """A fresh, not yet existing fabric directory, removed afterwards.

    Short on purpose (under /tmp, not pytest's tmp_path): a Unix socket path holds at most 107
    bytes, and the fabric puts socket files two levels below this directory.
    """
    base = Path(tempfile.mkdtemp(prefix="vs", dir="/tmp"))
    try:
        yield base / "fabric"
    finally:
        shutil.rmtree(base, ignore_errors=True)
