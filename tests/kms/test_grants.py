"""Grants through boto3 and the AWS CLI against a real daemon: key policy plus grants as AWS
evaluates them, tokens that work at once, encryption-context constraints, retiring and revoking,
and grants kept (and authenticated) across a restart."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from kms.config import KmsConfig
from kms.service._model import Grant

from .conftest import boto_client
from .helpers import ACCOUNT, ADMIN, ALL_CREDS, ENCLAVE, OUTSIDER, DaemonThread, aws_cli

pytestmark = pytest.mark.timeout(120)


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def _admin_only_policy(*, deny_enclave_decrypt: bool = False) -> str:
    """The admin administers; the enclave role gets nothing from the policy itself."""
    statements: list[dict[str, Any]] = [
        {
            "Sid": "Admin",
            "Effect": "Allow",
            "Principal": {"AWS": ADMIN.principal_arn},
            "Action": "kms:*",
            "Resource": "*",
        }
    ]
    if deny_enclave_decrypt:
        statements.append(
            {
                "Sid": "NeverDecrypt",
                "Effect": "Deny",
                "Principal": {"AWS": ENCLAVE.principal_arn},
                "Action": "kms:Decrypt",
                "Resource": "*",
            }
        )
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


@pytest.fixture(scope="module")
def admin(daemon: DaemonThread) -> Any:
    return boto_client(daemon.endpoint, ADMIN)


@pytest.fixture(scope="module")
def grantee(daemon: DaemonThread) -> Any:
    return boto_client(daemon.endpoint, ENCLAVE)


def test_grant_allows_at_once_and_revoke_stops_it(admin: Any, grantee: Any) -> None:
    kid = admin.create_key(Policy=_admin_only_policy())["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=kid, Plaintext=b"granted")["CiphertextBlob"]
    with pytest.raises(ClientError) as e:
        grantee.decrypt(CiphertextBlob=blob)
    assert _code(e) == "AccessDeniedException"
    out = admin.create_grant(
        KeyId=kid, GranteePrincipal=ENCLAVE.principal_arn, Operations=["Decrypt", "DescribeKey"]
    )
    assert len(out["GrantId"]) == 64
    # The token works immediately, and so does the grant without it (no eventual consistency).
    assert grantee.decrypt(CiphertextBlob=blob, GrantTokens=[out["GrantToken"]])["Plaintext"] == (
        b"granted"
    )
    assert grantee.decrypt(CiphertextBlob=blob)["Plaintext"] == b"granted"
    assert grantee.describe_key(KeyId=kid)["KeyMetadata"]["KeyId"] == kid
    with pytest.raises(ClientError) as e:  # only the operations granted
        grantee.encrypt(KeyId=kid, Plaintext=b"x")
    assert _code(e) == "AccessDeniedException"
    with pytest.raises(ClientError) as e:  # a forged token fails the request outright
        admin.decrypt(CiphertextBlob=blob, GrantTokens=[out["GrantToken"][:-4] + "AAAA"])
    assert _code(e) == "InvalidGrantTokenException"
    listed = admin.list_grants(KeyId=kid)["Grants"]
    assert [g["GrantId"] for g in listed] == [out["GrantId"]]
    assert listed[0]["GranteePrincipal"] == ENCLAVE.principal_arn
    assert sorted(listed[0]["Operations"]) == ["Decrypt", "DescribeKey"]
    assert listed[0]["IssuingAccount"] == f"arn:aws:iam::{ACCOUNT}:root"
    admin.revoke_grant(KeyId=kid, GrantId=out["GrantId"])
    with pytest.raises(ClientError) as e:  # revoked: refused at once
        grantee.decrypt(CiphertextBlob=blob, GrantTokens=[out["GrantToken"]])
    assert _code(e) == "AccessDeniedException"
    assert admin.list_grants(KeyId=kid)["Grants"] == []
    with pytest.raises(ClientError) as e:
        admin.revoke_grant(KeyId=kid, GrantId=out["GrantId"])
    assert _code(e) == "NotFoundException"
    with pytest.raises(ClientError) as e:
        admin.revoke_grant(KeyId=kid, GrantId="not-a-grant-id")
    assert _code(e) == "InvalidGrantIdException"


def test_explicit_deny_beats_a_grant(admin: Any, grantee: Any) -> None:
    kid = admin.create_key(Policy=_admin_only_policy(deny_enclave_decrypt=True))["KeyMetadata"][
        "KeyId"
    ]
    blob = admin.encrypt(KeyId=kid, Plaintext=b"x")["CiphertextBlob"]
    admin.create_grant(KeyId=kid, GranteePrincipal=ENCLAVE.principal_arn, Operations=["Decrypt"])
    with pytest.raises(ClientError) as e:
        grantee.decrypt(CiphertextBlob=blob)
    assert _code(e) == "AccessDeniedException"


def test_encryption_context_constraints(admin: Any, grantee: Any) -> None:
    kid = admin.create_key(Policy=_admin_only_policy())["KeyMetadata"]["KeyId"]
    admin.create_grant(
        KeyId=kid,
        GranteePrincipal=ENCLAVE.principal_arn,
        Operations=["Encrypt", "Decrypt"],
        Constraints={"EncryptionContextSubset": {"tenant": "a"}},
    )
    blob = grantee.encrypt(
        KeyId=kid, Plaintext=b"t", EncryptionContext={"tenant": "a", "file": "1"}
    )["CiphertextBlob"]
    assert (
        grantee.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "a", "file": "1"})[
            "Plaintext"
        ]
        == b"t"
    )
    for ctx in ({"tenant": "b"}, {}, {"file": "1"}):
        with pytest.raises(ClientError) as e:
            grantee.encrypt(KeyId=kid, Plaintext=b"t", EncryptionContext=ctx)
        assert _code(e) == "AccessDeniedException", ctx
    other = admin.create_key(Policy=_admin_only_policy())["KeyMetadata"]["KeyId"]
    admin.create_grant(
        KeyId=other,
        GranteePrincipal=ENCLAVE.principal_arn,
        Operations=["GenerateDataKey", "Decrypt", "DescribeKey"],
        Constraints={"EncryptionContextEquals": {"model": "digits"}},
    )
    dk = grantee.generate_data_key(
        KeyId=other, KeySpec="AES_256", EncryptionContext={"model": "digits"}
    )
    assert len(dk["KeyMaterialId"]) == 64
    with pytest.raises(ClientError) as e:  # Equals: a superset is not equal
        grantee.generate_data_key(
            KeyId=other, KeySpec="AES_256", EncryptionContext={"model": "digits", "x": "y"}
        )
    assert _code(e) == "AccessDeniedException"
    # DescribeKey takes no context: the constraint does not apply to it (AWS).
    assert grantee.describe_key(KeyId=other)["KeyMetadata"]["KeyId"] == other
    # A constraint with an operation that takes no encryption context is refused.
    with pytest.raises(ClientError) as e:
        admin.create_grant(
            KeyId=other,
            GranteePrincipal=ENCLAVE.principal_arn,
            Operations=["Sign"],
            Constraints={"EncryptionContextEquals": {"a": "b"}},
        )
    assert _code(e) == "ValidationException"


def test_grant_holder_creates_only_narrower_grants(admin: Any, grantee: Any) -> None:
    kid = admin.create_key(Policy=_admin_only_policy())["KeyMetadata"]["KeyId"]
    admin.create_grant(
        KeyId=kid,
        GranteePrincipal=ENCLAVE.principal_arn,
        Operations=["CreateGrant", "Decrypt", "Encrypt"],
        Constraints={"EncryptionContextSubset": {"tenant": "a"}},
    )
    narrower = grantee.create_grant(
        KeyId=kid,
        GranteePrincipal=OUTSIDER.principal_arn,
        Operations=["Decrypt"],
        Constraints={"EncryptionContextEquals": {"tenant": "a", "doc": "7"}},
    )
    assert narrower["GrantId"]
    with pytest.raises(ClientError) as e:  # wider operations than its own grant
        grantee.create_grant(
            KeyId=kid,
            GranteePrincipal=OUTSIDER.principal_arn,
            Operations=["Decrypt", "ReEncryptFrom"],
            Constraints={"EncryptionContextSubset": {"tenant": "a"}},
        )
    assert _code(e) == "AccessDeniedException"
    with pytest.raises(ClientError) as e:  # a looser constraint than its own
        grantee.create_grant(
            KeyId=kid, GranteePrincipal=OUTSIDER.principal_arn, Operations=["Decrypt"]
        )
    assert _code(e) == "AccessDeniedException"


def test_retire_and_retirable_grants(daemon: DaemonThread, admin: Any, grantee: Any) -> None:
    outsider = boto_client(daemon.endpoint, OUTSIDER)
    kid = admin.create_key(Policy=_admin_only_policy())["KeyMetadata"]["KeyId"]
    g = admin.create_grant(
        KeyId=kid,
        GranteePrincipal=ENCLAVE.principal_arn,
        RetiringPrincipal=OUTSIDER.principal_arn,
        Operations=["Encrypt"],
        Name="retire-me",
    )
    # The same named request again answers the same grant, with a new token.
    again = admin.create_grant(
        KeyId=kid,
        GranteePrincipal=ENCLAVE.principal_arn,
        RetiringPrincipal=OUTSIDER.principal_arn,
        Operations=["Encrypt"],
        Name="retire-me",
    )
    assert again["GrantId"] == g["GrantId"]
    assert again["GrantToken"] != g["GrantToken"]
    retirable = outsider.list_retirable_grants(RetiringPrincipal=OUTSIDER.principal_arn)["Grants"]
    assert g["GrantId"] in [x["GrantId"] for x in retirable]
    with pytest.raises(ClientError) as e:  # another account's retirable grants are not listed
        grantee.list_retirable_grants(RetiringPrincipal=OUTSIDER.principal_arn)
    assert _code(e) == "AccessDeniedException"
    with pytest.raises(ClientError) as e:  # the grantee may not retire (not in its operations)
        grantee.retire_grant(GrantToken=g["GrantToken"])
    assert _code(e) == "AccessDeniedException"
    outsider.retire_grant(GrantToken=g["GrantToken"])
    with pytest.raises(ClientError) as e:
        grantee.encrypt(KeyId=kid, Plaintext=b"x")
    assert _code(e) == "AccessDeniedException"
    # By key and grant id: the grantee retires a grant that allows RetireGrant.
    h = admin.create_grant(
        KeyId=kid, GranteePrincipal=ENCLAVE.principal_arn, Operations=["RetireGrant", "Encrypt"]
    )
    grantee.retire_grant(KeyId=kid, GrantId=h["GrantId"])
    assert admin.list_grants(KeyId=kid)["Grants"] == []
    with pytest.raises(ClientError) as e:
        admin.retire_grant(GrantToken="not a token")
    assert _code(e) == "InvalidGrantTokenException"


def test_create_grant_validation(admin: Any) -> None:
    kid = admin.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as e:
        admin.create_grant(KeyId=kid, GranteePrincipal="bob", Operations=["Decrypt"])
    assert _code(e) == "InvalidArnException"
    with pytest.raises(ClientError) as e:
        admin.create_grant(
            KeyId=kid, GranteePrincipal=ENCLAVE.principal_arn, Operations=["Decrypt"], DryRun=True
        )
    assert _code(e) == "DryRunOperationException"
    assert admin.list_grants(KeyId=kid)["Grants"] == []
    raw = boto_client(admin.meta.endpoint_url, ADMIN, parameter_validation=False)
    with pytest.raises(ClientError) as e:
        raw.create_grant(KeyId=kid, GranteePrincipal=ENCLAVE.principal_arn, Operations=["Fly"])
    assert _code(e) == "ValidationException"
    # A condition on the grant operations in the key policy is evaluated.
    policy = json.loads(_admin_only_policy())
    policy["Statement"][0]["Action"] = [
        "kms:Describe*", "kms:Get*", "kms:List*", "kms:Put*", "kms:Encrypt", "kms:Revoke*",
    ]  # fmt: skip
    policy["Statement"].append(
        {
            "Sid": "GrantDecryptOnly",
            "Effect": "Allow",
            "Principal": {"AWS": ADMIN.principal_arn},
            "Action": "kms:CreateGrant",
            "Resource": "*",
            "Condition": {"ForAllValues:StringEquals": {"kms:GrantOperations": ["Decrypt"]}},
        }
    )
    limited = admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]
    admin.create_grant(
        KeyId=limited, GranteePrincipal=ENCLAVE.principal_arn, Operations=["Decrypt"]
    )
    with pytest.raises(ClientError) as e:
        admin.create_grant(
            KeyId=limited, GranteePrincipal=ENCLAVE.principal_arn, Operations=["Decrypt", "Sign"]
        )
    assert _code(e) == "AccessDeniedException"


def test_aws_cli_drives_grants(daemon: DaemonThread, admin: Any) -> None:
    kid = admin.create_key(Policy=_admin_only_policy())["KeyMetadata"]["KeyId"]

    def cli(*args: str) -> Any:
        code, out, err = aws_cli(daemon.endpoint, ADMIN, *args)
        assert code == 0, err
        return out

    g = cli(
        "create-grant", "--key-id", kid, "--grantee-principal", ENCLAVE.principal_arn,
        "--retiring-principal", ADMIN.principal_arn, "--operations", "Encrypt", "Decrypt",
    )  # fmt: skip
    assert cli("list-grants", "--key-id", kid)["Grants"][0]["GrantId"] == g["GrantId"]
    listed = cli("list-retirable-grants", "--retiring-principal", ADMIN.principal_arn)
    assert g["GrantId"] in [x["GrantId"] for x in listed["Grants"]]
    cli("retire-grant", "--grant-token", g["GrantToken"])
    h = cli("create-grant", "--key-id", kid, "--grantee-principal", ENCLAVE.principal_arn,
            "--operations", "Encrypt")  # fmt: skip
    cli("revoke-grant", "--key-id", kid, "--grant-id", h["GrantId"])
    assert cli("list-grants", "--key-id", kid)["Grants"] == []


def test_grants_survive_restart_and_a_forged_row_grants_nothing(tmp_path: Path) -> None:
    config = KmsConfig(
        host="127.0.0.1", port=0, state_dir=tmp_path / "state", credentials=ALL_CREDS
    )
    with DaemonThread(config) as d:
        admin = boto_client(d.endpoint, ADMIN)
        kid = admin.create_key(Policy=_admin_only_policy())["KeyMetadata"]["KeyId"]
        blob = admin.encrypt(KeyId=kid, Plaintext=b"kept")["CiphertextBlob"]
        g = admin.create_grant(
            KeyId=kid, GranteePrincipal=ENCLAVE.principal_arn, Operations=["Decrypt"]
        )
    with DaemonThread(config) as d:
        grantee = boto_client(d.endpoint, ENCLAVE)
        assert grantee.decrypt(CiphertextBlob=blob)["Plaintext"] == b"kept"
        assert grantee.decrypt(CiphertextBlob=blob, GrantTokens=[g["GrantToken"]])["Plaintext"]
    # Someone with write access to the database widens the grant to Encrypt: the row's tag no
    # longer matches, so the grant is ignored at load (it grants nothing), the key still works.
    db = sqlite3.connect(config.state_dir / "kms.sqlite3")  # type: ignore[operator]
    (record,) = db.execute("SELECT record FROM grants").fetchone()
    widened = json.loads(record)
    widened["Operations"] = ["Decrypt", "Encrypt"]
    db.execute("UPDATE grants SET record=?", (json.dumps(widened, sort_keys=True),))
    db.commit()
    db.close()
    with DaemonThread(config) as d:
        grantee = boto_client(d.endpoint, ENCLAVE)
        with pytest.raises(ClientError) as e:
            grantee.decrypt(CiphertextBlob=blob)
        assert _code(e) == "AccessDeniedException"
        assert boto_client(d.endpoint, ADMIN).decrypt(CiphertextBlob=blob)["Plaintext"] == b"kept"


def test_source_arn_constrained_grant_allows_nothing(admin: Any, grantee: Any) -> None:
    """No request here comes on behalf of an AWS resource: a SourceArn grant must not act as an
    unconstrained one (it did when the constraint was dropped)."""
    kid = admin.create_key(Policy=_admin_only_policy())["KeyMetadata"]["KeyId"]
    admin.create_grant(
        KeyId=kid,
        GranteePrincipal=ENCLAVE.principal_arn,
        Operations=["Encrypt", "DescribeKey"],
        Constraints={"SourceArn": "arn:aws:s3:::a-bucket"},
    )
    (listed,) = admin.list_grants(KeyId=kid)["Grants"]
    assert listed["Constraints"] == {"SourceArn": "arn:aws:s3:::a-bucket"}
    for call in (
        lambda: grantee.encrypt(KeyId=kid, Plaintext=b"x"),
        lambda: grantee.describe_key(KeyId=kid),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert _code(e) == "AccessDeniedException"


# ----------------------------------------------------------------- the stored form, unit level

_GRANT_FIELDS = {
    "CreationDate": 1.5e9,
    "IssuingAccount": f"arn:aws:iam::{ACCOUNT}:root",
    "Operations": ["Decrypt"],
}


@pytest.mark.parametrize(
    "constraints",
    [
        {},
        {"EncryptionContextEquals": {"a": "1"}},
        {"EncryptionContextSubset": {"a": "1", "b": ""}},
        {"SourceArn": "arn:aws:s3:::a-bucket"},
    ],
)
def test_a_stored_grant_reads_back_equal(constraints: dict[str, Any]) -> None:
    record = json.dumps({**_GRANT_FIELDS, "Constraints": constraints}, sort_keys=True)
    grant = Grant.from_record("g", "k", record)
    assert grant.constraints == constraints
    assert Grant.from_record("g", "k", grant.record()) == grant
    listed = grant.to_json()
    assert listed.get("Constraints", {}) == constraints
    if constraints:  # the answer shares no dict with the grant
        assert listed["Constraints"] is not grant.constraints


@pytest.mark.parametrize(
    ("constraints", "error"),
    [
        ([], TypeError),
        ({"EncryptionContextEquals": "a=1"}, TypeError),
        ({"EncryptionContextSubset": {"a": 1}}, TypeError),
        ({"SourceArn": ["arn:aws:s3:::a-bucket"]}, TypeError),
        # A constraint this daemon does not know: the grant is not read (it grants nothing)
        # rather than read without the constraint (which would grant more than it says).
        ({"SourceAccount": "123456789012"}, ValueError),
    ],
)
def test_a_stored_grant_of_the_wrong_shape_is_refused(constraints: object, error: type) -> None:
    """What a daemon's load catches (kms_grant_unreadable: the grant is ignored, the key and
    the other grants serve); before, a wrong shape loaded and failed a later request."""
    record = json.dumps({**_GRANT_FIELDS, "Constraints": constraints}, sort_keys=True)
    with pytest.raises(error, match="grant Constraints"):
        Grant.from_record("g", "k", record)
