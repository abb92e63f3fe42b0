"""Connection slots of the inference server (issue 10: 64 idle clients locked everyone out).

The policy (``models._slots``) with a test clock, then the real server (``serve_inference``:
attested channel, RPC, the digits model) with a small capacity: connections that sit idle
before or after their handshake give their slot to a newcomer, busy ones never do, and when
every connection is busy a newcomer is refused at once instead of parked.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import trio

from models._slots import ConnectionSlots
from models.client import open_inference_client
from models.config import ModelConfig, ServerConfig
from models.digits import MODEL_PATH
from models.engine import ModelEngine, create_session
from models.server import serve_inference
from models.service import InferenceService, ModelEntry
from transport.channel.testing import TestAuthority

TIMEOUT_S = 30  # a hang guard: without eviction the newcomer waits 60 s (the idle timeout)


@dataclass
class _Stats:
    open_streams: int = 0
    frames_received: int = 0
    frames_sent: int = 0


class _Rpc:
    def __init__(self) -> None:
        self.stats = _Stats()

    def statistics(self) -> _Stats:
        return self.stats


class _Scope:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def _full(capacity: int, clock: _Clock) -> tuple[ConnectionSlots, list[Any]]:
    slots = ConnectionSlots(capacity, min_idle_s=1.0, clock=clock)
    admitted = []
    for _ in range(capacity):
        slot = slots.admit()
        assert slot is not None
        slot.scope = _Scope()
        admitted.append(slot)
    return slots, admitted


def test_a_full_server_refuses_when_nothing_has_been_idle_long_enough() -> None:
    clock = _Clock()
    slots, admitted = _full(2, clock)
    clock.now += 0.5  # handshaking for less than min_idle_s: honest ones take milliseconds
    assert slots.admit() is None
    assert slots.refusals == 1
    assert not any(s.scope.cancelled for s in admitted)


def test_the_oldest_stalled_handshake_is_evicted() -> None:
    clock = _Clock()
    slots = ConnectionSlots(2, min_idle_s=1.0, clock=clock)
    first = slots.admit()
    clock.now += 0.3
    second = slots.admit()
    assert first is not None
    assert second is not None
    first.scope, second.scope = _Scope(), _Scope()
    clock.now += 5
    newcomer = slots.admit()
    assert newcomer is not None
    assert first.scope.cancelled
    assert first.evicted
    assert not second.scope.cancelled
    assert len(slots) == 2
    assert slots.evictions == 1
    slots.release(first)  # its handler ends later: releasing again changes nothing
    assert len(slots) == 2


def test_a_connection_with_a_call_in_flight_is_never_evicted() -> None:
    clock = _Clock()
    slots, (busy, idle) = _full(2, clock)
    busy.serving(_Rpc(), clock.now)
    idle.serving(_Rpc(), clock.now)
    busy.rpc.stats.open_streams = 1
    clock.now += 60
    assert slots.admit() is not None
    assert idle.scope.cancelled
    assert not busy.scope.cancelled
    idle_again = slots.admit()
    assert idle_again is None  # the other slot is the newcomer's, still in its handshake...
    clock.now += 2
    assert slots.admit() is not None  # ...until it has stalled for min_idle_s
    assert not busy.scope.cancelled


def test_traffic_keeps_a_connection_and_the_idlest_goes_first() -> None:
    clock = _Clock()
    slots, (chatty, quiet) = _full(2, clock)
    for slot in (chatty, quiet):
        slot.serving(_Rpc(), clock.now)
    clock.now += 10
    chatty.rpc.stats.frames_received += 3
    chatty.rpc.stats.frames_sent += 3
    assert slots.admit() is not None
    assert quiet.scope.cancelled
    assert not chatty.scope.cancelled


def test_activity_seen_by_an_observation_dates_from_that_observation() -> None:
    clock = _Clock()
    slots, (early, late) = _full(2, clock)
    early_rpc, late_rpc = _Rpc(), _Rpc()
    early.serving(early_rpc, clock.now)
    late.serving(late_rpc, clock.now)
    clock.now += 1
    early_rpc.stats.frames_received += 1  # one call each, at different times
    slots.observe()
    clock.now += 3
    late_rpc.stats.frames_received += 1
    slots.observe()
    clock.now += 2  # early: idle 5 s, late: 2 s
    assert slots.admit() is not None
    assert early.evicted
    assert not late.evicted


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ConnectionSlots(0)


# --- the real server ------------------------------------------------------------------------

CAPACITY = 3


@pytest.fixture
async def server(nursery: trio.Nursery) -> Any:
    authority = TestAuthority()
    data = MODEL_PATH.read_bytes()
    engine = ModelEngine("digits", create_session(data))
    service = InferenceService({"digits": ModelEntry("digits", digest=b"\0" * 48, engine=engine)})
    config = ServerConfig(
        models=(ModelConfig(name="digits"),),
        max_connections=CAPACITY,
        handshake_timeout_s=120,  # not what frees the slots here: eviction does
    )
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(
        lambda task_status: serve_inference(
            service,
            config,
            attester=authority.attester(),
            listener=listeners[0],
            task_status=task_status,
        )
    )
    port = listeners[0].socket.getsockname()[1]
    return f"127.0.0.1:{port}", authority.verifier()


async def _one_call(endpoint: str, verifier: Any) -> None:
    async with open_inference_client(endpoint, verifier=verifier, failover=False) as client:
        out = await client.infer("digits", {"pixels": np.zeros((1, 64), np.float32)})
        assert out


async def test_idle_clients_after_their_handshake_do_not_lock_out_a_newcomer(server: Any) -> None:
    endpoint, verifier = server
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as idlers:
            for _ in range(CAPACITY):  # handshake, one call, then sit idle holding the slot
                ready = trio.Event()

                async def idle(ready: trio.Event = ready) -> None:
                    async with open_inference_client(
                        endpoint, verifier=verifier, failover=False
                    ) as client:
                        await client.infer("digits", {"pixels": np.zeros((1, 64), np.float32)})
                        ready.set()
                        await trio.sleep_forever()

                idlers.start_soon(idle)
                await ready.wait()
            await trio.sleep(1.5)  # past min_idle_s: these are now idle
            await _one_call(endpoint, verifier)
            idlers.cancel_scope.cancel()


async def test_connections_that_never_handshake_do_not_lock_out_a_newcomer(server: Any) -> None:
    endpoint, verifier = server
    host, port = endpoint.rsplit(":", 1)
    silent = [socket.create_connection((host, int(port))) for _ in range(CAPACITY)]
    try:
        await trio.sleep(1.5)  # past min_idle_s: stalled handshakes
        with trio.fail_after(TIMEOUT_S):
            await _one_call(endpoint, verifier)
        # The newcomer got in by evicting one stalled connection, not by waiting for the
        # handshake timeouts to drop them all: the others are still open.
        assert [_closed_by_peer(s) for s in silent].count(False) == CAPACITY - 1
    finally:
        for s in silent:
            s.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
