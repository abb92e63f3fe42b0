"""Metadata operations and the fidelity gaps, through boto3 and the AWS CLI: tags, key
descriptions, ListKeyPolicies, ListKeyRotations and RotateKeyOnDemand, KeyMaterialIds, dry runs
that ignore the ciphertext, large policies, malformed ARNs and the reserved alias prefix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from kms.config import KmsConfig
from kms.service._model import MAX_ON_DEMAND_ROTATIONS

from .conftest import boto_client
from .helpers import ACCOUNT, ADMIN, ALL_CREDS, ENCLAVE, OUTSIDER, DaemonThread, aws_cli

pytestmark = pytest.mark.timeout(120)


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


@pytest.fixture(scope="module")
def admin(daemon: DaemonThread) -> Any:
    return boto_client(daemon.endpoint, ADMIN)


def test_tags(admin: Any) -> None:
    kid = admin.create_key(Tags=[{"TagKey": "team", "TagValue": "ml"}])["KeyMetadata"]["KeyId"]
    admin.tag_resource(
        KeyId=kid,
        Tags=[{"TagKey": "team", "TagValue": "models"}, {"TagKey": "env", "TagValue": "prod"}],
    )
    tags = admin.list_resource_tags(KeyId=kid)["Tags"]
    assert tags == [{"TagKey": "env", "TagValue": "prod"}, {"TagKey": "team", "TagValue": "models"}]
    page = admin.list_resource_tags(KeyId=kid, Limit=1)
    assert page["Truncated"] is True
    rest = admin.list_resource_tags(KeyId=kid, Marker=page["NextMarker"])
    assert page["Tags"] + rest["Tags"] == tags
    admin.untag_resource(KeyId=kid, TagKeys=["env", "absent"])
    assert admin.list_resource_tags(KeyId=kid)["Tags"] == [{"TagKey": "team", "TagValue": "models"}]
    with pytest.raises(ClientError) as e:
        admin.tag_resource(KeyId=kid, Tags=[{"TagKey": "aws:owner", "TagValue": "x"}])
    assert _code(e) == "TagException"
    with pytest.raises(ClientError) as e:
        admin.tag_resource(
            KeyId=kid, Tags=[{"TagKey": f"t{i}", "TagValue": "v"} for i in range(50)]
        )
    assert _code(e) == "LimitExceededException"
    with pytest.raises(ClientError) as e:
        admin.create_key(Tags=[{"TagKey": "a", "TagValue": "1"}, {"TagKey": "a", "TagValue": "2"}])
    assert _code(e) == "TagException"
    admin.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
    with pytest.raises(ClientError) as e:
        admin.tag_resource(KeyId=kid, Tags=[{"TagKey": "late", "TagValue": "x"}])
    assert _code(e) == "KMSInvalidStateException"
    assert admin.list_resource_tags(KeyId=kid)["Tags"]  # still listed


def test_description_and_policies(admin: Any) -> None:
    kid = admin.create_key(Description="before")["KeyMetadata"]["KeyId"]
    admin.update_key_description(KeyId=kid, Description="after")
    assert admin.describe_key(KeyId=kid)["KeyMetadata"]["Description"] == "after"
    admin.update_key_description(KeyId=kid, Description="")
    assert admin.describe_key(KeyId=kid)["KeyMetadata"]["Description"] == ""
    assert admin.list_key_policies(KeyId=kid)["PolicyNames"] == ["default"]
    enclave = boto_client(admin.meta.endpoint_url, ENCLAVE)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": ADMIN.principal_arn},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    locked = admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]
    for call in (
        lambda: enclave.update_key_description(KeyId=locked, Description="x"),
        lambda: enclave.list_key_policies(KeyId=locked),
        lambda: enclave.list_resource_tags(KeyId=locked),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert _code(e) == "AccessDeniedException"


def test_key_material_ids_and_rotations(admin: Any) -> None:
    kid = admin.create_key()["KeyMetadata"]["KeyId"]
    first = admin.describe_key(KeyId=kid)["KeyMetadata"]["CurrentKeyMaterialId"]
    assert len(first) == 64
    old = admin.encrypt(KeyId=kid, Plaintext=b"v1")["CiphertextBlob"]
    assert admin.decrypt(CiphertextBlob=old)["KeyMaterialId"] == first
    assert admin.list_key_rotations(KeyId=kid)["Rotations"] == []
    admin.rotate_key_on_demand(KeyId=kid)
    second = admin.describe_key(KeyId=kid)["KeyMetadata"]["CurrentKeyMaterialId"]
    assert second != first
    new = admin.encrypt(KeyId=kid, Plaintext=b"v2")["CiphertextBlob"]
    assert admin.decrypt(CiphertextBlob=new)["KeyMaterialId"] == second
    assert admin.decrypt(CiphertextBlob=old)["KeyMaterialId"] == first  # old still decrypts
    (rotation,) = admin.list_key_rotations(KeyId=kid)["Rotations"]
    assert rotation["KeyMaterialId"] == second
    assert rotation["RotationType"] == "ON_DEMAND"
    assert rotation["KeyMaterialState"] == "CURRENT"
    everything = admin.list_key_rotations(KeyId=kid, IncludeKeyMaterial="ALL_KEY_MATERIAL")
    states = {r["KeyMaterialId"]: r["KeyMaterialState"] for r in everything["Rotations"]}
    assert states == {first: "NON_CURRENT", second: "CURRENT"}
    re = admin.re_encrypt(CiphertextBlob=old, DestinationKeyId=kid)
    assert re["SourceKeyMaterialId"] == first
    assert re["DestinationKeyMaterialId"] == second
    dk = admin.generate_data_key(KeyId=kid, KeySpec="AES_256")
    assert dk["KeyMaterialId"] == second
    for _ in range(MAX_ON_DEMAND_ROTATIONS - 1):
        admin.rotate_key_on_demand(KeyId=kid)
    with pytest.raises(ClientError) as e:
        admin.rotate_key_on_demand(KeyId=kid)
    assert _code(e) == "LimitExceededException"
    assert MAX_ON_DEMAND_ROTATIONS == 25  # AWS's documented limit
    assert len(admin.list_key_rotations(KeyId=kid, Limit=1000)["Rotations"]) == 25


def test_dry_run_ignore_ciphertext(daemon: DaemonThread, admin: Any) -> None:
    kid = admin.create_key()["KeyMetadata"]["KeyId"]
    dest = admin.create_key()["KeyMetadata"]["KeyId"]
    for call in (
        lambda c: c.decrypt(KeyId=kid, DryRun=True, DryRunModifiers=["IGNORE_CIPHERTEXT"]),
        lambda c: c.decrypt(
            KeyId=kid, CiphertextBlob=b"garbage", DryRun=True, DryRunModifiers=["IGNORE_CIPHERTEXT"]
        ),
        lambda c: c.re_encrypt(
            SourceKeyId=kid,
            DestinationKeyId=dest,
            DryRun=True,
            DryRunModifiers=["IGNORE_CIPHERTEXT"],
        ),
    ):
        with pytest.raises(ClientError) as e:  # authorized: would have succeeded
            call(admin)
        assert _code(e) == "DryRunOperationException"
        with pytest.raises(ClientError) as e:  # the permission test fails for an outsider
            call(boto_client(daemon.endpoint, OUTSIDER))
        assert _code(e) == "AccessDeniedException"
    with pytest.raises(ClientError) as e:  # the modifier needs the KeyId
        admin.decrypt(DryRun=True, DryRunModifiers=["IGNORE_CIPHERTEXT"])
    assert _code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:  # without the modifier a ciphertext is needed
        admin.decrypt(KeyId=kid)
    assert _code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:  # without it, a dry run still checks the ciphertext
        admin.decrypt(KeyId=kid, CiphertextBlob=b"garbage", DryRun=True)
    assert _code(e) == "InvalidCiphertextException"


def test_invalid_arns_and_reserved_aliases(admin: Any) -> None:
    kid = admin.create_key()["KeyMetadata"]["KeyId"]
    for bad in (
        "arn:aws:kms:us-east-1:1234:key/x",
        "arn:aws:s3:::bucket",
        "arn:",
        f"arn:aws:kms:us-east-1:{ACCOUNT}:keys/{kid}",
    ):
        with pytest.raises(ClientError) as e:
            admin.describe_key(KeyId=bad)
        assert _code(e) == "InvalidArnException", bad
    with pytest.raises(ClientError) as e:  # well-formed, another account: not found
        admin.describe_key(KeyId=f"arn:aws:kms:us-east-1:999999999999:key/{kid}")
    assert _code(e) == "NotFoundException"
    for call in (
        lambda: admin.create_alias(AliasName="alias/aws/mine", TargetKeyId=kid),
        lambda: admin.update_alias(AliasName="alias/aws/ebs", TargetKeyId=kid),
        lambda: admin.delete_alias(AliasName="alias/aws/ebs"),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert _code(e) == "NotAuthorizedException"
    raw = boto_client(admin.meta.endpoint_url, ADMIN, parameter_validation=False)
    with pytest.raises(ClientError) as e:  # a pattern's $ does not let a newline through
        raw.create_alias(AliasName="alias/ok\n", TargetKeyId=kid)
    assert _code(e) == "ValidationException"


def test_policy_of_131072_characters(tmp_path: Path) -> None:
    config = KmsConfig(
        host="127.0.0.1", port=0, state_dir=tmp_path / "state", credentials=ALL_CREDS
    )
    statement = {
        "Effect": "Allow",
        "Principal": {"AWS": ADMIN.principal_arn},
        "Action": "kms:*",
        "Resource": "*",
    }
    base = json.dumps({"Version": "2012-10-17", "Statement": [{**statement, "Sid": ""}]})
    policy = base.replace('"Sid": ""', '"Sid": "' + "s" * (131072 - len(base)) + '"')
    assert len(policy) == 131072
    with DaemonThread(config) as d:
        admin = boto_client(d.endpoint, ADMIN)
        kid = admin.create_key(Policy=policy)["KeyMetadata"]["KeyId"]
        assert admin.get_key_policy(KeyId=kid, PolicyName="default")["Policy"] == policy
        raw = boto_client(d.endpoint, ADMIN, parameter_validation=False)
        longer = policy.replace('"Sid": "', '"Sid": "s')
        with pytest.raises(ClientError) as e:
            raw.put_key_policy(KeyId=kid, PolicyName="default", Policy=longer)
        assert _code(e) == "ValidationException"
        with pytest.raises(ClientError) as e:  # beyond Latin-1: the model's pattern refuses it
            raw.put_key_policy(
                KeyId=kid, PolicyName="default", Policy=policy[:-10] + "\u2603" + policy[-9:]
            )
        assert _code(e) == "ValidationException"


def test_aws_cli_drives_metadata_operations(daemon: DaemonThread, admin: Any) -> None:
    def cli(*args: str) -> Any:
        code, out, err = aws_cli(daemon.endpoint, ADMIN, *args)
        assert code == 0, err
        return out

    kid = cli("create-key", "--description", "cli")["KeyMetadata"]["KeyId"]
    cli("tag-resource", "--key-id", kid, "--tags", "TagKey=a,TagValue=1", "TagKey=b,TagValue=2")
    assert [t["TagKey"] for t in cli("list-resource-tags", "--key-id", kid)["Tags"]] == ["a", "b"]
    cli("untag-resource", "--key-id", kid, "--tag-keys", "a")
    assert [t["TagKey"] for t in cli("list-resource-tags", "--key-id", kid)["Tags"]] == ["b"]
    cli("update-key-description", "--key-id", kid, "--description", "renamed")
    assert cli("describe-key", "--key-id", kid)["KeyMetadata"]["Description"] == "renamed"
    assert cli("list-key-policies", "--key-id", kid)["PolicyNames"] == ["default"]
    cli("rotate-key-on-demand", "--key-id", kid)
    rotations = cli("list-key-rotations", "--key-id", kid)["Rotations"]
    assert rotations[0]["RotationType"] == "ON_DEMAND"
    code, _, err = aws_cli(daemon.endpoint, ADMIN, "describe-key", "--key-id", "arn:nope")
    assert code != 0
    assert "InvalidArnException" in err
