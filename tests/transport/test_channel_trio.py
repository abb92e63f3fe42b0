"""The trio adapter of enclave-channel/1 over trio.testing streams, then real Unix sockets.

Rules (trio-websocket's): loopback/Unix sockets only; every I/O test under an absolute
``trio.fail_after``; timing-dependent tests use the autojump clock.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from tests.transport.channel_helpers import open_secure_pair
from transport.channel import (
    MAX_RECORD_PLAINTEXT,
    SecureChannel,
    Suite,
    accept_channel,
    connect_channel,
)
from transport.channel.testing import TestAuthority
from transport.errors import (
    AuthenticationFailed,
    ChannelClosed,
    LocalProtocolError,
    PeerTimeout,
    PeerUnreachable,
)

TIMEOUT_S = 10


def socket_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


async def memory_pair(**kwargs: Any) -> tuple[SecureChannel, SecureChannel]:
    a, b = trio.testing.memory_stream_pair()
    return await open_secure_pair(a, b, **kwargs)


async def lockstep_pair(**kwargs: Any) -> tuple[SecureChannel, SecureChannel]:
    a, b = trio.testing.lockstep_stream_pair()
    return await open_secure_pair(a, b, **kwargs)


async def test_round_trip_over_memory_streams_both_suites() -> None:
    with trio.fail_after(TIMEOUT_S):
        for suite in (Suite.X25519, Suite.MLKEM768_X25519):
            client, server = await memory_pair(client_suites=[suite])
            assert client.suite is server.suite is suite
            assert client.peer is not None
            assert server.peer is None
            payload = bytes(range(256)) * 1000  # 256 kB: several records, several reads
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, payload)
                got = bytearray()
                while len(got) < len(payload):
                    got += await server.receive_some()
            assert got == payload
            await server.send_all(b"pong")
            assert await client.receive_some(10) == b"pong"
            await client.aclose()
            assert await server.receive_some() == b""
            await server.aclose()


async def socketpair_pair(**kwargs: Any) -> tuple[SecureChannel, SecureChannel]:
    a, b = socket.socketpair()
    return await open_secure_pair(
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
        **kwargs,
    )


async def test_check_half_closeable_stream() -> None:
    with trio.fail_after(60):
        await trio.testing.check_half_closeable_stream(memory_pair, lockstep_pair)


async def test_check_half_closeable_stream_over_sockets() -> None:
    """The recv_into fast path (SocketStream transports) passes trio's conformance suite too."""
    with trio.fail_after(60):
        await trio.testing.check_half_closeable_stream(socketpair_pair, None)


async def test_small_records_setting() -> None:
    with trio.fail_after(TIMEOUT_S):
        a, b = trio.testing.memory_stream_pair()
        client, server = await open_secure_pair(a, b, max_record_size=1000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"z" * 10_000)
            got = b""
            while len(got) < 10_000:
                got += await server.receive_some()
        assert got == b"z" * 10_000
        assert client.statistics().records_sent == 10
        assert server.statistics().records_received == 10
        assert server.statistics().bytes_buffered == 0


async def test_one_byte_trickle() -> None:
    """Every byte arrives in its own receive: handshake and records still work."""
    with trio.fail_after(TIMEOUT_S):
        c_send, s_recv = trio.testing.memory_stream_one_way_pair()
        s_send, c_recv = trio.testing.memory_stream_one_way_pair()

        def trickle(send: Any, recv: Any) -> Callable[[], Awaitable[None]]:
            async def hook() -> None:
                while trio.testing.memory_stream_pump(send, recv, max_bytes=1):
                    await trio.sleep(0)

            return hook

        c_send.send_all_hook = trickle(c_send, s_recv)
        s_send.send_all_hook = trickle(s_send, c_recv)
        client_stream = trio.StapledStream(c_send, c_recv)
        server_stream = trio.StapledStream(s_send, s_recv)
        client, server = await open_secure_pair(client_stream, server_stream)
        message = b"trickled " * 50
        await client.send_all(message)
        got = b""
        while len(got) < len(message):
            got += await server.receive_some()
        assert got == message
        await client.send_eof()
        assert await server.receive_some() == b""


