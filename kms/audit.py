"""The audit log: append-only JSON lines, hash-chained, one line per request.

Each line is a JSON object with the request's facts (``time``, ``principal``, ``operation``,
``key_id``, ``decision``, ``reason``, ``error``, ``recipient``…) plus:

* ``seq``: 1-based line number of the chain;
* ``prev``: the ``hash`` of the previous line (64 zeros for the first);
* ``hash``: hex SHA-256 of ``prev`` ‖ ``"\\n"`` ‖ the canonical JSON (sorted keys, no spaces,
  ASCII) of the line without its ``hash`` member.

Editing, deleting, inserting or reordering lines breaks the chain at the first affected line,
which :func:`verify_audit_log` names. (Truncating the *end* of the file cannot be detected from
the file alone; keep the last hash elsewhere if that matters - the daemon logs it at shutdown.)
Lines are written with one ``write`` each and flushed to the OS, so a crashed daemon loses
nothing it acknowledged; ``fsync=True`` also survives power loss.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from .errors import AuditChainError

__all__ = ["GENESIS", "AuditLog", "verify_audit_log", "line_hash"]

#: ``prev`` of the first line.
GENESIS = "0" * 64
#: A line longer than this is not one of ours (bounded reads during verification and resume).
MAX_LINE_BYTES = 64 * 1024


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def line_hash(prev: str, record_without_hash: Mapping[str, Any]) -> str:
    """The chain hash of one line."""
    return hashlib.sha256(prev.encode() + b"\n" + _canonical(record_without_hash)).hexdigest()


def _last_line(path: Path) -> bytes | None:
    """The last complete line of ``path`` (None if empty). Reads at most MAX_LINE_BYTES."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return None
        f.seek(max(0, size - MAX_LINE_BYTES))
        tail = f.read()
    if not tail.endswith(b"\n"):
        raise AuditChainError(-1, "the audit log ends with an incomplete line")
    lines = tail[:-1].split(b"\n")
    return lines[-1]


class AuditLog:
    """Appends chained records to a file. Not thread-safe: one writer (the daemon's loop)."""

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = path
        self._fsync = fsync
        self._prev = GENESIS
        self._seq = 0
        if path.exists():
            last = _last_line(path)
            if last is not None:
                try:
                    rec = json.loads(last)
                    self._prev, self._seq = str(rec["hash"]), int(rec["seq"])
                except (ValueError, KeyError, TypeError):
                    raise AuditChainError(
                        -1, "the last audit line is not a chained record"
                    ) from None
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file: TextIO = os.fdopen(fd, "a", encoding="ascii", newline="\n")

    @property
    def last_hash(self) -> str:
        """Hash of the last line written (or of the file's last line at open)."""
        return self._prev

    def append(self, record: Mapping[str, Any]) -> str:
        """Append one record (its values must be JSON-serialisable). Returns the line's hash."""
        body = {k: v for k, v in record.items() if k not in ("seq", "prev", "hash")}
        body["seq"] = self._seq + 1
        body["prev"] = self._prev
        digest = line_hash(self._prev, body)
        body["hash"] = digest
        self._file.write(_canonical(body).decode() + "\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self._prev, self._seq = digest, self._seq + 1
        return digest

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def verify_audit_log(path: Path) -> int:
    """Check the whole chain. Returns the number of lines.

    Raises:
        AuditChainError: ``.line`` is the 1-based number of the first broken line.
        OSError: the file cannot be read.
    """
    prev = GENESIS
    n = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
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
            claimed = rec.pop("hash", None)
            if rec.get("seq") != n:
                raise AuditChainError(n, f"sequence number {rec.get('seq')!r}, expected {n}")
            if rec.get("prev") != prev:
                raise AuditChainError(n, "prev does not match the previous line's hash")
            if claimed != line_hash(prev, rec):
                raise AuditChainError(n, "hash does not match the line's content")
            prev = claimed
    return n
