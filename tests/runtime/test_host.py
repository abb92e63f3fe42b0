"""The host daemon (runtime.host) and the launch request it reads: bad input from a local
client is answered and bounded, the daemon keeps serving, a client that leaves during a start
cancels it, and the request parser never fails with anything but its typed error."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.cli._common import parse_memory, parse_u32, parse_u64
from runtime.errors import InvalidArgumentError, NitroCliError, error_for_code
from runtime.host import MAX_REQUEST_BYTES, serve_host
from runtime.launch import LaunchRequest
from runtime.state import StateDir
from tests.runtime.test_lifecycle_support import OP_TIMEOUT_S, _fresh_logging

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_request_keys = st.sampled_from(sorted(LaunchRequest.__dataclass_fields__))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_request_keys, _json, max_size=12) | _json)
def test_launch_request_from_json_never_fails_untyped(obj: object) -> None:
    try:
        req = LaunchRequest.from_json(obj)  # type: ignore[arg-type]
    except NitroCliError as exc:  # E03, or E01/E02 for the CPU pair
        code = exc.code
    else:
        code = None
    if code is not None:
        assert code in ("E01", "E02", "E03")
        return
    assert LaunchRequest.from_json(req.to_json()) == req  # what is accepted round-trips


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=24))
def test_cli_number_parsers_never_fail_untyped(text: str) -> None:
    for parse in (parse_memory, lambda t: parse_u32(t, "cpu-count"), lambda t: parse_u64(t, "x")):
        try:
            value = parse(text)
        except InvalidArgumentError:
            value = 0  # the typed E03, nothing else
        assert value >= 0


@given(st.text(max_size=8), st.text(max_size=40))
def test_error_for_code_always_gives_a_typed_error(code: str, message: str) -> None:
    err = error_for_code(code, message)
    assert isinstance(err, NitroCliError)
    assert err.cli_report().startswith("[ E")


async def _serve(state: StateDir, *, task_status: trio.TaskStatus[None]) -> None:
    await serve_host(state, linger_s=3600, task_status=task_status)


async def _talk(path: Path, payload: bytes, *, close_write: bool = False) -> list[bytes]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(payload)
        if close_write:
            await stream.send_eof()
        buf = b""
        with trio.move_on_after(15):
            while buf.count(b"\n") < 2:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
    return buf.splitlines()


async def test_the_daemon_answers_bad_requests_and_keeps_serving(enclave_state_dir: Path) -> None:
    state = StateDir(enclave_state_dir)
    path = enclave_state_dir / "host.sock"
    with trio.fail_after(OP_TIMEOUT_S * 2):
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve, state)
            assert (path.stat().st_mode & 0o777) == 0o600
            for payload in (
                b"not json\n",
                b'{"op": "format c:"}\n',
                b'{"op": "run", "request": {"eif_path": 1}}\n',
                b'{"op": "run", "request": {"eif_path": "x", "memory_mib": 128}}\n',  # E01
            ):
                accepted, reply = await _talk(path, payload)
                assert json.loads(accepted) == {"accepted": True}
                answer = json.loads(reply)
                assert answer["ok"] is False
                assert answer["code"] in ("E14", "E03", "E01"), answer
            # an oversized line without a newline: dropped after the bound, nothing accepted
            lines = await _talk(path, b"x" * (MAX_REQUEST_BYTES + 10), close_write=True)
            assert b'"ok": true' not in b"".join(lines)
            # a valid request for a file that is not an image: the typed error, no record
            junk = enclave_state_dir.parent / "junk.eif"
            junk.write_bytes(b"\0" * 1024)
            req = LaunchRequest(eif_path=str(junk), memory_mib=128, cpu_count=1)
            msg = json.dumps({"op": "run", "request": req.to_json()}).encode() + b"\n"
            _accepted, reply = await _talk(path, msg)
            assert json.loads(reply)["code"] == "E35"
            assert state.records() == []
            nursery.cancel_scope.cancel()


async def test_a_client_that_leaves_during_the_start_cancels_it(
    enclave_state_dir: Path, enclave_app
) -> None:
    eif = enclave_app("import time\ntime.sleep(120)\n")
    state = StateDir(enclave_state_dir)
    path = enclave_state_dir / "host.sock"
    req = LaunchRequest(eif_path=str(eif), memory_mib=128, cpu_count=1)
    msg = json.dumps({"op": "run", "request": req.to_json()}).encode() + b"\n"
    with trio.fail_after(OP_TIMEOUT_S * 2):
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve, state)
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(str(path))
            stream = trio.SocketStream(sock)
            await stream.send_all(msg)
            assert await stream.receive_some(100) == b'{"accepted": true}\n'
            await stream.aclose()  # Ctrl-C in run-enclave, before the reply
            await trio.sleep(1.0)
            while any(r.state == "STARTING" for r in state.records()):
                await trio.sleep(0.05)
            assert state.records() == []  # nothing was left running
            nursery.cancel_scope.cancel()


__all__ = ["_fresh_logging"]  # autouse fixture (re-exported on purpose)
