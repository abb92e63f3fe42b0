"""Key management: aliases (CreateAlias, UpdateAlias, DeleteAlias, ListAliases) and rotation
(EnableKeyRotation, DisableKeyRotation, GetKeyRotationStatus, RotateKeyOnDemand)."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from ..errors import KmsApiError
from ._model import (
    DAY_S,
    DEFAULT_ROTATION_DAYS,
    MAX_ON_DEMAND_ROTATIONS,
    Answer,
    Key,
    KeyRecord,
    Params,
)
from ._scaffold import KeyStep, Locate, Operation, Request, Require

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = ["OPERATIONS", "page"]

_T = TypeVar("_T")


def page(
    items: list[_T], p: Params, default_limit: int, *, max_limit: int | None = None
) -> tuple[list[_T], Answer]:
    """One page of a List* answer (``Marker`` is the index of the first item; ``max_limit``
    caps the request's ``Limit``)."""
    marker = p.opt_text("Marker", "0")
    if not marker.isdigit() or int(marker) > len(items):
        raise KmsApiError("InvalidMarkerException", "The marker is not valid.")
    start = int(marker)
    limit = p.opt_int("Limit", default_limit)
    if max_limit is not None:
        limit = min(limit, max_limit)
    chunk = items[start : start + limit]
    truncated = start + limit < len(items)
    more: Answer = {"Truncated": truncated}
    if truncated:
        more["NextMarker"] = str(start + limit)
    return chunk, more


def _check_alias_name(p: Params) -> None:
    """AWS's alias rules: the ``alias/`` prefix, and ``alias/aws/`` reserved for AWS managed
    keys (NotAuthorizedException, the type AWS answers for CreateAlias, UpdateAlias and
    DeleteAlias on a reserved name)."""
    name = p.text("AliasName")
    if not name.startswith("alias/") or len(name) <= len("alias/"):
        raise KmsApiError("ValidationException", 'Alias must start with the prefix "alias/".')
    if name.startswith("alias/aws/"):
        raise KmsApiError(
            "NotAuthorizedException", "Aliases beginning with alias/aws/ are reserved."
        )


def _check_rotatable(key: Key, operation: str, *, automatic: bool) -> None:
    """Rotation is for symmetric encryption keys, not in a custom key store (AWS); automatic
    rotation for AWS_KMS material."""
    if key.spec.kind != "symmetric":
        raise KmsApiError(
            "UnsupportedOperationException",
            f"{operation}: {key.arn} is a {key.meta['KeySpec']} key; only symmetric encryption "
            "keys rotate.",
        )
    if key.origin == "EXTERNAL_KEY_STORE":
        raise KmsApiError(
            "UnsupportedOperationException",
            f"{operation}: {key.arn} is in a custom key store; its keys do not rotate.",
        )
    if automatic and key.origin != "AWS_KMS":
        raise KmsApiError(
            "UnsupportedOperationException",
            f"{operation}: {key.arn} origin is {key.origin} which is not valid for this operation.",
        )


async def _create_alias(svc: KmsService, r: Request) -> Answer:
    name, key = r.params.text("AliasName"), r.key()
    if name in svc.aliases or name in svc.quarantined:
        raise KmsApiError(
            "AlreadyExistsException", f"An alias with the name {svc.alias_arn(name)} already exists"
        )
    now = svc.clock()
    row = svc.alias_row(name, key.key_id, now, now)
    await svc.write(lambda: svc.storage.put_alias(row))
    svc.aliases[name] = row
    return {}


async def _update_alias(svc: KmsService, r: Request) -> Answer:
    name, key = r.params.text("AliasName"), r.key(1)
    old = svc.aliases[name]
    row = svc.alias_row(name, key.key_id, old.created, svc.clock())
    await svc.write(lambda: svc.storage.put_alias(row))
    svc.aliases[name] = row
    return {}


async def _delete_alias(svc: KmsService, r: Request) -> Answer:
    name = r.params.text("AliasName")
    await svc.write(lambda: svc.storage.delete_alias(name))
    del svc.aliases[name]
    return {}


async def _list_aliases(svc: KmsService, r: Request) -> Answer:
    aliases = sorted(svc.aliases.values(), key=lambda a: a.name)
    key = r.keys[0]
    if key is not None:
        aliases = [a for a in aliases if a.key_id == key.key_id]
    chunk, more = page(aliases, r.params, 50)
    return {
        "Aliases": [
            {
                "AliasName": a.name,
                "AliasArn": svc.alias_arn(a.name),
                "TargetKeyId": a.key_id,
                "CreationDate": a.created,
                "LastUpdatedDate": a.updated,
            }
            for a in chunk
        ],
        **more,
    }


async def _enable_rotation(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    _check_rotatable(key, "EnableKeyRotation", automatic=True)
    requested = r.params.opt_int("RotationPeriodInDays")
    period = (
        requested
        if requested is not None
        else int(key.meta.get("RotationPeriodInDays", DEFAULT_ROTATION_DAYS))
    )
    meta: KeyRecord = {
        **key.meta,
        "RotationEnabled": True,
        "RotationPeriodInDays": period,
        "NextRotationDate": svc.clock() + period * DAY_S,
    }
    await svc.save(key, meta)
    return {}


async def _disable_rotation(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    _check_rotatable(key, "DisableKeyRotation", automatic=True)
    meta: KeyRecord = {**key.meta, "RotationEnabled": False}
    meta.pop("NextRotationDate", None)
    await svc.save(key, meta)
    return {}


async def _rotation_status(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    _check_rotatable(key, "GetKeyRotationStatus", automatic=False)
    m = key.meta
    ans: Answer = {"KeyRotationEnabled": bool(m.get("RotationEnabled")), "KeyId": key.arn}
    if m.get("RotationEnabled"):
        ans["RotationPeriodInDays"] = m["RotationPeriodInDays"]
        ans["NextRotationDate"] = m["NextRotationDate"]
    return ans


async def _rotate_on_demand(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    _check_rotatable(key, "RotateKeyOnDemand", automatic=False)
    if int(key.meta.get("OnDemandRotations", 0)) >= MAX_ON_DEMAND_ROTATIONS:
        raise KmsApiError(
            "LimitExceededException",
            f"{key.arn} has reached the limit of {MAX_ON_DEMAND_ROTATIONS} on-demand rotations.",
        )
    if key.origin == "EXTERNAL":
        from .byok import rotate_to_pending

        await rotate_to_pending(svc, key)
    else:
        await svc.rotate(key, on_demand=True)
    svc.recompute_deadline()
    return {"KeyId": key.arn}


_TARGET = KeyStep(param="TargetKeyId")
_USABLE = (KeyStep(require=Require.USABLE),)

OPERATIONS = (
    Operation(
        "CreateAlias",
        _create_alias,
        keys=(KeyStep(param="TargetKeyId", require=Require.NOT_PENDING_DELETION),),
        check=_check_alias_name,
        writes=True,
    ),
    Operation(
        "UpdateAlias",
        _update_alias,
        # The alias's current key, then the new target: both must allow UpdateAlias (AWS).
        keys=(KeyStep(param="AliasName", locate=Locate.ALIAS_TARGET), _TARGET),
        check=_check_alias_name,
        writes=True,
    ),
    Operation(
        "DeleteAlias",
        _delete_alias,
        keys=(KeyStep(param="AliasName", locate=Locate.ALIAS_TARGET),),
        check=_check_alias_name,
        writes=True,
    ),
    Operation("ListAliases", _list_aliases, keys=(KeyStep(optional=True),)),
    Operation("EnableKeyRotation", _enable_rotation, keys=_USABLE, writes=True),
    Operation("DisableKeyRotation", _disable_rotation, keys=_USABLE, writes=True),
    Operation("GetKeyRotationStatus", _rotation_status, keys=(KeyStep(),)),
    Operation("RotateKeyOnDemand", _rotate_on_demand, keys=_USABLE, writes=True),
)