async def test_verifier_rejection_is_opaque_and_logged() -> None:
    authority = TestAuthority()
    a, b = trio.testing.memory_stream_pair()
    outcome: dict[str, BaseException] = {}

    async def server() -> None:
        try:
            await accept_channel(b, attester=authority.attester(debug=True))
        except ChannelClosed as exc:
            outcome["server"] = exc

    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with pytest.raises(AuthenticationFailed) as info:
                await connect_channel(a, verifier=authority.verifier())
    assert str(info.value) == "authentication failed"
    assert "debug-mode" in info.value.reason  # for the caller's own log, not in str()
    assert info.value.__cause__ is None
    assert isinstance(info.value, trio.BrokenResourceError)  # trio's Stream vocabulary
    assert isinstance(outcome["server"], ChannelClosed)  # the client hung up
    failures = [e for e in logs if e["event"] == "channel_failed"]
    assert any("debug-mode" in e["reason"] for e in failures if e["role"] == "client")


async def test_truncation_is_an_authentication_failure() -> None:
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        client, server = await memory_pair()
        await client.send_all(b"partial")
        await client.transport_stream.aclose()  # EOF without the close record
        assert await server.receive_some() == b"partial"
        with pytest.raises(AuthenticationFailed):
            await server.receive_some()
        with pytest.raises(AuthenticationFailed):  # stays failed
            await server.receive_some()
    assert any("truncation" in e.get("reason", "") for e in logs)


async def test_tampering_in_transit_is_detected() -> None:
    """A relay that flips one ciphertext bit: the receiver fails, opaque."""
    with trio.fail_after(TIMEOUT_S):
        client_end, relay_a = trio.testing.memory_stream_pair()
        relay_b, server_end = trio.testing.memory_stream_pair()
        tamper = {"on": False}

        async def pump(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
            while data := await src.receive_some():
                if tamper["on"]:
                    data = bytearray(data)
                    data[-1] ^= 1
                    tamper["on"] = False
                await dst.send_all(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, relay_a, relay_b)
            nursery.start_soon(pump, relay_b, relay_a)
            client, server = await open_secure_pair(client_end, server_end)
            await client.send_all(b"ok")
            assert await server.receive_some() == b"ok"
            tamper["on"] = True
            await client.send_all(b"tampered")
            with pytest.raises(AuthenticationFailed, match=r"^authentication failed$"):
                await server.receive_some()
            nursery.cancel_scope.cancel()


async def test_handshake_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """A peer that says nothing is a timeout, not an authentication failure (typed, so a user
    can be told what happened), on both sides."""
    a, b = trio.testing.memory_stream_pair()  # nobody answers on b
    with trio.fail_after(100), pytest.raises(PeerTimeout) as info:
        await connect_channel(a, verifier=TestAuthority().verifier(), handshake_timeout=5)
    assert not isinstance(info.value, AuthenticationFailed)
    assert 5 <= trio.current_time() < 6
    await b.aclose()
    c, d = trio.testing.memory_stream_pair()  # a client that connects and sits idle
    start = trio.current_time()
    with trio.fail_after(100), pytest.raises(PeerTimeout):
        await accept_channel(d, attester=TestAuthority().attester(), handshake_timeout=3)
    assert 3 <= trio.current_time() - start < 4
    await c.aclose()


async def test_a_peer_that_closes_before_answering_is_unreachable_not_unauthenticated() -> None:
    """What the ingress does when it cannot reach its target: accept, then close without a
    byte. The client must say "unreachable", not "authentication failed" (issue 10)."""
    a, b = trio.testing.memory_stream_pair()

    async def relay_that_cannot_reach_its_target() -> None:
        await b.receive_some(1 << 16)  # the hello
        await b.aclose()  # nothing sent back

    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay_that_cannot_reach_its_target)
            with pytest.raises(PeerUnreachable) as info:
                await connect_channel(a, verifier=TestAuthority().verifier())
    assert not isinstance(info.value, AuthenticationFailed)
    assert "unreachable" in str(info.value)
    assert any(e["event"] == "channel_peer_unreachable" for e in logs)


async def test_a_reset_before_any_byte_is_unreachable_too() -> None:
    a, b = socket_stream_pair()
    await b.aclose()  # closed before the hello even left
    with trio.fail_after(TIMEOUT_S), pytest.raises(PeerUnreachable):
        await connect_channel(a, verifier=TestAuthority().verifier())


async def test_a_peer_that_closes_mid_handshake_is_closed_not_unauthenticated() -> None:
    a, b = trio.testing.memory_stream_pair()
    authority = TestAuthority()

    async def server_that_hangs_up_after_its_first_bytes() -> None:
        hello = await b.receive_some(1 << 16)
        assert hello
        document_frame = b"\x02\x00\x00\x10\x00"  # a frame header promising more
        await b.send_all(document_frame)
        await b.aclose()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_that_hangs_up_after_its_first_bytes)
            with pytest.raises((ChannelClosed, AuthenticationFailed)) as info:
                await connect_channel(a, verifier=authority.verifier())
    assert not isinstance(info.value, PeerUnreachable)


