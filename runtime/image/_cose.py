"""The EIF signature section (``reference/nitro.md`` §2.5): a COSE_Sign1 over PCR0.

Layout (serde_cbor of ``Vec<PcrSignature>``; only element 0 is used)::

    [ {"signing_certificate": [u8, ...],   # the certificate PEM file, CBOR array of uints
       "signature":           [u8, ...]} ] # untagged COSE_Sign1 bytes, CBOR array of uints
    COSE_Sign1 = [ bstr({1: alg}), {}, bstr(payload), bstr(r || s) ]
    payload    = {"register_index": 0, "register_value": [48 uints of PCR0]}

``alg`` follows the key's curve like aws-nitro-enclaves-cose: P-256 -> ES256 (-7),
P-384 -> ES384 (-35), P-521 -> ES512 (-36). We sign with deterministic ECDSA (RFC 6979), so a
signed build is as reproducible as an unsigned one; verifiers cannot tell the difference.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attest import cose
from runtime.image._errors import EifFormatError, EifSigningError
from runtime.image._format import MAX_SIGNATURE_SIZE, pcr_from_bytes

__all__ = [
    "SignatureSection",
    "pcr0_payload",
    "build_signature_section",
    "parse_signature_section",
    "load_private_key",
    "load_certificate",
]

#: Nesting of the section: array > map > array, well under this.
_MAX_CBOR_DEPTH: Final = 8


@dataclass(frozen=True, slots=True)
class SignatureSection:
    """A parsed signature section: the stored certificate PEM and the COSE_Sign1 bytes."""

    certificate_pem: bytes = field(repr=False)
    certificate: x509.Certificate
    cose_sign1: bytes = field(repr=False)

    @property
    def certificate_der(self) -> bytes:
        """DER of the signing certificate (what PCR8 measures)."""
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def pcr8(self) -> bytes:
        """``SHA384(0^48 || SHA384(cert DER))``."""
        return pcr_from_bytes(self.certificate_der)

    def verify(self, pcr0: bytes) -> bool:
        """True when the COSE signature is valid under the certificate's key and its payload
        is the PCR0 payload of this image."""
        try:
            payload = _verify_cose(self.cose_sign1, self.certificate)
        except EifFormatError:
            return False
        return payload is not None and hmac.compare_digest(payload, pcr0_payload(pcr0))


def pcr0_payload(pcr0: bytes) -> bytes:
    """The signed payload: serde_cbor of ``PcrInfo {register_index: 0, register_value}``."""
    return cbor2.dumps({"register_index": 0, "register_value": list(pcr0)})


def load_certificate(pem: bytes) -> x509.Certificate:
    """Parse a PEM signing certificate with an EC key on a supported curve.

    Raises:
        EifSigningError: not a PEM certificate, or not an EC P-256/384/521 key.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise EifSigningError(f"signing certificate is not a PEM certificate: {exc}") from None
    _alg_for(cert.public_key(), what="signing certificate")
    return cert


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse an unencrypted PEM EC private key on a supported curve.

    Raises:
        EifSigningError: unreadable, encrypted, or not EC P-256/384/521.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise EifSigningError(f"private key is not an unencrypted PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EifSigningError("private key must be an EC key (P-256, P-384 or P-521)")
    _alg_for(key.public_key(), what="private key")
    return key


def _alg_for(key: object, *, what: str) -> cose.Algorithm:
    alg = cose.algorithm_for_key(key)
    if alg is None:
        raise EifSigningError(f"{what} must hold an EC P-256, P-384 or P-521 key")
    return alg


def build_signature_section(
    pcr0: bytes, certificate_pem: bytes, private_key: ec.EllipticCurvePrivateKey
) -> bytes:
    """Sign PCR0 and return the signature section's data.

    Raises:
        EifSigningError: the key does not belong to the certificate, or the result is too big.
    """
    cert = load_certificate(certificate_pem)
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)  # checked by load_certificate
    if pub.public_numbers() != private_key.public_key().public_numbers():
        raise EifSigningError("the private key does not match the signing certificate")
    protected = cose.protected_header(_alg_for(pub, what="signing certificate"))
    payload = pcr0_payload(pcr0)
    # RFC 6979 nonces: a signed build is as reproducible as an unsigned one
    raw = cose.sign(private_key, protected, payload, deterministic=True)
    sign1 = cose.encode_sign1(protected, payload, raw)
    entry = {"signing_certificate": list(certificate_pem), "signature": list(sign1)}
    section = cbor2.dumps([entry])
    if len(section) > MAX_SIGNATURE_SIZE:
        raise EifSigningError(
            f"signature section is {len(section)} bytes, over the {MAX_SIGNATURE_SIZE} limit"
        )
    return section


def _loads(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data, max_depth=_MAX_CBOR_DEPTH, allow_duplicate_keys=False)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise EifFormatError(f"{what} is not valid CBOR") from None


def _byte_list(value: object, what: str) -> bytes:
    if isinstance(value, bytes):  # serde_cbor also reads a byte string into Vec<u8>
        return value
    if isinstance(value, list) and all(type(b) is int and 0 <= b <= 255 for b in value):
        return bytes(value)
    raise EifFormatError(f"signature section field {what} is not a byte array")


def parse_signature_section(data: bytes) -> SignatureSection:
    """Decode the signature section and its certificate (the signature is not checked here).

    Raises:
        EifFormatError: malformed CBOR, structure, or certificate.
    """
    if len(data) > MAX_SIGNATURE_SIZE:
        raise EifFormatError(f"signature section exceeds {MAX_SIGNATURE_SIZE} bytes")
    value = _loads(data, "signature section")
    if not isinstance(value, list) or not value or not isinstance(value[0], dict):
        raise EifFormatError("signature section is not a non-empty array of PcrSignature")
    first = value[0]
    if set(first) != {"signing_certificate", "signature"}:
        raise EifFormatError("signature section entry has unexpected fields")
    pem = _byte_list(first["signing_certificate"], "signing_certificate")
    cose = _byte_list(first["signature"], "signature")
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise EifFormatError("signature section certificate is not a PEM certificate") from None
    return SignatureSection(pem, cert, cose)


def _verify_cose(data: bytes, cert: x509.Certificate) -> bytes | None:
    """The payload of a COSE_Sign1 whose signature verifies under the certificate's key, None
    when it does not verify.

    Raises:
        EifFormatError: not a COSE_Sign1, or its algorithm does not fit the certificate.
    """
    try:
        sign1 = cose.decode_sign1(data)
    except cose.CoseFormatError as exc:
        raise EifFormatError(str(exc)) from None
    header = _loads(sign1.protected, "COSE protected header") if sign1.protected else {}
    if not isinstance(header, dict):
        raise EifFormatError("COSE protected header is not a map")
    try:
        alg = _alg_for(cert.public_key(), what="signing certificate")
    except EifSigningError as exc:
        raise EifFormatError(exc.message) from None
    if header.get(1) != alg.cose_id:  # label 1: alg (RFC 8152 §3.1)
        raise EifFormatError("COSE algorithm does not match the certificate's curve")
    if len(sign1.signature) != alg.signature_length:
        raise EifFormatError("COSE signature has the wrong length")
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)  # checked by _alg_for
    if not cose.verify(pub, sign1.protected, sign1.payload, sign1.signature, algorithm=alg):
        return None
    return sign1.payload
