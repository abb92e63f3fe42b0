"""Key metadata: TagResource, UntagResource, ListResourceTags, UpdateKeyDescription,
ListKeyPolicies, ListKeyRotations."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import KmsApiError
from ._model import Answer, MaterialRecord
from ._scaffold import KeyStep, Operation, Request, Require
from .lifecycle import check_tags
from .management import page

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = ["OPERATIONS"]

#: ListResourceTags pages hold at most 50 tags (AWS: Limit 1..50, default 50).
_TAGS_PAGE = 50


async def _tag_resource(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    tags = {t["TagKey"]: t["TagValue"] for t in key.meta.get("Tags", [])}
    check_tags(r.params.tags("Tags"))
    for t in r.params.tags("Tags"):  # an existing key gets the new value (AWS)
        tags[t["TagKey"]] = t["TagValue"]
    merged = [{"TagKey": k, "TagValue": v} for k, v in tags.items()]
    check_tags(merged)
    await svc.save(key, {**key.meta, "Tags": merged})
    return {}


async def _untag_resource(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    drop = set(r.params.text_list("TagKeys"))
    kept = [t for t in key.meta.get("Tags", []) if t["TagKey"] not in drop]
    await svc.save(key, {**key.meta, "Tags": kept})
    return {}


async def _list_resource_tags(svc: KmsService, r: Request) -> Answer:
    tags = sorted(r.key().meta.get("Tags", []), key=lambda t: t["TagKey"])
    items, more = page(tags, r.params, _TAGS_PAGE, max_limit=_TAGS_PAGE)
    return {"Tags": items, **more}


async def _update_description(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    await svc.save(key, {**key.meta, "Description": r.params.text("Description")})
    return {}


async def _list_key_policies(svc: KmsService, r: Request) -> Answer:
    items, more = page(["default"], r.params, 100)
    return {"PolicyNames": items, **more}


def _rotation_entry(key_arn: str, origin: str, entry: MaterialRecord) -> Answer:
    out: Answer = {
        "KeyId": key_arn,
        "KeyMaterialId": entry["Id"],
        "KeyMaterialState": entry["State"],
    }
    for name in ("RotationDate", "RotationType"):
        if entry.get(name) is not None:
            out[name] = entry[name]
    if origin == "EXTERNAL":
        out["ImportState"] = entry.get("ImportState", "PENDING_IMPORT")
        if entry.get("ExpirationModel") is not None:
            out["ExpirationModel"] = entry["ExpirationModel"]
        if entry.get("ValidTo") is not None:
            out["ValidTo"] = entry["ValidTo"]
        if entry.get("Description"):
            out["KeyMaterialDescription"] = entry["Description"]
    return out


async def _list_key_rotations(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    if key.spec.kind != "symmetric":
        raise KmsApiError(
            "UnsupportedOperationException",
            f"ListKeyRotations: {key.arn} is a {key.meta['KeySpec']} key, which does not rotate.",
        )
    everything = r.params.opt_text("IncludeKeyMaterial") == "ALL_KEY_MATERIAL"
    materials = sorted(key.materials().items(), key=lambda kv: int(kv[0]))
    # ROTATIONS_ONLY (the default): materials that a rotation made current, not the first one
    # nor imported material waiting for its rotation.
    chosen = [
        e
        for _, e in materials
        if everything or (e.get("RotationDate") is not None and e["State"] != "PENDING_ROTATION")
    ]
    items, more = page(chosen, r.params, 100)
    return {"Rotations": [_rotation_entry(key.arn, key.origin, e) for e in items], **more}


_NOT_PENDING_DELETION = (KeyStep(require=Require.NOT_PENDING_DELETION),)

OPERATIONS = (
    Operation("TagResource", _tag_resource, keys=_NOT_PENDING_DELETION, writes=True),
    Operation("UntagResource", _untag_resource, keys=_NOT_PENDING_DELETION, writes=True),
    Operation("ListResourceTags", _list_resource_tags, keys=(KeyStep(),)),
    Operation("UpdateKeyDescription", _update_description, keys=_NOT_PENDING_DELETION, writes=True),
    Operation("ListKeyPolicies", _list_key_policies, keys=(KeyStep(),)),
    Operation("ListKeyRotations", _list_key_rotations, keys=(KeyStep(),)),
)
