"""Hot-path shortcuts in the daemon are exact: cached SigV4 signing keys never let a wrong or
rotated secret through."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kms.sigv4 import SecretEntry, SigV4Failure, sign_headers, verify_request

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _signed(secret: str, body: bytes) -> list[tuple[str, str]]:
    headers = sign_headers(
        method="POST",
        host="h:1",
        path="/",
        headers={"X-Amz-Target": "TrentService.ListKeys", "Content-Type": "x"},
        body=body,
        access_key_id="AKIDCACHE",
        secret_access_key=secret,
        session_token=None,
        region="us-east-1",
        service="kms",
        now=NOW,
    )
    return list(headers.items())


def _verify(headers: list[tuple[str, str]], body: bytes, secret: str) -> None:
    verify_request(
        method="POST",
        target="/",
        headers=headers,
        body=body,
        lookup=lambda k: SecretEntry(secret, "arn:aws:iam::111122223333:user/x") if k else None,
        region="us-east-1",
        now=NOW,
    )


def test_cached_signing_key_never_accepts_a_wrong_secret() -> None:
    body = b"{}"
    _verify(_signed("right-secret", body), body, "right-secret")  # warms the cache
    with pytest.raises(SigV4Failure) as err:
        _verify(_signed("wrong-secret", body), body, "right-secret")
    assert err.value.type_name == "InvalidSignatureException"
    with pytest.raises(SigV4Failure):
        # the daemon's secret changed (config reload): the old signature no longer verifies
        _verify(_signed("right-secret", body), body, "rotated-secret")
    _verify(_signed("right-secret", body), body, "right-secret")
