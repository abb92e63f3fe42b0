"""Mutual attestation in ``enclave-channel/1`` (PROTOCOL.md §3.4), pure: no event loop, no I/O.

Each test pins one rule: the client's document binds HELLO ‖ MUTUAL_ATTESTATION ‖ KEY, its role
and suite, and the enclave's key; the enclave verifies it against its own policy before it opens
the secret; the client is established only once the enclave's ACCEPTED record authenticates.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.transport.channel_helpers import ChannelPair, MutualPair, sign_request
from transport.channel import (
    CLIENT_USER_DATA_PREFIX,
    NEED_DATA,
    USER_DATA_PREFIX,
    Attestation,
    AttestationRequest,
    ChannelEstablished,
    Close,
    Data,
    Hello,
    State,
    Suite,
)
from transport.channel._record import HEADER, FrameType
from transport.channel.testing import TestAttester, TestAuthority, default_pcrs
from transport.errors import AuthenticationFailed, LocalProtocolError

OPAQUE = "authentication failed"
SUITES = [Suite.X25519, Suite.MLKEM768_X25519]


def _server_rejects(pair: MutualPair, document: bytes) -> AuthenticationFailed:
    """Deliver KEY ‖ CLIENT_ATTESTATION(document); the server must reject, sending nothing."""
    pair.server.receive_data(pair.client.send(Attestation(document)))
    with pytest.raises(AuthenticationFailed) as info:
        pair.server.next_event()
    assert str(info.value) == OPAQUE
    assert pair.server.state is State.ERROR
    assert pair.server.data_to_send() == b""  # silent on the wire
    assert pair.server.peer is None
    return info.value


@pytest.mark.parametrize("suite", SUITES)
def test_mutual_handshake_exposes_each_peer_to_the_other(suite: Suite) -> None:
    pair = MutualPair(suites=(suite,))
    client_done, server_done = pair.handshake()
    assert client_done.suite is server_done.suite is suite
    assert client_done.peer is not None
    assert client_done.peer.module_id.endswith("srv")
    assert server_done.peer is not None
    assert server_done.peer.module_id.endswith("cli")
    assert server_done.peer.pcr0 == default_pcrs()[0]
    assert server_done.peer.pcr8 == default_pcrs()[8]
    assert not server_done.peer.debug
    assert pair.server.peer is server_done.peer
    assert pair.client.mutual
    assert pair.server.mutual
    assert pair.client.state is State.OPEN
    assert pair.server.state is State.OPEN
    # Data flows both ways after the ACCEPTED record (which took the s2c sequence number 0).
    assert pair.server.records_sent == 1
    assert pair.client.records_received == 1
    pair.server.receive_data(pair.client.send(Data(b"ping")))
    assert pair.server.next_event() == Data(b"ping")
    pair.client.receive_data(pair.server.send(Data(b"pong")))
    assert pair.client.next_event() == Data(b"pong")
    pair.client.receive_data(pair.server.send(Close()))
    assert pair.client.next_event() == Close()


def test_the_client_document_binds_the_whole_transcript_role_and_key() -> None:
    pair = MutualPair()
    request = pair.to_client_attestation()
    w = pair.wire
    key_frame = pair.client._key_frame
    assert request.nonce == hashlib.sha384(w["hello"] + w["attestation"] + key_frame).digest()
    assert request.user_data == CLIENT_USER_DATA_PREFIX + bytes([Suite.X25519.value])
    assert w["attestation"][0] == FrameType.MUTUAL_ATTESTATION
    assert pair.server_request.public_key == request.public_key  # the enclave's key binding
    assert pair.client.state is State.CLIENT_ATTESTING
    assert pair.client.data_to_send() == b""  # KEY is held back until our document goes with it


def test_a_client_with_another_image_is_refused() -> None:
    pair = MutualPair(client_pcrs={0: hashlib.sha384(b"another image").digest()})
    pair.to_client_attestation()
    exc = _server_rejects(pair, pair.client_document())
    assert "client's attestation document rejected" in exc.reason
    assert "PCR0" in exc.reason


@pytest.mark.parametrize("allow_debug", [False, True])
def test_a_debug_client_passes_only_if_the_policy_allows_debug(allow_debug: bool) -> None:
    authority = TestAuthority()
    debug_client = authority.attester(module_id="i-test-enc00000000000dbg", debug=True)
    zero = {i: bytes(48) for i in (0, 1, 2)}  # what a debug document carries
    verifier = authority.verifier(expected_pcrs=zero, allow_debug=allow_debug)
    pair = MutualPair(authority=authority, client_attester=debug_client, peer_verifier=verifier)
    if allow_debug:
        _, server_done = pair.handshake()
        assert server_done.peer is not None
        assert server_done.peer.debug
        return
    pair.to_client_attestation()
    exc = _server_rejects(pair, pair.client_document())
    assert "debug" in exc.reason


def test_a_client_document_replayed_from_another_handshake_is_refused() -> None:
    authority = TestAuthority()
    first = MutualPair(authority=authority)
    first.to_client_attestation()
    recorded = first.client_document()  # a genuine document, for that handshake
    second = MutualPair(authority=authority)
    second.to_client_attestation()
    exc = _server_rejects(second, recorded)
    assert "nonce" in exc.reason


def test_the_enclave_document_reflected_as_the_client_document_is_refused() -> None:
    pair = MutualPair()
    pair.to_client_attestation()
    # The enclave's own document of this very handshake, sent back as the client's.
    reflected = sign_request(pair.server_attester, pair.server_request)
    _server_rejects(pair, reflected)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("user_data", USER_DATA_PREFIX + b"\x01", "user_data"),  # the enclave's role label
        ("user_data", None, "user_data"),
        ("public_key", b"\x00" * 32, "public_key"),
        ("public_key", None, "public_key"),
    ],
)
def test_each_binding_of_the_client_document_is_checked(
    field: str, value: Any, reason: str
) -> None:
    pair = MutualPair()
    pair.to_client_attestation()

    def forge(payload: dict[str, Any]) -> None:
        payload[field] = value

    exc = _server_rejects(pair, pair.client_document(forge))
    assert reason in exc.reason


def test_a_host_client_forging_a_document_is_refused() -> None:
    pair = MutualPair()
    pair.to_client_attestation()
    forger = TestAuthority().attester()  # no NSM the enclave trusts
    assert pair.client_request is not None
    forged = forger.authority.sign(
        forger.payload(
            nonce=pair.client_request.nonce,
            public_key=pair.client_request.public_key,
            user_data=pair.client_request.user_data,
        )
    )
    exc = _server_rejects(pair, forged)
    assert "signature" in exc.reason


def _first_attestation(pair: ChannelPair | MutualPair, attester: TestAttester) -> bytearray:
    pair.server.receive_data(pair.client.send(Hello()))
    request = pair.server.next_event()
    assert isinstance(request, AttestationRequest)
    return bytearray(pair.server.send(Attestation(sign_request(attester, request))))


def test_stripping_the_enclaves_demand_in_transit_fails() -> None:
    """MUTUAL_ATTESTATION rewritten to ATTESTATION: the client goes one-sided, and the enclave,
    which waits for the client's document, refuses what comes instead."""
    pair = MutualPair()
    frame = _first_attestation(pair, pair.server_attester)
    frame[0] = FrameType.ATTESTATION
    pair.client.receive_data(bytes(frame))
    assert isinstance(pair.client.next_event(), ChannelEstablished)
    pair.server.receive_data(pair.client.data_to_send() + pair.client.send(Data(b"x")))
    with pytest.raises(AuthenticationFailed) as info:
        pair.server.next_event()
    assert "unexpected frame type" in info.value.reason


