"""boto3 against a real daemon (one per module): every operation and its error cases."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from .conftest import boto_client
from .helpers import ACCOUNT, ADMIN, ENCLAVE, OUTSIDER, DaemonThread

pytestmark = pytest.mark.timeout(60)


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


@pytest.fixture(scope="module")
def admin(daemon: DaemonThread) -> Any:
    return boto_client(daemon.endpoint, ADMIN)


@pytest.fixture(scope="module")
def raw_admin(daemon: DaemonThread) -> Any:
    """No client-side validation: lets bad values reach the daemon."""
    return boto_client(daemon.endpoint, ADMIN, parameter_validation=False)


@pytest.fixture(scope="module")
def key(admin: Any) -> dict[str, Any]:
    meta: dict[str, Any] = admin.create_key(Description="ops test")["KeyMetadata"]
    return meta


def test_create_describe_list(admin: Any, key: dict[str, Any]) -> None:
    assert key["KeyState"] == "Enabled"
    assert key["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert key["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert key["Arn"] == f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{key['KeyId']}"
    for ident in (key["KeyId"], key["Arn"]):
        assert admin.describe_key(KeyId=ident)["KeyMetadata"]["KeyId"] == key["KeyId"]
    ids = {k["KeyId"] for k in admin.list_keys()["Keys"]}
    assert key["KeyId"] in ids
    page = admin.list_keys(Limit=1)
    assert len(page["Keys"]) == 1
    if page["Truncated"]:
        assert admin.list_keys(Limit=1, Marker=page["NextMarker"])["Keys"] != page["Keys"]


def test_create_key_validation(admin: Any, raw_admin: Any) -> None:
    with pytest.raises(ClientError) as e:
        raw_admin.create_key(KeySpec="AES_999")
    assert _code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:
        admin.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="SIGN_VERIFY")
    assert _code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:  # China Regions only: not in cryptography
        admin.create_key(KeySpec="SM2", KeyUsage="SIGN_VERIFY")
    assert _code(e) == "UnsupportedOperationException"
    assert "SM2" in e.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as e:
        admin.create_key(Policy="{not json")
    assert _code(e) == "MalformedPolicyDocumentException"


def test_default_policy_is_aws_default(admin: Any, key: dict[str, Any]) -> None:
    policy = json.loads(admin.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"])
    (st,) = policy["Statement"]
    assert st["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
    assert st["Action"] == "kms:*"
    assert st["Effect"] == "Allow"


def test_not_found(admin: Any) -> None:
    for ident in (
        "00000000-0000-0000-0000-000000000000",
        "alias/does-not-exist",
        f"arn:aws:kms:us-east-1:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000",
        "arn:aws:kms:eu-west-1:999999999999:key/x",
    ):
        with pytest.raises(ClientError) as e:
            admin.describe_key(KeyId=ident)
        assert _code(e) == "NotFoundException", ident


def test_encrypt_decrypt_context(admin: Any, key: dict[str, Any]) -> None:
    ctx = {"purpose": "test", "tenant": "a"}
    blob = admin.encrypt(KeyId=key["KeyId"], Plaintext=b"secret", EncryptionContext=ctx)[
        "CiphertextBlob"
    ]
    out = admin.decrypt(CiphertextBlob=blob, EncryptionContext=dict(reversed(ctx.items())))
    assert out["Plaintext"] == b"secret"
    assert out["KeyId"] == key["Arn"]
    assert out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    for bad_ctx in ({}, {"purpose": "test"}, {"purpose": "test", "tenant": "b"}):
        with pytest.raises(ClientError) as e:
            admin.decrypt(CiphertextBlob=blob, EncryptionContext=bad_ctx)
        assert _code(e) == "InvalidCiphertextException"
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(ClientError) as e:
        admin.decrypt(CiphertextBlob=bytes(tampered), EncryptionContext=ctx)
    assert _code(e) == "InvalidCiphertextException"
    with pytest.raises(ClientError) as e:
        admin.decrypt(CiphertextBlob=b"garbage-not-a-blob")
    assert _code(e) == "InvalidCiphertextException"


def test_decrypt_with_wrong_key_id(admin: Any, key: dict[str, Any]) -> None:
    other = admin.create_key()["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=key["KeyId"], Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(ClientError) as e:
        admin.decrypt(CiphertextBlob=blob, KeyId=other)
    assert _code(e) == "IncorrectKeyException"
    assert admin.decrypt(CiphertextBlob=blob, KeyId=key["Arn"])["Plaintext"] == b"x"


def test_reencrypt(admin: Any, key: dict[str, Any]) -> None:
    dst = admin.create_key()["KeyMetadata"]
    blob = admin.encrypt(KeyId=key["KeyId"], Plaintext=b"move me", EncryptionContext={"a": "1"})[
        "CiphertextBlob"
    ]
    out = admin.re_encrypt(
        CiphertextBlob=blob,
        SourceEncryptionContext={"a": "1"},
        DestinationKeyId=dst["KeyId"],
        DestinationEncryptionContext={"b": "2"},
    )
    assert out["SourceKeyId"] == key["Arn"]
    assert out["KeyId"] == dst["Arn"]
    dec = admin.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"b": "2"})
    assert dec["Plaintext"] == b"move me"
    assert dec["KeyId"] == dst["Arn"]


def test_generate_data_key_variants(admin: Any, raw_admin: Any, key: dict[str, Any]) -> None:
    dk = admin.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256")
    assert len(dk["Plaintext"]) == 32
    assert admin.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
    assert len(admin.generate_data_key(KeyId=key["KeyId"], NumberOfBytes=7)["Plaintext"]) == 7
    assert len(admin.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_128")["Plaintext"]) == 16
    wo = admin.generate_data_key_without_plaintext(KeyId=key["KeyId"], KeySpec="AES_256")
    assert "Plaintext" not in wo
    assert len(admin.decrypt(CiphertextBlob=wo["CiphertextBlob"])["Plaintext"]) == 32
    with pytest.raises(ClientError) as e:
        admin.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256", NumberOfBytes=32)
    assert _code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:
        admin.generate_data_key(KeyId=key["KeyId"])
    assert _code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:
        raw_admin.generate_data_key(KeyId=key["KeyId"], NumberOfBytes=1025)
    assert _code(e) == "ValidationException"


def test_generate_random(admin: Any, raw_admin: Any) -> None:
    a = admin.generate_random(NumberOfBytes=32)["Plaintext"]
    b = admin.generate_random(NumberOfBytes=32)["Plaintext"]
    assert len(a) == 32
    assert a != b
    for n in (0, 1025):
        with pytest.raises(ClientError) as e:
            raw_admin.generate_random(NumberOfBytes=n)
        assert _code(e) == "ValidationException"


def test_aliases(admin: Any, key: dict[str, Any]) -> None:
    other = admin.create_key()["KeyMetadata"]
    admin.create_alias(AliasName="alias/ops", TargetKeyId=key["KeyId"])
    with pytest.raises(ClientError) as e:
        admin.create_alias(AliasName="alias/ops", TargetKeyId=key["KeyId"])
    assert _code(e) == "AlreadyExistsException"
    with pytest.raises(ClientError) as e:
        admin.create_alias(AliasName="alias/aws/reserved", TargetKeyId=key["KeyId"])
    assert _code(e) == "NotAuthorizedException"
    with pytest.raises(ClientError) as e:
        admin.create_alias(AliasName="not-an-alias", TargetKeyId=key["KeyId"])
    assert _code(e) == "ValidationException"
    alias_arn = f"arn:aws:kms:us-east-1:{ACCOUNT}:alias/ops"
    for ident in ("alias/ops", alias_arn):
        assert admin.describe_key(KeyId=ident)["KeyMetadata"]["KeyId"] == key["KeyId"]
    blob = admin.encrypt(KeyId="alias/ops", Plaintext=b"via alias")["CiphertextBlob"]
    listed = admin.list_aliases(KeyId=key["KeyId"])["Aliases"]
    assert [a["AliasName"] for a in listed] == ["alias/ops"]
    assert listed[0]["AliasArn"] == alias_arn
    admin.update_alias(AliasName="alias/ops", TargetKeyId=other["KeyId"])
    assert admin.describe_key(KeyId="alias/ops")["KeyMetadata"]["KeyId"] == other["KeyId"]
    # The blob still names its own key, whatever the alias points at now.
    assert admin.decrypt(CiphertextBlob=blob)["Plaintext"] == b"via alias"
    admin.delete_alias(AliasName="alias/ops")
    with pytest.raises(ClientError) as e:
        admin.delete_alias(AliasName="alias/ops")
    assert _code(e) == "NotFoundException"
    with pytest.raises(ClientError) as e:
        admin.update_alias(AliasName="alias/ops", TargetKeyId=key["KeyId"])
    assert _code(e) == "NotFoundException"


def test_key_policy_put_get_and_lockout(daemon: DaemonThread, admin: Any) -> None:
    kid = admin.create_key()["KeyMetadata"]["KeyId"]
    outsider_only = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": OUTSIDER.principal_arn},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    with pytest.raises(ClientError) as e:
        admin.put_key_policy(KeyId=kid, PolicyName="default", Policy=json.dumps(outsider_only))
    assert _code(e) == "MalformedPolicyDocumentException"
    for bad in (
        "[]",
        '{"Statement": []}',
        '{"Statement": [{"Effect": "Maybe"}]}',
        json.dumps(
            {
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": "kms:*",
                        "Condition": {"NumericLessThan": {"a": "1"}},
                    }
                ]
            }
        ),
    ):
        with pytest.raises(ClientError) as e:
            admin.put_key_policy(KeyId=kid, PolicyName="default", Policy=bad)
        assert _code(e) == "MalformedPolicyDocumentException", bad
    admin.put_key_policy(
        KeyId=kid,
        PolicyName="default",
        Policy=json.dumps(outsider_only),
        BypassPolicyLockoutSafetyCheck=True,
    )
    outsider = boto_client(daemon.endpoint, OUTSIDER)
    got = outsider.get_key_policy(KeyId=kid, PolicyName="default")["Policy"]
    assert json.loads(got) == outsider_only
    with pytest.raises(ClientError) as e:  # the admin locked itself out
        admin.describe_key(KeyId=kid)
    assert _code(e) == "AccessDeniedException"


def test_access_denied_is_opaque_and_audited(
    daemon: DaemonThread, key: dict[str, Any], audit_path: Path
) -> None:
    outsider = boto_client(daemon.endpoint, OUTSIDER)
    with pytest.raises(ClientError) as e:
        outsider.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert _code(e) == "AccessDeniedException"
    message = e.value.response["Error"]["Message"]
    assert "statement" not in message.lower()
    assert "condition" not in message.lower()
    last = json.loads(audit_path.read_text().splitlines()[-1])
    assert last["decision"] == "deny"
    assert last["principal"] == OUTSIDER.principal_arn
    assert last["operation"] == "Encrypt"
    assert last["key_id"] == key["Arn"]
    assert "no statement allows kms:Encrypt" in last["reason"]


def test_enable_disable_delete_cancel(admin: Any) -> None:
    kid = admin.create_key()["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=kid, Plaintext=b"x")["CiphertextBlob"]
    admin.disable_key(KeyId=kid)
    assert admin.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "Disabled"
    with pytest.raises(ClientError) as e:
        admin.encrypt(KeyId=kid, Plaintext=b"x")
    assert _code(e) == "DisabledException"
    with pytest.raises(ClientError) as e:
        admin.decrypt(CiphertextBlob=blob)
    assert _code(e) == "DisabledException"
    admin.enable_key(KeyId=kid)
    out = admin.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
    assert out["KeyState"] == "PendingDeletion"
    assert out["PendingWindowInDays"] == 7
    meta = admin.describe_key(KeyId=kid)["KeyMetadata"]
    assert meta["KeyState"] == "PendingDeletion"
    assert "DeletionDate" in meta
    for call in (
        lambda: admin.decrypt(CiphertextBlob=blob),
        lambda: admin.enable_key(KeyId=kid),
        lambda: admin.schedule_key_deletion(KeyId=kid),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert _code(e) == "KMSInvalidStateException"
    admin.cancel_key_deletion(KeyId=kid)
    assert admin.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "Disabled"
    with pytest.raises(ClientError) as e:
        admin.cancel_key_deletion(KeyId=kid)
    assert _code(e) == "KMSInvalidStateException"
    admin.enable_key(KeyId=kid)
    assert admin.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"


def test_rotation_old_ciphertexts_still_decrypt(admin: Any, raw_admin: Any) -> None:
    kid = admin.create_key()["KeyMetadata"]["KeyId"]
    assert admin.get_key_rotation_status(KeyId=kid)["KeyRotationEnabled"] is False
    admin.enable_key_rotation(KeyId=kid, RotationPeriodInDays=90)
    status = admin.get_key_rotation_status(KeyId=kid)
    assert status["KeyRotationEnabled"] is True
    assert status["RotationPeriodInDays"] == 90
    with pytest.raises(ClientError) as e:
        raw_admin.enable_key_rotation(KeyId=kid, RotationPeriodInDays=10)
    assert _code(e) == "ValidationException"
    old = admin.encrypt(KeyId=kid, Plaintext=b"v1")["CiphertextBlob"]
    admin.rotate_key_on_demand(KeyId=kid)
    new = admin.encrypt(KeyId=kid, Plaintext=b"v2")["CiphertextBlob"]
    assert old[: len(old) - 30] != new[: len(new) - 30]  # different version in the header
    assert admin.decrypt(CiphertextBlob=old)["Plaintext"] == b"v1"
    assert admin.decrypt(CiphertextBlob=new)["Plaintext"] == b"v2"
    admin.disable_key_rotation(KeyId=kid)
    assert admin.get_key_rotation_status(KeyId=kid)["KeyRotationEnabled"] is False


def test_dry_run(admin: Any, key: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as e:
        admin.encrypt(KeyId=key["KeyId"], Plaintext=b"x", DryRun=True)
    assert _code(e) == "DryRunOperationException"


def test_enclave_role_without_recipient_is_denied_by_condition(
    daemon: DaemonThread, admin: Any
) -> None:
    from .helpers import enclave_policy

    kid = admin.create_key(Policy=json.dumps(enclave_policy()))["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=kid, Plaintext=b"model key")["CiphertextBlob"]
    enclave = boto_client(daemon.endpoint, ENCLAVE)
    with pytest.raises(ClientError) as e:  # no Recipient: the attestation conditions fail
        enclave.decrypt(CiphertextBlob=blob)
    assert _code(e) == "AccessDeniedException"
    assert base64.b64encode(blob)  # the admin still can
    assert admin.decrypt(CiphertextBlob=blob)["Plaintext"] == b"model key"


@pytest.mark.parametrize("spec", ["RSA_2048", "ECC_NIST_P256", "ECC_SECG_P256K1"])
def test_generate_data_key_pair(admin: Any, key: dict[str, Any], spec: str) -> None:
    from cryptography.hazmat.primitives import serialization

    out = admin.generate_data_key_pair(
        KeyId=key["KeyId"], KeyPairSpec=spec, EncryptionContext={"use": "signing"}
    )
    assert out["KeyPairSpec"] == spec
    assert out["KeyId"] == key["Arn"]
    private = serialization.load_der_private_key(out["PrivateKeyPlaintext"], password=None)
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public == out["PublicKey"]
    dec = admin.decrypt(
        CiphertextBlob=out["PrivateKeyCiphertextBlob"], EncryptionContext={"use": "signing"}
    )
    assert dec["Plaintext"] == out["PrivateKeyPlaintext"]


def test_generate_data_key_pair_unsupported(admin: Any, key: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as e:
        admin.generate_data_key_pair(KeyId=key["KeyId"], KeyPairSpec="SM2")
    assert _code(e) == "UnsupportedOperationException"


def test_generate_data_key_pair_without_plaintext(admin: Any, key: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives import serialization

    out = admin.generate_data_key_pair_without_plaintext(
        KeyId=key["KeyId"], KeyPairSpec="ECC_NIST_P521"
    )
    assert "PrivateKeyPlaintext" not in out
    private_der = admin.decrypt(CiphertextBlob=out["PrivateKeyCiphertextBlob"])["Plaintext"]
    private = serialization.load_der_private_key(private_der, password=None)
    assert (
        private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == out["PublicKey"]
    )
