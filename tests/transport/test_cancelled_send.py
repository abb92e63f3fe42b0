"""A write cancelled while the socket is full keeps the stream whole (transport/_sockwrite.py).

Before, a cancelled ``send_all`` broke the SecureChannel, and a cancelled small RPC write failed
the whole RPC connection: a caller's ``move_on_after`` around one call on a busy connection
killed every other call on it (``test_rpc_socket.py::test_mixed_load...`` flaked on it under
load). Now the rest of the write waits in the :class:`SocketWriter` and goes out first.
"""

from __future__ import annotations

import random
import socket
from typing import Any

import pytest
import trio
import trio.testing

from tests.transport.channel_helpers import open_secure_pair
from transport._sockwrite import SocketWriter, stdlib_socket
from transport.channel import MAX_RECORD_PLAINTEXT, SecureChannel
from transport.errors import ChannelClosed
from transport.rpc import RpcStream, open_rpc_client, route, serve_rpc, unary_inline

TIMEOUT_S = 20
#: Larger than any socket buffer here (AF_UNIX defaults to ~208 KiB; the channel sets 1 MiB).
BIG = 4 << 20


def _socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


async def _channels() -> tuple[SecureChannel, SecureChannel]:
    return await open_secure_pair(*_socket_streams())


async def _memory_channels() -> tuple[SecureChannel, SecureChannel]:
    return await open_secure_pair(*trio.testing.lockstep_stream_pair())


async def _read_until_eof(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    while data := await stream.receive_some(65536):
        into += data


async def test_socket_writer_keeps_the_rest_of_a_cancelled_write_and_sends_it_first() -> None:
    with trio.fail_after(TIMEOUT_S):
        a, b = _socket_streams()
        raw = stdlib_socket(a)
        assert raw is not None
        writer = SocketWriter(raw)
        first = bytes(random.Random(1).randbytes(BIG))
        with trio.move_on_after(0.05) as scope:
            await writer.send_all(first)  # nobody reads: blocks, then is cancelled
        assert scope.cancelled_caught
        assert 0 < writer.unsent < len(first)
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_until_eof, b, got)
            await writer.send_all(b"second")
            assert writer.unsent == 0
            await writer.flush()  # nothing left: only a checkpoint
            await a.send_eof()
        assert bytes(got) == first + b"second"


async def test_socket_writer_flush_completes_a_cancelled_write() -> None:
    with trio.fail_after(TIMEOUT_S):
        a, b = _socket_streams()
        raw = stdlib_socket(a)
        assert raw is not None
        writer = SocketWriter(raw)
        data = bytes(BIG)
        with trio.move_on_after(0.05):
            await writer.send_all(data)
        assert writer.unsent
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_until_eof, b, got)
            await writer.flush()
            await a.send_eof()
        assert len(got) == len(data)


def test_only_socket_streams_have_a_stdlib_socket() -> None:
    client, _ = trio.testing.memory_stream_pair()
    assert stdlib_socket(client) is None


async def test_a_cancelled_channel_send_leaves_the_channel_usable() -> None:
    """The records the cancelled send had sealed arrive first, intact; what it had not sealed
    is not sent; the channel carries on (no AuthenticationFailed, a clean close)."""
    with trio.fail_after(TIMEOUT_S):
        client, server = await _channels()
        assert client.resumes_sends
        data = random.Random(2).randbytes(BIG)
        with trio.move_on_after(0.05) as scope:
            await client.send_all(data)
        assert scope.cancelled_caught
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_until_eof, server, got)
            await client.send_all(b"after")
            await client.send_eof()
        sent = len(got) - len(b"after")
        assert 0 < sent < len(data)
        assert bytes(got) == data[:sent] + b"after"


async def test_channel_flush_and_aclose_deliver_what_a_cancelled_send_kept() -> None:
    with trio.fail_after(TIMEOUT_S):
        client, server = await _channels()
        data = bytes(BIG)
        with trio.move_on_after(0.05):
            await client.send_all(data)
        with trio.move_on_after(0.05) as scope:
            await client.send_eof()  # the close record queues behind the kept rest: cancelled
        assert scope.cancelled_caught
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_until_eof, server, got)  # ends cleanly: the close arrived
            await client.flush()
            await client.aclose()
        assert 0 < len(got) <= len(data)


async def test_aclose_sends_what_a_cancelled_send_kept_before_its_close_record() -> None:
    with trio.fail_after(TIMEOUT_S):
        client, server = await _channels()
        with trio.move_on_after(0.05):
            await client.send_all(bytes(BIG))
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_until_eof, server, got)
            await client.aclose()
        assert got


