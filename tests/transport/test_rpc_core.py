"""Pure tests of the sans-IO RPC core (no event loop): round trips, credit, per-state semantics,
limits, and Hypothesis properties (re-chunking, arbitrary bytes, state x frame).

``ConnectionPair`` and ``frame`` are imported by the adapter tests as well.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport.errors import LocalProtocolError, RemoteProtocolError
from transport.rpc import (
    HEADER,
    INITIAL_WINDOW_BYTES,
    INITIAL_WINDOW_MESSAGES,
    MAX_CONTROL_PAYLOAD,
    MAX_METADATA_ENTRIES,
    NEED_DATA,
    ConnectionEnded,
    Event,
    FrameType,
    GoAwayReceived,
    MessageReceived,
    PongReceived,
    Role,
    RpcConnection,
    RpcError,
    StreamCancelled,
    StreamEnded,
    StreamErrored,
    StreamInput,
    StreamOpened,
    StreamState,
    WindowUpdated,
)
from transport.rpc._core import _TRANSITIONS


def receive(conn: RpcConnection, data: bytes) -> list[Event]:
    """Feed ``data`` and take every event it completes (h11's loop, as the adapters run it)."""
    conn.receive_data(data)
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        events.append(event)
    return events


def frame(ftype: int, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """Raw frame bytes, bypassing every check of the sending side (h2's FrameFactory)."""
    return HEADER.pack(len(payload), int(ftype), flags, stream_id) + payload


def window(messages: int, nbytes: int) -> bytes:
    return struct.pack("!II", messages, nbytes)


class ConnectionPair:
    """A client and a server core wired back to back (h11's ConnectionPair)."""

    def __init__(self, **kwargs: Any) -> None:
        self.client = RpcConnection(Role.CLIENT, **kwargs)
        self.server = RpcConnection(Role.SERVER, **kwargs)

    def peer(self, conn: RpcConnection) -> RpcConnection:
        return self.server if conn is self.client else self.client

    def deliver(self, sender: RpcConnection, data: bytes) -> list[Event]:
        """Feed ``data`` (from ``sender``) to the other side, then return its events."""
        return receive(self.peer(sender), data)

    def flush(self, sender: RpcConnection) -> list[Event]:
        """Deliver whatever ``sender`` owes its peer (PONGs, refusals, grants)."""
        data = sender.data_to_send()
        return receive(self.peer(sender), data) if data else []

    def open(self, method: str = "m", metadata: dict[str, Any] | None = None) -> int:
        stream_id, data = self.client.send_open(method, metadata)
        events = self.deliver(self.client, data)
        assert events == [StreamOpened(stream_id, method, metadata or {})]
        return stream_id


# ---------------------------------------------------------------------------- round trips

VALUES = [
    None,
    True,
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    "héllo",
    b"\x00\xff" * 100,
    [1, [2, [3]]],
    {"a": {"b": [b"c", None]}},
    {"id": 7, "x": b"\x01" * 3136, "shape": [1, 784], "dtype": "float32"},
]


def test_unary_round_trip() -> None:
    pair = ConnectionPair()
    sid, data = pair.client.send_open("echo", {"model": "digits", "n": 3})
    data += pair.client.send_message(sid, {"x": 1}, end=True)
    events = pair.deliver(pair.client, data)
    assert events == [
        StreamOpened(sid, "echo", {"model": "digits", "n": 3}),
        MessageReceived(sid, {"x": 1}, len(msgpack.packb({"x": 1})), end=True),
    ]
    assert pair.server.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE
    reply = pair.server.send_message(sid, {"y": 2}, end=True)
    assert pair.server.stream_state(sid) is StreamState.CLOSED
    assert pair.deliver(pair.server, reply) == [
        MessageReceived(sid, {"y": 2}, len(msgpack.packb({"y": 2})), end=True)
    ]
    assert pair.client.stream_state(sid) is StreamState.CLOSED
    assert pair.client.open_streams == pair.server.open_streams == 0


@pytest.mark.parametrize("client_sends", [True, False])
def test_messages_both_directions(client_sends: bool) -> None:
    pair = ConnectionPair()
    sid = pair.open()
    sender = pair.client if client_sends else pair.server
    received = []
    for value in VALUES:
        for ev in pair.deliver(sender, sender.send_message(sid, value)):
            assert isinstance(ev, MessageReceived)
            received.append(ev.message)
            pair.peer(sender).message_consumed(sid, ev.size)
        pair.flush(pair.peer(sender))
    assert received == VALUES
    assert pair.deliver(sender, sender.send_end(sid)) == [StreamEnded(sid)]


def test_tuples_encode_as_lists_and_bad_values_are_type_errors() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    (ev,) = pair.deliver(pair.client, pair.client.send_message(sid, (1, 2)))
    assert isinstance(ev, MessageReceived)
    assert ev.message == [1, 2]
    with pytest.raises(TypeError):
        pair.client.send_message(sid, object())
    with pytest.raises(TypeError):
        pair.client.send_message(sid, 2**70)
    # Nothing was committed by the failed sends: the stream is still fully usable.
    assert pair.client.stream_state(sid) is StreamState.OPEN


def test_many_interleaved_streams() -> None:
    pair = ConnectionPair(max_streams=64)
    ids = [pair.open(f"m{i}") for i in range(50)]
    assert ids == list(range(1, 100, 2))
    data = b"".join(
        pair.client.send_message(sid, [sid, n], end=(n == 2)) for n in range(3) for sid in ids
    )
    got: dict[int, list[Any]] = {}
    for ev in pair.deliver(pair.client, data):
        assert isinstance(ev, MessageReceived)
        got.setdefault(ev.stream_id, []).append(ev.message)
    assert got == {sid: [[sid, 0], [sid, 1], [sid, 2]] for sid in ids}
    assert all(pair.server.stream_state(s) is StreamState.HALF_CLOSED_REMOTE for s in ids)
    replies = b"".join(pair.server.send_end(sid) for sid in reversed(ids))
    assert pair.deliver(pair.server, replies) == [StreamEnded(s) for s in reversed(ids)]
    assert pair.client.open_streams == 0


# ---------------------------------------------------------------------------- flow control


def test_message_credit_exhaustion_and_grant() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    sizes = []
    for i in range(INITIAL_WINDOW_MESSAGES):
        assert pair.client.has_send_credit(sid)
        (ev,) = pair.deliver(pair.client, pair.client.send_message(sid, i))
        assert isinstance(ev, MessageReceived)
        sizes.append(ev.size)
    assert not pair.client.has_send_credit(sid)
    with pytest.raises(LocalProtocolError, match="no send credit"):
        pair.client.send_message(sid, "one too many")
    # Consuming up to half the window grants nothing yet; the next one grants the deficit.
    half = INITIAL_WINDOW_MESSAGES // 2
    for size in sizes[: half - 1]:
        assert pair.server.message_consumed(sid, size) == b""
    grant = pair.server.message_consumed(sid, sizes[half - 1])
    (ev,) = pair.deliver(pair.server, grant)
    assert isinstance(ev, WindowUpdated)
    assert ev.messages == half
    assert pair.client.has_send_credit(sid)
    credit = pair.client.stream_credit(sid)
    assert credit is not None
    assert credit.send_messages == half


def test_byte_credit_allows_one_oversized_message_then_blocks() -> None:
    pair = ConnectionPair(max_message_size=4 * INITIAL_WINDOW_BYTES)
    sid = pair.open()
    big = b"x" * (INITIAL_WINDOW_BYTES + 1000)
    (ev,) = pair.deliver(pair.client, pair.client.send_message(sid, big))
    assert isinstance(ev, MessageReceived)
    credit = pair.client.stream_credit(sid)
    assert credit is not None
    assert credit.send_bytes < 0
    assert not pair.client.has_send_credit(sid)
    (grant,) = pair.deliver(pair.server, pair.server.message_consumed(sid, ev.size))
    assert isinstance(grant, WindowUpdated)
    assert grant.nbytes == ev.size
    credit = pair.client.stream_credit(sid)
    assert credit is not None
    assert credit.send_bytes == INITIAL_WINDOW_BYTES


def test_larger_configured_window_is_granted_at_open() -> None:
    pair = ConnectionPair(window_messages=64, window_bytes=4 * INITIAL_WINDOW_BYTES)
    sid, data = pair.client.send_open("m")
    events = pair.deliver(pair.client, data)
    assert events[0] == StreamOpened(sid, "m", {})
    assert events[1] == WindowUpdated(sid, 64 - 16, 3 * INITIAL_WINDOW_BYTES)
    # The server's grant is owed, not returned: it goes out with data_to_send().
    assert pair.flush(pair.server) == [WindowUpdated(sid, 48, 3 * INITIAL_WINDOW_BYTES)]
    for i in range(64):
        pair.deliver(pair.client, pair.client.send_message(sid, i))
    assert not pair.client.has_send_credit(sid)


def test_peer_exceeding_message_credit_is_a_protocol_error() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    one = frame(FrameType.DATA, sid, msgpack.packb(1))
    pair.deliver(pair.client, one * INITIAL_WINDOW_MESSAGES)
    with pytest.raises(RemoteProtocolError, match="without credit"):
        pair.deliver(pair.client, one)
    assert pair.server.broken
    with pytest.raises(LocalProtocolError):
        receive(pair.server, one)


def test_peer_exceeding_byte_credit_is_a_protocol_error() -> None:
    pair = ConnectionPair(max_message_size=4 * INITIAL_WINDOW_BYTES)
    sid = pair.open()
    big = frame(FrameType.DATA, sid, msgpack.packb(b"x" * INITIAL_WINDOW_BYTES))
    pair.deliver(pair.client, big)  # overdraws the byte credit: allowed once
    with pytest.raises(RemoteProtocolError, match="without credit"):
        pair.deliver(pair.client, frame(FrameType.DATA, sid, msgpack.packb(1)))


def test_window_overflow_is_a_protocol_error() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    with pytest.raises(RemoteProtocolError, match="overflows"):
        pair.deliver(pair.server, frame(FrameType.WINDOW, sid, window(2**31, 0)))


# ---------------------------------------------------------------------------- end / cancel / error


def test_end_then_data_is_a_protocol_error() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    pair.deliver(pair.client, pair.client.send_end(sid))
    with pytest.raises(RemoteProtocolError, match="DATA on a stream in state half_closed_remote"):
        pair.deliver(pair.client, frame(FrameType.DATA, sid, msgpack.packb(1)))


def test_data_after_stream_closed_is_a_protocol_error() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    pair.deliver(pair.client, pair.client.send_end(sid))
    pair.deliver(pair.server, pair.server.send_end(sid))
    assert pair.server.stream_state(sid) is StreamState.CLOSED
    with pytest.raises(RemoteProtocolError, match="state closed"):
        pair.deliver(pair.client, frame(FrameType.END, sid))


def test_send_after_end_is_a_local_error_and_changes_nothing() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    pair.client.send_end(sid)
    with pytest.raises(LocalProtocolError, match="half_closed_local"):
        pair.client.send_message(sid, 1)
    with pytest.raises(LocalProtocolError):
        pair.client.send_end(sid)
    assert pair.client.stream_state(sid) is StreamState.HALF_CLOSED_LOCAL
    assert not pair.client.broken


def test_cancel_from_client_and_crossing_frames_are_ignored() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    cancel = pair.client.send_cancel(sid)
    # The server, not knowing yet, sends a message and ends: the client drops both silently.
    crossing = pair.server.send_message(sid, "late") + pair.server.send_end(sid)
    assert pair.deliver(pair.server, crossing) == []
    assert pair.deliver(pair.client, cancel) == [StreamCancelled(sid)]
    assert pair.server.stream_state(sid) is StreamState.RESET_REMOTE
    with pytest.raises(LocalProtocolError):
        pair.server.send_message(sid, "after cancel")
    # The connection is still usable.
    sid2 = pair.open()
    assert sid2 == sid + 2


def test_cancel_from_server() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    assert pair.deliver(pair.server, pair.server.send_cancel(sid)) == [StreamCancelled(sid)]
    assert pair.client.stream_state(sid) is StreamState.RESET_REMOTE
    # Anything more from the server on that stream is a violation.
    with pytest.raises(RemoteProtocolError):
        pair.deliver(pair.server, frame(FrameType.DATA, sid, msgpack.packb(1)))


def test_error_leaves_connection_usable() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    other = pair.open()
    events = pair.deliver(pair.server, pair.server.send_error(sid, "not_found", "no model x"))
    assert events == [StreamErrored(sid, "not_found", "no model x")]
    (ev,) = pair.deliver(pair.client, pair.client.send_message(other, "still here"))
    assert isinstance(ev, MessageReceived)
    assert ev.message == "still here"


def test_error_codes_and_messages_are_bounded() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    with pytest.raises(ValueError):
        pair.server.send_error(sid, "Not A Code", "x")
    with pytest.raises(ValueError):
        RpcError("x" * 65, "too long a code")
    events = pair.deliver(pair.server, pair.server.send_error(sid, "internal", "m" * 5000))
    assert isinstance(events[0], StreamErrored)
    assert len(events[0].message) == 1024
    sid = pair.open()
    bad = frame(FrameType.ERROR, sid, msgpack.packb(["BAD CODE", "x"]))
    with pytest.raises(RemoteProtocolError, match="malformed code"):
        pair.deliver(pair.server, bad)


# ---------------------------------------------------------------------------- stream ids, OPEN


def test_unknown_stream_ids_are_protocol_errors() -> None:
    pair = ConnectionPair()
    with pytest.raises(RemoteProtocolError, match="unknown stream 5"):
        pair.deliver(pair.server, frame(FrameType.DATA, 5, msgpack.packb(1)))
    pair = ConnectionPair()
    pair.open()
    with pytest.raises(RemoteProtocolError, match="unknown stream 2"):
        pair.deliver(pair.server, frame(FrameType.END, 2))


@pytest.mark.parametrize("stream_id", [2, 1, 0x80000001])
def test_open_ids_must_be_odd_and_increasing(stream_id: int) -> None:
    pair = ConnectionPair()
    pair.open()
    bad = frame(FrameType.OPEN, stream_id, msgpack.packb(["m", {}]))
    with pytest.raises(RemoteProtocolError):
        pair.deliver(pair.client, bad)


def test_server_may_not_open_streams() -> None:
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError):
        pair.server.send_open("m")
    with pytest.raises(RemoteProtocolError, match="only the client opens"):
        pair.deliver(pair.server, frame(FrameType.OPEN, 2, msgpack.packb(["m", {}])))


def test_open_payload_limits() -> None:
    client = RpcConnection(Role.CLIENT)
    with pytest.raises(ValueError):
        client.send_open("")
    with pytest.raises(ValueError):
        client.send_open("m" * 257)
    with pytest.raises(ValueError):
        client.send_open("m", {f"k{i}": i for i in range(MAX_METADATA_ENTRIES + 1)})
    with pytest.raises(TypeError):
        client.send_open("m", {"k": [1, 2]})
    with pytest.raises(TypeError):
        client.send_open("m", {1: "x"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        client.send_open("m", {"k": "v" * MAX_CONTROL_PAYLOAD})
    assert client.open_streams == 0


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb(["m"]),
        msgpack.packb([1, {}]),
        msgpack.packb(["", {}]),
        msgpack.packb(["m" * 300, {}]),
        msgpack.packb(["m", {"k": [1]}]),
        msgpack.packb(["m", []]),
        msgpack.packb(["m", {f"k{i}": i for i in range(MAX_METADATA_ENTRIES + 1)}]),
        msgpack.packb(["m", {}]) + b"\x00",
    ],
)
def test_malformed_open_is_rejected(payload: bytes) -> None:
    server = RpcConnection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        receive(server, frame(FrameType.OPEN, 1, payload))


def test_streams_over_max_streams_are_refused_not_fatal() -> None:
    pair = ConnectionPair()
    pair.client = RpcConnection(Role.CLIENT, max_streams=10)
    pair.server = RpcConnection(Role.SERVER, max_streams=2)
    a, _ = pair.open(), pair.open()
    sid, data = pair.client.send_open("third")
    data += pair.client.send_message(sid, "hello")
    assert receive(pair.server, data) == []  # refused: no event, its DATA dropped
    events = pair.flush(pair.server)
    assert events == [StreamErrored(sid, "resource_exhausted", "too many concurrent streams (2)")]
    # The refused stream's late frames are ignored; the connection and other streams are fine.
    assert pair.deliver(pair.client, frame(FrameType.END, sid)) == []
    (ev,) = pair.deliver(pair.client, pair.client.send_message(a, 1))
    assert isinstance(ev, MessageReceived)


def test_client_caps_its_own_streams() -> None:
    client = RpcConnection(Role.CLIENT, max_streams=2)
    client.send_open("a")
    client.send_open("b")
    with pytest.raises(LocalProtocolError, match="too many concurrent streams"):
        client.send_open("c")


# ---------------------------------------------------------------------------- limits and garbage


def test_oversized_frame_rejected_from_header_alone() -> None:
    server = RpcConnection(Role.SERVER, max_message_size=1024)
    receive(server, frame(FrameType.OPEN, 1, msgpack.packb(["m", {}])))
    header = HEADER.pack(1025, FrameType.DATA, 0, 1)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 1024"):
        receive(server, header)  # no payload byte needed: rejected before buffering
    control = HEADER.pack(MAX_CONTROL_PAYLOAD + 1, FrameType.OPEN, 0, 3)
    with pytest.raises(RemoteProtocolError):
        receive(RpcConnection(Role.SERVER), control)


def test_oversized_message_rejected_on_send_without_state_change() -> None:
    pair = ConnectionPair(max_message_size=100)
    sid = pair.open()
    with pytest.raises(LocalProtocolError, match="exceeds max_message_size"):
        pair.client.send_message(sid, b"x" * 200)
    credit = pair.client.stream_credit(sid)
    assert credit is not None
    assert credit.send_messages == INITIAL_WINDOW_MESSAGES


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb(msgpack.ExtType(1, b"abc")),
        msgpack.packb(msgpack.ExtType(1, b"")),
        msgpack.packb(msgpack.Timestamp(1, 0)),
        msgpack.packb({1: "int key"}),
        b"\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\xc1",  # reserved byte
        b"\x92\x01",  # truncated array
        b"\x01\x02",  # two values in one message
        b"",  # no value at all
        b"\x91" * 5000 + b"\xc0",  # nesting deeper than msgpack's stack
    ],
)
def test_malformed_messages_are_protocol_errors(payload: bytes) -> None:
    pair = ConnectionPair()
    sid = pair.open()
    with pytest.raises(RemoteProtocolError, match="malformed msgpack"):
        pair.deliver(pair.client, frame(FrameType.DATA, sid, payload))


