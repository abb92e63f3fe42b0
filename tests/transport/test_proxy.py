"""vsock-proxy: the allowlist (pure), then the proxy against a real local TCP echo server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import structlog
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.cli import build_parser
from runtime.cli import main as enclave_main
from transport.errors import ConfigurationError, VsockConnectionRefused
from transport.proxy import (
    Allowlist,
    AllowlistEntry,
    IpVersion,
    ProxyNotAllowed,
    allowlist_matches,
    check_allowlist,
    serve_vsock_proxy,
)
from transport.vsock import VMADDR_PORT_ANY, VsockAddr, open_vsock_listener, open_vsock_stream

TIMEOUT_S = 5

NITRO_FILE = """\
allowlist:
- {address: kms.us-east-1.amazonaws.com, port: 443}
- {address: kms-fips.us-east-1.amazonaws.com, port: 443}
"""


# -- allowlist (pure) ----------------------------------------------------------------------


def test_parses_nitro_format() -> None:
    assert Allowlist.from_yaml(NITRO_FILE).entries == (
        AllowlistEntry("kms.us-east-1.amazonaws.com", 443),
        AllowlistEntry("kms-fips.us-east-1.amazonaws.com", 443),
    )
    block_style = "allowlist:\n  - address: 127.0.0.1\n    port: 8443\n"
    assert Allowlist.from_yaml(block_style).entries == (AllowlistEntry("127.0.0.1", 8443),)
    assert Allowlist.from_yaml("").entries == ()
    assert Allowlist.from_yaml("allowlist:\n").entries == ()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("allowlist: [{address: a, port: 1}]\nextra: 1\n", "unknown vsock-proxy config keys"),
        ("allowlist: [{address: a, port: 1, proto: tcp}]\n", "unknown keys"),
        ("allowlist: [{address: a, port: 0}]\n", "port must be"),
        ("allowlist: [{address: a, port: 65536}]\n", "port must be"),
        ("allowlist: [{address: a, port: '443'}]\n", "port must be"),
        ("allowlist: [{address: a, port: true}]\n", "port must be"),
        ("allowlist: [{address: 5, port: 443}]\n", "address must be"),
        ("allowlist: [{port: 443}]\n", "address must be"),
        ("allowlist: [a.example]\n", "must be a mapping"),
        ("allowlist: {address: a, port: 1}\n", "must be a list"),
        ("- {address: a, port: 1}\n", "must be a mapping"),
        ("allowlist: [\n", "not valid YAML"),
    ],
)
def test_rejects_bad_config(text: str, reason: str) -> None:
    with pytest.raises(ConfigurationError, match=reason):
        Allowlist.from_yaml(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_an_allowlist_or_a_configuration_error(text: str) -> None:
    try:
        allow = Allowlist.from_yaml(text)
    except ConfigurationError:
        return
    assert all(isinstance(e.address, str) and 1 <= e.port <= 65535 for e in allow.entries)


@pytest.mark.parametrize("text", ["[" * 1500, "allowlist: " + "{a: " * 1500])
def test_deep_nesting_is_a_configuration_error(text: str) -> None:
    with pytest.raises(ConfigurationError):
        Allowlist.from_yaml(text)


def test_rejects_oversized_config_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="larger than"):
        Allowlist.from_yaml("#" * (2 << 20))
    with pytest.raises(ConfigurationError, match="does not exist"):
        Allowlist.from_file(tmp_path / "nope.yaml")


def test_matching_rules() -> None:
    allow = Allowlist.from_yaml(NITRO_FILE)
    kms = "kms.us-east-1.amazonaws.com"
    assert allowlist_matches(allow, kms, 443, remote_ips=[], entry_ips={})  # string match
    assert not allowlist_matches(allow, kms, 444, remote_ips=[], entry_ips={})  # port differs
    # an IP of the remote equal to a resolved IP of an entry
    assert allowlist_matches(
        allow, "10.0.0.5", 443, remote_ips=["10.0.0.5"], entry_ips={kms: ["10.0.0.9", "10.0.0.5"]}
    )
    assert not allowlist_matches(
        allow, "10.0.0.5", 443, remote_ips=["10.0.0.5"], entry_ips={kms: ["10.0.0.9"]}
    )
    v6 = Allowlist.of([("::1", 8443)])
    assert allowlist_matches(
        v6, "ip6-localhost", 8443, remote_ips=["0:0::1"], entry_ips={"::1": ["::1"]}
    )
    assert not allowlist_matches(Allowlist(), "a", 1, remote_ips=["1.2.3.4"], entry_ips={})


async def test_check_allowlist_resolves_names() -> None:
    with trio.fail_after(TIMEOUT_S):
        allow = Allowlist.of([("localhost", 8443)])
        assert await check_allowlist(allow, "127.0.0.1", 8443, ip_version=IpVersion.IPV4)
        assert not await check_allowlist(allow, "127.0.0.1", 8444)
        assert not await check_allowlist(allow, "127.0.0.2", 8443)
        assert not await check_allowlist(allow, "no-such-host.invalid", 8443)


# -- the proxy over the fabric -------------------------------------------------------------


@asynccontextmanager
async def tcp_echo_server() -> AsyncIterator[int]:
    """A real TCP echo server on loopback that echoes until EOF, then closes."""

    async def handle(conn: trio.SocketStream) -> None:
        async with conn:
            try:
                while data := await conn.receive_some(65536):
                    await conn.send_all(data)
            except trio.BrokenResourceError:
                pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield int(listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


async def exchange(stream: trio.SocketStream, payload: bytes) -> bytes:
    """Send everything, half-close, read until EOF (which needs EOF propagated end to end)."""
    got = bytearray()
    async with trio.open_nursery() as nursery:

        async def sender() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(sender)
        while data := await stream.receive_some(65536):
            got += data
    return bytes(got)


async def test_proxy_pipes_to_allowed_endpoint(fabric_dir: Path) -> None:
    payload = os.urandom(3 << 20)
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with tcp_echo_server() as echo_port, trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    serve_vsock_proxy,
                    VMADDR_PORT_ANY,
                    "127.0.0.1",
                    echo_port,
                    allowlist=Allowlist.of([("127.0.0.1", echo_port)]),
                    fabric_dir=fabric_dir,
                )
            )
            assert (fabric_dir / "3" / str(port)).exists()
            async with await open_vsock_stream(VsockAddr(3, port), fabric_dir=fabric_dir) as s:
                assert await exchange(s, payload) == payload
            # several at once
            async with trio.open_nursery() as inner:
                for i in range(8):

                    async def one(i: int = i) -> None:
                        async with await open_vsock_stream(
                            VsockAddr(3, port), fabric_dir=fabric_dir
                        ) as s:
                            assert await exchange(s, b"%d" % i * 999) == b"%d" % i * 999

                    inner.start_soon(one)
            nursery.cancel_scope.cancel()
    closed = [e for e in logs if e["event"] == "vsock_proxy_connection_closed"]
    assert closed[0]["bytes_to_target"] == len(payload)
    assert closed[0]["bytes_from_target"] == len(payload)
    assert not (fabric_dir / "3" / str(port)).exists(), "the listener file goes with the proxy"


async def test_proxy_refuses_to_start_for_denied_endpoint(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with tcp_echo_server() as echo_port:
            with pytest.raises(ProxyNotAllowed, match="not allowed"):
                await serve_vsock_proxy(
                    8000,
                    "127.0.0.1",
                    echo_port,
                    allowlist=Allowlist.of([("127.0.0.1", echo_port + 1)]),
                    fabric_dir=fabric_dir,
                )
            with pytest.raises(ProxyNotAllowed):
                await serve_vsock_proxy(
                    8000, "127.0.0.1", echo_port, allowlist=Allowlist(), fabric_dir=fabric_dir
                )
    assert [e["event"] for e in logs].count("vsock_proxy_denied") == 2
    assert not (fabric_dir / "3" / "8000").exists()
    with pytest.raises(VsockConnectionRefused):
        await open_vsock_stream(VsockAddr(3, 8000), fabric_dir=fabric_dir)


async def test_num_workers_bounds_concurrent_connections(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with tcp_echo_server() as echo_port, trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    serve_vsock_proxy,
                    VMADDR_PORT_ANY,
                    "127.0.0.1",
                    echo_port,
                    allowlist=[("127.0.0.1", echo_port)],
                    num_workers=1,
                    fabric_dir=fabric_dir,
                )
            )
            first = await open_vsock_stream(VsockAddr(3, port), fabric_dir=fabric_dir)
            await first.send_all(b"1")
            assert await first.receive_some(1) == b"1"
            second = await open_vsock_stream(VsockAddr(3, port), fabric_dir=fabric_dir)
            await second.send_all(b"2")
            with trio.move_on_after(0.2) as waited:
                await second.receive_some(1)
            assert waited.cancelled_caught, "the second connection waits for a worker"
            await first.aclose()
            assert await second.receive_some(1) == b"2"
            await second.aclose()
            nursery.cancel_scope.cancel()


async def test_unreachable_remote_closes_the_vsock_side(fabric_dir: Path) -> None:
    async with tcp_echo_server() as dead_port:
        pass  # now nothing listens there
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    serve_vsock_proxy,
                    VMADDR_PORT_ANY,
                    "127.0.0.1",
                    dead_port,
                    allowlist=[("127.0.0.1", dead_port)],
                    ip_version=IpVersion.IPV4,
                    fabric_dir=fabric_dir,
                )
            )
            async with await open_vsock_stream(VsockAddr(3, port), fabric_dir=fabric_dir) as s:
                assert await s.receive_some(10) == b""
            nursery.cancel_scope.cancel()
    assert any(e["event"] == "vsock_proxy_target_unreachable" for e in logs)


# -- the CLI -------------------------------------------------------------------------------


def test_cli_without_config_fails_closed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from runtime.cli import vsock_proxy

    monkeypatch.setattr(vsock_proxy, "DEFAULT_CONFIG_PATH", tmp_path / "vsock-proxy.yaml")
    args = build_parser().parse_args(["vsock-proxy", "8000", "kms.us-east-1.amazonaws.com", "443"])
    assert args.num_workers == "4"
    with pytest.raises(ConfigurationError, match=r"does not exist; pass --config"):
        args.func(args)


def test_cli_flags(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["vsock-proxy", "8000", "h", "443", "-4", "-w", "9", "--config", str(tmp_path / "c")]
    )
    assert (args.local_port, args.remote_addr, args.remote_port) == ("8000", "h", "443")
    assert args.ipv4
    assert args.num_workers == "9"  # (values are checked by run(), with one-line errors)
    assert args.config == tmp_path / "c"
    with pytest.raises(SystemExit):
        parser.parse_args(["vsock-proxy", "8000", "h", "443", "-4", "-6"])


def _cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    try:
        status = enclave_main(argv)
    except SystemExit as exc:  # argparse-level errors exit
        status = int(exc.code or 0)
    return status, capsys.readouterr().err


def _error_lines(err: str) -> list[str]:
    """stderr without the structured log lines (JSON when not on a terminal): what the user
    reads as the error."""
    return [line for line in err.strip().splitlines() if not line.startswith("{")]


def _allowlist(tmp_path: Path, port: int = 443) -> str:
    config = tmp_path / "allow.yaml"
    config.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {port}}}\n")
    return str(config)


@pytest.mark.parametrize(
    "argv",
    [
        ["vsock-proxy"],  # nothing
        ["vsock-proxy", "8000", "127.0.0.1"],  # no REMOTE_PORT
        ["vsock-proxy", "x", "127.0.0.1", "443", "--config", "{config}"],
        ["vsock-proxy", "99999999999", "127.0.0.1", "443", "--config", "{config}"],
        ["vsock-proxy", "8000", "127.0.0.1", "0", "--config", "{config}"],
        ["vsock-proxy", "8000", "127.0.0.1", "https", "--config", "{config}"],
        ["vsock-proxy", "8000", "bad host", "443", "--config", "{config}"],
        ["vsock-proxy", "8000", "127.0.0.1", "443", "-w", "0", "--config", "{config}"],
        ["vsock-proxy", "8000", "127.0.0.1", "443", "-w", "two", "--config", "{config}"],
        ["vsock-proxy", "8000", "127.0.0.1", "443", "--config", "{missing}"],
        ["vsock-proxy", "8000", "127.0.0.1", "443", "--config", "{garbage}"],
        ["vsock-proxy", "8000", "127.0.0.1", "444", "--config", "{config}"],  # not allowed
        ["vsock-proxy", "8000", "127.0.0.1", "443", "-4", "-6", "--config", "{config}"],
    ],
)
def test_cli_user_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fabric_dir: Path, argv: list[str]
) -> None:
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("allowlist: [unclosed\n")
    values = {
        "config": _allowlist(tmp_path),
        "missing": str(tmp_path / "nope.yaml"),
        "garbage": str(garbage),
    }
    argv = [a.format(**values) for a in argv] + ["--fabric-dir", str(fabric_dir)]
    status, err = _cli(capsys, argv)
    assert status != 0
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "Traceback" not in err


def test_cli_busy_vsock_port_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fabric_dir: Path
) -> None:
    listening, done = threading.Event(), threading.Event()

    async def hold_the_port() -> None:  # another proxy already listens on (3, 8000)
        async with await open_vsock_listener(8000, fabric_dir=fabric_dir):
            listening.set()
            await trio.to_thread.run_sync(done.wait)

    holder = threading.Thread(target=trio.run, args=(hold_the_port,))
    holder.start()
    try:
        assert listening.wait(TIMEOUT_S)
        status, err = _cli(
            capsys,
            [
                "vsock-proxy",
                "8000",
                "127.0.0.1",
                "443",
                "--config",
                _allowlist(tmp_path),
                "--fabric-dir",
                str(fabric_dir),
            ],
        )
    finally:
        done.set()
        holder.join(TIMEOUT_S)
    assert status != 0
    assert _error_lines(err) == ["error: vsock:3:8000 is already in use"]


@pytest.mark.slow
async def test_cli_denied_and_allowed(fabric_dir: Path, tmp_path: Path) -> None:
    enclave = [sys.executable, "-m", "runtime.cli"]
    env = dict(os.environ, ENCLAVE_LOG_LEVEL="info")
    with trio.fail_after(3 * TIMEOUT_S):
        async with tcp_echo_server() as echo_port:
            config = tmp_path / "allow.yaml"
            config.write_text(
                json.dumps({"allowlist": [{"address": "127.0.0.1", "port": echo_port}]})
            )
            denied = await trio.run_process(
                [
                    *enclave,
                    "vsock-proxy",
                    "8000",
                    "127.0.0.1",
                    str(echo_port + 1),
                    "--config",
                    str(config),
                    "--fabric-dir",
                    str(fabric_dir),
                ],
                env=env,
                capture_stderr=True,
                check=False,
            )
            assert denied.returncode != 0
            assert b"The given address and port are not allowed" in denied.stderr
            proc = await trio.lowlevel.open_process(
                [
                    *enclave,
                    "vsock-proxy",
                    "8000",
                    "127.0.0.1",
                    str(echo_port),
                    "--config",
                    str(config),
                    "--fabric-dir",
                    str(fabric_dir),
                    "-w",
                    "2",
                ],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            try:
                while not (fabric_dir / "3" / "8000").exists():
                    await trio.sleep(0.02)
                async with await open_vsock_stream(VsockAddr(3, 8000), fabric_dir=fabric_dir) as s:
                    assert await exchange(s, b"through the cli") == b"through the cli"
            finally:
                proc.terminate()
                assert await proc.wait() == 0, "SIGTERM is a clean shutdown"
            assert not (fabric_dir / "3" / "8000").exists(), "its socket file is removed"


EGRESS_CHILD = r"""
import sys, trio
from transport.logs import configure_logging
from transport.vsock import VMADDR_CID_PARENT, VsockAddr, open_vsock_stream

