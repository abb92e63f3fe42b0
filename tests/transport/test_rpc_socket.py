"""The RPC layer over real Unix sockets (kernel socketpairs and a listening socket file).

No mock clock here: real I/O with a mock autojump clock would make time jump while the kernel
still holds data. Every test has an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from transport.errors import ChannelClosed, LocalProtocolError
from transport.rpc import (
    DEFAULT_MAX_MESSAGE_SIZE,
    EndOfStream,
    Handler,
    RpcClient,
    RpcError,
    RpcStream,
    open_rpc_client,
    route,
    serve_rpc,
    unary,
    unary_inline,
)

TIMEOUT_S = 20


def socket_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


@asynccontextmanager
async def socket_rpc(handler: Handler, **server_kw: Any) -> AsyncIterator[RpcClient]:
    client_stream, server_stream = socket_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_rpc(server_stream, handler, **server_kw))
        async with open_rpc_client(client_stream) as rpc:
            yield rpc


async def echo(request: Any, stream: RpcStream) -> Any:
    return request


async def bidi(stream: RpcStream) -> None:
    """Answers each message as it comes (a stream of inputs in, a stream of outputs out)."""
    async for message in stream:
        await stream.send({"n": message["n"], "y": message["x"][::-1]})


async def fail_on_three(stream: RpcStream) -> None:
    async for message in stream:
        if message == 3:
            raise RpcError("invalid_argument", "three is not allowed")
        await stream.send(message)


HANDLERS = route({"echo": unary(echo), "bidi": bidi, "fail3": fail_on_three})


async def test_unary_over_socketpair() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with socket_rpc(HANDLERS) as rpc:
            for i in range(200):
                assert await rpc.call("echo", {"i": i, "b": bytes([i % 256]) * i}) == {
                    "i": i,
                    "b": bytes([i % 256]) * i,
                }


async def test_unary_over_listening_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "rpc.sock"
    with trio.fail_after(TIMEOUT_S):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen()
        listener = trio.SocketListener(sock)

        async def handle_one(*, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            server_stream = await listener.accept()
            await serve_rpc(server_stream, HANDLERS)

        async with trio.open_nursery() as nursery:
            await nursery.start(handle_one)
            client_stream = await trio.open_unix_socket(str(path))
            async with open_rpc_client(client_stream) as rpc:
                assert await rpc.call("echo", "over a socket file") == "over a socket file"
        await listener.aclose()


async def test_streaming_both_ways_in_order() -> None:
    n_messages = 500
    with trio.fail_after(TIMEOUT_S):
        async with socket_rpc(HANDLERS) as rpc, rpc.open_stream("bidi") as st:
            got: list[Any] = []

            async def produce() -> None:
                for n in range(n_messages):
                    await st.send({"n": n, "x": n.to_bytes(4, "big") * 50})
                await st.send_end()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                async for out in st:
                    got.append(out)
            assert [g["n"] for g in got] == list(range(n_messages))
            assert all(g["y"] == (g["n"].to_bytes(4, "big") * 50)[::-1] for g in got)


async def test_many_concurrent_streams() -> None:
    with trio.fail_after(TIMEOUT_S):
        # Concurrency, not the byte budget, is under test: 50 streams x 5 MiB reservations.
        async with socket_rpc(HANDLERS, max_streams=256, max_buffered_bytes=None) as rpc:
            results: dict[int, Any] = {}

            async def call(i: int) -> None:
                results[i] = await rpc.call("echo", [i, "x" * i])

            async def stream(i: int) -> None:
                async with rpc.open_stream("bidi", {"i": i}) as st:
                    for n in range(10):
                        await st.send({"n": n, "x": bytes([i])})
                    await st.send_end()
                    results[-1 - i] = [m["n"] async for m in st]

            async with trio.open_nursery() as nursery:
                for i in range(150):
                    nursery.start_soon(call, i)
                for i in range(50):
                    nursery.start_soon(stream, i)
            assert {i: results[i] for i in range(150)} == {i: [i, "x" * i] for i in range(150)}
            assert all(results[-1 - i] == list(range(10)) for i in range(50))
            assert rpc.statistics().open_streams == 0


async def test_per_stream_error_leaves_other_streams_working() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with socket_rpc(HANDLERS) as rpc:
            async with rpc.open_stream("bidi") as healthy, rpc.open_stream("fail3") as failing:
                for i in range(4):
                    await failing.send(i)
                assert [await failing.receive() for _ in range(3)] == [0, 1, 2]
                with pytest.raises(RpcError) as info:
                    await failing.receive()
                assert info.value.code == "invalid_argument"
                assert info.value.message == "three is not allowed"
                await healthy.send({"n": 1, "x": b"ab"})
                assert await healthy.receive() == {"n": 1, "y": b"ba"}
            assert await rpc.call("echo", "after") == "after"


async def test_cancellation_both_ways() -> None:
    handler_cancelled = trio.Event()
    started = trio.Event()

    async def hang(stream: RpcStream) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            handler_cancelled.set()

    async def server_cancels(stream: RpcStream) -> None:
        await stream.receive()
        await stream.cancel()

    handler = route({"hang": hang, "sc": server_cancels, "echo": unary(echo)})
    with trio.fail_after(TIMEOUT_S):
        async with socket_rpc(handler) as rpc:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rpc.call, "hang", None)
                await started.wait()
                nursery.cancel_scope.cancel()  # client-side cancellation of a pending call
            await handler_cancelled.wait()
            async with rpc.open_stream("sc") as st:
                await st.send("go")
                with pytest.raises(RpcError) as info:
                    await st.receive()
                assert info.value.code == "cancelled"
            assert await rpc.call("echo", 1) == 1


async def test_peer_disconnect_mid_stream_is_a_clear_error() -> None:
    async def talk(stream: RpcStream) -> None:
        await stream.send("partial")
        await trio.sleep_forever()

    client_stream, server_stream = socket_stream_pair()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            server_scope = trio.CancelScope()

            async def server() -> None:
                with server_scope:
                    await serve_rpc(server_stream, route({"talk": talk}))

            nursery.start_soon(server)
            async with open_rpc_client(client_stream) as rpc, rpc.open_stream("talk") as st:
                assert await st.receive() == "partial"
                server_scope.cancel()
                with pytest.raises(ChannelClosed, match="closed by the peer"):
                    await st.receive()
                assert rpc.closed


async def test_client_disconnect_cancels_handlers_and_ends_serve_rpc() -> None:
    started = trio.Event()
    cancelled = trio.Event()

    async def hang(stream: RpcStream) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    client_stream, server_stream = socket_stream_pair()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            served = trio.Event()

            async def server() -> None:
                await serve_rpc(server_stream, hang)  # returns normally on client EOF
                served.set()

            nursery.start_soon(server)
            errors: list[Exception] = []
            async with open_rpc_client(client_stream) as rpc:

                async def call() -> None:
                    try:
                        await rpc.call("hang", None)
                    except ChannelClosed as exc:
                        errors.append(exc)

                nursery.start_soon(call)
                await started.wait()
            # Leaving the client closes the socket; the server notices and cleans up.
            await served.wait()
            assert cancelled.is_set()
            assert [str(e) for e in errors] == ["the RPC connection was closed locally"]


async def test_large_and_oversized_messages() -> None:
    big = b"\x5a" * (DEFAULT_MAX_MESSAGE_SIZE - 64)  # just under the limit with msgpack framing
    with trio.fail_after(TIMEOUT_S):
        async with socket_rpc(HANDLERS) as rpc:
            assert await rpc.call("echo", big) == big
            with pytest.raises(LocalProtocolError, match="exceeds max_message_size"):
                await rpc.call("echo", big + b"\x00" * 128)
            async with rpc.open_stream("bidi") as st:
                for n in range(8):  # ~8 x 2 MiB: beyond the byte window, credit must flow
                    await st.send({"n": n, "x": b"\x01" * (2 << 20)})
                    assert (await st.receive())["n"] == n
                await st.send_end()
                with pytest.raises(EndOfStream):
                    await st.receive()


@pytest.mark.parametrize("mode", ["raw", "task", "inline"])
async def test_bench_modes_run(mode: str) -> None:
    """The benchmark's three set-ups really round-trip (tiny run, in one process)."""
    from runtime.bench.rpc import _one_run

    with trio.fail_after(TIMEOUT_S):
        assert await _one_run(mode, 20, 2, False) > 0


