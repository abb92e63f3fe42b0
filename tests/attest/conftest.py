from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from attest.ca import LocalCA

from .helpers import T0, Chain, build_chain


@pytest.fixture(scope="session")
def chain() -> Chain:
    """A Nitro-shaped 5-certificate chain valid T0-1h … T0+3h."""
    return build_chain()


@pytest.fixture(scope="session")
def other_chain() -> Chain:
    return build_chain(tag="other")


@pytest.fixture
def local_ca(tmp_path: Path) -> LocalCA:
    return LocalCA.load_or_create(tmp_path / "ca", clock=lambda: T0.timestamp())


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    """Undo logging set up by CLI tests elsewhere (it may point at a closed capture stream)."""
    structlog.reset_defaults()