def test_container_length_limits() -> None:
    pair = ConnectionPair(max_message_size=1 << 24)
    sid = pair.open()
    # A 4-byte array header announcing 2**32-1 entries: refused without allocating them.
    with pytest.raises(RemoteProtocolError):
        pair.deliver(pair.client, frame(FrameType.DATA, sid, b"\xdd\xff\xff\xff\xff"))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (frame(0x42, 1), "unknown frame type"),
        (frame(FrameType.END, 0), "on stream 0"),
        (frame(FrameType.PING, 1, b"12345678"), "must be 0"),
        (frame(FrameType.PING, 0, b"1234"), "must be 8"),
        (frame(FrameType.END, 1, flags=0x01), "unknown flags"),
        (frame(FrameType.DATA, 1, msgpack.packb(1), flags=0x80), "unknown flags"),
        (frame(FrameType.CANCEL, 1, b"x"), "must be empty"),
        (frame(FrameType.WINDOW, 1, b"1234"), "must be 8"),
        (frame(FrameType.GOAWAY, 0, msgpack.packb([1, "ok"])), "GOAWAY payload"),
    ],
)
def test_framing_violations(data: bytes, match: str) -> None:
    pair = ConnectionPair()
    pair.open()
    with pytest.raises(RemoteProtocolError, match=match):
        pair.deliver(pair.client, data)


