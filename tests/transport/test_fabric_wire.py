"""Pure tests of the broker protocol codec (no event loop)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.errors import LocalProtocolError, RemoteProtocolError
from transport.fabric import wire
from transport.fabric.addressing import VsockAddr

u32 = st.integers(min_value=0, max_value=0xFFFF_FFFF)
request_ids = st.integers(min_value=1, max_value=0xFFFF_FFFF)
addrs = st.builds(VsockAddr, u32, u32)

requests = st.one_of(
    st.builds(wire.Connect, request_ids, addrs),
    st.builds(wire.Listen, request_ids, u32),
    st.builds(wire.Unlisten, request_ids, u32),
)
replies = st.one_of(
    st.builds(wire.Connected, request_ids, u32),
    st.builds(wire.Listening, request_ids, u32),
    st.builds(wire.Refused, request_ids, st.integers(min_value=1, max_value=wire.MAX_ERRNO)),
    st.builds(wire.Incoming, u32, addrs),
)


@settings(max_examples=200)
@given(requests)
def test_request_round_trip(message: wire.Request) -> None:
    data = wire.encode(message)
    assert len(data) <= wire.MAX_MESSAGE_SIZE
    assert wire.decode_request(data) == message


@settings(max_examples=200)
@given(replies)
def test_reply_round_trip(message: wire.Reply) -> None:
    data = wire.encode(message)
    assert len(data) <= wire.MAX_MESSAGE_SIZE
    assert wire.decode_reply(data, fd_count=wire.fds_carried(message)) == message


@settings(max_examples=200)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=3))
def test_any_bytes_give_a_message_or_a_typed_error(data: bytes, fds: int) -> None:
    for decode in (wire.decode_request, wire.decode_reply):
        try:
            message = decode(data, fd_count=fds)
        except RemoteProtocolError:
            continue
        # Whatever decodes re-encodes to exactly the same bytes (one canonical form).
        assert wire.encode(message) == data
        assert wire.fds_carried(message) == fds


@settings(max_examples=200)
@given(requests, st.data())
def test_any_single_byte_change_is_rejected_or_canonical(
    message: wire.Request, data: st.DataObject
) -> None:
    raw = bytearray(wire.encode(message))
    i = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    raw[i] ^= data.draw(st.integers(min_value=1, max_value=255))
    try:
        decoded = wire.decode_request(bytes(raw))
    except RemoteProtocolError:
        return
    assert wire.encode(decoded) == bytes(raw)


def _header(
    kind: int, request_id: int = 1, *, version: int = wire.VERSION, reserved: int = 0
) -> bytes:
    return struct.pack("!BBHI", version, kind, reserved, request_id)


@pytest.mark.parametrize(
    ("data", "fds", "reason"),
    [
        (b"", 0, "too short"),
        (_header(wire.Kind.LISTEN)[:7], 0, "too short"),
        (_header(wire.Kind.LISTEN) + b"\0" * 40, 0, "too long"),
        (_header(wire.Kind.LISTEN, version=2) + b"\0" * 4, 0, "version"),
        (_header(0x7F) + b"\0" * 4, 0, "kind"),
        (_header(wire.Kind.CONNECTED) + b"\0" * 4, 1, "kind"),  # a reply is not a request
        (_header(wire.Kind.LISTEN, reserved=1) + b"\0" * 4, 0, "reserved"),
        (_header(wire.Kind.LISTEN) + b"\0" * 3, 0, "body"),
        (_header(wire.Kind.CONNECT) + b"\0" * 4, 0, "body"),
        (_header(wire.Kind.LISTEN, 0) + b"\0" * 4, 0, "request id 0"),
        (_header(wire.Kind.LISTEN) + b"\0" * 4, 1, "fds"),
    ],
)
def test_bad_requests(data: bytes, fds: int, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        wire.decode_request(data, fd_count=fds)


@pytest.mark.parametrize(
    ("data", "fds", "reason"),
    [
        (_header(wire.Kind.CONNECTED) + b"\0" * 4, 0, "fds"),  # Connected needs its socket
        (_header(wire.Kind.CONNECTED) + b"\0" * 4, 2, "fds"),
        (_header(wire.Kind.LISTENING) + b"\0" * 4, 1, "fds"),
        (_header(wire.Kind.INCOMING, 0) + b"\0" * 12, 0, "fds"),
        (_header(wire.Kind.INCOMING, 5) + b"\0" * 12, 1, "request id 0"),
        (_header(wire.Kind.REFUSED) + struct.pack("!I", 0), 0, "errno"),
        (_header(wire.Kind.REFUSED) + struct.pack("!I", 70000), 0, "errno"),
        (_header(wire.Kind.CONNECT) + b"\0" * 8, 0, "kind"),  # a request is not a reply
    ],
)
def test_bad_replies(data: bytes, fds: int, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        wire.decode_reply(data, fd_count=fds)


def test_known_encoding() -> None:
    """The wire layout is fixed: version 1, kind, 2 reserved bytes, request id, body."""
    assert wire.encode(wire.Connect(7, VsockAddr(3, 8000))) == bytes.fromhex(
        "01010000000000070000000300001f40"
    )
    assert wire.encode(wire.Incoming(5005, VsockAddr(3, 0xFFFFFFFF))) == bytes.fromhex(
        "01840000000000000000138d00000003ffffffff"
    )


@pytest.mark.parametrize(
    "message",
    [
        wire.Listen(0, 1),
        wire.Listen(1, -1),
        wire.Listen(1, 1 << 32),
        wire.Connected(1 << 32, 1),
        wire.Refused(1, 0),
        wire.Refused(1, wire.MAX_ERRNO + 1),
        wire.Incoming(-1, VsockAddr(3, 1)),
    ],
)
def test_encode_rejects_out_of_range_fields(message: wire.Message) -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode(message)
