"""tests/test_public_signatures.py, when this process runs the compiled cores (transport.accel):
they have no source and no annotations to check, so the checks run in a child process on the
interpreted source of the same tree (the compiled modules are built from exactly that source:
their stamp holds its digest)."""

from __future__ import annotations

import pytest

from tests.interpreted import run_pytest_interpreted
from transport import accel


@pytest.mark.skipif(
    not accel.status().compiled,
    reason="the cores are interpreted here: test_public_signatures.py ran in this process",
)
def test_public_signatures_on_the_interpreted_source() -> None:
    run = run_pytest_interpreted("tests/test_public_signatures.py")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
    assert "skipped" not in run.stdout