def test_ping_pong_and_goaway() -> None:
    pair = ConnectionPair()
    assert pair.deliver(pair.client, pair.client.send_ping(b"abcdefgh")) == []
    assert pair.flush(pair.server) == [PongReceived(b"abcdefgh")]
    with pytest.raises(ValueError):
        pair.client.send_ping(b"short")
    sid = pair.open()
    events = pair.deliver(pair.server, pair.server.send_goaway("unavailable", "bye"))
    assert events == [GoAwayReceived(sid, "unavailable", "bye")]
    with pytest.raises(LocalProtocolError, match="shutting down"):
        pair.client.send_open("m")
    # Existing streams keep working.
    (ev,) = pair.deliver(pair.client, pair.client.send_message(sid, 1))
    assert isinstance(ev, MessageReceived)


def test_eof() -> None:
    pair = ConnectionPair()
    _, data = pair.client.send_open("m")
    assert receive(pair.server, data[:5]) == []
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        receive(pair.server, b"")
    pair = ConnectionPair()
    pair.open()
    assert receive(pair.server, b"") == [ConnectionEnded()]
    with pytest.raises(LocalProtocolError):
        receive(pair.server, b"more")


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        RpcConnection(Role.CLIENT, window_messages=1)
    with pytest.raises(ValueError):
        RpcConnection(Role.CLIENT, max_message_size=0)
    with pytest.raises(ValueError):
        RpcConnection(Role.SERVER, max_streams=0)
    with pytest.raises(TypeError):
        RpcConnection("client")  # type: ignore[arg-type]


