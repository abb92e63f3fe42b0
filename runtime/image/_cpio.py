"""Deterministic cpio "newc" archives (the format of Linux initramfs), writer and strict reader.

Theory of operation: a newc archive is a sequence of entries, each a 110-byte ASCII header
(magic ``070701`` then 13 fields of 8 hex digits), the NUL-terminated name padded to a multiple
of 4 bytes, then the data padded to a multiple of 4; the entry named ``TRAILER!!!`` ends it.

The writer is canonical: entries sorted by name (bytewise UTF-8, so a directory always precedes
its contents), every parent directory present as its own entry, inode numbers assigned in
order, mtime 0, uid/gid 0, modes normalised to 0755 (directories, executables) or 0644, no
device numbers. The same tree therefore always gives the same bytes.

The reader only accepts what an enclave image may hold: regular files and directories (no
symlinks, devices, FIFOs or sockets), safe relative names (no ``..``, no absolute paths, no empty
or ``.`` components), each parent declared as a directory before its children, no duplicates,
bounded names and entry counts, and nothing after the trailer but zero padding. It never touches
the filesystem; :mod:`runtime.image._unpack` writes what it returns.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from runtime.image._errors import EifFormatError

__all__ = [
    "CpioEntry",
    "FileSpec",
    "write_newc",
    "archive_from_files",
    "read_newc",
    "validate_name",
    "MAX_ENTRIES",
    "MAX_NAME_BYTES",
]

#: newc magic without CRC (``070702`` is the CRC variant, which we neither write nor accept).
NEWC_MAGIC = b"070701"
#: 6-byte magic + 13 fields x 8 hex digits.
HEADER_SIZE = 110
#: The name of the entry that ends every cpio archive.
TRAILER = "TRAILER!!!"
#: Entries per archive; an app tree with more files than this is almost surely a mistake
#: (a virtualenv or node_modules), and the cap bounds the reader's work on hostile input.
MAX_ENTRIES = 100_000
#: Linux PATH_MAX, including the terminating NUL.
MAX_NAME_BYTES = 4096
#: Linux NAME_MAX, per path component.
MAX_COMPONENT_BYTES = 255
#: Normalised permission bits written for directories and executable files.
MODE_EXEC = 0o755
#: Normalised permission bits written for other regular files.
MODE_PLAIN = 0o644
#: Archives are 4-byte aligned (newc rule).
_ALIGN = 4


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One archive member: a directory (``data`` empty) or a regular file.

    ``mode`` is the full ``st_mode`` (type bits included), as stored in the archive.
    """

    name: str
    mode: int
    data: bytes = field(default=b"", repr=False)

    @property
    def is_dir(self) -> bool:
        """True for a directory entry."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_executable(self) -> bool:
        """True for a regular file with any execute bit."""
        return stat.S_ISREG(self.mode) and bool(self.mode & 0o111)


@dataclass(frozen=True, slots=True)
class FileSpec:
    """A regular file to archive: its bytes and whether it is executable."""

    data: bytes = field(repr=False)
    executable: bool = False


def validate_name(name: str) -> str:
    """Check an archive member name is a safe relative POSIX path; return it.

    Raises:
        EifFormatError: absolute, empty, ``.``/``..`` or empty components, NUL, too long.
    """
    raw = name.encode("utf-8", "surrogateescape")
    if not name or len(raw) + 1 > MAX_NAME_BYTES:
        raise EifFormatError(f"ramdisk entry name is empty or too long ({len(raw)} bytes)")
    if "\0" in name or name.startswith("/"):
        raise EifFormatError(f"ramdisk entry name is not a relative path: {name!r}")
    if name == TRAILER:
        # newc has no escape for it: readers (ours, the kernel's initramfs unpacker) stop there.
        raise EifFormatError(f"ramdisk entry name {TRAILER!r} is reserved (it ends an archive)")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise EifFormatError(f"ramdisk entry name has an unsafe component: {name!r}")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise EifFormatError(f"ramdisk entry name component too long: {name!r}")
    return name


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def _header(ino: int, mode: int, nlink: int, filesize: int, namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, filesize, 0, 0, 0, 0, namesize, 0)
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise entries in the given order (callers sort; see :func:`archive_from_files`).

    Ownership, times and device numbers are always zero; inode numbers count from 1.
    """
    out = bytearray()
    for ino, entry in enumerate(entries, start=1):
        validate_name(entry.name)
        if not (stat.S_ISDIR(entry.mode) or stat.S_ISREG(entry.mode)):
            raise ValueError(f"only files and directories can be archived: {entry.name!r}")
        if entry.is_dir and entry.data:
            raise ValueError(f"directory entry with data: {entry.name!r}")
        out += _entry_bytes(ino, entry.mode, 2 if entry.is_dir else 1, entry.name, entry.data)
    out += _entry_bytes(0, 0, 1, TRAILER, b"")
    return bytes(out)


