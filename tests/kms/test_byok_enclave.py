"""BYOK end to end: a model owner imports its own AES-256 key into the KMS (Origin EXTERNAL),
seals the bundled model under it with ``models.sealing``, and a real server enclave (built and
run by ``runtime.stack``) unseals and serves it after attested key release. When the owner
deletes the imported material, the next enclave start is refused the key."""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kms.policy import enclave_key_policy
from models.sealing import seal_model_file
from runtime.stack import (
    INSTANCE_ARN,
    OWNER_ACTIONS,
    OWNER_ARN,
    build_server_image,
    open_stack,
    read_audit,
    start_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

#: What the owner may do with its imported key: administer it, import and delete material,
#: make data keys to seal with. Never Decrypt: only the attested server image may.
_OWNER_ACTIONS = (
    *OWNER_ACTIONS,
    "kms:GetParametersForImport",
    "kms:ImportKeyMaterial",
    "kms:DeleteImportedKeyMaterial",
)


@pytest.fixture
def short_state_dir() -> Iterator[Path]:
    """A short path: Unix socket paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="er-byok-"))
    try:
        yield path / "s"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _wrap_for_import(public_der: bytes, material: bytes) -> bytes:
    """The owner's side of RSAES_OAEP_SHA_256 wrapping (AWS's import procedure)."""
    public = serialization.load_der_public_key(public_der)
    assert isinstance(public, rsa.RSAPublicKey)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return public.encrypt(material, oaep)


async def test_owner_imported_key_seals_a_model_the_enclave_unseals(
    short_state_dir: Path,
) -> None:
    from models.digits import MODEL_PATH

    sealed_path = short_state_dir / "m" / "digits.sealed"
    with trio.fail_after(150):
        async with open_stack(short_state_dir, models={"digits": sealed_path}) as stack:
            eif = short_state_dir / "server.eif"
            pcr0 = (await trio.to_thread.run_sync(build_server_image, eif)).pcrs[0].hex()
            policy = enclave_key_policy(
                admin_principal=OWNER_ARN,
                enclave_principal=INSTANCE_ARN,
                pcrs={0: pcr0},
                actions=("kms:Decrypt",),
                admin_actions=_OWNER_ACTIONS,
            )
            owner_material = os.urandom(32)  # the owner's own AES-256 key
            async with stack.owner_kms() as kms:
                meta = (
                    await kms.call(
                        "CreateKey",
                        {
                            "Origin": "EXTERNAL",
                            "Description": "the owner's own model key",
                            "Policy": json.dumps(policy),
                        },
                    )
                )["KeyMetadata"]
                assert meta["KeyState"] == "PendingImport"
                key_id = str(meta["Arn"])
                params = await kms.call(
                    "GetParametersForImport",
                    {
                        "KeyId": key_id,
                        "WrappingAlgorithm": "RSAES_OAEP_SHA_256",
                        "WrappingKeySpec": "RSA_3072",
                    },
                )
                wrapped = _wrap_for_import(base64.b64decode(params["PublicKey"]), owner_material)
                imported = await kms.call(
                    "ImportKeyMaterial",
                    {
                        "KeyId": key_id,
                        "ImportToken": params["ImportToken"],
                        "EncryptedKeyMaterial": base64.b64encode(wrapped).decode(),
                        "ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE",
                    },
                )
                result = await seal_model_file(
                    MODEL_PATH, sealed_path, kms=kms, key_id=key_id, name="digits"
                )
            assert result is not None
            server = await start_server(stack, eif)
            assert server.report.ok, server.report.raw
            released = [
                line
                for line in read_audit(stack.kms_state_dir)
                if line["operation"] == "Decrypt" and line["decision"] == "allow"
            ]
            assert released[-1]["key_id"] == key_id
            assert released[-1]["recipient"]["image_sha384"] == pcr0
            # The owner takes its key material back: the next start is refused the key.
            async with stack.owner_kms() as kms:
                deleted = await kms.call("DeleteImportedKeyMaterial", {"KeyId": key_id})
            assert deleted["KeyMaterialId"] == imported["KeyMaterialId"]
            refused = await start_server(stack, eif)
            assert not refused.report.ok
            assert "KMSInvalidStateException" in (refused.report.models[0].reason or "")
