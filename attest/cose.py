"""COSE_Sign1 with ECDSA (RFC 8152 §4.4, §8.1): the project's one implementation.

Two formats use it: NSM attestation documents (ES384, untagged, ``protected = {1: -35}``) and
the EIF signature section over PCR0 (ES256/ES384/ES512 after the signing key's curve, like
aws-nitro-enclaves-cose). Both sign

    Sig_structure = ["Signature1", protected, external_aad (h''), payload]

and store the signature as raw ``r ‖ s`` (each the curve's field size), not DER. ``cryptography``
speaks DER, so this module converts between the two encodings; the ECDSA itself is always
``cryptography``'s. Decoding is bounded (depth, no duplicate keys) and every failure of
:func:`decode_sign1` is a :class:`CoseFormatError`; :func:`verify` returns False rather than
raising on a bad signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from attest.errors import AttestError

__all__ = [
    "Algorithm",
    "ES256",
    "ES384",
    "ES512",
    "ES384_PROTECTED",
    "ES384_SIGNATURE_LENGTH",
    "COSE_SIGN1_TAG",
    "CoseFormatError",
    "CoseSign1",
    "algorithm_for_key",
    "protected_header",
    "sig_structure",
    "sign",
    "verify",
    "encode_sign1",
    "decode_sign1",
    "sign_es384",
    "verify_es384",
]

#: COSE header label of the algorithm (RFC 8152 §3.1).
_COSE_ALG: Final = 1
#: COSE_Sign1 CBOR tag (RFC 8152 §2); Nitro writes untagged, readers accept both.
COSE_SIGN1_TAG: Final = 18
#: Nesting of a COSE_Sign1 (array > map > ...): small; deeper input is refused.
_MAX_DEPTH: Final = 8


class CoseFormatError(AttestError):
    """Bytes that are not a COSE_Sign1 of the expected shape."""


@dataclass(frozen=True, slots=True)
class Algorithm:
    """An ECDSA COSE algorithm: its id, hash, curve and raw coordinate size (bytes)."""

    name: str
    cose_id: int
    hash: type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]
    curve: str
    coord_size: int

    @property
    def signature_length(self) -> int:
        """Length of the raw ``r ‖ s`` signature."""
        return 2 * self.coord_size


ES256: Final = Algorithm("ES256", -7, hashes.SHA256, "secp256r1", 32)
ES384: Final = Algorithm("ES384", -35, hashes.SHA384, "secp384r1", 48)
ES512: Final = Algorithm("ES512", -36, hashes.SHA512, "secp521r1", 66)
_BY_CURVE: Final = {a.curve: a for a in (ES256, ES384, ES512)}

#: Protected header ``{1: -35}`` (alg = ES384) as the bytes the NSM emits: ``a1 01 38 22``.
ES384_PROTECTED: Final = bytes.fromhex("a1013822")
#: ES384 raw signature length: r and s, 48 bytes each (P-384 order is 384 bits).
ES384_SIGNATURE_LENGTH: Final = ES384.signature_length


@dataclass(frozen=True, slots=True)
class CoseSign1:
    """The four fields of a COSE_Sign1 (``protected`` still encoded, as signed)."""

    protected: bytes
    unprotected: dict[Any, Any]
    payload: bytes
    signature: bytes


def algorithm_for_key(key: object) -> Algorithm | None:
    """The algorithm for an EC key (public or private) on P-256/384/521; None otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return _BY_CURVE.get(key.curve.name)
    return None


def protected_header(algorithm: Algorithm) -> bytes:
    """The encoded protected header ``{1: alg}``."""
    return cbor2.dumps({_COSE_ALG: algorithm.cose_id})


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """Return ``CBOR(["Signature1", protected, external_aad, payload])``."""
    return cbor2.dumps(["Signature1", protected, external_aad, payload])