def test_adding_a_demand_in_transit_fails() -> None:
    """ATTESTATION rewritten to MUTUAL_ATTESTATION: the frame type is in the HPKE info, so
    the one-sided enclave cannot open the client's KEY."""
    pair = ChannelPair()
    frame = _first_attestation(pair, pair.attester)
    frame[0] = FrameType.MUTUAL_ATTESTATION
    pair.client.receive_data(bytes(frame))
    own = pair.client.next_event()
    assert isinstance(own, AttestationRequest)
    pair.server.receive_data(pair.client.send(Attestation(sign_request(pair.attester, own))))
    with pytest.raises(AuthenticationFailed) as info:
        pair.server.next_event()
    assert "failed to open" in info.value.reason


def test_a_tampered_acceptance_record_is_refused() -> None:
    pair = MutualPair()
    pair.to_client_attestation()
    pair.server.receive_data(pair.client.send(Attestation(pair.client_document())))
    pair.server.next_event()
    accepted = bytearray(pair.server.data_to_send())
    assert accepted[0] == FrameType.ACCEPTED
    assert len(accepted) == HEADER.size + 16
    accepted[-1] ^= 1
    pair.client.receive_data(bytes(accepted))
    with pytest.raises(AuthenticationFailed) as info:
        pair.client.next_event()
    assert "acceptance" in info.value.reason


