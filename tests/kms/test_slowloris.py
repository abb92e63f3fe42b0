"""Issue 10 item 6: slow and partial requests (slowloris) with real sockets on loopback.

The daemon runs in a thread of this process (real TCP listener); the attacker is plain sockets
from the same address as the legitimate boto3 caller, as in the report (one local process)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.config import KmsConfig
from kms.daemon import MAX_CONNECTIONS, MAX_HEAD_BYTES

from .conftest import boto_client
from .helpers import ADMIN, DaemonThread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: More partial requests than the daemon has slots: before the fix they held every slot and a
#: legitimate caller waited in the backlog until its own timeout.
ATTACKERS = MAX_CONNECTIONS + 100


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonThread]:
    config = KmsConfig(
        host="127.0.0.1",
        port=0,
        state_dir=tmp_path / "state",
        credentials=(ADMIN,),
        request_timeout_s=30.0,  # longer than the test: eviction, not timeouts, must save it
    )
    with DaemonThread(config) as d:
        yield d


def _connect(address: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(address, timeout=10)
    s.settimeout(10)
    return s


def test_boto3_is_served_while_partial_requests_hold_connections(daemon: DaemonThread) -> None:
    assert daemon.address is not None
    kms = boto_client(daemon.endpoint, ADMIN, connect_timeout=10, read_timeout=10)
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    attackers: list[socket.socket] = []
    try:
        for i in range(ATTACKERS):
            s = _connect(daemon.address)
            # An unauthenticated request head that never ends.
            s.sendall(f"POST / HTTP/1.1\r\nHost: kms\r\nX-Slow-{i}: ".encode())
            attackers.append(s)
        fresh = boto_client(daemon.endpoint, ADMIN, connect_timeout=10, read_timeout=10)
        for _ in range(3):
            out = fresh.encrypt(KeyId=key, Plaintext=b"still served")
            assert out["KeyId"].endswith(key)
        # The daemon displaced partial requests instead of holding a slot for each.
        closed = 0
        for s in attackers:
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except BlockingIOError:
                pass
            except ConnectionError:
                closed += 1
        assert closed >= ATTACKERS - daemon.config.max_connections_per_source
        # The caller that authenticated earlier keeps its connection and is served too.
        assert (
            kms.decrypt(CiphertextBlob=kms.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"])[
                "Plaintext"
            ]
            == b"x"
        )
    finally:
        for s in attackers:
            s.close()


def _read_reply(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_request_head_is_limited_to_16_kib(daemon: DaemonThread) -> None:
    """Before: a complete head up to one receive (64 KiB) was accepted."""
    assert daemon.address is not None
    filler = "a" * (MAX_HEAD_BYTES + 1024)
    with _connect(daemon.address) as s:
        s.sendall(f"POST / HTTP/1.1\r\nHost: kms\r\nX-Big: {filler}\r\n\r\n".encode())
        reply = _read_reply(s)
    assert reply.startswith(b"HTTP/1.1 431 ")
    # A head just under the limit is still read (and refused only for its missing signature).
    filler = "a" * (MAX_HEAD_BYTES - 200)
    with _connect(daemon.address) as s:
        s.sendall(
            f"POST / HTTP/1.1\r\nHost: kms\r\nContent-Length: 2\r\nX-Big: {filler}\r\n\r\n"
            "{}".encode()
        )
        reply = _read_reply(s)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"MissingAuthenticationTokenException" in reply


def test_unauthenticated_connection_is_closed_after_its_reply(daemon: DaemonThread) -> None:
    assert daemon.address is not None
    with _connect(daemon.address) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: kms\r\nContent-Length: 2\r\n\r\n{}")
        reply = _read_reply(s)  # returns only because the daemon closed the connection
    assert b"connection: close" in reply.lower()


def test_request_that_starts_must_finish_in_time(tmp_path: Path) -> None:
    config = KmsConfig(
        host="127.0.0.1",
        port=0,
        state_dir=tmp_path / "state",
        credentials=(ADMIN,),
        request_timeout_s=0.5,
    )
    with DaemonThread(config) as d:
        assert d.address is not None
        with _connect(d.address) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: kms\r\nContent-Length: 100\r\n\r\n{")
            reply = _read_reply(s)  # the body never completes: the daemon answers and closes
        assert reply.startswith(b"HTTP/1.1 408 ")


def _signed_request(endpoint: str, target: str, payload: dict[str, object]) -> bytes:
    """One SigV4-signed KMS request as raw HTTP/1.1 bytes (botocore's own signer)."""
    import json

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    body = json.dumps(payload).encode()
    request = AWSRequest(
        method="POST",
        url=endpoint + "/",
        data=body,
        headers={
            "X-Amz-Target": f"TrentService.{target}",
            "Content-Type": "application/x-amz-json-1.1",
        },
    )
    SigV4Auth(
        Credentials(ADMIN.access_key_id, ADMIN.secret_access_key), "kms", "us-east-1"
    ).add_auth(request)
    host = endpoint.split("://", 1)[1]
    head = ["POST / HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() != "host"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


#: Pipelined requests of the client that never reads (one signed request, replayed).
ATTACK_REQUESTS = 20_000


def test_a_client_that_never_reads_its_replies_loses_its_connection(tmp_path: Path) -> None:
    """Before: a normal reply had no send bound, so an authenticated client that pipelined
    requests and never read held a connection task (and a slot) for as long as it liked. Now
    a reply left unread for request_timeout_s closes the connection; other callers are
    served meanwhile."""
    config = KmsConfig(
        host="127.0.0.1",
        port=0,
        state_dir=tmp_path / "state",
        credentials=(ADMIN,),
        request_timeout_s=0.5,
        audit_fsync=False,  # (speed: many requests)
    )
    with DaemonThread(config) as d:
        assert d.address is not None
        request = _signed_request(d.endpoint, "GenerateRandom", {"NumberOfBytes": 1024})
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: fills fast
        s.settimeout(10)
        s.connect(d.address)
        sent = 0
        try:
            # ~1.4 KB per answer, 28 MB in all: far more than the socket buffers hold (the
            # daemon's grows to 4 MiB on loopback). The daemon stops
            # reading requests while it is blocked on an answer, so our sends block too; a
            # send that fails (the daemon gave up and closed) ends the attack early.
            s.settimeout(2)
            for _ in range(ATTACK_REQUESTS):
                s.sendall(request)
                sent += 1
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass
        # Meanwhile other callers are served.
        kms = boto_client(d.endpoint, ADMIN, connect_timeout=10, read_timeout=10)
        assert len(kms.generate_random(NumberOfBytes=16)["Plaintext"]) == 16
        # Now read: what was buffered arrives, then the end of the connection (before the fix
        # the daemon went on answering and kept the connection: this read timed out).
        s.settimeout(10)
        received = b""
        try:
            while chunk := s.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            pass
        s.close()
        answers = received.count(b"HTTP/1.1 200 ")
        assert 0 < answers < sent
