"""The key record: what the service stores (and authenticates) as a key's metadata row.

The record is JSON text in the key row (``keys.meta`` in SQLite and PostgreSQL alike, written
by :meth:`kms.service._model.Key.meta_text` with sorted keys); :class:`KeyRecord` names every
member the service writes. :func:`parse_key_record` is the one way back from the stored text:
it checks each member's type, so an authentic record that does not have the shape (a bug, or a
record from a newer daemon) is a clear :class:`ValueError` at load, which quarantines the key,
not a crash in the middle of a later request. Members this version does not know are kept as
they are (a record written by a newer daemon keeps them through our saves).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Required, TypedDict, cast

__all__ = ["MaterialRecord", "KeyRecord", "parse_key_record"]


class MaterialRecord(TypedDict, total=False):
    """One key material's description (``KeyRecord["Materials"][str(version)]``)."""

    #: The KeyMaterialId (hex).
    Id: Required[str]
    #: ``CURRENT`` | ``NON_CURRENT`` | ``PENDING_ROTATION``.
    State: Required[str]
    #: When it became current (epoch seconds; absent for version 1).
    RotationDate: float
    #: ``AUTOMATIC`` | ``ON_DEMAND`` (absent when not recorded).
    RotationType: str
    #: Imported material: ``IMPORTED`` | ``PENDING_IMPORT``.
    ImportState: str
    #: Imported material: ``KEY_MATERIAL_EXPIRES`` | ``KEY_MATERIAL_DOES_NOT_EXPIRE``.
    ExpirationModel: str
    #: Imported material's expiry (epoch seconds; null when it does not expire).
    ValidTo: float | None
    #: Imported material's KeyMaterialDescription.
    Description: str


class KeyRecord(TypedDict, total=False):
    """A key's stored metadata. The required members were in every record ever written;
    the others are absent from older records or only present in some states."""

    CreationDate: Required[float]
    Description: Required[str]
    Enabled: Required[bool]
    #: ``Enabled`` | ``Disabled`` | ``PendingDeletion`` | ``PendingImport``.
    KeyState: Required[str]
    KeyUsage: Required[str]
    KeySpec: Required[str]
    #: ``AWS_KMS`` | ``EXTERNAL`` | ``AWS_CLOUDHSM`` | ``EXTERNAL_KEY_STORE``.
    Origin: Required[str]
    #: The material version new ciphertexts use.
    CurrentVersion: Required[int]
    RotationEnabled: bool
    RotationPeriodInDays: int
    OnDemandRotations: int
    Tags: list[dict[str, str]]
    #: Version (as a string: a JSON key) → its material's description (absent before schema 3).
    Materials: dict[str, MaterialRecord]
    NextRotationDate: float
    LastRotationDate: float
    DeletionDate: float
    PendingWindowInDays: int
    #: Keys in an external key store: the store and the key's id in its key manager.
    CustomKeyStoreId: str
    XksKeyId: str


def _number(value: object) -> bool:  # JSON has one number type: 5 is a fine float
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: object) -> bool:
    return isinstance(value, str)


def _flag(value: object) -> bool:
    return isinstance(value, bool)


def _tags(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in t.items())
        for t in value
    )


_Check = Callable[[object], bool]

_MATERIAL: dict[str, tuple[_Check, str]] = {
    "Id": (_text, "a string"),
    "State": (_text, "a string"),
    "RotationDate": (_number, "a number"),
    "RotationType": (_text, "a string"),
    "ImportState": (_text, "a string"),
    "ExpirationModel": (_text, "a string"),
    "ValidTo": (lambda v: v is None or _number(v), "a number or null"),
    "Description": (_text, "a string"),
}
_MATERIAL_REQUIRED = ("Id", "State")


def _materials(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    for version, entry in value.items():
        if not (isinstance(version, str) and version.isdigit() and isinstance(entry, dict)):
            return False
        _members_ok(entry, _MATERIAL, _MATERIAL_REQUIRED, f"Materials.{version}.")
    return True


_KEY: dict[str, tuple[_Check, str]] = {
    "CreationDate": (_number, "a number"),
    "Description": (_text, "a string"),
    "Enabled": (_flag, "a boolean"),
    "KeyState": (_text, "a string"),
    "KeyUsage": (_text, "a string"),
    "KeySpec": (_text, "a string"),
    "Origin": (_text, "a string"),
    "CurrentVersion": (_integer, "an integer"),
    "RotationEnabled": (_flag, "a boolean"),
    "RotationPeriodInDays": (_integer, "an integer"),
    "OnDemandRotations": (_integer, "an integer"),
    "Tags": (_tags, "a list of TagKey/TagValue objects"),
    "Materials": (_materials, "an object of version -> material description"),
    "NextRotationDate": (_number, "a number"),
    "LastRotationDate": (_number, "a number"),
    "DeletionDate": (_number, "a number"),
    "PendingWindowInDays": (_integer, "an integer"),
    "CustomKeyStoreId": (_text, "a string"),
    "XksKeyId": (_text, "a string"),
}
#: KeyRecord's Required members (spelled out: under PEP 563 the TypedDict cannot see
#: ``Required`` at run time, so ``__required_keys__`` is empty; a test keeps the two in step).
KEY_REQUIRED = (
    "CreationDate",
    "CurrentVersion",
    "Description",
    "Enabled",
    "KeySpec",
    "KeyState",
    "KeyUsage",
    "Origin",
)


def _members_ok(
    record: Mapping[object, object],
    checks: Mapping[str, tuple[_Check, str]],
    required: tuple[str, ...],
    where: str,
) -> None:
    """Raise ValueError naming the first missing or wrongly typed member."""
    for name in required:
        if name not in record:
            raise ValueError(f"key record member {where}{name} is missing")
    for member, value in record.items():
        check = checks.get(member) if isinstance(member, str) else None
        if check is not None and not check[0](value):
            raise ValueError(
                f"key record member {where}{member} is not {check[1]} (got {type(value).__name__})"
            )


def parse_key_record(text: str | bytes) -> KeyRecord:
    """The stored JSON text back as a :class:`KeyRecord`, every known member type-checked.

    Raises:
        ValueError: not JSON, not an object, a required member missing or a member of the
            wrong type (the message names it).
    """
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"key record is not a JSON object (got {type(value).__name__})")
    _members_ok(value, _KEY, KEY_REQUIRED, "")
    # Checked member by member just above: the one place the JSON becomes a KeyRecord.
    return cast("KeyRecord", value)
