"""The scheduling primitives of transport.sync: Parker, LeaderFollower, TaskPool.

Each is used on a hot path (RPC calls, fabric requests, RPC handlers); these tests pin the
behaviour the users rely on, independently of them.
"""

from __future__ import annotations

import contextvars
from collections import deque

import pytest
import trio
import trio.testing

from transport.sync import LeaderFollower, Parker, TaskPool

TIMEOUT_S = 5


# ---------------------------------------------------------------------------- Parker


async def test_parker_wakes_the_parked_task_and_forgets_early_wakes() -> None:
    parker = Parker()
    assert not parker.unpark()  # nobody parked: the wake is not remembered
    woken: list[str] = []
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:

            async def sleeper() -> None:
                await parker.park()
                woken.append("yes")

            nursery.start_soon(sleeper)
            await trio.testing.wait_all_tasks_blocked()
            assert parker.parked
            assert parker.unpark()
        assert woken == ["yes"]
        assert not parker.parked


async def test_parker_is_one_task_at_a_time_and_cancellable() -> None:
    parker = Parker()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parker.park)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await parker.park()
            nursery.cancel_scope.cancel()
        assert not parker.parked  # the cancelled park cleaned up
        assert not parker.unpark()


# ---------------------------------------------------------------------------- LeaderFollower


class Source:
    """A fake input source: ``step`` takes one item from a queue filled by the test, and
    records which task did the work."""

    def __init__(self) -> None:
        self.items: deque[tuple[str, object]] = deque()
        self.arrived = trio.Event()
        self.results: dict[str, object] = {}
        self.parkers: dict[str, Parker] = {}
        self.readers: list[str] = []
        self.lf = LeaderFollower(self.step)

    async def step(self) -> None:
        while not self.items:
            await self.arrived.wait()
            self.arrived = trio.Event()
        key, value = self.items.popleft()
        self.readers.append(trio.lowlevel.current_task().name)
        self.results[key] = value
        parker = self.parkers.get(key)
        if parker is not None:
            parker.unpark()

    def put(self, key: str, value: object) -> None:
        self.items.append((key, value))
        self.arrived.set()

    async def get(self, key: str) -> object:
        parker = self.parkers.setdefault(key, Parker())
        await self.lf.wait_until(lambda: key in self.results, parker)
        return self.results[key]


async def test_a_lone_waiter_does_the_work_itself() -> None:
    src = Source()
    src.put("a", 1)
    with trio.fail_after(TIMEOUT_S):
        assert await src.get("a") == 1
    assert src.readers == [trio.lowlevel.current_task().name]
    assert not src.lf.leading


async def test_followers_are_woken_by_the_leader_and_the_role_is_handed_over() -> None:
    src = Source()
    got: dict[str, object] = {}
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:

            async def waiter(key: str) -> None:
                got[key] = await src.get(key)

            for key in "abc":
                nursery.start_soon(waiter, key, name=f"waiter-{key}")
            await trio.testing.wait_all_tasks_blocked()
            assert src.lf.leading  # exactly one of them reads; the others are parked
            src.put("c", 3)
            src.put("b", 2)
            await trio.testing.wait_all_tasks_blocked()
            src.put("a", 1)
    assert got == {"a": 1, "b": 2, "c": 3}
    assert not src.lf.leading
    # Never two readers at once, and the work was done by the waiters themselves.
    assert set(src.readers) <= {"waiter-a", "waiter-b", "waiter-c"}


async def test_cancelled_leader_hands_the_role_over() -> None:
    src = Source()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            leader_scope = trio.CancelScope()
            got: list[object] = []

            async def leader() -> None:
                with leader_scope:
                    await src.get("never")

            async def follower() -> None:
                got.append(await src.get("x"))

            nursery.start_soon(leader)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(follower, name="follower")
            await trio.testing.wait_all_tasks_blocked()
            leader_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert src.lf.leading  # the follower took over
            src.put("x", "ok")
        assert got == ["ok"]
        assert src.readers == ["follower"]


async def test_background_leads_only_while_nobody_waits_and_yields_to_a_waiter() -> None:
    src = Source()
    src.lf = LeaderFollower(src.step, idle_period=0.001, idle_period_max=0.004)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(src.lf.run_background, name="background")
            src.put("unsolicited", 0)
            while "unsolicited" not in src.results:
                await trio.sleep(0.001)
            assert src.readers == ["background"]
            await trio.testing.wait_all_tasks_blocked()
            assert src.lf.background_leading  # blocked reading, nobody else waits
            got: list[object] = []

            async def waiter() -> None:
                got.append(await src.get("mine"))

            nursery.start_soon(waiter, name="waiter")
            await trio.testing.wait_all_tasks_blocked()
            # The waiter interrupted the background step and reads itself.
            assert src.lf.leading
            assert not src.lf.background_leading
            src.put("mine", 1)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [1]
            assert src.readers[-1] == "waiter"
            src.lf.close()
        assert src.lf.closed


