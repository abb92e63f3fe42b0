"""Group commit: make appends durable with as few syncs as possible, and never acknowledge an
append before a sync that started after it has finished.

The classic database technique (the WAL writer's commit batching): each writer takes a ticket
right after its ``write`` returned and awaits :meth:`GroupCommit.durable`. One sync runs at a
time; when it finishes, every ticket issued before it started is durable. Writers that arrived
while it ran are covered by the next sync, which one of them starts. Under load a sync thus
covers a whole batch of requests, and a lone request pays one sync.

Where the sync runs (``inline_max_s``). In a worker thread, the event loop keeps serving while
the disk works, but the hand-off to and from the thread costs ~0.4 ms on this project's VMs
(reference/perf-baseline.md), twice what an ``fdatasync`` of an audit line takes on a healthy
disk (~0.2 ms). So while syncs stay fast they run inline, in the event loop, the way a model
that runs in under a millisecond is run inline (models.engine): the loop stops for the sync,
but every request waiting on it would have waited anyway. Before an inline sync the leader
yields once, so that the writers that are ready write first and share it. (Sending the sync to
the thread whenever some other task is ready to run, so that its work overlaps the disk's, was
tried: trio's current batch of runnable tasks is not visible, so the rule held only half the
time, and no throughput difference showed.) A sync slower than
``inline_max_s`` (a busy or failing disk; measured as an average, and any one sync over four
times the limit counts at once) moves the syncs to the worker thread, so a slow disk never
stops the loop for long; they come back inline once the thread measures them fast again.

A failed sync fails its batch and every later one: after an ``fsync`` error the kernel may have
dropped the unwritten pages and a later sync could report success for data that is gone, so
the only safe answer is to stop acknowledging (PostgreSQL's "fsyncgate" lesson).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import trio

from .errors import KmsError

__all__ = ["GroupCommit", "SyncFailed"]


class SyncFailed(KmsError, OSError):
    """An earlier sync failed: nothing written since can be acknowledged as durable.

    Also an :class:`OSError` (like the failed sync itself), so callers handle both alike.
    """


#: Weight of the newest sync in the running average of sync times.
_EWMA_ALPHA: Final = 0.2


class GroupCommit:
    """Batches durability waits over one ``sync`` callable (e.g. ``os.fdatasync`` of a file).

    Args:
        sync: makes every completed write durable; raises OSError on failure.
        inline_max_s: run the sync in the event loop while it takes at most this long on
            average (module docstring); 0 runs every sync in a worker thread.
        clock: seconds, for timing syncs (tests pass a fake one).

    Not thread-safe: one trio event loop uses it.
    """

    def __init__(
        self,
        sync: Callable[[], None],
        *,
        inline_max_s: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if inline_max_s < 0:
            raise ValueError("inline_max_s must be >= 0")
        self._sync = sync
        self._inline_max_s = inline_max_s
        self._clock = clock
        self._issued = 0  # tickets handed out
        self._synced = 0  # every ticket <= this is durable
        self._running: trio.Event | None = None
        self._failed: OSError | None = None
        self._average_s = 0.0  # running average of sync times
        self._inline = inline_max_s > 0
        #: Syncs run so far, and how many of them ran inline (figures for tests and benches).
        self.syncs = 0
        self.inline_syncs = 0

    @property
    def inline(self) -> bool:
        """True while syncs run in the event loop (see the module docstring)."""
        return self._inline

    def _timed_sync(self) -> float:
        start = self._clock()
        self._sync()
        return self._clock() - start

    def _observe(self, elapsed: float) -> None:
        limit = self._inline_max_s
        if not limit:
            return
        self._average_s += _EWMA_ALPHA * (elapsed - self._average_s)
        if self._inline:
            if self._average_s > limit or elapsed > 4 * limit:
                self._inline = False  # a slow disk: keep the loop serving while it works
        elif self._average_s <= limit / 2:
            self._inline = True  # fast again (with hysteresis, so it does not flap)

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
            try:
                # Not cancellable either way (the thread runs to completion; the inline sync
                # blocks): a cancelled leader still leaves the batch synced or failed, never
                # in doubt.
                if self._inline:
                    # Writers that are ready now write first and share this sync.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    covered = self._issued  # every write before this sync starts
                    elapsed = self._timed_sync()
                    self.inline_syncs += 1
                else:
                    covered = self._issued
                    elapsed = await trio.to_thread.run_sync(self._timed_sync)
            except OSError as exc:
                self._failed = exc
                raise
            else:
                self._synced = max(self._synced, covered)
                self.syncs += 1
                self._observe(elapsed)
            finally:
                self._running = None
                done.set()