def sign(
    key: ec.EllipticCurvePrivateKey,
    protected: bytes,
    payload: bytes,
    *,
    deterministic: bool = False,
) -> bytes:
    """Sign a COSE_Sign1 payload with the key's algorithm; returns the raw ``r ‖ s``.

    ``deterministic`` uses RFC 6979 nonces (a reproducible signature, for reproducible
    builds); otherwise ``cryptography``'s random nonces.

    Raises:
        ValueError: the key is not on P-256, P-384 or P-521.
    """
    alg = algorithm_for_key(key)
    if alg is None:
        raise ValueError("COSE signing needs an EC key on P-256, P-384 or P-521")
    der = key.sign(
        sig_structure(protected, payload), ec.ECDSA(alg.hash(), deterministic_signing=deterministic)
    )
    r, s = decode_dss_signature(der)
    return r.to_bytes(alg.coord_size, "big") + s.to_bytes(alg.coord_size, "big")


def verify(
    key: ec.EllipticCurvePublicKey,
    protected: bytes,
    payload: bytes,
    signature: bytes,
    *,
    algorithm: Algorithm | None = None,
) -> bool:
    """Check a raw ``r ‖ s`` signature; False on any mismatch (never raises for bad input).

    ``algorithm`` (default: the key's) must match the key's curve.
    """
    alg = algorithm_for_key(key)
    if alg is None or (algorithm is not None and algorithm != alg):
        return False
    if len(signature) != alg.signature_length:
        return False
    r = int.from_bytes(signature[: alg.coord_size], "big")
    s = int.from_bytes(signature[alg.coord_size :], "big")
    if r == 0 or s == 0:
        return False
    try:
        key.verify(
            encode_dss_signature(r, s), sig_structure(protected, payload), ec.ECDSA(alg.hash())
        )
    except InvalidSignature:
        return False
    return True


def encode_sign1(protected: bytes, payload: bytes, signature: bytes) -> bytes:
    """An untagged COSE_Sign1 with an empty unprotected map (what Nitro writes)."""
    return cbor2.dumps([protected, {}, payload, signature])


def decode_sign1(data: bytes) -> CoseSign1:
    """Decode a COSE_Sign1 (tagged 18 or untagged) into its fields, checking only types.

    Raises:
        CoseFormatError: not CBOR, another tag, not a 4-array, or fields of the wrong types.
    """
    try:
        value = cbor2.loads(data, max_depth=_MAX_DEPTH, allow_duplicate_keys=False)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise CoseFormatError("COSE_Sign1 is not valid CBOR") from None
    if isinstance(value, cbor2.CBORTag):
        if value.tag != COSE_SIGN1_TAG:
            raise CoseFormatError("COSE_Sign1 has an unexpected tag")
        value = value.value
    if not (isinstance(value, list) and len(value) == 4):
        raise CoseFormatError("COSE_Sign1 is not a 4-element array")
    protected, unprotected, payload, signature = value
    if not (
        isinstance(protected, bytes)
        and isinstance(unprotected, dict)
        and isinstance(payload, bytes)
        and isinstance(signature, bytes)
    ):
        raise CoseFormatError("COSE_Sign1 fields have the wrong types")
    return CoseSign1(protected, unprotected, payload, signature)


def sign_es384(key: ec.EllipticCurvePrivateKey, protected: bytes, payload: bytes) -> bytes:
    """Sign with ES384 (the NSM's algorithm); returns the 96-byte raw ``r ‖ s``.

    Raises:
        ValueError: ``key`` is not a P-384 key.
    """
    if algorithm_for_key(key) != ES384:
        raise ValueError("ES384 needs a P-384 key")
    return sign(key, protected, payload)


def verify_es384(
    key: ec.EllipticCurvePublicKey, protected: bytes, payload: bytes, signature: bytes
) -> bool:
    """Check a raw ES384 ``r ‖ s`` signature; False on any mismatch."""
    return verify(key, protected, payload, signature, algorithm=ES384)
