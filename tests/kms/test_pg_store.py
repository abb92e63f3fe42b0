"""The PostgreSQL store's parts against a real server: forward-only migrations, serializable
transactions retried on real conflicts, the write section's compare-and-set, and the audit
chain under concurrent appenders (tampering found, a broken tail refused)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import psycopg
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.audit import MAX_LINE_BYTES
from kms.config import KmsConfig
from kms.errors import AuditChainError
from kms.integrity import MasterKey
from kms.pg._connect import PgConnection, check_url, redact
from kms.pg.audit import PgAuditLog, verify_pg_audit
from kms.pg.coherence import FreshRead, PgCoherence
from kms.pg.schema import MIGRATIONS, SCHEMA_VERSION, migrate, schema_version
from kms.pg.storage import PgStorage, StoreConflict
from kms.pg.wiring import open_pg_audit
from kms.storage import AliasRow, KeyRow, KeyStoreRow, StoreUnavailable, VersionRow
from transport.errors import ConfigurationError

pytestmark = [pytest.mark.timeout(120)]

MASTER = MasterKey(bytes(range(32)))


def _key(kid: str, meta: str = "{}") -> KeyRow:
    return KeyRow(kid, meta, "{}", MASTER.key_record_tag(kid, meta, "{}"))


# ---------------------------------------------------------------- migrations


def test_migrations_run_from_an_empty_database_to_the_current_version(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        assert schema_version(c) == 0
        assert migrate(c) == (0, SCHEMA_VERSION)
        assert schema_version(c) == SCHEMA_VERSION
        assert migrate(c) == (SCHEMA_VERSION, SCHEMA_VERSION)  # idempotent


@pytest.mark.parametrize("older", [v for v, _, _ in MIGRATIONS[:-1]])
def test_migrations_run_from_each_older_version_keeping_the_rows(pg_url: str, older: int) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        assert migrate(c, target=older) == (0, older)
        c.execute("INSERT INTO kms_keys VALUES (%s, %s, %s, %s)", ("k1", "{}", "{}", b"\x00" * 32))
    store = PgStorage(pg_url)  # what a daemon does at start
    try:
        assert store.migrated_from == older
        assert [k.key_id for k in store.load().keys] == ["k1"]
    finally:
        store.close()
    with psycopg.connect(pg_url, autocommit=True) as c:
        assert schema_version(c) == SCHEMA_VERSION


def test_a_database_newer_than_the_code_is_refused(pg_url: str) -> None:
    PgStorage(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE kms_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigurationError, match=r"newer than this daemon's .*forward"):
        PgStorage(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as c:  # nothing was touched
        assert schema_version(c) == SCHEMA_VERSION + 1


def test_a_failed_migration_leaves_the_database_as_it_was(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        migrate(c, target=1)
        c.execute("CREATE TABLE kms_audit_log (x int)")  # in the way of version 2
        with pytest.raises(psycopg.errors.DuplicateTable):
            migrate(c)
        assert schema_version(c) == 1
        assert c.execute("SELECT to_regclass('kms_audit_head')").fetchone() == (None,)


# ---------------------------------------------------------------- URLs


def test_urls_are_shown_without_their_password() -> None:
    url = "postgresql://kms:s3cret@db.example:5432/kms?sslmode=require&password=s3cret"
    assert "s3cret" not in redact(url)
    assert redact(url).startswith("postgresql://kms@db.example:5432/kms")
    with pytest.raises(ConfigurationError) as err:
        check_url("postgresql://kms:s3cret@db.example:notaport/kms")
    assert "s3cret" not in str(err.value)
    with pytest.raises(ConfigurationError, match="postgresql://"):
        check_url("mysql://kms:s3cret@db/kms")


# ---------------------------------------------------------------- transactions


def test_a_real_serialization_failure_is_retried(pg_url: str) -> None:
    """Two serializable read-modify-writes of one row: the second to commit fails with 40001
    on its first attempt and succeeds on its retry, seeing the first's write."""
    PgStorage(pg_url).close()
    first, second = (
        PgConnection(pg_url, "t1", serializable=True),
        PgConnection(pg_url, "t2", serializable=True),
    )
    read_done, first_committed = threading.Event(), threading.Event()
    attempts: list[int] = []

    def bump(c: psycopg.Connection) -> int:  # type: ignore[type-arg]
        row = c.execute("SELECT gen FROM kms_generation").fetchone()
        assert row is not None
        attempts.append(row[0])
        if len(attempts) == 1:  # the first attempt read before the other's write committed
            read_done.set()
            assert first_committed.wait(10)
        c.execute("UPDATE kms_generation SET gen = %s", (row[0] + 1,))
        return int(row[0]) + 1

    def other() -> None:
        assert read_done.wait(10)
        first.transact(lambda c: c.execute("UPDATE kms_generation SET gen = gen + 10"), what="t")
        first_committed.set()

    t = threading.Thread(target=other)
    t.start()
    try:
        assert second.transact(bump, what="bump") == 11
    finally:
        t.join(10)
        first.close()
        second.close()
    assert attempts == [0, 10]  # retried once, on the committed value


