"""Several daemons on one PostgreSQL database (in-process daemons, a real server): a change
made through one is visible through another at once, concurrent writers resolve as AWS would,
and the audit chain stays one valid chain that ``kms audit verify --storage`` checks."""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest
from botocore.exceptions import ClientError

from kms.config import MASTER_KEY_ENV, KmsConfig
from kms.integrity import MasterKey
from kms.pg.audit import verify_pg_audit

from .conftest import boto_client
from .helpers import ADMIN, ALL_CREDS, OUTSIDER, DaemonThread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def master_b64() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _config(tmp: Path, name: str, url: str) -> KmsConfig:
    return KmsConfig(
        host="127.0.0.1",
        port=0,
        state_dir=tmp / name,
        credentials=ALL_CREDS,
        trust_roots=(),
        storage=url,
        workers=1,
    )


@pytest.fixture
def two_daemons(
    tmp_path: Path, pg_url: str, master_b64: str
) -> Iterator[tuple[DaemonThread, DaemonThread]]:
    env = {MASTER_KEY_ENV: master_b64}
    with ExitStack() as stack:
        a = stack.enter_context(DaemonThread(_config(tmp_path, "a", pg_url), env))
        b = stack.enter_context(DaemonThread(_config(tmp_path, "b", pg_url), env))
        yield a, b


def _kms(d: DaemonThread) -> Any:
    return boto_client(d.endpoint, ADMIN)


def test_a_key_made_through_one_daemon_is_usable_through_the_other_at_once(
    two_daemons: tuple[DaemonThread, DaemonThread], pg_url: str, master_b64: str
) -> None:
    a, b = (_kms(d) for d in two_daemons)
    for i in range(5):
        kid = a.create_key(Description=f"k{i}")["KeyMetadata"]["KeyId"]
        blob = b.encrypt(KeyId=kid, Plaintext=b"hello")["CiphertextBlob"]
        assert a.decrypt(CiphertextBlob=blob)["Plaintext"] == b"hello"
        a.create_alias(AliasName=f"alias/k{i}", TargetKeyId=kid)
        assert b.describe_key(KeyId=f"alias/k{i}")["KeyMetadata"]["KeyId"] == kid
        # A disable acknowledged by one is enforced by the other on the next request.
        b.disable_key(KeyId=kid)
        with pytest.raises(ClientError) as err:
            a.encrypt(KeyId=kid, Plaintext=b"x")
        assert err.value.response["Error"]["Code"] == "DisabledException"
    assert verify_pg_audit(pg_url, MasterKey(base64.b64decode(master_b64)))[1] >= 25


def test_the_database_holds_only_wrapped_material_and_tagged_rows(
    two_daemons: tuple[DaemonThread, DaemonThread], pg_url: str
) -> None:
    a = _kms(two_daemons[0])
    kid = a.create_key(Description="secret")["KeyMetadata"]["KeyId"]
    plain = a.generate_data_key(KeyId=kid, KeySpec="AES_256")["Plaintext"]
    with psycopg.connect(pg_url) as c:
        wrapped = c.execute("SELECT wrapped FROM kms_key_versions").fetchall()
        macs = c.execute("SELECT mac FROM kms_keys").fetchall()
        lines = "".join(r[0] for r in c.execute("SELECT line FROM kms_audit_log"))
    assert wrapped
    assert all(len(bytes(w[0])) >= 32 + 12 + 16 for w in wrapped)
    assert all(len(bytes(m[0])) == 32 for m in macs)
    assert base64.b64encode(plain).decode() not in lines



