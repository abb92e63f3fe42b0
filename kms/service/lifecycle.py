"""Key lifecycle: CreateKey, DescribeKey, ListKeys, EnableKey, DisableKey, ScheduleKeyDeletion,
CancelKeyDeletion. Each operation is its declaration plus only the work that is its own."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from .. import _wrap
from ..errors import KmsApiError
from ..policy import default_key_policy
from ..storage import VersionRow
from ._model import (
    DAY_S,
    DEFAULT_PENDING_WINDOW_DAYS,
    DEFAULT_ROTATION_DAYS,
    Answer,
    Key,
    Params,
)
from ._scaffold import KeyStep, Locate, Operation, Request, Require
from .authorization import lockout_check, parse_policy

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = ["OPERATIONS", "new_meta", "metadata"]


def new_meta(now: float, description: str) -> dict[str, Any]:
    """The metadata record of a fresh symmetric key."""
    return {
        "CreationDate": now,
        "Description": description,
        "Enabled": True,
        "KeyState": "Enabled",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "Origin": "AWS_KMS",
        "CurrentVersion": 1,
        "RotationEnabled": False,
        "RotationPeriodInDays": DEFAULT_ROTATION_DAYS,
        "OnDemandRotations": 0,
        "Tags": [],
    }


def metadata(svc: KmsService, key: Key) -> Answer:
    """AWS's KeyMetadata of ``key``."""
    m = key.meta
    out: Answer = {
        "AWSAccountId": svc.account_id,
        "KeyId": key.key_id,
        "Arn": key.arn,
        "CreationDate": m["CreationDate"],
        "Enabled": m["Enabled"],
        "Description": m["Description"],
        "KeyUsage": m["KeyUsage"],
        "KeyState": m["KeyState"],
        "Origin": m["Origin"],
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": m["KeySpec"],
        "KeySpec": m["KeySpec"],
        "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
        "MultiRegion": False,
    }
    if m.get("DeletionDate") is not None:
        out["DeletionDate"] = m["DeletionDate"]
        out["PendingDeletionWindowInDays"] = m["PendingWindowInDays"]
    return out


def _check_create(p: Params) -> None:
    spec = p.get("KeySpec", p.get("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT"))
    if (
        "KeySpec" in p
        and "CustomerMasterKeySpec" in p
        and p["KeySpec"] != p["CustomerMasterKeySpec"]
    ):
        raise KmsApiError("ValidationException", "KeySpec and CustomerMasterKeySpec differ.")
    usage = p.get("KeyUsage", "ENCRYPT_DECRYPT")
    if spec == "SYMMETRIC_DEFAULT" and usage != "ENCRYPT_DECRYPT":
        raise KmsApiError(
            "ValidationException",
            f"KeyUsage {usage} is not compatible with KeySpec SYMMETRIC_DEFAULT.",
        )
    if spec != "SYMMETRIC_DEFAULT":
        raise KmsApiError(
            "UnsupportedOperationException",
            f"KeySpec {spec} is not supported by this KMS (symmetric keys only).",
        )
    if p.get("Origin", "AWS_KMS") != "AWS_KMS" or "CustomKeyStoreId" in p or "XksKeyId" in p:
        raise KmsApiError(
            "UnsupportedOperationException", "Only Origin AWS_KMS keys are supported."
        )
    if p.get("MultiRegion"):
        raise KmsApiError("UnsupportedOperationException", "Multi-Region keys are not supported.")


async def _create_key(svc: KmsService, r: Request) -> Answer:
    p = r.params
    key_id = str(uuid.uuid4())
    arn = svc.arn(key_id)
    policy = parse_policy(p.get("Policy") or default_key_policy(svc.account_id))
    lockout_check(svc, policy, r.caller, arn, bool(p.get("BypassPolicyLockoutSafetyCheck")))
    r.outcome.key_arn = arn
    now = svc.clock()
    meta = new_meta(now, p.get("Description", ""))
    meta["Tags"] = p.get("Tags", [])
    key = Key(key_id, arn, meta, policy)
    material = _wrap.random_bytes(_wrap.AES_KEY_BYTES)
    version = VersionRow(key_id, 1, svc.master.wrap(key_id, 1, material), now)
    row = svc.key_row(key)
    await svc.write(lambda: svc.storage.create_key(row, [version]))
    key.versions[1] = _wrap.Aead(material)
    svc.add_key(key)
    return {"KeyMetadata": metadata(svc, key)}


async def _describe_key(svc: KmsService, r: Request) -> Answer:
    return {"KeyMetadata": metadata(svc, r.key())}


async def _list_keys(svc: KmsService, r: Request) -> Answer:
    from .management import page

    items, more = page(svc.keys_sorted(), r.params, 1000)
    return {"Keys": [{"KeyId": k, "KeyArn": arn} for k, arn in items], **more}


def _set_enabled(on: bool) -> Any:
    async def run(svc: KmsService, r: Request) -> Answer:
        key = r.key()
        await svc.save(key, dict(key.meta, Enabled=on, KeyState="Enabled" if on else "Disabled"))
        return {}

    return run


async def _schedule_deletion(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    days = int(r.params.get("PendingWindowInDays", DEFAULT_PENDING_WINDOW_DAYS))
    when = svc.clock() + days * DAY_S
    meta = dict(
        key.meta,
        Enabled=False,
        KeyState="PendingDeletion",
        DeletionDate=when,
        PendingWindowInDays=days,
    )
    await svc.save(key, meta)
    return {
        "KeyId": key.arn,
        "DeletionDate": when,
        "KeyState": "PendingDeletion",
        "PendingWindowInDays": days,
    }


async def _cancel_deletion(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    meta = dict(key.meta, KeyState="Disabled", Enabled=False)
    meta.pop("DeletionDate", None)
    meta.pop("PendingWindowInDays", None)
    await svc.save(key, meta)
    return {"KeyId": key.arn}


_NOT_PENDING = (KeyStep(require=Require.NOT_PENDING_DELETION),)

OPERATIONS = (
    Operation("CreateKey", _create_key, check=_check_create, writes=True),
    Operation("DescribeKey", _describe_key, keys=(KeyStep(locate=Locate.KEY_ID),)),
    Operation("ListKeys", _list_keys),
    Operation("EnableKey", _set_enabled(True), keys=_NOT_PENDING, writes=True),
    Operation("DisableKey", _set_enabled(False), keys=_NOT_PENDING, writes=True),
    Operation("ScheduleKeyDeletion", _schedule_deletion, keys=_NOT_PENDING, writes=True),
    Operation(
        "CancelKeyDeletion",
        _cancel_deletion,
        keys=(KeyStep(require=Require.PENDING_DELETION),),
        writes=True,
    ),
)