def test_statistics_count_traffic() -> None:
    pair = ConnectionPair()
    sid = pair.open()
    pair.deliver(pair.client, pair.client.send_message(sid, b"x" * 10))
    stats = pair.server.statistics()
    assert stats.open_streams == 1
    assert stats.streams_opened == 1
    assert stats.messages_received == 1
    assert stats.queued_messages == 1
    assert stats.bytes_received == pair.client.statistics().bytes_sent


# ---------------------------------------------------------------------------- Hypothesis


def _scenario_bytes(script: list[tuple[int, int, Any]]) -> tuple[bytes, list[Event]]:
    """Run a script of client operations; return the client's bytes and the server's events
    when fed in one piece."""
    pair = ConnectionPair(max_streams=8)
    out = bytearray()
    events: list[Event] = []
    open_ids: list[int] = []
    for op, pick, value in script:
        if op == 0 or not open_ids:
            if pair.client.open_streams >= 8:
                continue
            sid, data = pair.client.send_open(f"m{pick}", {"v": pick})
            open_ids.append(sid)
        else:
            sid = open_ids[pick % len(open_ids)]
            if op == 1 and pair.client.has_send_credit(sid):
                data = pair.client.send_message(sid, value)
            elif op == 2:
                data = pair.client.send_cancel(sid)
                open_ids.remove(sid)
            else:
                data = pair.client.send_end(sid)
                open_ids.remove(sid)
        out += data
        events += receive(pair.server, data)
    return bytes(out), events


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=10,
)
_scripts = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 7), _values), min_size=1, max_size=30
)


