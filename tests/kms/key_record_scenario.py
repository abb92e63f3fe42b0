"""One key of each kind and state the KMS stores, made through the service (tests of the stored
key record; also run against main's code to make ``data/key_records_main.json``:
``python tests/kms/key_record_scenario.py OUT.json`` with main's tree first on PYTHONPATH)."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from kms.api import validate
from kms.app import DB_FILE, KmsApp, build_app
from kms.config import KmsConfig
from kms.service import Caller, KmsService, Outcome

try:
    from .helpers import ADMIN
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import ADMIN  # type: ignore[no-redef]

_CALLER = Caller(ADMIN.principal_arn, ADMIN.access_key_id)
#: How many keys :func:`populate` makes.
KEYS = 11


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make_app(state: Path, clock: Clock) -> KmsApp:
    return build_app(KmsConfig(state_dir=state, credentials=(ADMIN,)), env={}, clock=clock)


async def call(svc: KmsService, op: str, **doc: Any) -> dict[str, Any]:
    answer: dict[str, Any] = await svc.handle(op, validate(op, doc), _CALLER, Outcome())
    return answer


def _wrap(public_der_b64: str, material: bytes) -> str:
    public = serialization.load_der_public_key(base64.b64decode(public_der_b64))
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return base64.b64encode(public.encrypt(material, oaep)).decode()  # type: ignore[union-attr]


async def _import(svc: KmsService, key_id: str, **kw: Any) -> None:
    params = await call(
        svc,
        "GetParametersForImport",
        KeyId=key_id,
        WrappingAlgorithm="RSAES_OAEP_SHA_256",
        WrappingKeySpec="RSA_2048",
    )
    await call(
        svc,
        "ImportKeyMaterial",
        KeyId=key_id,
        ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=_wrap(params["PublicKey"], os.urandom(32)),
        **kw,
    )


async def populate(svc: KmsService, clock: Clock) -> None:
    """One key of each kind and state the service stores (also run against main's code to make
    the fixture)."""

    async def create(**doc: Any) -> str:
        return str((await call(svc, "CreateKey", **doc))["KeyMetadata"]["KeyId"])

    tagged = await create(Description="tagged", Tags=[{"TagKey": "a", "TagValue": "1"}])
    await call(svc, "TagResource", KeyId=tagged, Tags=[{"TagKey": "b", "TagValue": "2"}])
    await call(svc, "UntagResource", KeyId=tagged, TagKeys=["a"])
    await call(svc, "UpdateKeyDescription", KeyId=tagged, Description="")
    rotated = await create(Description="rotated")
    await call(svc, "EnableKeyRotation", KeyId=rotated, RotationPeriodInDays=90)
    clock.now += 10
    await call(svc, "RotateKeyOnDemand", KeyId=rotated)
    stopped = await create()
    await call(svc, "EnableKeyRotation", KeyId=stopped)
    await call(svc, "DisableKeyRotation", KeyId=stopped)
    await call(svc, "DisableKey", KeyId=stopped)
    doomed = await create(Description="doomed")
    await call(svc, "ScheduleKeyDeletion", KeyId=doomed, PendingWindowInDays=7)
    spared = await create()
    await call(svc, "ScheduleKeyDeletion", KeyId=spared)
    await call(svc, "CancelKeyDeletion", KeyId=spared)
    expiring = await create(Origin="EXTERNAL", Description="imported, expires")
    await _import(
        svc,
        expiring,
        ExpirationModel="KEY_MATERIAL_EXPIRES",
        ValidTo=clock.now + 86400,
        KeyMaterialDescription="first",
    )
    forever = await create(Origin="EXTERNAL")
    await _import(svc, forever, ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    await create(Origin="EXTERNAL", Description="never imported")
    await create(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")
    await create(KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")
    await create(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")


def rows(state: Path) -> dict[str, str]:
    """key id → the stored record text (SQLite)."""
    db = sqlite3.connect(state / DB_FILE)
    try:
        return dict(db.execute("SELECT key_id, meta FROM keys").fetchall())
    finally:
        db.close()


def _main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state, clock = Path(tmp) / "kms", Clock()
        app = make_app(state, clock)
        try:
            trio.run(populate, app.service, clock)
        finally:
            app.close()
        made = {"made_by": sys.argv[2] if len(sys.argv) > 2 else "", "records": rows(state)}
    out.write_text(json.dumps(made, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
