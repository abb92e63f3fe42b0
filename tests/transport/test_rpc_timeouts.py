"""No hangs (issue 10 items 4 and 5): a peer that stops sending mid-record or mid-stream ends in
a typed timeout error on the client (default deadline 30 s, configurable), and the server
closes idle and stalled connections. Tested through a relay that withholds bytes.

Time is trio's MockClock with autojump (pytest-trio's ``autojump_clock``): the clock jumps
whenever every task is blocked, so a 30 s deadline takes no real time and the assertions on
when things happen are exact, not racy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from transport.channel import SecureChannel, Suite, accept_channel, connect_channel
from transport.channel.testing import TestAuthority
from transport.errors import AuthenticationFailed, ChannelClosed, PeerTimeout
from transport.rpc import (
    DEFAULT_CALL_TIMEOUT_S,
    HEADER,
    FrameType,
    Role,
    RpcConnection,
    RpcError,
    RpcServerConnection,
    RpcStream,
    open_rpc_client,
    route,
    serve_rpc,
    unary,
    unary_inline,
)

#: Bound on each test in *mock* seconds (autojump makes waiting free).
TIMEOUT_S = 1000


class Relay:
    """Pipes bytes between a client end and a server end, and can stop forwarding either
    direction after a number of further bytes (withholding the rest: mid-frame, mid-record).

    ``lockstep``: the server's link has no buffer, so a server writing to a client whose
    relay stopped reading blocks in ``send_all`` (a client that stopped reading).
    """

    def __init__(self, *, lockstep: bool = False) -> None:
        self.client, self._client_side = trio.testing.memory_stream_pair()
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        self._server_side, self.server = pair()
        self.allow: dict[str, int | None] = {"up": None, "down": None}

    def withhold(self, direction: str, *, after: int = 0) -> None:
        """Forward ``after`` more bytes in ``direction`` ("up": to the server), then nothing."""
        self.allow[direction] = after

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, self._client_side, self._server_side, "up")
            nursery.start_soon(self._pump, self._server_side, self._client_side, "down")

    async def _pump(self, src: trio.abc.Stream, dst: trio.abc.Stream, direction: str) -> None:
        try:
            await self._copy(src, dst, direction)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            await trio.aclose_forcefully(dst)  # one end went away: so does the other

    async def _copy(self, src: trio.abc.Stream, dst: trio.abc.Stream, direction: str) -> None:
        while True:
            allowed = self.allow[direction]
            if allowed == 0:
                await trio.sleep_forever()  # withholding: read nothing more, send nothing
            data = await src.receive_some(1 if allowed is not None else 65536)
            if not data:
                await dst.aclose()
                return
            if allowed is not None:
                self.allow[direction] = allowed - len(data)
            await dst.send_all(data)


@asynccontextmanager
async def relayed(
    handler: Any, *, lockstep: bool = False, **server_kw: Any
) -> AsyncIterator[tuple[Relay, RpcServerConnection, trio.Nursery]]:
    relay = Relay(lockstep=lockstep)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        server = await nursery.start(partial(serve_rpc, relay.server, handler, **server_kw))
        yield relay, server, nursery
        nursery.cancel_scope.cancel()


async def hang(request: Any, stream: RpcStream) -> Any:
    await trio.sleep_forever()


async def two_then_silence(stream: RpcStream) -> None:
    await stream.send("one")
    await stream.send("two")
    await trio.sleep_forever()  # alive, but sends nothing more


HANDLERS = route(
    {
        "hang": unary(hang),
        "echo": unary_inline(lambda request, stream: request),
        "big": unary_inline(lambda request, stream: b"B" * 200_000),
        "two": two_then_silence,
    }
)


# ---------------------------------------------------------------------------- client side


def test_the_default_deadline_is_at_most_30_s() -> None:
    assert 0 < DEFAULT_CALL_TIMEOUT_S <= 30


async def test_a_call_the_server_never_answers_times_out_and_the_connection_lives_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with relayed(HANDLERS) as (relay, _, _), open_rpc_client(relay.client) as rpc:
            start = trio.current_time()
            with pytest.raises(PeerTimeout, match="'hang'"):
                await rpc.call("hang", None)  # the client's default deadline
            elapsed = trio.current_time() - start
            assert DEFAULT_CALL_TIMEOUT_S <= elapsed < DEFAULT_CALL_TIMEOUT_S + 1
            # The server is alive (it answered the liveness PING): the connection still works.
            assert not rpc.closed
            assert await rpc.call("echo", 7) == 7
            start = trio.current_time()
            with pytest.raises(PeerTimeout):
                await rpc.call("hang", None, timeout_s=2.5)  # a per-call deadline
            assert 2.5 <= trio.current_time() - start < 3.5


async def test_an_answer_withheld_mid_frame_ends_in_peer_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            relayed(HANDLERS) as (relay, _, _),
            open_rpc_client(relay.client, timeout_s=5) as rpc,
        ):
            assert await rpc.call("echo", 1) == 1
            relay.withhold("down", after=50)  # the big answer stops 50 bytes in
            start = trio.current_time()
            with pytest.raises(PeerTimeout):
                await rpc.call("big", None)
            # The deadline (5 s), then the liveness probe's grace: the peer is stalled.
            assert 5 <= trio.current_time() - start <= 11
            assert rpc.closed
            with pytest.raises(PeerTimeout):  # the connection failed as stalled
                await rpc.call("echo", 2)


async def test_a_stream_that_stops_mid_stream_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            relayed(HANDLERS) as (relay, _, _),
            open_rpc_client(relay.client, timeout_s=4) as rpc,
        ):
            async with rpc.open_stream("two") as st:
                assert await st.receive() == "one"
                assert await st.receive() == "two"
                start = trio.current_time()
                with pytest.raises(PeerTimeout, match="stream"):
                    await st.receive()
                assert 4 <= trio.current_time() - start < 5
            assert await rpc.call("echo", 3) == 3  # the rest of the connection is fine


async def test_a_secure_channel_answer_withheld_mid_record_ends_in_peer_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    authority = TestAuthority()
    relay = Relay()

    async def server() -> None:
        channel = await accept_channel(relay.server, attester=authority.attester())
        # The client gives up on the stalled connection and drops it without a close record:
        # from here that is a truncation.
        with pytest.raises(AuthenticationFailed):
            await serve_rpc(channel, HANDLERS)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            nursery.start_soon(server)
            channel = await connect_channel(relay.client, verifier=authority.verifier())
            async with open_rpc_client(channel, timeout_s=5) as rpc:
                assert await rpc.call("echo", "x") == "x"
                relay.withhold("down", after=30)  # inside the first record of the answer
                with pytest.raises(PeerTimeout):
                    await rpc.call("big", None)
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- server side


async def test_the_server_closes_an_idle_connection(autojump_clock: trio.testing.MockClock) -> None:
    """64 clients that handshake and sit idle used to hold every slot for ever."""
    relay = Relay()
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            closed = trio.Event()

            async def server() -> None:
                await serve_rpc(relay.server, HANDLERS, idle_timeout=3.0)
                closed.set()  # returned by itself: it closed the connection

            nursery.start_soon(server)
            async with open_rpc_client(relay.client) as rpc:
                assert await rpc.call("echo", 1) == 1
                start = trio.current_time()
                await closed.wait()
                assert 3 <= trio.current_time() - start < 4
                with pytest.raises((ChannelClosed, RpcError)):  # GOAWAY, then EOF
                    await rpc.call("echo", 2)
            nursery.cancel_scope.cancel()
    reasons = [e["reason"] for e in logs if e["event"] == "rpc_connection_closed"]
    assert reasons == ["idle"]


async def test_the_server_closes_a_client_stalled_mid_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    relay = Relay()
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            start = trio.current_time()
            async with trio.open_nursery() as server:
                server.start_soon(
                    partial(serve_rpc, relay.server, HANDLERS, stall_timeout=2.0, idle_timeout=None)
                )
                # Half a frame: a header promising 100 bytes, then 10 of them.
                await relay.client.send_all(HEADER.pack(100, FrameType.OPEN, 0, 1) + b"x" * 10)
            assert 2 <= trio.current_time() - start < 3  # serve_rpc returned: it closed
            nursery.cancel_scope.cancel()
    assert any(e["event"] == "rpc_connection_closed" and "mid-frame" in e["reason"] for e in logs)


async def test_the_server_closes_a_client_stalled_mid_record(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same one layer down: a secure-channel record left half-sent."""
    authority = TestAuthority()
    relay = Relay()
    channels: list[SecureChannel] = []
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)

            async def server() -> None:
                channel = await accept_channel(
                    relay.server, attester=authority.attester(), suites=[Suite.X25519]
                )
                await serve_rpc(channel, HANDLERS, stall_timeout=2.0, idle_timeout=None)

            async with trio.open_nursery() as servers:
                servers.start_soon(server)
                channel = await connect_channel(relay.client, verifier=authority.verifier())
                channels.append(channel)
                record = channel._conn.seal_record(b"\x00" * 64)  # (white box: raw record)
                await relay.client.send_all(record[:-5])  # all but its last 5 bytes
                start = trio.current_time()
            assert 2 <= trio.current_time() - start < 3
            nursery.cancel_scope.cancel()
    assert any(e["event"] == "rpc_connection_closed" and "mid-frame" in e["reason"] for e in logs)


async def test_the_server_closes_a_client_that_stops_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def firehose(stream: RpcStream) -> None:
        while True:
            await stream.send(b"F" * 60_000)

    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with relayed(
            route({"firehose": firehose}),
            lockstep=True,
            stall_timeout=2.0,
            idle_timeout=None,
        ) as (relay, server, _):
            # Open the stream by hand (no client reader): nothing will ever read the answers.
            core = RpcConnection(Role.CLIENT)
            _, data = core.send_open("firehose")
            await relay.client.send_all(data)
            relay.withhold("down")  # the client reads nothing
            while not server.closed:
                await trio.sleep(0.5)
    reasons = [e["reason"] for e in logs if e["event"] == "rpc_connection_closed"]
    assert reasons == ["the client stopped reading"]
