"""ML-KEM keys (FIPS 203) through boto3 against a real daemon: CreateKey, DescribeKey,
GetPublicKey, Encapsulate and Decapsulate, as AWS documents them.

Independent checks with ``cryptography``: a client encapsulates to the public key KMS returns
and KMS decapsulates the same secret; and, with key material the owner generated and imported
(BYOK), what KMS encapsulates the owner decapsulates locally.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mlkem

from .conftest import boto_client
from .helpers import ADMIN, ENCLAVE, DaemonThread
from .test_byok import wrap

pytestmark = pytest.mark.timeout(120)

_SPECS = ("ML_KEM_768", "ML_KEM_1024")
_USAGE = "ENCAPSULATE_DECAPSULATE"
_PRIVATE = {"ML_KEM_768": mlkem.MLKEM768PrivateKey, "ML_KEM_1024": mlkem.MLKEM1024PrivateKey}
_PUBLIC = {"ML_KEM_768": mlkem.MLKEM768PublicKey, "ML_KEM_1024": mlkem.MLKEM1024PublicKey}
#: FIPS 203 Table 3: ciphertext bytes.
_CIPHERTEXT_BYTES = {"ML_KEM_768": 1088, "ML_KEM_1024": 1568}


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


@pytest.fixture(scope="module")
def admin(daemon: DaemonThread) -> Any:
    return boto_client(daemon.endpoint, ADMIN)


@pytest.fixture(scope="module")
def keys(admin: Any) -> dict[str, dict[str, Any]]:
    return {
        spec: admin.create_key(KeySpec=spec, KeyUsage=_USAGE)["KeyMetadata"] for spec in _SPECS
    }


def _public(admin: Any, key_id: str) -> Any:
    return serialization.load_der_public_key(admin.get_public_key(KeyId=key_id)["PublicKey"])


@pytest.mark.parametrize("spec", _SPECS)
def test_metadata_and_public_key(admin: Any, keys: dict[str, dict[str, Any]], spec: str) -> None:
    meta = keys[spec]
    assert (meta["KeySpec"], meta["KeyUsage"], meta["KeyState"]) == (spec, _USAGE, "Enabled")
    assert meta["EncapsulationAlgorithms"] == ["ML_KEM"]
    assert "CustomerMasterKeySpec" not in meta  # the deprecated field's enum has no ML-KEM
    assert "SigningAlgorithms" not in meta
    assert "EncryptionAlgorithms" not in meta
    described = admin.describe_key(KeyId=meta["KeyId"])["KeyMetadata"]
    assert described["EncapsulationAlgorithms"] == ["ML_KEM"]
    out = admin.get_public_key(KeyId=meta["KeyId"])
    assert (out["KeySpec"], out["KeyUsage"], out["EncapsulationAlgorithms"]) == (
        spec,
        _USAGE,
        ["ML_KEM"],
    )
    public = serialization.load_der_public_key(out["PublicKey"])
    assert isinstance(public, _PUBLIC[spec])
    assert out["PublicKey"] == public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("spec", _SPECS)
def test_client_encapsulates_kms_decapsulates(
    admin: Any, keys: dict[str, dict[str, Any]], spec: str
) -> None:
    key_id = keys[spec]["KeyId"]
    public = _public(admin, key_id)
    secret, ciphertext = public.encapsulate()
    out = admin.decapsulate(
        KeyId=key_id, SharedSecretCiphertextBlob=ciphertext, EncapsulationAlgorithm="ML_KEM"
    )
    assert out["SharedSecret"] == secret
    assert out["EncapsulationAlgorithm"] == "ML_KEM"
    assert out["KeyId"].endswith(key_id)


@pytest.mark.parametrize("spec", _SPECS)
def test_kms_encapsulates(admin: Any, keys: dict[str, dict[str, Any]], spec: str) -> None:
    key_id = keys[spec]["KeyId"]
    out = admin.encapsulate(KeyId=key_id, EncapsulationAlgorithm="ML_KEM")
    assert out["KeyId"].endswith(key_id)
    assert out["EncapsulationAlgorithm"] == "ML_KEM"
    secret, ciphertext = out["SharedSecret"], out["SharedSecretCiphertextBlob"]
    assert len(secret) == 32
    assert len(ciphertext) == _CIPHERTEXT_BYTES[spec]
    again = admin.encapsulate(KeyId=key_id, EncapsulationAlgorithm="ML_KEM")
    assert again["SharedSecret"] != secret  # fresh randomness every time
    decapsulated = admin.decapsulate(
        KeyId=key_id, SharedSecretCiphertextBlob=ciphertext, EncapsulationAlgorithm="ML_KEM"
    )
    assert decapsulated["SharedSecret"] == secret


@pytest.mark.parametrize("spec", _SPECS)
def test_owner_decapsulates_what_kms_encapsulates(admin: Any, spec: str) -> None:
    """The reverse direction, checked outside KMS: an imported ML-KEM private key."""
    private = _PRIVATE[spec].generate()
    pkcs8 = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    kid = admin.create_key(Origin="EXTERNAL", KeySpec=spec, KeyUsage=_USAGE)["KeyMetadata"][
        "KeyId"
    ]
    with pytest.raises(ClientError) as e:  # pending import
        admin.encapsulate(KeyId=kid, EncapsulationAlgorithm="ML_KEM")
    assert _code(e) == "KMSInvalidStateException"
    algorithm = "RSA_AES_KEY_WRAP_SHA_256"
    params = admin.get_parameters_for_import(
        KeyId=kid, WrappingAlgorithm=algorithm, WrappingKeySpec="RSA_2048"
    )
    other = (mlkem.MLKEM1024PrivateKey if spec == "ML_KEM_768" else mlkem.MLKEM768PrivateKey)
    wrong = other.generate().private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ClientError) as e:  # material of the other parameter set
        admin.import_key_material(
            KeyId=kid,
            ImportToken=params["ImportToken"],
            EncryptedKeyMaterial=wrap(params["PublicKey"], algorithm, wrong),
            ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
        )
    assert _code(e) == "IncorrectKeyMaterialException"
    admin.import_key_material(
        KeyId=kid,
        ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=wrap(params["PublicKey"], algorithm, pkcs8),
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )
    assert admin.get_public_key(KeyId=kid)["PublicKey"] == private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out = admin.encapsulate(KeyId=kid, EncapsulationAlgorithm="ML_KEM")
    assert private.decapsulate(out["SharedSecretCiphertextBlob"]) == out["SharedSecret"]


def test_decapsulate_rejects_implicitly(admin: Any, keys: dict[str, dict[str, Any]]) -> None:
    key_id = keys["ML_KEM_768"]["KeyId"]
    secret, ciphertext = _public(admin, key_id).encapsulate()
    tampered = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    out = admin.decapsulate(
        KeyId=key_id, SharedSecretCiphertextBlob=tampered, EncapsulationAlgorithm="ML_KEM"
    )
    # AWS: a ciphertext of the right length always yields 32 bytes; a wrong one, unrelated ones.
    assert len(out["SharedSecret"]) == 32
    assert out["SharedSecret"] != secret
    # Another key's ciphertext of the same parameter set: also a pseudo-random secret.
    other = admin.create_key(KeySpec="ML_KEM_768", KeyUsage=_USAGE)["KeyMetadata"]["KeyId"]
    foreign = admin.decapsulate(
        KeyId=other, SharedSecretCiphertextBlob=ciphertext, EncapsulationAlgorithm="ML_KEM"
    )["SharedSecret"]
    assert len(foreign) == 32
    assert foreign != secret
    # Only a length that does not fit the spec is refused.
    for blob in (ciphertext[:-1], ciphertext + b"\x00", b"\x01", b"c" * 1568):
        with pytest.raises(ClientError) as e:
            admin.decapsulate(
                KeyId=key_id, SharedSecretCiphertextBlob=blob, EncapsulationAlgorithm="ML_KEM"
            )
        assert _code(e) == "InvalidCiphertextException", len(blob)


def test_usage_and_validation(admin: Any, keys: dict[str, dict[str, Any]]) -> None:
    kem = keys["ML_KEM_1024"]["KeyId"]
    rsa = admin.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    ecc = admin.create_key(KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")["KeyMetadata"][
        "KeyId"
    ]
    for other in (rsa, ecc):  # Encapsulate needs an ENCAPSULATE_DECAPSULATE key
        with pytest.raises(ClientError) as e:
            admin.encapsulate(KeyId=other, EncapsulationAlgorithm="ML_KEM")
        assert _code(e) == "InvalidKeyUsageException"
        with pytest.raises(ClientError) as e:
            admin.decapsulate(
                KeyId=other, SharedSecretCiphertextBlob=b"c" * 1088, EncapsulationAlgorithm="ML_KEM"
            )
        assert _code(e) == "InvalidKeyUsageException"
    # An ML-KEM key encapsulates and nothing else.
    for call in (
        lambda: admin.encrypt(KeyId=kem, Plaintext=b"x"),
        lambda: admin.sign(KeyId=kem, Message=b"x", SigningAlgorithm="ML_DSA_SHAKE_256"),
        lambda: admin.derive_shared_secret(
            KeyId=kem, KeyAgreementAlgorithm="ECDH", PublicKey=b"p" * 91
        ),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert _code(e) == "InvalidKeyUsageException"
    # The model's enum and bounds.
    with pytest.raises(ClientError) as e:
        admin.encapsulate(KeyId=kem, EncapsulationAlgorithm="ECDH")
    assert _code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:
        admin.decapsulate(
            KeyId=kem, SharedSecretCiphertextBlob=b"c" * 6145, EncapsulationAlgorithm="ML_KEM"
        )
    assert _code(e) == "ValidationException"
    # CreateKey: the one usage, and ML_KEM_512, which cryptography does not offer.
    for usage in ("ENCRYPT_DECRYPT", "KEY_AGREEMENT", "SIGN_VERIFY"):
        with pytest.raises(ClientError) as e:
            admin.create_key(KeySpec="ML_KEM_768", KeyUsage=usage)
        assert _code(e) == "ValidationException", usage
    assert admin.create_key(KeySpec="ML_KEM_768")["KeyMetadata"]["KeyUsage"] == _USAGE
    with pytest.raises(ClientError) as e:
        admin.create_key(KeySpec="ML_KEM_512", KeyUsage=_USAGE)
    assert _code(e) == "UnsupportedOperationException"
    assert "ML_KEM_512" in e.value.response["Error"]["Message"]
    assert "cryptography" in e.value.response["Error"]["Message"]
    # DryRun: authorized, nothing encapsulated or decapsulated.
    with pytest.raises(ClientError) as e:
        admin.encapsulate(KeyId=kem, EncapsulationAlgorithm="ML_KEM", DryRun=True)
    assert _code(e) == "DryRunOperationException"
    with pytest.raises(ClientError) as e:
        admin.decapsulate(
            KeyId=kem,
            SharedSecretCiphertextBlob=b"c" * 1568,
            EncapsulationAlgorithm="ML_KEM",
            DryRun=True,
        )
    assert _code(e) == "DryRunOperationException"


def test_key_states(admin: Any) -> None:
    key_id = admin.create_key(KeySpec="ML_KEM_768", KeyUsage=_USAGE)["KeyMetadata"]["KeyId"]
    secret, ciphertext = _public(admin, key_id).encapsulate()
    admin.disable_key(KeyId=key_id)
    for call in (
        lambda: admin.encapsulate(KeyId=key_id, EncapsulationAlgorithm="ML_KEM"),
        lambda: admin.decapsulate(
            KeyId=key_id, SharedSecretCiphertextBlob=ciphertext, EncapsulationAlgorithm="ML_KEM"
        ),
        lambda: admin.get_public_key(KeyId=key_id),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert _code(e) == "DisabledException"
    admin.enable_key(KeyId=key_id)
    assert (
        admin.decapsulate(
            KeyId=key_id, SharedSecretCiphertextBlob=ciphertext, EncapsulationAlgorithm="ML_KEM"
        )["SharedSecret"]
        == secret
    )
    admin.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(ClientError) as e:
        admin.decapsulate(
            KeyId=key_id, SharedSecretCiphertextBlob=ciphertext, EncapsulationAlgorithm="ML_KEM"
        )
    assert _code(e) == "KMSInvalidStateException"


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
                },
                {
                    "Sid": "EnclaveEncapsulates",
                    "Effect": "Allow",
                    "Principal": {"AWS": ENCLAVE.principal_arn},
                    "Action": "kms:Encapsulate",
                    "Resource": "*",
                },
            ],
        }
    )


def test_policy_and_grants(daemon: DaemonThread, admin: Any) -> None:
    key_id = admin.create_key(KeySpec="ML_KEM_768", KeyUsage=_USAGE, Policy=_admin_only_policy())[
        "KeyMetadata"
    ]["KeyId"]
    enclave = boto_client(daemon.endpoint, ENCLAVE)
    out = enclave.encapsulate(KeyId=key_id, EncapsulationAlgorithm="ML_KEM")  # the policy allows
    ciphertext = out["SharedSecretCiphertextBlob"]
    with pytest.raises(ClientError) as e:  # kms:Decapsulate is not in the policy
        enclave.decapsulate(
            KeyId=key_id, SharedSecretCiphertextBlob=ciphertext, EncapsulationAlgorithm="ML_KEM"
        )
    assert _code(e) == "AccessDeniedException"
    grant = admin.create_grant(
        KeyId=key_id, GranteePrincipal=ENCLAVE.principal_arn, Operations=["Decapsulate"]
    )
    got = enclave.decapsulate(
        KeyId=key_id,
        SharedSecretCiphertextBlob=ciphertext,
        EncapsulationAlgorithm="ML_KEM",
        GrantTokens=[grant["GrantToken"]],
    )
    assert got["SharedSecret"] == out["SharedSecret"]
    admin.revoke_grant(KeyId=key_id, GrantId=grant["GrantId"])
    with pytest.raises(ClientError) as e:
        enclave.decapsulate(
            KeyId=key_id, SharedSecretCiphertextBlob=ciphertext, EncapsulationAlgorithm="ML_KEM"
        )
    assert _code(e) == "AccessDeniedException"


@pytest.mark.parametrize("spec", _SPECS)
def test_ml_kem_data_key_pairs(admin: Any, spec: str) -> None:
    kid = admin.create_key()["KeyMetadata"]["KeyId"]  # a symmetric key protects the pair
    out = admin.generate_data_key_pair(KeyId=kid, KeyPairSpec=spec)
    assert out["KeyPairSpec"] == spec
    private = serialization.load_der_private_key(out["PrivateKeyPlaintext"], password=None)
    assert isinstance(private, _PRIVATE[spec])
    # AWS: the PKCS#8 holds the 64-byte seed, so both parameter sets have one length.
    assert len(out["PrivateKeyPlaintext"]) == 86
    public = serialization.load_der_public_key(out["PublicKey"])
    assert isinstance(public, _PUBLIC[spec])
    secret, ciphertext = public.encapsulate()
    assert private.decapsulate(ciphertext) == secret
    opened = admin.decrypt(CiphertextBlob=out["PrivateKeyCiphertextBlob"])["Plaintext"]
    assert opened == out["PrivateKeyPlaintext"]
    without = admin.generate_data_key_pair_without_plaintext(KeyId=kid, KeyPairSpec=spec)
    assert "PrivateKeyPlaintext" not in without
    again = admin.decrypt(CiphertextBlob=without["PrivateKeyCiphertextBlob"])["Plaintext"]
    assert isinstance(serialization.load_der_private_key(again, password=None), _PRIVATE[spec])


def test_ml_kem_512_data_key_pairs_are_refused(admin: Any) -> None:
    kid = admin.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as e:
        admin.generate_data_key_pair(KeyId=kid, KeyPairSpec="ML_KEM_512")
    assert _code(e) == "UnsupportedOperationException"
    assert "ML-KEM-768 and ML-KEM-1024 only" in e.value.response["Error"]["Message"]
