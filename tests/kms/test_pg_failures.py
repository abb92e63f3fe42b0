"""Failures with real processes on one PostgreSQL database: ``kill -9`` of one of two daemons
under load, and the database restarted under load. The figures (requests acknowledged, failed,
by error type) are printed for the report (``pytest -s``)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from botocore.exceptions import BotoCoreError, ClientError

from kms.config import MASTER_KEY_ENV
from kms.integrity import MasterKey
from kms.pg.audit import verify_pg_audit
from kms.pgtemp import TempPostgres

from .conftest import boto_client
from .helpers import ADMIN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

#: The retryable AWS errors a client may see while the database is away.
RETRYABLE = {"KMSInternalException", "DependencyTimeoutException"}


class Daemon:
    """``python -m kms --storage URL`` as a real process, stderr to a file."""

    def __init__(
        self, tmp: Path, name: str, url: str, master_b64: str, *, workers: int = 1
    ) -> None:
        self.state = tmp / name
        self.state.mkdir()
        self.log_path = tmp / f"{name}-{uuid.uuid4().hex[:8]}.log"
        env = dict(os.environ)
        env.update(
            {
                "ENCLAVE_KMS_ACCESS_KEY_ID": ADMIN.access_key_id,
                "ENCLAVE_KMS_SECRET_ACCESS_KEY": ADMIN.secret_access_key,
                MASTER_KEY_ENV: master_b64,
                "ENCLAVE_LOG_LEVEL": "warning",
            }
        )
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kms",
                    "--listen",
                    "127.0.0.1:0",
                    "--state-dir",
                    str(self.state),
                    "--storage",
                    url,
                    "--workers",
                    str(workers),
                ],
                env=env,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        pattern = re.compile(rb"kms listening on (http://\S+)")
        while (m := pattern.search(self.log_path.read_bytes())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"daemon did not start: {self.log_path.read_text()}")
            time.sleep(0.02)
        self.endpoint = m.group(1).decode()

    def client(self) -> Any:
        return boto_client(self.endpoint, ADMIN, connect_timeout=5, read_timeout=30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def master_b64() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def daemons(tmp_path: Path, pg_url: str, master_b64: str) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        for name in ("a", "b"):
            started.append(Daemon(tmp_path, name, pg_url, master_b64))
        yield started
    finally:
        for d in started:
            d.stop()


class Load:
    """Client threads creating keys (and every other one an alias) through given daemons,
    recording what was acknowledged (with its request id) and what failed, by error."""

    def __init__(self) -> None:
        self.acked: dict[str, str] = {}  # key id -> description
        self.aliases: dict[str, str] = {}
        self.request_ids: set[str] = set()
        self.errors: Counter[str] = Counter()
        self.ok_after: Counter[str] = Counter()  # acknowledged per phase
        self.phase = "before"
        self.stop = threading.Event()
        self._guard = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, daemon: Daemon, n: int) -> None:
        for i in range(n):
            t = threading.Thread(target=self._run, args=(daemon, f"{daemon.state.name}{i}"))
            t.start()
            self._threads.append(t)

    def _run(self, daemon: Daemon, tag: str) -> None:
        kms = daemon.client()
        i = 0
        while not self.stop.is_set():
            desc = f"{tag}-{i}"
            i += 1
            try:
                made = kms.create_key(Description=desc)
                kid = made["KeyMetadata"]["KeyId"]
                with self._guard:
                    self.acked[kid] = desc
                    self.request_ids.add(made["ResponseMetadata"]["RequestId"])
                    self.ok_after[self.phase] += 1
                if i % 2 == 0:
                    done = kms.create_alias(AliasName=f"alias/{desc}", TargetKeyId=kid)
                    with self._guard:
                        self.aliases[f"alias/{desc}"] = kid
                        self.request_ids.add(done["ResponseMetadata"]["RequestId"])
            except ClientError as exc:
                with self._guard:
                    self.errors[exc.response["Error"]["Code"]] += 1
            except BotoCoreError as exc:  # the daemon died mid-request: not acknowledged
                with self._guard:
                    self.errors[type(exc).__name__] += 1
                if daemon.proc.poll() is not None:
                    return
                time.sleep(0.01)

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)
            assert not t.is_alive()

    def wait_for(self, phase: str, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.ok_after[phase] < count:
            assert time.monotonic() < deadline, f"{phase}: {self.ok_after} {self.errors}"
            time.sleep(0.02)


def _audit_request_ids(url: str) -> set[str]:
    with psycopg.connect(url) as c:
        return {
            json.loads(line)["request_id"]
            for (line,) in c.execute("SELECT line FROM kms_audit_log")
            if "request_id" in line
        }


def test_kill_9_of_one_of_two_daemons_under_load(
    daemons: list[Daemon], pg_url: str, master_b64: str
) -> None:
    a, b = daemons
    load = Load()
    load.start(a, 3)
    load.start(b, 3)
    load.wait_for("before", 60)
    a.proc.kill()  # SIGKILL mid-stream
    a.proc.wait(10)
    with load._guard:
        load.phase = "after"
    load.wait_for("after", 40)  # the survivor keeps serving
    load.join()
    assert a.proc.returncode == -signal.SIGKILL

    # Every acknowledged key and alias is there, through the survivor, and works.
    kms = b.client()
    present = {k["KeyId"] for k in kms.list_keys(Limit=1000)["Keys"]}
    while len(present) < len(load.acked):
        page = kms.list_keys(Limit=1000, Marker=sorted(present)[-1])
        if not page["Keys"]:
            break
        present |= {k["KeyId"] for k in page["Keys"]}
    missing = set(load.acked) - present
    assert not missing
    for name, kid in load.aliases.items():
        assert kms.describe_key(KeyId=name)["KeyMetadata"]["KeyId"] == kid
    for kid in list(load.acked)[:: max(1, len(load.acked) // 10)]:
        blob = kms.encrypt(KeyId=kid, Plaintext=b"hi")["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"hi"
    # The survivor never failed a request; only the killed daemon's clients saw errors.
    cut_off = {"ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError"}
    assert set(load.errors) <= cut_off
    assert b.stop() == 0

    # No acknowledged request's audit line is lost, and the chain is one valid chain.
    chain, lines = verify_pg_audit(pg_url, MasterKey(base64.b64decode(master_b64)))
    assert chain == 1
    assert load.request_ids <= _audit_request_ids(pg_url)
    print(
        f"\nkill -9 under load: acknowledged {len(load.acked)} keys + {len(load.aliases)} aliases "
        f"({load.ok_after['before']} keys before the kill, {load.ok_after['after']} after, all "
        f"through the survivor); 0 missing; audit chain {lines} lines valid, all "
        f"{len(load.request_ids)} acknowledged request ids in it; client errors "
        f"{dict(load.errors)}"
    )


def test_database_restart_under_load_fails_retryably_then_recovers(
    daemons: list[Daemon], pg_server: TempPostgres, pg_url: str, master_b64: str
) -> None:
    a, b = daemons
    load = Load()
    load.start(a, 2)
    load.start(b, 2)
    load.wait_for("before", 20)
    with load._guard:
        load.phase = "down"
    pg_server.stop(mode="immediate")  # as after a crash: the next start recovers from the WAL
    time.sleep(1.5)  # requests keep coming while it is away
    down_errors = sum(load.errors.values())
    with load._guard:
        load.phase = "after"
    pg_server.start()
    load.wait_for("after", 20)  # both daemons serve again, without being restarted
    load.join()

    assert down_errors > 0
    # While it was away every failure was a typed, retryable AWS error (no reset, no hang).
    assert set(load.errors) <= RETRYABLE, load.errors
    for d in (a, b):
        kms = d.client()
        kid = kms.create_key(Description="after restart")["KeyMetadata"]["KeyId"]
        assert kms.describe_key(KeyId=kid)["KeyMetadata"]["Enabled"]
    present = set()
    kms = a.client()
    marker: dict[str, str] = {}
    while True:
        page = kms.list_keys(Limit=1000, **marker)
        present |= {k["KeyId"] for k in page["Keys"]}
        if not page.get("Truncated"):
            break
        marker = {"Marker": page["NextMarker"]}
    assert set(load.acked) <= present
    for d in (a, b):
        assert d.stop() == 0
    chain, lines = verify_pg_audit(pg_url, MasterKey(base64.b64decode(master_b64)))
    assert load.request_ids <= _audit_request_ids(pg_url)
    print(
        f"\ndatabase restart under load: {load.ok_after['before']} acknowledged before, "
        f"{load.ok_after['down']} while stopping, {load.ok_after['after']} after; failures "
        f"{dict(load.errors)} (all retryable); 0 acknowledged keys missing; audit chain "
        f"{chain} has {lines} valid lines holding every acknowledged request"
    )
