"""Ingress: TCP on loopback -> an enclave's vsock listener (broker + enclave client in process,
and the ``enclave ingress`` CLI as a real subprocess)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import structlog
import trio

from transport.errors import ConfigurationError
from transport.fabric.enclave import EnclaveFabricClient
from transport.ingress import parse_listen, serve_ingress
from transport.vsock import FabricPolicy, VsockAddr, serve_enclave_fabric

TIMEOUT_S = 5


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:5005", ("127.0.0.1", 5005)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:8443", ("::1", 8443)),
        (":9000", ("127.0.0.1", 9000)),
        ("9000", ("127.0.0.1", 9000)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["host:", "host:x", "1.2.3.4:70000", ""])
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_listen(value)


@asynccontextmanager
async def enclave_echo(fabric_dir: Path, cid: int, port: int) -> AsyncIterator[None]:
    """An emulated enclave (broker + enclave-side client) echoing on (cid, port) until EOF."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    async def one(conn: trio.SocketStream) -> None:
        async with conn:
            while data := await conn.receive_some(65536):
                await conn.send_all(data)

    async def serve(listener: trio.SocketListener) -> None:
        async with listener, trio.open_nursery() as n:
            while True:
                n.start_soon(one, await listener.accept())

    policy = FabricPolicy(cid=cid, parent_ports=frozenset())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve_enclave_fabric, ours, policy=policy, fabric_dir=fabric_dir)
            )
            listener = await EnclaveFabricClient(theirs, cid=cid).listen(port)
            nursery.start_soon(serve, listener)
            yield
            nursery.cancel_scope.cancel()
    finally:
        ours.close()
        theirs.close()


async def tcp_exchange(port: int, payload: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = bytearray()
    async with stream, trio.open_nursery() as nursery:

        async def sender() -> None:
            try:
                await stream.send_all(payload)
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass  # the other side may close first (nobody to forward to)

        nursery.start_soon(sender)
        while data := await stream.receive_some(65536):
            got += data
    return bytes(got)


async def test_ingress_end_to_end(fabric_dir: Path) -> None:
    payload = os.urandom(2 << 20)
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with enclave_echo(fabric_dir, 16, 5005), trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(serve_ingress, "127.0.0.1", 0, VsockAddr(16, 5005), fabric_dir=fabric_dir)
            )
            assert await tcp_exchange(port, payload) == payload
            results = await _concurrently(port, 10)
            assert results == [b"c%d" % i * 5000 for i in range(10)]
            nursery.cancel_scope.cancel()
    closed = [e for e in logs if e["event"] == "ingress_connection_closed"]
    assert len(closed) == 11
    assert closed[0]["bytes_in"] == closed[0]["bytes_out"] == len(payload)


async def _concurrently(port: int, n: int) -> list[bytes]:
    results: list[bytes] = [b""] * n
    async with trio.open_nursery() as nursery:
        for i in range(n):

            async def one(i: int = i) -> None:
                results[i] = await tcp_exchange(port, b"c%d" % i * 5000)

            nursery.start_soon(one)
    return results


async def test_ingress_to_nobody_disconnects_promptly(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(serve_ingress, "127.0.0.1", 0, VsockAddr(16, 5999), fabric_dir=fabric_dir)
            )
            with trio.fail_after(1):
                assert await tcp_exchange(port, b"hello?") == b""
            nursery.cancel_scope.cancel()
    assert any(e["event"] == "ingress_target_unreachable" for e in logs)


@pytest.mark.slow
async def test_ingress_cli(fabric_dir: Path) -> None:
    with trio.fail_after(3 * TIMEOUT_S):
        async with enclave_echo(fabric_dir, 21, 7000):
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "runtime.cli",
                    "ingress",
                    "--cid",
                    "21",
                    "--port",
                    "7000",
                    "--fabric-dir",
                    str(fabric_dir),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            try:
                assert proc.stdout is not None
                line = b""
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(1024)
                    assert chunk, "ingress exited early"
                    line += chunk
                info = json.loads(line)
                host, port = info["listen"].rsplit(":", 1)
                assert host == "127.0.0.1", "loopback by default"
                assert info["target"] == "vsock:21:7000"
                assert await tcp_exchange(int(port), b"via cli") == b"via cli"
            finally:
                proc.terminate()
                assert await proc.wait() == 0, "SIGTERM is a clean shutdown"
