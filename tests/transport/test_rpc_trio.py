"""The trio adapter of the RPC layer over trio.testing memory and lockstep streams.

Every test runs under an absolute ``trio.fail_after``; timeouts inside tests use pytest-trio's
``autojump_clock`` so nothing really sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgpack
import pytest
import structlog
import trio
import trio.testing

from tests.transport.test_rpc_core import frame
from transport.errors import ChannelClosed, LocalProtocolError, RemoteProtocolError
from transport.rpc import (
    INITIAL_WINDOW_MESSAGES,
    EndOfStream,
    FrameType,
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

TIMEOUT_S = 10  # absolute bound on every test (mock time when autojump_clock is used)

StreamMaker = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


def trickle_stream_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """A memory stream pair that delivers one byte at a time (every frame is split)."""

    def one_way() -> tuple[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]:
        send, recv = trio.testing.memory_stream_one_way_pair()

        async def pump_one_byte_at_a_time() -> None:
            while trio.testing.memory_stream_pump(send, recv, max_bytes=1):
                await trio.lowlevel.checkpoint()

        send.send_all_hook = pump_one_byte_at_a_time
        return send, recv

    s1, r1 = one_way()
    s2, r2 = one_way()
    return trio.StapledStream(s1, r2), trio.StapledStream(s2, r1)


@asynccontextmanager
async def rpc_pair(
    handler: Handler,
    make: StreamMaker = trio.testing.memory_stream_pair,
    *,
    client_kw: dict[str, Any] | None = None,
    **server_kw: Any,
) -> AsyncIterator[RpcClient]:
    client_stream, server_stream = make()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_rpc, server_stream, handler, **server_kw))
        async with open_rpc_client(client_stream, **(client_kw or {})) as rpc:
            yield rpc


async def echo(request: Any, stream: RpcStream) -> Any:
    return {"echo": request, "method": stream.method, "metadata": dict(stream.metadata)}


async def double_each(stream: RpcStream) -> None:
    async for message in stream:
        await stream.send(message * 2)


async def collect(stream: RpcStream) -> None:
    await stream.send([m async for m in stream], end=True)


def echo_inline(request: Any, stream: RpcStream) -> Any:
    if request == "fail":
        raise RpcError("failed_precondition", "asked to fail")
    if request == "crash":
        raise ZeroDivisionError("secret detail")
    return {"inline": request, "metadata": dict(stream.metadata)}


HANDLERS = route(
    {
        "echo": unary(echo),
        "double": double_each,
        "collect": collect,
        "inline": unary_inline(echo_inline),
    }
)


@pytest.mark.parametrize(
    "make",
    [trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair, trickle_stream_pair],
    ids=["memory", "lockstep", "trickle"],
)
async def test_unary_and_streaming(make: StreamMaker) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(HANDLERS, make) as rpc:
            assert await rpc.call("inline", 5, metadata={"m": 1}) == {
                "inline": 5,
                "metadata": {"m": 1},
            }
            result = await rpc.call("echo", [1, b"two", "three"], metadata={"k": "v"})
            assert result == {
                "echo": [1, b"two", "three"],
                "method": "echo",
                "metadata": {"k": "v"},
            }
            async with rpc.open_stream("double") as st:
                for i in range(40):  # more than one window: grants must flow
                    await st.send(i)
                    assert await st.receive() == 2 * i
                await st.send_end()
                with pytest.raises(EndOfStream):
                    await st.receive()
            async with rpc.open_stream("collect") as st:
                for i in range(100):
                    await st.send(i)
                await st.send_end()
                assert [m async for m in st] == [list(range(100))]


async def test_many_concurrent_streams_in_order() -> None:
    with trio.fail_after(TIMEOUT_S):
        # Concurrency, not the byte budget, is under test (each stream reserves ~5 MiB).
        async with rpc_pair(HANDLERS, max_streams=64, max_buffered_bytes=None) as rpc:
            results: dict[int, list[Any]] = {}

            async def one(n: int) -> None:
                async with rpc.open_stream("double") as st:
                    out = []
                    for i in range(30):
                        await st.send([n, i])
                    await st.send_end()
                    async for m in st:
                        out.append(m)
                    results[n] = out

            async with trio.open_nursery() as nursery:
                for n in range(50):
                    nursery.start_soon(one, n)
            assert results == {n: [[n, i, n, i] for i in range(30)] for n in range(50)}
            stats = rpc.statistics()
            assert stats.open_streams == 0
            assert stats.streams_opened == 50


async def test_slow_consumer_backpressures_only_its_own_stream() -> None:
    release = trio.Event()
    received: list[int] = []

    async def slow(stream: RpcStream) -> None:
        await release.wait()
        async for m in stream:
            received.append(m)
        await stream.send("done", end=True)

    handler = route({"slow": slow, "echo": unary(echo)})
    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(handler) as rpc, rpc.open_stream("slow") as st:
            sent = 0

            async def producer() -> None:
                nonlocal sent
                for i in range(3 * INITIAL_WINDOW_MESSAGES):
                    await st.send(i)
                    sent += 1
                await st.send_end()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(producer)
                await trio.testing.wait_all_tasks_blocked()
                # The producer is parked on credit after exactly one window...
                assert sent == INITIAL_WINDOW_MESSAGES
                assert rpc.statistics().blocked_senders == 1
                assert st.statistics().send_messages == 0
                # ...while other streams on the same connection flow freely.
                for i in range(5):
                    assert (await rpc.call("echo", i))["echo"] == i
                release.set()
            assert await st.receive() == "done"
            assert received == list(range(3 * INITIAL_WINDOW_MESSAGES))


async def test_clogged_transport_with_lockstep_streams() -> None:
    """lockstep: no buffering at all; a big message needs the peer's reader to make progress."""
    big = b"\x07" * (1 << 20)
    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(HANDLERS, trio.testing.lockstep_stream_pair) as rpc:
            result = await rpc.call("echo", big)
            assert result["echo"] == big


