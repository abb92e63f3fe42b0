"""Time-driven behaviour with an injected clock (no sockets): deletion windows, automatic
rotation, keep-alive timeouts; and start-up checks of the key database."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kms.app import KmsApp, build_app, load_master_key
from kms.audit import verify_audit_log
from kms.client import Credentials, KmsClient
from kms.config import KmsConfig
from kms.daemon import _Connection, _Shutdown
from kms.errors import KmsApiError
from kms.integrity import MasterKey
from transport.errors import ConfigurationError

from .helpers import ADMIN

CREDS = Credentials(ADMIN.access_key_id, ADMIN.secret_access_key)
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _app(tmp_path: Path, clock: Clock | None = None, **config: Any) -> KmsApp:
    # Under an autojump clock, virtual time jumps while a task waits for a real thread (the
    # audit's fdatasync): the tests here measure virtual time, so their audit is not synced.
    config.setdefault("audit_fsync", False)
    cfg = KmsConfig(state_dir=tmp_path / "kms", credentials=(ADMIN,), **config)
    return build_app(cfg, env={}, clock=clock or Clock())


def _client(app: KmsApp, nursery: trio.Nursery, clock: Clock) -> KmsClient:
    async def connect() -> trio.abc.Stream:
        a, b = trio.testing.memory_stream_pair()
        nursery.start_soon(_Connection(b, app, _Shutdown()).serve)
        return a

    from datetime import UTC, datetime

    return KmsClient(
        connect=connect, credentials=CREDS, clock=lambda: datetime.fromtimestamp(clock(), tz=UTC)
    )


async def test_deletion_window_and_automatic_rotation(tmp_path: Path) -> None:
    clock = Clock()
    app = _app(tmp_path, clock)
    try:
        async with trio.open_nursery() as nursery:
            c = _client(app, nursery, clock)
            with trio.fail_after(20):
                doomed = (await c.call("CreateKey", {}))["KeyMetadata"]["KeyId"]
                await c.call("CreateAlias", {"AliasName": "alias/doomed", "TargetKeyId": doomed})
                await c.call("ScheduleKeyDeletion", {"KeyId": doomed, "PendingWindowInDays": 7})
                rotating = (await c.call("CreateKey", {}))["KeyMetadata"]["KeyId"]
                await c.call("EnableKeyRotation", {"KeyId": rotating, "RotationPeriodInDays": 90})
                old = await c.call("Encrypt", {"KeyId": rotating, "Plaintext": "djE="})
                clock.now += 6 * DAY
                meta = (await c.call("DescribeKey", {"KeyId": doomed}))["KeyMetadata"]
                assert meta["KeyState"] == "PendingDeletion"
                clock.now += 2 * DAY  # past the 7-day window
                with pytest.raises(KmsApiError) as e:
                    await c.call("DescribeKey", {"KeyId": doomed})
                assert e.value.type_name == "NotFoundException"
                aliases = (await c.call("ListAliases", {}))["Aliases"]
                assert "alias/doomed" not in [a["AliasName"] for a in aliases]
                clock.now += 85 * DAY  # 93 days after enabling: rotation due
                new = await c.call("Encrypt", {"KeyId": rotating, "Plaintext": "djI="})
                old_blob = base64.b64decode(old["CiphertextBlob"])
                new_blob = base64.b64decode(new["CiphertextBlob"])
                header = 2 + len(rotating)
                assert old_blob[header : header + 4] == (1).to_bytes(4, "big")
                assert new_blob[header : header + 4] == (2).to_bytes(4, "big")
                dec = await c.call("Decrypt", {"CiphertextBlob": old["CiphertextBlob"]})
                assert dec["Plaintext"] == "djE="
                status = await c.call("GetKeyRotationStatus", {"KeyId": rotating})
                assert status["NextRotationDate"] > clock.now
                await c.aclose()
            nursery.cancel_scope.cancel()
    finally:
        app.close()
    # The deletion and the rotation were persisted: a restarted daemon sees the same state.
    again = _app(tmp_path, clock)
    try:
        assert doomed not in again.service._keys
        assert again.service.resolve(rotating).current_version == 2
    finally:
        again.close()


async def test_idle_keep_alive_connection_is_closed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An authenticated caller's connection may idle for the keep-alive time, then closes."""
    clock = Clock()
    app = await trio.to_thread.run_sync(lambda: _app(tmp_path, clock, keep_alive_timeout_s=30.0))
    try:
        async with trio.open_nursery() as nursery:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(_Connection(b, app, _Shutdown()).serve)
            streams = [a]

            async def connect() -> trio.abc.Stream:
                return streams.pop()

            from datetime import UTC, datetime

            client = KmsClient(
                connect=connect,
                credentials=CREDS,
                clock=lambda: datetime.fromtimestamp(clock(), tz=UTC),
            )
            await client.call("ListKeys", {})
            start = trio.current_time()
            with trio.fail_after(120):
                assert await a.receive_some(1024) == b""  # server closed the idle connection
            assert 30.0 <= trio.current_time() - start < 31.0
    finally:
        app.close()


