"""The background flush of an RPC connection and cancellation (regression).

A background flush cancelled with frames still queued scheduled another background flush. When
the cancellation is the connection's own end (its nursery cancelled), that new flush was
cancelled at once too and scheduled the next: a livelock that spawned tasks without end, never
let the nursery finish and grew the process by gigabytes (seen as a hang and an out-of-memory
kill in tests/models/test_service.py, about one run in three on a loaded machine).
"""

from __future__ import annotations

import trio
import trio.testing

from transport.rpc import Role
from transport.rpc._connection import Connection
from transport.rpc._core import RpcConnection


async def test_a_cancelled_connection_does_not_respawn_its_flush() -> None:
    left, _right = trio.testing.memory_stream_pair()
    spawned = 0
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            conn = Connection(left, RpcConnection(Role.SERVER))
            conn.nursery = nursery
            schedule = conn.schedule_flush

            def counting_schedule() -> None:
                nonlocal spawned
                spawned += 1
                if spawned > 50:  # the old behaviour: stop it here, the test fails below
                    conn.failure = (trio.ClosedResourceError, "stopped by the test", None)  # type: ignore[assignment]
                schedule()

            conn.schedule_flush = counting_schedule  # type: ignore[method-assign]
            conn.queue(b"frame")  # a background flush is scheduled, not yet running
            nursery.cancel_scope.cancel()  # the connection ends before it runs
    assert spawned == 1
