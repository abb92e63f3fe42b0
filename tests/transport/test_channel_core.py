"""Pure tests of the enclave-channel/1 core: no event loop, no I/O (STYLE B11 step 1)."""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.transport.channel_helpers import ChannelPair, drain, make_channel_pair
from transport.channel import (
    MAX_DOCUMENT_SIZE,
    MAX_RECORD_PLAINTEXT,
    NEED_DATA,
    USER_DATA_PREFIX,
    Attestation,
    AttestationRequest,
    ChannelEstablished,
    ClientConnection,
    Close,
    Data,
    Hello,
    ServerConnection,
    State,
    Suite,
)
from transport.channel._record import HEADER
from transport.channel.testing import TestAuthority, default_pcrs
from transport.errors import AuthenticationFailed, LocalProtocolError

SUITES = [Suite.X25519, Suite.MLKEM768_X25519]
OPAQUE = "authentication failed"


def _next_or_eof(conn: Any, eof: bool) -> Any:
    event = conn.next_event()
    if event is NEED_DATA and eof:
        conn.receive_data(b"")
        event = conn.next_event()
    return event


def rejects(conn: Any, *, eof: bool = False) -> AuthenticationFailed:
    """The very next ``next_event`` raises the one opaque error: no event comes first.

    With ``eof``, an incomplete frame may first ask for data; the transport then ends.
    """
    with pytest.raises(AuthenticationFailed) as info:
        _next_or_eof(conn, eof)
    assert str(info.value) == OPAQUE
    assert conn.state is State.ERROR
    return info.value


# ---------------------------------------------------------------------------- handshake


@pytest.mark.parametrize("suite", SUITES)
def test_handshake_establishes_suite_and_peer(suite: Suite) -> None:
    pair = ChannelPair(client_suites=[suite])
    client_done, server_done = pair.handshake()
    assert client_done.suite is server_done.suite is suite
    assert server_done.peer is None
    peer = client_done.peer
    assert peer is not None
    assert peer.pcrs[0] == default_pcrs()[0]
    # The document binds the hello, the key and the suite exactly as PROTOCOL.md §3 says.
    assert peer.nonce == hashlib.sha384(pair.wire["hello"]).digest()
    assert peer.user_data == USER_DATA_PREFIX + bytes([suite.value])
    assert len(peer.public_key or b"") == (32 if suite is Suite.X25519 else 48)
    assert pair.client.state is pair.server.state is State.OPEN


def test_server_prefers_hybrid_when_offered() -> None:
    pair = ChannelPair(client_suites=[Suite.X25519, Suite.MLKEM768_X25519])
    client_done, _ = pair.handshake()
    assert client_done.suite is Suite.MLKEM768_X25519
    assert len(pair.wire["key"]) == 5 + 1120 + 32 + 16


def test_no_common_suite_is_rejected() -> None:
    pair = ChannelPair(client_suites=[Suite.X25519], server_suites=[Suite.MLKEM768_X25519])
    pair.server.receive_data(pair.client.send(Hello()))
    rejects(pair.server)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("client_sends", [True, False])
def test_round_trip(suite: Suite, client_sends: bool) -> None:
    pair = make_channel_pair(client_suites=[suite])
    sender, receiver = pair.ends(client_sends)
    messages = [b"x", bytes(range(256)) * 4, b"\x00" * MAX_RECORD_PLAINTEXT, b"y" * 200_000]
    for message in messages:
        receiver.receive_data(sender.send(Data(message)))
        got = drain(receiver)
        assert all(isinstance(e, Data) for e in got)
        assert b"".join(e.data for e in got if isinstance(e, Data)) == message
        assert all(len(e.data) <= MAX_RECORD_PLAINTEXT for e in got if isinstance(e, Data))
    receiver.receive_data(sender.send(Close()))
    assert drain(receiver) == [Close()]
    assert receiver.next_event() == Close()  # idempotent, like h11's ConnectionClosed
    # Half-close: the other direction still works, then closes too.
    sender.receive_data(receiver.send(Data(b"reply")))
    assert drain(sender) == [Data(b"reply")]
    sender.receive_data(receiver.send(Close()))
    assert drain(sender) == [Close()]
    assert sender.state is receiver.state is State.CLOSED


