"""Small pieces shared by the sandbox modules: namespace flags, the set-up timeline, and the
set-up protocol's line reader. Standard library only (the zygote loads this package by path)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

__all__ = [
    "CLONE_NEWNS",
    "CLONE_NEWUTS",
    "CLONE_NEWIPC",
    "CLONE_NEWUSER",
    "CLONE_NEWPID",
    "CLONE_NEWNET",
    "TIMING",
    "DEV_NULL",
    "mark",
    "kill_quietly",
    "describe_exc",
    "LineReader",
]

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000

#: CLOCK_MONOTONIC marks of the set-up phases, taken in the child and reported with ``T``
#: (the clock is system-wide, so the supervisor can place them on its own timeline).
TIMING: dict[str, float] = {}

#: /dev/null opened by the relay while still real root (before the user namespace), so the
#: enclave never depends on opening a device node itself.
DEV_NULL: list[int] = []


def mark(name: str) -> None:
    """Record when a set-up phase ended (in the child)."""
    TIMING[name] = time.monotonic()


def kill_quietly(pid: int) -> None:
    """SIGKILL ``pid`` if it still exists."""
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def describe_exc(exc: BaseException) -> str:
    """``repr(exc)`` plus where it happened (set-up failures must be diagnosable)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].name}:{frames[-1].lineno}" if frames else ""
    return f"{exc!r}{where}"


class LineReader:
    """Lines from a pipe, read in chunks (the layer report is ~1 KiB: no byte-wise reads)."""

    def __init__(self, fd: int, limit: int = 65536) -> None:
        self.fd = fd
        self.limit = limit
        self.buf = b""

    def next(self) -> bytes:
        """The next line (with its newline), or b"" at EOF; bounded by ``limit``."""
        while b"\n" not in self.buf:
            if len(self.buf) > self.limit:
                raise OSError("sandbox set-up line too long")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"
