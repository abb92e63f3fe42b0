"""Runtime tests: CLI-started enclaves live in a host daemon per state directory; here it
leaves one second after its last enclave and client (not the default 30 s), so tests do not
leave daemons and zygotes behind."""

from __future__ import annotations

import pytest

from runtime.host import LINGER_ENV


@pytest.fixture(autouse=True)
def _short_host_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LINGER_ENV, "1")
