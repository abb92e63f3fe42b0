"""COSE_Sign1 / ES384 primitives (RFC 8152 §4.4), the only hazmat use for documents.

Nitro signs ``Sig_structure = ["Signature1", protected, h'', payload]`` with ECDSA P-384 /
SHA-384 and stores the signature as raw ``r ‖ s`` (48 + 48 bytes), not DER. ``cryptography``
speaks DER, so these helpers convert between the two encodings; the ECDSA itself is always
``cryptography``'s.
"""

from __future__ import annotations

from typing import Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

__all__ = [
    "ES384_PROTECTED",
    "ES384_SIGNATURE_LENGTH",
    "sig_structure",
    "sign_es384",
    "verify_es384",
]

#: Protected header ``{1: -35}`` (alg = ES384) as the bytes the NSM emits: ``a1 01 38 22``.
ES384_PROTECTED: Final = bytes.fromhex("a1013822")
#: ES384 raw signature length: r and s, 48 bytes each (P-384 order is 384 bits).
ES384_SIGNATURE_LENGTH: Final = 96
_COORD: Final = ES384_SIGNATURE_LENGTH // 2
_ECDSA_SHA384: Final = ec.ECDSA(hashes.SHA384())


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """Return ``CBOR(["Signature1", protected, h'', payload])`` (external_aad empty)."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign_es384(key: ec.EllipticCurvePrivateKey, protected: bytes, payload: bytes) -> bytes:
    """Sign a COSE_Sign1 payload; returns the 96-byte raw ``r ‖ s`` signature."""
    der = key.sign(sig_structure(protected, payload), _ECDSA_SHA384)
    r, s = decode_dss_signature(der)
    return r.to_bytes(_COORD, "big") + s.to_bytes(_COORD, "big")


def verify_es384(
    key: ec.EllipticCurvePublicKey, protected: bytes, payload: bytes, signature: bytes
) -> bool:
    """Check a raw ``r ‖ s`` ES384 signature; returns False on any mismatch."""
    if len(signature) != ES384_SIGNATURE_LENGTH or not isinstance(key.curve, ec.SECP384R1):
        return False
    r = int.from_bytes(signature[:_COORD], "big")
    s = int.from_bytes(signature[_COORD:], "big")
    if r == 0 or s == 0:
        return False
    try:
        key.verify(encode_dss_signature(r, s), sig_structure(protected, payload), _ECDSA_SHA384)
    except InvalidSignature:
        return False
    return True
