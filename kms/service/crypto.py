"""Cryptographic operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext),
GenerateDataKeyPair(WithoutPlaintext), GenerateRandom.

Resolving, authorizing (with the encryption context and Recipient conditions), requiring the key
usable, opening the ciphertext, DryRun and the plaintext-or-CiphertextForRecipient answer are
the scaffold's; each operation below only produces its bytes. A key in an external key store
seals through its proxy (:mod:`.external`, double encryption); data key pairs are refused for
it, as AWS refuses them in custom key stores.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

from .. import _asym, _wrap
from ..errors import KmsApiError
from ..keyspecs import SYMMETRIC, UNSUPPORTED_SPECS, rsa_max_plaintext
from ..keystores.record import STORE_ID_PREFIX
from . import external
from ._model import Answer, Key, Params
from ._scaffold import KeyStep, Locate, Operation, Release, Request, Require

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = ["OPERATIONS", "encrypt_with", "encrypt_for"]

_DATA_KEY_BYTES = {"AES_256": 32, "AES_128": 16}
_SYMMETRIC = SYMMETRIC


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _check_algorithm(alg: str | None) -> None:
    # SM2PKE needs an SM2 key, which this KMS cannot create: no key of ours takes it.
    if alg == "SM2PKE":
        raise KmsApiError(
            "InvalidKeyUsageException",
            "The encryption algorithm SM2PKE is not compatible with the type of key.",
        )


def _check_encrypt(p: Params) -> None:
    _check_algorithm(p.opt_text("EncryptionAlgorithm"))


def _check_reencrypt(p: Params) -> None:
    _check_algorithm(p.opt_text("SourceEncryptionAlgorithm"))
    _check_algorithm(p.opt_text("DestinationEncryptionAlgorithm"))


def encrypt_with(
    svc: KmsService,
    key: Key,
    algorithm: str | None,
    plaintext: bytes,
    context: Mapping[str, str] | None,
) -> tuple[bytes, str]:
    """Encrypt under ``key`` (its usage checked): a symmetric blob, or RSAES-OAEP. Not for keys
    in an external key store (:func:`encrypt_for` is).

    Returns:
        (ciphertext, the EncryptionAlgorithm used).
    """
    alg = _algorithm(key, algorithm)
    if alg == _SYMMETRIC:
        return svc.seal(key, plaintext, context), alg
    if context:
        raise KmsApiError(
            "ValidationException", "EncryptionContext is not supported with asymmetric KMS keys."
        )
    limit = rsa_max_plaintext(key.spec.size, alg)
    if len(plaintext) > limit:
        raise KmsApiError(
            "ValidationException",
            f"Plaintext is too long for {key.meta['KeySpec']} with {alg}: at most {limit} bytes.",
        )
    asym = key.asymmetric
    assert asym is not None, "an Enabled asymmetric key has its material"
    return asym.encrypt(alg, plaintext), alg


def _algorithm(key: Key, algorithm: str | None) -> str:
    alg = algorithm or _SYMMETRIC
    if alg not in key.spec.encryption:
        raise KmsApiError(
            "InvalidKeyUsageException",
            f"The encryption algorithm {alg} is not compatible with {key.arn}.",
        )
    return alg


async def encrypt_for(
    svc: KmsService,
    key: Key,
    algorithm: str | None,
    plaintext: bytes,
    context: Mapping[str, str] | None,
    r: Request,
) -> tuple[bytes, str]:
    """:func:`encrypt_with`, or through the proxy for a key in an external key store."""
    if external.is_external(key):
        alg = _algorithm(key, algorithm)
        return await external.seal(svc, key, plaintext, context, r), alg
    return encrypt_with(svc, key, algorithm, plaintext, context)


async def _seal(
    svc: KmsService, key: Key, plaintext: bytes, context: Mapping[str, str] | None, r: Request
) -> bytes:
    """A symmetric blob under ``key`` (through its proxy for an external key store's)."""
    if external.is_external(key):
        return await external.seal(svc, key, plaintext, context, r)
    return svc.seal(key, plaintext, context)


async def _encrypt(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    blob, alg = await encrypt_for(
        svc,
        key,
        r.params.opt_text("EncryptionAlgorithm"),
        r.params.blob("Plaintext"),
        r.params.opt_mapping("EncryptionContext"),
        r,
    )
    return {"CiphertextBlob": _b64(blob), "KeyId": key.arn, "EncryptionAlgorithm": alg}


def _material(answer: Answer, name: str, key: Key, version: int | None) -> Answer:
    """Add ``name`` = the KeyMaterialId of ``version`` (symmetric keys with AWS_KMS or EXTERNAL
    origin only, as AWS: not for keys in a custom key store)."""
    if version is not None and key.spec.kind == "symmetric" and not external.is_external(key):
        material_id = key.material_id(version)
        if material_id is not None:
            answer[name] = material_id
    return answer


async def _decrypt(svc: KmsService, r: Request) -> Release:
    assert r.plaintext is not None
    key = r.key()
    alg = r.params.opt_text("EncryptionAlgorithm", _SYMMETRIC)
    answer: Answer = {"KeyId": key.arn, "EncryptionAlgorithm": alg}
    if r.recipient is None:  # AWS omits KeyMaterialId from a Recipient answer
        _material(answer, "KeyMaterialId", key, r.version)
    return Release(r.plaintext, answer)


async def _reencrypt(svc: KmsService, r: Request) -> Answer:
    assert r.plaintext is not None
    src, dst = r.key(0), r.key(1)
    p = r.params
    blob, alg = await encrypt_for(
        svc,
        dst,
        p.opt_text("DestinationEncryptionAlgorithm"),
        r.plaintext,
        p.opt_mapping("DestinationEncryptionContext"),
        r,
    )
    answer: Answer = {
        "CiphertextBlob": _b64(blob),
        "SourceKeyId": src.arn,
        "KeyId": dst.arn,
        "SourceEncryptionAlgorithm": p.opt_text("SourceEncryptionAlgorithm", _SYMMETRIC),
        "DestinationEncryptionAlgorithm": alg,
    }
    _material(answer, "SourceKeyMaterialId", src, r.version)
    if alg == _SYMMETRIC:
        _material(answer, "DestinationKeyMaterialId", dst, dst.current_version)
    return answer


def _data_key_size(p: Params) -> int:
    if ("KeySpec" in p) == ("NumberOfBytes" in p):
        raise KmsApiError(
            "ValidationException", "Please specify either number of bytes or key spec."
        )
    return (
        p.integer("NumberOfBytes") if "NumberOfBytes" in p else _DATA_KEY_BYTES[p.text("KeySpec")]
    )


def _check_data_key(p: Params) -> None:
    _data_key_size(p)


def _check_key_pair(p: Params) -> None:
    spec = p.text("KeyPairSpec")
    if spec not in _asym.DATA_KEY_PAIR_SPECS:
        raise KmsApiError(
            "UnsupportedOperationException",
            f"GenerateDataKeyPair: KeyPairSpec {spec} is not supported by this KMS: "
            f"{UNSUPPORTED_SPECS.get(spec, 'not implemented')}.",
        )


def _check_random(p: Params) -> None:
    if p.opt_int("NumberOfBytes") is None:
        raise KmsApiError("ValidationException", "NumberOfBytes is required.")


async def _generate_data_key(svc: KmsService, r: Request) -> Release:
    key = r.key()
    data_key = _wrap.random_bytes(_data_key_size(r.params))
    blob = await _seal(svc, key, data_key, r.params.opt_mapping("EncryptionContext"), r)
    answer: Answer = {"CiphertextBlob": _b64(blob), "KeyId": key.arn}
    return Release(data_key, _material(answer, "KeyMaterialId", key, key.current_version))


async def _generate_data_key_without_plaintext(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    data_key = _wrap.random_bytes(_data_key_size(r.params))
    blob = await _seal(svc, key, data_key, r.params.opt_mapping("EncryptionContext"), r)
    answer: Answer = {"CiphertextBlob": _b64(blob), "KeyId": key.arn}
    return _material(answer, "KeyMaterialId", key, key.current_version)


async def _key_pair(svc: KmsService, r: Request) -> tuple[bytes, Answer]:
    key, spec = r.key(), r.params.text("KeyPairSpec")
    if external.is_external(key):
        raise KmsApiError(
            "UnsupportedOperationException",
            f"{r.operation}: {key.arn} is in a custom key store, which cannot generate data "
            "key pairs.",
        )
    # RSA-3072/4096 generation takes up to a second: keep it off the event loop.
    private_der, public_der = await trio.to_thread.run_sync(_asym.generate_data_key_pair, spec)
    answer: Answer = {
        "PrivateKeyCiphertextBlob": _b64(
            svc.seal(key, private_der, r.params.opt_mapping("EncryptionContext"))
        ),
        "PublicKey": _b64(public_der),
        "KeyId": key.arn,
        "KeyPairSpec": spec,
    }
    return private_der, _material(answer, "KeyMaterialId", key, key.current_version)


async def _generate_data_key_pair(svc: KmsService, r: Request) -> Release:
    private_der, answer = await _key_pair(svc, r)
    return Release(private_der, answer, field="PrivateKeyPlaintext")


async def _generate_data_key_pair_without_plaintext(svc: KmsService, r: Request) -> Answer:
    return (await _key_pair(svc, r))[1]


async def _generate_random(svc: KmsService, r: Request) -> Release:
    store_id = r.params.opt_text("CustomKeyStoreId")
    if store_id is not None:
        # Only CloudHSM key stores generate random bytes, and there are none here.
        if store_id in svc.key_stores:
            raise KmsApiError(
                "UnsupportedOperationException",
                f"{store_id} is an external key store; GenerateRandom takes the ID of an "
                "AWS CloudHSM key store only.",
            )
        raise KmsApiError(
            "CustomKeyStoreNotFoundException",
            f"Custom key store {store_id[:64]} does not exist "
            f"(ids look like {STORE_ID_PREFIX}...).",
        )
    return Release(_wrap.random_bytes(r.params.integer("NumberOfBytes")), {})


_ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
#: The key of Encrypt: by id or alias, with the request's encryption context.
_ENCRYPT_KEY = (
    KeyStep(
        locate=Locate.KEY_ID,
        context="EncryptionContext",
        require=Require.USABLE,
        usage=_ENCRYPT_DECRYPT,
    ),
)
#: The key of a data key operation: a symmetric encryption key.
_DATA_KEY = (
    KeyStep(
        locate=Locate.KEY_ID,
        context="EncryptionContext",
        require=Require.USABLE,
        usage=_ENCRYPT_DECRYPT,
        symmetric=True,
    ),
)

OPERATIONS = (
    Operation("Encrypt", _encrypt, keys=_ENCRYPT_KEY, check=_check_encrypt, dry_run=True),
    Operation(
        "Decrypt",
        _decrypt,
        keys=(
            KeyStep(
                param="CiphertextBlob",
                locate=Locate.CIPHERTEXT,
                key_id_param="KeyId",
                algorithm_param="EncryptionAlgorithm",
                context="EncryptionContext",
                require=Require.USABLE,
                usage=_ENCRYPT_DECRYPT,
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
                algorithm_param="SourceEncryptionAlgorithm",
                action="ReEncryptFrom",
                context="SourceEncryptionContext",
                require=Require.USABLE,
                usage=_ENCRYPT_DECRYPT,
            ),
            KeyStep(
                param="DestinationKeyId",
                locate=Locate.KEY_ID,
                action="ReEncryptTo",
                context="DestinationEncryptionContext",
                require=Require.USABLE,
                usage=_ENCRYPT_DECRYPT,
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
