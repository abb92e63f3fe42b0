"""Key lifecycle: CreateKey, DescribeKey, ListKeys, EnableKey, DisableKey, ScheduleKeyDeletion,
CancelKeyDeletion. Each operation is its declaration plus only the work that is its own.

CreateKey takes the write lock itself, for the write only: a key in an external key store is
checked with the store's proxy first (GetKeyMetadata, up to the proxy timeout), and that call
must not hold every other writer back. What the check relied on (the store CONNECTED, the
external key id unused) is checked again under the lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from .. import _asym, _wrap
from ..errors import KmsApiError
from ..keyspecs import CMK_SPECS, SPECS, SYMMETRIC, UNSUPPORTED_SPECS
from ..keystores.record import CONNECTED, EXTERNAL_KEY_STORE_ORIGIN, KeyStore
from ..policy import default_key_policy
from ..storage import VersionRow
from . import external
from ._model import (
    DAY_S,
    DEFAULT_PENDING_WINDOW_DAYS,
    DEFAULT_ROTATION_DAYS,
    Answer,
    Key,
    KeyRecord,
    MaterialRecord,
    Params,
)
from ._scaffold import KeyStep, Locate, Operation, Request, Require, Run
from .authorization import lockout_check, parse_policy

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = [
    "OPERATIONS",
    "new_meta",
    "metadata",
    "describe_materials",
    "import_state",
    "MAX_TAGS",
    "check_tags",
    "key_state",
]

#: AWS allows at most 50 tags per KMS key.
MAX_TAGS = 50


def new_meta(
    now: float,
    description: str,
    *,
    spec: str = SYMMETRIC,
    usage: str = "ENCRYPT_DECRYPT",
    origin: str = "AWS_KMS",
) -> KeyRecord:
    """The metadata record of a fresh key (symmetric AWS_KMS unless told otherwise)."""
    pending = origin == "EXTERNAL"
    return {
        "CreationDate": now,
        "Description": description,
        "Enabled": not pending,
        "KeyState": "PendingImport" if pending else "Enabled",
        "KeyUsage": usage,
        "KeySpec": spec,
        "Origin": origin,
        "CurrentVersion": 1,
        "RotationEnabled": False,
        "RotationPeriodInDays": DEFAULT_ROTATION_DAYS,
        "OnDemandRotations": 0,
        "Tags": [],
        "Materials": {},
    }


def describe_materials(
    key_id: str, materials: Sequence[bytes], now: float
) -> dict[str, MaterialRecord]:
    """The material descriptions of versions 1..n generated here (the last one current)."""
    out: dict[str, MaterialRecord] = {}
    for version, material in enumerate(materials, start=1):
        entry: MaterialRecord = {
            "Id": _asym.material_id(key_id, material),
            "State": "CURRENT" if version == len(materials) else "NON_CURRENT",
        }
        if version > 1:
            entry["RotationDate"] = now
        out[str(version)] = entry
    return out


def import_state(meta: KeyRecord) -> str:
    """The KeyState an EXTERNAL key's materials give it (PendingDeletion aside): PendingImport
    while any material it uses is not imported, else Enabled/Disabled by its Enabled flag."""
    used = [e for e in meta.get("Materials", {}).values() if e.get("State") != "PENDING_ROTATION"]
    if not used or any(e.get("ImportState") != "IMPORTED" for e in used):
        return "PendingImport"
    return "Enabled" if meta["Enabled"] else "Disabled"


def key_state(svc: KmsService, key: Key) -> str:
    """The KeyState AWS reports: ``Unavailable`` for an enabled or disabled key whose custom
    key store is not CONNECTED (the stored state comes back with the connection)."""
    state = key.state
    if (
        state in ("Enabled", "Disabled")
        and key.meta["Origin"] == EXTERNAL_KEY_STORE_ORIGIN
        and getattr(svc.key_stores.get(str(key.meta.get("CustomKeyStoreId"))), "state", None)
        != CONNECTED
    ):
        return "Unavailable"
    return state


def metadata(svc: KmsService, key: Key) -> Answer:
    """AWS's KeyMetadata of ``key``."""
    m = key.meta
    spec = key.spec
    out: Answer = {
        "AWSAccountId": svc.account_id,
        "KeyId": key.key_id,
        "Arn": key.arn,
        "CreationDate": m["CreationDate"],
        "Enabled": m["Enabled"],
        "Description": m["Description"],
        "KeyUsage": m["KeyUsage"],
        "KeyState": key_state(svc, key),
        "Origin": m["Origin"],
        "KeyManager": "CUSTOMER",
        "KeySpec": m["KeySpec"],
        **spec.algorithms(m["KeyUsage"]),
        "MultiRegion": False,
    }
    if m["KeySpec"] in CMK_SPECS:  # the deprecated field's enum stopped growing
        out["CustomerMasterKeySpec"] = m["KeySpec"]
    if m.get("DeletionDate") is not None:
        out["DeletionDate"] = m["DeletionDate"]
        out["PendingDeletionWindowInDays"] = m["PendingWindowInDays"]
    current = m.get("Materials", {}).get(str(m["CurrentVersion"]))
    if m["Origin"] == EXTERNAL_KEY_STORE_ORIGIN:
        # No CurrentKeyMaterialId: the model gives it for AWS_KMS and EXTERNAL origins only.
        out["CustomKeyStoreId"] = m["CustomKeyStoreId"]
        out["XksKeyConfiguration"] = {"Id": m["XksKeyId"]}
    elif spec.kind == "symmetric" and current is not None:
        out["CurrentKeyMaterialId"] = current["Id"]
    if m["Origin"] == "EXTERNAL" and current is not None and current.get("ExpirationModel"):
        out["ExpirationModel"] = current["ExpirationModel"]
        if current.get("ValidTo") is not None:
            out["ValidTo"] = current["ValidTo"]
    return out