def test_read_into_decrypts_every_complete_record() -> None:
    pair = make_channel_pair()
    wire = pair.client.send(Data(b"a" * 70_000)) + pair.client.send(Data(b"b" * 10))
    pair.server.receive_data(wire[:-3])  # last record incomplete
    out = memoryview(bytearray(4 * MAX_RECORD_PLAINTEXT))
    assert pair.server.read_into(out) == 70_000
    assert bytes(out[:70_000]) == b"a" * 70_000
    assert pair.server.read_into(out) == 0
    pair.server.receive_data(wire[-3:] + pair.client.send(Close()))
    assert pair.server.read_into(out) == 10
    assert pair.server.their_closed
    assert pair.server.read_into(out) == 0


def test_empty_data_sends_nothing() -> None:
    pair = make_channel_pair()
    assert pair.client.send(Data(b"")) == b""


# ---------------------------------------------------------------------------- re-chunking


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def _feed(conn: Any, data: bytes, cuts: list[int]) -> list[Any]:
    events: list[Any] = []
    for chunk in _chunks(data, cuts):
        conn.receive_data(chunk)
        events += drain(conn)
    return events


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=5),
    cuts_hs=st.lists(st.integers(min_value=0), max_size=12),
    cuts_data=st.lists(st.integers(min_value=0), max_size=24),
    client_sends=st.booleans(),
)
def test_rechunking_gives_the_same_events(
    messages: list[bytes], cuts_hs: list[int], cuts_data: list[int], client_sends: bool
) -> None:
    pair = ChannelPair()
    # Hello, split anywhere, gives exactly one AttestationRequest.
    events = _feed(pair.server, pair.client.send(Hello()), cuts_hs)
    assert len(events) == 1
    assert isinstance(events[0], AttestationRequest)
    from tests.transport.channel_helpers import sign_request

    att = pair.server.send(Attestation(sign_request(pair.attester, events[0])))
    events = _feed(pair.client, att, cuts_hs)
    assert len(events) == 1
    assert isinstance(events[0], ChannelEstablished)
    key = pair.client.data_to_send()
    sender, receiver = pair.ends(client_sends)
    if not client_sends:
        pair.server.receive_data(key)
        assert isinstance(pair.server.next_event(), ChannelEstablished)
    wire = b"".join(sender.send(Data(m)) for m in messages) + sender.send(Close())
    if client_sends:  # the key message and the first records may arrive in one read
        wire = key + wire
    events = _feed(receiver, wire, cuts_data)
    if client_sends:
        assert isinstance(events.pop(0), ChannelEstablished)
    assert events == [*(Data(m) for m in messages), Close()]


# ---------------------------------------------------------------------------- tampering


