"""The audit log: append-only JSON lines, MAC-chained under a key derived from the master key.

Each line is a JSON object with the request's facts (``time``, ``principal``, ``operation``,
``key_id``, ``decision``, ``reason``, ``error``, ``recipient``…) plus:

* ``seq``: 1-based line number of the chain;
* ``prev``: the ``mac`` of the previous line (64 zeros for the first);
* ``mac``: hex HMAC-SHA256, under the master key's audit subkey (:mod:`kms.integrity`), of
  ``prev`` ‖ ``"\\n"`` ‖ the canonical JSON (sorted keys, no spaces, ASCII) of the line without
  its ``mac`` member.

Without the master key nobody can write a line that verifies, so editing, deleting, inserting or
reordering lines, even with every later MAC recomputed, breaks the chain at the first affected
line, which :func:`verify_audit_log` names. Truncating the *end* of the file cannot be detected
from the file alone: the daemon logs the last MAC at shutdown (``kms_audit_closed``).

At open, :class:`AuditLog` checks the chain's tail (the last :data:`TAIL_CHECK_BYTES`) and
refuses a broken one: a second writer or an edit behind the daemon's back is found before a new
line is chained onto it.

Logs of schema 1 (unkeyed SHA-256 ``hash`` chains, before the MAC) are moved aside at the first
start of a daemon that knows schema 2 and remain checkable with :func:`verify_legacy_audit_log`;
the new chain's first line records the old file's name, line count and last hash.

Several writers, one chain. Every append holds an exclusive ``flock`` on the file while it
links and writes its line; if the file grew since this writer's last line (another worker
process of the same daemon appended), the chain state (``seq``, ``prev``) is taken from the
file's last line, whose MAC is checked first: nothing is ever chained onto a line that is not
ours. So worker processes share ONE valid chain without routing appends through one process
(each append costs two ``flock`` calls and an ``fstat``, ~3 us; reading a foreign tail ~15 us).
A line without its newline at the end of the file can only be a writer's that died mid-line
(never acknowledged): the next writer, or the next start, cuts it off and records it, base64,
in an ``AuditTornLine`` record of the chain, so nothing is dropped unseen.

Durability. A line is written with one ``write`` (a crashed process loses nothing it
acknowledged). With ``fsync=True`` (the daemon's default), :meth:`AuditLog.commit` also waits
until the line is on disk, by group commit (:class:`kms.group_commit.GroupCommit`): one
``fdatasync`` covers every line written before it started, so concurrent requests share syncs
and the reply to each is still sent only after its own line is durable.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import structlog

from .errors import AuditChainError
from .group_commit import GroupCommit
from .integrity import GENESIS_MAC, MasterKey

__all__ = [
    "AuditSink",
    "chain_line",
    "check_line",
    "GENESIS",
    "MAX_LINE_BYTES",
    "TAIL_CHECK_BYTES",
    "AuditLog",
    "verify_audit_log",
    "verify_legacy_audit_log",
    "is_legacy_audit_log",
]

log = structlog.get_logger()

#: ``prev`` of the first line.
GENESIS = GENESIS_MAC
#: A line longer than this is not one of ours (bounded reads during verification and resume).
MAX_LINE_BYTES = 64 * 1024
#: How much of the end of the log is re-verified at every start (~1,000 lines: a few ms).
TAIL_CHECK_BYTES = 256 * 1024
#: Commits' ``fdatasync`` runs in the event loop while it averages at most this (seconds), else
#: in a worker thread (kms.group_commit). An audit line's sync takes 0.15-0.3 ms on a healthy
#: disk here, and the hand-off to a thread and back adds ~0.15 ms to each commit. Inline, the
#: loop stops for the sync, which is what this bounds: 2 ms on average (and 8 ms for any one
#: sync) before a slow disk moves the syncs to the thread.
INLINE_SYNC_MAX_S = 0.002


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _records(f: BinaryIO, first_line: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each complete line, bounded; AuditChainError otherwise."""
    for n, raw in enumerate(f, start=first_line):
        if len(raw) > MAX_LINE_BYTES:
            raise AuditChainError(n, "line too long")
        if not raw.endswith(b"\n"):
            raise AuditChainError(n, "incomplete last line")
        try:
            rec = json.loads(raw)
        except ValueError:
            raise AuditChainError(n, "not JSON") from None
        if not isinstance(rec, dict):
            raise AuditChainError(n, "not a JSON object")
        yield n, rec