def test_eof_instead_of_acceptance_is_an_authentication_failure() -> None:
    pair = MutualPair()
    pair.to_client_attestation()
    pair.client.send(Attestation(pair.client_document()))
    assert pair.client.state is State.CLIENT_WAIT_ACCEPT
    pair.client.receive_data(b"")
    with pytest.raises(AuthenticationFailed):
        pair.client.next_event()


def test_api_misuse_in_mutual_mode_is_a_local_error() -> None:
    pair = MutualPair()
    pair.to_client_attestation()
    with pytest.raises(LocalProtocolError):
        pair.client.send(Data(b"too early"))  # nothing before our document and ACCEPTED
    with pytest.raises(LocalProtocolError):
        pair.client.send(Attestation(b""))
    pair.client.send(Attestation(pair.client_document()))
    with pytest.raises(LocalProtocolError):
        pair.client.send(Attestation(pair.client_document()))  # once only
    with pytest.raises(LocalProtocolError):
        pair.client.send(Data(b"before ACCEPTED"))


def test_data_before_the_client_document_is_refused_by_the_enclave() -> None:
    pair = MutualPair()
    pair.to_client_attestation()
    key_and_doc = pair.client.send(Attestation(pair.client_document()))
    key_frame = key_and_doc[: HEADER.size + 80]  # X25519: a KEY body of 80 bytes
    # KEY then a DATA-typed frame where the client's document belongs.
    pair.server.receive_data(key_frame + HEADER.pack(FrameType.DATA, 17) + b"\x00" * 17)
    with pytest.raises(AuthenticationFailed) as info:
        pair.server.next_event()
    assert "unexpected frame type" in info.value.reason


def test_bytes_while_the_client_attests_are_refused() -> None:
    pair = MutualPair()
    pair.to_client_attestation()
    pair.client.receive_data(b"\x06")
    with pytest.raises(AuthenticationFailed):
        pair.client.next_event()


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12))
def test_rechunking_the_mutual_handshake_gives_the_same_result(cuts: list[int]) -> None:
    pair = MutualPair()
    pair.to_client_attestation()
    wire = pair.client.send(Attestation(pair.client_document()))
    pos, events = 0, []
    for cut in [*cuts, len(wire)]:
        piece = wire[pos : pos + cut]
        pos += len(piece)
        if piece:
            pair.server.receive_data(piece)
        while (event := pair.server.next_event()) is not NEED_DATA:
            events.append(event)
        if pos >= len(wire):
            break
    assert [type(e).__name__ for e in events] == ["ChannelEstablished"]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(garbage=st.binary(min_size=1, max_size=600))
def test_any_client_document_but_a_genuine_one_is_refused_cleanly(garbage: bytes) -> None:
    pair = MutualPair()
    pair.to_client_attestation()
    _server_rejects(pair, garbage)


# --- the trio adapter -------------------------------------------------------------------------

TIMEOUT_S = 10


async def _run_pair(
    *,
    client_attester: TestAttester | None,
    peer_verifier: Any,
    authority: TestAuthority,
) -> tuple[Any, Any]:
    """connect_channel / accept_channel over a memory stream pair; each side's result or error."""
    import trio
    import trio.testing

    from transport.channel import accept_channel, connect_channel

    client_stream, server_stream = trio.testing.memory_stream_pair()
    out: dict[str, Any] = {}

    async def server() -> None:
        try:
            out["server"] = await accept_channel(
                server_stream,
                attester=authority.attester(module_id="i-test-enc00000000000srv"),
                peer_verifier=peer_verifier,
            )
        except Exception as exc:
            out["server"] = exc

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            try:
                out["client"] = await connect_channel(
                    client_stream, verifier=authority.verifier(), attester=client_attester
                )
            except Exception as exc:
                out["client"] = exc
    return out["client"], out["server"]


