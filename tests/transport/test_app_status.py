"""The app status report: codec bounds (pure) and the two trio sides over a memory stream."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from transport.app_status import (
    MAX_DETAIL_CHARS,
    MAX_STATUS_BYTES,
    AppState,
    AppStatus,
    decode_status,
    encode_status,
    receive_app_status,
)
from transport.errors import RemoteProtocolError


def test_round_trip() -> None:
    status = AppStatus(AppState.FAILED, "KMS unreachable via (3, 8000)")
    assert decode_status(encode_status(status)) == status
    ready = AppStatus(AppState.READY, ports=(5005, 5006))
    assert decode_status(encode_status(ready)) == ready


def test_long_detail_is_truncated_not_refused() -> None:
    status = AppStatus(AppState.FAILED, "x" * 5000)
    assert len(status.detail) == MAX_DETAIL_CHARS
    assert decode_status(encode_status(status)).detail == status.detail


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00\x00",
        (MAX_STATUS_BYTES + 1).to_bytes(4, "big"),
        b"\x00\x00\x00\x05{}",
        b"\x00\x00\x00\x02[]",
        b'\x00\x00\x00\x11{"state":"maybe"}',
        b'\x00\x00\x00\x1a{"state":"ready","x":1}   ',
        b'\x00\x00\x00\x1e{"state":"ready","ports":[1.5]}',
        b'\x00\x00\x00\x1f{"state":"ready","ports":[70000]}',
        b"\x00\x00\x00\x02\xff\xfe",
    ],
)
def test_malformed_frames_are_remote_protocol_errors(frame: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_status(frame)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise(frame: bytes) -> None:
    try:
        decode_status(frame)
    except RemoteProtocolError:
        pass


async def test_parent_side_reads_acks_and_bounds_time() -> None:
    left, right = trio.testing.memory_stream_pair()
    status = AppStatus(AppState.READY, ports=(5005,))
    async with trio.open_nursery() as nursery:
        got: list[AppStatus] = []

        async def parent() -> None:
            got.append(await receive_app_status(right))

        nursery.start_soon(parent)
        frame = encode_status(status)
        for i in range(len(frame)):  # byte by byte: reassembly
            await left.send_all(frame[i : i + 1])
        assert await left.receive_some(1) == b"\x06"
    assert got == [status]


async def test_parent_side_gives_up_on_a_silent_app(autojump_clock: trio.abc.Clock) -> None:
    _left, right = trio.testing.memory_stream_pair()
    with pytest.raises(trio.TooSlowError):
        await receive_app_status(right, timeout_s=1.0)


async def test_parent_side_refuses_an_oversized_length_without_reading_on() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all((MAX_STATUS_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError):
        await receive_app_status(right, timeout_s=5.0)