def test_a_conflict_storm_ends_in_a_retryable_timeout(pg_url: str) -> None:
    db = PgConnection(pg_url, "storm", serializable=True)
    calls = 0

    def always(c: psycopg.Connection) -> None:  # type: ignore[type-arg]
        nonlocal calls
        calls += 1
        raise psycopg.errors.SerializationFailure("conflict")

    try:
        with pytest.raises(StoreUnavailable) as err:
            db.transact(always, what="storm", attempts=3)
    finally:
        db.close()
    assert calls == 3
    assert err.value.aws_type == "DependencyTimeoutException"


def test_a_write_computed_from_a_stale_key_set_is_rolled_back(pg_url: str) -> None:
    a, b = PgStorage(pg_url), PgStorage(pg_url)
    try:
        gen = a.generation()
        a.expected = gen  # a's write section saw `gen`
        b.create_key(_key("k-b"), [])  # another daemon wrote meanwhile (no section)
        with pytest.raises(StoreConflict):
            a.create_key(_key("k-a"), [])
        assert [k.key_id for k in a.load().keys] == ["k-b"]
        a.expected = a.generation()
        a.create_key(_key("k-a"), [VersionRow("k-a", 1, b"w" * 60, 1.0)])
        assert sorted(k.key_id for k in b.load().keys) == ["k-a", "k-b"]
    finally:
        a.close()
        b.close()


def test_rows_round_trip_exactly(pg_url: str) -> None:
    store = PgStorage(pg_url)
    try:
        meta = '{"b":1,"a":"\\u00e9"}'  # tags are over the exact text: no jsonb reordering
        store.create_key(_key("k", meta), [VersionRow("k", 1, b"\x00\xff" * 30, 1.5)])
        alias = AliasRow("alias/x", "k", 1.0, 2.0, MASTER.alias_tag("alias/x", "k", 1.0, 2.0))
        store.put_alias(alias)
        snap = store.load()
        assert snap.keys == [_key("k", meta)]
        assert snap.versions == [VersionRow("k", 1, b"\x00\xff" * 30, 1.5)]
        assert snap.aliases == [alias]
        store.delete_key("k")  # cascades
        assert store.load().aliases == []
    finally:
        store.close()


async def test_coherence_sees_another_daemons_write_at_the_next_request(pg_url: str) -> None:
    mine, theirs = PgStorage(pg_url), PgStorage(pg_url)
    coherence = PgCoherence(mine, pg_url)
    try:
        before = await coherence.current()
        theirs.create_key(_key("k"), [])
        assert await coherence.current() == before + 1
        await coherence.acquire()
        try:
            assert mine.expected == before + 1
            mine.create_key(_key("k2"), [])
            assert coherence.publish() == before + 2
        finally:
            await coherence.release()
        assert mine.expected is None
    finally:
        coherence.close()
        mine.close()
        theirs.close()


