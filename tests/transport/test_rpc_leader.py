"""The low-latency paths of the RPC adapter: client tasks that read the connection themselves
(leader/follower) and the server's reused handler tasks.

What must hold however the read role moves: no message lost or reordered when the task holding
it is cancelled in the middle of a frame (or of a secure-channel record), concurrent callers all
get their own answers, an idle client still notices the server going away, and a handler task
reused after a cancelled handler runs the next one normally.
"""

from __future__ import annotations

import contextvars
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from transport.channel import Suite, accept_channel, connect_channel
from transport.channel.testing import TestAuthority, TestVerifier, default_pcrs
from transport.errors import ChannelClosed
from transport.rpc import (
    RpcClient,
    RpcError,
    RpcServerConnection,
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


async def tagged(request: Any, stream: RpcStream) -> Any:
    for _ in range(random.randrange(3)):  # answers come back in a shuffled order
        await trio.lowlevel.checkpoint()
    return {"tag": request, "method": stream.method}


async def test_concurrent_callers_each_get_their_own_answer() -> None:
    client_stream, server_stream = socket_stream_pair()
    handler = route({"t": unary(tagged), "i": unary_inline(lambda r, s: {"tag": r})})
    results: dict[int, Any] = {}

    async def caller(rpc: RpcClient, base: int) -> None:
        for i in range(40):
            n = base * 1000 + i
            method = "t" if i % 3 else "i"
            results[n] = (await rpc.call(method, n))["tag"]

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_rpc, server_stream, handler)
            async with open_rpc_client(client_stream) as rpc:
                async with trio.open_nursery() as callers:
                    for base in range(12):
                        callers.start_soon(caller, rpc, base)
                assert rpc.statistics().open_streams == 0
            nursery.cancel_scope.cancel()
    assert results == {n: n for n in results}
    assert len(results) == 12 * 40


