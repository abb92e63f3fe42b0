"""Extracting an image's two ramdisks into a directory, and checking such a tree later.

Layout of an unpacked image (``root``)::

    root/bootstrap/     ramdisk[0]: the project's enclave-side packages (put on PYTHONPATH)
                        and enclave-identity.json
    root/app/           ramdisk[1]: manifest.json (cmd, env) and rootfs/ (the app directory)

Safety: entry names were validated by :func:`runtime.image._cpio.read_newc` (relative, no
``..``, parents declared first, only files and directories); files are created with
``O_EXCL | O_NOFOLLOW`` inside directories we just created, so nothing can be written outside
``root``. Files end up 0444 (0555 if executable) and directories 0555. Sizes are bounded by
the ramdisks, which are bounded by the EIF size limit.

:func:`verify_tree` re-reads an unpacked tree and compares it, entry by entry and byte by byte,
with the ramdisks of the image: same set of names, same types, same modes, same contents, no
symlinks or extra files (a stray ``__pycache__`` would let unmeasured bytecode run).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

from runtime.image._cpio import CpioEntry
from runtime.image._errors import EifFileError, ImageTamperedError

__all__ = [
    "BOOTSTRAP_DIR",
    "APP_DIR",
    "Ramdisks",
    "extract",
    "verify_tree",
    "remove_tree",
    "read_member",
]

#: Subdirectory of an unpacked image holding ramdisk[0].
BOOTSTRAP_DIR: Final = "bootstrap"
#: Subdirectory of an unpacked image holding ramdisk[1].
APP_DIR: Final = "app"
#: Read-only modes of unpacked entries.
_DIR_MODE: Final = 0o555
_EXEC_MODE: Final = 0o555
_FILE_MODE: Final = 0o444


def _expected_mode(entry: CpioEntry) -> int:
    if entry.is_dir:
        return _DIR_MODE
    return _EXEC_MODE if entry.is_executable else _FILE_MODE


#: Parsed ramdisks by the directory they unpack into: ``{"bootstrap": [...], "app": [...]}``.
Ramdisks = Mapping[str, Sequence[CpioEntry]]


def _members(ramdisks: Ramdisks) -> Iterator[tuple[str, CpioEntry]]:
    for top, entries in ramdisks.items():
        for entry in entries:
            yield f"{top}/{entry.name}", entry


def extract(ramdisks: Ramdisks, dest: Path) -> None:
    """Write each parsed ramdisk into ``dest/<key>/`` (``dest`` must not exist or be empty).

    The entries come from :func:`runtime.image._cpio.read_newc`, so both archives were fully
    parsed and validated before the first byte is written.

    Raises:
        EifFileError (E19): ``dest`` is not usable.
    """
    members = list(_members(ramdisks))
    try:
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise EifFileError(
                f"unpack destination {dest} is not empty", info=(str(dest), "Create")
            )
        created_dirs = [dest]
        for top in ramdisks:
            os.mkdir(dest / top, 0o700)
            created_dirs.append(dest / top)
        for rel, entry in members:
            path = dest / rel
            if entry.is_dir:
                os.mkdir(path, 0o700)
                created_dirs.append(path)
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(entry.data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, _expected_mode(entry))
            finally:
                os.close(fd)
        for d in reversed(created_dirs):  # children before parents
            os.chmod(d, _DIR_MODE)
    except OSError as exc:
        raise EifFileError(
            f"cannot unpack the image into {dest}: {exc}", info=(str(dest), "Create")
        ) from exc


def verify_tree(ramdisks: Ramdisks, root: Path) -> None:
    """Check that ``root`` holds exactly what :func:`extract` would write from ``ramdisks``.

    It runs before every warm start, on the start's critical path, so each file costs one
    ``open`` (``O_NOFOLLOW``: a symlink fails it), one ``fstat`` (type, mode, size) and one
    ``read``, and directories are walked with ``scandir``; a file's type comes from that
    ``fstat`` on the opened file, so nothing can swap it between the check and the read.

    Raises:
        ImageTamperedError: any difference (missing, extra, changed, re-moded, symlinked).
    """
    expected: dict[str, CpioEntry] = dict(_members(ramdisks))
    expected_dirs = set(ramdisks)
    seen: set[str] = set()
    try:
        root_st = root.lstat()
    except OSError as exc:
        raise ImageTamperedError(f"unpacked image {root} is not readable: {exc}") from exc
    if not stat.S_ISDIR(root_st.st_mode):
        raise ImageTamperedError(f"unpacked image root {root} is not a directory")
    pending: list[tuple[str, str]] = [(str(root), "")]  # (directory path, its relative name)
    while pending:
        current, rel_dir = pending.pop()
        try:
            with os.scandir(current) as listing:
                found = list(listing)
        except OSError as exc:
            raise ImageTamperedError(f"unpacked image {current} is not readable: {exc}") from exc
        for item in found:
            rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
            entry = expected.get(rel)
            if entry is None and rel not in expected_dirs:
                raise ImageTamperedError(f"unpacked image has an unexpected entry {rel}")
            if entry is None or entry.is_dir:  # a directory: its mode, then what it holds
                st = item.stat(follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    if entry is None:
                        raise ImageTamperedError(f"unpacked image entry {rel} was changed")
                    raise ImageTamperedError(f"unpacked image entry {rel} changed type")
                want = _DIR_MODE if entry is None else _expected_mode(entry)
                if stat.S_IMODE(st.st_mode) != want:
                    if entry is None:
                        raise ImageTamperedError(f"unpacked image entry {rel} was changed")
                    raise ImageTamperedError(f"unpacked image entry {rel} changed mode")
                pending.append((item.path, rel))
            else:
                _check_file(item.path, rel, entry)
            seen.add(rel)
    missing = (expected.keys() | expected_dirs) - seen
    if missing:
        raise ImageTamperedError(f"unpacked image lacks {sorted(missing)[0]}")


def _check_file(path: str, rel: str, entry: CpioEntry) -> None:
    """One regular file of the tree against its entry (see :func:`verify_tree`)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink where a file was unpacked
            raise ImageTamperedError(f"unpacked image entry {rel} changed type") from None
        raise ImageTamperedError(f"unpacked image file {path} is unreadable: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageTamperedError(f"unpacked image entry {rel} changed type")
        if stat.S_IMODE(st.st_mode) != _expected_mode(entry):
            raise ImageTamperedError(f"unpacked image entry {rel} changed mode")
        size = len(entry.data)
        if st.st_size != size or _read_file(fd, size) != entry.data:
            raise ImageTamperedError(f"unpacked image file {rel} was modified")
    finally:
        os.close(fd)


def _read_file(fd: int, size: int) -> bytes:
    """The content of a regular file expected to hold ``size`` bytes, plus one more byte if
    it grew: one ``read`` of ``size + 1`` (short only at the end of the file), continued only
    if a read stops before ``size`` (over 2 GiB, or a signal)."""
    data = os.read(fd, size + 1)
    while len(data) < size:
        more = os.read(fd, size + 1 - len(data))
        if not more:
            break
        data += more
    return data


def read_member(path: Path, *, limit: int) -> bytes:
    """Read one regular file of an unpacked tree: no symlink following, no blocking on a
    FIFO, at most ``limit`` bytes.

    Raises:
        ImageTamperedError: not a regular file, too big, or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageTamperedError(f"unpacked image file {path} is unreadable: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise ImageTamperedError(f"unpacked image entry {path} is not what was unpacked")
        data = _read_file(fd, limit)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ImageTamperedError(f"unpacked image file {path} grew while being read")
    return data


def remove_tree(root: Path) -> None:
    """Delete an unpacked image (its directories are read-only, so plain rmtree fails)."""
    if not root.exists() and not root.is_symlink():
        return
    for current, subdirs, _names in os.walk(root, followlinks=False):
        os.chmod(current, 0o700)
        for d in subdirs:
            p = Path(current, d)
            if not p.is_symlink():
                os.chmod(p, 0o700)
    import shutil

    shutil.rmtree(root)