class AuditSink(Protocol):
    """Where a daemon's audit records go: a file (:class:`AuditLog`) or the PostgreSQL store's
    chain (:class:`kms.pg.audit.PgAuditLog`). Both chain records the same way
    (:func:`chain_line`)."""

    @property
    def last_hash(self) -> str:
        """MAC of the last line this instance wrote or read."""
        ...

    @property
    def lines(self) -> int:
        """Sequence number of the last line this instance wrote or read."""
        ...

    def append(self, record: Mapping[str, Any]) -> str:
        """Append one record now (blocking; start-up records). Returns its MAC."""
        ...

    async def commit(self, record: Mapping[str, Any]) -> str:
        """Append one record; return once it is durable (group commit). Returns its MAC."""
        ...

    def close(self) -> None:
        """Release the sink (idempotent)."""
        ...


def chain_line(
    master: MasterKey, seq: int, prev: str, record: Mapping[str, Any]
) -> tuple[bytes, str]:
    """Chain ``record`` as line ``seq`` after the line whose MAC is ``prev``: the canonical line
    (without its newline) and its MAC. The chain fields of ``record`` itself are ignored."""
    body = {k: v for k, v in record.items() if k not in ("seq", "prev", "mac", "hash")}
    body["seq"] = seq
    body["prev"] = prev
    mac = master.audit_mac(prev, _canonical(body))
    body["mac"] = mac
    return _canonical(body), mac


def check_line(master: MasterKey, n: int, rec: dict[str, Any], prev: str | None) -> str:
    """Check one parsed line (``prev`` None: any predecessor, tail mode); ``rec`` loses its
    ``mac`` member. Returns the MAC.

    Raises:
        AuditChainError: the line is not one of ours, or not linked to ``prev``.
    """
    return _check_line(master, n, rec, prev)


def _check_line(master: MasterKey, n: int, rec: dict[str, Any], prev: str | None) -> str:
    """Check one line (``prev`` None: any predecessor, tail mode). Returns its MAC."""
    claimed = rec.pop("mac", None)
    if not isinstance(claimed, str):
        if "hash" in rec:
            raise AuditChainError(n, "an unkeyed (schema 1) line inside a keyed chain")
        raise AuditChainError(n, "no mac")
    if prev is not None and rec.get("prev") != prev:
        raise AuditChainError(n, "prev does not match the previous line's mac")
    if not isinstance(rec.get("prev"), str):
        raise AuditChainError(n, "no prev")
    if not master.audit_mac_ok(rec["prev"], _canonical(rec), claimed):
        raise AuditChainError(n, "mac does not match the line's content (edited, or not ours)")
    return claimed


def verify_audit_log(path: Path, master: MasterKey) -> int:
    """Check the whole chain with the master key. Returns the number of lines.

    Raises:
        AuditChainError: ``.line`` is the 1-based number of the first broken line.
        OSError: the file cannot be read.
    """
    prev = GENESIS
    n = 0
    with path.open("rb") as f:
        for n, rec in _records(f, 1):
            if rec.get("seq") != n:
                raise AuditChainError(n, f"sequence number {rec.get('seq')!r}, expected {n}")
            prev = _check_line(master, n, rec, prev)
    return n


def _legacy_hash(prev: str, record_without_hash: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + b"\n" + _canonical(record_without_hash)).hexdigest()


