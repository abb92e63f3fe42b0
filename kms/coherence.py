"""Several processes, one key store: who may write now, and whether this process's copy of the
key set is stale.

The service keeps the key set in memory and writes every change through the store before it
acknowledges it (:mod:`kms.service`). With worker processes each has its own copy, so two
things must hold across processes:

* a change committed by one worker is seen by the next request any worker serves (a key created
  through one is usable through another at once);
* a read-modify-write (PutKeyPolicy on the current policy, a rotation's next version number,
  an alias move) never interleaves with another worker's: writes stay serialisable.

:class:`WriteSection` is the service's write lock (``KmsService.write_lock``) made
cross-process: entering it takes the process's own trio lock, then the store's cross-process
writer lock, then reloads the key set if another process committed since this one last looked;
leaving it publishes this process's change (bumps the generation) and releases both. Requests
that only read call :meth:`WriteSection.refresh` first: one shared-memory read when nothing
changed, a reload (under the writer lock, so the snapshot is consistent) when something did.

:class:`SharedGeneration` is the local implementation of the cross-process part (the workers of
one daemon on one machine, over SQLite): an exclusive ``flock`` on ``<state>/kms.shared`` and an
8-byte change counter in that file, mapped shared (reading it costs ~0.2 us). A store shared by
several machines (PostgreSQL) implements the same :class:`StoreCoherence` protocol with the
database's own means (:class:`kms.pg.coherence.PgCoherence`: an advisory lock, a change-counter
row bumped by every write's own transaction and read before each request); the service and the
daemon do not change.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog
import trio

from transport.errors import ConfigurationError

if TYPE_CHECKING:
    from .service import KmsService

__all__ = ["SHARED_FILE", "StoreCoherence", "SharedGeneration", "WriteSection", "ConnectionShare"]

log = structlog.get_logger()

SHARED_FILE = "kms.shared"
_COUNTER = struct.Struct("<Q")
#: The mapping's size: one page (the counter uses its first 8 bytes, then one 8-byte slot per
#: worker for its connection count: 64 workers fit).
_MAP_BYTES = mmap.PAGESIZE
_LOAD_BASE = 8


class StoreCoherence(Protocol):
    """The cross-process part of a write section (see the module docstring)."""

    def generation(self) -> int:
        """The store's change counter as this process last saw it (no I/O)."""
        ...

    async def current(self) -> int:
        """The store's change counter now, read after this call began (called per request:
        shared memory for local workers, one shared round trip for a database)."""
        ...

    async def acquire(self) -> None:
        """Take the writer lock (waits for another process's write to finish); afterwards
        :meth:`generation` is current."""
        ...

    def publish(self) -> int:
        """Under the writer lock: count this section's change; returns the new generation."""
        ...

    async def release(self) -> None:
        """Release the writer lock (also when cancelled)."""
        ...

    def close(self) -> None:
        """Release what the coherence holds (idempotent)."""
        ...


