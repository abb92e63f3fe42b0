"""Writing to a trio socket so that a cancelled write never leaves half a frame behind.

``trio.SocketStream.send_all`` cancelled while the socket is full returns without saying how much
it wrote. A framed protocol on top (the channel's records, the RPC layer's frames) then has half
a frame on the wire and must give the connection up. :class:`SocketWriter` writes to the
standard-library socket itself and keeps count: a write cancelled part-way keeps its unwritten
rest (:attr:`SocketWriter.unsent`), which goes out first on the next write or :meth:`flush`. The
stream stays consistent; which of the cancelled write's bytes arrive is, as trio allows for a
cancelled ``send_all``, some or all of them (here: all, once the next write or flush ran).

It is also the cheap path: one scheduler pass per write (none with ``fair=False``), waiting with
``trio.lowlevel.wait_writable`` only while the socket is full, without ``SocketStream``'s
per-call wrapper and memoryviews (a few µs per small write, ``enclave bench channel``).
"""

from __future__ import annotations

import errno
import socket
from typing import Final

import trio

__all__ = ["SocketWriter", "stdlib_socket"]

#: errnos that mean "our own socket was closed" (as trio's SocketStream maps them)
_CLOSED_SOCKET_ERRNOS: Final = frozenset({errno.EBADF, errno.ENOTSOCK})


def stdlib_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """The standard-library socket inside a ``trio.SocketStream``, or None (another stream, or
    a trio that keeps it elsewhere: then callers go through the stream's own methods).

    trio has no public accessor (``trio.socket.from_stdlib_socket`` only goes the other way).
    The same object, not a ``dup``: closing the trio socket closes it (and wakes our waiters
    through ``notify_closing``), so a closed stream cannot write to a reused descriptor. A trio
    that renames the attribute silently loses only this path;
    tests/transport/test_channel_socket_path.py fails then, so it does not go unnoticed.
    """
    if not isinstance(stream, trio.SocketStream):
        return None
    raw = getattr(stream.socket, "_sock", None)
    return raw if isinstance(raw, socket.socket) else None


class SocketWriter:
    """Writes byte strings in order to one socket; a cancelled write keeps what it did not
    write, to go out before anything else (module docstring).

    One task writes at a time (the owner's own conflict check covers it). Reading the same
    socket from another task is fine.
    """

    __slots__ = ("_raw", "_unsent")

    def __init__(self, raw: socket.socket) -> None:
        self._raw = raw
        self._unsent = b""

    @property
    def unsent(self) -> int:
        """Bytes a cancelled write left, not written yet."""
        return len(self._unsent)

    async def send_all(self, data: bytes | memoryview, *, fair: bool = True) -> None:
        """Write what an earlier cancelled write left, then all of ``data``.

        Not a cancel point before the first byte (the caller checks cancellation before it
        commits to a frame); while the socket is full it waits, and a cancellation there keeps
        the rest for later and raises. ``fair``: a schedule point after a write the socket took
        at once (False for a caller that blocks right after anyway).

        Raises:
            trio.Cancelled: while waiting for room; the rest is kept (:attr:`unsent`).
            trio.BrokenResourceError: the socket failed (as ``SocketStream`` maps errors).
            trio.ClosedResourceError: the socket was closed.
        """
        if self._unsent:  # rare (only after a cancellation): a copy is fine
            data = self._unsent + bytes(data)
            self._unsent = b""
        raw = self._raw
        try:
            try:
                sent = raw.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                if fair:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
            with memoryview(data) as view:
                while sent < len(view):
                    try:
                        await trio.lowlevel.wait_writable(raw)
                    except BaseException:
                        self._unsent = bytes(view[sent:])
                        raise
                    try:
                        with view[sent:] as remaining:
                            sent += raw.send(remaining)
                    except BlockingIOError:
                        pass
        except OSError as exc:
            if exc.errno in _CLOSED_SOCKET_ERRNOS:
                raise trio.ClosedResourceError("this socket was already closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def flush(self) -> None:
        """Write what a cancelled write left (a checkpoint and nothing else if none)."""
        if self._unsent:
            await self.send_all(b"", fair=False)
        else:
            await trio.lowlevel.checkpoint()
