"""The AWS CLI (its own argument parsing and blob handling) drives ML-DSA and ML-KEM keys
against a real daemon; results are checked with ``cryptography``."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from .helpers import ADMIN, DaemonThread, aws_cli

pytestmark = pytest.mark.timeout(120)


def _ok(daemon: DaemonThread, *args: str) -> dict[str, Any]:
    code, out, err = aws_cli(daemon.endpoint, ADMIN, *args)
    assert code == 0, err
    assert isinstance(out, dict)
    return out


def test_aws_cli_signs_with_ml_dsa(daemon: DaemonThread, tmp_path: Path) -> None:
    meta = _ok(daemon, "create-key", "--key-spec", "ML_DSA_65", "--key-usage", "SIGN_VERIFY")
    key_id = meta["KeyMetadata"]["KeyId"]
    public = serialization.load_der_public_key(
        base64.b64decode(_ok(daemon, "get-public-key", "--key-id", key_id)["PublicKey"])
    )
    assert isinstance(public, mldsa.MLDSA65PublicKey)
    (tmp_path / "msg").write_bytes(b"release v3")
    signed = _ok(
        daemon, "sign", "--key-id", key_id, "--message", f"fileb://{tmp_path / 'msg'}",
        "--message-type", "RAW", "--signing-algorithm", "ML_DSA_SHAKE_256",
    )  # fmt: skip
    public.verify(base64.b64decode(signed["Signature"]), b"release v3")
    # An external mu from a file, as AWS's offline example does it.
    hasher = mldsa.MLDSAMuHasher(public)
    hasher.update(b"x" * 100_000)
    (tmp_path / "mu").write_bytes(hasher.finalize())
    signed = _ok(
        daemon, "sign", "--key-id", key_id, "--message", f"fileb://{tmp_path / 'mu'}",
        "--message-type", "EXTERNAL_MU", "--signing-algorithm", "ML_DSA_SHAKE_256",
    )  # fmt: skip
    public.verify(base64.b64decode(signed["Signature"]), b"x" * 100_000)
    code, _, err = aws_cli(
        daemon.endpoint, ADMIN, "sign", "--key-id", key_id, "--message",
        f"fileb://{tmp_path / 'msg'}", "--message-type", "DIGEST",
        "--signing-algorithm", "ML_DSA_SHAKE_256",
    )  # fmt: skip
    assert code != 0
    assert "ValidationException" in err


def test_aws_cli_encapsulates_and_decapsulates(daemon: DaemonThread, tmp_path: Path) -> None:
    meta = _ok(
        daemon, "create-key", "--key-spec", "ML_KEM_1024", "--key-usage", "ENCAPSULATE_DECAPSULATE"
    )
    key_id = meta["KeyMetadata"]["KeyId"]
    public = serialization.load_der_public_key(
        base64.b64decode(_ok(daemon, "get-public-key", "--key-id", key_id)["PublicKey"])
    )
    assert isinstance(public, mlkem.MLKEM1024PublicKey)
    secret, ciphertext = public.encapsulate()
    (tmp_path / "ct").write_bytes(ciphertext)
    out = _ok(
        daemon, "decapsulate", "--key-id", key_id, "--shared-secret-ciphertext-blob",
        f"fileb://{tmp_path / 'ct'}", "--encapsulation-algorithm", "ML_KEM",
    )  # fmt: skip
    assert base64.b64decode(out["SharedSecret"]) == secret
    enc = _ok(daemon, "encapsulate", "--key-id", key_id, "--encapsulation-algorithm", "ML_KEM")
    (tmp_path / "ct2").write_bytes(base64.b64decode(enc["SharedSecretCiphertextBlob"]))
    dec = _ok(
        daemon, "decapsulate", "--key-id", key_id, "--shared-secret-ciphertext-blob",
        f"fileb://{tmp_path / 'ct2'}", "--encapsulation-algorithm", "ML_KEM",
    )  # fmt: skip
    assert dec["SharedSecret"] == enc["SharedSecret"]
