"""The enclave side in a REAL child process: it inherits ENCLAVE_FABRIC_FD and uses the public
``transport.vsock`` API, while the broker runs here, in the test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
import trio

from transport.vsock import (
    FabricPolicy,
    VsockAddr,
    VsockConnectionRefused,
    enclave_fabric_env,
    fabric_socketpair,
    open_vsock_listener,
    open_vsock_stream,
    serve_enclave_fabric,
)

pytestmark = pytest.mark.slow

TIMEOUT_S = 15

CHILD = r"""
import sys, time, trio
from transport.logs import configure_logging
from transport.vsock import *

configure_logging(stream=sys.stderr)  # stdout is this test's result channel

async def main():
    with trio.fail_after(10):
        async with await open_vsock_stream(VsockAddr(VMADDR_CID_PARENT, 9000)) as hb:
            await hb.send_all(b"\xb7")
            assert await hb.receive_some(1) == b"\xb7"
        print("heartbeat ok", flush=True)

        async def one(i):
            async with await open_vsock_stream(VsockAddr(3, 8000)) as s:
                msg = b"message %d " % i * 1000
                await s.send_all(msg)
                got = b""
                while len(got) < len(msg):
                    got += await s.receive_some(65536)
                assert got == msg

        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(one, i)
        print("20 concurrent connects ok", flush=True)

        for target in (VsockAddr(3, 8001), VsockAddr(17, 5005), VsockAddr(2, 8000)):
            try:
                await open_vsock_stream(target)
            except VsockConnectionRefused:
                print("refused", target, flush=True)

        listener = await open_vsock_listener(5005)
        print("listening", *listener.socket.getsockname(), flush=True)
        conn = await listener.accept()
        async with conn:
            data = await conn.receive_some(100)
            await conn.send_all(data.upper())
        if sys.argv[1] == "wait":
            print("waiting", flush=True)
            await listener.accept()   # until the broker goes away
        await listener.aclose()
        print("done", flush=True)

trio.run(main)
"""


async def heartbeat(stream: trio.SocketStream) -> None:
    await stream.send_all(await stream.receive_some(1))


async def serve_echo(listener: trio.SocketListener) -> None:
    async def one(conn: trio.SocketStream) -> None:
        async with conn:
            while data := await conn.receive_some(65536):
                await conn.send_all(data)

    async with trio.open_nursery() as nursery:
        while True:
            nursery.start_soon(one, await listener.accept())


async def _read_lines(stream: trio.abc.ReceiveStream, lines: list[str], seen: trio.Event) -> None:
    buf = b""
    while data := await stream.receive_some(4096):
        buf += data
        *done, buf = buf.split(b"\n")
        lines.extend(line.decode() for line in done)
        if any(line.startswith("listening") for line in lines):
            seen.set()


async def _spawn(mode: str, child_end: socket.socket) -> trio.Process:
    env = dict(os.environ, ENCLAVE_VSOCK_BACKEND="auto", **enclave_fabric_env(child_end, 16))
    env.pop("ENCLAVE_VSOCK_DIR", None)  # the enclave sees no fabric directory at all
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD, mode],
        env=env,
        pass_fds=(child_end.fileno(),),
        stdout=subprocess.PIPE,
    )
    child_end.close()  # only the child holds it now: its exit is the broker's EOF
    return proc


POLICY = FabricPolicy(cid=16, parent_ports=frozenset({8000}))


async def test_enclave_process_end_to_end(fabric_dir: Path) -> None:
    ours, theirs = fabric_socketpair()
    lines: list[str] = []
    listening = trio.Event()
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with (
            await open_vsock_listener(8000, fabric_dir=fabric_dir) as host,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(serve_echo, host)
            broker_done = trio.Event()

            async def run_broker(task_status: trio.TaskStatus[None]) -> None:
                await serve_enclave_fabric(
                    ours,
                    policy=POLICY,
                    fabric_dir=fabric_dir,
                    parent_handlers={9000: heartbeat},
                    task_status=task_status,
                )
                broker_done.set()

            await nursery.start(run_broker)
            proc = await _spawn("once", theirs)
            assert proc.stdout is not None
            nursery.start_soon(_read_lines, proc.stdout, lines, listening)
            await listening.wait()
            path = fabric_dir / "16" / "5005"
            assert path.exists()
            async with await open_vsock_stream(VsockAddr(16, 5005), fabric_dir=fabric_dir) as s:
                await s.send_all(b"from the host")
                assert await s.receive_some(100) == b"FROM THE HOST"
            assert await proc.wait() == 0
            await broker_done.wait()  # the child's exit closed the fabric: the broker returned
            assert not (fabric_dir / "16").exists()
            nursery.cancel_scope.cancel()
    ours.close()
    assert lines[:2] == ["heartbeat ok", "20 concurrent connects ok"]
    refused = [line.split() for line in lines if line.startswith("refused")]
    assert [r[1] for r in refused] == ["vsock:3:8001", "vsock:17:5005", "vsock:2:8000"]
    # Refusals are answers (an enclave's connect has no timeout of its own: it is refused only
    # by the broker's reply), decided by policy without a connection attempt.
    denied = [e["target"] for e in logs if e["event"] == "vsock_connect_denied"]
    assert denied == ["vsock:3:8001", "vsock:17:5005", "vsock:2:8000"]
    assert "listening 16 5005" in lines
    assert lines[-1] == "done"


async def test_broker_cancel_cleans_up_while_enclave_listens(fabric_dir: Path) -> None:
    ours, theirs = fabric_socketpair()
    lines: list[str] = []
    listening = trio.Event()
    with trio.fail_after(TIMEOUT_S):
        async with (
            await open_vsock_listener(8000, fabric_dir=fabric_dir) as host,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(serve_echo, host)
            broker_scope = trio.CancelScope()
            broker_done = trio.Event()

            async def run_broker(task_status: trio.TaskStatus[None]) -> None:
                with broker_scope:
                    await serve_enclave_fabric(
                        ours,
                        policy=POLICY,
                        fabric_dir=fabric_dir,
                        parent_handlers={9000: heartbeat},
                        task_status=task_status,
                    )
                broker_done.set()

            await nursery.start(run_broker)
            proc = await _spawn("wait", theirs)
            assert proc.stdout is not None
            nursery.start_soon(_read_lines, proc.stdout, lines, listening)
            await listening.wait()
            async with await open_vsock_stream(VsockAddr(16, 5005), fabric_dir=fabric_dir) as s:
                await s.send_all(b"x")
                assert await s.receive_some(10) == b"X"
            broker_scope.cancel()
            await broker_done.wait()
            assert not (fabric_dir / "16").exists(), "the enclave's socket files are removed"
            with pytest.raises(VsockConnectionRefused):
                await open_vsock_stream(VsockAddr(16, 5005), fabric_dir=fabric_dir)
            ours.close()  # the supervisor drops the fabric: the enclave's accept() fails closed
            assert await proc.wait() != 0
            nursery.cancel_scope.cancel()
    assert "waiting" in lines


async def test_missing_or_bad_fabric_fd_is_a_clear_error() -> None:
    code = (
        "import trio\n"
        "from transport.vsock import *\n"
        "try:\n"
        "    trio.run(open_vsock_stream, VsockAddr(3, 9000))\n"
        "except VsockError as e:\n"
        "    print(e)\n"
    )
    with trio.fail_after(TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-c", code],
            env=dict(os.environ, ENCLAVE_FABRIC_FD="987"),
            capture_stdout=True,
        )
    assert "ENCLAVE_FABRIC_FD='987' is not an open socket fd" in result.stdout.decode()
