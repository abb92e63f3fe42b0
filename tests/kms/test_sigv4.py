"""SigV4 (pure): our verifier accepts what botocore signs, and rejects every alteration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.sigv4 import SecretEntry, SigV4Failure, sign_headers, verify_request

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
SECRETS = {
    "AKID": SecretEntry("s3cr3t", "arn:aws:iam::111122223333:user/a"),
    "AKTOK": SecretEntry("tok-secret", "arn:aws:iam::111122223333:user/t", session_token="TOKEN"),
}


def _botocore_signed(body: bytes, *, key: str = "AKID", token: str | None = None) -> AWSRequest:
    req = AWSRequest(
        method="POST",
        url="http://127.0.0.1:4599/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService.Encrypt",
        },
    )
    creds = BotoCredentials(key, SECRETS[key].secret_access_key, token)
    SigV4Auth(creds, "kms", "us-east-1").add_auth(req)  # signs with the real clock
    return req


def _verify(
    headers: list[tuple[str, str]], body: bytes, *, now: datetime = NOW, target: str = "/"
) -> Any:
    return verify_request(
        method="POST",
        target=target,
        headers=headers,
        body=body,
        lookup=SECRETS.get,
        region="us-east-1",
        now=now,
    )


def _headers(req: AWSRequest) -> list[tuple[str, str]]:
    headers = [(k, str(v)) for k, v in req.headers.items()]
    if not any(k.lower() == "host" for k, _ in headers):
        headers.append(("Host", "127.0.0.1:4599"))
    return headers


def test_botocore_signature_verifies() -> None:
    body = b'{"KeyId": "alias/x", "Plaintext": "aGk="}'
    got = _verify(_headers(_botocore_signed(body)), body, now=datetime.now(UTC))
    assert got.principal_arn == SECRETS["AKID"].principal_arn
    assert got.access_key_id == "AKID"


def test_session_token() -> None:
    body = b"{}"
    now = datetime.now(UTC)
    assert _verify(_headers(_botocore_signed(body, key="AKTOK", token="TOKEN")), body, now=now)
    with pytest.raises(SigV4Failure) as e:
        _verify(_headers(_botocore_signed(body, key="AKTOK", token="WRONG")), body, now=now)
    assert e.value.type_name == "UnrecognizedClientException"
    with pytest.raises(SigV4Failure) as e:
        _verify(_headers(_botocore_signed(body, key="AKTOK")), body, now=now)
    assert e.value.type_name == "UnrecognizedClientException"


def test_own_signer_matches_verifier() -> None:
    body = b'{"a": 1}'
    headers = sign_headers(
        method="POST",
        host="h:1",
        path="/",
        headers={"X-Amz-Target": "T.X"},
        body=body,
        access_key_id="AKID",
        secret_access_key="s3cr3t",
        session_token=None,
        region="us-east-1",
        service="kms",
        now=NOW,
    )
    assert _verify(list(headers.items()), body)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda h: [(k, v) for k, v in h if k.lower() != "authorization"],
            "MissingAuthenticationTokenException",
        ),
        (
            lambda h: [
                (k, v.replace("Signature=", "Signature=0")) if k == "Authorization" else (k, v)
                for k, v in h
            ],
            "InvalidSignatureException",
        ),
        (
            lambda h: [(k, "T.Decrypt") if k == "X-Amz-Target" else (k, v) for k, v in h],
            "InvalidSignatureException",
        ),
        (
            lambda h: [
                (k, v.replace("AKID/", "NOPE/")) if k == "Authorization" else (k, v) for k, v in h
            ],
            "UnrecognizedClientException",
        ),
        (
            lambda h: [
                (k, v.replace("/kms/", "/s3/")) if k == "Authorization" else (k, v) for k, v in h
            ],
            "InvalidSignatureException",
        ),
        (
            lambda h: [(k, "20261122T130000Z") if k == "X-Amz-Date" else (k, v) for k, v in h],
            "InvalidSignatureException",
        ),
        (
            lambda h: [(k, "garbage") if k == "X-Amz-Date" else (k, v) for k, v in h],
            "IncompleteSignatureException",
        ),
        (
            lambda h: [
                (k, "AWS4-HMAC-SHA256 Credential=AKID") if k == "Authorization" else (k, v)
                for k, v in h
            ],
            "IncompleteSignatureException",
        ),
        (
            lambda h: [(k, "Basic Zm9vOmJhcg==") if k == "Authorization" else (k, v) for k, v in h],
            "IncompleteSignatureException",
        ),
    ],
    ids=[
        "unsigned",
        "bad-signature",
        "target-changed",
        "unknown-key",
        "wrong-service",
        "date-changed",
        "bad-date",
        "incomplete",
        "other-scheme",
    ],
)
def test_alterations_rejected(mutate: Any, expected: str) -> None:
    body = b"{}"
    headers = sign_headers(
        method="POST",
        host="h:1",
        path="/",
        headers={"X-Amz-Target": "T.X", "Content-Type": "x"},
        body=body,
        access_key_id="AKID",
        secret_access_key="s3cr3t",
        session_token=None,
        region="us-east-1",
        service="kms",
        now=NOW,
    )
    with pytest.raises(SigV4Failure) as e:
        _verify(mutate(list(headers.items())), body)
    assert e.value.type_name == expected


def test_clock_skew_window() -> None:
    body = b"{}"
    headers = list(
        sign_headers(
            method="POST",
            host="h",
            path="/",
            headers={},
            body=body,
            access_key_id="AKID",
            secret_access_key="s3cr3t",
            session_token=None,
            region="us-east-1",
            service="kms",
            now=NOW,
        ).items()
    )
    assert _verify(headers, body, now=NOW + timedelta(minutes=4, seconds=59))
    for delta in (timedelta(minutes=5, seconds=1), -timedelta(minutes=5, seconds=1)):
        with pytest.raises(SigV4Failure) as e:
            _verify(headers, body, now=NOW + delta)
        assert e.value.type_name == "InvalidSignatureException"


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=256), flip=st.integers(min_value=0, max_value=10_000))
def test_any_body_change_is_detected(body: bytes, flip: int) -> None:
    headers = list(
        sign_headers(
            method="POST",
            host="h",
            path="/",
            headers={},
            body=body,
            access_key_id="AKID",
            secret_access_key="s3cr3t",
            session_token=None,
            region="us-east-1",
            service="kms",
            now=NOW,
        ).items()
    )
    assert _verify(headers, body)
    changed = bytearray(body or b"\x00")
    changed[flip % len(changed)] ^= 1 + (flip % 255)
    if bytes(changed) != body:
        with pytest.raises(SigV4Failure):
            _verify(headers, bytes(changed))