async def test_handler_rpc_error_and_internal_error() -> None:
    async def not_found(request: Any, stream: RpcStream) -> Any:
        raise RpcError("not_found", f"no model {request!r}")

    async def crash(request: Any, stream: RpcStream) -> Any:
        raise ValueError("secret detail: key=abc123")

    handler = route({"nf": unary(not_found), "crash": unary(crash), "echo": unary(echo)})
    with trio.fail_after(TIMEOUT_S):
        with structlog.testing.capture_logs() as logs:
            async with rpc_pair(handler) as rpc:
                with pytest.raises(RpcError) as info:
                    await rpc.call("nf", "digits")
                assert (info.value.code, info.value.message) == ("not_found", "no model 'digits'")
                with pytest.raises(RpcError) as info:
                    await rpc.call("crash", 1)
                assert (info.value.code, info.value.message) == ("internal", "internal error")
                with pytest.raises(RpcError) as info:
                    await rpc.call("nope", 1)
                assert info.value.code == "unimplemented"
                assert (await rpc.call("echo", 1))["echo"] == 1  # the connection is fine
        failures = [e for e in logs if e["event"] == "rpc_handler_failed"]
        assert len(failures) == 1
        assert failures[0]["method"] == "crash"
        assert failures[0]["error_type"] == "ValueError"


async def test_client_cancellation_cancels_the_handler(autojump_clock: Any) -> None:
    started = trio.Event()
    cancelled = trio.Event()

    async def hang(stream: RpcStream) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    handler = route({"hang": hang, "echo": unary(echo)})
    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(handler) as rpc:
            with trio.move_on_after(1) as scope:
                await rpc.call("hang", None)
            assert scope.cancelled_caught
            await cancelled.wait()
            # Explicit cancel() on an open stream does the same.
            started = trio.Event()
            cancelled = trio.Event()
            async with rpc.open_stream("hang") as st:
                await started.wait()
                await st.cancel()
                with pytest.raises(RpcError, match="cancelled locally"):
                    await st.receive()
                with pytest.raises(RpcError):
                    await st.send(1)
            await cancelled.wait()
            # Leaving the block early cancels too.
            started = trio.Event()
            cancelled = trio.Event()
            async with rpc.open_stream("hang"):
                await started.wait()
            await cancelled.wait()
            assert (await rpc.call("echo", 2))["echo"] == 2
            assert rpc.statistics().open_streams == 0


