"""The broker and the enclave-side client in one process, over a real SEQPACKET socketpair.

Everything here is real kernel sockets and real fd passing; only the process boundary is
missing (tests/transport/test_fabric_enclave_process.py adds it).
"""

from __future__ import annotations

import errno
import re
import socket
import stat
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import structlog
import trio

from transport.errors import VsockConnectionRefused, VsockError
from transport.fabric import wire
from transport.fabric.enclave import EnclaveFabricClient
from transport.fabric.fdpass import recv_message, send_message
from transport.vsock import (
    VMADDR_PORT_ANY,
    FabricPolicy,
    ParentHandler,
    VsockAddr,
    VsockAddressInUse,
    open_vsock_listener,
    open_vsock_stream,
    serve_enclave_fabric,
)

TIMEOUT_S = 5


async def heartbeat(stream: trio.SocketStream) -> None:
    """Nitro's boot heartbeat: echo the 0xB7 byte."""
    data = await stream.receive_some(1)
    await stream.send_all(data)


async def echo(stream: trio.abc.Stream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def serve_echo(listener: trio.SocketListener) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn = await listener.accept()
            except trio.ClosedResourceError:
                return  # the test closed the listener
            nursery.start_soon(partial(_owned_echo, conn))


async def _owned_echo(conn: trio.SocketStream) -> None:
    async with conn:
        try:
            await echo(conn)
        except trio.BrokenResourceError:
            pass


async def roundtrip(stream: trio.abc.Stream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    got = b""
    while len(got) < len(payload):
        data = await stream.receive_some(65536)
        assert data, "unexpected EOF"
        got += data
    return got


@asynccontextmanager
async def broker(
    fabric_dir: Path,
    policy: FabricPolicy,
    handlers: Mapping[int, ParentHandler] | None = None,
) -> AsyncIterator[tuple[EnclaveFabricClient, trio.CancelScope]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_enclave_fabric,
                    ours,
                    policy=policy,
                    fabric_dir=fabric_dir,
                    parent_handlers=handlers or {},
                )
            )
            yield EnclaveFabricClient(theirs, cid=policy.cid), nursery.cancel_scope
            nursery.cancel_scope.cancel()
    finally:
        ours.close()
        theirs.close()


POLICY = FabricPolicy(cid=16, parent_ports=frozenset({8000}))


async def test_connect_to_parent_handler_and_host_listener(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            await open_vsock_listener(8000, fabric_dir=fabric_dir) as host,
            trio.open_nursery() as nursery,
            broker(fabric_dir, POLICY, {9000: heartbeat}) as (client, _),
        ):
            nursery.start_soon(serve_echo, host)
            async with await client.connect(VsockAddr(3, 9000)) as hb:
                assert await roundtrip(hb, b"\xb7") == b"\xb7"
            async with await client.connect(VsockAddr(3, 8000)) as s:
                assert await roundtrip(s, b"kms" * 50000) == b"kms" * 50000
            nursery.cancel_scope.cancel()


async def test_policy_refusals_are_answers_decided_by_policy_and_logged(fabric_dir: Path) -> None:
    """Each refusal is the broker's answer (``connect`` has no timeout of its own:
    ``VsockConnectionRefused`` comes only from a Refused reply), decided by the policy before
    any connection is tried (each target is logged as denied, in order)."""
    targets = (
        VsockAddr(3, 8001),  # a parent port the policy does not allow
        VsockAddr(17, 5005),  # another enclave
        VsockAddr(2, 8000),  # CID 2 (the host; an enclave reaches only the parent, CID 3)
        VsockAddr(16, 1),  # itself
        VsockAddr(1, 8000),  # CID 1 (local)
    )
    with trio.fail_after(TIMEOUT_S):
        async with broker(fabric_dir, POLICY, {9000: heartbeat}) as (client, _):
            with structlog.testing.capture_logs() as logs:
                for target in targets:
                    with pytest.raises(
                        VsockConnectionRefused, match=re.escape(f"{target} refused")
                    ):
                        await client.connect(target)
            denied = [e["target"] for e in logs if e["event"] == "vsock_connect_denied"]
            assert denied == [f"vsock:{t.cid}:{t.port}" for t in targets]
            # Allowed by policy but nobody listening: refused as well (not a hang).
            with pytest.raises(VsockConnectionRefused):
                await client.connect(VsockAddr(3, 8000))


async def test_enclave_listener_files_modes_and_cleanup(fabric_dir: Path) -> None:
    path = fabric_dir / "16" / "5005"
    with trio.fail_after(TIMEOUT_S):
        async with broker(fabric_dir, POLICY) as (client, _):
            listener = await client.listen(5005)
            assert listener.socket.getsockname() == (16, 5005)
            assert stat.S_IMODE(path.lstat().st_mode) == 0o600
            assert stat.S_IMODE((fabric_dir / "16").stat().st_mode) == 0o700
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_echo, listener)
                for _ in range(3):
                    async with await open_vsock_stream(
                        VsockAddr(16, 5005), fabric_dir=fabric_dir
                    ) as s:
                        assert await roundtrip(s, b"hello") == b"hello"
                nursery.cancel_scope.cancel()
            await listener.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await listener.accept()
            while path.exists():  # Unlisten has no reply; the broker removes the file promptly
                await trio.sleep(0.005)
            with pytest.raises(VsockConnectionRefused):
                await open_vsock_stream(VsockAddr(16, 5005), fabric_dir=fabric_dir)
            # the port can be listened on again
            async with await client.listen(5005):
                assert path.exists()


