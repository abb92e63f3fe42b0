"""Bring your own key: GetParametersForImport, ImportKeyMaterial, DeleteImportedKeyMaterial,
and the expiry of imported material.

Theory of operation. A key created with Origin ``EXTERNAL`` has no material and is
``PendingImport``. GetParametersForImport makes a fresh RSA wrapping key and returns its public
half with an **import token**: the wrapping private key sealed under the master key's
import-token subkey, bound to the key id, the wrapping algorithm and an expiry 24 hours out
(:meth:`kms.integrity.MasterKey.seal_import_token`), so the daemon keeps no state between the
two calls and a token works only for its key and until it expires. ImportKeyMaterial opens the
token, unwraps the material (RSAES-OAEP, or RSA-OAEP + AES Key Wrap with Padding), checks it
fits the key spec, and stores it wrapped under the master key like generated material.

Each material is described in the key's authenticated record (``meta["Materials"]``: its
KeyMaterialId, import state, expiration model and ValidTo). When ValidTo passes, the
maintenance step (run before the next request) deletes the material and the key turns
``PendingImport``: nothing encrypts or decrypts under it until the same material is imported
again. DeleteImportedKeyMaterial does the same at once. Symmetric keys may hold several imported
materials: ``ImportType=NEW_KEY_MATERIAL`` adds one in ``PENDING_ROTATION`` and
RotateKeyOnDemand makes it current.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import structlog
import trio

from .. import _asym
from ..errors import CiphertextFormatError, KmsApiError
from ..integrity import ImportToken
from ..keyspecs import HMAC_MAX_BYTES
from ..storage import VersionRow
from ._model import DAY_S, Answer, Key, KeyRecord, MaterialRecord, Params
from ._scaffold import KeyStep, Operation, Request, Require
from .lifecycle import import_state

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = [
    "OPERATIONS",
    "delete_material",
    "rotate_to_pending",
    "IMPORT_PARAMETERS_VALID_S",
    "MAX_VALID_TO_S",
]

log = structlog.get_logger()

#: A public key and import token pair is valid for 24 hours (AWS).
IMPORT_PARAMETERS_VALID_S = 24 * 3600.0
#: ValidTo may be at most 365 days after the import request (AWS).
MAX_VALID_TO_S = 365 * DAY_S
_WRAPPING_BITS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
_SUPPORTED_WRAPPING = (
    "RSAES_OAEP_SHA_1",
    "RSAES_OAEP_SHA_256",
    "RSA_AES_KEY_WRAP_SHA_1",
    "RSA_AES_KEY_WRAP_SHA_256",
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _require_external(key: Key, operation: str) -> None:
    if key.origin != "EXTERNAL":
        raise KmsApiError(
            "UnsupportedOperationException",
            f"{operation}: {key.arn} origin is {key.origin} which is not valid for this operation.",
        )


def _check_parameters(p: Params) -> None:
    alg, spec = p.text("WrappingAlgorithm"), p.text("WrappingKeySpec")
    if spec == "SM2" or alg == "SM2PKE":
        raise KmsApiError(
            "UnsupportedOperationException",
            "GetParametersForImport: SM2 wrapping (China Regions) is not supported by this KMS.",
        )
    if alg not in _SUPPORTED_WRAPPING:  # RSAES_PKCS1_V1_5: AWS no longer accepts it
        raise KmsApiError(
            "ValidationException",
            f"WrappingAlgorithm {alg} is not supported; use one of "
            f"{', '.join(_SUPPORTED_WRAPPING)}.",
        )


async def _get_parameters(svc: KmsService, r: Request) -> Answer:
    key, p = r.key(), r.params
    _require_external(key, "GetParametersForImport")
    alg = p.text("WrappingAlgorithm")
    if key.spec.asymmetric and not alg.startswith("RSA_AES_KEY_WRAP_"):
        raise KmsApiError(
            "ValidationException",
            f"{key.meta['KeySpec']} private keys are too large for {alg}: use "
            "RSA_AES_KEY_WRAP_SHA_256.",
        )
    bits = _WRAPPING_BITS[p.text("WrappingKeySpec")]
    # RSA-4096 generation takes up to a second: off the event loop.
    private_der = await trio.to_thread.run_sync(_asym.generate_wrapping_key, bits)
    valid_to = svc.clock() + IMPORT_PARAMETERS_VALID_S
    token = svc.master.seal_import_token(
        ImportToken(key.key_id, alg, p.text("WrappingKeySpec"), valid_to, private_der)
    )
    return {
        "KeyId": key.arn,
        "ImportToken": _b64(token),
        "PublicKey": _b64(_asym.wrapping_public_key(private_der)),
        "ParametersValidTo": valid_to,
    }


def _check_import(p: Params) -> None:
    model = p.opt_text("ExpirationModel", "KEY_MATERIAL_EXPIRES")
    if model == "KEY_MATERIAL_EXPIRES" and p.opt_timestamp("ValidTo") is None:
        raise KmsApiError(
            "ValidationException",
            "ValidTo is required when ExpirationModel is KEY_MATERIAL_EXPIRES.",
        )
    if model == "KEY_MATERIAL_DOES_NOT_EXPIRE" and p.opt_timestamp("ValidTo") is not None:
        raise KmsApiError(
            "ValidationException",
            "ValidTo is not valid when ExpirationModel is KEY_MATERIAL_DOES_NOT_EXPIRE.",
        )
    if p.opt_text("ImportType") == "NEW_KEY_MATERIAL" and p.opt_text("KeyMaterialId") is not None:
        raise KmsApiError(
            "ValidationException", "KeyMaterialId cannot be given with ImportType NEW_KEY_MATERIAL."
        )


def _check_material(key: Key, material: bytes) -> None:
    """The material must fit the key spec (IncorrectKeyMaterialException)."""
    spec = key.spec
    if spec.kind == "symmetric":
        ok = len(material) == 32
        why = "symmetric key material must be 256 bits"
    elif spec.kind == "hmac":
        ok = spec.size <= len(material) <= HMAC_MAX_BYTES[spec.name]
        why = f"{spec.name} key material must be {spec.size} to {HMAC_MAX_BYTES[spec.name]} bytes"
    else:
        try:
            _asym.AsymmetricKey.load(spec, material)
            ok, why = True, ""
        except _asym.KeyMaterialError as exc:
            ok, why = False, str(exc)
    if not ok:
        raise KmsApiError("IncorrectKeyMaterialException", f"The key material is invalid: {why}.")


def _present(key: Key, version: int) -> bool:
    if key.spec.kind == "symmetric":
        return version in key.versions
    return (key.hmac if key.spec.kind == "hmac" else key.asymmetric) is not None


async def _import(svc: KmsService, r: Request) -> Answer:
    key, p = r.key(), r.params
    _require_external(key, "ImportKeyMaterial")
    now = svc.clock()
    try:
        token = svc.master.open_import_token(p.blob("ImportToken"))
    except CiphertextFormatError:
        raise KmsApiError("InvalidImportTokenException", "The import token is not valid.") from None
    if token.key_id != key.key_id:
        raise KmsApiError(
            "InvalidImportTokenException", "The import token is associated with a different key."
        )
    if now >= token.valid_to:
        raise KmsApiError("ExpiredImportTokenException", "The import token has expired.")
    valid_to = p.opt_timestamp("ValidTo")
    if valid_to is not None and not now < valid_to <= now + MAX_VALID_TO_S:
        raise KmsApiError(
            "ValidationException", "ValidTo must be in the future and at most 365 days away."
        )
    try:
        material = _asym.unwrap_import(
            token.private_der, token.algorithm, p.blob("EncryptedKeyMaterial")
        )
    except CiphertextFormatError:
        r.outcome.reason = "imported key material does not unwrap"
        raise KmsApiError("InvalidCiphertextException", "") from None
    _check_material(key, material)
    material_id = _asym.material_id(key.key_id, material)
    materials = key.materials()
    by_id = {e["Id"]: int(v) for v, e in materials.items()}
    kind = p.opt_text("ImportType") or (
        "NEW_KEY_MATERIAL" if not materials else "EXISTING_KEY_MATERIAL"
    )
    if kind == "NEW_KEY_MATERIAL":
        if materials and key.spec.kind != "symmetric":
            raise KmsApiError(
                "ValidationException",
                f"{key.meta['KeySpec']} keys take one key material: reimport it with "
                "ImportType EXISTING_KEY_MATERIAL.",
            )
        if material_id in by_id:
            raise KmsApiError(
                "IncorrectKeyMaterialException",
                "New key material was expected, but this key material is already associated "
                "with the KMS key.",
            )
        version = max([int(v) for v in materials], default=0) + 1
        entry: MaterialRecord = {
            "Id": material_id,
            "State": "CURRENT" if not materials else "PENDING_ROTATION",
        }
    else:
        wanted = p.opt_text("KeyMaterialId")
        if material_id not in by_id or (wanted is not None and wanted != material_id):
            raise KmsApiError(
                "IncorrectKeyMaterialException",
                "The key material is not the key material previously imported into this KMS key.",
            )
        version = by_id[material_id]
        entry = materials[str(version)]
    entry["ImportState"] = "IMPORTED"
    entry["ExpirationModel"] = p.opt_text("ExpirationModel", "KEY_MATERIAL_EXPIRES")
    entry["ValidTo"] = valid_to
    if p.opt_text("KeyMaterialDescription") is not None:
        entry["Description"] = p.text("KeyMaterialDescription")
    materials[str(version)] = entry
    meta: KeyRecord = {**key.meta, "Materials": materials}
    if entry["State"] == "CURRENT":
        meta["CurrentVersion"] = version
    if key.state == "PendingImport":
        meta["Enabled"] = True  # a successful import enables the key (AWS)
    if key.state != "PendingDeletion":
        meta["KeyState"] = import_state(meta)
    if _present(key, version):  # a re-import: new expiry, same stored material
        await svc.save(key, meta)
    else:
        new = Key(key.key_id, key.arn, meta, key.policy)
        row = VersionRow(key.key_id, version, svc.master.wrap(key.key_id, version, material), now)
        key_row = svc.key_row(new)
        await svc.write(lambda: svc.storage.add_version(key_row, row))
        svc.attach_material(key, version, material)
        key.meta = meta
        svc.recompute_deadline()
    log.info(
        "kms_key_material_imported",
        key_id=key.key_id,
        key_material_id=material_id,
        import_type=kind,
        valid_to=valid_to,
    )
    return {"KeyId": key.arn, "KeyMaterialId": material_id}


async def delete_material(svc: KmsService, key: Key, version: int, *, reason: str) -> str:
    """Delete imported material ``version`` (stored and in memory); the key turns PendingImport
    unless it is pending deletion. Returns its KeyMaterialId. Caller holds the write lock."""
    materials = key.materials()
    entry = materials[str(version)]
    if entry["State"] == "PENDING_ROTATION":  # never used: forget it altogether
        del materials[str(version)]
    else:
        entry["ImportState"] = "PENDING_IMPORT"
        entry.pop("ExpirationModel", None)
        entry.pop("ValidTo", None)
    meta: KeyRecord = {**key.meta, "Materials": materials}
    if key.state != "PendingDeletion":
        meta["KeyState"] = import_state(meta)
    new = Key(key.key_id, key.arn, meta, key.policy)
    key_row = svc.key_row(new)
    await svc.write(lambda: svc.storage.delete_version(key_row, key.key_id, version))
    svc.detach_material(key, version)
    key.meta = meta
    svc.recompute_deadline()
    log.warning(
        "kms_key_material_deleted", key_id=key.key_id, key_material_id=entry["Id"], reason=reason
    )
    return str(entry["Id"])


async def _delete_imported(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    _require_external(key, "DeleteImportedKeyMaterial")
    materials = key.materials()
    wanted = r.params.opt_text("KeyMaterialId")
    if wanted is None:
        version = key.current_version
    else:
        found = [int(v) for v, e in materials.items() if e["Id"] == wanted]
        if not found:
            raise KmsApiError(
                "NotFoundException", f"Key material {wanted} is not associated with {key.arn}."
            )
        version = found[0]
    entry = materials.get(str(version))
    if entry is None or entry.get("ImportState") != "IMPORTED":  # PendingImport: no effect
        return {"KeyId": key.arn, "KeyMaterialId": entry["Id"] if entry else ""}
    material_id = await delete_material(svc, key, version, reason="DeleteImportedKeyMaterial")
    return {"KeyId": key.arn, "KeyMaterialId": material_id}


async def rotate_to_pending(svc: KmsService, key: Key) -> None:
    """RotateKeyOnDemand of an EXTERNAL key: the imported PENDING_ROTATION material becomes
    current (caller holds the write lock)."""
    materials = key.materials()
    pending = [int(v) for v, e in materials.items() if e["State"] == "PENDING_ROTATION"]
    if not pending:
        raise KmsApiError(
            "KMSInvalidStateException",
            f"{key.arn} has no imported key material in PENDING_ROTATION: import new key "
            "material (ImportType NEW_KEY_MATERIAL) first.",
        )
    version = min(pending)
    now = svc.clock()
    for entry in materials.values():
        if entry["State"] == "CURRENT":
            entry["State"] = "NON_CURRENT"
    materials[str(version)].update(
        {"State": "CURRENT", "RotationDate": now, "RotationType": "ON_DEMAND"}
    )
    meta: KeyRecord = {
        **key.meta,
        "Materials": materials,
        "CurrentVersion": version,
        "LastRotationDate": now,
        "OnDemandRotations": int(key.meta.get("OnDemandRotations", 0)) + 1,
    }
    await svc.save(key, meta)


_EXTERNAL_STEP = (KeyStep(require=Require.NOT_PENDING_DELETION),)

OPERATIONS = (
    Operation(
        "GetParametersForImport",
        _get_parameters,
        keys=_EXTERNAL_STEP,
        check=_check_parameters,
    ),
    Operation("ImportKeyMaterial", _import, keys=_EXTERNAL_STEP, check=_check_import, writes=True),
    Operation("DeleteImportedKeyMaterial", _delete_imported, keys=(KeyStep(),), writes=True),
)
