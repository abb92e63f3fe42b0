"""ByteBudget: a FIFO byte semaphore, nested (connection -> server), with bounded waiters."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from models._budget import BudgetExhausted, ByteBudget
from models.errors import ModelError, OverloadedError


def test_try_acquire_and_release() -> None:
    b = ByteBudget(100)
    assert b.try_acquire(60)
    assert not b.try_acquire(50)
    assert b.try_acquire(40)
    assert not b.has_room()
    b.release(60)
    assert b.has_room()
    assert b.statistics().used == 40
    assert b.statistics().peak == 100


def test_an_item_larger_than_the_budget_is_admitted_alone() -> None:
    b = ByteBudget(10)
    assert b.try_acquire(50)  # alone: admitted, or it would wait forever
    assert not b.try_acquire(1)
    b.release(50)
    assert b.try_acquire(1)


def test_nested_is_all_or_nothing() -> None:
    server = ByteBudget(100)
    a = ByteBudget(80, parent=server)
    b = ByteBudget(80, parent=server)
    assert a.try_acquire(70)
    assert not b.try_acquire(40)  # fits b, not the server: nothing taken from b
    assert b.statistics().used == 0
    assert b.try_acquire(30)
    assert server.statistics().used == 100
    b.charge(20)  # over the limit, on purpose (memory already in hand)
    assert server.statistics().used == 120
    assert not server.has_room()
    assert not a.has_room()
    a.release(70)
    b.release(50)
    assert server.statistics().used == 0


def test_misuse() -> None:
    with pytest.raises(ValueError, match="positive"):
        ByteBudget(0)
    with pytest.raises(ValueError, match="max_waiters"):
        ByteBudget(1, max_waiters=-1)
    b = ByteBudget(10)
    with pytest.raises(AssertionError):
        b.release(1)


async def test_waiters_are_served_in_order() -> None:
    b = ByteBudget(100)
    assert b.try_acquire(100)
    order: list[int] = []

    async def want(i: int, size: int) -> None:
        await b.acquire(size)
        order.append(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(want, 1, 80)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(want, 2, 10)  # would fit sooner, but waits its turn
        await trio.testing.wait_all_tasks_blocked()
        assert not b.try_acquire(1)  # nobody jumps the queue either
        b.release(30)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        nursery.start_soon(want, 3, 80)
        await trio.testing.wait_all_tasks_blocked()
        b.release(70)  # 1 and 2 fit now (80 + 10); 3 waits its turn
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(order) == [1, 2]
        b.release(90)
    assert order[2:] == [3]
    assert b.statistics().used == 80


async def test_cancelled_waiter_holds_nothing_and_unblocks_those_behind() -> None:
    server = ByteBudget(100)
    conn = ByteBudget(100, parent=server)
    assert server.try_acquire(100)
    got: list[str] = []

    async def big() -> None:
        await conn.acquire(100)
        got.append("big")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(big)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.statistics().used == 100  # held at the connection, waiting on the server
        nursery.cancel_scope.cancel()
    assert got == []
    assert conn.statistics().used == 0
    server.release(100)
    assert server.statistics().used == 0


async def test_bounded_waiters() -> None:
    b = ByteBudget(10, max_waiters=1)
    assert b.try_acquire(10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire, 5)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(BudgetExhausted, match="retry later") as info:
            await b.acquire(5)
        # A models error the service answers as resource_exhausted.
        assert isinstance(info.value, OverloadedError)
        assert isinstance(info.value, ModelError)
        b.release(10)
    assert b.statistics().used == 5


async def test_lease() -> None:
    b = ByteBudget(100)
    lease = b.lease()
    await lease.acquire(30)
    lease.charge(90)
    assert b.statistics().used == 120
    lease.release()
    lease.release()  # idempotent
    assert b.statistics().used == 0