def check_tags(tags: Sequence[dict[str, str]]) -> None:
    """Tag keys AWS refuses (TagException): the reserved ``aws:`` prefix, duplicates."""
    seen: set[str] = set()
    for tag in tags:
        name = tag["TagKey"]
        if name.lower().startswith("aws:"):
            raise KmsApiError("TagException", "Tag keys beginning with aws: are reserved.")
        if name in seen:
            raise KmsApiError("TagException", f"Duplicate tag key {name}.")
        seen.add(name)
    if len(tags) > MAX_TAGS:
        raise KmsApiError("LimitExceededException", f"A KMS key can have at most {MAX_TAGS} tags.")


def _create_spec(p: Params) -> tuple[str, str]:
    """The (KeySpec, KeyUsage) a CreateKey request asks for, as AWS validates them."""
    spec = p.opt_text("KeySpec", p.opt_text("CustomerMasterKeySpec", SYMMETRIC))
    if (
        "KeySpec" in p
        and "CustomerMasterKeySpec" in p
        and p.text("KeySpec") != p.text("CustomerMasterKeySpec")
    ):
        raise KmsApiError("ValidationException", "KeySpec and CustomerMasterKeySpec differ.")
    info = SPECS[spec]
    usage = p.opt_text("KeyUsage")
    if usage is None:
        if len(info.usages) > 1 and info.kind != "symmetric":
            raise KmsApiError(
                "ValidationException",
                f"KeyUsage is required for KeySpec {spec}: one of {', '.join(info.usages)}.",
            )
        usage = info.usages[0]
    usage = str(usage)
    if usage not in info.usages:
        raise KmsApiError(
            "ValidationException", f"KeyUsage {usage} is not compatible with KeySpec {spec}."
        )
    return spec, usage