@settings(max_examples=150, deadline=None)
@given(script=_scripts, cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_rechunking_gives_the_same_events(
    script: list[tuple[int, int, Any]], cuts: list[int]
) -> None:
    data, expected = _scenario_bytes(script)
    server = RpcConnection(Role.SERVER, max_streams=8)
    points = sorted({c % (len(data) + 1) for c in cuts})
    events: list[Event] = []
    prev = 0
    for p in [*points, len(data)]:
        if p > prev:
            events += receive(server, data[prev:p])
        prev = p
    assert events == expected
    # h11 style, one event at a time, gives the same sequence too.
    one_by_one = RpcConnection(Role.SERVER, max_streams=8)
    pulled: list[Event] = []
    prev = 0
    for p in [*points, len(data)]:
        if p > prev:
            one_by_one.receive_data(data[prev:p])
        while (ev := one_by_one.next_event()) is not NEED_DATA:
            assert isinstance(ev, Event)
            pulled.append(ev)
        prev = p
    assert pulled == expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    role=st.sampled_from([Role.CLIENT, Role.SERVER]),
    prefix=st.booleans(),
    chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    eof=st.booleans(),
)
def test_arbitrary_bytes_give_events_or_remote_error(
    role: Role, prefix: bool, chunks: list[bytes], eof: bool
) -> None:
    conn = RpcConnection(role, max_message_size=4096)
    if prefix and role is Role.CLIENT:
        conn.send_open("m")  # so stream 1 exists and garbage can hit it
    elif prefix:
        receive(conn, frame(FrameType.OPEN, 1, msgpack.packb(["m", {}])))
    for chunk in [*chunks, b""] if eof else chunks:
        try:
            events = receive(conn, chunk)
        except RemoteProtocolError:
            assert conn.broken
            return
        assert all(isinstance(e, Event) for e in events)
        # Buffered bytes never exceed one maximal frame.
        assert conn.receive_buffered <= 10 + max(4096, MAX_CONTROL_PAYLOAD)


