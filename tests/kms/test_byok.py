"""Bring your own key through boto3 and the AWS CLI: the owner wraps its own material with
``cryptography`` (or ``openssl``) exactly as AWS documents, imports it, uses it, deletes and
re-imports it; expiry is driven by an injected clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from kms._asym import MATERIAL_ID_LABEL
from kms.app import KmsApp, build_app
from kms.client import Credentials, KmsClient
from kms.config import KmsConfig
from kms.daemon import _Connection, _Shutdown
from kms.errors import KmsApiError

from .conftest import boto_client
from .helpers import ADMIN, DaemonThread, aws_cli, openssl

pytestmark = pytest.mark.timeout(120)


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def wrap(public_der: bytes, algorithm: str, material: bytes) -> bytes:
    """What a key owner does with GetParametersForImport's public key (AWS's procedure)."""
    public = serialization.load_der_public_key(public_der)
    h: hashes.HashAlgorithm = hashes.SHA1() if algorithm.endswith("SHA_1") else hashes.SHA256()
    oaep = padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)
    if algorithm.startswith("RSAES_OAEP"):
        return public.encrypt(material, oaep)  # type: ignore[union-attr]
    aes = os.urandom(32)
    return public.encrypt(aes, oaep) + aes_key_wrap_with_padding(aes, material)  # type: ignore[union-attr]


def material_id(key_id: str, material: bytes) -> str:
    """The documented KeyMaterialId: HMAC-SHA256 keyed by the material over label ‖ key id."""
    return hmac.new(material, MATERIAL_ID_LABEL + key_id.encode(), hashlib.sha256).hexdigest()


def _import(admin: Any, kid: str, material: bytes, *, algorithm: str = "RSAES_OAEP_SHA_256",
            spec: str = "RSA_2048", **kw: Any) -> dict[str, Any]:  # fmt: skip
    params = admin.get_parameters_for_import(
        KeyId=kid, WrappingAlgorithm=algorithm, WrappingKeySpec=spec
    )
    kw.setdefault("ExpirationModel", "KEY_MATERIAL_DOES_NOT_EXPIRE")
    out: dict[str, Any] = admin.import_key_material(
        KeyId=kid,
        ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=wrap(params["PublicKey"], algorithm, material),
        **kw,
    )
    return out


@pytest.fixture(scope="module")
def admin(daemon: DaemonThread) -> Any:
    return boto_client(daemon.endpoint, ADMIN)


def test_symmetric_import_use_delete_reimport(admin: Any) -> None:
    meta = admin.create_key(Origin="EXTERNAL", Description="owner's key")["KeyMetadata"]
    kid = meta["KeyId"]
    assert meta["KeyState"] == "PendingImport"
    assert meta["Origin"] == "EXTERNAL"
    assert "CurrentKeyMaterialId" not in meta
    with pytest.raises(ClientError) as e:
        admin.encrypt(KeyId=kid, Plaintext=b"x")
    assert _code(e) == "KMSInvalidStateException"
    material = os.urandom(32)
    out = _import(admin, kid, material)
    assert out["KeyMaterialId"] == material_id(kid, material)
    meta = admin.describe_key(KeyId=kid)["KeyMetadata"]
    assert meta["KeyState"] == "Enabled"
    assert meta["ExpirationModel"] == "KEY_MATERIAL_DOES_NOT_EXPIRE"
    assert meta["CurrentKeyMaterialId"] == out["KeyMaterialId"]
    blob = admin.encrypt(KeyId=kid, Plaintext=b"sealed under my own key")["CiphertextBlob"]
    assert admin.decrypt(CiphertextBlob=blob)["KeyMaterialId"] == out["KeyMaterialId"]
    # Different material is refused; the same material re-imports (a new expiry, say).
    with pytest.raises(ClientError) as e:
        _import(admin, kid, os.urandom(32))
    assert _code(e) == "IncorrectKeyMaterialException"
    future = admin.describe_key(KeyId=kid)["KeyMetadata"]["CreationDate"].timestamp() + 86400 * 30
    _import(admin, kid, material, ExpirationModel="KEY_MATERIAL_EXPIRES", ValidTo=future)
    meta = admin.describe_key(KeyId=kid)["KeyMetadata"]
    assert meta["ExpirationModel"] == "KEY_MATERIAL_EXPIRES"
    assert abs(meta["ValidTo"].timestamp() - future) < 1
    deleted = admin.delete_imported_key_material(KeyId=kid)
    assert deleted["KeyMaterialId"] == out["KeyMaterialId"]
    assert admin.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "PendingImport"
    with pytest.raises(ClientError) as e:
        admin.decrypt(CiphertextBlob=blob)
    assert _code(e) == "KMSInvalidStateException"
    # PendingImport: deleting again has no effect.
    admin.delete_imported_key_material(KeyId=kid)
    # Wrapped with the other algorithm, by a bigger wrapping key: the same material is back.
    _import(admin, kid, material, algorithm="RSA_AES_KEY_WRAP_SHA_256", spec="RSA_4096")
    assert admin.decrypt(CiphertextBlob=blob)["Plaintext"] == b"sealed under my own key"


def test_import_refusals(admin: Any, daemon: DaemonThread) -> None:
    kid = admin.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    other = admin.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    params = admin.get_parameters_for_import(
        KeyId=kid, WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048"
    )
    wrapped = wrap(params["PublicKey"], "RSAES_OAEP_SHA_256", os.urandom(32))
    forever = {"ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"}
    cases: list[tuple[dict[str, Any], str]] = [
        # the token of another key
        ({"KeyId": other, "ImportToken": params["ImportToken"]}, "InvalidImportTokenException"),
        # a token not made here, or altered
        ({"ImportToken": b"\x01\x00\x02{}" + b"x" * 64}, "InvalidImportTokenException"),
        ({"ImportToken": params["ImportToken"][:-1] + b"?"}, "InvalidImportTokenException"),
        # material wrapped for another wrapping key
        ({"EncryptedKeyMaterial": os.urandom(256)}, "InvalidCiphertextException"),
        # 16 bytes: symmetric keys take 256-bit material
        (
            {"EncryptedKeyMaterial": wrap(params["PublicKey"], "RSAES_OAEP_SHA_256", b"k" * 16)},
            "IncorrectKeyMaterialException",
        ),
        ({"ExpirationModel": "KEY_MATERIAL_EXPIRES"}, "ValidationException"),  # no ValidTo
        ({"ExpirationModel": "KEY_MATERIAL_EXPIRES", "ValidTo": 1000}, "ValidationException"),
        (
            {"ExpirationModel": "KEY_MATERIAL_EXPIRES", "ValidTo": 4_000_000_000},
            "ValidationException",
        ),
    ]
    for override, code in cases:
        request = {
            "KeyId": kid,
            "ImportToken": params["ImportToken"],
            "EncryptedKeyMaterial": wrapped,
            **forever,
            **override,
        }
        with pytest.raises(ClientError) as e:
            admin.import_key_material(**request)
        assert _code(e) == code, override
    generated = admin.create_key()["KeyMetadata"]["KeyId"]
    for call in (
        lambda: admin.get_parameters_for_import(
            KeyId=generated, WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048"
        ),
        lambda: admin.delete_imported_key_material(KeyId=generated),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert _code(e) == "UnsupportedOperationException"
    with pytest.raises(ClientError) as e:  # AWS no longer takes PKCS#1 v1.5 wrapping
        admin.get_parameters_for_import(
            KeyId=kid, WrappingAlgorithm="RSAES_PKCS1_V1_5", WrappingKeySpec="RSA_2048"
        )
    assert _code(e) == "ValidationException"
    assert admin.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "PendingImport"


def test_openssl_wraps_with_aes_key_wrap(admin: Any, tmp_path: Path) -> None:
    """RSA_AES_KEY_WRAP_SHA_256 done by openssl alone, as AWS's import guide does it."""
    kid = admin.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    params = admin.get_parameters_for_import(
        KeyId=kid, WrappingAlgorithm="RSA_AES_KEY_WRAP_SHA_256", WrappingKeySpec="RSA_3072"
    )
    material, aes = os.urandom(32), os.urandom(32)
    (tmp_path / "material").write_bytes(material)
    (tmp_path / "aes").write_bytes(aes)
    (tmp_path / "wrapping.der").write_bytes(params["PublicKey"])
    code, _, err = openssl(
        "enc", "-id-aes256-wrap-pad", "-K", aes.hex(), "-iv", "A65959A6",
        "-in", str(tmp_path / "material"), "-out", str(tmp_path / "material.wrapped"),
    )  # fmt: skip
    assert code == 0, err
    code, _, err = openssl(
        "pkeyutl", "-encrypt", "-pubin", "-keyform", "DER",
        "-inkey", str(tmp_path / "wrapping.der"),
        "-in", str(tmp_path / "aes"), "-out", str(tmp_path / "aes.wrapped"),
        "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256",
        "-pkeyopt", "rsa_mgf1_md:sha256",
    )  # fmt: skip
    assert code == 0, err
    encrypted = (tmp_path / "aes.wrapped").read_bytes() + (
        tmp_path / "material.wrapped"
    ).read_bytes()
    out = admin.import_key_material(
        KeyId=kid,
        ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=encrypted,
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )
    assert out["KeyMaterialId"] == material_id(kid, material)


