"""The enclave-to-enclave relay and the enclave-side peer API (``transport.peers``).

Pure parts first (rules, the request parser); then the relay on a real fabric with in-process
brokers standing in for enclaves (real kernel sockets and fd passing, real origin names, the
real mutual handshake with test documents). Real enclaves: tests/integration/test_fleet.py.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from hypothesis import given
from hypothesis import strategies as st

from tests.transport.test_fabric_broker import broker
from transport.channel import SecureChannel
from transport.channel.testing import TestAuthority
from transport.errors import ConfigurationError, PeerUnreachable, RemoteProtocolError
from transport.fabric.enclave import EnclaveFabricClient
from transport.peers import (
    MAX_NAME,
    EnclaveEntry,
    EnclaveRef,
    PeerAccessDenied,
    PeerNotFound,
    PeerNotListening,
    RelayPolicy,
    RelayRequest,
    RelayRule,
    RelayStatus,
    RequestReader,
    StaticDirectory,
    TargetKind,
    decode_reply,
    in_group,
    open_peer_channel,
    parse_rule,
    serve_peer_channels,
    serve_peer_relay,
)
from transport.vsock import FabricPolicy, VsockAddr, open_vsock_stream

TIMEOUT_S = 15
RELAY_PORT = 7200

# --- the allowlist ----------------------------------------------------------------------------


def test_rules_parse_names_cids_and_ports() -> None:
    rule = parse_rule("front=model:5005")
    assert rule == RelayRule(EnclaveRef(name="front"), EnclaveRef(name="model"), 5005)
    assert str(rule) == "front=model:5005"
    assert parse_rule(" 17 = 18 : 6000 ") == RelayRule(EnclaveRef(cid=17), EnclaveRef(cid=18), 6000)
    assert parse_rule("a:b=c:d:7").target == EnclaveRef(
        name="c:d"
    )  # the port is after the last ':'


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("front", "FROM=TO:PORT"),
        ("front=model", "FROM=TO:PORT"),
        ("=model:1", "FROM=TO:PORT"),
        ("front=:1", "FROM=TO:PORT"),
        ("front=model:x", "must be a number"),
        ("front=model:-1", "must be a number"),
        ("front=model:4294967295", "out of range"),
        ("3=model:1", "not an enclave CID"),
        ("front=4294967295:1", "not an enclave CID"),
        ("fr\x00nt=model:1", "bad enclave name"),
    ],
)
def test_bad_rules_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match=why):
        parse_rule(text)


def test_a_name_covers_its_replicas_and_nothing_else() -> None:
    assert in_group("worker", "worker")
    assert in_group("worker", "worker_1")
    assert in_group("worker", "worker_12")
    assert not in_group("worker", "worker_")
    assert not in_group("worker", "worker_1a")
    assert not in_group("worker", "workers")
    assert not in_group("worker_1", "worker")


def test_policy_allows_only_what_a_rule_says() -> None:
    policy = RelayPolicy(["front=model:5005", "worker=worker:6000", "30=31:1"])
    front, model1 = EnclaveEntry(16, "front_1"), EnclaveEntry(17, "model_1")
    assert policy.allowing(front, model1, 5005) is policy.rules[0]
    assert policy.allowing(front, model1, 5006) is None
    assert policy.allowing(model1, front, 5005) is None  # rules have a direction
    assert policy.allowing(EnclaveEntry(18, "worker"), EnclaveEntry(19, "worker_3"), 6000)
    assert policy.allowing(EnclaveEntry(30, None), EnclaveEntry(31, "x"), 1)
    assert policy.allowing(EnclaveEntry(30, None), EnclaveEntry(32, "x"), 1) is None
    assert policy.names_target(front, "model_7", 5005)
    assert not policy.names_target(front, "secret", 5005)
    assert RelayPolicy([]).allowing(front, model1, 5005) is None  # no default: deny


# --- the request parser -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        RelayRequest(TargetKind.CID, 17, 5005),
        RelayRequest(TargetKind.NAME, "model_1", 0),
        RelayRequest(TargetKind.GROUP, "wörker", 2**32 - 2),
        RelayRequest(TargetKind.NAME, "n" * MAX_NAME, 1),
    ],
)
def test_requests_round_trip_in_any_chunking(request_: RelayRequest) -> None:
    wire = request_.encode()
    for cut in range(1, len(wire)):
        reader = RequestReader()
        assert reader.feed(wire[:cut]) is None
        assert reader.feed(wire[cut:]) == request_


@pytest.mark.parametrize(
    "wire",
    [
        b"ERL2" + struct.pack("!BIB", 1, 1, 4) + b"\0\0\0\x11",  # another version
        b"ERL1" + struct.pack("!BIB", 9, 1, 4) + b"\0\0\0\x11",  # unknown kind
        b"ERL1" + struct.pack("!BIB", 1, 1, 5) + b"\0\0\0\0\x11",  # a CID is 4 bytes
        b"ERL1" + struct.pack("!BIB", 2, 1, 0),  # empty name
        b"ERL1" + struct.pack("!BIB", 2, 1, MAX_NAME + 1),  # too long, refused from the header
        b"ERL1" + struct.pack("!BIB", 1, 1, 4) + b"\0\0\0\x03",  # the parent is no peer
        b"ERL1" + struct.pack("!BIB", 2, 1, 2) + b"\xff\xfe",  # not UTF-8
        b"ERL1" + struct.pack("!BIB", 2, 1, 1) + b"ab",  # bytes after the request
    ],
)
def test_malformed_requests_are_refused_from_the_first_bad_byte(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        RequestReader().feed(wire)


@given(st.binary(max_size=300))
def test_any_bytes_give_a_request_nothing_yet_or_a_protocol_error(data: bytes) -> None:
    reader = RequestReader()
    try:
        got = reader.feed(data)
    except RemoteProtocolError:
        return
    assert got is None or isinstance(got, RelayRequest)
    assert len(reader._buf) <= 10 + MAX_NAME  # bounded before buffering


def test_replies_are_checked() -> None:
    assert decode_reply(b"\x00\x00\x00\x00\x11") == (RelayStatus.OK, 17)
    with pytest.raises(RemoteProtocolError):
        decode_reply(b"\x09\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError):
        decode_reply(b"\x00")


# --- the relay on a real fabric ---------------------------------------------------------------

FRONT, MODEL, MODEL_1, OTHER = 21, 22, 23, 24
DIRECTORY = StaticDirectory(
    [
        EnclaveEntry(FRONT, "front"),
        EnclaveEntry(MODEL, "model"),
        EnclaveEntry(MODEL_1, "model_1"),
        EnclaveEntry(OTHER, "other"),
    ]
)
POLICY = RelayPolicy(["front=model:5005", "front=ghost:5005", "front=model:5099"])


class Fleet:
    """Enclaves as in-process brokers, the relay, and peer servers on the model replicas."""

    def __init__(self, fabric_dir: Path, clients: dict[int, EnclaveFabricClient]) -> None:
        self.fabric_dir = fabric_dir
        self.clients = clients
        self.authority = TestAuthority()
        self.served: list[tuple[int, str]] = []  # (server cid, caller module id)

    def attester(self, cid: int) -> Any:
        return self.authority.attester(module_id=f"i-test-enc{cid:016x}")

    async def open(self, cid: int, target: int | str, port: int = 5005, **kw: Any) -> SecureChannel:
        kw.setdefault("relay_port", RELAY_PORT)
        return await open_peer_channel(
            target,
            port,
            verifier=self.authority.verifier(),
            attester=self.attester(cid),
            connect=self.clients[cid].connect,
            **kw,
        )


@asynccontextmanager
async def fleet(fabric_dir: Path) -> AsyncIterator[Fleet]:
    async with (
        broker(fabric_dir, FabricPolicy(cid=FRONT, parent_ports=None)) as (front, _),
        broker(fabric_dir, FabricPolicy(cid=MODEL, parent_ports=None)) as (model, _),
        broker(fabric_dir, FabricPolicy(cid=MODEL_1, parent_ports=None)) as (model1, _),
        broker(fabric_dir, FabricPolicy(cid=OTHER, parent_ports=None)) as (other, _),
        trio.open_nursery() as nursery,
    ):
        f = Fleet(fabric_dir, {FRONT: front, MODEL: model, MODEL_1: model1, OTHER: other})
        await nursery.start(
            partial(serve_peer_relay, POLICY, DIRECTORY, port=RELAY_PORT, fabric_dir=fabric_dir)
        )
        for cid in (MODEL, MODEL_1):

            async def handle(channel: SecureChannel, cid: int = cid) -> None:
                assert channel.peer is not None
                f.served.append((cid, channel.peer.module_id))
                while data := await channel.receive_some():
                    await channel.send_all(b"%d:" % cid + data)

            listener = await f.clients[cid].listen(5005)
            await nursery.start(
                partial(
                    serve_peer_channels,
                    listener,
                    handle,
                    attester=f.attester(cid),
                    peer_verifier=f.authority.verifier(),
                )
            )
        yield f
        nursery.cancel_scope.cancel()


async def test_an_allowed_enclave_gets_a_mutually_attested_channel(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with fleet(fabric_dir) as f:
            channel = await f.open(FRONT, "model")
            async with channel:
                assert channel.peer is not None
                assert channel.peer.module_id == f"i-test-enc{MODEL:016x}"
                await channel.send_all(b"hello")
                assert await channel.receive_some() == b"22:hello"
            assert f.served == [(MODEL, f"i-test-enc{FRONT:016x}")]  # the callee saw the caller
    connected = [e for e in logs if e["event"] == "peer_relay_connected"]
    assert connected[0]["source_cid"] == FRONT
    assert connected[0]["source_name"] == "front"
    assert connected[0]["target_cid"] == MODEL


async def test_what_no_rule_allows_is_refused_and_logged(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with fleet(fabric_dir) as f:
            with pytest.raises(PeerAccessDenied):
                await f.open(OTHER, "model")  # no rule for "other"
            with pytest.raises(PeerAccessDenied):
                await f.open(FRONT, "model", port=5006)  # not that port
            with pytest.raises(PeerAccessDenied):
                await f.open(FRONT, MODEL_1, port=5006)  # by CID, no rule
            with pytest.raises(PeerAccessDenied):
                await f.open(MODEL, "front")  # rules have a direction
            with pytest.raises(PeerAccessDenied):
                await f.open(FRONT, "secret")  # unknown and not allowed: "denied", no hint
            # The relay still serves the allowed ones.
            async with await f.open(FRONT, MODEL_1):
                pass
    refused = [e for e in logs if e["event"] == "peer_relay_refused"]
    assert len(refused) == 5
    assert refused[0]["source"] == f"cid {OTHER}"
    assert refused[0]["status"] == "DENIED"
    assert "model" in refused[0]["request"]


async def test_not_found_not_listening_and_no_relay(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with fleet(fabric_dir) as f:
            with pytest.raises(PeerNotFound) as nf:
                await f.open(FRONT, "ghost")  # allowed by a rule, but not running
            assert isinstance(nf.value, PeerUnreachable)
            with pytest.raises(PeerNotListening):
                await f.open(FRONT, "model", port=5099)  # allowed, running, nothing listens
            with pytest.raises(PeerUnreachable, match="no enclave relay"):
                await f.open(FRONT, "model", relay_port=RELAY_PORT + 1)


async def test_any_replica_spreads_over_the_group(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with fleet(fabric_dir) as f:
            first = await f.open(FRONT, "model", any_replica=True)
            second = await f.open(FRONT, "model", any_replica=True)
            async with first, second:
                await first.send_all(b"a")
                await second.send_all(b"b")
                answers = {await first.receive_some(), await second.receive_some()}
            assert answers == {b"22:a", b"23:b"}  # least connections: one each


async def test_a_host_process_is_no_enclave_to_the_relay(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with fleet(fabric_dir):
            stream = await open_vsock_stream(VsockAddr(3, RELAY_PORT), fabric_dir=fabric_dir)
            async with stream:
                await stream.send_all(RelayRequest(TargetKind.NAME, "model", 5005).encode())
                reply = await stream.receive_some(5)
                assert decode_reply(reply)[0] is RelayStatus.DENIED
                assert await stream.receive_some(5) == b""  # then closed


async def test_malformed_and_silent_requests_are_refused_and_the_relay_goes_on(
    fabric_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    del autojump_clock  # the relay's request deadline passes in virtual time
    with trio.fail_after(TIMEOUT_S):
        async with fleet(fabric_dir) as f:
            garbage = await f.clients[FRONT].connect(VsockAddr(3, RELAY_PORT))
            async with garbage:
                await garbage.send_all(b"GET / HTTP/1.1\r\n\r\n")
                assert decode_reply(await garbage.receive_some(5))[0] is RelayStatus.MALFORMED
            silent = await f.clients[FRONT].connect(VsockAddr(3, RELAY_PORT))
            async with silent:
                await trio.sleep(10)  # past the relay's 5 s request deadline
                assert decode_reply(await silent.receive_some(5))[0] is RelayStatus.MALFORMED
            async with await f.open(FRONT, "model"):
                pass


async def test_a_peer_that_fails_the_callers_policy_is_refused(fabric_dir: Path) -> None:
    """The relay connected us, but the callee is not an enclave our verifier accepts."""
    with trio.fail_after(TIMEOUT_S):
        async with fleet(fabric_dir) as f:
            from transport.errors import AuthenticationFailed

            strict = f.authority.verifier(expected_pcrs={0: b"\x01" * 48})
            with pytest.raises(AuthenticationFailed):
                await open_peer_channel(
                    "model",
                    5005,
                    verifier=strict,
                    attester=f.attester(FRONT),
                    connect=f.clients[FRONT].connect,
                    relay_port=RELAY_PORT,
                )
            assert f.served == []  # the callee never served it


async def test_a_peer_server_bounds_its_open_channels() -> None:
    """Over ``max_channels`` a caller waits in the backlog (nothing read, nothing attested)
    until a channel closes."""
    from transport.channel import connect_channel

    authority = TestAuthority()
    release = trio.Event()

    async def handle(channel: SecureChannel) -> None:
        await channel.send_all(b"hi")
        await release.wait()

    async def call() -> SecureChannel:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        channel = await connect_channel(
            stream, verifier=authority.verifier(), attester=authority.attester()
        )
        assert await channel.receive_some() == b"hi"
        return channel

    with trio.fail_after(TIMEOUT_S):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_peer_channels,
                    listeners[0],
                    handle,
                    attester=authority.attester(),
                    peer_verifier=authority.verifier(),
                    max_channels=1,
                )
            )
            first = await call()
            with trio.move_on_after(0.5) as waited:
                await call()
            assert waited.cancelled_caught  # the second caller waits
            release.set()
            await first.aclose()
            second = await call()  # and is served once the first channel closed
            await second.aclose()
            nursery.cancel_scope.cancel()
