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

from runtime.cli import main as enclave_main
from transport.channel import connect_channel
from transport.channel.testing import TestAuthority
from transport.errors import AddressInUse, AuthenticationFailed, PeerUnreachable
from transport.fabric.enclave import EnclaveFabricClient
from transport.ingress import serve_ingress
from transport.vsock import FabricPolicy, VsockAddr, serve_enclave_fabric

TIMEOUT_S = 5


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
    assert closed[0]["bytes_to_target"] == closed[0]["bytes_from_target"] == len(payload)


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


async def test_a_client_behind_ingress_with_nothing_behind_it_is_told_unreachable(
    fabric_dir: Path,
) -> None:
    """Issue 10: through ingress to an enclave that is not there, ``connect_channel`` says
    "unreachable" (ingress closes without a byte), not "authentication failed"."""
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(serve_ingress, "127.0.0.1", 0, VsockAddr(16, 5999), fabric_dir=fabric_dir)
            )
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            with pytest.raises(PeerUnreachable) as info:
                await connect_channel(stream, verifier=TestAuthority().verifier())
            assert not isinstance(info.value, AuthenticationFailed)
            nursery.cancel_scope.cancel()
    unreachable = [e for e in logs if e["event"] == "ingress_target_unreachable"]
    assert unreachable
    assert unreachable[0]["target"] == "vsock:16:5999"
    assert unreachable[0]["error"]  # why, for the operator


async def _idle_client(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def _is_refused(stream: trio.SocketStream) -> bool:
    """True if the ingress closed this connection at once (EOF or reset, no byte)."""
    with trio.fail_after(TIMEOUT_S):
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True


async def test_per_source_cap_and_full_ingress_refuse_at_once(fabric_dir: Path) -> None:
    """Idle clients cannot lock everyone out: one source holds at most ``max_per_source``
    connections, and over ``max_connections`` a new client is refused at once instead of
    waiting in the backlog (issue 10 item 5)."""
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with enclave_echo(fabric_dir, 16, 5005), trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    serve_ingress,
                    "127.0.0.1",
                    0,
                    VsockAddr(16, 5005),
                    fabric_dir=fabric_dir,
                    max_connections=10,
                    max_per_source=3,
                )
            )
            idle = [await _idle_client(port) for _ in range(3)]  # they just sit there
            for stream in idle:  # (each is forwarded: the echo answers)
                await stream.send_all(b"x")
                assert await stream.receive_some(1) == b"x"
            extra = await _idle_client(port)
            assert await _is_refused(extra), "a fourth connection from the same source"
            refused = [e for e in logs if e["event"] == "ingress_connection_refused"]
            assert refused[-1]["source"] == "127.0.0.1"
            assert "127.0.0.1" in refused[-1]["reason"]
            for stream in idle:
                await stream.aclose()
            await trio.sleep(0.05)  # their slots free up
            again = await _idle_client(port)
            await again.send_all(b"y")
            assert await again.receive_some(1) == b"y"
            await again.aclose()
            nursery.cancel_scope.cancel()


async def test_a_full_ingress_refuses_instead_of_leaving_clients_hanging(
    fabric_dir: Path,
) -> None:
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with enclave_echo(fabric_dir, 16, 5005), trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    serve_ingress,
                    "127.0.0.1",
                    0,
                    VsockAddr(16, 5005),
                    fabric_dir=fabric_dir,
                    max_connections=2,
                    max_per_source=None,
                )
            )
            held = [await _idle_client(port) for _ in range(2)]
            for stream in held:
                await stream.send_all(b"x")
                assert await stream.receive_some(1) == b"x"
            late = await _idle_client(port)
            assert await _is_refused(late)  # promptly: within the test's bound, not never
            assert any(
                e["event"] == "ingress_connection_refused" and "slots" in e["reason"] for e in logs
            )
            for stream in held:
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_listening_on_a_busy_port_is_one_clear_error(fabric_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with trio.fail_after(TIMEOUT_S), pytest.raises(AddressInUse, match="already in use"):
            await serve_ingress("127.0.0.1", port, VsockAddr(16, 5005), fabric_dir=fabric_dir)


# -- user errors of the CLI: one ``error:`` line, no traceback, non-zero exit ---------------


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    try:
        status = enclave_main(argv)
    except SystemExit as exc:  # argparse-level errors exit
        status = int(exc.code or 0)
    captured = capsys.readouterr()
    return status, captured.err


@pytest.mark.parametrize(
    "argv",
    [
        ["ingress", "--port", "5005"],  # no --cid
        ["ingress", "--cid", "16"],  # no --port
        ["ingress", "--cid", "x", "--port", "5005"],
        ["ingress", "--cid", "16", "--port", "-1"],
        ["ingress", "--cid", "16", "--port", "99999999999"],
        ["ingress", "--cid", "16", "--port", "5005", "--listen", "127.0.0.1:70000"],
        ["ingress", "--cid", "16", "--port", "5005", "--listen", "http://127.0.0.1:5005"],
        ["ingress", "--cid", "16", "--port", "5005", "--listen", "::1:5005"],
        ["ingress", "--cid", "16", "--port", "5005", "--max-connections", "0"],
        ["ingress", "--cid", "16", "--port", "5005", "--max-per-source", "many"],
        ["ingress", "--cid", "16", "--port", "5005", "--bogus-flag"],
    ],
)
def test_cli_user_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    status, err = _cli_error(capsys, argv)
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "Traceback" not in err


def test_cli_busy_port_is_one_line(capsys: pytest.CaptureFixture[str], fabric_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, err = _cli_error(
            capsys,
            [
                "ingress",
                "--cid",
                "16",
                "--port",
                "5005",
                "--listen",
                f"127.0.0.1:{port}",
                "--fabric-dir",
                str(fabric_dir),
            ],
        )
    assert status != 0
    assert err.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: address already in use"
    ]


def test_ingress_does_not_import_the_proxy_or_yaml() -> None:
    """Ingress and vsock-proxy share transport.relay; ingress needs neither the proxy module
    nor its YAML dependency (issue 11)."""
    code = (
        "import sys, transport.ingress, runtime.cli.ingress; "
        "print(sorted(m for m in ('transport.proxy', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
