"""Byte budgets: how many bytes of client data the inference service holds at once.

The RPC layer's flow control bounds what a client may have *in flight* on each stream; what the
service takes off a stream (requests being decoded and run, answers waiting for the client to
read them) is bounded here, in bytes, at three levels: each stream's batch, each connection and
the whole server. A :class:`ByteBudget` is a first-in-first-out counting semaphore in bytes,
optionally nested in a parent (connection -> server): acquiring takes from both, the child
first, so waits never form a cycle.

One rule keeps an item larger than the whole budget from waiting forever: it is admitted when it
is alone (nothing else held), like a request larger than an HTTP server's buffer that is still
served on its own.

Waiting is bounded too: a level admits at most ``max_waiters`` waiting acquisitions, and refuses
more at once with :class:`BudgetExhausted`. A waiter holds what it is waiting to account for
(a message already taken off the wire), so an unbounded queue of waiters would be an unbounded
amount of memory again; refusing turns overload into a prompt, retryable error instead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import trio

from models.errors import OverloadedError

__all__ = ["ByteBudget", "BudgetStatistics", "BudgetExhausted", "Lease"]


class BudgetExhausted(OverloadedError):
    """The budget is full and already has as many waiters as it admits (``resource_exhausted``
    on the wire: the client may retry)."""


@dataclass(slots=True, eq=False)
class _Waiter:
    size: int
    event: trio.Event
    granted: bool = False


@dataclass(frozen=True, slots=True)
class BudgetStatistics:
    """A budget's state: bytes held now, the most ever held, the limit and tasks waiting."""

    used: int
    peak: int
    limit: int
    waiting: int


class _Level:
    """One FIFO byte semaphore (no parent)."""

    def __init__(self, limit: int, max_waiters: int) -> None:
        if type(limit) is not int or limit < 1:
            raise ValueError(f"a byte budget must be a positive int, got {limit!r}")
        if type(max_waiters) is not int or max_waiters < 0:
            raise ValueError(f"max_waiters must be a non-negative int, got {max_waiters!r}")
        self.limit = limit
        self.max_waiters = max_waiters
        self.used = 0
        self.peak = 0
        self.waiters: deque[_Waiter] = deque()

    def fits(self, size: int) -> bool:
        return self.used + size <= self.limit or self.used == 0

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.peak:
            self.peak = self.used

    def try_acquire(self, size: int) -> bool:
        if self.waiters or not self.fits(size):
            return False
        self.take(size)
        return True

    async def acquire(self, size: int) -> None:
        if self.try_acquire(size):
            return  # no scheduling round when the bytes are there (the hot path)
        if len(self.waiters) >= self.max_waiters:
            raise BudgetExhausted(
                "the server's buffers are full (too many requests waiting for memory); retry later"
            )
        waiter = _Waiter(size, trio.Event())
        self.waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release(size)
            else:
                self.waiters.remove(waiter)
                self.grant()  # the head may have left: those behind it may fit now
            raise

    def release(self, size: int) -> None:
        self.used -= size
        if self.used < 0:
            raise AssertionError("byte budget released more than it held")
        self.grant()

    def grant(self) -> None:
        while self.waiters and self.fits(self.waiters[0].size):
            waiter = self.waiters.popleft()
            self.take(waiter.size)
            waiter.granted = True
            waiter.event.set()


class ByteBudget:
    """A FIFO counting semaphore in bytes, optionally nested in ``parent``.

    Args:
        limit: bytes that may be held at once (an item larger than this is admitted alone).
        max_waiters: acquisitions that may wait at once; more raise :class:`BudgetExhausted`.
        parent: a budget every acquisition also takes from (the server's, for a connection's).
    """

    def __init__(
        self, limit: int, *, max_waiters: int = 1 << 30, parent: ByteBudget | None = None
    ) -> None:
        self._level = _Level(limit, max_waiters)
        self.parent = parent

    @property
    def limit(self) -> int:
        return self._level.limit

    @property
    def used(self) -> int:
        return self._level.used

    def has_room(self) -> bool:
        """True if this budget and its parents are under their limits."""
        budget: ByteBudget | None = self
        while budget is not None:
            level = budget._level
            if level.used >= level.limit or level.waiters:
                return False
            budget = budget.parent
        return True

    def try_acquire(self, size: int) -> bool:
        """Take ``size`` bytes now if they fit here and in every parent (all or nothing)."""
        if not self._level.try_acquire(size):
            return False
        if self.parent is not None and not self.parent.try_acquire(size):
            self._level.release(size)
            return False
        return True

    async def acquire(self, size: int) -> None:
        """Take ``size`` bytes, waiting (first come, first served) until they fit.

        Raises:
            BudgetExhausted: no room, and this budget or a parent has its most waiters.

        Cancellation: nothing is held if this raises.
        """
        await self._level.acquire(size)
        if self.parent is not None:
            try:
                await self.parent.acquire(size)
            except BaseException:
                self._level.release(size)
                raise

    def charge(self, size: int) -> None:
        """Take ``size`` bytes without waiting, even over the limit (memory already in hand,
        such as a result: later acquisitions wait until it is released)."""
        self._level.take(size)
        if self.parent is not None:
            self.parent.charge(size)

    def release(self, size: int) -> None:
        """Give back ``size`` bytes taken by :meth:`acquire`, :meth:`try_acquire` or
        :meth:`charge`, and admit the waiters that now fit."""
        self._level.release(size)
        if self.parent is not None:
            self.parent.release(size)

    def statistics(self) -> BudgetStatistics:
        level = self._level
        return BudgetStatistics(level.used, level.peak, level.limit, len(level.waiters))

    def lease(self) -> Lease:
        """An empty :class:`Lease` on this budget."""
        return Lease(self)


class Lease:
    """Bytes one holder took from a budget, given back together by :meth:`release`."""

    __slots__ = ("_budget", "bytes")

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        #: bytes held by this lease
        self.bytes = 0

    async def acquire(self, size: int) -> None:
        await self._budget.acquire(size)
        self.bytes += size

    def charge(self, size: int) -> None:
        self._budget.charge(size)
        self.bytes += size

    def release(self) -> None:
        """Give everything back (idempotent)."""
        if self.bytes:
            size, self.bytes = self.bytes, 0
            self._budget.release(size)
