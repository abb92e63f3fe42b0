"""A real PostgreSQL server for the tests (registered by ``tests/kms/conftest.py``).

``pg_server`` (session): :class:`kms.pgtemp.TempPostgres`, i.e. ``initdb`` into a temporary
directory and ``postgres`` on a free loopback port, as the unprivileged ``nobody`` when the
tests run as root; stopped and removed at the end of the session. Skipped, saying why, where
PostgreSQL is not installed (``scripts/test`` installs Debian's ``postgresql`` as root).

``pg_url`` (per test): a fresh, empty database on it, its URL without a password;
``PGPASSFILE`` is set for the test (libpq, hence the daemons the test starts, read it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from kms.pgtemp import PostgresUnavailable, TempPostgres

__all__ = ["pg_server", "pg_url", "temp_postgres"]


def temp_postgres() -> TempPostgres:
    """A started throwaway server, or the test skipped naming what is missing. The caller
    cleans it up. fsync off: the tests kill daemons and the server, never the machine."""
    try:
        server = TempPostgres(fsync=False)
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TempPostgres]:
    server = temp_postgres()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_url(pg_server: TempPostgres, monkeypatch: pytest.MonkeyPatch) -> str:
    if not pg_server.running:  # a test that stopped it and failed before restarting it
        pg_server.start()
    for name, value in pg_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    assert os.environ["PGPASSFILE"] == str(pg_server.passfile)
    return pg_server.create_database(f"kms_{uuid.uuid4().hex[:12]}")