_STATES = list(StreamState)
_RECV = [i for i in StreamInput if i.name.startswith("RECV_")]
_SEND = [i for i in StreamInput if i.name.startswith("SEND_") and i is not StreamInput.SEND_WINDOW]


def _client_stream_in(state: StreamState) -> tuple[ConnectionPair, int]:
    """A pair whose client-side stream 1 is in ``state``."""
    pair = ConnectionPair()
    sid = pair.open()
    c, s = pair.client, pair.server
    if state is StreamState.HALF_CLOSED_LOCAL:
        pair.deliver(c, c.send_end(sid))
    elif state is StreamState.HALF_CLOSED_REMOTE:
        pair.deliver(s, s.send_end(sid))
    elif state is StreamState.CLOSED:
        pair.deliver(c, c.send_end(sid))
        pair.deliver(s, s.send_end(sid))
    elif state is StreamState.RESET_LOCAL:
        pair.deliver(c, c.send_cancel(sid))
    elif state is StreamState.RESET_REMOTE:
        pair.deliver(s, s.send_cancel(sid))
    assert c.stream_state(sid) is state
    return pair, sid


_RECV_FRAME = {
    StreamInput.RECV_DATA: lambda sid: frame(FrameType.DATA, sid, msgpack.packb("m")),
    StreamInput.RECV_END: lambda sid: frame(FrameType.END, sid),
    StreamInput.RECV_CANCEL: lambda sid: frame(FrameType.CANCEL, sid),
    StreamInput.RECV_ERROR: lambda sid: frame(FrameType.ERROR, sid, msgpack.packb(["x", "y"])),
    StreamInput.RECV_WINDOW: lambda sid: frame(FrameType.WINDOW, sid, window(1, 1)),
}


