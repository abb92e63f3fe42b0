"""The audit chain in the PostgreSQL store: one keyed chain, any number of daemons appending.

The lines are the file backend's lines (:func:`kms.audit.chain_line`: ``seq``, ``prev``, ``mac``
over the canonical JSON, under the master key's audit subkey), one row each in
``kms_audit_log``; ``kms_audit_head`` holds the chain's last ``seq`` and ``mac``. The database
operator can read the lines (they are not secret: no key material, no plaintext) but cannot
forge, edit, insert or reorder one without breaking the chain at that line.

Appending (:class:`PgAuditLog`), by group commit: a daemon's concurrent requests queue their
records and one transaction at a time chains and inserts the whole queue, so one commit (one
WAL flush, with ``synchronous_commit`` on) covers a batch, and each request's reply waits until
the transaction holding its line has committed. The common case is ONE statement: insert the
batch and move the head only if the head is still where this daemon last left it (a
compare-and-set in a data-modifying CTE). If another daemon appended meanwhile, the daemon
locks the head row (``SELECT ... FOR UPDATE``, so appenders queue on it), checks the MAC of the
other daemon's last line (nothing is ever chained onto a line that is not ours), re-chains its
batch after it and commits. So several daemons keep ONE valid chain.

At open the chain's tail (the last :data:`TAIL_CHECK_ROWS` lines and the head) is verified and
a broken one refused, as for the file (``--start-despite-broken-audit-chain`` starts a new
chain, numbered one higher, whose first line names the break; the broken rows stay).
:func:`verify_pg_audit` checks a whole chain, streaming it (bounded memory).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
import trio
from psycopg.rows import TupleRow

from transport.errors import ConfigurationError

from ..audit import GENESIS, MAX_LINE_BYTES, chain_line, check_line
from ..errors import AuditChainError
from ..integrity import MasterKey
from ..storage import StoreUnavailable
from ._connect import PgConnection
from .schema import schema_version

__all__ = ["TAIL_CHECK_ROWS", "AuditHead", "PgAuditLog", "read_head", "verify_pg_audit"]

log = structlog.get_logger()

#: Lines re-verified at every start (the file backend's 256 KiB tail is ~1,000 lines too).
TAIL_CHECK_ROWS = 1000
#: Rows fetched per round trip while verifying a whole chain.
_VERIFY_BATCH = 1000
#: A row's line as read: at most one character past the limit (a planted huge row is refused
#: as too long without being fetched whole).
_LINE = f"left(line, {MAX_LINE_BYTES + 1})"
#: The schema version that added the audit tables.
_AUDIT_SCHEMA = 2

_Conn = psycopg.Connection[TupleRow]


@dataclass(frozen=True, slots=True)
class AuditHead:
    """Where a chain ends: its number, last sequence number and last MAC."""

    chain: int
    seq: int
    mac: str


def read_head(c: _Conn) -> AuditHead:
    """The head row as stored (not verified)."""
    row = c.execute("SELECT chain, seq, mac FROM kms_audit_head").fetchone()
    if row is None:
        raise AuditChainError(0, "the audit head row is missing")
    return AuditHead(int(row[0]), int(row[1]), str(row[2]))


def _parse(seq: int, line: str) -> dict[str, Any]:
    if len(line) > MAX_LINE_BYTES:
        raise AuditChainError(seq, "line too long")
    try:
        rec = json.loads(line)
    except ValueError:
        raise AuditChainError(seq, "not JSON") from None
    if not isinstance(rec, dict):
        raise AuditChainError(seq, "not a JSON object")
    if rec.get("seq") != seq:
        raise AuditChainError(seq, f"sequence number {rec.get('seq')!r} in row {seq}")
    return rec


def _verify_tail(c: _Conn, master: MasterKey) -> AuditHead:
    """Check the last :data:`TAIL_CHECK_ROWS` lines of the current chain against each other
    and against the head, from one snapshot (other daemons may be appending). Returns the
    head."""
    with c.transaction():
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return _verify_tail_in(c, master)


def _verify_tail_in(c: _Conn, master: MasterKey) -> AuditHead:
    head = read_head(c)
    first = max(1, head.seq - TAIL_CHECK_ROWS + 1)
    rows = c.execute(
        f"SELECT seq, {_LINE} FROM kms_audit_log WHERE chain = %s AND seq >= %s ORDER BY seq",
        (head.chain, first),
    ).fetchall()
    expected_seq = first
    prev: str | None = GENESIS if first == 1 else None
    mac = GENESIS
    for seq_value, line in rows:
        seq = int(seq_value)
        if seq > head.seq:
            raise AuditChainError(seq, f"a line past the chain's head (line {head.seq})")
        if seq != expected_seq:
            raise AuditChainError(expected_seq, "line missing")
        mac = check_line(master, seq, _parse(seq, str(line)), prev)
        prev, expected_seq = mac, seq + 1
    if expected_seq != head.seq + 1:
        raise AuditChainError(expected_seq, f"line missing (the head says {head.seq} lines)")
    if mac != head.mac:
        raise AuditChainError(head.seq, "the head's MAC is not the last line's")
    return head


def verify_pg_audit(url: str, master: MasterKey, chain: int | None = None) -> tuple[int, int]:
    """Check a whole chain in the database (default: the current one): every line's MAC, the
    links, consecutive sequence numbers from 1, and, for the current chain, the head.

    Returns:
        (chain number, number of lines).

    Raises:
        AuditChainError: ``.line`` is the first broken line.
        ConfigurationError: the database cannot be reached or refuses us.
        StoreUnavailable: the database went away during the check.
    """
    db = PgConnection(url, "audit-verify")
    db.connect()

    def check(c: _Conn) -> tuple[int, int]:
        with c.transaction():
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if schema_version(c) < _AUDIT_SCHEMA:
                raise ConfigurationError(f"{db.shown} holds no key store audit chain")
            head = read_head(c)
            number = head.chain if chain is None else chain
            n, prev = 0, GENESIS
            with c.cursor(name="kms_audit_verify") as cur:
                cur.itersize = _VERIFY_BATCH
                cur.execute(
                    f"SELECT seq, {_LINE} FROM kms_audit_log WHERE chain = %s ORDER BY seq",
                    (number,),
                )
                for seq_value, line in cur:
                    seq = int(seq_value)
                    if seq != n + 1:
                        raise AuditChainError(n + 1, "line missing")
                    prev = check_line(master, seq, _parse(seq, str(line)), prev)
                    n = seq
            if number == head.chain:
                if head.seq != n:
                    raise AuditChainError(
                        min(n, head.seq) + 1, f"the head says {head.seq} lines, the log has {n}"
                    )
                if head.mac != prev:
                    raise AuditChainError(n, "the head's MAC is not the last line's")
            return number, n

    try:
        return db.run(check)
    finally:
        db.close()


@dataclass(slots=True)
class _Slot:
    record: Mapping[str, Any]
    mac: str | None = None
    error: str | None = None
    timeout: bool = False


class PgAuditLog:
    """Appends to the database's audit chain (see the module docstring); one instance per
    daemon process, used from its event loop.

    Args:
        url: the database URL.
        master: the master key (the audit subkey chains the lines).
        fsync: commits wait for the WAL flush (``synchronous_commit``); False: they do not
            (``audit_fsync = false``: a crash of the database server may lose the last lines).
        check_tail: verify the chain's tail first (False only to start a new chain past a
            broken one, :meth:`restart_chain`).

    Raises (at open):
        AuditChainError: the chain's tail does not verify.
        ConfigurationError: the database cannot be reached or refuses us.
    """

    def __init__(
        self, url: str, master: MasterKey, *, fsync: bool = True, check_tail: bool = True
    ) -> None:
        self._master = master
        self._db = PgConnection(url, "audit", synchronous_commit=fsync)
        self._db.connect()
        self.shown = self._db.shown
        try:
            self._head = self._db.run(
                lambda c: _verify_tail(c, master) if check_tail else read_head(c)
            )
        except BaseException:
            self._db.close()
            raise
        self._pending: list[_Slot] = []
        self._running: trio.Event | None = None
        #: Transactions that committed a batch (tests, benchmarks).
        self.batches = 0

    @property
    def chain(self) -> int:
        """The chain number this instance appends to."""
        return self._head.chain

    @property
    def last_hash(self) -> str:
        return self._head.mac

    @property
    def lines(self) -> int:
        return self._head.seq

    # ------------------------------------------------------------ the append transaction

    def _chain(
        self, head: AuditHead, records: Sequence[Mapping[str, Any]]
    ) -> tuple[list[int], list[str], list[str], AuditHead]:
        """Chain ``records`` after ``head``: their seqs, lines, MACs and the new head."""
        seqs, lines, macs = [], [], []
        seq, mac = head.seq, head.mac
        for record in records:
            seq += 1
            text, mac = chain_line(self._master, seq, mac, record)
            seqs.append(seq)
            lines.append(text.decode("ascii"))
            macs.append(mac)
        return seqs, lines, macs, AuditHead(head.chain, seq, mac)

    def _append_fast(
        self, c: _Conn, records: Sequence[Mapping[str, Any]]
    ) -> tuple[AuditHead, list[str]] | None:
        """One statement: insert the batch if the head is still ours. None if it moved."""
        old = self._head
        seqs, lines, macs, new = self._chain(old, records)
        cur = c.execute(
            "WITH h AS (UPDATE kms_audit_head SET seq = %s, mac = %s "
            "WHERE chain = %s AND seq = %s AND mac = %s RETURNING 1) "
            "INSERT INTO kms_audit_log (chain, seq, line) "
            "SELECT %s, s, l FROM unnest(%s::bigint[], %s::text[]) AS t(s, l) "
            "WHERE EXISTS (SELECT 1 FROM h)",
            (new.seq, new.mac, old.chain, old.seq, old.mac, old.chain, seqs, lines),
        )
        return (new, macs) if cur.rowcount == len(records) else None

    def _append_locked(
        self, c: _Conn, records: Sequence[Mapping[str, Any]]
    ) -> tuple[AuditHead, list[str]]:
        """Another daemon appended: lock the head, check its last line, chain after it."""
        with c.transaction():
            row = c.execute("SELECT chain, seq, mac FROM kms_audit_head FOR UPDATE").fetchone()
            if row is None:
                raise AuditChainError(0, "the audit head row is missing")
            head = AuditHead(int(row[0]), int(row[1]), str(row[2]))
            if head.seq:
                got = c.execute(
                    f"SELECT {_LINE} FROM kms_audit_log WHERE chain = %s AND seq = %s",
                    (head.chain, head.seq),
                ).fetchone()
                if got is None:
                    raise AuditChainError(head.seq, "the head's line is missing")
                mac = check_line(self._master, head.seq, _parse(head.seq, str(got[0])), None)
                if mac != head.mac:
                    raise AuditChainError(head.seq, "the head's MAC is not its line's")
            elif head.mac != GENESIS:
                raise AuditChainError(0, "an empty chain's head is not the genesis")
            if head.chain != self._head.chain:
                log.warning("kms_audit_chain_followed", chain=head.chain, previous=self._head.chain)
            seqs, lines, macs, new = self._chain(head, records)
            c.execute(
                "INSERT INTO kms_audit_log (chain, seq, line) "
                "SELECT %s, s, l FROM unnest(%s::bigint[], %s::text[]) AS t(s, l)",
                (head.chain, seqs, lines),
            )
            c.execute("UPDATE kms_audit_head SET seq = %s, mac = %s", (new.seq, new.mac))
            return new, macs

    def _commit_now(self, records: Sequence[Mapping[str, Any]]) -> list[str]:
        """Blocking: commit ``records`` as the next lines of the chain; returns their MACs."""

        def go(c: _Conn) -> tuple[AuditHead, list[str]]:
            done = self._append_fast(c, records)
            return done if done is not None else self._append_locked(c, records)

        self._head, macs = self._db.run(go)
        self.batches += 1
        return macs

    # ------------------------------------------------------------ the face

    def append(self, record: Mapping[str, Any]) -> str:
        return self._commit_now([record])[0]

    def restart_chain(self, reason: Mapping[str, Any]) -> int:
        """Start a new chain (numbered one higher) past a broken one, its first line
        ``reason``; the broken chain's rows stay. Returns the new chain's number."""

        def go(c: _Conn) -> AuditHead:
            with c.transaction():
                row = c.execute(
                    "UPDATE kms_audit_head SET chain = chain + 1, seq = 0, mac = %s "
                    "RETURNING chain",
                    (GENESIS,),
                ).fetchone()
                assert row is not None
                return AuditHead(int(row[0]), 0, GENESIS)

        self._head = self._db.run(go)
        self.append(dict(reason, previous_chain=self._head.chain - 1))
        return self._head.chain

    async def commit(self, record: Mapping[str, Any]) -> str:
        """Append ``record``; return once the transaction holding its line has committed
        (group commit: concurrent commits share one transaction).

        Raises:
            StoreUnavailable: the database is unreachable or timed out (the line may or may not
                be in the chain; the request is not acknowledged).
            AuditChainError: the chain in the database does not continue ours (tampering).
        """
        slot = _Slot(record)
        self._pending.append(slot)
        while slot.mac is None and slot.error is None:
            running = self._running
            if running is not None:
                await running.wait()
                continue
            batch, self._pending = self._pending, []
            done = self._running = trio.Event()
            try:
                macs = await trio.to_thread.run_sync(self._commit_now, [s.record for s in batch])
                for s, mac in zip(batch, macs, strict=True):
                    s.mac = mac
            except (StoreUnavailable, AuditChainError, psycopg.Error) as exc:
                for s in batch:
                    s.error = str(exc)
                    s.timeout = isinstance(exc, StoreUnavailable) and exc.timeout
            finally:
                self._running = None
                done.set()
        if slot.error is not None:
            raise StoreUnavailable(
                f"audit record not committed: {slot.error}", timeout=slot.timeout
            )
        assert slot.mac is not None
        return slot.mac

    def close(self) -> None:
        self._db.close()
