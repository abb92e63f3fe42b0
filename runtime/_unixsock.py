"""Unix socket paths longer than ``sun_path`` (108 bytes): go through ``/proc/self/fd``.

State directories under pytest's tmp or deep home directories easily exceed the limit. Binding
or connecting to ``/proc/self/fd/<dirfd>/<name>`` (a short path whose first part is a magic
link to the directory) reaches the same file whatever the directory's length.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["bind_private", "short_path", "SUN_PATH_MAX"]

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


def bind_private(path: Path | str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A new AF_UNIX socket bound at ``path`` with mode 0600 (not yet listening).

    The socket file's mode comes from the process umask at ``bind``, so the umask is narrowed
    around it, synchronously: no other task can run (and create files under the narrowed
    umask, or narrow it again and restore the wrong value) in between. Doing this around an
    ``await`` leaked umask 0177 to the whole process when two binds overlapped (two enclaves'
    control sockets started together), after which new directories came out 0600.
    """
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        old = os.umask(0o177)
        try:
            with short_path(path) as bindable:
                sock.bind(bindable)
        finally:
            os.umask(old)
    except BaseException:
        sock.close()
        raise
    return sock