@settings(max_examples=100, deadline=None)
@given(state=st.sampled_from(_STATES), event=st.sampled_from(_RECV))
def test_state_machine_received_frames(state: StreamState, event: StreamInput) -> None:
    pair, sid = _client_stream_in(state)
    entry = _TRANSITIONS.get((state, event))
    if entry is None:
        with pytest.raises(RemoteProtocolError):
            receive(pair.client, _RECV_FRAME[event](sid))
        return
    events = receive(pair.client, _RECV_FRAME[event](sid))
    new_state, deliver = entry
    assert bool(events) == deliver
    assert pair.client.stream_state(sid) is new_state


@settings(max_examples=100, deadline=None)
@given(state=st.sampled_from(_STATES), event=st.sampled_from(_SEND))
def test_state_machine_sends(state: StreamState, event: StreamInput) -> None:
    pair, sid = _client_stream_in(state)
    c = pair.client
    action: Callable[[], bytes] = {
        StreamInput.SEND_DATA: lambda: c.send_message(sid, 1),
        StreamInput.SEND_END: lambda: c.send_end(sid),
        StreamInput.SEND_CANCEL: lambda: c.send_cancel(sid),
        StreamInput.SEND_ERROR: lambda: c.send_error(sid, "internal", "x"),
    }[event]
    entry = _TRANSITIONS.get((state, event))
    if entry is None:
        with pytest.raises(LocalProtocolError):
            action()
        assert c.stream_state(sid) is state  # nothing changed
        assert not c.broken
        return
    data = action()
    assert c.stream_state(sid) is entry[0]
    receive(pair.server, data)  # the peer accepts what we were allowed to send


