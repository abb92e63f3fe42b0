"""Cryptographic operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext),
GenerateDataKeyPair(WithoutPlaintext), GenerateRandom.

Resolving, authorizing (with the encryption context and Recipient conditions), requiring the key
usable, opening the ciphertext, DryRun and the plaintext-or-CiphertextForRecipient answer are
the scaffold's; each operation below only produces its bytes.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import trio

from .. import _wrap
from ..errors import KmsApiError
from ._model import Answer, Params
from ._scaffold import KeyStep, Locate, Operation, Release, Request, Require

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = ["OPERATIONS"]

_DATA_KEY_BYTES = {"AES_256": 32, "AES_128": 16}
_SYMMETRIC = "SYMMETRIC_DEFAULT"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _check_algorithm(alg: str | None) -> None:
    if alg not in (None, _SYMMETRIC):
        raise KmsApiError(
            "InvalidKeyUsageException",
            f"The encryption algorithm {alg} is not compatible with the type of key.",
        )


def _check_encrypt(p: Params) -> None:
    _check_algorithm(p.get("EncryptionAlgorithm"))


def _check_reencrypt(p: Params) -> None:
    _check_algorithm(p.get("SourceEncryptionAlgorithm"))
    _check_algorithm(p.get("DestinationEncryptionAlgorithm"))


def _data_key_size(p: Params) -> int:
    if ("KeySpec" in p) == ("NumberOfBytes" in p):
        raise KmsApiError(
            "ValidationException", "Please specify either number of bytes or key spec."
        )
    return int(p["NumberOfBytes"]) if "NumberOfBytes" in p else _DATA_KEY_BYTES[p["KeySpec"]]


def _check_data_key(p: Params) -> None:
    _data_key_size(p)


def _check_key_pair(p: Params) -> None:
    spec = p["KeyPairSpec"]
    if spec not in _wrap.KEY_PAIR_SPECS:
        raise KmsApiError("UnsupportedOperationException", f"KeyPairSpec {spec} is not supported.")


def _check_random(p: Params) -> None:
    if "CustomKeyStoreId" in p:
        raise KmsApiError("CustomKeyStoreNotFoundException", "Custom key stores are not supported.")
    if p.get("NumberOfBytes") is None:
        raise KmsApiError("ValidationException", "NumberOfBytes is required.")


async def _encrypt(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    blob = svc.seal(key, r.params["Plaintext"], r.params.get("EncryptionContext"))
    return {"CiphertextBlob": _b64(blob), "KeyId": key.arn, "EncryptionAlgorithm": _SYMMETRIC}


async def _decrypt(svc: KmsService, r: Request) -> Release:
    assert r.plaintext is not None
    return Release(r.plaintext, {"KeyId": r.key().arn, "EncryptionAlgorithm": _SYMMETRIC})


async def _reencrypt(svc: KmsService, r: Request) -> Answer:
    assert r.plaintext is not None
    src, dst = r.key(0), r.key(1)
    blob = svc.seal(dst, r.plaintext, r.params.get("DestinationEncryptionContext"))
    return {
        "CiphertextBlob": _b64(blob),
        "SourceKeyId": src.arn,
        "KeyId": dst.arn,
        "SourceEncryptionAlgorithm": _SYMMETRIC,
        "DestinationEncryptionAlgorithm": _SYMMETRIC,
    }


async def _generate_data_key(svc: KmsService, r: Request) -> Release:
    key = r.key()
    data_key = _wrap.random_bytes(_data_key_size(r.params))
    blob = svc.seal(key, data_key, r.params.get("EncryptionContext"))
    return Release(data_key, {"CiphertextBlob": _b64(blob), "KeyId": key.arn})


async def _generate_data_key_without_plaintext(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    data_key = _wrap.random_bytes(_data_key_size(r.params))
    blob = svc.seal(key, data_key, r.params.get("EncryptionContext"))
    return {"CiphertextBlob": _b64(blob), "KeyId": key.arn}


async def _key_pair(svc: KmsService, r: Request) -> tuple[bytes, Answer]:
    key, spec = r.key(), r.params["KeyPairSpec"]
    # RSA-3072/4096 generation takes up to a second: keep it off the event loop.
    private_der, public_der = await trio.to_thread.run_sync(_wrap.generate_key_pair, spec)
    return private_der, {
        "PrivateKeyCiphertextBlob": _b64(
            svc.seal(key, private_der, r.params.get("EncryptionContext"))
        ),
        "PublicKey": _b64(public_der),
        "KeyId": key.arn,
        "KeyPairSpec": spec,
    }


async def _generate_data_key_pair(svc: KmsService, r: Request) -> Release:
    private_der, answer = await _key_pair(svc, r)
    return Release(private_der, answer, field="PrivateKeyPlaintext")


async def _generate_data_key_pair_without_plaintext(svc: KmsService, r: Request) -> Answer:
    return (await _key_pair(svc, r))[1]


async def _generate_random(svc: KmsService, r: Request) -> Release:
    return Release(_wrap.random_bytes(int(r.params["NumberOfBytes"])), {})


#: The key of a data operation: by id or alias, with the request's encryption context.
_DATA_KEY = (KeyStep(locate=Locate.KEY_ID, context="EncryptionContext", require=Require.USABLE),)

OPERATIONS = (
    Operation("Encrypt", _encrypt, keys=_DATA_KEY, check=_check_encrypt, dry_run=True),
    Operation(
        "Decrypt",
        _decrypt,
        keys=(
            KeyStep(
                param="CiphertextBlob",
                locate=Locate.CIPHERTEXT,
                key_id_param="KeyId",
                context="EncryptionContext",
                require=Require.USABLE,
            ),
        ),
        check=_check_encrypt,
        recipient=True,
        dry_run=True,
    ),
    Operation(
        "ReEncrypt",
        _reencrypt,
        keys=(
            KeyStep(
                param="CiphertextBlob",
                locate=Locate.CIPHERTEXT,
                key_id_param="SourceKeyId",
                action="ReEncryptFrom",
                context="SourceEncryptionContext",
                require=Require.USABLE,
            ),
            KeyStep(
                param="DestinationKeyId",
                locate=Locate.KEY_ID,
                action="ReEncryptTo",
                context="DestinationEncryptionContext",
                require=Require.USABLE,
            ),
        ),
        check=_check_reencrypt,
        dry_run=True,
    ),
    Operation(
        "GenerateDataKey",
        _generate_data_key,
        keys=_DATA_KEY,
        check=_check_data_key,
        recipient=True,
        dry_run=True,
    ),
    Operation(
        "GenerateDataKeyWithoutPlaintext",
        _generate_data_key_without_plaintext,
        keys=_DATA_KEY,
        check=_check_data_key,
        dry_run=True,
    ),
    Operation(
        "GenerateDataKeyPair",
        _generate_data_key_pair,
        keys=_DATA_KEY,
        check=_check_key_pair,
        recipient=True,
        dry_run=True,
    ),
    Operation(
        "GenerateDataKeyPairWithoutPlaintext",
        _generate_data_key_pair_without_plaintext,
        keys=_DATA_KEY,
        check=_check_key_pair,
        dry_run=True,
    ),
    Operation("GenerateRandom", _generate_random, check=_check_random, recipient=True),
)