async def test_request_step_wakes_the_background_at_once() -> None:
    src = Source()
    src.lf = LeaderFollower(src.step, idle_period=10.0, idle_period_max=10.0)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(src.lf.run_background, name="background")
            await trio.testing.wait_all_tasks_blocked()
            assert src.lf.background_leading  # nobody waits: it reads
            src.put("first", 1)
            await src.get("first")  # this task takes over, reads, leaves
            await trio.testing.wait_all_tasks_blocked()
            # A waiter was active: the background backs off for its idle period (10 s)...
            assert not src.lf.leading
            src.put("urgent", 2)
            src.lf.request_step()  # ...unless asked
            while "urgent" not in src.results:
                await trio.sleep(0.001)
            assert src.readers[-1] == "background"
            src.lf.close()


async def test_interrupt_makes_an_interruptible_leader_recheck() -> None:
    src = Source()
    src.lf = LeaderFollower(src.step, interruptible=True)
    flag: list[bool] = []
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                await src.lf.wait_until(lambda: bool(flag))

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert src.lf.leading  # blocked inside step, waiting for items
            flag.append(True)  # satisfied by something other than step...
            src.lf.interrupt()  # ...so it must be told to look again
        assert not src.lf.leading


async def test_close_wakes_every_waiter() -> None:
    src = Source()
    returned: list[str] = []
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:

            async def waiter(key: str) -> None:
                await src.lf.wait_until(
                    lambda: key in src.results, src.parkers.setdefault(key, Parker())
                )
                returned.append(key)

            for key in "ab":
                nursery.start_soon(waiter, key)
            await trio.testing.wait_all_tasks_blocked()
            src.lf.close()
            src.put("z", 0)  # let the leader's step finish: it sees closed and returns
        assert sorted(returned) == ["a", "b"]
        # Closed: nobody leads any more, waits return at once.
        await src.lf.wait_until(lambda: False)
        assert not src.lf.leading


# ---------------------------------------------------------------------------- TaskPool


async def test_task_pool_reuses_tasks_and_isolates_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[tuple[int, str, trio.lowlevel.Task]] = []

    async def job(n: int, scope: trio.CancelScope) -> None:
        seen.append((n, var.get(), trio.lowlevel.current_task()))
        var.set(f"set by job {n}")  # must not leak into the next job on this task

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            pool: TaskPool[int] = TaskPool(nursery, job)
            for n in range(5):
                pool.start(n)
                await trio.testing.wait_all_tasks_blocked()
            assert pool.idle_workers == 1
            pool.close()
    assert [n for n, _, _ in seen] == [0, 1, 2, 3, 4]
    assert all(value == "unset" for _, value, _ in seen)
    assert len({task for _, _, task in seen}) == 1  # one task ran every job


async def test_task_pool_job_cancelled_through_its_scope_does_not_stop_the_worker() -> None:
    ran: list[int] = []
    scopes: list[trio.CancelScope] = []

    async def job(n: int, scope: trio.CancelScope) -> None:
        scopes.append(scope)
        if n == 0:
            scope.cancel()
            await trio.sleep_forever()  # cancelled at once
        ran.append(n)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            pool: TaskPool[int] = TaskPool(nursery, job)
            pool.start(0)
            await trio.testing.wait_all_tasks_blocked()
            pool.start(1)
            await trio.testing.wait_all_tasks_blocked()
            pool.start(2)
            await trio.testing.wait_all_tasks_blocked()
            pool.close()
    assert ran == [1, 2]
    assert scopes[1] is not scopes[0]  # a fresh scope after the cancelled one
    assert scopes[2] is scopes[1]  # kept while nobody cancels it


async def test_task_pool_runs_concurrent_jobs_in_separate_tasks() -> None:
    gate = trio.Event()
    tasks: set[trio.lowlevel.Task] = set()

    async def job(n: int, scope: trio.CancelScope) -> None:
        tasks.add(trio.lowlevel.current_task())
        await gate.wait()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            pool: TaskPool[int] = TaskPool(nursery, job)
            for n in range(3):
                pool.start(n)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert pool.idle_workers == 3
            pool.close()
            with pytest.raises(RuntimeError):
                pool.start(9)
    assert len(tasks) == 3