async def test_listen_errors(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with broker(fabric_dir, POLICY) as (client, _):
            async with await client.listen(6000):
                with pytest.raises(VsockAddressInUse):
                    await client.listen(6000)
            with pytest.raises(VsockError, match="cannot bind CID 17"):
                await client.listen(1, cid=17)
            async with await client.listen(VMADDR_PORT_ANY) as any_port:
                cid, port = any_port.socket.getsockname()
                assert cid == 16
                assert port != VMADDR_PORT_ANY
                assert (fabric_dir / "16" / str(port)).exists()


async def test_broker_cancel_removes_every_file_but_keeps_connections(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            await open_vsock_listener(8000, fabric_dir=fabric_dir) as host,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(serve_echo, host)
            async with broker(fabric_dir, POLICY) as (client, scope):
                listeners = [await client.listen(p) for p in (5005, 5006, 5007)]
                assert sorted(p.name for p in (fabric_dir / "16").iterdir()) == [
                    "5005",
                    "5006",
                    "5007",
                ]
                stream = await client.connect(VsockAddr(3, 8000))
                scope.cancel()
            assert not (fabric_dir / "16").exists(), "every socket file and the CID dir are gone"
            # Data never went through the broker: the connection outlives it.
            async with stream:
                assert await roundtrip(stream, b"still here") == b"still here"
            for listener in listeners:
                await listener.aclose()
            nursery.cancel_scope.cancel()


async def test_broker_returns_when_enclave_closes(fabric_dir: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve_enclave_fabric, ours, policy=POLICY, fabric_dir=fabric_dir)
            )
            client = EnclaveFabricClient(theirs, cid=16)
            await client.listen(5005)
            assert (fabric_dir / "16" / "5005").exists()
            theirs.close()  # the enclave exits
        assert not (fabric_dir / "16").exists()
    ours.close()


async def test_peer_enclave_allowed_only_by_policy(fabric_dir: Path) -> None:
    p16 = FabricPolicy(cid=16, parent_ports=frozenset(), peer_cids=frozenset({17}))
    p17 = FabricPolicy(cid=17, parent_ports=frozenset())
    with trio.fail_after(TIMEOUT_S):
        async with (
            broker(fabric_dir, p16) as (c16, _),
            broker(fabric_dir, p17) as (c17, _),
            await c16.listen(4000) as l16,
            await c17.listen(4000) as l17,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(serve_echo, l16)
            nursery.start_soon(serve_echo, l17)
            async with await c16.connect(VsockAddr(17, 4000)) as s:
                assert await roundtrip(s, b"peer") == b"peer"
            with pytest.raises(VsockConnectionRefused):
                await c17.connect(VsockAddr(16, 4000))
            nursery.cancel_scope.cancel()


async def test_many_concurrent_connects_and_accepts(fabric_dir: Path) -> None:
    """Replies are matched by request id while incoming connections interleave."""
    with trio.fail_after(TIMEOUT_S):
        async with (
            await open_vsock_listener(8000, fabric_dir=fabric_dir) as host,
            trio.open_nursery() as outer,
            broker(fabric_dir, POLICY, {9000: echo}) as (client, _),
        ):
            outer.start_soon(serve_echo, host)
            inbound = await client.listen(5005)
            outer.start_soon(serve_echo, inbound)

            async def one(i: int) -> None:
                target = VsockAddr(3, 8000 if i % 2 else 9000)
                async with await client.connect(target) as s:
                    payload = f"conn-{i}".encode() * 100
                    assert await roundtrip(s, payload) == payload

            async def host_in(i: int) -> None:
                async with await open_vsock_stream(VsockAddr(16, 5005), fabric_dir=fabric_dir) as s:
                    assert await roundtrip(s, b"in%d" % i) == b"in%d" % i

            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(one, i)
                    nursery.start_soon(host_in, i)
            await inbound.aclose()
            outer.cancel_scope.cancel()


async def test_parent_handler_failure_is_contained(fabric_dir: Path) -> None:
    async def broken(stream: trio.SocketStream) -> None:
        raise RuntimeError("handler bug")

    with trio.fail_after(TIMEOUT_S):
        async with broker(fabric_dir, POLICY, {9000: broken, 9001: heartbeat}) as (client, _):
            with structlog.testing.capture_logs() as logs:
                async with await client.connect(VsockAddr(3, 9000)) as s:
                    assert await s.receive_some(1) == b""  # handler died, stream closed
            assert any(e["event"] == "vsock_parent_handler_failed" for e in logs)
            async with await client.connect(VsockAddr(3, 9001)) as hb:
                assert await roundtrip(hb, b"\xb7") == b"\xb7"


async def test_garbage_from_enclave_is_logged_and_ignored(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with broker(fabric_dir, POLICY, {9000: heartbeat}) as (client, _):
            with structlog.testing.capture_logs() as logs:
                for junk in (
                    b"\x00",
                    b"\x01" * 31,
                    b"\xff" * 12,
                    wire.encode(wire.Listening(1, 2)),
                ):
                    send_message(client._sock, junk)
                # an fd attached to a request is refused too (and closed by the broker)
                a, b = socket.socketpair()
                send_message(client._sock, wire.encode(wire.Listen(99, 1)), a.fileno())
                a.close()
                async with await client.connect(VsockAddr(3, 9000)) as hb:
                    assert await roundtrip(hb, b"\xb7") == b"\xb7"
                b.setblocking(False)
                await trio.lowlevel.wait_readable(b)
                assert b.recv(1) == b"", "the broker closed the fd it was sent"
                b.close()
            bad = [e for e in logs if e["event"] == "vsock_fabric_bad_request"]
            assert len(bad) == 5


async def test_empty_datagram_is_a_bad_request_not_end_of_file(fabric_dir: Path) -> None:
    """Regression (issue 10 item 11): a zero-length datagram from the enclave was read as
    end-of-file and stopped that enclave's broker."""
    with trio.fail_after(TIMEOUT_S):
        async with broker(fabric_dir, POLICY, {9000: heartbeat}) as (client, _):
            with structlog.testing.capture_logs() as logs:
                for _ in range(3):
                    send_message(client._sock, b"")
                async with await client.connect(VsockAddr(3, 9000)) as hb:
                    assert await roundtrip(hb, b"\xb7") == b"\xb7"
            bad = [e for e in logs if e["event"] == "vsock_fabric_bad_request"]
            assert len(bad) == 3
            assert not any(e["event"] == "vsock_fabric_enclave_closed" for e in logs)


def test_recv_message_tells_an_empty_datagram_from_end_of_file() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        b.setblocking(False)
        a.send(b"")
        assert recv_message(b) == (b"", [], False)
        with pytest.raises(BlockingIOError):
            recv_message(b)
        a.close()
        with pytest.raises(EOFError):
            recv_message(b)


# -- the enclave client against a scripted broker -------------------------------------------


async def _recv_request(sock: socket.socket) -> wire.Request:
    while True:
        try:
            data, fds, _ = recv_message(sock)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        assert not fds
        return wire.decode_request(data)


async def test_cancelled_connect_late_reply_does_not_confuse_the_next() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    client = EnclaveFabricClient(theirs, cid=16)
    with trio.fail_after(TIMEOUT_S):
        with trio.move_on_after(0.05):
            await client.connect(VsockAddr(3, 1))
        first = await _recv_request(ours)
        stale_a, stale_b = socket.socketpair()
        send_message(ours, wire.encode(wire.Connected(first.request_id, 1)), stale_a.fileno())
        stale_a.close()
        async with trio.open_nursery() as nursery:
            result: list[trio.SocketStream] = []

            async def connect() -> None:
                result.append(await client.connect(VsockAddr(3, 2)))

            nursery.start_soon(connect)
            second = await _recv_request(ours)
            assert second.request_id != first.request_id
            good_a, good_b = socket.socketpair()
            send_message(ours, wire.encode(wire.Connected(second.request_id, 2)), good_a.fileno())
            good_a.close()
        async with result[0] as stream:
            good_b.sendall(b"right one")
            assert await stream.receive_some(100) == b"right one"
        # the late reply's fd was closed by the client: its peer sees EOF
        stale_b.settimeout(TIMEOUT_S)
        assert stale_b.recv(1) == b""
    for s in (ours, theirs, stale_b, good_b):
        s.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage!",
        wire.encode(wire.Refused(1, errno.EPROTO))[:-1],
        b"",  # an empty datagram is malformed too (not end-of-file)
        None,  # EOF: the broker is gone
    ],
)
async def test_broken_broker_fails_closed(reply: bytes | None) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    client = EnclaveFabricClient(theirs, cid=16)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:

            async def fake_broker() -> None:
                await _recv_request(ours)
                if reply is not None:
                    send_message(ours, reply)
                else:
                    ours.shutdown(socket.SHUT_RDWR)

            nursery.start_soon(fake_broker)
            with pytest.raises(VsockError):
                await client.connect(VsockAddr(3, 8000))
        with pytest.raises(VsockError):  # and it stays broken
            await client.listen(5005)
    ours.close()
    theirs.close()


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (errno.ECONNREFUSED, VsockConnectionRefused),
        (errno.EACCES, VsockConnectionRefused),
        (errno.ENOMEM, VsockError),
    ],
)
async def test_refused_errnos_map_to_errors(code: int, error: type[Exception]) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    client = EnclaveFabricClient(theirs, cid=16)

    async def fake_broker() -> None:
        request = await _recv_request(ours)
        send_message(ours, wire.encode(wire.Refused(request.request_id, code)))

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_broker)
            with pytest.raises(error) as caught:
                await client.connect(VsockAddr(3, 8000))
            assert (error is VsockError) == (not isinstance(caught.value, VsockConnectionRefused))
    ours.close()
    theirs.close()


