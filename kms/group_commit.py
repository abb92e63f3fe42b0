"""Group commit: make appends durable with as few syncs as possible, and never acknowledge an
append before a sync that started after it has finished.

The classic database technique (the WAL writer's commit batching): each writer takes a ticket
right after its ``write`` returned and awaits :meth:`GroupCommit.durable`. One sync runs at a
time, in a worker thread (an ``fdatasync`` takes 0.2-1 ms here and must not stall the event
loop); when it finishes, every ticket issued before it started is durable. Writers that arrived
while it ran are covered by the next sync, which one of them starts. Under load a sync thus
covers a whole batch of requests, and a lone request pays one sync.

A failed sync fails its batch and every later one: after an ``fsync`` error the kernel may have
dropped the unwritten pages and a later sync could report success for data that is gone, so
the only safe answer is to stop acknowledging (PostgreSQL's "fsyncgate" lesson).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .errors import KmsError

__all__ = ["GroupCommit", "SyncFailed"]


class SyncFailed(KmsError, OSError):
    """An earlier sync failed: nothing written since can be acknowledged as durable.

    Also an :class:`OSError` (like the failed sync itself), so callers handle both alike.
    """


class GroupCommit:
    """Batches durability waits over one ``sync`` callable (e.g. ``os.fdatasync`` of a file).

    Not thread-safe: one trio event loop uses it.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._issued = 0  # tickets handed out
        self._synced = 0  # every ticket <= this is durable
        self._running: trio.Event | None = None
        self._failed: OSError | None = None
        #: Syncs run so far (a figure for tests and benchmarks).
        self.syncs = 0

    def wrote(self) -> int:
        """A ticket for a write that has just completed."""
        self._issued += 1
        return self._issued

    async def durable(self, ticket: int) -> None:
        """Return once ``ticket``'s write is durable.

        Raises:
            OSError: the sync covering it failed (or an earlier one did: :class:`SyncFailed`).
        """
        while self._synced < ticket:
            if self._failed is not None:
                raise SyncFailed(
                    self._failed.errno, f"an earlier sync failed: {self._failed}"
                ) from self._failed
            running = self._running
            if running is not None:
                await running.wait()
                continue
            done = self._running = trio.Event()
            covered = self._issued  # every write before this sync starts
            try:
                # Not cancellable (the thread runs to completion): a cancelled leader still
                # leaves the batch synced or failed, never in doubt.
                await trio.to_thread.run_sync(self._sync)
            except OSError as exc:
                self._failed = exc
                raise
            else:
                self._synced = max(self._synced, covered)
                self.syncs += 1
            finally:
                self._running = None
                done.set()
