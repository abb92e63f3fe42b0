"""An enclave's console in debug mode: what its app writes to stdout and stderr, kept for late
readers and fanned out to live ones.

The supervisor pumps the console pipe into a :class:`ConsoleBuffer`; every reader gets the
history (the last :data:`CONSOLE_HISTORY_BYTES`) then the live bytes, and sees the end when the
enclave's last writer is gone. A reader that falls :data:`READER_BACKLOG` chunks behind is
dropped (it sees the end early) rather than holding memory or the pump.
"""

from __future__ import annotations

from typing import Final

import trio

__all__ = ["ConsoleBuffer", "CONSOLE_HISTORY_BYTES", "READER_BACKLOG"]

#: Console bytes kept for late readers (older bytes are dropped).
CONSOLE_HISTORY_BYTES: Final = 1 << 20
#: Chunks a reader may lag behind before it is dropped.
READER_BACKLOG: Final = 256


class ConsoleBuffer:
    """History plus live fan-out of one enclave's console."""

    def __init__(self) -> None:
        self._history = bytearray()
        self._readers: list[trio.MemorySendChannel[bytes]] = []
        self._closed = False
        self.done = trio.Event()

    def tail(self, limit: int) -> bytes:
        """The last ``limit`` bytes written."""
        return bytes(self._history[-limit:])

    def reader(self) -> trio.MemoryReceiveChannel[bytes]:
        """History, then live bytes; the channel closes at the end of the console."""
        send, recv = trio.open_memory_channel[bytes](READER_BACKLOG)
        if self._history:
            send.send_nowait(bytes(self._history))
        if self._closed:
            send.close()
        else:
            self._readers.append(send)
        return recv

    def _feed(self, data: bytes) -> None:
        self._history += data
        if len(self._history) > CONSOLE_HISTORY_BYTES:
            del self._history[: len(self._history) - CONSOLE_HISTORY_BYTES]
        for ch in list(self._readers):
            try:
                ch.send_nowait(data)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                # a reader that far behind (or gone) is dropped: it sees the end rather than
                # waiting forever for bytes it will never get
                self._readers.remove(ch)
                ch.close()

    async def pump(self, fd: int) -> None:
        """Read the console pipe ``fd`` (owned from now on) until EOF or cancellation."""
        stream = trio.lowlevel.FdStream(fd)
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    self._feed(bytes(data))
        finally:
            # also when cancelled: readers must see the end, never hang
            self._closed = True
            for ch in self._readers:
                ch.close()
            self._readers.clear()
            self.done.set()