async def test_server_cancellation_reaches_the_client() -> None:
    async def cancel_after_one(stream: RpcStream) -> None:
        await stream.send("first")
        await stream.cancel()

    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(route({"c": cancel_after_one})) as rpc, rpc.open_stream("c") as st:
            assert await st.receive() == "first"
            with pytest.raises(RpcError) as info:
                await st.receive()
            assert info.value.code == "cancelled"
            with pytest.raises(RpcError):
                await st.send(1)


async def test_handler_return_ends_the_stream_and_drains_input() -> None:
    async def first_only(stream: RpcStream) -> None:
        await stream.send(await stream.receive())

    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(route({"f": first_only})) as rpc, rpc.open_stream("f") as st:
            # The client keeps sending well past the window after the handler returned.
            for i in range(3 * INITIAL_WINDOW_MESSAGES):
                await st.send(i)
            await st.send_end()
            assert [m async for m in st] == [0]


async def test_stream_misuse() -> None:
    async def hang(stream: RpcStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(route({"h": hang})) as rpc, rpc.open_stream("h") as st:
            await st.send_end()
            await st.send_end()  # idempotent
            with pytest.raises(trio.ClosedResourceError):
                await st.send(1)
            with pytest.raises(TypeError):
                await st.send(object())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(st.receive)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await st.receive()
                nursery.cancel_scope.cancel()


async def test_unary_contract_violations() -> None:
    async def none(stream: RpcStream) -> None:
        await stream.send_end()

    async def two(stream: RpcStream) -> None:
        await stream.send(1)
        await stream.send(2)

    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(route({"none": none, "two": two, "echo": unary(echo)})) as rpc:
            with pytest.raises(RpcError, match="no response"):
                await rpc.call("none", 1)
            with pytest.raises(RpcError, match="more than one"):
                await rpc.call("two", 1)
            async with rpc.open_stream("echo") as st:
                await st.send_end()  # a unary method without a request
                with pytest.raises(RpcError) as info:
                    await st.receive()
                assert info.value.code == "invalid_argument"


async def test_max_streams_refusal_is_per_stream() -> None:
    gate = trio.Event()

    async def wait_gate(stream: RpcStream) -> None:
        await gate.wait()
        await stream.send("ok", end=True)

    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(route({"w": wait_gate}), max_streams=2) as rpc:
            async with rpc.open_stream("w") as a, rpc.open_stream("w") as b:
                with pytest.raises(RpcError) as info:
                    await rpc.call("w", None)
                assert info.value.code == "resource_exhausted"
                gate.set()
                assert await a.receive() == "ok"
                assert await b.receive() == "ok"
            assert await rpc.call("w", None) == "ok"


async def test_oversized_messages() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(
            HANDLERS, max_message_size=1000, client_kw={"max_message_size": 1000}
        ) as rpc:
            with pytest.raises(LocalProtocolError, match="exceeds max_message_size"):
                await rpc.call("echo", b"x" * 2000)
            async with rpc.open_stream("double") as st:
                with pytest.raises(LocalProtocolError):
                    await st.send(b"x" * 2000)
                await st.send(b"x" * 100)  # the stream is still usable
                assert await st.receive() == b"x" * 200


async def _raw_server(stream: trio.abc.Stream, reply: bytes) -> None:
    """Reads whatever the client sends, then answers with ``reply`` (hand-made frames)."""
    await stream.receive_some(65536)
    await stream.send_all(reply)
    await trio.sleep_forever()


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (frame(FrameType.DATA, 1, b"\xc1"), "malformed msgpack"),
        (frame(FrameType.DATA, 3, msgpack.packb(1)), "unknown stream 3"),
        (b"\x7f\xff\xff\xff\x02\x00\x00\x00\x00\x01", "exceeds the limit"),
        (frame(FrameType.OPEN, 2, msgpack.packb(["m", {}])), "only the client opens"),
    ],
)
async def test_client_sees_protocol_violations(reply: bytes, match: str) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_raw_server, server_stream, reply)
            async with open_rpc_client(client_stream) as rpc:
                with pytest.raises(RemoteProtocolError, match=match):
                    await rpc.call("m", 1)
                assert rpc.closed
                with pytest.raises(RemoteProtocolError):
                    await rpc.call("m", 2)
            nursery.cancel_scope.cancel()