async def test_record_limit_through_the_adapter() -> None:
    with trio.fail_after(TIMEOUT_S):
        client, server = await memory_pair(max_records=3)
        await client.send_all(b"1")
        await client.send_all(b"2")
        with pytest.raises(LocalProtocolError):
            await client.send_all(b"3")
        await client.send_eof()  # the reserved slot: a clean close is still possible
        assert await server.receive_some() == b"1"
        assert await server.receive_some() == b"2"
        assert await server.receive_some() == b""


async def test_concurrent_receive_is_busy() -> None:
    with trio.fail_after(TIMEOUT_S):
        client, _server = await memory_pair()
        with pytest.RaisesGroup(trio.BusyResourceError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.receive_some)
                nursery.start_soon(client.receive_some)
        await client.aclose()


async def test_logs_never_carry_secrets() -> None:
    with structlog.testing.capture_logs() as logs, trio.fail_after(TIMEOUT_S):
        client, server = await memory_pair(client_suites=[Suite.MLKEM768_X25519])
        await client.send_all(b"secret plaintext")
        await server.receive_some()
        await client.aclose()
        await server.aclose()
    assert {e["event"] for e in logs} >= {"channel_established"}
    for entry in logs:
        for value in entry.values():
            assert not isinstance(value, bytes | bytearray | memoryview)
            assert "secret plaintext" not in str(value)


# ------------------------------------------------------------------ real Unix sockets


async def unix_pair(path: Path) -> tuple[trio.SocketStream, trio.SocketStream]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(1)
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        client = await trio.open_unix_socket(str(path))
    await listener.aclose()
    return client, accepted[0]


