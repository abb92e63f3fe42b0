"""pytest plugin (registered through the ``pytest11`` entry point): fixtures for tests of code
built on enclave-runtime.

Fixtures:
    enclave_state_dir: a private, empty state directory for the test, also exported as
        ``ENCLAVE_STATE_DIR`` so CLI invocations and daemons started by the test use it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from transport.paths import STATE_DIR_ENV, ensure_private_dir


@pytest.fixture
def enclave_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state directory (mode 0700) exported as ``ENCLAVE_STATE_DIR``."""
    state = ensure_private_dir(tmp_path / "state")
    monkeypatch.setenv(STATE_DIR_ENV, str(state))
    return state