@pytest.mark.parametrize("seed", range(3))
async def test_random_cancelled_sends_never_corrupt_the_channel(seed: int) -> None:
    """Sends of random sizes under random deadlines while the reader dawdles: the receiver
    gets, for each send, all of it (not cancelled) or a prefix of it (cancelled), in order,
    and never an authentication failure."""
    rng = random.Random(seed)
    with trio.fail_after(TIMEOUT_S):
        client, server = await _channels()
        got = bytearray()

        async def slow_reader() -> None:
            while data := await server.receive_some(rng.choice([1024, 65536])):
                got.extend(data)
                await trio.sleep(rng.choice([0, 0, 0.001]))

        sent: list[tuple[bytes, bool]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            for i in range(30):
                message = bytes([i]) * rng.choice([10, 70_000, 300_000, 1_500_000])
                with trio.move_on_after(rng.choice([0.0005, 0.002, 0.01, 1])) as scope:
                    await client.send_all(message)
                sent.append((message, scope.cancelled_caught))
            await client.send_eof()
        position = 0
        for message, cancelled in sent:
            if cancelled:  # a prefix of it (maybe empty, maybe whole): its bytes are all message[0]
                n = 0
                end = min(len(message), len(got) - position)
                while n < end and got[position + n] == message[0]:
                    n += 1
                position += n
            else:
                assert got[position : position + len(message)] == message
                position += len(message)
        assert position == len(got)


async def test_a_send_cancelled_on_a_non_socket_transport_still_breaks_the_channel() -> None:
    with trio.fail_after(TIMEOUT_S):
        client, _server = await _memory_channels()
        assert not client.resumes_sends
        with trio.move_on_after(0.05):
            await client.send_all(bytes(BIG))  # the memory stream blocks: nobody reads
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")


def _echo(request: Any, _stream: RpcStream) -> Any:
    return request


@pytest.mark.parametrize("secure", [False, True], ids=["socket", "channel"])
async def test_an_rpc_call_cancelled_while_its_write_blocks_leaves_the_connection_up(
    secure: bool,
) -> None:
    """A call whose (small, unshielded) write blocks, because the server is not reading yet, is
    cancelled by its deadline; the connection survives, the server reads every frame whole
    (the rest of the request, then the CANCEL), and later calls work. Before, the cancelled
    write failed the whole connection."""
    client_stream: trio.abc.Stream
    server_stream: trio.abc.Stream
    if secure:
        client_stream, server_stream = await _channels()
        sock = client_stream.transport_stream
    else:
        client_stream, server_stream = _socket_streams()
        sock = client_stream
    assert isinstance(sock, trio.SocketStream)
    # The smallest send buffer (AF_UNIX limits what is in flight by the sender's): the request
    # cannot go out whole until the server reads.
    sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    request = b"r" * 12_000  # under UNSHIELDED_WRITE_SIZE (16 KiB): the unshielded path

    async def serve_later() -> None:
        await trio.sleep(0.3)  # after the call's deadline (0.1 s)
        await serve_rpc(server_stream, route({"echo": unary_inline(_echo)}))

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery, open_rpc_client(client_stream) as rpc:
            nursery.start_soon(serve_later)
            with trio.move_on_after(0.1) as scope:
                await rpc.call("echo", request)
            assert scope.cancelled_caught
            assert not rpc.statistics().closed
            for _ in range(3):
                assert await rpc.call("echo", request) == request
            assert rpc.statistics().open_streams == 0
            nursery.cancel_scope.cancel()


async def test_rpc_over_a_non_socket_transport_still_fails_on_a_cancelled_write() -> None:
    """Where the transport cannot keep the rest of a write, half a frame may be on the wire:
    the connection fails (as before), and says why."""
    client_stream, _server_stream = trio.testing.lockstep_stream_pair()
    with trio.fail_after(TIMEOUT_S):
        async with open_rpc_client(client_stream) as rpc:
            with trio.move_on_after(0.05):
                await rpc.call("echo", b"x" * 12_000)  # the memory stream never drains
            with pytest.raises(ChannelClosed, match="cancelled"):
                await rpc.call("echo", b"y")


async def test_send_eof_again_sends_the_close_record_a_cancelled_one_left() -> None:
    """After a cancelled send_eof, a repeat still delivers the close record (whether the
    cancelled one had sealed it or not): the reader ends cleanly (b""), not with a truncation."""
    with trio.fail_after(TIMEOUT_S):
        client, server = await _channels()
        with trio.move_on_after(0.05):
            await client.send_all(bytes(BIG))
        with trio.move_on_after(0.05) as scope:
            await client.send_eof()
        assert scope.cancelled_caught
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_until_eof, server, got)
            await client.send_eof()
        assert got
        await client.send_eof()  # and once more: nothing left, a checkpoint


async def test_retried_cancelled_sends_to_a_stalled_peer_hold_one_write_at_most() -> None:
    """A caller that keeps retrying with short deadlines against a stalled peer must not pile
    up sealed records: what a cancelled send kept is written before anything new is sealed."""
    with trio.fail_after(TIMEOUT_S):
        client, server = await _channels()
        chunk = bytes(256 << 10)
        for _ in range(40):  # 10 MB offered, far past the socket buffers
            with trio.move_on_after(0.005):
                await client.send_all(chunk)
        held = client.statistics().bytes_unsent
        assert held <= 4 * (MAX_RECORD_PLAINTEXT + 64)  # one write of four records
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_until_eof, server, got)
            await client.send_eof()
        assert client.statistics().bytes_unsent == 0
        assert not any(got)  # whole records of the zero chunks, nothing garbled