@settings(max_examples=80, deadline=None)
@given(bit=st.integers(min_value=0), client_sends=st.booleans())
def test_any_flipped_bit_in_a_record_is_rejected(bit: int, client_sends: bool) -> None:
    pair = make_channel_pair()
    sender, receiver = pair.ends(client_sends)
    record = bytearray(sender.send(Data(b"attack at dawn" * 10)))
    bit %= len(record) * 8
    record[bit // 8] ^= 1 << (bit % 8)
    receiver.receive_data(bytes(record))
    rejects(receiver, eof=True)


@pytest.mark.parametrize("frame", ["hello", "attestation", "key"])
@settings(max_examples=25, deadline=None)
@given(bit=st.integers(min_value=0))
def test_any_flipped_bit_in_the_handshake_is_rejected(frame: str, bit: int) -> None:
    pair = ChannelPair()

    def flip(name: str, data: bytes) -> bytes:
        if name != frame:
            return data
        out = bytearray(data)
        pos = bit % (len(out) * 8)
        out[pos // 8] ^= 1 << (pos % 8)
        return bytes(out)

    def handshake_then_record() -> None:
        pair.handshake(tamper=flip)
        # Anything that got this far must fail at the first record.
        pair.server.receive_data(pair.client.send(Data(b"x")))
        pair.server.next_event()

    # Whoever sees the damage first rejects; nobody completes with a tampered transcript.
    with pytest.raises(AuthenticationFailed, match=f"^{OPAQUE}$"):
        handshake_then_record()


def test_truncation_without_close_is_rejected() -> None:
    pair = make_channel_pair()
    pair.server.receive_data(pair.client.send(Data(b"complete")))
    assert drain(pair.server) == [Data(b"complete")]
    pair.server.receive_data(b"")  # transport EOF, no close record
    rejects(pair.server)


def test_truncation_inside_a_record_is_rejected() -> None:
    pair = make_channel_pair()
    pair.server.receive_data(pair.client.send(Data(b"complete"))[:-1])
    assert pair.server.next_event() is NEED_DATA
    pair.server.receive_data(b"")
    rejects(pair.server)


def test_reordered_records_are_rejected() -> None:
    pair = make_channel_pair()
    first, second = pair.client.send(Data(b"one")), pair.client.send(Data(b"two"))
    pair.server.receive_data(second + first)
    rejects(pair.server)


def test_replayed_record_is_rejected() -> None:
    pair = make_channel_pair()
    record = pair.client.send(Data(b"pay 100"))
    pair.server.receive_data(record + record)
    assert pair.server.next_event() == Data(b"pay 100")
    rejects(pair.server)


@pytest.mark.parametrize("client_sends", [True, False])
def test_record_reflected_back_is_rejected(client_sends: bool) -> None:
    pair = make_channel_pair()
    sender, _ = pair.ends(client_sends)
    sender.receive_data(sender.send(Data(b"echo me")))
    rejects(sender)


def test_record_from_another_channel_is_rejected() -> None:
    one, two = make_channel_pair(), make_channel_pair()
    two.server.receive_data(one.client.send(Data(b"x")))
    rejects(two.server)


def test_data_after_close_is_rejected() -> None:
    pair = make_channel_pair()
    close = pair.client.send(Close())
    pair.server.receive_data(close + b"\x17\x00\x00\x00\x11" + bytes(17))
    assert drain(pair.server) == [Close()]
    rejects(pair.server)


def _forging(**changes: Any) -> Any:
    def forge(payload: dict[str, Any]) -> None:
        payload.update(changes)

    return forge


@pytest.mark.parametrize("suite", SUITES)
def test_document_for_another_nonce_is_rejected(suite: Suite) -> None:
    pair = ChannelPair(client_suites=[suite])
    with pytest.raises(AuthenticationFailed, match=f"^{OPAQUE}$"):
        pair.handshake(forge=_forging(nonce=hashlib.sha384(b"another hello").digest()))
    assert pair.client.state is State.ERROR
    assert pair.client.data_to_send() == b""  # nothing secret was produced


@pytest.mark.parametrize("suite", SUITES)
def test_document_binding_another_public_key_is_rejected(suite: Suite) -> None:
    other = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    binding = other if suite is Suite.X25519 else hashlib.sha384(other).digest()
    pair = ChannelPair(client_suites=[suite])
    with pytest.raises(AuthenticationFailed, match=f"^{OPAQUE}$"):
        pair.handshake(forge=_forging(public_key=binding))
    assert pair.client.data_to_send() == b""


@pytest.mark.parametrize("suite", SUITES)
def test_substituted_key_beside_a_genuine_document_is_rejected(suite: Suite) -> None:
    """A man in the middle swaps the key in the attestation message for his own."""

    def swap_key(name: str, frame: bytes) -> bytes:
        if name != "attestation":
            return frame
        key_len = int.from_bytes(frame[6:8], "big")
        mine = bytes(key_len - 1) + b"\x09"
        return frame[:8] + mine + frame[8 + key_len :]

    pair = ChannelPair(client_suites=[suite])
    with pytest.raises(AuthenticationFailed, match=f"^{OPAQUE}$"):
        pair.handshake(tamper=swap_key)


def test_suite_binding_in_user_data_is_checked() -> None:
    pair = ChannelPair(client_suites=[Suite.X25519])
    with pytest.raises(AuthenticationFailed):
        pair.handshake(forge=_forging(user_data=USER_DATA_PREFIX + b"\x02"))


def test_downgrade_by_stripping_suites_from_hello_is_rejected() -> None:
    def strip(name: str, frame: bytes) -> bytes:
        if name != "hello":
            return frame
        body = frame[5:]
        new = body[:34] + b"\x01\x01"  # only X25519
        return HEADER.pack(1, len(new)) + new

    pair = ChannelPair(client_suites=[Suite.MLKEM768_X25519, Suite.X25519])
    with pytest.raises(AuthenticationFailed):
        pair.handshake(tamper=strip)


def test_wrong_measurement_is_rejected() -> None:
    authority = TestAuthority()
    verifier = authority.verifier(expected_pcrs={0: hashlib.sha384(b"another image").digest()})
    pair = ChannelPair(authority=authority, verifier=verifier)
    with pytest.raises(AuthenticationFailed, match=f"^{OPAQUE}$"):
        pair.handshake()


@pytest.mark.parametrize("allow_debug", [False, True])
def test_debug_enclave_is_rejected(allow_debug: bool) -> None:
    """Debug documents are refused; even where allowed, their zeroed PCRs don't match."""
    authority = TestAuthority()
    pair = ChannelPair(
        authority=authority,
        attester=authority.attester(debug=True),
        verifier=authority.verifier(allow_debug=allow_debug),
    )
    with pytest.raises(AuthenticationFailed):
        pair.handshake()


def test_document_signed_by_another_authority_is_rejected() -> None:
    pair = ChannelPair(attester=TestAuthority().attester())
    with pytest.raises(AuthenticationFailed):
        pair.handshake()


def test_oversized_lengths_are_rejected_from_the_header_alone() -> None:
    # A client must not wait for (or buffer) a 4 GiB attestation.
    client = ClientConnection(verifier=TestAuthority().verifier())
    client.send(Hello())
    client.receive_data(HEADER.pack(2, 0xFFFF_FFFF))
    rejects(client)
    pair = make_channel_pair()
    pair.server.receive_data(HEADER.pack(0x17, MAX_RECORD_PLAINTEXT + 17))
    rejects(pair.server)


@pytest.mark.parametrize(
    "hello",
    [
        HEADER.pack(1, 36) + b"\x00\x02" + bytes(32) + b"\x01\x01",  # version 2
        HEADER.pack(1, 35) + b"\x00\x01" + bytes(32) + b"\x00",  # no suites
        HEADER.pack(1, 37) + b"\x00\x01" + bytes(32) + b"\x01\x01\x02",  # count mismatch
        HEADER.pack(1, 36) + b"\x00\x01" + bytes(32) + b"\x01\x7f",  # unknown suite only
        HEADER.pack(2, 36) + b"\x00\x01" + bytes(32) + b"\x01\x01",  # wrong frame type
        HEADER.pack(1, 1000) + bytes(1000),  # oversized
    ],
)
def test_malformed_hello_is_rejected(hello: bytes) -> None:
    server = ServerConnection()
    server.receive_data(hello)
    rejects(server)


def test_failure_is_sticky() -> None:
    pair = make_channel_pair()
    pair.server.receive_data(b"\x99" * 5)
    rejects(pair.server)
    with pytest.raises(AuthenticationFailed):
        pair.server.next_event()
    with pytest.raises(LocalProtocolError):
        pair.server.send(Data(b"after failure"))


# ---------------------------------------------------------------------------- record limits


def test_record_limit_refuses_to_send_but_keeps_close() -> None:
    pair = make_channel_pair(max_records=4)
    wire = b"".join(pair.client.send(Data(bytes([i]))) for i in range(3))
    with pytest.raises(LocalProtocolError):
        pair.client.send(Data(b"one too many"))
    wire += pair.client.send(Close())  # the reserved last slot
    pair.server.receive_data(wire)
    assert drain(pair.server) == [Data(b"\x00"), Data(b"\x01"), Data(b"\x02"), Close()]


def test_record_limit_counts_split_records() -> None:
    pair = make_channel_pair(max_records=3)
    with pytest.raises(LocalProtocolError):
        pair.client.send(Data(bytes(2 * MAX_RECORD_PLAINTEXT + 1)))  # needs 3 data records
    assert pair.client.records_sent == 0  # nothing sealed: no counter consumed


def test_receiver_rejects_records_past_its_limit() -> None:
    authority = TestAuthority()
    client = ClientConnection(verifier=authority.verifier())  # default (large) limit
    server = ServerConnection(max_records=2)
    server.receive_data(client.send(Hello()))
    request = server.next_event()
    assert isinstance(request, AttestationRequest)
    from tests.transport.channel_helpers import sign_request

    client.receive_data(server.send(Attestation(sign_request(authority.attester(), request))))
    assert isinstance(client.next_event(), ChannelEstablished)
    server.receive_data(client.data_to_send())
    assert isinstance(server.next_event(), ChannelEstablished)
    server.receive_data(client.send(Data(b"1")) + client.send(Data(b"2")) + client.send(Data(b"3")))
    assert server.next_event() == Data(b"1")
    assert server.next_event() == Data(b"2")
    rejects(server)


# ---------------------------------------------------------------------------- misuse


def test_send_after_close_is_local_error() -> None:
    pair = make_channel_pair()
    pair.client.send(Close())
    with pytest.raises(LocalProtocolError):
        pair.client.send(Data(b"late"))
    with pytest.raises(LocalProtocolError):
        pair.client.send(Close())


def test_out_of_order_api_use_is_local_error() -> None:
    authority = TestAuthority()
    client = ClientConnection(verifier=authority.verifier())
    with pytest.raises(LocalProtocolError):
        client.send(Data(b"too early"))
    with pytest.raises(LocalProtocolError):
        client.next_event()  # must send the hello first
    with pytest.raises(LocalProtocolError):
        client.send(Attestation(b"servers only"))
    client.send(Hello())
    with pytest.raises(LocalProtocolError):
        client.send(Hello())
    server = ServerConnection()
    with pytest.raises(LocalProtocolError):
        server.send(Hello())
    with pytest.raises(LocalProtocolError):
        server.send(Attestation(b"before any hello"))
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"after eof")


def test_oversized_document_is_local_error() -> None:
    pair = ChannelPair()
    pair.server.receive_data(pair.client.send(Hello()))
    assert isinstance(pair.server.next_event(), AttestationRequest)
    with pytest.raises(LocalProtocolError):
        pair.server.send(Attestation(bytes(MAX_DOCUMENT_SIZE + 1)))


@pytest.mark.parametrize(
    "kwargs", [{"suites": []}, {"suites": [Suite.X25519, Suite.X25519]}, {"max_records": 1}]
)
def test_bad_constructor_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerConnection(**kwargs)


# ---------------------------------------------------------------------------- state table


def _pair_in(state: State) -> ChannelPair:
    pair = make_channel_pair()
    if state in (State.SEND_CLOSED, State.CLOSED):
        pair.server.receive_data(pair.client.send(Close()))
        assert drain(pair.server) == [Close()]
    if state in (State.RECV_CLOSED, State.CLOSED):
        pair.client.receive_data(pair.server.send(Close()))
        assert drain(pair.client) == [Close()]
    assert pair.client.state is state
    return pair


@pytest.mark.parametrize(
    ("state", "event", "allowed", "after"),
    [
        (State.OPEN, Data(b"d"), True, State.OPEN),
        (State.OPEN, Close(), True, State.SEND_CLOSED),
        (State.SEND_CLOSED, Data(b"d"), False, State.SEND_CLOSED),
        (State.SEND_CLOSED, Close(), False, State.SEND_CLOSED),
        (State.RECV_CLOSED, Data(b"d"), True, State.RECV_CLOSED),
        (State.RECV_CLOSED, Close(), True, State.CLOSED),
        (State.CLOSED, Data(b"d"), False, State.CLOSED),
        (State.CLOSED, Close(), False, State.CLOSED),
        (State.OPEN, Hello(), False, State.OPEN),
        (State.OPEN, Attestation(b"doc"), False, State.OPEN),
    ],
)
def test_send_follows_the_state_table(
    state: State, event: Any, allowed: bool, after: State
) -> None:
    pair = _pair_in(state)
    if allowed:
        wire = pair.client.send(event)
        pair.server.receive_data(wire)
        assert drain(pair.server) == [event]
    else:
        with pytest.raises(LocalProtocolError):
            pair.client.send(event)
    assert pair.client.state is after


def test_a_verifier_bug_fails_closed() -> None:
    def broken_verifier(document: bytes, *, nonce: bytes) -> Any:
        raise KeyError("bug in the verifier")

    pair = ChannelPair(verifier=broken_verifier)  # type: ignore[arg-type]
    with pytest.raises(AuthenticationFailed, match=f"^{OPAQUE}$"):
        pair.handshake()
    assert pair.client.data_to_send() == b""


@pytest.mark.parametrize("who", ["server_hello", "client_attestation", "server_key", "open"])
@settings(max_examples=60, deadline=None)
@given(garbage=st.binary(max_size=300), header=st.booleans())
def test_garbage_is_rejected_cleanly(who: str, garbage: bytes, header: bool) -> None:
    """Arbitrary peer bytes in any receiving state: NEED_DATA or the one opaque error."""
    pair = ChannelPair()
    if who == "server_hello":
        conn: Any = pair.server
        ftype = 1
    elif who == "client_attestation":
        conn = pair.client
        conn.send(Hello())
        ftype = 2
    elif who == "server_key":
        conn = pair.server
        conn.receive_data(pair.client.send(Hello()))
        request = conn.next_event()
        from tests.transport.channel_helpers import sign_request

        conn.send(Attestation(sign_request(pair.attester, request)))
        ftype = 3
    else:
        pair.handshake()
        conn = pair.server
        ftype = 0x17
    if header:  # a plausible header so the body parsers see the garbage
        garbage = HEADER.pack(ftype, len(garbage)) + garbage
    if garbage:
        conn.receive_data(garbage)
    conn.receive_data(b"")
    failure = _first_failure(conn)  # any other exception type fails the test
    if who == "open":  # nothing forges a record: garbage or EOF, always rejected
        assert failure is not None
    if failure is not None:
        assert str(failure) == OPAQUE


def _first_failure(conn: Any) -> AuthenticationFailed | None:
    for _ in range(10):
        try:
            event = conn.next_event()
        except AuthenticationFailed as exc:
            return exc
        if event is NEED_DATA:
            return None
    return None


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=300_000), min_size=1, max_size=8))
def test_recv_into_path_with_a_growing_buffer(sizes: list[int]) -> None:
    """``receive_buffer``/``commit_received`` (the socket path) deliver what was sent, whatever
    the read sizes, while the buffer grows from its small start."""
    pair = make_channel_pair()
    message = bytes(range(256)) * 800  # 204,800 bytes: four records
    wire = memoryview(pair.client.send(Data(message)) + pair.client.send(Close()))
    got: deque[bytes | memoryview] = deque()
    closed = False
    i = 0
    while not closed:
        buf = pair.server.receive_buffer()
        n = min(len(buf), sizes[i % len(sizes)], len(wire))
        buf[:n] = wire[:n]
        buf.release()
        wire = wire[n:]
        pair.server.commit_received(n)
        closed = pair.server.read_records(got)
        i += 1
    assert b"".join(got) == message
    assert not wire
