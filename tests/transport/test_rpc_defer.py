"""``unary_inline(fn, otherwise=handler)``: requests answered in the reader task when ``fn`` can,
handed whole to ``handler`` in a task when it returns DEFER; both ways give the same answers,
errors and flow-control accounting."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from transport.rpc import (
    DEFER,
    INITIAL_WINDOW_MESSAGES,
    RpcClient,
    RpcError,
    RpcServerConnection,
    RpcStream,
    open_rpc_client,
    route,
    serve_rpc,
    unary_inline,
)

TIMEOUT_S = 20


class Method:
    """An inline method that defers while ``busy`` (or for requests asking to), and a task
    handler that waits until the resource is free, as a model server does."""

    def __init__(self) -> None:
        self.busy = False
        self.free = trio.Event()
        self.inline_calls = 0
        self.task_calls = 0

    def now(self, request: Any, stream: RpcStream) -> Any:
        self.inline_calls += 1
        if request == "fail":
            raise RpcError("failed_precondition", "asked to fail")
        deferred = request in ("defer", "fail-later") or isinstance(request, dict)
        if self.busy or deferred:
            return DEFER
        return {"inline": request, "method": stream.method}

    async def later(self, stream: RpcStream) -> None:
        self.task_calls += 1
        request = await stream.receive()
        if self.busy:
            await self.free.wait()
        if request == "fail-later":
            raise RpcError("failed_precondition", "failed in the task")
        await stream.send({"task": request if not isinstance(request, dict) else "pad"}, end=True)


@asynccontextmanager
async def serving(method: Method) -> AsyncIterator[tuple[RpcClient, RpcServerConnection]]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    handler = route({"m": unary_inline(method.now, otherwise=method.later)})
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_rpc, server_stream, handler)
        async with open_rpc_client(client_stream) as rpc:
            yield rpc, server
        nursery.cancel_scope.cancel()


async def test_answered_inline_when_it_can_and_in_a_task_when_it_defers() -> None:
    method = Method()
    with trio.fail_after(TIMEOUT_S):
        async with serving(method) as (rpc, server):
            assert await rpc.call("m", 1) == {"inline": 1, "method": "m"}
            assert await rpc.call("m", "defer") == {"task": "defer"}
            stats = server.statistics()
            assert (stats.inline_answers, stats.deferred_answers) == (1, 1)
            assert method.task_calls == 1
            # An error from the inline function is the call's error (not deferred).
            with pytest.raises(RpcError) as info:
                await rpc.call("m", "fail")
            assert info.value.code == "failed_precondition"
            assert server.statistics().deferred_answers == 1
            with pytest.raises(RpcError, match="failed in the task"):
                await rpc.call("m", "fail-later")
            assert server.statistics().running_handlers == 0


async def test_deferred_requests_wait_and_inline_ones_do_not_wait_for_them() -> None:
    """While the resource is busy every request defers and waits in its task; the server keeps
    reading meanwhile; once free, the waiting tasks answer and inline answers resume."""
    method = Method()
    with trio.fail_after(TIMEOUT_S):
        async with serving(method) as (rpc, server):
            method.busy = True
            results: dict[int, Any] = {}

            async def call(i: int) -> None:
                results[i] = await rpc.call("m", i)

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()
                assert server.statistics().running_handlers == 20
                assert results == {}
                method.busy = False
                method.free.set()
            assert results == {i: {"task": i} for i in range(20)}
            assert await rpc.call("m", "x") == {"inline": "x", "method": "m"}
            stats = server.statistics()
            assert (stats.inline_answers, stats.deferred_answers) == (1, 20)
            assert stats.running_handlers == 0


async def test_a_stream_opened_without_its_request_goes_to_the_handler() -> None:
    """Only a request that comes whole with the OPEN is tried inline: a stream opened, then
    sent to, is the handler's from the start (with its own rules, such as an idle deadline),
    and it gets every message."""
    method = Method()
    received: list[Any] = []

    async def later(stream: RpcStream) -> None:
        received.extend([m async for m in stream])
        await stream.send(len(received), end=True)

    method.later = later  # type: ignore[method-assign]
    with trio.fail_after(TIMEOUT_S):
        async with serving(method) as (rpc, server), rpc.open_stream("m") as st:
            await st.send("defer")
            for i in range(3):
                await st.send(i)
            await st.send_end()
            assert [m async for m in st] == [4]
            assert received == ["defer", 0, 1, 2]
            stats = server.statistics()
            assert (stats.inline_answers, stats.deferred_answers) == (0, 0)
            assert method.inline_calls == 0


async def test_deferring_leaks_no_flow_control_credit() -> None:
    """Each deferred request is consumed once, by the handler's receive: the connection's
    buffered bytes return to zero after many deferred and inline calls (a consumption counted
    twice, or never, shows there, and would soon stall the connection)."""
    method = Method()
    pad = b"p" * 4096
    with trio.fail_after(TIMEOUT_S):
        async with serving(method) as (rpc, server):
            for _ in range(4 * INITIAL_WINDOW_MESSAGES):
                assert await rpc.call("m", {"pad": pad}) == {"task": "pad"}
            for i in range(4 * INITIAL_WINDOW_MESSAGES):
                assert await rpc.call("m", i) == {"inline": i, "method": "m"}
            stats = server.statistics()
            assert stats.deferred_answers == stats.inline_answers == 4 * INITIAL_WINDOW_MESSAGES
            assert stats.buffered_bytes == 0
            assert rpc.statistics().buffered_bytes == 0


async def test_defer_without_a_handler_is_an_internal_error() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    handler = route({"m": unary_inline(lambda request, stream: DEFER)})
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_rpc, server_stream, handler)
            async with open_rpc_client(client_stream) as rpc:
                for i in range(2):  # the connection lives on
                    with pytest.raises(RpcError) as info:
                        await rpc.call("m", i)
                    assert (info.value.code, info.value.message) == ("internal", "internal error")
            nursery.cancel_scope.cancel()
    failures = [e for e in logs if e["event"] == "rpc_handler_failed"]
    assert [f["error_type"] for f in failures] == ["TypeError", "TypeError"]
