"""Connections to the key store's PostgreSQL database: the URL (checked, shown without its
password), bounded waits, error mapping, and serializable transactions retried on conflicts.

Credentials. The URL may carry a password (``postgresql://user:secret@host/db``) but should
not: libpq reads ``PGPASSWORD`` or, better, a password file (``PGPASSFILE``, default
``~/.pgpass``, mode 0600), and client certificates (``sslcert``/``sslkey``). Whatever the URL
holds, the daemon shows and logs only :func:`redact` of it (user, host, port, database).

No wait is unbounded: connecting gives up after :data:`CONNECT_TIMEOUT_S`; every session sets
a ``statement_timeout`` and a ``lock_timeout`` (the server ends a statement that runs or waits
too long) and an ``idle_in_transaction_session_timeout`` (a daemon that stalls mid-transaction
does not hold its locks for ever); TCP keepalives and ``tcp_user_timeout`` end a connection to
a host that vanished. A dropped connection is replaced at the next call.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import psycopg
import psycopg.errors
import structlog
from psycopg import conninfo
from psycopg.rows import TupleRow

from transport.errors import ConfigurationError

from ..config import redact_url
from ..storage import StoreUnavailable

__all__ = [
    "CONNECT_TIMEOUT_S",
    "STATEMENT_TIMEOUT_S",
    "MAX_ATTEMPTS",
    "PgConnection",
    "check_url",
    "is_postgres_url",
    "redact",
]

log = structlog.get_logger()

_T = TypeVar("_T")

#: Connecting (TCP, TLS, authentication) gives up after this.
CONNECT_TIMEOUT_S = 5
#: The server cancels a statement running longer, or waiting longer for a lock, than this.
STATEMENT_TIMEOUT_S = 10.0
#: A session idle inside a transaction this long is ended by the server.
_IDLE_IN_TX_S = 30.0
#: Unacknowledged data on a connection for this long ends it (a vanished host).
_TCP_USER_TIMEOUT_MS = 10_000
#: Serializable transactions are tried this many times (the first + retries) before the call
#: fails with a retryable error: conflicts are rare (writers hold the write section), so a
#: streak this long means a storm the client should back off from.
MAX_ATTEMPTS = 8
#: Backoff between attempts: uniform in [0, base * 2**n], capped (full jitter).
_BACKOFF_BASE_S = 0.002
_BACKOFF_CAP_S = 0.2
#: SQLSTATEs worth retrying as a whole transaction: serialization_failure, deadlock_detected.
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})
#: SQLSTATEs that mean "too slow": query_canceled (statement_timeout), lock_not_available.
_TIMEOUT_SQLSTATES = frozenset({"57014", "55P03"})
_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(text: str) -> bool:
    """True if ``text`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return text.startswith(_SCHEMES)


def redact(url: str) -> str:
    """``url`` without its password: what may be shown and logged."""
    return redact_url(url)


def check_url(url: str) -> str:
    """Validate a ``--storage`` URL before anything connects.

    Raises:
        ConfigurationError: not a postgresql:// URL, or libpq cannot parse it (the message
            shows it redacted).
    """
    if not is_postgres_url(url):
        raise ConfigurationError(
            f"--storage must be sqlite (the default) or a postgresql:// URL, got {redact(url)!r}"
        )
    try:
        conninfo.conninfo_to_dict(url)
        urlsplit(url).port  # noqa: B018 - raises ValueError on a bad port
    except (psycopg.ProgrammingError, ValueError) as exc:
        reason = str(exc).replace(url, redact(url)).splitlines()[0] if str(exc) else "bad URL"
        raise ConfigurationError(f"bad --storage URL {redact(url)!r}: {reason}") from None
    return url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # libpq prefixes "connection failed: connection to server at ... failed: "; the last part
    # is the reason (password authentication failed, Connection refused...).
    line = text.splitlines()[0] if text else type(exc).__name__
    return line


class PgConnection:
    """One database connection used by one thread at a time, reconnected when dropped.

    Args:
        url: the database URL (libpq syntax).
        purpose: shown as ``application_name`` (``enclave-kms:<purpose>``) in the server's
            ``pg_stat_activity``.
        serializable: transactions default to SERIALIZABLE (the key store) rather than READ
            COMMITTED (the audit chain, which locks its head row instead).
        synchronous_commit: False = commits return before the WAL is flushed (``audit_fsync =
            false``: a crash of the database server may lose the last commits).
    """

    def __init__(
        self,
        url: str,
        purpose: str,
        *,
        serializable: bool = False,
        synchronous_commit: bool = True,
    ) -> None:
        self.url = url
        self.shown = redact(url)
        self._purpose = purpose
        self._serializable = serializable
        self._synchronous_commit = synchronous_commit
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._guard = threading.Lock()  # one thread at a time (libpq connections are not shared)

    def _open(self) -> psycopg.Connection[TupleRow]:
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name=f"enclave-kms:{self._purpose}",
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
                tcp_user_timeout=_TCP_USER_TIMEOUT_MS,
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(
                f"cannot connect to the key store {self.shown}: {_first_line(exc)}"
            ) from None
        try:
            ms = int(STATEMENT_TIMEOUT_S * 1000)
            conn.execute(f"SET statement_timeout = {ms}")
            conn.execute(f"SET lock_timeout = {ms}")
            conn.execute(f"SET idle_in_transaction_session_timeout = {int(_IDLE_IN_TX_S * 1000)}")
            level = "serializable" if self._serializable else "read committed"
            conn.execute(f"SET default_transaction_isolation = '{level}'")
            if not self._synchronous_commit:
                conn.execute("SET synchronous_commit = off")
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(
                f"the key store {self.shown} refused the session settings: {_first_line(exc)}"
            ) from None
        return conn

    def connect(self) -> None:
        """Connect now (start-up: a bad URL, a server down or a wrong password is reported
        before the daemon serves).

        Raises:
            ConfigurationError: the database cannot be reached or refuses us.
        """
        with self._guard:
            if self._conn is None:
                try:
                    self._conn = self._open()
                except StoreUnavailable as exc:
                    raise ConfigurationError(str(exc)) from None

    def run(self, fn: Callable[[psycopg.Connection[TupleRow]], _T]) -> _T:
        """``fn(connection)`` once (reconnecting first if needed); blocking.

        Raises:
            StoreUnavailable: the database is unreachable, the connection broke, or a
                statement or lock wait timed out.
        """
        with self._guard:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._discard()
                self._conn = self._open()
            conn = self._conn
            try:
                return fn(conn)
            except psycopg.OperationalError as exc:
                sqlstate = exc.sqlstate or ""
                if sqlstate in _TIMEOUT_SQLSTATES:
                    raise StoreUnavailable(
                        f"the key store {self.shown} timed out: {_first_line(exc)}", timeout=True
                    ) from None
                if sqlstate in _RETRY_SQLSTATES:
                    raise
                self._discard()
                raise StoreUnavailable(
                    f"lost the key store {self.shown}: {_first_line(exc)}"
                ) from None
            except psycopg.InterfaceError as exc:  # used after the server closed it
                self._discard()
                raise StoreUnavailable(
                    f"lost the key store {self.shown}: {_first_line(exc)}"
                ) from None

    def transact(
        self,
        fn: Callable[[psycopg.Connection[TupleRow]], _T],
        *,
        what: str,
        attempts: int = MAX_ATTEMPTS,
    ) -> _T:
        """``fn(connection)`` inside one transaction (the connection's isolation level),
        retried as a whole on a serialization failure or deadlock, with jittered exponential
        backoff, at most ``attempts`` times. ``fn`` must be safe to run again (it only issues
        statements: the rolled-back attempt left nothing).

        Raises:
            StoreUnavailable: as :meth:`run`, or every attempt conflicted (``timeout``).
        """

        def once(conn: psycopg.Connection[TupleRow]) -> _T:
            with conn.transaction():
                return fn(conn)

        for attempt in range(attempts):
            try:
                return self.run(once)
            except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as exc:
                log.info(
                    "kms_store_retry",
                    what=what,
                    attempt=attempt + 1,
                    sqlstate=exc.sqlstate,
                )
                if attempt + 1 < attempts:
                    time.sleep(random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempt)))
        raise StoreUnavailable(
            f"{what}: {attempts} attempts conflicted with concurrent writers", timeout=True
        )

    def cancel(self) -> None:
        """Ask the server to cancel what this connection runs (thread-safe: PQcancel)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                conn.cancel_safe(timeout=2.0)
            except psycopg.Error:
                pass

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._guard:
            self._discard()