async def test_fresh_reads_are_shared_by_callers_that_arrive_together() -> None:
    release = trio.Event()
    count = 0

    async def fetch() -> int:
        nonlocal count
        count += 1
        await release.wait()
        return count

    fresh = FreshRead(fetch)
    results: list[int] = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _collect(fresh, results))  # starts read 1
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(5):  # arrive during read 1: must get read 2, shared
            n.start_soon(lambda: _collect(fresh, results))
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert sorted(results) == [1, 2, 2, 2, 2, 2]
    assert fresh.reads == 2


async def _collect(fresh: FreshRead, out: list[int]) -> None:
    out.append(await fresh.read())


# ---------------------------------------------------------------- the audit chain


async def test_concurrent_appenders_keep_one_valid_chain(pg_url: str) -> None:
    PgStorage(pg_url).close()
    logs = [PgAuditLog(pg_url, MASTER) for _ in range(3)]
    per_task = 20
    try:

        async def writer(log: PgAuditLog, w: int) -> None:
            for i in range(per_task):
                await log.commit({"operation": "Test", "writer": w, "i": i})

        async with trio.open_nursery() as n:
            for i, log in enumerate(logs):
                for t in range(3):
                    n.start_soon(writer, log, 10 * i + t)
    finally:
        for log in logs:
            log.close()
    chain, lines = verify_pg_audit(pg_url, MASTER)
    assert (chain, lines) == (1, 3 * 3 * per_task)
    assert sum(log.batches for log in logs) < lines  # group commit batched some


def test_tampering_with_the_chain_is_found(pg_url: str) -> None:
    PgStorage(pg_url).close()
    log = PgAuditLog(pg_url, MASTER)
    for i in range(5):
        log.append({"operation": "Test", "i": i})
    log.close()
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(
            "UPDATE kms_audit_log SET line = replace(line, '\"i\":2', '\"i\":7') WHERE seq = 3"
        )
    with pytest.raises(AuditChainError) as err:
        verify_pg_audit(pg_url, MASTER)
    assert err.value.line == 3
    with pytest.raises(AuditChainError):  # and the daemon would refuse to start on it
        PgAuditLog(pg_url, MASTER)
    with pytest.raises(AuditChainError):  # another master key cannot forge a valid line
        verify_pg_audit(pg_url, MasterKey(os.urandom(32)))


def test_a_deleted_tail_is_found_and_a_restart_past_it_records_the_break(pg_url: str) -> None:
    PgStorage(pg_url).close()
    log = PgAuditLog(pg_url, MASTER)
    for i in range(4):
        log.append({"operation": "Test", "i": i})
    log.close()
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("DELETE FROM kms_audit_log WHERE seq = 4")
    with pytest.raises(ConfigurationError, match="broken at line 4"):
        open_pg_audit(pg_url, MASTER, fsync=True, clock=lambda: 0.0)
    log = open_pg_audit(pg_url, MASTER, fsync=True, despite_broken_chain=True, clock=lambda: 0.0)
    log.close()
    assert verify_pg_audit(pg_url, MASTER) == (2, 1)
    with psycopg.connect(pg_url, autocommit=True) as c:
        row = c.execute("SELECT line FROM kms_audit_log WHERE chain = 2").fetchone()
        assert row is not None
        assert "AuditChainRestart" in row[0]
        assert c.execute("SELECT count(*) FROM kms_audit_log WHERE chain = 1").fetchone() == (3,)


def test_custom_key_stores_round_trip_and_count_as_changes(pg_url: str) -> None:
    store = PgStorage(pg_url)
    try:
        before = store.generation()
        row = KeyStoreRow("cks-1234567890abcdef0", '{"Name":"x"}', b"\x01" * 60, b"\x02" * 32)
        store.put_key_store(row)
        assert store.load().key_stores == [row]
        changed = KeyStoreRow(row.store_id, '{"Name":"y"}', row.secret, b"\x03" * 32)
        store.put_key_store(changed)
        assert store.load().key_stores == [changed]
        store.delete_key_store(row.store_id)
        assert store.load().key_stores == []
        assert store.generation() == before + 3  # other daemons reload on each
    finally:
        store.close()


