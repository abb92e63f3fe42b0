"""The daemon's HTTP surface: SigV4 failures, malformed requests, limits, keep-alive, AWS CLI."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.client import Credentials, KmsClient
from kms.errors import KmsApiError
from kms.sigv4 import sign_headers

from .conftest import boto_client
from .helpers import ADMIN, DaemonThread

pytestmark = pytest.mark.timeout(60)


def _raw(
    daemon: DaemonThread, request: bytes, *, read_all: bool = True
) -> tuple[int, dict[str, Any]]:
    """Send raw bytes, return (status, JSON body)."""
    assert daemon.address is not None
    with socket.create_connection(daemon.address, timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    status = int(head.split(b" ")[1])
    return status, json.loads(body) if body else {}


def _signed(
    daemon: DaemonThread,
    operation: str,
    payload: Any,
    *,
    secret: str = ADMIN.secret_access_key,
    access_key: str = ADMIN.access_key_id,
    now: datetime | None = None,
    region: str = "us-east-1",
    body_override: bytes | None = None,
) -> bytes:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = sign_headers(
        method="POST",
        host=f"{daemon.address[0]}:{daemon.address[1]}" if daemon.address else "x",
        path="/",
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{operation}",
        },
        body=body,
        access_key_id=access_key,
        secret_access_key=secret,
        session_token=None,
        region=region,
        service="kms",
        now=now or datetime.now(UTC),
    )
    sent = body if body_override is None else body_override
    lines = ["POST / HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(sent)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + sent


def test_unsigned_request(daemon: DaemonThread) -> None:
    req = (
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.ListKeys\r\n"
        b"Content-Type: application/x-amz-json-1.1\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, body = _raw(daemon, req)
    assert status == 400
    assert body["__type"] == "MissingAuthenticationTokenException"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"secret": "wrong"}, "InvalidSignatureException"),
        ({"access_key": "AKIDUNKNOWN"}, "UnrecognizedClientException"),
        # Offsets from the time the request is signed, not absolute times: a time taken at
        # collection is already minutes old when a loaded run reaches this test, and "6 min
        # ahead" then falls inside the daemon's 5 min window.
        ({"skew": -timedelta(minutes=6)}, "InvalidSignatureException"),
        ({"skew": timedelta(minutes=6)}, "InvalidSignatureException"),
        ({"region": "eu-west-1"}, "InvalidSignatureException"),
        ({"body_override": b'{"Limit": 1}'}, "InvalidSignatureException"),
    ],
    ids=["bad-secret", "unknown-key", "stale", "future", "wrong-region", "body-changed"],
)
def test_sigv4_failures(daemon: DaemonThread, kwargs: dict[str, Any], expected: str) -> None:
    kwargs = dict(kwargs)
    if "skew" in kwargs:
        kwargs["now"] = datetime.now(UTC) + kwargs.pop("skew")
    status, body = _raw(daemon, _signed(daemon, "ListKeys", {"Limit": 2}, **kwargs))
    assert status == 400
    assert body["__type"] == expected
    if kwargs.get("now"):
        assert "Signature" in body["message"]


def test_incomplete_authorization(daemon: DaemonThread) -> None:
    req = (
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.ListKeys\r\n"
        b"Authorization: AWS4-HMAC-SHA256 Credential=AKIDADMIN/20260101/us-east-1/kms/"
        b"aws4_request\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, body = _raw(daemon, req)
    assert status == 400
    assert body["__type"] == "IncompleteSignatureException"


def test_stale_signature_from_client_clock(daemon: DaemonThread) -> None:
    async def main() -> None:
        stale = lambda: datetime.now(UTC) - timedelta(minutes=10)  # noqa: E731
        client = KmsClient(
            endpoint=daemon.endpoint,
            clock=stale,
            credentials=Credentials(ADMIN.access_key_id, ADMIN.secret_access_key),
        )
        with trio.fail_after(10), pytest.raises(KmsApiError) as err:
            await client.call("ListKeys", {})
        assert err.value.type_name == "InvalidSignatureException"
        assert "Signature expired" in err.value.message
        await client.aclose()

    trio.run(main)


@pytest.mark.parametrize(
    ("operation", "payload", "expected"),
    [
        ("ListKeys", b"{not json", "SerializationException"),
        ("ListKeys", b"[1, 2]", "SerializationException"),
        ("ListKeys", b'{"Limit": "ten"}', "SerializationException"),
        ("ListKeys", b'{"Limit": 0}', "ValidationException"),
        ("Encrypt", b'{"KeyId": "alias/x", "Plaintext": "***"}', "SerializationException"),
        ("Encrypt", b'{"KeyId": "alias/x"}', "ValidationException"),
        ("Encrypt", b'{"KeyId": 5, "Plaintext": "eA=="}', "SerializationException"),
        (
            "Encrypt",
            b'{"KeyId": "k", "Plaintext": "eA==", "EncryptionContext": {"a": 1}}',
            "SerializationException",
        ),
        (
            "Decrypt",
            b'{"CiphertextBlob": "eA==", "CiphertextBlob": "eA=="}',
            "SerializationException",
        ),
        ("ListKeys", b"[" * 5000 + b"]" * 5000, "SerializationException"),
        ("DoSomethingElse", b"{}", "UnknownOperationException"),
    ],
    ids=[
        "bad-json",
        "array",
        "wrong-type",
        "range",
        "bad-base64",
        "missing",
        "int-key",
        "ctx-type",
        "duplicate-member",
        "deep",
        "unknown-op",
    ],
)
def test_malformed_requests(
    daemon: DaemonThread, operation: str, payload: bytes, expected: str
) -> None:
    status, body = _raw(daemon, _signed(daemon, operation, payload))
    assert status == 400
    assert body["__type"] == expected


def test_huge_body_is_refused(daemon: DaemonThread) -> None:
    payload = json.dumps({"Plaintext": base64.b64encode(os.urandom(60_000)).decode()}).encode()
    status, body = _raw(daemon, _signed(daemon, "Encrypt", payload))
    assert status == 413
    assert body["__type"] == "RequestEntityTooLargeException"


def test_oversized_headers_and_garbage(daemon: DaemonThread) -> None:
    huge = b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    status, _ = _raw(daemon, huge)
    assert status in (400, 431)
    status, _ = _raw(daemon, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400
    status, _body = _raw(daemon, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405


def test_keep_alive_reuses_connection(daemon: DaemonThread) -> None:
    async def main() -> None:
        client = KmsClient(
            endpoint=daemon.endpoint,
            credentials=Credentials(ADMIN.access_key_id, ADMIN.secret_access_key),
        )
        with trio.fail_after(10):
            await client.call("ListKeys", {})
            first = client._conn
            for _ in range(5):
                await client.call("GenerateRandom", {"NumberOfBytes": 4})
            assert client._conn is first
            assert first is not None
        await client.aclose()

    trio.run(main)


def test_aws_cli_encrypt_decrypt(daemon: DaemonThread, tmp_path: Path) -> None:
    admin = boto_client(daemon.endpoint, ADMIN)
    kid = admin.create_key()["KeyMetadata"]["KeyId"]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ADMIN.access_key_id,
        "AWS_SECRET_ACCESS_KEY": ADMIN.secret_access_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    aws = [str(Path(sys.executable).parent / "aws"), "--endpoint-url", daemon.endpoint, "kms"]
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"hello from the aws cli")
    enc = subprocess.run(
        [
            *aws,
            "encrypt",
            "--key-id",
            kid,
            "--plaintext",
            f"fileb://{plain}",
            "--encryption-context",
            "app=cli",
            "--output",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    blob = json.loads(enc.stdout)["CiphertextBlob"]
    (tmp_path / "blob").write_bytes(base64.b64decode(blob))
    dec = subprocess.run(
        [
            *aws,
            "decrypt",
            "--ciphertext-blob",
            f"fileb://{tmp_path / 'blob'}",
            "--encryption-context",
            "app=cli",
            "--output",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert base64.b64decode(json.loads(dec.stdout)["Plaintext"]) == b"hello from the aws cli"
    bad = subprocess.run(
        [*aws, "decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'blob'}", "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    assert "InvalidCiphertextException" in bad.stderr


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    garbage=st.one_of(
        st.binary(min_size=1, max_size=2048),
        st.builds(
            lambda h, b: b"POST / HTTP/1.1\r\n" + h + b"\r\n\r\n" + b,
            st.binary(max_size=300),
            st.binary(max_size=300),
        ),
    )
)
def test_garbage_never_breaks_the_daemon(daemon: DaemonThread, garbage: bytes) -> None:
    assert daemon.address is not None
    with socket.create_connection(daemon.address, timeout=10) as s:
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
    status, body = _raw(daemon, _signed(daemon, "ListKeys", {"Limit": 1}))
    assert status == 200
    assert "Keys" in body
