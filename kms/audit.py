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

Lines are written with one ``write`` each and flushed to the OS, so a crashed daemon loses
nothing it acknowledged; ``fsync=True`` also survives power loss.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from .errors import AuditChainError
from .integrity import GENESIS_MAC, MasterKey

__all__ = [
    "GENESIS",
    "MAX_LINE_BYTES",
    "TAIL_CHECK_BYTES",
    "AuditLog",
    "verify_audit_log",
    "verify_legacy_audit_log",
    "is_legacy_audit_log",
]

#: ``prev`` of the first line.
GENESIS = GENESIS_MAC
#: A line longer than this is not one of ours (bounded reads during verification and resume).
MAX_LINE_BYTES = 64 * 1024
#: How much of the end of the log is re-verified at every start (~1,000 lines: a few ms).
TAIL_CHECK_BYTES = 256 * 1024


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
    """Appends MAC-chained records to a file. Not thread-safe: one writer (the daemon's loop).

    Raises (at open):
        AuditChainError: the tail of the existing chain does not verify.
    """

    def __init__(self, path: Path, master: MasterKey, *, fsync: bool = False) -> None:
        self.path = path
        self._master = master
        self._fsync = fsync
        self._prev = GENESIS
        self._seq = 0
        if path.exists():
            self._seq, self._prev = _verify_tail(path, master)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file: TextIO = os.fdopen(fd, "a", encoding="ascii", newline="\n")

    @property
    def last_hash(self) -> str:
        """MAC of the last line written (or of the file's last line at open)."""
        return self._prev

    @property
    def lines(self) -> int:
        """Sequence number of the last line."""
        return self._seq

    def append(self, record: Mapping[str, Any]) -> str:
        """Append one record (its values must be JSON-serialisable). Returns the line's MAC."""
        body = {k: v for k, v in record.items() if k not in ("seq", "prev", "mac", "hash")}
        body["seq"] = self._seq + 1
        body["prev"] = self._prev
        mac = self._master.audit_mac(self._prev, _canonical(body))
        body["mac"] = mac
        self._file.write(_canonical(body).decode() + "\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self._prev, self._seq = mac, self._seq + 1
        return mac

    def close(self) -> None:
        """Close the file."""
        self._file.close()


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
