"""Scheduling primitives that pay for themselves on this project's hot paths, each measured.

Everything here could be written with plain trio primitives (``trio.Event``, a reader task and a
memory channel, ``nursery.start_soon`` per job); each class below exists because the plain way
cost measurably more on the paths that carry every RPC call and every fabric request. Figures
from the project's 2-vCPU VM (trio 0.35, CPython 3.11), shared with other work:

======================  ================================  ==========================  ============
primitive               replaces                          plain / here                where
======================  ================================  ==========================  ============
:class:`Parker`         ``trio.Event`` per wait           8.1 / 7.2 µs per wake pair  RPC streams
:class:`LeaderFollower` a dedicated reader task that      159-166 / 143-152 µs per    RPC client,
                        wakes the waiter (a task hop)     RPC call (channel, two      fabric client
                                                          processes, three runs)
:class:`TaskPool`       ``start_soon`` + ``CancelScope``  14.1 / 8.4 µs per job       RPC server
======================  ================================  ==========================  ============

All of them use ``trio.lowlevel`` (``wait_task_rescheduled`` / ``reschedule``) in this module
only; callers never touch it. None of them is thread-safe (trio objects, one run).
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

import outcome
import trio

__all__ = ["Parker", "LeaderFollower", "TaskPool"]

_T = TypeVar("_T")


class Parker:
    """A spot where one task waits until another wakes it.

    Like a ``trio.Event`` that resets itself: :meth:`park` blocks until :meth:`unpark` (a wake
    that comes while nobody is parked is *not* remembered, so callers re-check their condition
    in a loop, as with a condition variable). It allocates nothing per wait and a wake is one
    ``reschedule``.

    Raises:
        trio.BusyResourceError: from :meth:`park`, if another task is already parked here.
    """

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    @property
    def parked(self) -> bool:
        """True while a task is parked here."""
        return self._task is not None

    async def park(self) -> None:
        """Block until :meth:`unpark` is called (cancellable; a cancelled park just returns
        by raising ``trio.Cancelled``)."""
        if self._task is not None:
            raise trio.BusyResourceError("another task is already parked here")
        self._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def unpark(self) -> bool:
        """Wake the parked task, if any. Returns True if a task was woken."""
        task = self._task
        if task is None:
            return False
        self._task = None
        trio.lowlevel.reschedule(task)
        return True


#: ``LeaderFollower`` holder value while its background task leads.
_BACKGROUND: Final = object()


class LeaderFollower:
    """Leader/follower: the tasks that wait for the results of one serial piece of work take
    turns doing that work themselves, so a result needs no hop through a worker task.

    ``step`` is one unit of the shared work: read what a socket has and file every message
    where it belongs (an RPC reply for the task that waits for it, a fabric reply for its
    request...), or run one batch of queued requests. ``step`` wakes the :class:`Parker` of each
    waiter it satisfied (``parker.unpark()``). A task that needs a result calls
    :meth:`wait_until` with its own condition:

    * nobody is running ``step`` (the role is free): the task becomes the **leader** and runs
      ``step`` until its condition holds; then it hands the role to one parked follower, which
      leads next (or the role becomes free);
    * someone leads: the task parks as a **follower** until its parker is woken, either because
      ``step`` satisfied it or because the role was handed to it, and checks again.

    With a single waiter (a unary RPC call) the reply is read by the caller itself: one task
    switch fewer per result than a reader task that wakes the caller.

    Background leader (optional, :meth:`run_background`): a task that runs ``step`` when no
    waiter does, for input nobody waits for (an RPC client's pings, grants and the peer's
    end-of-file, so that a peer blocked writing to us is always drained). A waiter that arrives
    while it leads interrupts its step (``step`` must then be cancellation-safe: trio's
    ``SocketStream.receive_some`` and ``SecureChannel.receive_some`` are) and takes over. To
    avoid a wake-up per result, the background task is not woken when a leader leaves: it
    looks again after ``idle_period`` seconds (doubling up to ``idle_period_max`` while one
    leader keeps the role), or at once after :meth:`request_step`.

    Interruptible leaders (``interruptible=True``): each lead runs inside a cancel scope that
    :meth:`interrupt` cancels, so a leader blocked in ``step`` re-checks its condition (used when
    something other than ``step`` can satisfy it, such as closing a listener). It costs a cancel
    scope per lead, so it is off by default.

    :meth:`close` ends it all: waiters return (their condition may still be false; they check
    why), the background task returns, and no one leads again.

    Args:
        step: the unit of work; must not raise except for cancellation (record failures and
            call :meth:`close`).
        interruptible: see above.
        idle_period / idle_period_max: the background task's polling periods (seconds).
    """

    def __init__(
        self,
        step: Callable[[], Awaitable[object]],
        *,
        interruptible: bool = False,
        idle_period: float = 0.002,
        idle_period_max: float = 0.128,
    ) -> None:
        if not 0 < idle_period <= idle_period_max:
            raise ValueError("need 0 < idle_period <= idle_period_max")
        self._step = step
        self._interruptible = interruptible
        self._idle_period = idle_period
        self._idle_period_max = idle_period_max
        self._leader: object | None = None  # a leading task's Parker, _BACKGROUND, or None
        self._followers: dict[Parker, None] = {}  # parked in wait_until, in arrival order
        self._scope: trio.CancelScope | None = None  # the current lead's (see interrupt)
        self._closed = False
        self._leads = 0  # bumped on every foreground lead (the background task watches it)
        self._urgent = False
        self._period = idle_period
        self._background = Parker()

    @property
    def leading(self) -> bool:
        """True while some task (foreground or background) runs ``step``."""
        return self._leader is not None

    @property
    def background_leading(self) -> bool:
        """True while the background task runs ``step``."""
        return self._leader is _BACKGROUND

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    async def wait_until(self, ready: Callable[[], bool], parker: Parker | None = None) -> None:
        """Return once ``ready()`` is true (or after :meth:`close`), leading when nobody does.

        Args:
            ready: the caller's condition; checked before and after every wake-up.
            parker: where this task parks as a follower; whoever satisfies ``ready`` wakes it.
                A fresh one is used if omitted (then only a handover wakes it).

        Raises:
            trio.BusyResourceError: another task is parked on ``parker``.
        """
        while not ready() and not self._closed:
            if self._leader is None:
                # Lead (inline, not a helper coroutine: this is every RPC call's path).
                self._leader = ready
                self._leads += 1
                try:
                    if self._interruptible:
                        while not ready() and not self._closed:
                            with trio.CancelScope() as self._scope:
                                while not ready() and not self._closed:
                                    await self._step()
                    else:
                        # The loop condition was just checked: step first (one ready() call
                        # fewer per lead, which is one per RPC call).
                        step = self._step
                        await step()
                        while not ready() and not self._closed:
                            await step()
                finally:
                    self._scope = None
                    self._leader = None
                    if self._followers or self._urgent or self._period > self._idle_period:
                        self._hand_over()
                return
            if parker is None:
                parker = Parker()
            if self._leader is _BACKGROUND and self._scope is not None:
                self._scope.cancel()  # it hands the role over as it unwinds
            self._followers[parker] = None
            try:
                await parker.park()
            finally:
                del self._followers[parker]
        if self._leader is None and self._followers:
            # Woken with our result while the role is free: someone else must lead.
            self._hand_over()

    def _hand_over(self) -> None:
        """The role is free: wake one parked follower (it leads, or passes it on)."""
        if self._closed:
            return
        for parker in self._followers:
            if parker.unpark():
                return
        if self._urgent or self._period > self._idle_period:
            # Someone asked for a reader, or the background task backed off during a long
            # lead and would be slow to notice: wake it now.
            self._background.unpark()

    def wake_all(self) -> None:
        """Wake every parked follower to re-check its condition (for waiters that share no
        parker with the code that satisfies them)."""
        for parker in list(self._followers):
            parker.unpark()

    def interrupt(self) -> None:
        """Cancel the step in progress, if the leader is interruptible (or the background
        task): the leader re-checks its condition and carries on if it still needs to."""
        if self._scope is not None:
            self._scope.cancel()

    def request_step(self) -> None:
        """Ask for ``step`` to run soon even if no waiter needs it (for example, a sender
        waits for credit that only input can bring): wakes the background task if the role
        is free."""
        self._urgent = True
        if self._leader is None:
            self._background.unpark()

    def close(self) -> None:
        """End it: wake every waiter and the background task; nobody leads any more."""
        if self._closed:
            return
        self._closed = True
        for parker in list(self._followers):
            parker.unpark()
        self._background.unpark()
        if self._scope is not None and self._leader is _BACKGROUND:
            self._scope.cancel()

    async def run_background(self) -> None:
        """Run ``step`` whenever no waiter does, until :meth:`close` (see the class doc)."""
        seen = self._leads
        last_leader: object | None = None
        while not self._closed:
            if self._leader is None and not self._followers:
                if self._leads == seen or self._urgent:
                    self._urgent = False
                    self._leader = _BACKGROUND
                    try:
                        with trio.CancelScope() as self._scope:
                            await self._step()
                    finally:
                        self._scope = None
                        self._leader = None
                    continue
            elif self._leader is None:
                self._hand_over()  # followers parked and nobody leads: one of them leads
            # Waiters were active since we last looked (or one leads): they do the work
            # themselves. Look again after an idle period, or when woken (request_step).
            seen = self._leads
            if self._leader is not None and self._leader is last_leader:
                self._period = min(self._period * 2, self._idle_period_max)
            else:
                self._period = self._idle_period
            last_leader = self._leader
            with trio.move_on_after(self._period):
                await self._background.park()


class TaskPool(Generic[_T]):
    """Run jobs in reusable tasks: a task whose job finished parks, and the next job is handed
    to it with one ``reschedule`` instead of spawning a task and entering a cancel scope.

    Each worker task runs ``run(job, scope)`` for its jobs one after the other under a cancel
    scope it keeps while nobody cancels it; ``run`` may cancel ``scope`` to abort the job (the
    worker then takes its next job under a fresh scope). Each job starts in a fresh copy of the
    context of the task that called :meth:`start` (as with ``start_soon``): context variables a
    previous job set do not leak into the next.

    Args:
        nursery: where worker tasks run; cancelling it ends parked and running workers.
        run: the job function.

    Resource handling:
        At most as many workers exist as jobs ran at once; parked workers cost a task each.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        run: Callable[[_T, trio.CancelScope], Awaitable[None]],
    ) -> None:
        self._nursery = nursery
        self._run = run
        self._idle: list[trio.lowlevel.Task] = []
        self._closed = False

    @property
    def idle_workers(self) -> int:
        """Workers parked, waiting for a job."""
        return len(self._idle)

    def start(self, job: _T) -> None:
        """Run ``job`` in a parked worker, or in a new one if none is parked."""
        if self._closed:
            raise RuntimeError("the TaskPool is closed")
        if self._idle:
            worker = self._idle.pop()
            # What start_soon would do: the job runs in a copy of the caller's context.
            worker.context = contextvars.copy_context()
            trio.lowlevel.reschedule(worker, outcome.Value(job))
        else:
            self._nursery.start_soon(self._worker, job)

    def close(self) -> None:
        """Stop taking jobs; parked workers exit (running ones finish their job first)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for worker in idle:
            trio.lowlevel.reschedule(worker, outcome.Value(None))

    async def _worker(self, job: _T | None) -> None:
        while job is not None:
            with trio.CancelScope() as scope:
                while job is not None:
                    await self._run(job, scope)
                    if scope.cancel_called:
                        break  # this scope is spent: take the next job under a fresh one
                    job = await self._next_job()
            if job is not None:
                job = await self._next_job()

    async def _next_job(self) -> _T | None:
        if self._closed:
            return None
        task = trio.lowlevel.current_task()
        self._idle.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._idle.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        job: _T | None = await trio.lowlevel.wait_task_rescheduled(abort)
        return job
