"""Asymmetric, HMAC, key-agreement and key-encapsulation operations: Sign, Verify,
GetPublicKey, GenerateMac, VerifyMac, DeriveSharedSecret, Encapsulate, Decapsulate. (RSA
Encrypt/Decrypt share :mod:`.crypto`'s declarations.)

Each declares the KeyUsage its key must have; the scaffold checks it after the key state. What
is left here is AWS's algorithm-versus-spec rules and the call into :mod:`kms._asym`.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from ..errors import CiphertextFormatError, KmsApiError
from ..keyspecs import (
    CMK_SPECS,
    ENCAPSULATE_DECAPSULATE,
    ML_DSA_MU_BYTES,
    ML_DSA_SIGNING,
    UNSUPPORTED_SIGNING,
)
from ._model import Answer, Key, Params
from ._scaffold import KeyStep, Locate, Operation, Release, Request, Require

if TYPE_CHECKING:
    from .. import _asym
    from ._core import KmsService

__all__ = ["OPERATIONS"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _check_signing(p: Params) -> None:
    alg, kind = p.text("SigningAlgorithm"), p.opt_text("MessageType", "RAW")
    if alg == ML_DSA_SIGNING:
        # AWS: ML-DSA signs RAW messages (up to 4096 bytes, the model's bound) or a 64-byte
        # external mu (FIPS 204 §6.2); there is no DIGEST (HashML-DSA is not offered).
        if kind == "DIGEST":
            raise KmsApiError(
                "ValidationException",
                f"{ML_DSA_SIGNING} requires MessageType RAW or EXTERNAL_MU, not DIGEST.",
            )
        if kind == "EXTERNAL_MU" and len(p.blob("Message")) != ML_DSA_MU_BYTES:
            raise KmsApiError(
                "ValidationException",
                f"A Message of MessageType EXTERNAL_MU must be {ML_DSA_MU_BYTES} bytes "
                f"(got {len(p.blob('Message'))}).",
            )
    elif kind == "EXTERNAL_MU":
        raise KmsApiError(
            "ValidationException", "MessageType EXTERNAL_MU is valid only with ML-DSA keys."
        )
    if alg == "ED25519_SHA_512" and kind != "RAW":
        raise KmsApiError("ValidationException", "ED25519_SHA_512 requires MessageType RAW.")
    if alg == "ED25519_PH_SHA_512" and kind != "DIGEST":
        raise KmsApiError("ValidationException", "ED25519_PH_SHA_512 requires MessageType DIGEST.")


def _signer(key: Key, algorithm: str) -> _asym.AsymmetricKey:
    if algorithm not in key.spec.signing:
        raise KmsApiError(
            "InvalidKeyUsageException",
            f"The signing algorithm {algorithm} is not compatible with {key.arn} "
            f"({key.meta['KeySpec']}).",
        )
    if algorithm in UNSUPPORTED_SIGNING:
        raise KmsApiError("UnsupportedOperationException", UNSUPPORTED_SIGNING[algorithm])
    asym = key.asymmetric
    assert asym is not None, "an Enabled asymmetric key has its material"
    return asym


async def _sign(svc: KmsService, r: Request) -> Answer:
    key, p = r.key(), r.params
    signer = _signer(key, p.text("SigningAlgorithm"))
    try:
        signature = signer.sign(
            p.text("SigningAlgorithm"),
            p.blob("Message"),
            digest=p.opt_text("MessageType") == "DIGEST",
            mu=p.opt_text("MessageType") == "EXTERNAL_MU",
        )
    except ValueError as exc:  # a DIGEST or an external mu of the wrong length
        raise KmsApiError("ValidationException", str(exc)) from None
    return {
        "KeyId": key.arn,
        "Signature": _b64(signature),
        "SigningAlgorithm": p.text("SigningAlgorithm"),
    }


async def _verify(svc: KmsService, r: Request) -> Answer:
    key, p = r.key(), r.params
    signer = _signer(key, p.text("SigningAlgorithm"))
    try:
        valid = signer.verify(
            p.text("SigningAlgorithm"),
            p.blob("Message"),
            p.blob("Signature"),
            digest=p.opt_text("MessageType") == "DIGEST",
            mu=p.opt_text("MessageType") == "EXTERNAL_MU",
        )
    except ValueError as exc:
        raise KmsApiError("ValidationException", str(exc)) from None
    if not valid:  # AWS answers an error, never SignatureValid=false
        r.outcome.reason = "signature does not verify"
        raise KmsApiError("KMSInvalidSignatureException", "")
    return {
        "KeyId": key.arn,
        "SignatureValid": True,
        "SigningAlgorithm": p.text("SigningAlgorithm"),
    }


async def _get_public_key(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    spec = key.spec
    if not spec.asymmetric:
        raise KmsApiError(
            "UnsupportedOperationException",
            f"GetPublicKey: {key.arn} is a {key.meta['KeySpec']} key, which has no public key.",
        )
    asym = key.asymmetric
    if asym is None:
        raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending import.")
    answer: Answer = {
        "KeyId": key.arn,
        "PublicKey": _b64(asym.public_der()),
        "KeySpec": key.meta["KeySpec"],
        "KeyUsage": key.usage,
        **spec.algorithms(key.usage),
    }
    if spec.name in CMK_SPECS:  # the deprecated field's enum stopped growing
        answer["CustomerMasterKeySpec"] = spec.name
    return answer


def _mac_key(key: Key, algorithm: str) -> _asym.HmacKey:
    if algorithm not in key.spec.mac:
        raise KmsApiError(
            "InvalidKeyUsageException",
            f"The MAC algorithm {algorithm} is not compatible with {key.arn} "
            f"({key.meta['KeySpec']}).",
        )
    mac = key.hmac
    assert mac is not None, "an Enabled HMAC key has its material"
    return mac


async def _generate_mac(svc: KmsService, r: Request) -> Answer:
    key, p = r.key(), r.params
    tag = _mac_key(key, p.text("MacAlgorithm")).mac(p.blob("Message"))
    return {"Mac": _b64(tag), "MacAlgorithm": p.text("MacAlgorithm"), "KeyId": key.arn}


async def _verify_mac(svc: KmsService, r: Request) -> Answer:
    key, p = r.key(), r.params
    if not _mac_key(key, p.text("MacAlgorithm")).verify(p.blob("Message"), p.blob("Mac")):
        r.outcome.reason = "MAC does not verify"
        raise KmsApiError("KMSInvalidMacException", "")
    return {"KeyId": key.arn, "MacValid": True, "MacAlgorithm": p.text("MacAlgorithm")}


async def _derive_shared_secret(svc: KmsService, r: Request) -> Release:
    key, p = r.key(), r.params
    if p.text("KeyAgreementAlgorithm") not in key.spec.agreement:
        raise KmsApiError(
            "InvalidKeyUsageException",
            f"{p.text('KeyAgreementAlgorithm')} is not compatible with {key.arn}.",
        )
    asym = key.asymmetric
    assert asym is not None, "an Enabled key agreement key has its material"
    try:
        secret = asym.derive_shared_secret(p.blob("PublicKey"))
    except ValueError as exc:
        raise KmsApiError("ValidationException", str(exc)) from None
    return Release(
        secret,
        {"KeyId": key.arn, "KeyAgreementAlgorithm": "ECDH", "KeyOrigin": key.origin},
        field="SharedSecret",
    )


def _encapsulation_key(key: Key, algorithm: str) -> _asym.AsymmetricKey:
    if algorithm not in key.spec.encapsulation:
        raise KmsApiError(
            "InvalidKeyUsageException",
            f"The encapsulation algorithm {algorithm} is not compatible with {key.arn} "
            f"({key.meta['KeySpec']}).",
        )
    asym = key.asymmetric
    assert asym is not None, "an Enabled ML-KEM key has its material"
    return asym


async def _encapsulate(svc: KmsService, r: Request) -> Release:
    key, p = r.key(), r.params
    secret, ciphertext = _encapsulation_key(key, p.text("EncapsulationAlgorithm")).encapsulate()
    return Release(
        secret,
        {
            "KeyId": key.arn,
            "SharedSecretCiphertextBlob": _b64(ciphertext),
            "EncapsulationAlgorithm": p.text("EncapsulationAlgorithm"),
        },
        field="SharedSecret",
    )


async def _decapsulate(svc: KmsService, r: Request) -> Release:
    key, p = r.key(), r.params
    asym = _encapsulation_key(key, p.text("EncapsulationAlgorithm"))
    try:
        secret = asym.decapsulate(p.blob("SharedSecretCiphertextBlob"))
    except CiphertextFormatError as exc:
        # Only a length that does not fit the key spec is refused (AWS); any other ciphertext
        # yields a pseudo-random secret (implicit rejection), so no oracle is offered.
        r.outcome.reason = str(exc)
        raise KmsApiError(
            "InvalidCiphertextException",
            f"The SharedSecretCiphertextBlob's length does not fit {key.meta['KeySpec']}: {exc}.",
        ) from None
    return Release(
        secret,
        {"KeyId": key.arn, "EncapsulationAlgorithm": p.text("EncapsulationAlgorithm")},
        field="SharedSecret",
    )


def _step(usage: str) -> tuple[KeyStep, ...]:
    return (KeyStep(locate=Locate.KEY_ID, require=Require.USABLE, usage=usage),)


OPERATIONS = (
    Operation("Sign", _sign, keys=_step("SIGN_VERIFY"), check=_check_signing, dry_run=True),
    Operation("Verify", _verify, keys=_step("SIGN_VERIFY"), check=_check_signing, dry_run=True),
    Operation(
        "GetPublicKey",
        _get_public_key,
        keys=(KeyStep(locate=Locate.KEY_ID, require=Require.USABLE),),
    ),
    Operation("GenerateMac", _generate_mac, keys=_step("GENERATE_VERIFY_MAC"), dry_run=True),
    Operation("VerifyMac", _verify_mac, keys=_step("GENERATE_VERIFY_MAC"), dry_run=True),
    Operation(
        "DeriveSharedSecret",
        _derive_shared_secret,
        keys=_step("KEY_AGREEMENT"),
        recipient=True,
        dry_run=True,
    ),
    # No Recipient: the model gives Encapsulate and Decapsulate none.
    Operation("Encapsulate", _encapsulate, keys=_step(ENCAPSULATE_DECAPSULATE), dry_run=True),
    Operation("Decapsulate", _decapsulate, keys=_step(ENCAPSULATE_DECAPSULATE), dry_run=True),
)
