"""The demo's narration: numbered steps with their time, details and checks on stderr, and the
one closing ``error:`` line of a failed run (the CLI's convention)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Console"]


class Console:
    """Step-by-step progress on stderr (readable on a terminal and in a log)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.monotonic()
        self.color = self.stream.isatty()

    def _c(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def step(self, text: str) -> None:
        """A numbered step, with the time since the start."""
        t = time.monotonic() - self.t0
        print(f"{self._c('2', f'[{t:5.1f}s]')} {self._c('1', text)}", file=self.stream, flush=True)

    def info(self, text: str) -> None:
        """A detail of the current step."""
        print(f"          {text}", file=self.stream, flush=True)

    def ok(self, text: str) -> None:
        """A check of the current step that passed."""
        print(f"          {self._c('32', 'ok')} {text}", file=self.stream, flush=True)

    def fail(self, text: str) -> None:
        """What failed (the demo then stops with a non-zero status)."""
        print(f"          {self._c('31', 'FAILED')} {text}", file=self.stream, flush=True)

    def error(self, text: str) -> None:
        """The closing ``error:`` line of a failed run (the CLI's convention: one line)."""
        summary = text.strip().splitlines()[0] if text.strip() else "failed"
        print(f"error: demo: {summary}", file=self.stream, flush=True)