class SharedGeneration:
    """:class:`StoreCoherence` for the processes of one machine (``flock`` + shared counter).

    Each process opens its own instance (its own open file description: ``flock`` excludes
    between descriptions, so one per process is what makes the lock mutual).

    Raises:
        ConfigurationError: the file cannot be opened.
    """

    def __init__(self, state_dir: Path) -> None:
        path = state_dir / SHARED_FILE
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigurationError(f"cannot open {path}: {exc.strerror}") from None
        try:
            with self.locked():
                if os.fstat(self._fd).st_size < _MAP_BYTES:
                    os.ftruncate(self._fd, _MAP_BYTES)  # zero-filled: generation 0
            self._map = mmap.mmap(self._fd, _MAP_BYTES, mmap.MAP_SHARED)
        except BaseException:
            os.close(self._fd)
            raise

    def generation(self) -> int:
        return int(_COUNTER.unpack_from(self._map, 0)[0])

    async def current(self) -> int:
        return self.generation()  # shared memory: always current

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The writer lock, blocking (start-up, tests)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    async def acquire(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the usual case: free
        except BlockingIOError:
            # Another process is committing (an fsync: milliseconds): wait in a thread.
            await trio.to_thread.run_sync(fcntl.flock, self._fd, fcntl.LOCK_EX)

    def publish(self) -> int:
        new = self.generation() + 1
        _COUNTER.pack_into(self._map, 0, new)
        return new

    async def release(self) -> None:
        self.release_now()

    def release_now(self) -> None:
        """Release the writer lock (it never blocks)."""
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def set_load(self, index: int, connections: int) -> None:
        """Publish worker ``index``'s connection count (its own slot: no lock needed)."""
        _COUNTER.pack_into(self._map, _LOAD_BASE + 8 * index, connections)

    def load(self, index: int) -> int:
        """Worker ``index``'s last published connection count."""
        return int(_COUNTER.unpack_from(self._map, _LOAD_BASE + 8 * index)[0])

    def close(self) -> None:
        """Unmap and close (idempotent)."""
        if self._fd >= 0:
            self._map.close()
            os.close(self._fd)
            self._fd = -1


class WriteSection:
    """``KmsService.write_lock`` across processes (see the module docstring).

    Args:
        service: the service whose key set this keeps current.
        shared: the cross-process lock and generation.
        seen: the generation the service's key set was loaded at (read under the writer lock).
    """

    def __init__(self, service: KmsService, shared: StoreCoherence, seen: int) -> None:
        self._service = service
        self._shared = shared
        self._seen = seen
        self._lock = trio.Lock()
        #: Reloads done because another process changed the store (tests, operators).
        self.reloads = 0

    async def __aenter__(self) -> None:
        await self._lock.acquire()
        try:
            await self._shared.acquire()
            try:
                await self._catch_up()
            except BaseException:
                await self._shared.release()
                raise
        except BaseException:
            self._lock.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        try:
            # Published whether or not the section wrote: a spurious reload elsewhere is
            # cheap, a missed one would serve a stale key set.
            self._seen = self._shared.publish()
        finally:
            try:
                await self._shared.release()
            finally:
                self._lock.release()

    def stale(self) -> bool:
        """Another process has published a change this process has not loaded."""
        return self._shared.generation() != self._seen

    async def refresh(self) -> None:
        """Bring the key set up to date if another process changed the store (a change
        committed before this call began is always seen)."""
        if await self._shared.current() == self._seen:
            return
        async with self._lock:
            await self._shared.acquire()
            try:
                await self._catch_up()
            finally:
                await self._shared.release()

    async def _catch_up(self) -> None:
        """Under both locks: reload if the generation moved."""
        current = self._shared.generation()
        if current == self._seen:
            return
        service = self._service
        snapshot = await service.write(service.storage.load)
        service.reload(snapshot)
        self._seen = current
        self.reloads += 1


class ConnectionShare:
    """Spreads kept-alive connections over the workers sharing one listening socket.

    Every worker waiting in ``accept`` is woken by a new connection and the first one to run
    takes it, so a burst of connections (clients starting together) tends to land on one
    worker, and kept-alive connections stay where they landed: measured 7 of 8 or 8 of 8 on
    one of two workers. Each worker therefore publishes its connection count, and one that
    holds more than the least loaded sibling does not accept (:meth:`wait_turn`), leaving the
    next connection to that sibling, until the sibling has caught up or :data:`MAX_DEFER_S`
    has passed: a dead or stuck sibling delays new connections by at most that much.
    """

    #: How often a deferring worker looks at its siblings' counts again.
    POLL_S = 0.001
    #: The longest a deferring worker waits before accepting anyway (a sibling that has not
    #: accepted within this is dead, being replaced, or stuck).
    MAX_DEFER_S = 0.05

    def __init__(self, shared: SharedGeneration, index: int, workers: int) -> None:
        self._shared = shared
        self._index = index
        self._others = [i for i in range(workers) if i != index]
        shared.set_load(index, 0)

    def update(self, connections: int) -> None:
        """This worker now holds ``connections``."""
        self._shared.set_load(self._index, connections)

    def over_share(self, connections: int) -> bool:
        """True if a sibling holds fewer connections than this worker's ``connections``."""
        return any(self._shared.load(i) < connections for i in self._others)

    async def wait_turn(self, connections: Callable[[], int]) -> None:
        """Before accepting: wait while this worker is over its share (at most
        :data:`MAX_DEFER_S`). ``connections`` reads this worker's current count."""
        deadline = trio.current_time() + self.MAX_DEFER_S
        # Polled: the counts change in other processes' memory, there is no event to wait on.
        while self.over_share(connections()) and trio.current_time() < deadline:  # noqa: ASYNC110
            await trio.sleep(self.POLL_S)
