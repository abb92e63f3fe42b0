"""Make freed request buffers go back to the system (glibc malloc), so the enclave's memory
comes back down after a burst of large requests.

Why it stayed up (issue 10, item 4: 315 of 512 MiB still in use after the slow readers left):
Python frees a request's buffers, but glibc keeps freed heap memory for reuse and gives it back
only when the very top of a heap is free, which a few small live objects prevent. Two causes,
two fixes, both measured with the issue's attack on a 512 MiB server enclave (tests/models/
test_memory_bound.py; the enclave's anonymous memory grew from ~18 MiB to ~56 MiB at peak):

* by default glibc *raises* its mmap threshold to the size of every mmapped block freed (up to
  32 MiB), so after the first multi-megabyte request, later ones came from the heap. Fixing the
  threshold (:func:`tune_malloc`) turns that off: request-sized buffers are always mapped on
  their own and unmapped by ``free`` even while the connection lasts;
* what the connection's smaller objects freed is returned by ``malloc_trim(0)`` (:func:`trim`,
  every arena, including pages in the middle of a heap) when a connection ends.

After the attacker left: ~43 MiB still held with neither, ~35 MiB with the threshold only,
~21 MiB with the trim only, ~20 MiB with both (the baseline being ~18 MiB).

Both are no-ops where the C library is not glibc (nothing to tune, nothing to trim).
"""

from __future__ import annotations

import ctypes
from typing import Final

import structlog

__all__ = ["MMAP_THRESHOLD_BYTES", "tune_malloc", "trim"]

log = structlog.get_logger()

#: glibc's ``mallopt`` parameter numbers (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
#: Allocations at least this large get their own mapping, always (1 MiB: the multi-megabyte
#: request buffers an attacker can pile up leave with ``free``; the ~60 KB stream messages and
#: the batches of the normal path stay on the heap, where mapping and faulting them in on every
#: batch cost 20-30 % of the streaming throughput at glibc's initial 128 KiB, measured on a
#: shared machine).
MMAP_THRESHOLD_BYTES: Final = 1 << 20
#: Free memory at the top of the heap beyond this is returned at once (glibc: 2 x threshold).
_TRIM_THRESHOLD_BYTES: Final = 2 * MMAP_THRESHOLD_BYTES


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC: Final = _libc()


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True if applied."""
    if _LIBC is None:
        return False
    ok = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )
    log.debug("malloc_tuned", ok=ok, mmap_threshold=MMAP_THRESHOLD_BYTES)
    return ok


def trim() -> None:
    """Give free heap memory back to the system (glibc ``malloc_trim(0)``: every arena)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
