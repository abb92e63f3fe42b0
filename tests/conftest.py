"""Shared test configuration. Package tests live in tests/<package>/; real-process end-to-end
tests in tests/integration/. Fixtures of general use come from the ``runtime.testing`` plugin."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

# Cached loggers escape structlog.testing.capture_logs: a test that runs the CLI (which
# configures logging for its "process") must not freeze every logger for the tests after it.
os.environ["ENCLAVE_LOG_CACHE"] = "0"

# A suite started in the background by a non-interactive shell (``./scripts/test &``, CI
# wrappers) inherits SIGINT *ignored*, and every CLI child it starts would inherit that too: the
# Ctrl-C tests would then see a child that cannot be interrupted (a handshake timeout after 10 s,
# a console that never detaches). Put Python's handler back; children exec with SIG_DFL.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: ../shared beside the checkout (CI has it there too).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared is missing (expected at {SHARED})")
    return SHARED


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Each test starts from structlog's defaults, whatever the previous test configured."""
    yield
    structlog.reset_defaults()