def is_legacy_audit_log(path: Path) -> bool:
    """True if the first line of ``path`` is a schema-1 (unkeyed ``hash``) line."""
    try:
        with path.open("rb") as f:
            first = f.readline(MAX_LINE_BYTES)
    except FileNotFoundError:
        return False
    try:
        rec = json.loads(first)
    except ValueError:
        return False
    return isinstance(rec, dict) and "hash" in rec and "mac" not in rec


def verify_legacy_audit_log(path: Path) -> tuple[int, str]:
    """Check a schema-1 chain (unkeyed SHA-256: proves order, not authorship).

    Returns:
        (number of lines, last hash).
    """
    prev = GENESIS
    n = 0
    with path.open("rb") as f:
        for n, rec in _records(f, 1):
            claimed = rec.pop("hash", None)
            if rec.get("seq") != n:
                raise AuditChainError(n, f"sequence number {rec.get('seq')!r}, expected {n}")
            if rec.get("prev") != prev:
                raise AuditChainError(n, "prev does not match the previous line's hash")
            if claimed != _legacy_hash(prev, rec):
                raise AuditChainError(n, "hash does not match the line's content")
            prev = claimed
    return n, prev


class AuditLog:
    """Appends MAC-chained records to a file; any number of instances and processes may append
    to one file (see the module docstring). An instance is used from one thread (its
    process's event loop).

    Raises (at open):
        AuditChainError: the tail of the existing chain does not verify.
    """

    def __init__(self, path: Path, master: MasterKey, *, fsync: bool = False) -> None:
        self.path = path
        self._master = master
        self._fsync = fsync
        self._prev = GENESIS
        self._seq = 0
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with self._locked():
                size, torn = _cut_torn_line(self._fd, os.fstat(self._fd).st_size)
                self._end = size
                if size:
                    self._seq, self._prev = _verify_tail(path, master)
                if torn is not None:
                    self._link_and_write(_torn_record(torn), size)
        except BaseException:
            os.close(self._fd)
            raise
        self._group = GroupCommit(
            partial(os.fdatasync, self._fd), inline_max_s=INLINE_SYNC_MAX_S
        )

    @property
    def last_hash(self) -> str:
        """MAC of the last line this instance wrote or read."""
        return self._prev

    @property
    def lines(self) -> int:
        """Sequence number of the last line this instance wrote or read."""
        return self._seq

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Blocking is fine: the holder only links one line and writes it (microseconds).
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _write(self, record: Mapping[str, Any]) -> str:
        with self._locked():
            size = os.fstat(self._fd).st_size
            if size != self._end:  # another writer appended since our last line
                size, torn = _cut_torn_line(self._fd, size)
                self._seq, self._prev = (
                    _last_line(self._fd, size, self._master) if size else (0, GENESIS)
                )
                if torn is not None:
                    size = self._link_and_write(_torn_record(torn), size)
            self._link_and_write(record, size)
        return self._prev

    def _link_and_write(self, record: Mapping[str, Any], size: int) -> int:
        """Under the lock, the file being ``size`` bytes ending with our chain state: chain
        ``record`` and write it. Returns the new size."""
        text, mac = chain_line(self._master, self._seq + 1, self._prev, record)
        line = text + b"\n"
        try:
            written = os.write(self._fd, line)
        except OSError:
            _truncate_to(self._fd, size)  # nothing of a failed line may stay
            raise
        if written != len(line):  # disk full mid-line: take the partial line back
            _truncate_to(self._fd, size)
            raise OSError(errno.ENOSPC, f"short write to the audit log {self.path}")
        self._end = size + written
        self._prev, self._seq = mac, self._seq + 1
        return self._end

    def append(self, record: Mapping[str, Any]) -> str:
        """Append one record (its values must be JSON-serialisable), synchronously durable
        with ``fsync``. Returns the line's MAC."""
        mac = self._write(record)
        if self._fsync:
            os.fdatasync(self._fd)
        return mac

    async def commit(self, record: Mapping[str, Any]) -> str:
        """Append one record and, with ``fsync``, return once it is on disk (group commit:
        concurrent commits share one ``fdatasync``). Returns the line's MAC.

        Raises:
            OSError: the line could not be written or synced (a failed sync also fails every
                later commit: the kernel may have dropped the unsynced pages).
        """
        mac = self._write(record)
        if self._fsync:
            await self._group.durable(self._group.wrote())
        return mac

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _truncate_to(fd: int, size: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, size)