def _check_create(p: Params) -> None:
    spec, _ = _create_spec(p)
    if not SPECS[spec].supported:
        raise KmsApiError(
            "UnsupportedOperationException",
            f"CreateKey: KeySpec {spec} is not supported by this KMS: "
            f"{UNSUPPORTED_SPECS.get(spec, 'not implemented yet')}.",
        )
    origin = p.opt_text("Origin", "AWS_KMS")
    if origin == "AWS_CLOUDHSM":
        raise KmsApiError(
            "UnsupportedOperationException",
            "CreateKey: Origin AWS_CLOUDHSM (CloudHSM key stores) is not supported by this KMS.",
        )
    if origin == EXTERNAL_KEY_STORE_ORIGIN:
        for member in ("CustomKeyStoreId", "XksKeyId"):
            if member not in p:
                raise KmsApiError(
                    "ValidationException",
                    f"{member} is required for a KMS key with Origin EXTERNAL_KEY_STORE.",
                )
        if _create_spec(p) != (SYMMETRIC, "ENCRYPT_DECRYPT"):
            raise KmsApiError(
                "UnsupportedOperationException",
                "CreateKey: a KMS key in a custom key store must be a symmetric encryption key "
                "(KeySpec SYMMETRIC_DEFAULT, KeyUsage ENCRYPT_DECRYPT).",
            )
        if p.opt_bool("MultiRegion"):
            raise KmsApiError(
                "UnsupportedOperationException",
                "CreateKey: multi-Region keys cannot be created in a custom key store.",
            )
    elif "XksKeyId" in p:
        raise KmsApiError(
            "ValidationException", "XksKeyId is valid only with Origin EXTERNAL_KEY_STORE."
        )
    elif "CustomKeyStoreId" in p:
        raise KmsApiError(
            "ValidationException",
            "CustomKeyStoreId names an external key store: its keys need Origin "
            "EXTERNAL_KEY_STORE and an XksKeyId.",
        )
    if p.opt_bool("MultiRegion"):
        raise KmsApiError(
            "UnsupportedOperationException",
            "CreateKey: multi-Region keys are not supported by this KMS.",
        )
    check_tags(p.opt_tags("Tags", []))


def _external_store(svc: KmsService, p: Params) -> KeyStore:
    """The CONNECTED external key store a CreateKey names, its external key id unused in it."""
    store_id = p.text("CustomKeyStoreId")
    store = svc.key_stores.get(store_id)
    if store is None:
        raise KmsApiError(
            "CustomKeyStoreNotFoundException", f"Custom key store {store_id} does not exist."
        )
    if store.state != CONNECTED:
        raise KmsApiError(
            "CustomKeyStoreInvalidStateException",
            f"Custom key store {store_id} is {store.state}; CreateKey needs it CONNECTED.",
        )
    xks_key_id = p.text("XksKeyId")
    for other in svc.keys_in_store(store_id):
        if other.meta.get("XksKeyId") == xks_key_id:
            raise KmsApiError(
                "XksKeyAlreadyInUseException",
                f"The external key {xks_key_id} is already associated with {other.arn} in "
                f"custom key store {store_id}.",
            )
    return store


async def _create_key(svc: KmsService, r: Request) -> Answer:
    p = r.params
    spec_name, usage = _create_spec(p)
    spec = SPECS[spec_name]
    origin = p.opt_text("Origin", "AWS_KMS")
    key_id = str(uuid.uuid4())
    arn = svc.arn(key_id)
    policy = parse_policy(p.opt_text("Policy") or default_key_policy(svc.account_id))
    lockout_check(svc, policy, r.caller, arn, p.flag("BypassPolicyLockoutSafetyCheck"))
    r.outcome.key_arn = arn
    if origin == EXTERNAL_KEY_STORE_ORIGIN:
        store = _external_store(svc, p)
        await external.check_external_key(svc, store, p.text("XksKeyId"), r)
    material: bytes | None = None
    # Keys in an external key store also get KMS key material: the first of the two layers.
    if origin in ("AWS_KMS", EXTERNAL_KEY_STORE_ORIGIN):
        if spec.kind == "symmetric":
            material = _wrap.random_bytes(_wrap.AES_KEY_BYTES)
        elif spec.kind == "hmac":
            material = _asym.generate_hmac_key(spec)
        else:  # RSA-4096 generation takes up to a second: keep it off the event loop.
            material = await trio.to_thread.run_sync(_asym.generate_private_key, spec)
    now = svc.clock()
    meta = new_meta(now, p.opt_text("Description", ""), spec=spec_name, usage=usage, origin=origin)
    meta["Tags"] = p.opt_tags("Tags", [])
    if origin == EXTERNAL_KEY_STORE_ORIGIN:
        meta["CustomKeyStoreId"] = p.text("CustomKeyStoreId")
        meta["XksKeyId"] = p.text("XksKeyId")
    if material is not None:
        meta["Materials"] = describe_materials(key_id, [material], now)
    key = Key(key_id, arn, meta, policy)
    versions = (
        [VersionRow(key_id, 1, svc.master.wrap(key_id, 1, material), now)]
        if material is not None
        else []
    )
    row = svc.key_row(key)
    async with svc.write_lock:
        if origin == EXTERNAL_KEY_STORE_ORIGIN:
            _external_store(svc, p)  # still CONNECTED, the external key still unused
        await svc.write(lambda: svc.storage.create_key(row, versions))
        if material is not None:
            svc.attach_material(key, 1, material)
        svc.add_key(key)
    return {"KeyMetadata": metadata(svc, key)}


