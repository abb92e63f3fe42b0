"""Memory bounds of the RPC layer (issue 10 item 4, the RPC half): bytes received and not yet
consumed are bounded per stream (the flow-control window) and per connection
(``max_buffered_bytes``), and credit goes back only when the application takes a message.

The attack that motivated it: one client opens streams, sends large messages and never reads
the answers; the server must not buffer more than its bound, whatever the client does.
"""

from __future__ import annotations

import socket
from functools import partial

import pytest
import trio
import trio.testing

from tests.transport.test_rpc_core import ConnectionPair, receive
from transport.errors import LocalProtocolError
from transport.rpc import (
    DEFAULT_MAX_BUFFERED_BYTES,
    INITIAL_WINDOW_BYTES,
    MessageReceived,
    RequestReceived,
    Role,
    RpcConnection,
    RpcError,
    RpcStream,
    StreamErrored,
    StreamOpened,
    open_rpc_client,
    route,
    serve_rpc,
    unary_inline,
)

TIMEOUT_S = 10
MAX_MESSAGE = 256 << 10  # small messages keep the test fast; the rules are the same


def reservation() -> int:
    return RpcConnection(Role.SERVER, max_message_size=MAX_MESSAGE).stream_reservation


# ---------------------------------------------------------------------------- pure core


def test_reservation_is_window_plus_one_message() -> None:
    assert reservation() == INITIAL_WINDOW_BYTES - 1 + MAX_MESSAGE
    with pytest.raises(ValueError, match="max_buffered_bytes"):
        RpcConnection(Role.SERVER, max_message_size=MAX_MESSAGE, max_buffered_bytes=1000)


def test_streams_over_the_budget_are_refused_and_admitted_again_once_consumed() -> None:
    budget = 2 * reservation()
    pair = ConnectionPair(max_message_size=MAX_MESSAGE)
    pair.server = RpcConnection(
        Role.SERVER, max_message_size=MAX_MESSAGE, max_buffered_bytes=budget
    )
    a, b = pair.open(), pair.open()
    refused, data = pair.client.send_open("third")
    assert receive(pair.server, data) == []
    (err,) = pair.flush(pair.server)
    assert isinstance(err, StreamErrored)
    assert err.code == "resource_exhausted"
    # The two admitted streams can fill their windows; the server takes nothing.
    received: list[MessageReceived] = []
    for sid in (a, b):
        while pair.client.has_send_credit(sid):
            frame = pair.client.send_message(sid, b"x" * (MAX_MESSAGE - 16))
            (ev,) = receive(pair.server, frame)
            assert isinstance(ev, MessageReceived)
            received.append(ev)
    stats = pair.server.statistics()
    assert stats.buffered_bytes <= budget
    assert stats.buffered_bytes > budget // 2  # really filled, not trivially bounded
    # The peer is out of credit: it cannot make us hold more.
    assert not pair.client.has_send_credit(a)
    assert not pair.client.has_send_credit(b)
    # The application consumes stream a: grants flow back, and stream a's END frees room.
    for ev in [e for e in received if e.stream_id == a]:
        grant = pair.server.message_consumed(a, ev.size)
        if grant:
            pair.deliver(pair.server, grant)
    assert pair.client.has_send_credit(a)
    assert receive(pair.server, pair.client.send_end(a))  # StreamEnded
    c = pair.open()  # fits again
    assert c > refused


def test_credit_comes_back_only_when_the_application_consumes() -> None:
    pair = ConnectionPair(max_message_size=MAX_MESSAGE)
    sid = pair.open()
    sizes = []
    while pair.client.has_send_credit(sid):
        (ev,) = pair.deliver(pair.client, pair.client.send_message(sid, b"y" * 1000))
        assert isinstance(ev, MessageReceived)
        sizes.append(ev.size)
    assert pair.server.data_to_send() == b""  # receiving alone grants nothing
    grants = b"".join(pair.server.message_consumed(sid, size) for size in sizes)
    assert grants  # consuming does
    assert not pair.client.has_send_credit(sid)
    pair.deliver(pair.server, grants)
    assert pair.client.has_send_credit(sid)
    assert pair.server.statistics().buffered_bytes == 0


