"""The SecureChannel's direct socket path: socket I/O without trio's per-operation wrapper, and
``send_all_eagerly`` (no scheduler pass after a write the socket took at once)."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from tests.transport.channel_helpers import open_secure_pair
from transport.channel import SecureChannel

TIMEOUT_S = 10


async def socketpair_pair() -> tuple[SecureChannel, SecureChannel]:
    a, b = socket.socketpair()
    return await open_secure_pair(
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


async def _receive_exactly(channel: SecureChannel, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = await channel.receive_some()
        assert data, "the peer closed early"
        got += data
    return bytes(got)


async def test_eager_send_lets_no_other_task_run_but_send_all_does() -> None:
    """On a socket transport, send_all_eagerly returns without a schedule point when the socket
    took the record (a task started just before cannot have run); send_all keeps trio's
    contract (a cancel point *and* a schedule point). This also proves the direct socket path
    is in use: through a generic transport the eager send is an ordinary send_all."""
    with trio.fail_after(TIMEOUT_S):
        client, server = await socketpair_pair()
        ran: list[str] = []

        async def other_task() -> None:
            ran.append("ran")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            for _ in range(3):
                await client.send_all_eagerly(b"ping")
            assert ran == []
            with (
                pytest.raises(AssertionError, match="did not yield"),
                trio.testing.assert_checkpoints(),
            ):
                await client.send_all_eagerly(b"ping")
            with trio.testing.assert_checkpoints():
                await client.send_all(b"pong")
        assert ran == ["ran"]
        assert await _receive_exactly(server, 20) == b"ping" * 4 + b"pong"
        await client.aclose()
        await server.aclose()


async def test_eager_send_is_still_a_cancel_point() -> None:
    """A cancelled caller sends nothing, and the channel stays usable."""
    with trio.fail_after(TIMEOUT_S):
        client, server = await socketpair_pair()
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.send_all_eagerly(b"never")
        assert scope.cancelled_caught
        await client.send_all_eagerly(b"after")
        assert await _receive_exactly(server, 5) == b"after"
        await client.aclose()
        await server.aclose()


async def test_eager_send_larger_than_the_socket_buffer_waits_and_delivers_it_all() -> None:
    """A write the socket cannot take at once waits for room (and yields meanwhile), so a
    reader in the same run drains it; every byte arrives in order."""
    payload = os.urandom(4 * 1024 * 1024)  # several times the socket buffers
    with trio.fail_after(TIMEOUT_S):
        client, server = await socketpair_pair()
        received: list[bytes] = []

        async def read_all() -> None:
            received.append(await _receive_exactly(server, len(payload)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await client.send_all_eagerly(payload)
        assert received == [payload]
        await client.aclose()
        await server.aclose()


async def test_receive_on_a_closed_channel_and_a_closed_socket_is_closed_resource() -> None:
    """The direct path keeps SocketStream's error vocabulary: our own closed socket is a
    ClosedResourceError, not an OSError."""
    with trio.fail_after(TIMEOUT_S):
        client, server = await socketpair_pair()

        async def receive() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await server.receive_some()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await server.aclose()  # closes the socket under the waiting receiver
        await client.aclose()
