"""Ingress in front of several replicas (``transport.ingress.TargetPool``): least connections,
a dead replica skipped at once, a source of health followed (replicas added and removed).

Replicas are emulated enclaves (a broker and an enclave-side client in this process) that
answer every read with their CID, so a test sees which replica served each connection.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest
import structlog
import trio

from transport.fabric.enclave import EnclaveFabricClient
from transport.ingress import NoHealthyTarget, TargetPool, serve_ingress
from transport.vsock import FabricPolicy, VsockAddr, serve_enclave_fabric

TIMEOUT_S = 10
PORT = 5005


async def run_replica(
    fabric_dir: Path, cid: int, *, task_status: trio.TaskStatus[trio.CancelScope]
) -> None:
    """An emulated enclave answering each read on (cid, PORT) with ``<cid>:<data>``. Start it
    with ``nursery.start``; cancel the scope it returns to kill it (its listener file goes
    away, its connections break)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    async def one(conn: trio.SocketStream) -> None:
        async with conn:
            try:
                while data := await conn.receive_some(65536):
                    await conn.send_all(b"%d:" % cid + data)
            except trio.BrokenResourceError:
                pass

    async def serve(listener: trio.SocketListener) -> None:
        async with listener, trio.open_nursery() as n:
            while True:
                n.start_soon(one, await listener.accept())

    policy = FabricPolicy(cid=cid, parent_ports=frozenset())
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(serve_enclave_fabric, ours, policy=policy, fabric_dir=fabric_dir)
                )
                listener = await EnclaveFabricClient(theirs, cid=cid).listen(PORT)
                nursery.start_soon(serve, listener)
                task_status.started(scope)
    finally:
        ours.close()
        theirs.close()


async def ask(tcp_port: int, payload: bytes = b"x") -> bytes:
    """One connection through the ingress: which replica answered (b"" if closed)."""
    stream = await trio.open_tcp_stream("127.0.0.1", tcp_port)
    async with stream:
        await stream.send_all(payload)
        return await stream.receive_some(65536)


class Source:
    """A TargetSource the test edits."""

    def __init__(self, targets: Sequence[VsockAddr]) -> None:
        self.targets = list(targets)

    async def healthy(self) -> Sequence[VsockAddr]:
        await trio.lowlevel.checkpoint()
        return list(self.targets)


async def test_least_connections_spreads_held_connections(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_replica, fabric_dir, 31)
            await nursery.start(run_replica, fabric_dir, 32)
            pool = TargetPool([VsockAddr(31, PORT), VsockAddr(32, PORT)], fabric_dir=fabric_dir)
            tcp = await nursery.start(serve_ingress, "127.0.0.1", 0, pool)
            streams, held = [], []
            for _ in range(4):
                stream = await trio.open_tcp_stream("127.0.0.1", tcp)
                streams.append(stream)  # held open: each counts for its replica
                await stream.send_all(b"x")
                held.append((await stream.receive_some(64)).split(b":")[0])
            assert sorted(held) == [b"31", b"31", b"32", b"32"]
            assert sorted(t.active for t in pool.statistics()) == [2, 2]
            for stream in streams:
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_dead_replica_is_skipped_and_nobody_is_refused(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            kill31 = await nursery.start(run_replica, fabric_dir, 31)
            await nursery.start(run_replica, fabric_dir, 32)
            pool = TargetPool([VsockAddr(31, PORT), VsockAddr(32, PORT)], fabric_dir=fabric_dir)
            tcp = await nursery.start(serve_ingress, "127.0.0.1", 0, pool)
            assert {(await ask(tcp)).split(b":")[0] for _ in range(4)} == {b"31", b"32"}
            kill31.cancel()
            await trio.sleep(0.05)  # the broker's teardown removes the listener file
            answers = [await ask(tcp) for _ in range(6)]
            assert answers == [b"32:x"] * 6  # every client served, by the live replica
            down = {s.addr.cid: s.down_until for s in pool.statistics()}
            assert down[31] > trio.current_time()  # backing off, not retried for each client
            nursery.cancel_scope.cancel()
    assert any(e["event"] == "ingress_target_down" and "31" in e["target"] for e in logs)


async def test_the_pool_follows_its_source(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_replica, fabric_dir, 31)
            await nursery.start(run_replica, fabric_dir, 32)
            source = Source([VsockAddr(31, PORT)])
            pool = TargetPool(fabric_dir=fabric_dir, source=source)
            tcp = await nursery.start(serve_ingress, "127.0.0.1", 0, pool)
            await trio.sleep(0.7)  # one health round
            assert await ask(tcp) == b"31:x"
            source.targets = [VsockAddr(32, PORT)]  # 31 gone, 32 (re)started
            await trio.sleep(0.7)
            assert pool.targets == [VsockAddr(32, PORT)]
            assert [await ask(tcp) for _ in range(3)] == [b"32:x"] * 3
            nursery.cancel_scope.cancel()


async def test_no_live_replica_closes_the_client_without_a_byte(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            pool = TargetPool([VsockAddr(33, PORT)], fabric_dir=fabric_dir)
            tcp = await nursery.start(serve_ingress, "127.0.0.1", 0, pool)
            assert await ask(tcp) == b""
            with pytest.raises(NoHealthyTarget):
                await TargetPool(fabric_dir=fabric_dir).open()
            nursery.cancel_scope.cancel()