async def test_fresh_connection_must_send_its_request_in_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A connection that has not authenticated gets request_timeout_s, not the keep-alive."""
    app = await trio.to_thread.run_sync(
        lambda: _app(tmp_path, keep_alive_timeout_s=60.0, request_timeout_s=5.0)
    )
    try:
        async with trio.open_nursery() as nursery:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(_Connection(b, app, _Shutdown()).serve)
            start = trio.current_time()
            with trio.fail_after(120):
                assert await a.receive_some(1024) == b""
            assert 5.0 <= trio.current_time() - start < 5.5
    finally:
        app.close()


async def test_graceful_shutdown_closes_idle_connections(tmp_path: Path) -> None:
    app = await trio.to_thread.run_sync(lambda: _app(tmp_path))
    try:
        shutdown = _Shutdown()
        async with trio.open_nursery() as nursery:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(_Connection(b, app, shutdown).serve)
            await trio.testing.wait_all_tasks_blocked()
            shutdown.trigger()
            with trio.fail_after(5):
                assert await a.receive_some(1024) == b""
    finally:
        app.close()


def test_wrong_master_key_is_refused(tmp_path: Path) -> None:
    key1 = base64.b64encode(bytes(32)).decode()
    key2 = base64.b64encode(bytes([1]) * 32).decode()
    cfg = KmsConfig(state_dir=tmp_path, credentials=(ADMIN,))
    build_app(cfg, env={"ENCLAVE_KMS_MASTER_KEY": key1}).close()
    with pytest.raises(ConfigurationError, match="master key does not match"):
        build_app(cfg, env={"ENCLAVE_KMS_MASTER_KEY": key2})
    build_app(cfg, env={"ENCLAVE_KMS_MASTER_KEY": key1}).close()


def test_key_material_never_on_disk_in_clear(tmp_path: Path) -> None:
    """Seeded material is stored wrapped: its bytes appear nowhere in the state directory."""
    from kms.service import SeedKey

    material = bytes(range(100, 132))
    cfg = KmsConfig(state_dir=tmp_path / "s", credentials=(ADMIN,))
    app = build_app(cfg, env={}, seed=(SeedKey("seeded-key", (material,)),))
    app.close()
    for path in (tmp_path / "s").iterdir():
        data = path.read_bytes()
        assert material not in data
        assert base64.b64encode(material) not in data


async def test_seeded_rotated_key(tmp_path: Path) -> None:
    """A seed with two material versions: new ciphertexts use v2, v1 material still decrypts."""
    from kms import ciphertext
    from kms._wrap import Aead
    from kms.service import SeedKey

    v1, v2 = bytes(range(32)), bytes(range(32, 64))
    old_blob = ciphertext.seal(Aead(v1), "seeded", 1, b"made with v1", {"a": "b"})
    cfg = KmsConfig(state_dir=tmp_path / "s", credentials=(ADMIN,))
    seed = (SeedKey("seeded", (v1, v2), aliases=("alias/seeded",)),)
    clock = Clock()
    for _ in range(2):  # seeding again after a restart changes nothing
        app = await trio.to_thread.run_sync(lambda: build_app(cfg, env={}, clock=clock, seed=seed))
        try:
            async with trio.open_nursery() as nursery:
                c = _client(app, nursery, clock)
                with trio.fail_after(20):
                    out = await c.call(
                        "Decrypt",
                        {
                            "CiphertextBlob": base64.b64encode(old_blob).decode(),
                            "EncryptionContext": {"a": "b"},
                        },
                    )
                    assert base64.b64decode(out["Plaintext"]) == b"made with v1"
                    new = await c.call("Encrypt", {"KeyId": "alias/seeded", "Plaintext": "eA=="})
                    header = ciphertext.parse_header(base64.b64decode(new["CiphertextBlob"]))
                    assert (header.key_id, header.key_version) == ("seeded", 2)
                    await c.aclose()
                nursery.cancel_scope.cancel()
        finally:
            app.close()


def test_a_line_torn_at_the_end_is_cut_off_and_kept_at_start(tmp_path: Path) -> None:
    """A line without its newline is a write a crash cut short (never acknowledged): the start
    cuts it off and records its bytes in the chain's next line instead of refusing."""
    cfg = KmsConfig(state_dir=tmp_path, credentials=(ADMIN,))
    build_app(cfg, env={}).close()
    (tmp_path / "audit.jsonl").write_text('{"seq": 1, "prev": "00", "ha')
    build_app(cfg, env={}).close()
    master = MasterKey(load_master_key(tmp_path, {}))
    assert verify_audit_log(tmp_path / "audit.jsonl", master) == 1
    record = json.loads((tmp_path / "audit.jsonl").read_text())
    assert record["operation"] == "AuditTornLine"
    assert base64.b64decode(record["torn_b64"]) == b'{"seq": 1, "prev": "00", "ha'


