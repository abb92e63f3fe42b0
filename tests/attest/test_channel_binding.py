"""attest.channel glue in a real enclave-channel/1 handshake with real NSM documents."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from attest.ca import LocalCA
from attest.channel import channel_verifier, nsm_attester
from attest.nsm.client import NsmClient
from attest.nsm.device import EnclaveIdentity, NsmDevice
from attest.nsm.server import serve_nsm
from attest.policy import MeasurementSet, Policy
from attest.verify import Verifier
from transport.channel import Suite, accept_channel, connect_channel
from transport.errors import AuthenticationFailed, ChannelClosed

from .helpers import MODULE_ID, pcr

TIMEOUT_S = 15
IMAGE = {0: pcr(0x10), 1: pcr(0x11), 2: pcr(0x12), 4: pcr(0x14)}
EXPECTED = Policy([MeasurementSet({0: IMAGE[0], 1: IMAGE[1], 2: IMAGE[2]})], max_age_s=60)


async def _nsm(device: NsmDevice, nursery: trio.Nursery) -> NsmClient:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await nursery.start(serve_nsm, parent, device)
    return NsmClient.from_socket(child)


async def _handshake(
    ca: LocalCA,
    verifier: Verifier,
    policy: Policy,
    *,
    debug: bool = False,
    suites: tuple[Suite, ...] = (Suite.X25519,),
) -> tuple[object | None, list[dict[str, object]]]:
    device = NsmDevice(EnclaveIdentity(MODULE_ID, IMAGE, debug=debug), ca.new_signer(MODULE_ID))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    outcome: dict[str, object] = {}
    with trio.fail_after(TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nsm = await _nsm(device, nursery)

            async def enclave() -> None:
                try:
                    chan = await accept_channel(server_stream, attester=nsm_attester(nsm))
                except (AuthenticationFailed, ChannelClosed):  # the client hung up
                    outcome["server_failed"] = True
                    return
                data = await chan.receive_some()
                await chan.send_all(b"echo:" + data)
                await chan.aclose()

            nursery.start_soon(enclave)
            try:
                chan = await connect_channel(
                    client_stream, verifier=channel_verifier(verifier, policy), suites=suites
                )
            except AuthenticationFailed:
                outcome["peer"] = None
            else:
                await chan.send_all(b"hello")
                assert await chan.receive_some() == b"echo:hello"
                outcome["peer"] = chan.peer
                await chan.aclose()
            await nsm.aclose()
    return outcome["peer"], logs


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.load_or_create(tmp_path / "ca")


@pytest.mark.parametrize("suite", [Suite.X25519, Suite.MLKEM768_X25519])
async def test_accepted_with_the_right_pcrs(ca: LocalCA, suite: Suite) -> None:
    peer, _ = await _handshake(ca, Verifier([ca.root_certificate]), EXPECTED, suites=(suite,))
    assert peer is not None
    assert peer.module_id == MODULE_ID  # type: ignore[attr-defined]
    assert peer.pcrs[0] == IMAGE[0]
    assert peer.pcrs[4] == IMAGE[4]
    assert peer.nonce is not None
    assert peer.public_key is not None


def _failures(logs: list[dict[str, object]]) -> str:
    return " | ".join(str(e.get("reason")) for e in logs if e.get("event") == "channel_failed")


async def test_rejected_for_a_wrong_pcr(ca: LocalCA) -> None:
    policy = Policy([MeasurementSet({0: pcr(0x99)})])
    peer, logs = await _handshake(ca, Verifier([ca.root_certificate]), policy)
    assert peer is None
    assert "PCR0" in _failures(logs)


async def test_rejected_for_debug(ca: LocalCA) -> None:
    policy = Policy([MeasurementSet({4: IMAGE[4]})])  # PCR4 survives debug mode
    peer, logs = await _handshake(ca, Verifier([ca.root_certificate]), policy, debug=True)
    assert peer is None
    assert "debug" in _failures(logs)
    allowed = Policy([MeasurementSet({4: IMAGE[4]})], allow_debug=True)
    peer, _ = await _handshake(ca, Verifier([ca.root_certificate]), allowed, debug=True)
    assert peer is not None
    assert peer.pcrs[0] == bytes(48)


async def test_rejected_for_another_root(ca: LocalCA, tmp_path: Path) -> None:
    other = LocalCA.load_or_create(tmp_path / "other")
    peer, logs = await _handshake(ca, Verifier([other.root_certificate]), EXPECTED)
    assert peer is None
    assert "trust root" in _failures(logs)