def test_import_asymmetric_and_hmac_keys(admin: Any) -> None:
    # An ECC signing key the owner made: KMS signs with it, the owner's public key verifies.
    private = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    kid = admin.create_key(Origin="EXTERNAL", KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")[
        "KeyMetadata"
    ]["KeyId"]
    with pytest.raises(ClientError) as e:  # a P-256 PKCS#8 key is too big for plain OAEP
        admin.get_parameters_for_import(
            KeyId=kid, WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048"
        )
    assert _code(e) == "ValidationException"
    wrong = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ClientError) as e:  # a P-384 key for a P-256 KMS key
        _import(admin, kid, wrong, algorithm="RSA_AES_KEY_WRAP_SHA_256")
    assert _code(e) == "IncorrectKeyMaterialException"
    _import(admin, kid, pkcs8, algorithm="RSA_AES_KEY_WRAP_SHA_256")
    public = admin.get_public_key(KeyId=kid)["PublicKey"]
    assert public == private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    sig = admin.sign(KeyId=kid, Message=b"m", SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    private.public_key().verify(sig, b"m", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(ClientError) as e:  # one material for asymmetric keys
        _import(
            admin, kid, pkcs8, algorithm="RSA_AES_KEY_WRAP_SHA_256", ImportType="NEW_KEY_MATERIAL"
        )
    assert _code(e) == "ValidationException"
    # An HMAC key: KMS's MAC is the owner's MAC.
    mac_key = os.urandom(48)
    hid = admin.create_key(Origin="EXTERNAL", KeySpec="HMAC_384")["KeyMetadata"]["KeyId"]
    _import(admin, hid, mac_key)
    tag = admin.generate_mac(KeyId=hid, Message=b"m", MacAlgorithm="HMAC_SHA_384")["Mac"]
    assert tag == hmac.new(mac_key, b"m", hashlib.sha384).digest()


def test_new_key_material_and_rotation(admin: Any) -> None:
    kid = admin.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    first, second = os.urandom(32), os.urandom(32)
    _import(admin, kid, first)
    old = admin.encrypt(KeyId=kid, Plaintext=b"v1")["CiphertextBlob"]
    with pytest.raises(ClientError) as e:  # nothing imported to rotate to yet
        admin.rotate_key_on_demand(KeyId=kid)
    assert _code(e) == "KMSInvalidStateException"
    with pytest.raises(ClientError) as e:  # automatic rotation is for AWS_KMS material only
        admin.enable_key_rotation(KeyId=kid)
    assert _code(e) == "UnsupportedOperationException"
    out = _import(admin, kid, second, ImportType="NEW_KEY_MATERIAL")
    rotations = admin.list_key_rotations(KeyId=kid, IncludeKeyMaterial="ALL_KEY_MATERIAL")
    states = {
        r["KeyMaterialId"]: (r["KeyMaterialState"], r["ImportState"])
        for r in rotations["Rotations"]
    }
    assert states == {
        material_id(kid, first): ("CURRENT", "IMPORTED"),
        out["KeyMaterialId"]: ("PENDING_ROTATION", "IMPORTED"),
    }
    assert admin.list_key_rotations(KeyId=kid)["Rotations"] == []  # ROTATIONS_ONLY
    admin.rotate_key_on_demand(KeyId=kid)
    assert (
        admin.describe_key(KeyId=kid)["KeyMetadata"]["CurrentKeyMaterialId"] == out["KeyMaterialId"]
    )
    new = admin.encrypt(KeyId=kid, Plaintext=b"v2")["CiphertextBlob"]
    assert admin.decrypt(CiphertextBlob=new)["KeyMaterialId"] == out["KeyMaterialId"]
    assert admin.decrypt(CiphertextBlob=old)["Plaintext"] == b"v1"
    # Deleting the old (non-current) material makes the key PendingImport until it is back.
    admin.delete_imported_key_material(KeyId=kid, KeyMaterialId=material_id(kid, first))
    assert admin.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "PendingImport"
    _import(admin, kid, first, KeyMaterialId=material_id(kid, first))
    assert admin.decrypt(CiphertextBlob=old)["Plaintext"] == b"v1"


def test_aws_cli_drives_import(daemon: DaemonThread, admin: Any, tmp_path: Path) -> None:
    def cli(*args: str) -> Any:
        code, out, err = aws_cli(daemon.endpoint, ADMIN, *args)
        assert code == 0, err
        return out

    kid = cli("create-key", "--origin", "EXTERNAL")["KeyMetadata"]["KeyId"]
    params = cli("get-parameters-for-import", "--key-id", kid, "--wrapping-algorithm",
                 "RSAES_OAEP_SHA_1", "--wrapping-key-spec", "RSA_2048")  # fmt: skip
    material = os.urandom(32)
    (tmp_path / "token").write_bytes(base64.b64decode(params["ImportToken"]))
    (tmp_path / "wrapped").write_bytes(
        wrap(base64.b64decode(params["PublicKey"]), "RSAES_OAEP_SHA_1", material)
    )
    out = cli("import-key-material", "--key-id", kid,
              "--import-token", f"fileb://{tmp_path / 'token'}",
              "--encrypted-key-material", f"fileb://{tmp_path / 'wrapped'}",
              "--expiration-model", "KEY_MATERIAL_DOES_NOT_EXPIRE")  # fmt: skip
    assert out["KeyMaterialId"] == material_id(kid, material)
    assert cli("describe-key", "--key-id", kid)["KeyMetadata"]["KeyState"] == "Enabled"
    cli("delete-imported-key-material", "--key-id", kid)
    assert cli("describe-key", "--key-id", kid)["KeyMetadata"]["KeyState"] == "PendingImport"


# --- expiry, with an injected clock ----------------------------------------------------------

CREDS = Credentials(ADMIN.access_key_id, ADMIN.secret_access_key)
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _app(tmp_path: Path, clock: Clock) -> KmsApp:
    return build_app(
        KmsConfig(state_dir=tmp_path / "kms", credentials=(ADMIN,)), env={}, clock=clock
    )


def _client(app: KmsApp, nursery: trio.Nursery, clock: Clock) -> KmsClient:
    from datetime import UTC, datetime

    async def connect() -> trio.abc.Stream:
        a, b = trio.testing.memory_stream_pair()
        nursery.start_soon(_Connection(b, app, _Shutdown()).serve)
        return a

    return KmsClient(
        connect=connect, credentials=CREDS, clock=lambda: datetime.fromtimestamp(clock(), tz=UTC)
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_expiry_takes_effect(tmp_path: Path) -> None:
    clock = Clock()
    app = _app(tmp_path, clock)
    material = os.urandom(32)
    try:
        async with trio.open_nursery() as nursery:
            c = _client(app, nursery, clock)
            with trio.fail_after(30):
                kid = (await c.call("CreateKey", {"Origin": "EXTERNAL"}))["KeyMetadata"]["KeyId"]
                params = await c.call(
                    "GetParametersForImport",
                    {"KeyId": kid, "WrappingAlgorithm": "RSAES_OAEP_SHA_256",
                     "WrappingKeySpec": "RSA_2048"},
                )  # fmt: skip
                assert params["ParametersValidTo"] == clock.now + 24 * HOUR
                token = params["ImportToken"]
                wrapped = wrap(
                    base64.b64decode(params["PublicKey"]), "RSAES_OAEP_SHA_256", material
                )
                request = {
                    "KeyId": kid,
                    "ImportToken": token,
                    "EncryptedKeyMaterial": _b64(wrapped),
                    "ExpirationModel": "KEY_MATERIAL_EXPIRES",
                    "ValidTo": clock.now + HOUR,
                }
                await c.call("ImportKeyMaterial", request)
                blob = (await c.call("Encrypt", {"KeyId": kid, "Plaintext": "djE="}))[
                    "CiphertextBlob"
                ]
                clock.now += HOUR - 1  # a second before ValidTo: still usable
                assert (await c.call("Decrypt", {"CiphertextBlob": blob}))["Plaintext"] == "djE="
                clock.now += 1  # ValidTo: the material is deleted before the next request
                with pytest.raises(KmsApiError) as e:
                    await c.call("Decrypt", {"CiphertextBlob": blob})
                assert e.value.type_name == "KMSInvalidStateException"
                meta = (await c.call("DescribeKey", {"KeyId": kid}))["KeyMetadata"]
                assert meta["KeyState"] == "PendingImport"
                rotations = await c.call(
                    "ListKeyRotations", {"KeyId": kid, "IncludeKeyMaterial": "ALL_KEY_MATERIAL"}
                )
                assert rotations["Rotations"][0]["ImportState"] == "PENDING_IMPORT"
                # The import token outlives the material by a day; after that it is refused.
                request["ValidTo"] = clock.now + HOUR
                await c.call("ImportKeyMaterial", request)
                assert (await c.call("Decrypt", {"CiphertextBlob": blob}))["Plaintext"] == "djE="
                clock.now += 24 * HOUR
                request["ExpirationModel"] = "KEY_MATERIAL_DOES_NOT_EXPIRE"
                del request["ValidTo"]
                with pytest.raises(KmsApiError) as e:
                    await c.call("ImportKeyMaterial", request)
                assert e.value.type_name == "ExpiredImportTokenException"
                await c.aclose()
            nursery.cancel_scope.cancel()
    finally:
        app.close()
    # Expired again (the second import's ValidTo passed too): after a restart the key is still
    # PendingImport and its material is gone from the store, not merely hidden.
    again = _app(tmp_path, clock)
    try:
        key = again.service.resolve(kid)
        assert key.state == "PendingImport"
        assert key.versions == {}
    finally:
        again.close()
    db = sqlite3.connect(tmp_path / "kms" / "kms.sqlite3")
    assert db.execute("SELECT count(*) FROM key_versions WHERE key_id=?", (kid,)).fetchone() == (0,)
    db.close()


async def test_long_hmac_material_imports_and_survives_restart(tmp_path: Path) -> None:
    """HMAC_512 takes up to 128 bytes of imported material (the hash's block size); such a key
    must import, and load again at the next start (it was refused past 64 bytes)."""
    clock = Clock()
    app = _app(tmp_path, clock)
    material = os.urandom(100)
    try:
        async with trio.open_nursery() as nursery:
            c = _client(app, nursery, clock)
            with trio.fail_after(30):
                meta = await c.call("CreateKey", {"Origin": "EXTERNAL", "KeySpec": "HMAC_512"})
                kid = meta["KeyMetadata"]["KeyId"]
                params = await c.call(
                    "GetParametersForImport",
                    {"KeyId": kid, "WrappingAlgorithm": "RSAES_OAEP_SHA_256",
                     "WrappingKeySpec": "RSA_2048"},
                )  # fmt: skip
                wrapped = wrap(
                    base64.b64decode(params["PublicKey"]), "RSAES_OAEP_SHA_256", material
                )
                await c.call(
                    "ImportKeyMaterial",
                    {"KeyId": kid, "ImportToken": params["ImportToken"],
                     "EncryptedKeyMaterial": _b64(wrapped),
                     "ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"},
                )  # fmt: skip
                await c.aclose()
            nursery.cancel_scope.cancel()
    finally:
        app.close()
    again = _app(tmp_path, clock)
    try:
        key = again.service.resolve(kid)
        assert key.hmac is not None
        assert key.hmac.mac(b"m") == hmac.new(material, b"m", hashlib.sha512).digest()
    finally:
        again.close()


def test_pending_import_key_states(admin: Any) -> None:
    """AWS's key-state table for a key waiting for its material."""
    kid = admin.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    for call in (
        lambda: admin.enable_key(KeyId=kid),
        lambda: admin.disable_key(KeyId=kid),
        lambda: admin.generate_data_key(KeyId=kid, KeySpec="AES_256"),
        lambda: admin.create_grant(
            KeyId=kid, GranteePrincipal=ADMIN.principal_arn, Operations=["Encrypt"]
        ),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert _code(e) == "KMSInvalidStateException"
        assert "pending import" in e.value.response["Error"]["Message"]
    admin.tag_resource(KeyId=kid, Tags=[{"TagKey": "k", "TagValue": "v"}])
    admin.update_key_description(KeyId=kid, Description="still waiting")
    admin.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
    assert admin.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    admin.cancel_key_deletion(KeyId=kid)  # back to waiting for its material, not Disabled
    assert admin.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "PendingImport"