def test_a_broken_complete_line_is_still_refused_at_start(tmp_path: Path) -> None:
    cfg = KmsConfig(state_dir=tmp_path, credentials=(ADMIN,))
    build_app(cfg, env={}).close()
    (tmp_path / "audit.jsonl").write_text('{"seq": 1, "prev": "00", "mac": "00"}\n')
    with pytest.raises(ConfigurationError, match="audit verify"):
        build_app(cfg, env={})


async def test_in_flight_request_finishes_after_shutdown(tmp_path: Path) -> None:
    """Shutdown while a request is half-received: it completes, answered with Connection: close."""
    import json as _json
    from datetime import UTC, datetime

    from kms.sigv4 import sign_headers

    app = await trio.to_thread.run_sync(lambda: _app(tmp_path))
    body = _json.dumps({"NumberOfBytes": 16}).encode()
    headers = sign_headers(
        method="POST",
        host="kms",
        path="/",
        headers={"X-Amz-Target": "TrentService.GenerateRandom"},
        body=body,
        access_key_id=CREDS.access_key_id,
        secret_access_key=CREDS.secret_access_key,
        session_token=None,
        region="us-east-1",
        service="kms",
        now=datetime.fromtimestamp(Clock()(), tz=UTC),
    )
    head = "POST / HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    try:
        shutdown = _Shutdown()
        async with trio.open_nursery() as nursery:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(_Connection(b, app, shutdown).serve)
            with trio.fail_after(10):
                await a.send_all(head.encode() + body[:5])
                await trio.testing.wait_all_tasks_blocked()
                shutdown.trigger()  # the request is in flight: it must still be answered
                await a.send_all(body[5:])
                reply = b""
                while chunk := await a.receive_some(65536):
                    reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply.decode()
        assert b"connection: close" in reply.lower()
        assert b'"Plaintext"' in reply
    finally:
        app.close()


async def test_client_reconnects_after_idle_close(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The server closed the kept-alive connection while idle: the next call reconnects."""
    app = await trio.to_thread.run_sync(lambda: _app(tmp_path, keep_alive_timeout_s=5.0))
    connects = 0
    try:
        async with trio.open_nursery() as nursery:
            clock = Clock()

            async def connect() -> trio.abc.Stream:
                nonlocal connects
                connects += 1
                a, b = trio.testing.memory_stream_pair()
                nursery.start_soon(_Connection(b, app, _Shutdown()).serve)
                return a

            from datetime import UTC, datetime

            client = KmsClient(
                connect=connect,
                credentials=CREDS,
                clock=lambda: datetime.fromtimestamp(clock(), tz=UTC),
            )
            with trio.fail_after(60):
                await client.call("ListKeys", {})
                await client.call("ListKeys", {})
                assert connects == 1  # kept alive
                await trio.sleep(10)  # > keep_alive_timeout_s: the server hangs up
                await client.call("ListKeys", {})
                assert connects == 2
                await client.aclose()
            nursery.cancel_scope.cancel()
    finally:
        app.close()
