"""``--workers N``: real worker processes sharing one socket, one store and one audit chain.

Which worker serves a connection is the kernel's choice; the tests find out (from /proc: the
worker holding the server end of the connection) and pick connections that land on different
workers, so that "made through one, used through another" is really tested.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from kms.app import read_master_key
from kms.audit import verify_audit_log
from kms.integrity import MasterKey
from kms.sigv4 import sign_headers
from kms.workers import MAX_RESTARTS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEY_ID, SECRET = "AKIDWORKERS", "workers-secret"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_KMS_")}
    env.update(
        ENCLAVE_KMS_ACCESS_KEY_ID=KEY_ID,
        ENCLAVE_KMS_SECRET_ACCESS_KEY=SECRET,
        ENCLAVE_LOG_LEVEL="info",
    )
    return env


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    endpoint: str
    state: Path
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def workers(self) -> set[int]:
        """Pids of the parent's live children (its workers)."""
        pid = self.proc.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except FileNotFoundError:
            return set()
        return {int(p) for p in text.split()}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def daemon(tmp_path: Path, workers: int = 2, name: str = "kms") -> Iterator[Daemon]:
    state = tmp_path / name
    log_path = tmp_path / f"{name}-{uuid.uuid4().hex[:8]}.log"
    with log_path.open("wb") as log:
        argv = ["--listen", "127.0.0.1:0", "--state-dir", str(state), "--workers", str(workers)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "kms", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=_env(),
        )
    try:
        match = _wait(
            lambda: proc.poll() is None
            and re.search(r"kms listening on (http://\S+)", log_path.read_text()),
            60,
            "the daemon to listen",
        )
        d = Daemon(proc, match.group(1), state, log_path)
        assert len(d.workers()) == (workers if workers > 1 else 0)  # 1: in-process
        yield d
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Conn:
    """One keep-alive HTTP connection, SigV4-signed calls, and the worker serving it."""

    def __init__(self, d: Daemon) -> None:
        self.http = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
        self.http.connect()
        self.daemon = d

    def worker(self) -> int:
        return _serving_pid(self.http.sock.getsockname()[1], self.daemon)

    def call(self, operation: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
        body = json.dumps(payload).encode()
        headers = sign_headers(
            method="POST",
            host=f"127.0.0.1:{self.daemon.port}",
            path="/",
            headers={
                "Content-Type": "application/x-amz-json-1.1",
                "X-Amz-Target": f"TrentService.{operation}",
            },
            body=body,
            access_key_id=KEY_ID,
            secret_access_key=SECRET,
            session_token=None,
            region="us-east-1",
            service="kms",
            now=datetime.now(UTC),
        )
        self.http.request("POST", "/", body=body, headers=headers)
        resp = self.http.getresponse()
        data = json.loads(resp.read() or b"{}")
        return resp.status, data, resp.getheader("x-amzn-RequestId") or ""

    def ok(self, operation: str, payload: dict[str, Any]) -> dict[str, Any]:
        status, data, _ = self.call(operation, payload)
        assert status == 200, (operation, data)
        return data

    def close(self) -> None:
        self.http.close()


def _serving_pid(client_port: int, d: Daemon) -> int:
    """The worker holding the server end of the connection from ``client_port``."""
    want = f"0100007F:{d.port:04X} 0100007F:{client_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if f"{fields[1]} {fields[2]}" == want:
            inode = fields[9]
    assert inode is not None, "connection not found in /proc/net/tcp"
    for pid in d.workers():
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


def _established(pid: int, d: Daemon) -> int:
    """Client connections the worker ``pid`` holds."""
    local = f"0100007F:{d.port:04X}"
    inodes = {
        f"socket:[{fields[9]}]"
        for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
        if fields[1] == local and fields[3] == "01"  # ESTABLISHED
    }
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            held += os.readlink(fd) in inodes
        except OSError:
            continue
    return held


def _owner(sock: socket.socket, d: Daemon) -> int | None:
    """The worker that accepted ``sock``'s connection, once one has."""
    try:
        return _serving_pid(sock.getsockname()[1], d)
    except AssertionError:
        return None  # still in the listen backlog


def _conns_on_distinct_workers(d: Daemon, n: int = 2) -> list[Conn]:
    """Open connections until ``n`` of them are served by different workers."""
    chosen: dict[int, Conn] = {}
    spare: list[Conn] = []
    for _ in range(200):
        conn = Conn(d)
        conn.ok("ListKeys", {})  # served: its worker has accepted it
        pid = conn.worker()
        if pid in chosen:
            spare.append(conn)
        else:
            chosen[pid] = conn
        if len(chosen) == n:
            break
    for conn in spare:
        conn.close()
    assert len(chosen) == n, "the kernel never handed a connection to the other worker"
    return list(chosen.values())


def _master(state: Path) -> MasterKey:
    return MasterKey(read_master_key(state, {}))


# ------------------------------------------------------------------ shared state


def test_a_change_through_one_worker_is_seen_through_another_at_once(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        a, b = _conns_on_distinct_workers(d)
        key = a.ok("CreateKey", {"Description": "made in a"})["KeyMetadata"]["KeyId"]
        blob = b.ok("Encrypt", {"KeyId": key, "Plaintext": base64.b64encode(b"hi").decode()})
        assert a.ok("Decrypt", {"CiphertextBlob": blob["CiphertextBlob"]})["Plaintext"] == (
            base64.b64encode(b"hi").decode()
        )
        a.ok("CreateAlias", {"AliasName": "alias/shared", "TargetKeyId": key})
        assert b.ok("DescribeKey", {"KeyId": "alias/shared"})["KeyMetadata"]["KeyId"] == key
        b.ok("DisableKey", {"KeyId": key})
        status, err, _ = a.call("Encrypt", {"KeyId": key, "Plaintext": "aGk="})
        assert (status, err["__type"]) == (400, "DisabledException")
        policy = json.loads(a.ok("GetKeyPolicy", {"KeyId": key, "PolicyName": "default"})["Policy"])
        policy["Statement"][0]["Sid"] = "ChangedInB"
        b.ok("PutKeyPolicy", {"KeyId": key, "PolicyName": "default", "Policy": json.dumps(policy)})
        got = a.ok("GetKeyPolicy", {"KeyId": key, "PolicyName": "default"})["Policy"]
        assert json.loads(got)["Statement"][0]["Sid"] == "ChangedInB"
        a.ok("EnableKey", {"KeyId": key})
        b.ok("ScheduleKeyDeletion", {"KeyId": key, "PendingWindowInDays": 7})
        status, err, _ = a.call("Encrypt", {"KeyId": key, "Plaintext": "aGk="})
        assert err["__type"] == "KMSInvalidStateException"
        a.close()
        b.close()


def test_concurrent_rotations_through_two_workers_are_serialised(tmp_path: Path) -> None:
    """Each rotation reads the key's versions and adds the next: without the cross-process
    writer lock two workers pick the same version number and one write fails."""
    with daemon(tmp_path) as d:
        a, b = _conns_on_distinct_workers(d)
        key = a.ok("CreateKey", {})["KeyMetadata"]["KeyId"]
        blobs = [a.ok("Encrypt", {"KeyId": key, "Plaintext": "djE="})["CiphertextBlob"]]
        errors: list[Any] = []

        def rotate(conn: Conn) -> None:
            for _ in range(5):  # 10 in all: AWS's on-demand rotation quota
                status, data, _ = conn.call("RotateKeyOnDemand", {"KeyId": key})
                if status != 200:
                    errors.append(data)
                blobs.append(
                    conn.ok("Encrypt", {"KeyId": key, "Plaintext": "djI="})["CiphertextBlob"]
                )

        threads = [threading.Thread(target=rotate, args=(c,)) for c in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        for conn in (a, b):
            for blob in blobs:
                conn.ok("Decrypt", {"CiphertextBlob": blob})
        versions = {base64.b64decode(b)[:64] for b in blobs}  # header: key id and version
        assert len(versions) == 11  # every ciphertext under its own version 1..11
        a.close()
        b.close()


def test_the_parent_holds_the_state_lock_and_a_second_daemon_is_refused(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        assert (d.state / "kms.lock").read_text().strip() == str(d.proc.pid)
        second = subprocess.run(
            [sys.executable, "-m", "kms", "--listen", "127.0.0.1:0", "--state-dir", str(d.state)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        assert f"pid {d.proc.pid}" in errors[0]
        Conn(d).ok("ListKeys", {})  # the first daemon is untouched


def test_kept_alive_connections_are_spread_over_the_workers(tmp_path: Path) -> None:
    """Eight clients connecting together: each worker gets its share, not 7 or 8 of them."""
    with daemon(tmp_path) as d:
        conns = [Conn(d) for _ in range(8)]
        for conn in conns:
            conn.ok("ListKeys", {})
        per_worker: dict[int, int] = {}
        for conn in conns:
            per_worker[conn.worker()] = per_worker.get(conn.worker(), 0) + 1
            conn.close()
        assert sorted(per_worker.values()) in ([4, 4], [3, 5])


# ------------------------------------------------------------------ failures


def _boto(endpoint: str) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5),
    )


def test_kill_9_of_a_worker_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    acked_keys: dict[str, str] = {}
    acked_requests: set[str] = set()
    failed = 0
    stop = threading.Event()
    lock = threading.Lock()

    def load(endpoint: str, n: int) -> None:
        nonlocal failed
        client = _boto(endpoint)
        i = 0
        while not stop.is_set():
            try:
                made = client.create_key(Description=f"c{n}-{i}")
                key = made["KeyMetadata"]["KeyId"]
                blob = client.encrypt(KeyId=key, Plaintext=b"x")
                out = client.decrypt(CiphertextBlob=blob["CiphertextBlob"])
                with lock:
                    acked_keys[key] = f"c{n}-{i}"
                    for r in (made, blob, out):
                        acked_requests.add(r["ResponseMetadata"]["RequestId"])
            except (BotoCoreError, ClientError):
                with lock:
                    failed += 1  # cut off with the killed worker: not acknowledged
            i += 1

    with daemon(tmp_path) as d:
        before = d.workers()
        threads = [threading.Thread(target=load, args=(d.endpoint, n)) for n in range(4)]
        for t in threads:
            t.start()
        _wait(lambda: len(acked_keys) >= 40, 60, "load before the kill")
        victim = max(before, key=lambda pid: _established(pid, d))
        # A request surely in flight on the victim: half sent when the worker dies.
        inflight = None
        for _ in range(100):
            sock, rest = _partial_request(d)
            _wait(lambda s=sock: _owner(s, d), 10, "the partial request's worker")
            if _owner(sock, d) == victim:
                inflight = sock
                break
            sock.close()
        assert inflight is not None
        os.kill(victim, signal.SIGKILL)
        replaced = _wait(
            lambda: len(d.workers()) == 2 and victim not in d.workers() and d.workers(),
            60,
            "the replacement worker",
        )
        count = len(acked_keys)
        _wait(lambda: len(acked_keys) >= count + 40, 60, "load after the kill")
        stop.set()
        for t in threads:
            t.join(60)
        assert replaced - before  # a new pid
        try:
            inflight.sendall(rest)
            assert inflight.recv(65536) == b""  # no answer: that request was never acknowledged
        except ConnectionError:
            pass
        inflight.close()
        assert d.proc.poll() is None
        assert "kms_worker_died" in d.log_text()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
    audit = d.state / "audit.jsonl"
    assert verify_audit_log(audit, _master(d.state)) > 0
    ids = {json.loads(line)["request_id"] for line in audit.read_text().splitlines()}
    assert acked_requests <= ids  # every acknowledged request has its audit record
    with daemon(tmp_path, workers=1) as d2:
        client = _boto(d2.endpoint)
        present = {k["KeyId"] for k in client.list_keys(Limit=1000)["Keys"]}
        assert set(acked_keys) <= present
        for key, desc in list(acked_keys.items())[::10]:
            assert client.describe_key(KeyId=key)["KeyMetadata"]["Description"] == desc
    print(f"kill -9 of a worker: {len(acked_keys)} keys and {len(acked_requests)} requests "
          f"acknowledged, {failed} requests cut off, none lost")  # fmt: skip


def _partial_request(d: Daemon) -> tuple[socket.socket, bytes]:
    """A connection whose request is in flight: head and half the body sent."""
    body = b"{}"
    headers = sign_headers(
        method="POST",
        host=f"127.0.0.1:{d.port}",
        path="/",
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService.ListKeys",
        },
        body=body,
        access_key_id=KEY_ID,
        secret_access_key=SECRET,
        session_token=None,
        region="us-east-1",
        service="kms",
        now=datetime.now(UTC),
    )
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    wire = f"POST / HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    sock = socket.create_connection(("127.0.0.1", d.port), timeout=30)
    sock.sendall(wire[:-1])
    return sock, wire[-1:]


def test_sigterm_drains_requests_in_flight_in_every_worker(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        inflight: list[tuple[socket.socket, bytes]] = []
        by_worker: dict[int, int] = {}
        for _ in range(200):  # until each worker holds two requests in flight
            sock, rest = _partial_request(d)
            owner = _wait(lambda s=sock: _owner(s, d), 10, "the request's worker")
            if by_worker.get(owner, 0) < 2:
                by_worker[owner] = by_worker.get(owner, 0) + 1
                inflight.append((sock, rest))
            else:
                sock.close()
            if len(by_worker) == 2 and min(by_worker.values()) == 2:
                break
        assert sorted(by_worker.values()) == [2, 2]
        d.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", d.port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        _wait(refused, 30, "every listener to close")  # the workers are draining now
        for sock, rest in inflight:
            sock.sendall(rest)
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
            assert b"connection: close" in reply.lower()
            sock.close()
        assert d.proc.wait(30) == 0


def test_the_daemon_killed_takes_its_workers_with_it(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        workers = d.workers()
        d.proc.kill()
        d.proc.wait()

        def gone() -> bool:
            return not any(Path(f"/proc/{pid}").exists() for pid in workers)

        _wait(gone, 30, "the workers to die with the parent")
    with daemon(tmp_path, workers=2) as again:  # the state directory is free at once
        assert Conn(again).ok("ListKeys", {})["Keys"] == []


def test_workers_that_keep_dying_stop_the_daemon(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        killed: set[int] = set()
        for _ in range(MAX_RESTARTS + 1):
            live = _wait(lambda: d.workers() - killed if len(d.workers()) == 2 else None, 60,
                         "a worker to kill")  # fmt: skip
            victim = min(live)
            killed.add(victim)
            os.kill(victim, signal.SIGKILL)
        assert d.proc.wait(60) == 1
        errors = [line for line in d.log_text().splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        assert f"died {MAX_RESTARTS + 1} times" in errors[0]
        assert d.workers() == set()
