"""``enclave kms serve --storage postgresql://...`` with worker processes, and ``enclave kms
audit verify --storage``, as real processes; a password in the URL never reaches the logs."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from kms.pgtemp import TempPostgres

from .helpers import ADMIN
from .test_pg_failures import Daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _verify(url: str, master_b64: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENCLAVE_LOG_LEVEL"}
    env["ENCLAVE_KMS_MASTER_KEY"] = master_b64
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "kms", "audit", "verify", "--storage", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_workers_on_postgres_and_audit_verify_in_the_database(
    tmp_path: Path, pg_server: TempPostgres, pg_url: str
) -> None:
    master_b64 = base64.b64encode(os.urandom(32)).decode()
    # The password in the URL (not the recommended way): it must never be shown or logged.
    name = pg_url.rsplit("/", 1)[1]
    with_password = pg_server.url(name, password=True)
    daemon = Daemon(tmp_path, "w", with_password, master_b64, workers=2)
    try:
        kms = daemon.client()
        kids = [kms.create_key(Description=f"k{i}")["KeyMetadata"]["KeyId"] for i in range(10)]
        for kid in kids:  # the connections land on both workers; each sees every key
            blob = daemon.client().encrypt(KeyId=kid, Plaintext=b"w")["CiphertextBlob"]
            assert daemon.client().decrypt(CiphertextBlob=blob)["Plaintext"] == b"w"
    finally:
        assert daemon.stop() == 0
    log = daemon.log_path.read_text()
    assert pg_server.password not in log
    with psycopg.connect(pg_url) as c:
        apps = c.execute("SELECT count(*) FROM kms_audit_log").fetchone()
    assert apps is not None

    done = _verify(pg_url, master_b64)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {"ok": True, "lines": apps[0], "keyed": True, "chain": 1}
    assert report["lines"] >= 30

    with psycopg.connect(pg_url, autocommit=True) as c:  # an operator edits one line
        c.execute(
            "UPDATE kms_audit_log SET line = replace(line, 'Encrypt', 'Decrypt') "
            "WHERE seq = (SELECT min(seq) FROM kms_audit_log WHERE line LIKE '%Encrypt%')"
        )
    done = _verify(pg_url, master_b64)
    assert done.returncode == 1
    assert json.loads(done.stdout)["ok"] is False
    assert "broken at line" in done.stderr
    assert ADMIN.secret_access_key not in done.stdout + done.stderr