def test_wire_example_from_rpc_md() -> None:
    """The byte-exact example of transport/RPC.md §8 (an interoperability vector)."""
    client = RpcConnection(Role.CLIENT)
    sid, data = client.send_open("echo")
    assert data == bytes.fromhex("00000007 01 00 00000001 92a4 6563686f 80")
    assert client.send_message(sid, {"x": 1}, end=True) == bytes.fromhex(
        "00000004 02 01 00000001 81a17801"
    )
    server = RpcConnection(Role.SERVER)
    events = receive(server, bytes.fromhex("00000007010000000001 92a46563686f80"))
    assert events == [StreamOpened(1, "echo", {})]


@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(
        st.tuples(
            st.sampled_from([int(t) for t in FrameType]),
            st.sampled_from([0, 1, 2, 3, 5]),
            st.sampled_from([0, 1]),
            st.binary(max_size=24) | _values.map(msgpack.packb),
        ),
        max_size=12,
    ),
    role=st.sampled_from([Role.CLIENT, Role.SERVER]),
)
def test_well_framed_garbage_gives_events_or_remote_error(
    frames: list[tuple[int, int, int, bytes]], role: Role
) -> None:
    """Correctly framed but otherwise arbitrary frames reach deeper than random bytes."""
    conn = RpcConnection(role)
    if role is Role.CLIENT:
        conn.send_open("m")
        conn.send_open("n")
    data = b"".join(frame(t, sid, payload, flags) for t, sid, flags, payload in frames)
    try:
        events = receive(conn, data)
    except RemoteProtocolError:
        assert conn.broken
        return
    assert all(isinstance(e, Event) for e in events)
    assert conn.open_streams <= 2 + len(frames)


def test_ping_flood_without_reading_pongs_is_cut_off() -> None:
    from transport.rpc._core import MAX_PENDING_OUTPUT

    server = RpcConnection(Role.SERVER)
    ping = frame(FrameType.PING, 0, b"12345678")
    n_ok = MAX_PENDING_OUTPUT // len(ping)
    receive(server, ping * n_ok)  # owed, not yet taken: fine up to the cap
    with pytest.raises(RemoteProtocolError, match="does not read"):
        receive(server, ping * 2)
    # Draining what is owed is what a live peer's writer does, and keeps PINGs allowed.
    other = RpcConnection(Role.SERVER)
    for _ in range(3):
        receive(other, ping * n_ok)
        assert len(other.data_to_send()) == n_ok * len(ping)
