"""The console buffer (runtime.console): history for late readers, live fan-out, the end seen by
every reader, and a reader that lags too far dropped (it sees the end) instead of waiting
forever or holding the pump."""

from __future__ import annotations

import os

import trio
import trio.testing

from runtime.console import CONSOLE_HISTORY_BYTES, READER_BACKLOG, ConsoleBuffer


async def _drain(recv: trio.MemoryReceiveChannel[bytes]) -> bytes:
    out = b""
    async with recv:
        async for chunk in recv:
            out += chunk
    return out


async def test_history_live_and_end() -> None:
    buf = ConsoleBuffer()
    r, w = os.pipe()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(buf.pump, r)
            os.write(w, b"early ")
            await trio.sleep(0.05)
            late = buf.reader()  # joins after "early": gets it from the history
            os.write(w, b"live")
            os.close(w)
            assert await _drain(late) == b"early live"
        assert buf.done.is_set()
        assert await _drain(buf.reader()) == b"early live"  # after the end: history, closed
        assert buf.tail(4) == b"live"


async def test_a_reader_that_lags_too_far_sees_the_end() -> None:
    buf = ConsoleBuffer()
    r, w = os.pipe()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            slow = buf.reader()  # never read while the app writes
            n.start_soon(buf.pump, r)
            for i in range(READER_BACKLOG + 50):
                os.write(w, b"%d\n" % i)
                await trio.testing.wait_all_tasks_blocked()  # the pump read it: one chunk each
            os.close(w)
        got = await _drain(slow)  # ends (dropped), does not hang
        assert 0 < len(got.splitlines()) <= READER_BACKLOG


async def test_history_is_bounded() -> None:
    buf = ConsoleBuffer()
    r, w = os.pipe()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(buf.pump, r)

            def write() -> None:
                block = b"x" * 65536
                for _ in range(CONSOLE_HISTORY_BYTES // len(block) + 4):
                    os.write(w, block)
                os.close(w)

            await trio.to_thread.run_sync(write)
        assert len(buf.tail(10 * CONSOLE_HISTORY_BYTES)) == CONSOLE_HISTORY_BYTES
