"""ML-DSA keys (FIPS 204) through boto3 against a real daemon: CreateKey, DescribeKey,
GetPublicKey, Sign and Verify with RAW and EXTERNAL_MU messages, as AWS documents them.

Every signature is checked independently with ``cryptography`` against the DER public key KMS
returns, and the external mu is computed twice: with ``cryptography``'s ``MLDSAMuHasher`` and
with hashlib's SHAKE256 following FIPS 204 §6.2 (the recipe of AWS's offline verification
example). The system ``openssl`` (3.0 here) has no ML-DSA, so it is not used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from kms.config import KmsConfig

from .conftest import boto_client
from .helpers import ADMIN, ALL_CREDS, ENCLAVE, DaemonThread

pytestmark = pytest.mark.timeout(120)

_SPECS = ("ML_DSA_44", "ML_DSA_65", "ML_DSA_87")
_PUBLIC = {
    "ML_DSA_44": mldsa.MLDSA44PublicKey,
    "ML_DSA_65": mldsa.MLDSA65PublicKey,
    "ML_DSA_87": mldsa.MLDSA87PublicKey,
}
#: FIPS 204 Table 2: signature bytes of each parameter set.
_SIGNATURE_BYTES = {"ML_DSA_44": 2420, "ML_DSA_65": 3309, "ML_DSA_87": 4627}
_ALG = "ML_DSA_SHAKE_256"
_MESSAGE = b"a model owner's release manifest"


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


@pytest.fixture(scope="module")
def admin(daemon: DaemonThread) -> Any:
    return boto_client(daemon.endpoint, ADMIN)


@pytest.fixture(scope="module")
def keys(admin: Any) -> dict[str, dict[str, Any]]:
    return {
        spec: admin.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")["KeyMetadata"]
        for spec in _SPECS
    }


def _public(admin: Any, key_id: str) -> Any:
    return serialization.load_der_public_key(admin.get_public_key(KeyId=key_id)["PublicKey"])


def _mu_by_hand(public: Any, message: bytes) -> bytes:
    """FIPS 204 §6.2 with an empty context: mu = SHAKE256(tr || 0 || 0 || M), tr = H(pk, 64)."""
    tr = hashlib.shake_256(public.public_bytes_raw()).digest(64)
    return hashlib.shake_256(tr + b"\x00\x00" + message).digest(64)


def _mu(public: Any, message: bytes) -> bytes:
    hasher = mldsa.MLDSAMuHasher(public)
    hasher.update(message)
    mu = hasher.finalize()
    assert mu == _mu_by_hand(public, message)
    return mu


@pytest.mark.parametrize("spec", _SPECS)
def test_metadata_and_public_key(admin: Any, keys: dict[str, dict[str, Any]], spec: str) -> None:
    meta = keys[spec]
    assert meta["KeySpec"] == spec
    assert meta["KeyUsage"] == "SIGN_VERIFY"
    assert meta["KeyState"] == "Enabled"
    assert meta["SigningAlgorithms"] == [_ALG]
    # The deprecated CustomerMasterKeySpec's enum has no ML-DSA value: AWS leaves it out.
    assert "CustomerMasterKeySpec" not in meta
    assert "EncryptionAlgorithms" not in meta
    assert admin.describe_key(KeyId=meta["KeyId"])["KeyMetadata"]["SigningAlgorithms"] == [_ALG]
    out = admin.get_public_key(KeyId=meta["KeyId"])
    assert (out["KeySpec"], out["KeyUsage"], out["SigningAlgorithms"]) == (
        spec,
        "SIGN_VERIFY",
        [_ALG],
    )
    assert "CustomerMasterKeySpec" not in out
    public = serialization.load_der_public_key(out["PublicKey"])
    assert isinstance(public, _PUBLIC[spec])
    # DER SubjectPublicKeyInfo, byte for byte what cryptography writes for that key.
    assert out["PublicKey"] == public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("spec", _SPECS)
def test_sign_raw_verified_independently(
    admin: Any, keys: dict[str, dict[str, Any]], spec: str
) -> None:
    key_id = keys[spec]["KeyId"]
    public = _public(admin, key_id)
    for message in (_MESSAGE, b"\x00", b"m" * 4096):  # RAW: up to 4096 bytes (AWS)
        signed = admin.sign(
            KeyId=key_id, Message=message, MessageType="RAW", SigningAlgorithm=_ALG
        )
        assert signed["SigningAlgorithm"] == _ALG
        assert signed["KeyId"].endswith(key_id)
        signature = signed["Signature"]
        assert len(signature) == _SIGNATURE_BYTES[spec]
        public.verify(signature, message)  # pure ML-DSA, empty context
        public.verify_mu(signature, _mu(public, message))
        with pytest.raises(InvalidSignature):
            public.verify(signature, message + b"!")
        ok = admin.verify(KeyId=key_id, Message=message, Signature=signature, SigningAlgorithm=_ALG)
        assert ok["SignatureValid"] is True
        assert ok["SigningAlgorithm"] == _ALG
    # MessageType defaults to RAW.
    signature = admin.sign(KeyId=key_id, Message=_MESSAGE, SigningAlgorithm=_ALG)["Signature"]
    public.verify(signature, _MESSAGE)


@pytest.mark.parametrize("spec", _SPECS)
def test_external_mu_signs_messages_of_any_size(
    admin: Any, keys: dict[str, dict[str, Any]], spec: str
) -> None:
    key_id = keys[spec]["KeyId"]
    public = _public(admin, key_id)
    big = bytes(range(256)) * 4096  # 1 MiB: far beyond RAW's 4096 bytes
    mu = _mu(public, big)
    signed = admin.sign(KeyId=key_id, Message=mu, MessageType="EXTERNAL_MU", SigningAlgorithm=_ALG)
    signature = signed["Signature"]
    # The signature over mu is an ordinary ML-DSA signature over the whole message.
    public.verify(signature, big)
    with pytest.raises(InvalidSignature):
        public.verify(signature, big[:-1])
    assert admin.verify(
        KeyId=key_id,
        Message=mu,
        MessageType="EXTERNAL_MU",
        Signature=signature,
        SigningAlgorithm=_ALG,
    )["SignatureValid"]
    # RAW and EXTERNAL_MU are two doors to one signature scheme: each verifies the other's.
    raw_sig = admin.sign(KeyId=key_id, Message=_MESSAGE, SigningAlgorithm=_ALG)["Signature"]
    assert admin.verify(
        KeyId=key_id,
        Message=_mu(public, _MESSAGE),
        MessageType="EXTERNAL_MU",
        Signature=raw_sig,
        SigningAlgorithm=_ALG,
    )["SignatureValid"]
    mu_sig = admin.sign(
        KeyId=key_id,
        Message=_mu(public, _MESSAGE),
        MessageType="EXTERNAL_MU",
        SigningAlgorithm=_ALG,
    )["Signature"]
    assert admin.verify(KeyId=key_id, Message=_MESSAGE, Signature=mu_sig, SigningAlgorithm=_ALG)[
        "SignatureValid"
    ]


def test_verify_refuses_bad_signatures(admin: Any, keys: dict[str, dict[str, Any]]) -> None:
    key_id = keys["ML_DSA_65"]["KeyId"]
    other = keys["ML_DSA_44"]["KeyId"]
    signature = admin.sign(KeyId=key_id, Message=_MESSAGE, SigningAlgorithm=_ALG)["Signature"]
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    for key, message, sig in (
        (key_id, _MESSAGE + b"x", signature),  # another message
        (key_id, _MESSAGE, tampered),  # a flipped bit
        (key_id, _MESSAGE, signature[:-1]),  # truncated
        (key_id, _MESSAGE, signature + b"\x00"),  # too long
        (other, _MESSAGE, signature),  # another key (and another parameter set)
    ):
        with pytest.raises(ClientError) as e:
            admin.verify(KeyId=key, Message=message, Signature=sig, SigningAlgorithm=_ALG)
        # AWS answers an error, never SignatureValid=false.
        assert _code(e) == "KMSInvalidSignatureException"


def test_sign_rules(admin: Any, keys: dict[str, dict[str, Any]]) -> None:
    key_id = keys["ML_DSA_44"]["KeyId"]
    ec_key = admin.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"][
        "KeyId"
    ]
    cases = [
        # DIGEST is not a message type of ML-DSA (AWS): no HashML-DSA.
        (key_id, _ALG, "DIGEST", b"d" * 64, "ValidationException"),
        # an external mu is exactly 64 bytes
        (key_id, _ALG, "EXTERNAL_MU", b"m" * 32, "ValidationException"),
        (key_id, _ALG, "EXTERNAL_MU", b"m" * 65, "ValidationException"),
        # a RAW message beyond the model's 4096 bytes
        (key_id, _ALG, "RAW", b"m" * 4097, "ValidationException"),
        # an algorithm of another spec, and ML-DSA's algorithm on an ECC key
        (key_id, "ECDSA_SHA_256", "RAW", _MESSAGE, "InvalidKeyUsageException"),
        (ec_key, _ALG, "RAW", _MESSAGE, "InvalidKeyUsageException"),
        # EXTERNAL_MU with an algorithm that is not ML-DSA's
        (ec_key, "ECDSA_SHA_256", "EXTERNAL_MU", b"m" * 64, "ValidationException"),
    ]
    for key, alg, kind, message, code in cases:
        with pytest.raises(ClientError) as e:
            admin.sign(KeyId=key, Message=message, MessageType=kind, SigningAlgorithm=alg)
        assert _code(e) == code, (alg, kind, len(message))
        with pytest.raises(ClientError) as e:
            admin.verify(
                KeyId=key,
                Message=message,
                MessageType=kind,
                Signature=b"s" * 2420,
                SigningAlgorithm=alg,
            )
        assert _code(e) == code, ("verify", alg, kind, len(message))
    with pytest.raises(ClientError) as e:  # DryRun: authorized, nothing signed
        admin.sign(KeyId=key_id, Message=_MESSAGE, SigningAlgorithm=_ALG, DryRun=True)
    assert _code(e) == "DryRunOperationException"


def test_create_key_rules(admin: Any) -> None:
    for usage in ("ENCRYPT_DECRYPT", "KEY_AGREEMENT", "GENERATE_VERIFY_MAC"):
        with pytest.raises(ClientError) as e:
            admin.create_key(KeySpec="ML_DSA_65", KeyUsage=usage)
        assert _code(e) == "ValidationException", usage
    # SIGN_VERIFY is the spec's only usage: it may be left out.
    meta = admin.create_key(KeySpec="ML_DSA_65")["KeyMetadata"]
    assert meta["KeyUsage"] == "SIGN_VERIFY"
    # An ML-DSA key has no use for encryption or MACs.
    with pytest.raises(ClientError) as e:
        admin.encrypt(KeyId=meta["KeyId"], Plaintext=b"x")
    assert _code(e) == "InvalidKeyUsageException"
    with pytest.raises(ClientError) as e:
        admin.generate_mac(KeyId=meta["KeyId"], Message=b"x", MacAlgorithm="HMAC_SHA_256")
    assert _code(e) == "InvalidKeyUsageException"


def test_key_states(admin: Any) -> None:
    key_id = admin.create_key(KeySpec="ML_DSA_44", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    signature = admin.sign(KeyId=key_id, Message=_MESSAGE, SigningAlgorithm=_ALG)["Signature"]
    admin.disable_key(KeyId=key_id)
    for call in (
        lambda: admin.sign(KeyId=key_id, Message=_MESSAGE, SigningAlgorithm=_ALG),
        lambda: admin.verify(
            KeyId=key_id, Message=_MESSAGE, Signature=signature, SigningAlgorithm=_ALG
        ),
        lambda: admin.get_public_key(KeyId=key_id),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert _code(e) == "DisabledException"
    admin.enable_key(KeyId=key_id)
    assert admin.verify(
        KeyId=key_id, Message=_MESSAGE, Signature=signature, SigningAlgorithm=_ALG
    )["SignatureValid"]
    admin.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(ClientError) as e:
        admin.sign(KeyId=key_id, Message=_MESSAGE, SigningAlgorithm=_ALG)
    assert _code(e) == "KMSInvalidStateException"
    assert admin.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingDeletion"


def _admin_only_policy() -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "Admin",
                    "Effect": "Allow",
                    "Principal": {"AWS": ADMIN.principal_arn},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        }
    )


def test_grants_and_policy(daemon: DaemonThread, admin: Any) -> None:
    key_id = admin.create_key(
        KeySpec="ML_DSA_65", KeyUsage="SIGN_VERIFY", Policy=_admin_only_policy()
    )["KeyMetadata"]["KeyId"]
    signer = boto_client(daemon.endpoint, ENCLAVE)
    with pytest.raises(ClientError) as e:
        signer.sign(KeyId=key_id, Message=_MESSAGE, SigningAlgorithm=_ALG)
    assert _code(e) == "AccessDeniedException"
    grant = admin.create_grant(
        KeyId=key_id, GranteePrincipal=ENCLAVE.principal_arn, Operations=["Sign"]
    )
    signature = signer.sign(
        KeyId=key_id, Message=_MESSAGE, SigningAlgorithm=_ALG, GrantTokens=[grant["GrantToken"]]
    )["Signature"]
    _public(admin, key_id).verify(signature, _MESSAGE)
    with pytest.raises(ClientError) as e:  # only the operations granted
        signer.verify(KeyId=key_id, Message=_MESSAGE, Signature=signature, SigningAlgorithm=_ALG)
    assert _code(e) == "AccessDeniedException"
    admin.revoke_grant(KeyId=key_id, GrantId=grant["GrantId"])
    with pytest.raises(ClientError) as e:
        signer.sign(KeyId=key_id, Message=_MESSAGE, SigningAlgorithm=_ALG)
    assert _code(e) == "AccessDeniedException"


def test_key_survives_restart(tmp_path: Path) -> None:
    config = KmsConfig(
        host="127.0.0.1", port=0, state_dir=tmp_path / "state", credentials=ALL_CREDS
    )
    with DaemonThread(config) as d:
        admin = boto_client(d.endpoint, ADMIN)
        key_id = admin.create_key(KeySpec="ML_DSA_87", KeyUsage="SIGN_VERIFY")["KeyMetadata"][
            "KeyId"
        ]
        public_der = admin.get_public_key(KeyId=key_id)["PublicKey"]
    with DaemonThread(config) as d:
        admin = boto_client(d.endpoint, ADMIN)
        assert admin.get_public_key(KeyId=key_id)["PublicKey"] == public_der
        signature = admin.sign(KeyId=key_id, Message=_MESSAGE, SigningAlgorithm=_ALG)["Signature"]
    serialization.load_der_public_key(public_der).verify(  # type: ignore[call-arg, union-attr]
        signature, _MESSAGE
    )