async def test_connect_to_a_full_backlog_waits_then_succeeds(fabric_dir: Path) -> None:
    """The slow path: the target's accept queue is full (EAGAIN), so the broker retries, and
    the socket it finally passes on is really connected."""
    (fabric_dir / "3").mkdir(parents=True)
    path = str(fabric_dir / "3" / "8000")
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.bind(path)
    raw.listen(0)
    raw.setblocking(False)
    queued = []
    while True:  # fill the accept queue until a connect would block
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        rc = filler.connect_ex(path)
        if rc != 0:
            filler.close()
            assert rc == errno.EAGAIN
            break
        queued.append(filler)
    with trio.fail_after(TIMEOUT_S):
        async with broker(fabric_dir, POLICY) as (client, _), trio.open_nursery() as nursery:
            result: list[trio.SocketStream] = []

            async def connect() -> None:
                result.append(await client.connect(VsockAddr(3, 8000)))

            nursery.start_soon(connect)
            await trio.sleep(0.1)
            assert not result, "still waiting for room in the backlog"
            for _ in queued:  # make room
                raw.accept()[0].close()
        await trio.lowlevel.wait_readable(raw)
        conn, _ = raw.accept()
        async with result[0] as stream:
            await stream.send_all(b"made it")
            conn.setblocking(True)
            conn.settimeout(TIMEOUT_S)
            assert conn.recv(100) == b"made it"
    for s in (raw, conn, *queued):
        s.close()


