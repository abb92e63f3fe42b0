"""A minimal progress bar for long file operations (stderr, terminals only)."""

from __future__ import annotations

import sys
import time
from typing import Final, TextIO

__all__ = ["ProgressBar", "PROGRESS_MIN_BYTES"]

#: Files smaller than this finish too fast for a bar to be useful (bytes).
PROGRESS_MIN_BYTES: Final = 8 << 20
#: Seconds between redraws.
_REDRAW_S: Final = 0.1
_WIDTH: Final = 30


class ProgressBar:
    """``ProgressBar(label, total)(done, total)`` draws ``label [#####     ]  42% 12.0/28.6 MiB``.

    Draws only when ``stream`` is a terminal and ``total`` is at least ``min_bytes``; otherwise
    it is a no-op, so callers can always pass it as a progress callback.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        min_bytes: int = PROGRESS_MIN_BYTES,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._label = label
        isatty = getattr(self._stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) and total >= min_bytes
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < _REDRAW_S:
            return
        self._last = now
        frac = done / total if total else 1.0
        filled = int(frac * _WIDTH)
        bar = "#" * filled + " " * (_WIDTH - filled)
        mib = 1 << 20
        self._stream.write(
            f"\r{self._label} [{bar}] {frac:4.0%} {done / mib:.1f}/{total / mib:.1f} MiB"
        )
        if done >= total:
            self._stream.write("\n")
        self._stream.flush()