@asynccontextmanager
async def held_back_pair(
    secure: bool,
) -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream, Any]]:
    """A client/server stream pair whose server→client bytes are delivered only by calling
    the returned ``release(n)``, so a test can stop delivery in the middle of a frame or a
    channel record. With ``secure`` both ends are SecureChannels over it."""
    c2s_send, c2s_recv = trio.testing.memory_stream_one_way_pair()
    s2c_send, s2c_recv = trio.testing.memory_stream_one_way_pair()
    client: trio.abc.Stream = trio.StapledStream(c2s_send, s2c_recv)
    server: trio.abc.Stream = trio.StapledStream(s2c_send, c2s_recv)
    if secure:
        authority = TestAuthority()
        verifier = TestVerifier(authority.public_key, expected_pcrs=default_pcrs())
        async with trio.open_nursery() as nursery:
            box: list[trio.abc.Stream] = []

            async def accept() -> None:
                box.append(
                    await accept_channel(
                        server, attester=authority.attester(), suites=[Suite.X25519]
                    )
                )

            nursery.start_soon(accept)
            client = await connect_channel(client, verifier=verifier)
        server = box[0]
    s2c_send.send_all_hook = None  # from now on, nothing moves until release()

    def release(n: int) -> None:
        trio.testing.memory_stream_pump(s2c_send, s2c_recv, max_bytes=n)

    yield client, server, release


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-channel"])
async def test_reader_cancelled_mid_frame_loses_nothing(secure: bool) -> None:
    """The caller holding the read role is cancelled after half of a large reply arrived; a
    second caller takes over and the byte stream stays in sync (its own answer is intact)."""
    big = b"z" * 40_000
    handler = route(
        {
            "big": unary_inline(lambda r, s: big),
            "small": unary_inline(lambda r, s: {"ok": r}),
        }
    )
    with trio.fail_after(TIMEOUT_S):
        async with (
            held_back_pair(secure) as (client_stream, server_stream, release),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(serve_rpc, server_stream, handler)
            async with open_rpc_client(client_stream) as rpc:
                big_scope = trio.CancelScope()
                answers: list[Any] = []

                async def big_caller() -> None:
                    with big_scope:
                        await rpc.call("big", None)

                async def small_caller() -> None:
                    answers.append(await rpc.call("small", 7))

                async with trio.open_nursery() as callers:
                    callers.start_soon(big_caller)
                    await trio.testing.wait_all_tasks_blocked()
                    callers.start_soon(small_caller)
                    await trio.testing.wait_all_tasks_blocked()
                    release(len(big) // 2)  # half of the big answer
                    await trio.testing.wait_all_tasks_blocked()
                    # (white box) a caller's own task is the one reading (only the big call
                    # waits for input: the small one's answer waits behind the big one)
                    assert rpc._conn.reading.leading
                    assert not rpc._conn.reading.background_leading
                    big_scope.cancel()  # the reader goes away mid-frame / mid-record
                    await trio.testing.wait_all_tasks_blocked()
                    release(1 << 20)  # the rest, then the small answer
                    while not answers:
                        await trio.testing.wait_all_tasks_blocked()
                        release(1 << 20)  # (the CANCEL's side effects, if any)
                assert answers == [{"ok": 7}]
                assert big_scope.cancelled_caught
                assert not rpc.closed

                async def pump() -> None:
                    while True:
                        await trio.testing.wait_all_tasks_blocked()
                        release(1 << 20)

                nursery.start_soon(pump)
                assert await rpc.call("small", 8) == {"ok": 8}
            nursery.cancel_scope.cancel()


async def test_idle_client_notices_the_server_going_away() -> None:
    client_stream, server_stream = socket_stream_pair()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            server_scope = trio.CancelScope()

            async def server() -> None:
                with server_scope:
                    await serve_rpc(server_stream, unary_inline(lambda r, s: r))

            nursery.start_soon(server)
            async with open_rpc_client(client_stream) as rpc:
                assert await rpc.call("x", 1) == 1
                server_scope.cancel()  # GOAWAY, then close; nobody on the client is calling
                while not rpc.closed:
                    await trio.sleep(0.001)
                with pytest.raises(ChannelClosed):
                    await rpc.call("x", 2)


async def test_handler_task_reused_after_a_cancelled_handler() -> None:
    """A handler cancelled by the client's CANCEL leaves its (reused) task able to run the
    following handlers normally, uncancelled; handler tasks stay bounded."""
    started = trio.Event()

    async def hang(request: Any, stream: RpcStream) -> Any:
        started.set()
        await trio.sleep_forever()

    async def slow_echo(request: Any, stream: RpcStream) -> Any:
        await trio.sleep(0.001)  # really parks: a cancelled scope would raise here
        return request

    handler = route({"hang": unary(hang), "echo": unary(slow_echo)})
    client_stream, server_stream = socket_stream_pair()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            server: RpcServerConnection = await nursery.start(serve_rpc, server_stream, handler)
            async with open_rpc_client(client_stream) as rpc:
                for round_ in range(3):
                    started = trio.Event()
                    with trio.move_on_after(5) as scope:
                        async with trio.open_nursery() as inner:
                            inner.start_soon(rpc.call, "hang", None)
                            await started.wait()
                            inner.cancel_scope.cancel()  # -> CANCEL -> handler cancelled
                    assert not scope.cancelled_caught
                    while server.statistics().running_handlers:
                        await trio.sleep(0.001)
                    for i in range(5):
                        assert await rpc.call("echo", [round_, i]) == [round_, i]
                with pytest.raises(RpcError) as info:
                    await rpc.call("nope", None)
                assert info.value.code == "unimplemented"
                assert server.statistics().running_handlers == 0
            nursery.cancel_scope.cancel()


async def test_context_variables_do_not_leak_between_handlers() -> None:
    """Handler tasks are reused, but each handler starts from a fresh copy of the server's
    context, as if it had its own task."""
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=0)

    async def bump(request: Any, stream: RpcStream) -> Any:
        before = var.get()
        var.set(before + 1)
        await trio.sleep(0)
        return before

    client_stream, server_stream = socket_stream_pair()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_rpc, server_stream, unary(bump))
            async with open_rpc_client(client_stream) as rpc:
                assert [await rpc.call("b", None) for _ in range(10)] == [0] * 10
            nursery.cancel_scope.cancel()