def test_a_complete_unary_request_needs_only_its_own_bytes() -> None:
    """Unary calls are not refused because streaming calls hold the budget."""
    budget = reservation() + 4096
    server = RpcConnection(
        Role.SERVER,
        max_message_size=MAX_MESSAGE,
        max_buffered_bytes=budget,
        merge_first_message=True,
        max_streams=64,
    )
    client = RpcConnection(Role.CLIENT, max_message_size=MAX_MESSAGE, max_streams=64)
    sid, data = client.send_open("stream")  # holds a whole reservation
    assert receive(server, data) == [StreamOpened(sid, "stream", {})]
    _, data = client.send_open("stream")  # a second one does not fit
    assert receive(server, data) == []
    for i in range(10):
        payload = client.pack_message(i)
        sid3, data = client.send_open("unary", first=payload, end=True)
        (ev,) = receive(server, data)
        assert isinstance(ev, RequestReceived)
        assert (ev.message, ev.end) == (i, True)
        server.message_consumed(sid3, ev.size)
        server.send_message(sid3, i, end=True)
    assert server.statistics().buffered_bytes == 0


def test_client_budget_refuses_locally() -> None:
    client = RpcConnection(
        Role.CLIENT, max_message_size=MAX_MESSAGE, max_buffered_bytes=reservation()
    )
    client.send_open("a")
    assert client.open_refusal() is not None
    with pytest.raises(LocalProtocolError, match="too much data buffered"):
        client.send_open("b")


# ---------------------------------------------------------------------------- adapter


def socket_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


async def test_a_client_that_never_reads_cannot_make_the_server_buffer_more_than_the_bound() -> (
    None
):
    """Streams that send large messages to a handler that never reads: the server holds at
    most ``max_buffered_bytes``; streams beyond it are refused; senders block on credit; and
    the connection still serves unary calls."""
    budget = 3 * reservation() + (64 << 10)  # three streams, and room for small requests
    never = trio.Event()

    async def sink(stream: RpcStream) -> None:
        await never.wait()  # never reads: everything the client sends stays queued

    handler = route({"sink": sink, "ping": unary_inline(lambda r, s: r)})
    client_stream, server_stream = socket_stream_pair()
    refused = 0
    codes: list[str] = []
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(
                    serve_rpc,
                    server_stream,
                    handler,
                    max_message_size=MAX_MESSAGE,
                    max_buffered_bytes=budget,
                )
            )
            async with open_rpc_client(
                client_stream, max_message_size=MAX_MESSAGE, timeout_s=None
            ) as rpc:

                async def attacker() -> None:
                    nonlocal refused
                    try:
                        async with rpc.open_stream("sink") as st:
                            for _ in range(1000):
                                await st.send(b"A" * (MAX_MESSAGE - 16))
                    except RpcError as exc:
                        codes.append(exc.code)
                        refused += 1

                async with trio.open_nursery() as attackers:
                    for _ in range(8):
                        attackers.start_soon(attacker)
                    # Let it settle: every admitted sender ends up blocked on credit.
                    while rpc.statistics().blocked_senders < 8 - refused:
                        await trio.sleep(0.01)
                    await trio.testing.wait_all_tasks_blocked()
                    stats = server.statistics()
                    assert stats.buffered_bytes <= budget
                    assert stats.buffered_bytes >= 2 * INITIAL_WINDOW_BYTES  # it was pushed
                    assert refused >= 5  # only three streams fit
                    assert set(codes) == {"resource_exhausted"}
                    # Unary calls still get through (they hold only their own bytes).
                    assert await rpc.call("ping", {"n": 1}) == {"n": 1}
                    attackers.cancel_scope.cancel()
            never.set()
            nursery.cancel_scope.cancel()


def test_default_budget_is_documented_size() -> None:
    assert DEFAULT_MAX_BUFFERED_BYTES == 64 << 20
    # A server made with the defaults admits a dozen streams with full windows.
    default = RpcConnection(Role.SERVER).stream_reservation
    assert DEFAULT_MAX_BUFFERED_BYTES // default == 12