configure_logging(stream=sys.stderr)

async def main():
    with trio.fail_after(10):
        async with await open_vsock_stream(VsockAddr(VMADDR_CID_PARENT, 8000)) as s:
            await s.send_all(b"GET / over the proxy")
            await s.send_eof()
            got = b""
            while data := await s.receive_some(65536):
                got += data
    print(got.decode())

trio.run(main)
"""


@pytest.mark.slow
async def test_enclave_egress_through_broker_and_proxy(fabric_dir: Path) -> None:
    """The demo's KMS path: enclave process -> broker -> (3, 8000) vsock-proxy -> TCP."""
    from transport.vsock import (
        FabricPolicy,
        enclave_fabric_env,
        fabric_socketpair,
        serve_enclave_fabric,
    )

    broker_end, enclave_end = fabric_socketpair()
    with trio.fail_after(3 * TIMEOUT_S):
        async with tcp_echo_server() as echo_port, trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_vsock_proxy,
                    8000,
                    "127.0.0.1",
                    echo_port,
                    allowlist=[("127.0.0.1", echo_port)],
                    fabric_dir=fabric_dir,
                )
            )
            policy = FabricPolicy(cid=16, parent_ports=frozenset({8000}))
            await nursery.start(
                partial(serve_enclave_fabric, broker_end, policy=policy, fabric_dir=fabric_dir)
            )
            env = dict(os.environ, **enclave_fabric_env(enclave_end, 16))
            outputs: list[bytes] = []

            async def enclave(task_status: trio.TaskStatus[trio.Process]) -> None:
                done = await trio.run_process(
                    [sys.executable, "-c", EGRESS_CHILD],
                    env=env,
                    pass_fds=(enclave_end.fileno(),),
                    capture_stdout=True,
                    task_status=task_status,
                )
                outputs.append(done.stdout)
                nursery.cancel_scope.cancel()

            await nursery.start(enclave)
            enclave_end.close()
    broker_end.close()
    assert outputs == [b"GET / over the proxy\n"]