async def secure_socket_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    client_sock, server_sock = socket_stream_pair()
    authority = TestAuthority()
    verifier = TestVerifier(authority.public_key, expected_pcrs=default_pcrs())
    box: list[trio.abc.Stream] = []

    async def accept() -> None:
        box.append(
            await accept_channel(server_sock, attester=authority.attester(), suites=[Suite.X25519])
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        client = await connect_channel(client_sock, verifier=verifier)
    return client, box[0]


@pytest.mark.parametrize("kind", ["memory", "socket", "secure-channel"])
async def test_closing_the_client_wakes_a_caller_that_is_reading(kind: str) -> None:
    """The task holding the read role is inside ``receive_some``, not parked on its stream:
    leaving ``open_rpc_client`` must still end its call promptly with ChannelClosed."""

    async def hang(request: Any, stream: RpcStream) -> Any:
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT_S):
        if kind == "memory":
            pair: tuple[trio.abc.Stream, trio.abc.Stream] = trio.testing.memory_stream_pair()
        elif kind == "socket":
            pair = socket_stream_pair()
        else:
            pair = await secure_socket_pair()
        client_stream, server_stream = pair
        failures: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_rpc, server_stream, unary(hang))
            async with trio.open_nursery() as callers, open_rpc_client(client_stream) as rpc:

                async def caller() -> None:
                    try:
                        await rpc.call("hang", None)
                    except ChannelClosed as exc:
                        failures.append(exc)

                callers.start_soon(caller)
                await trio.testing.wait_all_tasks_blocked()
                # (white box) the caller's own task is the one reading
                assert rpc._conn.reading.leading
                assert not rpc._conn.reading.background_leading
            assert len(failures) == 1
            nursery.cancel_scope.cancel()


async def test_sender_blocked_on_a_full_socket_while_nobody_reads_does_not_deadlock() -> None:
    """The client task writes large messages without reading the echoes: the server's writes
    fill the client's socket buffer, the server stops reading, and the client's own write
    blocks. Someone on the client must read (the background reader, within its idle period)
    even though no task waits for input, or both sides would block forever."""

    async def echo_all(stream: RpcStream) -> None:
        async for message in stream:
            await stream.send(message)

    client_stream, server_stream = socket_stream_pair()
    for s in (client_stream, server_stream):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            s.socket.setsockopt(socket.SOL_SOCKET, option, 16 * 1024)  # tiny kernel buffers
    payload = b"p" * 60_000
    count = 40  # 2.4 MB each way, far above the socket buffers and one stream window
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_rpc, server_stream, echo_all)
            async with open_rpc_client(client_stream) as rpc, rpc.open_stream("e") as st:
                received = 0

                async def consume_later() -> None:
                    nonlocal received
                    await trio.sleep(0.05)  # start reading only once everything is stuck
                    async for message in st:
                        assert message == payload
                        received += 1

                async with trio.open_nursery() as inner:
                    inner.start_soon(consume_later)
                    for _ in range(count):
                        await st.send(payload)
                    await st.send_end()
                assert received == count
            nursery.cancel_scope.cancel()


async def test_background_reader_resumes_at_once_after_a_long_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """During a long call the background reader looks less and less often; when the call
    ends it must take over at once (here: notice the server going away promptly).

    Mock time over in-memory streams: the clock only moves when every task waits for a
    timer, so the bound below measures the reader's timers, not how busy the machine is (in
    real time a descheduled test process could exceed any bound under the backed-off period,
    and a reader that is not woken could still happen to look within it)."""

    async def slow(request: Any, stream: RpcStream) -> Any:
        await trio.sleep(0.6)  # long enough for the background reader to back off
        return request

    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            server_scope = trio.CancelScope()

            async def server() -> None:
                with server_scope:
                    await serve_rpc(server_stream, unary(slow))

            nursery.start_soon(server)
            async with open_rpc_client(client_stream) as rpc:
                assert await rpc.call("slow", 1) == 1
                server_scope.cancel()
                # Woken at once, the reader sees the EOF before any timer of its own expires
                # (the loop's own 1 ms sleeps aside); left to its backed-off timer (up to
                # 0.128 s) it would not.
                with trio.fail_after(0.01):
                    while not rpc.closed:
                        await trio.sleep(0.001)