def _entry_bytes(ino: int, mode: int, nlink: int, name: str, data: bytes) -> bytes:
    raw_name = name.encode("utf-8", "surrogateescape") + b"\0"
    head = _header(ino, mode, nlink, len(data), len(raw_name)) + raw_name
    return head + b"\0" * _pad(len(head)) + data + b"\0" * _pad(len(data))


def archive_from_files(files: Mapping[str, FileSpec], *, dirs: Iterable[str] = ()) -> bytes:
    """Build the canonical archive of a tree given as ``{relative/path: FileSpec}`` plus extra
    (possibly empty) directories.

    Every parent directory gets its own entry; entries are sorted bytewise by UTF-8 name, so
    the result depends only on paths, contents and executable bits.
    """
    all_dirs: set[str] = set()
    for name in dirs:
        validate_name(name)
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            all_dirs.add("/".join(parts[:i]))
    for name in files:
        validate_name(name)
        parts = name.split("/")
        for i in range(1, len(parts)):
            all_dirs.add("/".join(parts[:i]))
    clash = all_dirs & files.keys()
    if clash:
        raise ValueError(f"paths used both as file and directory: {sorted(clash)[:3]}")
    entries = [CpioEntry(d, stat.S_IFDIR | MODE_EXEC) for d in all_dirs]
    for name, spec in files.items():
        perm = MODE_EXEC if spec.executable else MODE_PLAIN
        entries.append(CpioEntry(name, stat.S_IFREG | perm, spec.data))
    entries.sort(key=lambda e: e.name.encode("utf-8", "surrogateescape"))
    return write_newc(entries)


#: A whole newc header: magic and 13 fields of 8 hex digits.
_HEADER_RE: Final = re.compile(rb"070701[0-9A-Fa-f]{104}\Z")


def _header_fields(header: bytes, pos: int) -> list[int]:
    if header[:6] != NEWC_MAGIC:
        raise EifFormatError(f"ramdisk entry at offset {pos} has a bad magic")
    if not _HEADER_RE.match(header):
        raise EifFormatError(f"ramdisk entry at offset {pos} has non-hex header fields")
    return [int(header[i : i + 8], 16) for i in range(6, HEADER_SIZE, 8)]


def read_newc(data: bytes, *, max_entries: int = MAX_ENTRIES) -> list[CpioEntry]:
    """Parse and validate a newc archive (see the module docstring for the rules).

    Work is linear in ``len(data)``; every length is checked against the bytes left before use.

    Raises:
        EifFormatError: anything not matching the rules.
    """
    view = memoryview(data)
    pos = 0
    entries: list[CpioEntry] = []
    seen: dict[str, bool] = {}  # name -> is_dir
    while True:
        if len(entries) > max_entries:
            raise EifFormatError(f"ramdisk has more than {max_entries} entries")
        if pos + HEADER_SIZE > len(data):
            raise EifFormatError("ramdisk is truncated (no trailer)")
        fields = _header_fields(bytes(view[pos : pos + HEADER_SIZE]), pos)
        mode, filesize, namesize, check = fields[1], fields[6], fields[11], fields[12]
        if check != 0:
            raise EifFormatError("ramdisk entry has a non-zero check field")
        if not 2 <= namesize <= MAX_NAME_BYTES:
            raise EifFormatError(f"ramdisk entry name size {namesize} out of range")
        name_start = pos + HEADER_SIZE
        name_end = name_start + namesize
        if name_end > len(data):
            raise EifFormatError("ramdisk is truncated inside an entry name")
        raw_name = bytes(view[name_start:name_end])
        if raw_name[-1] != 0 or 0 in raw_name[:-1]:
            raise EifFormatError("ramdisk entry name is not NUL-terminated")
        try:
            name = raw_name[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise EifFormatError("ramdisk entry name is not UTF-8") from None
        data_start = name_end + _pad(HEADER_SIZE + namesize)
        data_end = data_start + filesize
        if data_end > len(data):
            raise EifFormatError(f"ramdisk entry {name!r} is truncated")
        pos = data_end + _pad(filesize)
        if name == TRAILER:
            break
        validate_name(name)
        if mode & 0o7000:
            raise EifFormatError(f"ramdisk entry {name!r} has setuid/setgid/sticky bits")
        if stat.S_ISDIR(mode):
            if filesize:
                raise EifFormatError(f"ramdisk directory {name!r} has data")
        elif not stat.S_ISREG(mode):
            raise EifFormatError(
                f"ramdisk entry {name!r} is not a regular file or directory (mode {mode:o})"
            )
        if name in seen:
            raise EifFormatError(f"ramdisk entry {name!r} appears twice")
        parent, _, _ = name.rpartition("/")
        if parent and seen.get(parent) is not True:
            raise EifFormatError(f"ramdisk entry {name!r} comes before its parent directory")
        seen[name] = stat.S_ISDIR(mode)
        entries.append(CpioEntry(name, mode, bytes(view[data_start:data_end])))
    if any(view[min(pos, len(data)) :]):
        raise EifFormatError("ramdisk has data after its trailer")
    return entries