async def test_server_rejects_protocol_violation() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    started = trio.Event()
    handler_cancelled = trio.Event()

    async def hang(stream: RpcStream) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            handler_cancelled.set()

    async def attacker() -> None:
        await client_stream.send_all(frame(FrameType.OPEN, 1, msgpack.packb(["h", {}])))
        await started.wait()
        await client_stream.send_all(frame(FrameType.END, 7))

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(attacker)
            with pytest.raises(RemoteProtocolError, match="unknown stream 7"):
                await serve_rpc(server_stream, hang)
            assert handler_cancelled.is_set()


async def test_peer_disconnect_fails_open_streams_promptly() -> None:
    async def hang(stream: RpcStream) -> None:
        await stream.send("hello")
        await trio.sleep_forever()

    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            server_scope = trio.CancelScope()

            async def server() -> None:
                with server_scope:
                    await serve_rpc(server_stream, route({"h": hang}))

            nursery.start_soon(server)
            async with open_rpc_client(client_stream) as rpc, rpc.open_stream("h") as st:
                assert await st.receive() == "hello"
                server_scope.cancel()  # the server goes away mid-stream
                with pytest.raises(ChannelClosed):
                    await st.receive()
                with pytest.raises(ChannelClosed):
                    await rpc.call("h", 1)


async def test_closing_the_client_fails_open_streams() -> None:
    async def hang(stream: RpcStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(route({"h": hang})) as rpc, trio.open_nursery() as nursery:
            errors: list[BaseException] = []

            async def waiter() -> None:
                try:
                    await rpc.call("h", 1)
                except ChannelClosed as exc:
                    errors.append(exc)

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            rpc._conn.fail(ChannelClosed, "closed for the test", None)
        assert len(errors) == 1


async def test_ping_and_statistics() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(HANDLERS) as rpc:
            assert await rpc.ping() >= 0
            await rpc.call("echo", b"x" * 100)
            stats = rpc.statistics()
            assert stats.streams_opened == 1
            assert stats.messages_sent == stats.messages_received == 1
            assert stats.bytes_sent > 100
            assert stats.frames_sent == 3  # PING, OPEN, DATA|END
            assert not stats.closed
        assert rpc.closed


async def test_body_exceptions_are_not_wrapped() -> None:
    client_stream, _server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT_S), pytest.raises(KeyError):
        async with open_rpc_client(client_stream):
            raise KeyError("mine")


async def test_inline_unary_methods() -> None:
    with trio.fail_after(TIMEOUT_S):
        with structlog.testing.capture_logs() as logs:
            async with rpc_pair(HANDLERS) as rpc:
                results = []

                async def many(i: int) -> None:
                    results.append((await rpc.call("inline", i))["inline"])

                async with trio.open_nursery() as nursery:
                    for i in range(100):
                        nursery.start_soon(many, i)
                assert sorted(results) == list(range(100))
                with pytest.raises(RpcError) as info:
                    await rpc.call("inline", "fail")
                assert (info.value.code, info.value.message) == (
                    "failed_precondition",
                    "asked to fail",
                )
                with pytest.raises(RpcError) as info:
                    await rpc.call("inline", "crash")
                assert (info.value.code, info.value.message) == ("internal", "internal error")
                with pytest.raises(RpcError) as info:
                    await rpc.call("no-such-method", 1)
                assert info.value.code == "unimplemented"
                # A client streaming into an inline method: answered at the first message,
                # the rest is drained.
                async with rpc.open_stream("inline") as st:
                    for i in range(3 * INITIAL_WINDOW_MESSAGES):
                        await st.send(i)
                    await st.send_end()
                    assert [m async for m in st] == [{"inline": 0, "metadata": {}}]
                async with rpc.open_stream("inline") as st:
                    await st.send_end()
                    with pytest.raises(RpcError) as info:
                        await st.receive()
                    assert info.value.code == "invalid_argument"
                assert rpc.statistics().running_handlers == 0
        failures = [e for e in logs if e["event"] == "rpc_handler_failed"]
        assert [f["error_type"] for f in failures] == ["ZeroDivisionError"]
        assert "secret" not in repr(failures[0].get("error_type"))