#: First read when taking the chain state from another writer's line (lines are ~0.5-1 KiB).
_TAIL_READ = 4096


def _cut_torn_line(fd: int, size: int) -> tuple[int, bytes | None]:
    """Under the lock: if the file does not end with a newline, a writer died mid-line (a
    SIGKILL between two pages of its ``write``, a crash): that line was never acknowledged.
    Cut it off and return it, to be recorded in the chain (:func:`_torn_record`) rather than
    lost. Returns (new size, the torn bytes or None)."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size, None
    start = max(0, size - MAX_LINE_BYTES)
    data = os.pread(fd, size - start, start)
    cut = data.rfind(b"\n")
    if cut < 0 and start > 0:
        raise AuditChainError(-1, "the last line is too long")
    keep = start + cut + 1
    os.ftruncate(fd, keep)
    torn = data[cut + 1 :]
    log.error(
        "kms_audit_torn_line_removed",
        bytes=len(torn),
        sha256=hashlib.sha256(torn).hexdigest(),
        meaning="a writer died in the middle of a line (never acknowledged); the line is kept "
        "in the chain's next record (AuditTornLine)",
    )
    return keep, torn


def _torn_record(torn: bytes) -> dict[str, Any]:
    return {
        "operation": "AuditTornLine",
        "decision": "error",
        "reason": "an incomplete last line (a writer died mid-line) was cut off and is kept here",
        "torn_bytes": len(torn),
        "torn_b64": base64.b64encode(torn).decode("ascii"),
    }


def _last_line(fd: int, size: int, master: MasterKey) -> tuple[int, str]:
    """(seq, mac) of the file's last line, whose MAC is checked (not its link: the line before
    it was checked by whoever appended after it, or at the last start)."""
    window = _TAIL_READ
    while True:
        start = max(0, size - window)
        data = os.pread(fd, size - start, start)
        cut = data.rfind(b"\n", 0, len(data) - 1)
        if cut >= 0 or start == 0:
            break
        if window > MAX_LINE_BYTES:
            raise AuditChainError(-1, "the last line is too long")
        window *= 4
    raw = data[cut + 1 :]
    try:
        rec = json.loads(raw)
    except ValueError:
        raise AuditChainError(-1, "the last line is not JSON") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
        raise AuditChainError(-1, "the last line is not one of ours")
    seq = int(rec["seq"])
    return seq, _check_line(master, seq, rec, None)


def _verify_tail(path: Path, master: MasterKey) -> tuple[int, str]:
    """Check the chain's last :data:`TAIL_CHECK_BYTES`: each line's MAC, the links between
    them and consecutive sequence numbers. Returns (last seq, last mac)."""
    seq, prev = 0, GENESIS
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return seq, prev
        start = max(0, size - TAIL_CHECK_BYTES)
        f.seek(start)
        if start:
            f.readline()  # a partial line: the check starts at the next whole one
        expected_prev: str | None = GENESIS if start == 0 else None
        expected_seq: int | None = 1 if start == 0 else None
        for n, rec in _records(f, 1):
            line_seq = rec.get("seq")
            if not isinstance(line_seq, int) or (
                expected_seq is not None and line_seq != expected_seq
            ):
                raise AuditChainError(
                    line_seq if isinstance(line_seq, int) else -n,
                    f"sequence number {line_seq!r}, expected {expected_seq}",
                )
            prev = _check_line(master, line_seq, rec, expected_prev)
            seq, expected_prev, expected_seq = line_seq, prev, line_seq + 1
    return seq, prev