def _race(n: int, fn: Any) -> list[str]:
    """Run ``fn(i)`` for i in 0..n-1 on n threads released together; each result is "ok" or
    the AWS error code."""
    barrier = threading.Barrier(n)
    out: list[str] = [""] * n

    def run(i: int) -> None:
        barrier.wait(10)
        try:
            fn(i)
            out[i] = "ok"
        except ClientError as exc:
            out[i] = exc.response["Error"]["Code"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_writes_through_two_daemons_resolve_as_aws_would(
    two_daemons: tuple[DaemonThread, DaemonThread], pg_url: str, master_b64: str
) -> None:
    clients = [_kms(two_daemons[i % 2]) for i in range(4)]
    a = clients[0]
    kid = a.create_key(Description="shared")["KeyMetadata"]["KeyId"]
    other = a.create_key(Description="other")["KeyMetadata"]["KeyId"]

    # One name, four creators on two daemons: exactly one alias, the others AlreadyExists.
    got = _race(4, lambda i: clients[i].create_alias(AliasName="alias/one", TargetKeyId=kid))
    assert sorted(got) == ["AlreadyExistsException"] * 3 + ["ok"]

    # Alias moves race: all succeed (the last writer wins), the alias names one of the keys.
    targets = [kid, other, kid, other]
    got = _race(4, lambda i: clients[i].update_alias(AliasName="alias/one", TargetKeyId=targets[i]))
    assert got == ["ok"] * 4
    final = {c.describe_key(KeyId="alias/one")["KeyMetadata"]["KeyId"] for c in clients[:2]}
    assert len(final) == 1  # both daemons agree
    assert final <= {kid, other}

    # Concurrent rotations: each adds its own version (none lost, none duplicated).
    got = _race(4, lambda i: clients[i].rotate_key_on_demand(KeyId=kid))
    assert got.count("ok") >= 1
    assert set(got) <= {"ok", "LimitExceededException"}
    rotations = clients[1].list_key_rotations(KeyId=kid)["Rotations"]
    assert len(rotations) == got.count("ok")
    blob = clients[1].encrypt(KeyId=kid, Plaintext=b"after")["CiphertextBlob"]
    assert clients[0].decrypt(CiphertextBlob=blob)["Plaintext"] == b"after"

    # Concurrent deletions of one key: one schedules it, the others find it pending deletion.
    got = _race(
        4, lambda i: clients[i].schedule_key_deletion(KeyId=other, PendingWindowInDays=7)
    )
    assert sorted(got) == ["KMSInvalidStateException"] * 3 + ["ok"]
    states = {c.describe_key(KeyId=other)["KeyMetadata"]["KeyState"] for c in clients[:2]}
    assert states == {"PendingDeletion"}

    # Every request above is one line of ONE chain.
    chain, lines = verify_pg_audit(pg_url, MasterKey(base64.b64decode(master_b64)))
    assert chain == 1
    assert lines >= 2 + 4 * 4 + 2 + 2


def test_a_row_the_database_operator_edits_grants_nothing(
    two_daemons: tuple[DaemonThread, DaemonThread], pg_url: str, master_b64: str, tmp_path: Path
) -> None:
    """An operator opens a key's policy to everyone in its row: the running daemons do not
    honour it, and a daemon that loads the row quarantines the key."""
    a = _kms(two_daemons[0])
    kid = a.create_key(Description="victim")["KeyMetadata"]["KeyId"]
    with psycopg.connect(pg_url, autocommit=True) as c:
        edited = c.execute(
            "UPDATE kms_keys SET policy = replace(policy, %s, '*') WHERE key_id = %s",
            ('"arn:aws:iam::111122223333:root"', kid),
        )
        assert edited.rowcount == 1
    a.create_key(Description="any change")  # bumps the counter: both daemons reload
    for d in two_daemons:
        outsider = boto_client(d.endpoint, OUTSIDER)
        with pytest.raises(ClientError) as err:
            outsider.encrypt(KeyId=kid, Plaintext=b"x")
        # Refused either way: by the authentic policy still held, or the key quarantined.
        assert err.value.response["Error"]["Code"] in (
            "AccessDeniedException",
            "KeyUnavailableException",
        )
    env = {MASTER_KEY_ENV: master_b64}
    with DaemonThread(_config(tmp_path, "c", pg_url), env) as c:
        for cred in (ADMIN, OUTSIDER):
            with pytest.raises(ClientError) as err:
                boto_client(c.endpoint, cred).encrypt(KeyId=kid, Plaintext=b"x")
            assert err.value.response["Error"]["Code"] == "KeyUnavailableException"


def test_a_database_too_slow_to_answer_is_a_dependency_timeout(
    tmp_path: Path, pg_url: str, master_b64: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that waits on a lock longer than the statement/lock timeout is cancelled by the
    server: the client gets AWS's retryable DependencyTimeoutException, and the same request
    succeeds once the lock is gone."""
    import kms.pg._connect

    monkeypatch.setattr(kms.pg._connect, "STATEMENT_TIMEOUT_S", 0.5)
    env = {MASTER_KEY_ENV: master_b64}
    with DaemonThread(_config(tmp_path, "slow", pg_url), env) as d:
        kms = _kms(d)
        kms.create_key(Description="before")
        with psycopg.connect(pg_url) as blocker:  # holds the table until the block ends
            blocker.execute("LOCK TABLE kms_keys IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(ClientError) as err:
                kms.create_key(Description="blocked")
            assert err.value.response["Error"]["Code"] == "DependencyTimeoutException"
            assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
        kid = kms.create_key(Description="after")["KeyMetadata"]["KeyId"]
        assert kms.describe_key(KeyId=kid)["KeyMetadata"]["Description"] == "after"
