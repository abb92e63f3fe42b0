"""The daemon as a real process: kill -9 durability, graceful SIGTERM, fail-closed start."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

from kms.app import read_master_key
from kms.audit import verify_audit_log
from kms.client import Credentials, KmsClient
from kms.errors import KmsApiError
from kms.integrity import MasterKey

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

CREDS = Credentials("AKIDPROC", "proc-secret")


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ENCLAVE_KMS_ACCESS_KEY_ID=CREDS.access_key_id,
        ENCLAVE_KMS_SECRET_ACCESS_KEY=CREDS.secret_access_key,
        ENCLAVE_STATE_DIR=str(tmp_path / "global-state"),
        ENCLAVE_LOG_LEVEL="warning",
    )
    env.pop("ENCLAVE_KMS_MASTER_KEY", None)
    return env


async def _start(state: Path, env: dict[str, str]) -> tuple[trio.Process, str]:
    """Start ``python -m kms``; its stderr goes to a file (a pipe nobody drains could fill up
    and block the daemon), polled for the "listening" line."""
    state.mkdir(parents=True, exist_ok=True)
    log_path = state.parent / f"{state.name}-daemon-{uuid.uuid4().hex}.log"
    with log_path.open("ab") as log_file:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "kms", "--listen", "127.0.0.1:0", "--state-dir", str(state)],
            env=env,
            stderr=log_file,
        )
    return proc, await _wait_listening(proc, log_path)


async def _wait_listening(proc: trio.Process, log_path: Path) -> str:
    try:
        with trio.fail_after(30):
            while (
                m := re.search(rb"kms listening on (http://\S+)", log_path.read_bytes())
            ) is None:
                if proc.poll() is not None:
                    text = log_path.read_bytes().decode(errors="replace")
                    raise AssertionError(f"daemon exited early: {text}")
                await trio.sleep(0.02)
    except BaseException:
        proc.kill()  # never leave a half-started daemon behind
        raise
    return m.group(1).decode()


async def test_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    state = tmp_path / "kms"
    env = _env(tmp_path)
    proc, endpoint = await _start(state, env)
    acked: dict[str, str] = {}  # key id -> description
    aliases: dict[str, str] = {}
    enough = trio.Event()
    interrupted: list[int] = []

    async def writer(worker: int) -> None:
        client = KmsClient(endpoint=endpoint, credentials=CREDS)
        i = 0
        try:
            while True:
                desc = f"w{worker}-{i}"
                made = await client.call("CreateKey", {"Description": desc})
                kid = made["KeyMetadata"]["KeyId"]
                acked[kid] = desc
                if i % 4 == 0:
                    await client.call(
                        "CreateAlias", {"AliasName": f"alias/{desc}", "TargetKeyId": kid}
                    )
                    aliases[f"alias/{desc}"] = kid
                i += 1
                if len(acked) >= 100:
                    enough.set()
        except (OSError, trio.BrokenResourceError, KmsApiError):
            interrupted.append(worker)  # died mid-request: that request was not acknowledged

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for w in range(3):
                nursery.start_soon(writer, w)
            await enough.wait()
            proc.kill()  # SIGKILL while the writers are mid-stream
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 100
    assert sorted(interrupted) == [0, 1, 2]  # every writer was cut off by the kill

    proc2, endpoint2 = await _start(state, env)
    try:
        client = KmsClient(endpoint=endpoint2, credentials=CREDS)
        with trio.fail_after(30):
            listed = await client.call("ListKeys", {"Limit": 1000})
            present = {k["KeyId"] for k in listed["Keys"]}
            assert set(acked) <= present
            for kid, desc in acked.items():
                meta = (await client.call("DescribeKey", {"KeyId": kid}))["KeyMetadata"]
                assert meta["Description"] == desc
                assert meta["KeyState"] == "Enabled"
            for name, kid in aliases.items():
                meta = (await client.call("DescribeKey", {"KeyId": name}))["KeyMetadata"]
                assert meta["KeyId"] == kid
            # Key material is intact: every acknowledged key still encrypts and decrypts.
            for kid in list(acked)[:: max(1, len(acked) // 10)]:
                blob = (await client.call("Encrypt", {"KeyId": kid, "Plaintext": "aGk="}))[
                    "CiphertextBlob"
                ]
                assert (await client.call("Decrypt", {"CiphertextBlob": blob}))[
                    "Plaintext"
                ] == "aGk="
            await client.aclose()
    finally:
        # Graceful stop: SIGTERM -> exit status 0.
        proc2.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await proc2.wait()
    assert proc2.returncode == 0
    assert verify_audit_log(state / "audit.jsonl", _master(state)) >= len(acked)


async def test_sigterm_exits_cleanly_under_load(tmp_path: Path) -> None:
    """SIGTERM while clients are busy: exit status 0, and every acknowledged key is durable."""
    env = _env(tmp_path)
    state = tmp_path / "kms"
    proc, endpoint = await _start(state, env)
    acked: list[str] = []

    async def create_forever() -> None:
        client = KmsClient(endpoint=endpoint, credentials=CREDS)
        try:
            while True:
                made = await client.call("CreateKey", {"Description": "during shutdown"})
                acked.append(made["KeyMetadata"]["KeyId"])
        except (OSError, trio.BrokenResourceError, KmsApiError):
            return  # refused or closed by the shutting-down daemon

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(create_forever)
            while len(acked) < 5:
                await trio.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    assert proc.returncode == 0
    assert verify_audit_log(state / "audit.jsonl", _master(state)) >= len(acked)
    proc2, endpoint2 = await _start(state, env)
    try:
        client = KmsClient(endpoint=endpoint2, credentials=CREDS)
        with trio.fail_after(20):
            listed = await client.call("ListKeys", {"Limit": 1000})
            assert set(acked) <= {k["KeyId"] for k in listed["Keys"]}
            await client.aclose()
    finally:
        proc2.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await proc2.wait()


def test_refuses_to_start_without_credentials(tmp_path: Path) -> None:
    env = _env(tmp_path)
    del env["ENCLAVE_KMS_ACCESS_KEY_ID"], env["ENCLAVE_KMS_SECRET_ACCESS_KEY"]
    out = subprocess.run(
        [sys.executable, "-m", "kms", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "ENCLAVE_KMS_ACCESS_KEY_ID" in out.stderr
    assert "kms listening" not in out.stderr
    assert not (tmp_path / "master.key").exists()


def test_enclave_kms_serve_with_config_and_seed(tmp_path: Path) -> None:
    """`enclave kms serve --config` with a seed: fixed key id, alias and policy are served."""
    import base64

    seed = tmp_path / "seed.json"
    seed.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        "key_id": "11111111-2222-3333-4444-555555555555",
                        "material": base64.b64encode(bytes(range(32))).decode(),
                        "aliases": ["alias/seeded"],
                    }
                ]
            }
        )
    )
    config = tmp_path / "kms.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\nstate_dir = "state"\nseed_file = "{seed.name}"\n'
        '[[credentials]]\naccess_key_id = "AKIDCFG"\nsecret_access_key = "cfg-secret"\n'
        'principal_arn = "arn:aws:iam::111122223333:user/cfg"\n'
    )
    env = _env(tmp_path)
    enclave = str(Path(sys.executable).parent / "enclave")

    async def main() -> None:
        log_path = tmp_path / "serve.log"
        with log_path.open("ab") as log_file:
            proc = await trio.lowlevel.open_process(
                [enclave, "kms", "serve", "--config", str(config)], env=env, stderr=log_file
            )
        endpoint = await _wait_listening(proc, log_path)
        with trio.fail_after(30):
            client = KmsClient(endpoint=endpoint, credentials=Credentials("AKIDCFG", "cfg-secret"))
            meta = (await client.call("DescribeKey", {"KeyId": "alias/seeded"}))["KeyMetadata"]
            assert meta["KeyId"] == "11111111-2222-3333-4444-555555555555"
            await client.aclose()
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        assert proc.returncode == 0

    trio.run(main)
    assert (tmp_path / "state" / "kms.sqlite3").exists()


def _master(state: Path) -> MasterKey:
    return MasterKey(read_master_key(state, {}))