async def test_trio_mutual_channel_carries_data_and_shows_the_peer() -> None:
    import trio

    authority = TestAuthority()
    client, server = await _run_pair(
        client_attester=authority.attester(module_id="i-test-enc00000000000cli"),
        peer_verifier=authority.verifier(),
        authority=authority,
    )
    assert server.peer.module_id.endswith("cli")
    assert server.peer.pcr0 == default_pcrs()[0]
    assert client.peer.module_id.endswith("srv")
    with trio.fail_after(TIMEOUT_S):
        await client.send_all(b"hello enclave")
        assert await server.receive_some() == b"hello enclave"
        await server.send_all(b"hello client")
        assert await client.receive_some() == b"hello client"
        await client.aclose()
        await server.aclose()


async def test_trio_a_client_without_an_nsm_cannot_pass() -> None:
    from transport.errors import ChannelClosed

    authority = TestAuthority()
    client, server = await _run_pair(
        client_attester=None, peer_verifier=authority.verifier(), authority=authority
    )
    assert isinstance(client, AuthenticationFailed)
    assert "no attester" in client.reason
    assert isinstance(server, ChannelClosed)  # the client hung up: nothing was accepted


async def test_trio_a_refused_client_learns_it_at_connect() -> None:
    authority = TestAuthority()
    client, server = await _run_pair(
        client_attester=authority.attester(pcrs={0: hashlib.sha384(b"other").digest()}),
        peer_verifier=authority.verifier(),
        authority=authority,
    )
    assert isinstance(server, AuthenticationFailed)
    assert "PCR0" in server.reason
    assert isinstance(client, AuthenticationFailed)
    assert "instead of accepting" in client.reason
    assert str(client) == OPAQUE


async def test_trio_a_client_with_an_nsm_talks_to_a_one_sided_enclave() -> None:
    authority = TestAuthority()
    client, server = await _run_pair(
        client_attester=authority.attester(), peer_verifier=None, authority=authority
    )
    assert client.peer is not None
    assert server.peer is None
    await client.aclose()
    await server.aclose()


async def test_real_nitro_documents_both_ways(tmp_path: Any) -> None:
    """The same handshake with Nitro-format documents (emulated NSM, local CA) and attest's
    verifier: the client document's 48-byte nonce and 32-byte role label fit the NSM, and the
    caller policy (PCR0, debug rule) is enforced by the real verifier."""
    import trio
    import trio.testing

    from attest.ca import LocalCA
    from attest.channel import channel_verifier, nsm_attester
    from attest.nsm.local import InProcessNsm
    from attest.policy import MeasurementSet, Policy
    from attest.verify import Verifier
    from transport.channel import accept_channel, connect_channel

    ca = LocalCA.load_or_create(tmp_path / "ca")
    image = {i: hashlib.sha384(b"image" + bytes([i])).digest() for i in (0, 1, 2)}
    same_image = Policy([MeasurementSet({0: image[0]})])
    verifier = Verifier([ca.root_certificate])

    async def attempt(client_nsm: InProcessNsm) -> tuple[Any, Any]:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        server_nsm = InProcessNsm.create(ca, pcrs=image, module_id="i-0000000000000000a-encs")
        out: dict[str, Any] = {}

        async def server() -> None:
            try:
                out["server"] = await accept_channel(
                    server_stream,
                    attester=nsm_attester(server_nsm),
                    peer_verifier=channel_verifier(verifier, same_image),
                )
            except AuthenticationFailed as exc:
                out["server"] = exc

        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server)
                try:
                    out["client"] = await connect_channel(
                        client_stream,
                        verifier=channel_verifier(verifier, same_image),
                        attester=nsm_attester(client_nsm),
                    )
                except AuthenticationFailed as exc:
                    out["client"] = exc
        return out["client"], out["server"]

    good = InProcessNsm.create(ca, pcrs=image, module_id="i-0000000000000000a-encc")
    client, server = await attempt(good)
    assert server.peer.module_id == "i-0000000000000000a-encc"
    assert server.peer.pcr0 == image[0]
    await client.aclose()
    await server.aclose()
    other = {**image, 0: hashlib.sha384(b"other").digest()}
    _, refused = await attempt(InProcessNsm.create(ca, pcrs=other))
    assert isinstance(refused, AuthenticationFailed)
    _, refused = await attempt(InProcessNsm.create(ca, pcrs=image, debug=True))
    assert isinstance(refused, AuthenticationFailed)
    assert "debug" in refused.reason
