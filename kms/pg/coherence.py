""":class:`kms.coherence.StoreCoherence` over PostgreSQL: the daemons sharing one database keep
their in-memory key sets current and serialise their writes.

Theory of operation.

* **The change counter.** ``kms_generation.gen`` is bumped by every write, in the write's own
  transaction (:mod:`kms.pg.storage`). Before each request a daemon reads it
  (:meth:`PgCoherence.current`); if it moved, the daemon reloads the key set before serving.
  A request that arrives after another daemon acknowledged a change therefore sees it: the
  read starts after the change committed. This costs one round trip per request, shared by
  the requests that arrive together (:class:`FreshRead`: a read that *started after* a request
  arrived answers every such request, like group commit). LISTEN/NOTIFY alone would be
  cheaper but not enough: a notification and a client's next request race, and a key disabled
  through one daemon must not be used through another after the disable was acknowledged.
* **The write section.** A read-modify-write (a rotation's next version, an alias move, a
  policy change on the current policy) runs under a transaction-level advisory lock taken on
  a connection of its own (its transaction stays open for the section), after catching up
  with the counter. Serialised writers see each
  other's results and resolve as AWS does one request after the other: the second
  ``CreateAlias`` of a name gets ``AlreadyExistsException``, the second ``ScheduleKeyDeletion``
  finds the key pending deletion, both rotations add a version. A daemon that dies holding the
  lock loses its session, and with it the lock; one that stalls holding it is ended by the
  server's ``idle_in_transaction_session_timeout``.
* **Compare-and-set.** The lock is not what makes writes correct: each write's transaction
  bumps the counter only if it still holds the value the section saw
  (:attr:`kms.pg.storage.PgStorage.expected`), so a write computed from a stale key set is
  rolled back (the request fails with a retryable error and the daemon reloads) even if a lock
  was lost with its connection. The transactions are SERIALIZABLE and retried on serialization
  failures, so the database orders whatever the daemons race on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import psycopg
import trio
from psycopg.rows import TupleRow

from ._connect import PgConnection
from .storage import PgStorage

__all__ = ["FreshRead", "PgCoherence", "WRITE_LOCK"]

#: Advisory lock key of the write section (unique to this purpose): "kms_writ".
WRITE_LOCK = 0x6B6D735F77726974

_Conn = psycopg.Connection[TupleRow]


class FreshRead:
    """Reads a value so that every caller gets a read that started after it called.

    One read runs at a time; callers that arrive while it runs wait for the next one, which
    the first of them starts, so concurrent callers share reads (one per batch under load,
    one per caller when idle). A failed read fails the callers it was meant for.

    Args:
        fetch: one read (async: e.g. a database round trip in a thread).
    """

    def __init__(self, fetch: Callable[[], Awaitable[int]]) -> None:
        self._fetch = fetch
        self._started = 0  # reads started so far
        self._finished = 0  # index of the last read that finished (successfully or not)
        self._value = 0
        self._error: BaseException | None = None
        self._running: trio.Event | None = None
        #: Reads done (a figure for tests and benchmarks).
        self.reads = 0

    async def read(self) -> int:
        """A value read after this call began.

        Raises:
            whatever the read raised (for every caller it was meant for).
        """
        need = self._started + 1  # a read already running started before we arrived
        while self._finished < need:
            running = self._running
            if running is not None:
                await running.wait()
                continue
            self._started += 1
            index = self._started
            done = self._running = trio.Event()
            try:
                self._value = await self._fetch()
                self._error = None
                self.reads += 1
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._finished = index
                self._running = None
                done.set()
        if self._error is not None:
            raise self._error
        return self._value


class PgCoherence:
    """The cross-process write section and change counter of one daemon process on a shared
    PostgreSQL database (see the module docstring).

    Args:
        storage: this process's store; its writes report the new counter here and carry the
            compare-and-set value from here.
        url: the database URL (two connections of its own: the lock, the counter reads).

    Raises:
        ConfigurationError: the database cannot be reached or refuses us.
    """

    def __init__(self, storage: PgStorage, url: str) -> None:
        self._storage = storage
        self._lock_db = PgConnection(url, "write-lock")
        self._poll_db = PgConnection(url, "generation")
        self._lock_db.connect()
        self._poll_db.connect()
        self._known = storage.generation()
        self._held = False
        storage.on_commit = self._committed
        self._fresh = FreshRead(self._fetch)

    @property
    def reads(self) -> int:
        """Counter reads done (tests, benchmarks)."""
        return self._fresh.reads

    def _committed(self, gen: int) -> None:
        self._known = gen
        if self._held:
            self._storage.expected = gen

    async def _fetch(self) -> int:
        return await trio.to_thread.run_sync(
            self._poll_db.run, lambda c: _one(c, "SELECT gen FROM kms_generation")
        )

    def generation(self) -> int:
        return self._known

    async def current(self) -> int:
        gen = await self._fresh.read()
        if not self._held:
            self._known = gen
        return gen

    def _lock(self, c: _Conn) -> int:
        # A transaction-level lock in a transaction left open for the section: a daemon that
        # stalls holding it (SIGSTOP, a hung host) is cut off by the server's
        # idle_in_transaction_session_timeout, which ends the session and releases the lock,
        # where a session-level lock would block every daemon's writes until it was killed.
        # The wait is bounded by lock_timeout. The counter is read by a statement of its own,
        # after the lock is granted (a statement's snapshot is taken when it starts).
        c.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        try:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            return _one(c, "SELECT gen FROM kms_generation")
        except BaseException:
            if not c.broken:
                c.execute("ROLLBACK")
            raise

    def acquire_blocking(self) -> None:
        """Take the write section's lock (blocking: start-up)."""
        gen = self._lock_db.run(self._lock)
        self._held = True
        self._known = gen
        self._storage.expected = gen

    def release_blocking(self) -> None:
        """Release the lock (blocking). A lost connection has released it already."""
        self._held = False
        self._storage.expected = None
        try:
            self._lock_db.run(lambda c: c.execute("COMMIT"))  # ends the lock's transaction
        except Exception:  # the session is gone, and its lock with it
            self._lock_db.close()

    async def acquire(self) -> None:
        await trio.to_thread.run_sync(self.acquire_blocking)

    def publish(self) -> int:
        # Our writes reported their counters (_committed): nothing to publish, the database
        # did it in each write's transaction.
        return self._known

    async def release(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.release_blocking)

    def close(self) -> None:
        """Close both connections (a held lock ends with its session)."""
        self._lock_db.close()
        self._poll_db.close()


def _one(c: _Conn, query: str) -> int:
    row = c.execute(query.encode()).fetchone()
    assert row is not None
    return int(row[0])
