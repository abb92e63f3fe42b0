"""Unix socket paths longer than ``sun_path`` (108 bytes): go through ``/proc/self/fd``.

State directories under pytest's tmp or deep home directories easily exceed the limit. Binding
or connecting to ``/proc/self/fd/<dirfd>/<name>`` (a short path whose first part is a magic
link to the directory) reaches the same file whatever the directory's length.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["short_path", "SUN_PATH_MAX"]

#: sizeof(sockaddr_un.sun_path) minus the terminating NUL.
SUN_PATH_MAX = 107


@contextlib.contextmanager
def short_path(path: Path | str) -> Iterator[str]:
    """A path usable with bind/connect for ``path`` (valid inside the ``with`` block)."""
    p = str(path)
    if len(p.encode()) <= SUN_PATH_MAX:
        yield p
        return
    d, name = os.path.split(p)
    fd = os.open(d or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)