async def test_over_real_unix_sockets(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        a, b = await unix_pair(tmp_path / "chan.sock")
        client, server = await open_secure_pair(
            a, b, client_suites=[Suite.MLKEM768_X25519, Suite.X25519]
        )
        assert client.suite is Suite.MLKEM768_X25519
        size = 4 * 1024 * 1024 + 123

        async def echo() -> None:
            while data := await server.receive_some():
                await server.send_all(data)
            await server.send_eof()

        data = bytes(range(251)) * (size // 251)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)

            async def send() -> None:
                view = memoryview(data)
                for i in range(0, len(data), 3 * MAX_RECORD_PLAINTEXT + 7):
                    await client.send_all(view[i : i + 3 * MAX_RECORD_PLAINTEXT + 7])
                await client.send_eof()

            nursery.start_soon(send)
            got = bytearray()
            while chunk := await client.receive_some():
                got += chunk
        assert got == data
        await client.aclose()
        await server.aclose()


async def test_truncation_over_unix_sockets(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        a, b = await unix_pair(tmp_path / "trunc.sock")
        client, server = await open_secure_pair(a, b)
        await client.send_all(b"x" * 100_000)
        await trio.aclose_forcefully(client)  # cancelled aclose: no close record
        got: list[bytes] = []

        async def read_all() -> None:
            while True:
                got.append(bytes(await server.receive_some()))

        with pytest.raises(AuthenticationFailed):
            await read_all()
        assert sum(map(len, got)) == 100_000


async def test_receive_into_decrypts_into_the_callers_buffer() -> None:
    with trio.fail_after(TIMEOUT_S):
        client, server = await memory_pair()
        payload = bytes(range(256)) * 2000  # 512 kB
        buffer = bytearray(4 * MAX_RECORD_PLAINTEXT)
        small = bytearray(10)  # below one record: served through receive_some

        async def send() -> None:
            await client.send_all(payload)
            await client.send_eof()

        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            n = await server.receive_into(small)
            got += small[:n]
            while n := await server.receive_into(buffer):
                got += buffer[:n]
        assert got == payload
        assert await server.receive_into(buffer) == 0


async def test_authentic_records_are_delivered_before_a_bad_one() -> None:
    with trio.fail_after(TIMEOUT_S):
        a, b = trio.testing.memory_stream_pair()
        client, server = await open_secure_pair(a, b)
        good = client._conn.seal_record(b"good")
        bad = bytearray(client._conn.seal_record(b"evil"))
        bad[-1] ^= 1
        await a.send_all(good + bytes(bad))  # both arrive in one read
        assert await server.receive_some() == b"good"
        with pytest.raises(AuthenticationFailed):
            await server.receive_some()


async def test_cancelled_send_breaks_the_channel_and_the_peer_sees_truncation() -> None:
    with trio.fail_after(TIMEOUT_S):
        a, b = trio.testing.lockstep_stream_pair()  # send_all blocks until the peer reads
        client, server = await open_secure_pair(a, b)
        with trio.move_on_after(0.05):
            await client.send_all(b"x" * 100_000)  # nobody reads: cancelled mid-way
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"more")
        await client.aclose()  # no close record after a broken send
        with pytest.raises(AuthenticationFailed):
            await drain_until_failure(server)


async def drain_until_failure(channel: SecureChannel) -> None:
    while True:
        await channel.receive_some()


async def test_attester_failure_propagates_and_closes_the_stream() -> None:
    class NsmDown(Exception):
        pass

    async def attester(*, nonce: bytes, public_key: bytes, user_data: bytes | None = None) -> bytes:
        raise NsmDown("nsm unavailable")

    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:

            async def client() -> None:
                # The enclave closed without a byte: the client cannot tell this from an
                # enclave that is not there at all.
                with pytest.raises(PeerUnreachable):
                    await connect_channel(a, verifier=TestAuthority().verifier())

            nursery.start_soon(client)
            with pytest.raises(NsmDown):
                await accept_channel(b, attester=attester)


async def test_over_the_vsock_fabric(tmp_path: Path) -> None:
    from transport.vsock import VMADDR_CID_PARENT, VsockAddr, open_vsock_listener, open_vsock_stream

    fabric = tmp_path / "vsock"
    authority = TestAuthority()
    with trio.fail_after(TIMEOUT_S):
        listener = await open_vsock_listener(5005, fabric_dir=fabric)
        async with listener, trio.open_nursery() as nursery:

            async def serve_one() -> None:
                channel = await accept_channel(
                    await listener.accept(), attester=authority.attester()
                )
                async with channel:
                    while data := await channel.receive_some():
                        await channel.send_all(data[::-1])

            nursery.start_soon(serve_one)
            stream = await open_vsock_stream(VsockAddr(VMADDR_CID_PARENT, 5005), fabric_dir=fabric)
            channel = await connect_channel(
                stream, verifier=authority.verifier(), suites=[Suite.MLKEM768_X25519]
            )
            async with channel:
                await channel.send_all(b"attested")
                assert await channel.receive_some() == b"detsetta"
                await channel.send_eof()
                assert await channel.receive_some() == b""


@pytest.mark.parametrize("pair", [memory_pair, socketpair_pair])
async def test_record_limit_is_logged_for_one_record_and_for_many(
    pair: Callable[..., Awaitable[tuple[SecureChannel, SecureChannel]]],
) -> None:
    """One-record sends leave the limit to the sealer (it refuses before sealing), multi-record
    sends check it up front: both refuse, log it, and keep the close's reserved slot; on a
    socket (written directly) as on any other stream."""
    with structlog.testing.capture_logs() as logs, trio.fail_after(TIMEOUT_S):
        client, server = await pair(max_records=4, max_record_size=8)
        await client.send_all(b"1")
        with pytest.raises(LocalProtocolError, match="record limit"):
            await client.send_all(b"x" * 24)  # three records: two are left
        await client.send_all(b"2" * 16)  # two records: fits exactly
        with pytest.raises(LocalProtocolError, match="record limit"):
            await client.send_all(b"3")
        await client.send_eof()  # the reserved slot
        received = b""
        while chunk := await server.receive_some():
            received += chunk
        assert received == b"1" + b"2" * 16
        await client.aclose()
        await server.aclose()
    assert [e["event"] for e in logs].count("channel_record_limit") == 2


async def test_send_to_a_closed_socket_peer_is_broken_not_oserror() -> None:
    """The direct socket write maps OSError as SocketStream does: the peer's end gone is a
    BrokenResourceError, and the channel stays broken."""
    with trio.fail_after(TIMEOUT_S):
        client, server = await socketpair_pair()
        await server.transport_stream.aclose()

        async def send_until_it_fails() -> None:
            for _ in range(10_000):  # until the kernel reports the peer's end
                await client.send_all(b"x" * 1024)

        with pytest.raises(trio.BrokenResourceError):
            await send_until_it_fails()
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")
        await client.aclose()
