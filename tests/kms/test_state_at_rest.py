"""The state directory at rest (issue 10 items 2, 3 and 10; issue 15 "one daemon per SQLite
state directory"): real SQLite edits behind the daemon's back are refused at load, the audit
chain is keyed, the directory is private and locked by one daemon, old state migrates forward."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms import _wrap
from kms.app import KmsApp, build_app, load_master_key
from kms.audit import AuditLog, verify_audit_log
from kms.client import Credentials, KmsClient
from kms.config import KmsConfig
from kms.daemon import _Connection, _Shutdown
from kms.errors import AuditChainError, KmsApiError
from kms.integrity import MasterKey
from kms.statedir import StateDirInUse
from kms.storage import SCHEMA_VERSION
from transport.errors import ConfigurationError

from .helpers import ADMIN, ENCLAVE, enclave_policy

pytestmark = pytest.mark.timeout(60)


def _config(state: Path, **kw: Any) -> KmsConfig:
    return KmsConfig(state_dir=state, credentials=(ADMIN, ENCLAVE), **kw)


@asynccontextmanager
async def _served(app: KmsApp) -> AsyncIterator[tuple[KmsClient, KmsClient]]:
    """(admin, enclave) clients of ``app`` over in-memory streams; closes ``app`` after."""
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(_Connection(b, app, _Shutdown()).serve)
            return a

        def client(cred: Any) -> KmsClient:
            return KmsClient(
                connect=connect,
                credentials=Credentials(cred.access_key_id, cred.secret_access_key),
                clock=lambda: datetime.now(UTC),
            )

        admin, enclave = client(ADMIN), client(ENCLAVE)
        try:
            with trio.fail_after(30):
                yield admin, enclave
        finally:
            await admin.aclose()
            await enclave.aclose()
            nursery.cancel_scope.cancel()
            app.close()


async def _make_keys(state: Path) -> dict[str, str]:
    """An attested key (enclave may Decrypt only with a Recipient), a disabled key, an alias."""
    app = build_app(_config(state), env={})
    try:
        async with _served(app) as (admin, _):
            policy = json.dumps(enclave_policy())
            attested = (await admin.call("CreateKey", {"Policy": policy}))["KeyMetadata"]["KeyId"]
            blob = (await admin.call("Encrypt", {"KeyId": attested, "Plaintext": "c2VjcmV0"}))[
                "CiphertextBlob"
            ]
            disabled = (await admin.call("CreateKey", {}))["KeyMetadata"]["KeyId"]
            dblob = (await admin.call("Encrypt", {"KeyId": disabled, "Plaintext": "eA=="}))[
                "CiphertextBlob"
            ]
            await admin.call("DisableKey", {"KeyId": disabled})
            other = (await admin.call("CreateKey", {}))["KeyMetadata"]["KeyId"]
            await admin.call("CreateAlias", {"AliasName": "alias/models", "TargetKeyId": other})
            await admin.call("Encrypt", {"KeyId": attested, "Plaintext": "eA=="})
    finally:
        app.close()
    return {
        "attested": attested,
        "blob": blob,
        "disabled": disabled,
        "dblob": dblob,
        "other": other,
    }


def _sql(state: Path, statement: str, *args: Any) -> None:
    db = sqlite3.connect(state / "kms.sqlite3", isolation_level=None)
    try:
        assert db.execute(statement, args).rowcount == 1
    finally:
        db.close()


# ------------------------------------------------------------------ tampered rows


async def test_permissive_policy_written_into_the_database_is_refused(tmp_path: Path) -> None:
    """Before: the enclave principal then decrypted with no attestation at all."""
    state = tmp_path / "kms"
    made = await _make_keys(state)
    async with _served(build_app(_config(state), env={})) as (_, enclave):
        with pytest.raises(KmsApiError) as denied:
            await enclave.call("Decrypt", {"CiphertextBlob": made["blob"]})
        assert denied.value.type_name == "AccessDeniedException"  # needs a Recipient
    permissive = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*", "Resource": "*"}
            ],
        }
    )
    _sql(state, "UPDATE keys SET policy=? WHERE key_id=?", permissive, made["attested"])
    with structlog.testing.capture_logs() as logs:
        app = build_app(_config(state), env={})
    assert any(
        e["event"] == "kms_state_tampered" and e["name"] == made["attested"] for e in logs
    ), logs
    try:
        async with _served(app) as (admin, enclave):
            for who in (enclave, admin):
                with pytest.raises(KmsApiError) as refused:
                    await who.call("Decrypt", {"CiphertextBlob": made["blob"]})
                assert refused.value.type_name == "KeyUnavailableException"
            with pytest.raises(KmsApiError) as refused:
                await admin.call("DescribeKey", {"KeyId": made["attested"]})
            assert refused.value.type_name == "KeyUnavailableException"
            # The daemon keeps serving every other key.
            out = await admin.call("Encrypt", {"KeyId": "alias/models", "Plaintext": "eA=="})
            assert out["KeyId"].endswith(made["other"])
            listed = {k["KeyId"] for k in (await admin.call("ListKeys", {}))["Keys"]}
            assert made["attested"] in listed
    finally:
        app.close()


async def test_disabled_key_reenabled_by_editing_its_row_stays_unusable(tmp_path: Path) -> None:
    state = tmp_path / "kms"
    made = await _make_keys(state)
    db = sqlite3.connect(state / "kms.sqlite3", isolation_level=None)
    (meta_text,) = db.execute(
        "SELECT meta FROM keys WHERE key_id=?", (made["disabled"],)
    ).fetchone()
    db.close()
    meta = json.loads(meta_text)
    assert meta["KeyState"] == "Disabled"
    meta.update(Enabled=True, KeyState="Enabled")
    _sql(
        state,
        "UPDATE keys SET meta=? WHERE key_id=?",
        json.dumps(meta, sort_keys=True),
        made["disabled"],
    )
    app = build_app(_config(state), env={})
    try:
        assert made["disabled"] in app.service.quarantined
        async with _served(app) as (admin, _):
            with pytest.raises(KmsApiError) as refused:
                await admin.call("Decrypt", {"CiphertextBlob": made["dblob"]})
            assert refused.value.type_name == "KeyUnavailableException"
    finally:
        app.close()


async def test_alias_redirected_in_the_database_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "kms"
    made = await _make_keys(state)
    _sql(state, "UPDATE aliases SET key_id=? WHERE name='alias/models'", made["attested"])
    app = build_app(_config(state), env={})
    try:
        async with _served(app) as (admin, _):
            with pytest.raises(KmsApiError) as refused:
                await admin.call("Encrypt", {"KeyId": "alias/models", "Plaintext": "eA=="})
            assert refused.value.type_name == "KeyUnavailableException"
            with pytest.raises(KmsApiError) as exists:  # the name stays taken
                await admin.call(
                    "CreateAlias", {"AliasName": "alias/models", "TargetKeyId": made["other"]}
                )
            assert exists.value.type_name == "AlreadyExistsException"
    finally:
        app.close()


def test_swapped_key_material_quarantines_the_key(tmp_path: Path) -> None:
    state = tmp_path / "kms"
    made = trio.run(_make_keys, state)
    db = sqlite3.connect(state / "kms.sqlite3", isolation_level=None)
    (wrapped,) = db.execute(
        "SELECT wrapped FROM key_versions WHERE key_id=?", (made["other"],)
    ).fetchone()
    db.close()
    _sql(state, "UPDATE key_versions SET wrapped=? WHERE key_id=?", wrapped, made["attested"])
    app = build_app(_config(state), env={})  # no crash: the key is refused, the daemon serves
    try:
        assert made["attested"] in app.service.quarantined
        assert made["other"] not in app.service.quarantined
    finally:
        app.close()


# ------------------------------------------------------------------ the audit chain


def _rewrite_deny_as_allow_recomputing_hashes(path: Path) -> int:
    """What issue 10 did against the unkeyed chain: flip a deny, recompute every later link
    (here with SHA-256, and with a MAC key of the attacker's own)."""
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    index = next(i for i, r in enumerate(lines) if r["decision"] == "deny")
    lines[index]["decision"] = "allow"
    forged = MasterKey(os.urandom(32))
    prev = lines[index - 1]["mac"] if index else "0" * 64
    for rec in lines[index:]:
        rec.pop("mac")
        rec["prev"] = prev
        body = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
        rec["mac"] = prev = forged.audit_mac(prev, body)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
    return index + 1


async def test_audit_deny_rewritten_as_allow_fails_verification(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "kms"
    made = await _make_keys(state)
    app = build_app(_config(state), env={})
    try:
        async with _served(app) as (_, enclave):
            with pytest.raises(KmsApiError):
                await enclave.call("Decrypt", {"CiphertextBlob": made["blob"]})
    finally:
        app.close()
    audit = state / "audit.jsonl"
    master = MasterKey(load_master_key(state, {}))
    total = verify_audit_log(audit, master)
    line = _rewrite_deny_as_allow_recomputing_hashes(audit)
    with pytest.raises(AuditChainError) as broken:
        verify_audit_log(audit, master)
    assert broken.value.line == line
    # The CLI finds the master key beside the log and names the line.
    from runtime.cli import main

    monkeypatch.setattr("runtime.cli.configure_logging", lambda *a, **k: None)
    monkeypatch.delenv("ENCLAVE_KMS_MASTER_KEY", raising=False)
    capsys.readouterr()
    assert main(["kms", "audit", "verify", str(audit)]) == 1
    out = capsys.readouterr()
    assert json.loads(out.out.splitlines()[-1])["line"] == line
    assert total >= line


def test_audit_verify_without_the_master_key_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.cli import main

    monkeypatch.setattr("runtime.cli.configure_logging", lambda *a, **k: None)
    monkeypatch.delenv("ENCLAVE_KMS_MASTER_KEY", raising=False)
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, MasterKey(os.urandom(32)))
    log.append({"operation": "Encrypt", "decision": "allow"})
    log.close()
    assert main(["kms", "audit", "verify", str(path)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: no master key")
    assert "ENCLAVE_KMS_MASTER_KEY" in err
    assert "Traceback" not in err
    monkeypatch.setenv("ENCLAVE_KMS_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    assert main(["kms", "audit", "verify", str(path)]) == 1  # a key, but not the right one


def test_broken_audit_tail_refuses_start_unless_told(tmp_path: Path) -> None:
    state = tmp_path / "kms"
    trio.run(_make_keys, state)
    audit = state / "audit.jsonl"
    lines = audit.read_text().splitlines(keepends=True)
    lines[-1] = lines[-1].replace('"allow"', '"deny"')
    audit.write_text("".join(lines))
    with pytest.raises(ConfigurationError, match="--start-despite-broken-audit-chain"):
        build_app(_config(state), env={})
    assert audit.read_text() == "".join(lines)  # refused before anything was appended
    with structlog.testing.capture_logs() as logs:
        app = build_app(_config(state, start_despite_broken_audit_chain=True), env={})
    app.close()
    assert any(e["event"] == "kms_audit_chain_broken_started_anyway" for e in logs)
    aside = [p for p in state.iterdir() if p.name.startswith("audit.broken-")]
    assert len(aside) == 1
    assert aside[0].read_text() == "".join(lines)
    master = MasterKey(load_master_key(state, {}))
    assert verify_audit_log(audit, master) == 1
    first = json.loads(audit.read_text())
    assert first["operation"] == "AuditChainRestart"
    assert first["previous_file"] == aside[0].name
    build_app(_config(state), env={}).close()  # the new chain is sound: starts normally


def test_two_writers_share_one_chain(tmp_path: Path) -> None:
    """Worker processes of one daemon append through their own AuditLog: one valid chain."""
    master = MasterKey(os.urandom(32))
    path = tmp_path / "audit.jsonl"
    a = AuditLog(path, master)
    b = AuditLog(path, master)  # both resumed from the same tail
    for i in range(3):
        a.append({"operation": "Encrypt", "i": i})
        b.append({"operation": "Decrypt", "i": i})
    a.close()
    b.close()
    assert verify_audit_log(path, master) == 6
    AuditLog(path, master).close()


def test_a_line_appended_outside_the_protocol_breaks_the_tail(tmp_path: Path) -> None:
    """What two daemons of an older version did (each chaining onto its own idea of the tail):
    refused at start, and never extended by a writer either."""
    master = MasterKey(os.urandom(32))
    path = tmp_path / "audit.jsonl"
    a = AuditLog(path, master)
    a.append({"operation": "Encrypt"})
    line = json.loads(path.read_text())
    line["operation"] = "Decrypt"  # same seq and prev, a forged mac
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    with pytest.raises(AuditChainError):
        a.append({"operation": "Encrypt"})
    a.close()
    with pytest.raises(AuditChainError):
        AuditLog(path, master)


# ------------------------------------------------------------------ directory, lock, modes


def test_second_daemon_on_one_state_directory_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "kms"
    first = build_app(_config(state), env={})
    try:
        with pytest.raises(StateDirInUse) as busy:
            build_app(_config(state), env={})
        assert busy.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(busy.value)
    finally:
        first.close()
    build_app(_config(state), env={}).close()  # released on close


def test_state_directory_is_private_and_files_are_0600(tmp_path: Path) -> None:
    state = tmp_path / "new" / "kms"
    old = os.umask(0o022)
    try:
        app = build_app(_config(state), env={})
        app.audit.append({"operation": "Encrypt"})
        app.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    names = {p.name for p in state.iterdir()}
    assert {"kms.sqlite3", "master.key", "audit.jsonl", "kms.lock"} <= names
    for p in state.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_state_directory_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "kms"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(ConfigurationError, match="writable by group or others"):
        build_app(_config(state), env={})
    assert not (state / "master.key").exists()  # nothing was written into it


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "kms"
    build_app(_config(state), env={}).close()
    db = sqlite3.connect(state / "kms.sqlite3")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(ConfigurationError, match="schema 99, newer"):
        build_app(_config(state), env={})


# ------------------------------------------------------------------ migration from schema 1


def _legacy_state(state: Path, master_key: bytes) -> tuple[str, bytes]:
    """A state directory exactly as the schema-1 daemon left it (raw-master wrapping, no tags,
    an unkeyed SHA-256 audit chain)."""
    state.mkdir(mode=0o700, parents=True)
    (state / "master.key").write_bytes(base64.b64encode(master_key) + b"\n")
    (state / "master.key").chmod(0o600)
    legacy = _wrap.Aead(master_key)
    key_id = "7f0c8a52-1f4e-4d0a-9a53-1c1e2f3a4b5c"
    material = os.urandom(32)
    aad = b"enclave-kms/key-material/v1\x00" + key_id.encode() + b"\x00" + (1).to_bytes(4, "big")
    meta = {
        "CreationDate": 1.0, "Description": "old", "Enabled": True, "KeyState": "Enabled",
        "KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "SYMMETRIC_DEFAULT", "Origin": "AWS_KMS",
        "CurrentVersion": 1, "RotationEnabled": False, "RotationPeriodInDays": 365,
        "OnDemandRotations": 0, "Tags": [],
    }  # fmt: skip
    policy = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        }
    )
    db = sqlite3.connect(state / "kms.sqlite3", isolation_level=None)
    db.executescript(
        """
        CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
        CREATE TABLE keys (key_id TEXT PRIMARY KEY, meta TEXT NOT NULL, policy TEXT NOT NULL);
        CREATE TABLE key_versions (key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE
            CASCADE, version INTEGER NOT NULL, wrapped BLOB NOT NULL, created REAL NOT NULL,
            PRIMARY KEY (key_id, version));
        CREATE TABLE aliases (name TEXT PRIMARY KEY, key_id TEXT NOT NULL REFERENCES
            keys(key_id) ON DELETE CASCADE, created REAL NOT NULL, updated REAL NOT NULL);
        PRAGMA user_version=1;
        """
    )
    check = legacy.seal(b"enclave-kms master key check", b"enclave-kms/master-check/v1")
    db.execute("INSERT INTO meta VALUES ('master_check', ?)", (check,))
    db.execute("INSERT INTO keys VALUES (?, ?, ?)", (key_id, json.dumps(meta), policy))
    db.execute(
        "INSERT INTO key_versions VALUES (?, 1, ?, 1.0)", (key_id, legacy.seal(material, aad))
    )
    db.execute("INSERT INTO aliases VALUES ('alias/old', ?, 1.0, 1.0)", (key_id,))
    db.close()
    prev = "0" * 64
    out = []
    for seq in (1, 2):
        rec = {"operation": "Encrypt", "decision": "allow", "seq": seq, "prev": prev}
        body = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        rec["hash"] = prev = hashlib.sha256(prev.encode() + b"\n" + body.encode()).hexdigest()
        out.append(json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n")
    (state / "audit.jsonl").write_text("".join(out))
    return key_id, material


async def test_schema_1_state_directory_migrates_forward(tmp_path: Path) -> None:
    state = tmp_path / "kms"
    key_id, material = _legacy_state(state, os.urandom(32))
    app = build_app(_config(state), env={})
    try:
        assert app.service.quarantined == {}
        async with _served(app) as (admin, _):
            blob = (await admin.call("Encrypt", {"KeyId": "alias/old", "Plaintext": "aGk="}))[
                "CiphertextBlob"
            ]
            out = await admin.call("Decrypt", {"CiphertextBlob": blob})
            assert out["Plaintext"] == "aGk="
            assert out["KeyId"].endswith(key_id)
            # Materials stored before KeyMaterialIds existed get theirs (schema 3).
            described = await admin.call("DescribeKey", {"KeyId": key_id})
            assert described["KeyMetadata"]["CurrentKeyMaterialId"] == out["KeyMaterialId"]
    finally:
        app.close()
    db = sqlite3.connect(state / "kms.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    # Schema 4: the (empty) table of custom key stores.
    assert db.execute("SELECT count(*) FROM custom_key_stores").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM meta WHERE name='legacy_rows'").fetchone() == (0,)
    db.close()
    assert material not in (state / "kms.sqlite3").read_bytes()
    # The old unkeyed log is kept aside, still checkable; the new chain names it.
    aside = [p for p in state.iterdir() if p.name.startswith("audit.v1-")]
    assert len(aside) == 1
    master = MasterKey(load_master_key(state, {}))
    assert verify_audit_log(state / "audit.jsonl", master) >= 2
    first = json.loads((state / "audit.jsonl").read_text().splitlines()[0])
    assert first["operation"] == "AuditChainStart"
    assert (first["previous_file"], first["previous_lines"]) == (aside[0].name, 2)
    # And from now on an edit of the migrated rows is refused.
    _sql(state, "UPDATE keys SET policy=policy || ' ' WHERE key_id=?", key_id)
    again = build_app(_config(state), env={})
    try:
        assert key_id in again.service.quarantined
    finally:
        again.close()


# ------------------------------------------------------------------ the chain parser


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=4096), cut=st.integers(min_value=0, max_value=4096))
def test_audit_parsers_take_any_bytes(tmp_path: Path, data: bytes, cut: int) -> None:
    """Whatever the file holds, verification and resumption either succeed or raise
    AuditChainError (bounded work), never another exception."""
    master = MasterKey(bytes(32))
    path = tmp_path / "audit.jsonl"
    good = tmp_path / "good.jsonl"
    log = AuditLog(good, master)
    for i in range(3):
        log.append({"operation": "Encrypt", "i": i})
    log.close()
    mixed = good.read_bytes()
    path.write_bytes(mixed[:cut] + data + mixed[cut:])
    for check in (lambda: verify_audit_log(path, master), lambda: AuditLog(path, master).close()):
        try:
            check()
        except AuditChainError:
            pass
    path.unlink()
    good.unlink()


def test_unkeyed_log_beside_a_migrated_store_is_a_broken_chain(tmp_path: Path) -> None:
    """Anyone can write a valid unkeyed chain: it must not replace the keyed log unnoticed."""
    state = tmp_path / "kms"
    _legacy_state(state, os.urandom(32))
    build_app(_config(state), env={}).close()  # migrates, starts the keyed chain
    forged = tmp_path / "forged"
    _legacy_state(forged, os.urandom(32))
    (state / "audit.jsonl").write_bytes((forged / "audit.jsonl").read_bytes())
    with pytest.raises(ConfigurationError, match="unkeyed"):
        build_app(_config(state), env={})
    build_app(_config(state, start_despite_broken_audit_chain=True), env={}).close()
    assert [p for p in state.iterdir() if p.name.startswith("audit.broken-")]