def test_the_config_file_names_the_store_and_never_shows_its_password(tmp_path: Path) -> None:
    url = "postgresql://kms:hunter2@db.example/kms"
    config = KmsConfig.from_mapping({"storage": url})
    assert config.postgres_url == url
    assert "hunter2" not in repr(config)
    assert config.storage_shown == "postgresql://kms@db.example/kms"
    assert KmsConfig.from_mapping({"storage": "sqlite"}).postgres_url is None
    with pytest.raises(ConfigurationError) as err:
        KmsConfig.from_mapping({"storage": "mysql://kms:hunter2@db/kms"})
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigurationError):
        KmsConfig.from_mapping({"storage": 5})


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    line=st.one_of(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
        st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8)).map(json.dumps),
        st.just('{"seq": 2, "prev": "' + "0" * 64 + '", "mac": "' + "0" * 64 + '"}'),
        st.just("x" * (MAX_LINE_BYTES + 10)),
    )
)
def test_any_planted_audit_row_is_a_chain_error(pg_url: str, line: str) -> None:
    """Whatever text an operator puts in a row, verifying and opening the chain end in an
    AuditChainError naming that line (never another exception), in bounded work."""
    with psycopg.connect(pg_url, autocommit=True) as c:
        if schema_version(c) == 0:
            migrate(c)
            log = PgAuditLog(pg_url, MASTER)
            log.append({"operation": "Test"})
            log.append({"operation": "Test"})
            log.close()
        c.execute("UPDATE kms_audit_log SET line = %s WHERE seq = 2", (line,))
    with pytest.raises(AuditChainError) as err:
        verify_pg_audit(pg_url, MASTER)
    assert err.value.line == 2
    with pytest.raises(AuditChainError):
        PgAuditLog(pg_url, MASTER)


def test_daemons_starting_together_on_an_empty_database_migrate_it_once(pg_url: str) -> None:
    barrier = threading.Barrier(4)
    opened: list[PgStorage] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait(10)
        try:
            opened.append(PgStorage(pg_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == []
        assert sorted(s.migrated_from is not None for s in opened) == [False, False, False, True]
    finally:
        for s in opened:
            s.close()


def test_a_daemon_starting_while_others_append_reads_a_consistent_tail(pg_url: str) -> None:
    """The tail check at start reads the head and the lines from ONE snapshot: lines appended
    meanwhile by running daemons are not mistaken for a broken chain."""
    PgStorage(pg_url).close()
    stop = threading.Event()
    writer = PgAuditLog(pg_url, MASTER)

    def append() -> None:
        while not stop.is_set():
            writer.append({"operation": "Test"})

    threads = [threading.Thread(target=append)]
    for t in threads:
        t.start()
    try:
        for _ in range(60):
            PgAuditLog(pg_url, MASTER).close()  # raised "a line past the chain's head"
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        writer.close()
    assert verify_pg_audit(pg_url, MASTER)[1] > 0


def test_a_daemon_stalled_in_its_write_section_does_not_block_the_others_for_ever(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holds the write section and stalls (its lock connection sits idle in its
    transaction); the server ends A's session after the idle timeout, and B gets the lock."""
    import kms.pg._connect

    monkeypatch.setattr(kms.pg._connect, "_IDLE_IN_TX_S", 1.0)
    monkeypatch.setattr(kms.pg._connect, "STATEMENT_TIMEOUT_S", 20.0)  # B's wait is not cut
    sa, sb = PgStorage(pg_url), PgStorage(pg_url)
    a, b = PgCoherence(sa, pg_url), PgCoherence(sb, pg_url)
    try:
        a.acquire_blocking()  # ... and never releases: stalled
        b.acquire_blocking()  # waits ~1 s, then holds it
        sb.create_key(_key("k-b"), [])
        b.release_blocking()
        a.release_blocking()  # A's session was ended: releasing is a no-op, not an error
        a.acquire_blocking()  # A reconnects and sees B's write
        assert sa.expected == sb.generation()
        a.release_blocking()
    finally:
        for x in (a, b):
            x.close()
        sa.close()
        sb.close()