async def test_closing_a_listener_wakes_its_pending_accept(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with broker(fabric_dir, POLICY) as (client, _):
            listener = await client.listen(5005)
            async with trio.open_nursery() as nursery:

                async def acceptor() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await listener.accept()

                nursery.start_soon(acceptor)
                await trio.testing.wait_all_tasks_blocked()
                await listener.aclose()  # the acceptor is the reader, blocked on the socket
            while (fabric_dir / "16" / "5005").exists():
                await trio.sleep(0.005)


async def test_cancelled_listen_releases_the_port(fabric_dir: Path) -> None:
    """A listen cancelled after the broker bound the port must not leave it bound."""
    with trio.fail_after(TIMEOUT_S):
        async with broker(fabric_dir, POLICY) as (client, _):
            for _ in range(20):
                with trio.move_on_after(0.0005):
                    try:
                        listener = await client.listen(5005)
                    except VsockAddressInUse:
                        continue  # an earlier cancelled listen is still being undone
                    await listener.aclose()
            # whatever happened, the port is free again once the broker caught up
            async with trio.open_nursery():
                for _ in range(200):
                    try:
                        listener = await client.listen(5005)
                    except VsockAddressInUse:
                        await trio.sleep(0.005)
                        continue
                    await listener.aclose()
                    break
                else:
                    pytest.fail("port 5005 stayed bound")


async def test_a_passed_fd_that_is_not_a_stream_socket_is_refused(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    client = EnclaveFabricClient(theirs, cid=16)
    not_a_socket = tmp_path / "file"
    not_a_socket.write_bytes(b"")

    async def fake_broker() -> None:
        request = await _recv_request(ours)
        with open(not_a_socket, "rb") as f:
            send_message(ours, wire.encode(wire.Connected(request.request_id, 1)), f.fileno())

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_broker)
            with pytest.raises(VsockError, match="not a socket"):
                await client.connect(VsockAddr(3, 8000))
    ours.close()
    theirs.close()
