"""The daemon's state directory: private, and used by one daemon at a time.

* :func:`prepare_state_dir` creates the directory with mode 0700 and refuses one that another
  user owns or that group or others can write to: whoever can write there could plant a master
  key they know or swap the database before the daemon opens it. Files the daemon keeps there
  are 0600 (:func:`tighten_files`).
* :class:`StateLock` is an exclusive ``flock`` on ``kms.lock`` held for the daemon's life. A
  second daemon on the same directory (it would interleave audit lines and break the chain) is
  refused with the holder's pid. The kernel drops the lock when the holder dies, even by
  ``kill -9``, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

import structlog

from transport.errors import ConfigurationError

__all__ = ["LOCK_FILE", "StateDirInUse", "StateLock", "prepare_state_dir", "tighten_files"]

log = structlog.get_logger()

LOCK_FILE = "kms.lock"
#: A pid is at most 7 digits on Linux (pid_max ≤ 2^22); read a little more, never the file.
_MAX_PID_TEXT = 32


class StateDirInUse(ConfigurationError):
    """Another daemon holds the state directory's lock.

    Attributes:
        pid: the holder's pid as it wrote it (None if unreadable).
    """

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "a process whose pid is unknown"
        super().__init__(
            f"state directory {path} is in use by another KMS daemon ({who}); one daemon per "
            "state directory (stop it, or give this one another --state-dir)"
        )
        self.pid = pid


def prepare_state_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700, parents as needed) or check an existing one.

    Raises:
        ConfigurationError: not a directory, owned by another user, or writable by group or
            others.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise ConfigurationError(f"cannot create the state directory {path}: {exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"state directory {path} is not a directory")
    if st.st_uid != os.getuid():
        raise ConfigurationError(
            f"state directory {path} is owned by uid {st.st_uid}, not by this user ({os.getuid()})"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigurationError(
            f"state directory {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); it holds the master key and the key database: "
            f"check its contents, then chmod 700 {path}"
        )
    if st.st_mode & 0o077:  # readable/searchable by others: nothing planted, just close it
        path.chmod(0o700)
        log.warning("kms_state_dir_tightened", path=str(path), old_mode=f"{st.st_mode & 0o777:04o}")
    return path


def tighten_files(path: Path, names: tuple[str, ...]) -> None:
    """Make the daemon's existing files in ``path`` mode 0600 (older versions left 0644)."""
    for name in names:
        f = path / name
        try:
            mode = stat.S_IMODE(f.lstat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            f.chmod(0o600)
            log.warning("kms_state_file_tightened", path=str(f), old_mode=f"{mode:04o}")


class StateLock:
    """The exclusive lock of one state directory; hold it for the daemon's life.

    Use :meth:`acquire`; :meth:`release` (or closing the process) frees it.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> StateLock:
        """Take the lock, or raise :class:`StateDirInUse` naming the holder's pid."""
        path = state_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = os.pread(fd, _MAX_PID_TEXT, 0).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            raise StateDirInUse(state_dir, int(text) if text.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        # Holder's pid, for the message a second daemon prints. Written after locking.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Free the lock (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor drops the flock