async def _describe_key(svc: KmsService, r: Request) -> Answer:
    return {"KeyMetadata": metadata(svc, r.key())}


async def _list_keys(svc: KmsService, r: Request) -> Answer:
    from .management import page

    owners = r.params.opt_text_list("ResourceOwners", ["SELF"])
    keys = svc.keys_sorted() if "SELF" in owners else []  # no keys are shared through RAM here
    items, more = page(keys, r.params, 1000)
    return {"Keys": [{"KeyId": k, "KeyArn": arn} for k, arn in items], **more}


def _set_enabled(on: bool) -> Run:
    async def run(svc: KmsService, r: Request) -> Answer:
        key = r.key()
        await svc.save(
            key, {**key.meta, "Enabled": on, "KeyState": "Enabled" if on else "Disabled"}
        )
        return {}

    return run


async def _schedule_deletion(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    days = r.params.opt_int("PendingWindowInDays", DEFAULT_PENDING_WINDOW_DAYS)
    when = svc.clock() + days * DAY_S
    meta: KeyRecord = {
        **key.meta,
        "Enabled": False,
        "KeyState": "PendingDeletion",
        "DeletionDate": when,
        "PendingWindowInDays": days,
    }
    await svc.save(key, meta)
    return {
        "KeyId": key.arn,
        "DeletionDate": when,
        "KeyState": "PendingDeletion",
        "PendingWindowInDays": days,
    }


async def _cancel_deletion(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    meta: KeyRecord = {**key.meta, "KeyState": "Disabled", "Enabled": False}
    meta.pop("DeletionDate", None)
    meta.pop("PendingWindowInDays", None)
    if key.origin == "EXTERNAL":  # back to PendingImport if its material is gone meanwhile
        meta["KeyState"] = import_state(meta)
    await svc.save(key, meta)
    return {"KeyId": key.arn}


_NOT_PENDING = (KeyStep(require=Require.NOT_PENDING),)
_NOT_PENDING_DELETION = (KeyStep(require=Require.NOT_PENDING_DELETION),)

OPERATIONS = (
    # Not ``writes``: the run takes the write lock for its write (module docstring).
    Operation("CreateKey", _create_key, check=_check_create),
    Operation("DescribeKey", _describe_key, keys=(KeyStep(locate=Locate.KEY_ID),)),
    Operation("ListKeys", _list_keys),
    Operation("EnableKey", _set_enabled(True), keys=_NOT_PENDING, writes=True),
    Operation("DisableKey", _set_enabled(False), keys=_NOT_PENDING, writes=True),
    Operation("ScheduleKeyDeletion", _schedule_deletion, keys=_NOT_PENDING_DELETION, writes=True),
    Operation(
        "CancelKeyDeletion",
        _cancel_deletion,
        keys=(KeyStep(require=Require.PENDING_DELETION),),
        writes=True,
    ),
)
