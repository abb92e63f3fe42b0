"""``infer`` answered in the RPC reader task when the model is idle and small, and in a handler
task when it would have to wait (the model busy, a budget full, batching under load): the same
answers and errors both ways, against a real onnxruntime session."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio
import trio.testing

from models.digits import MODEL_PATH, load_test_split
from models.engine import EngineConfig, ModelEngine, create_session
from models.service import InferenceService, ModelEntry, ServiceLimits
from models.tensors import encode_tensors
from transport.rpc import (
    Event,
    MessageReceived,
    Role,
    RpcClient,
    RpcConnection,
    RpcError,
    RpcServerConnection,
    open_rpc_client,
    serve_rpc,
)

TIMEOUT_S = 30


def _service(limits: ServiceLimits | None = None, **config: object) -> InferenceService:
    data = MODEL_PATH.read_bytes()
    engine = ModelEngine("digits", create_session(data), config=EngineConfig(**config))  # type: ignore[arg-type]
    engine.warm_up()
    entry = ModelEntry("digits", digest=hashlib.sha384(data).digest(), engine=engine)
    return InferenceService({"digits": entry}, limits=limits)


@asynccontextmanager
async def _serving(
    service: InferenceService,
) -> AsyncIterator[tuple[RpcClient, RpcServerConnection]]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_rpc, server_stream, service.connection_handler())
        async with open_rpc_client(client_stream) as rpc:
            yield rpc, server
        nursery.cancel_scope.cancel()


def _request(rows: np.ndarray) -> dict[str, object]:
    return {"model": "digits", "inputs": encode_tensors({"pixels": rows})}


async def test_an_idle_small_model_answers_inline_with_the_same_answer() -> None:
    x, _ = load_test_split()
    service = _service(execution="inline")
    engine = service.models["digits"].engine
    assert isinstance(engine, ModelEngine)
    want = engine.session.run(None, {"pixels": x[:5]})
    with trio.fail_after(TIMEOUT_S):
        async with _serving(service) as (rpc, server):
            for i in range(5):
                await trio.sleep(0.001)  # a sequential client, not back to back
                answer = await rpc.call("infer", _request(x[i : i + 1]))
                assert answer["outputs"]["label"]["data"] == want[0][i : i + 1].tobytes()
            stats = server.statistics()
            assert (stats.inline_answers, stats.deferred_answers) == (5, 0)
    assert engine.statistics().requests == 5


async def test_errors_are_the_same_inline() -> None:
    service = _service(execution="inline")
    with trio.fail_after(TIMEOUT_S):
        async with _serving(service) as (rpc, server):
            cases = [
                ("not a map", "invalid_argument"),
                ({"model": "nope", "inputs": {}}, "not_found"),
                ({"model": "digits", "inputs": {"wrong": 1}}, "invalid_argument"),
                (_request(np.zeros((1, 3), np.float32)), "invalid_argument"),
            ]
            for request, code in cases:
                with pytest.raises(RpcError) as info:
                    await rpc.call("infer", request)
                assert info.value.code.split(".")[0] == code, (request, info.value)
            assert server.statistics().inline_answers == len(cases)
            assert server.statistics().deferred_answers == 0


async def test_a_model_too_slow_to_run_inline_is_run_in_a_task() -> None:
    x, _ = load_test_split()
    service = _service(execution="thread")
    with trio.fail_after(TIMEOUT_S):
        async with _serving(service) as (rpc, server):
            answer = await rpc.call("infer", _request(x[:1]))
            assert "label" in answer["outputs"]
            stats = server.statistics()
            assert (stats.inline_answers, stats.deferred_answers) == (0, 1)


async def test_a_full_connection_budget_defers_and_the_request_waits_its_turn() -> None:
    """A request that does not fit the connection's byte budget right now is not refused and
    does not jump the queue: it waits in a task, as before."""
    x, _ = load_test_split()
    service = _service(
        ServiceLimits(
            stream_buffer_bytes=1 << 10,
            connection_buffer_bytes=1 << 10,
            server_buffer_bytes=1 << 20,
        ),
        execution="inline",
    )
    with trio.fail_after(TIMEOUT_S):
        async with _serving(service) as (rpc, server):
            big = _request(x[:8])  # 8 x 64 float32 = 2 KiB, over the 1 KiB budget
            answer = await rpc.call("infer", big)
            assert answer["outputs"]["label"]["shape"] == [8]
            stats = server.statistics()
            # Over the limit while nothing else is held: admitted alone, inline (the budget
            # admits an oversized item when empty, as ByteBudget.acquire does).
            assert stats.inline_answers + stats.deferred_answers == 1


async def test_a_burst_in_one_read_is_answered_in_order_either_way() -> None:
    """Requests that arrive in one read: each runs inline, or defers to the task path when it
    comes right behind the previous run (within the engine's back-to-back window, where it
    may batch); which one depends on how fast this machine gets through them. Every answer is
    the right one, on its own stream."""
    x, _ = load_test_split()
    service = _service(execution="inline")
    engine = service.models["digits"].engine
    assert isinstance(engine, ModelEngine)
    want = engine.session.run(None, {"pixels": x[:12]})[0]
    core = RpcConnection(Role.CLIENT)
    burst = b"".join(
        core.send_open("infer", {}, first=core.pack_message(_request(x[i : i + 1])), end=True)[1]
        for i in range(12)
    )
    client_stream, server_stream = trio.testing.memory_stream_pair()
    labels: dict[int, bytes] = {}
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_rpc, server_stream, service.connection_handler())
            await client_stream.send_all(burst)  # one write: the server reads them together
            while len(labels) < 12:
                core.receive_data(await client_stream.receive_some())
                while isinstance(event := core.next_event(), Event):
                    if isinstance(event, MessageReceived):
                        labels[event.stream_id] = event.message["outputs"]["label"]["data"]
            stats = server.statistics()
            nursery.cancel_scope.cancel()
    assert [labels[k] for k in sorted(labels)] == [want[i : i + 1].tobytes() for i in range(12)]
    assert stats.inline_answers >= 1  # the first, at least
    assert stats.inline_answers + stats.deferred_answers == 12
    assert engine.statistics().samples == 12