async def test_mixed_load_with_errors_cancels_and_timeouts() -> None:
    """30 tasks share one connection: unary (inline and task) and streaming calls mixed with
    handler errors, crashes, server- and client-side cancellations and timeouts. The
    connection must survive it all, with every stream accounted for."""

    async def stream_handler(stream: RpcStream) -> None:
        async for m in stream:
            if m == "err":
                raise RpcError("invalid_argument", "bad")
            if m == "boom":
                raise RuntimeError("handler bug")
            if m == "cancel":
                await stream.cancel()
                return
            if m == "sleep":
                await trio.sleep(0.005)
            await stream.send(m)

    def inline(request: Any, stream: RpcStream) -> Any:
        if request == "err":
            raise RpcError("not_found", "n")
        return request

    async def slow(request: Any, stream: RpcStream) -> Any:
        await trio.sleep(0.002)
        return request

    handler = route({"s": stream_handler, "i": unary_inline(inline), "u": unary(slow)})
    outcomes = {"ok": 0, "rpc_error": 0}

    async def worker(rng: random.Random) -> None:
        for _ in range(25):
            kind = rng.random()
            try:
                if kind < 0.3:
                    value = rng.choice([1, "err", b"x" * rng.randint(0, 70_000)])
                    assert await rpc.call("i", value) == value
                elif kind < 0.5:
                    with trio.move_on_after(rng.random() * 0.004):
                        assert await rpc.call("u", 5) == 5
                else:
                    async with rpc.open_stream("s") as st:
                        for j in range(rng.randint(0, 20)):
                            m = rng.choice([j, j, "err", "boom", "cancel", "sleep", b"y" * 50_000])
                            await st.send(m)
                            if m in ("err", "boom", "cancel"):
                                with pytest.raises(RpcError):
                                    await st.receive()
                                break
                            assert await st.receive() == m
                        if rng.random() < 0.5:
                            await st.send_end()
                            async for _ in st:
                                pass
                outcomes["ok"] += 1
            except RpcError:
                outcomes["rpc_error"] += 1

    client_stream, server_stream = socket_stream_pair()
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs():
        async with trio.open_nursery() as nursery:
            # (no byte budget: every stream must be accepted for the accounting below)
            server = await nursery.start(
                partial(serve_rpc, server_stream, handler, max_streams=64, max_buffered_bytes=None)
            )
            async with open_rpc_client(client_stream) as rpc:
                async with trio.open_nursery() as workers:
                    for seed in range(30):
                        workers.start_soon(worker, random.Random(seed))
                assert not rpc.closed
                assert await rpc.call("i", 42) == 42
                stats = rpc.statistics()
                assert stats.open_streams == 0
                assert stats.blocked_senders == 0
                while server.statistics().running_handlers:  # cancelled ones still unwinding
                    await trio.sleep(0.001)
                server_stats = server.statistics()
                assert server_stats.open_streams == 0
                assert server_stats.streams_opened == stats.streams_opened
                assert server_stats.queued_messages == 0
                # Every message received was reported consumed, on both sides (the byte
                # budget's accounting balances whatever happened to the streams).
                assert server_stats.buffered_bytes == 0
                assert rpc.statistics().buffered_bytes == 0
    assert outcomes["ok"] > 0
    assert outcomes["rpc_error"] > 0