async def test_inline_unary_used_as_plain_handler() -> None:
    """An InlineUnary called as an ordinary handler (e.g. wrapped by user code) still works."""
    inline = unary_inline(echo_inline)

    async def wrapper(stream: RpcStream) -> None:
        await inline(stream)

    with trio.fail_after(TIMEOUT_S):
        async with rpc_pair(wrapper) as rpc:
            assert await rpc.call("x", 1) == {"inline": 1, "metadata": {}}


async def test_server_shutdown_sends_goaway_and_closes() -> None:
    started = trio.Event()

    async def hang(stream: RpcStream) -> None:
        started.set()
        await trio.sleep_forever()

    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            server_scope = trio.CancelScope()

            async def server() -> None:
                with server_scope:
                    await serve_rpc(server_stream, route({"h": hang}))

            nursery.start_soon(server)
            async with open_rpc_client(client_stream) as rpc, rpc.open_stream("h") as st:
                await started.wait()
                server_scope.cancel()  # graceful shutdown: GOAWAY, then close
                with pytest.raises(ChannelClosed):
                    await st.receive()
                assert rpc._conn.core.goaway_received
                with pytest.raises(ChannelClosed):
                    await rpc.call("h", None)


def test_public_api_exports() -> None:
    import transport.rpc as rpc_pkg
    from transport.errors import EnclaveError, TransportError

    for name in rpc_pkg.__all__:
        assert getattr(rpc_pkg, name) is not None, name
    assert issubclass(RpcError, TransportError)
    assert issubclass(RpcError, EnclaveError)
    assert not issubclass(RpcError, RemoteProtocolError)
    assert issubclass(EndOfStream, trio.EndOfChannel)
    err = RpcError("not_found", "x")
    assert (err.code, err.message, str(err)) == ("not_found", "x", "[not_found] x")
    import pickle

    assert pickle.loads(pickle.dumps(err)).code == "not_found"


@pytest.mark.parametrize("size", [100, 100_000], ids=["small-write", "large-write"])
async def test_cancel_during_a_blocked_write_keeps_the_connection(size: int) -> None:
    """A client CANCEL arriving while the handler is stuck in the middle of writing must not
    cut the frame (which would fail the connection): the cancel waits for the write."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    send_stream = server_stream.send_stream
    pump = send_stream.send_all_hook
    assert pump is not None
    gate = trio.Event()
    write_blocked = trio.Event()
    block = False
    handler_cancelled = trio.Event()

    async def gated_pump() -> None:
        if block:
            write_blocked.set()
            await gate.wait()
        await pump()

    send_stream.send_all_hook = gated_pump

    async def big(stream: RpcStream) -> None:
        nonlocal block
        await stream.receive()
        block = True
        try:
            await stream.send(b"\x01" * size)
            await trio.sleep_forever()
        except trio.Cancelled:
            handler_cancelled.set()
            raise

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_rpc, server_stream, route({"big": big, "echo": unary(echo)}))
            async with open_rpc_client(client_stream) as rpc:
                async with rpc.open_stream("big") as st:
                    await st.send("go")
                    await write_blocked.wait()
                    await st.cancel()
                    await trio.testing.wait_all_tasks_blocked()
                    assert not handler_cancelled.is_set()  # deferred until the write is done
                    block = False
                    gate.set()
                await handler_cancelled.wait()
                assert not rpc.closed
                assert (await rpc.call("echo", 7))["echo"] == 7
            nursery.cancel_scope.cancel()
