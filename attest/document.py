"""Nitro attestation documents: types, COSE_Sign1 envelope, payload codec, syntactic rules.

Theory of operation
-------------------
A document is a COSE_Sign1 (RFC 8152) ``[protected, unprotected, payload, signature]``, untagged
as the NSM emits it (tag 18 accepted when decoding). ``protected`` must decode to ``{1: -35}``
(ES384); the payload is a CBOR map with the keys of nitro.md §4.2. This module is pure: decoding
checks every syntactic rule of nitro.md §4.4 step 2 (NSM ``attestation_process.md`` §3.2.2) and
raises :class:`~attest.errors.DocumentFormatError` naming the rule; the certificate chain and the
signature are checked by :mod:`attest.verify`, the relying party's expectations by
:mod:`attest.policy`.

Bounded work: the input is size-capped before decoding (:data:`MAX_DOCUMENT_SIZE`), cbor2 runs
with a small ``max_depth``, duplicate map keys refused, every semantic tag decoder disabled (no
bignums, regexes, datetimes... from untrusted bytes), and trailing bytes after the CBOR item are
an error. Both definite and indefinite-length maps/arrays/strings are accepted (newer AWS
documents use an indefinite outer payload map); the signature covers the exact bytes received.

Encoding reproduces the NSM's bytes: keys in Nitro's order, ``timestamp`` as an 8-byte unsigned
integer (``1b`` + u64, ms since the epoch), absent optionals as ``null``, ``cabundle`` root first.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from attest.cose import ES384_PROTECTED, ES384_SIGNATURE_LENGTH, sign_es384
from attest.errors import DocumentFormatError

__all__ = [
    "MAX_DOCUMENT_SIZE",
    "MAX_PAYLOAD_SIZE",
    "PAYLOAD_KEYS",
    "DEBUG_PCRS",
    "CoseSign1",
    "AttestationDocument",
    "parse_cose_sign1",
    "parse_payload",
    "parse_document",
    "encode_payload",
    "encode_payload_fields",
    "encode_chain_fields",
    "encode_pcrs",
    "sign_payload",
    "sign_document",
    "is_debug_pcrs",
]

#: Largest payload the NSM CDDL allows (``payload: bstr .size (1..16384)``), bytes.
MAX_PAYLOAD_SIZE: Final = 16384
#: Largest document accepted before decoding: the payload cap plus generous room for the
#: envelope (protected header, 96-byte signature, CBOR heads, optional tag). Real documents are
#: 4.4-7.5 KB; the NSM response buffer (12288 bytes) bounds what a device can return anyway.
MAX_DOCUMENT_SIZE: Final = MAX_PAYLOAD_SIZE + 1024
#: Payload keys in the order the NSM emits them (nitro.md §4.2, ``AttestationDoc`` field order).
PAYLOAD_KEYS: Final = (
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
)
#: PCRs that are all-zero in documents of debug-mode enclaves (PCR3/4 keep their values).
DEBUG_PCRS: Final = (0, 1, 2, 8)
#: PCRs whose all-zero value identifies a debug-mode document (image, kernel, application).
_DEBUG_EVIDENCE_PCRS: Final = (0, 1, 2)

#: Allowed digests (§4.4: digest ∈ {"SHA384"}).
_DIGESTS: Final = frozenset({"SHA384"})
#: Allowed PCR value lengths (§4.4: SHA-256/384/512 widths), bytes.
_PCR_LENGTHS: Final = frozenset({32, 48, 64})
#: PCR count bounds (§4.4: 1 ≤ size ≤ 32) and index range [0, 32).
_MAX_PCRS: Final = 32
#: DER certificate length bounds in the payload (CDDL ``bstr .size (1..1024)``).
_CERT_MAX: Final = 1024
#: Optional field caps: the NSM accepts and emits up to 1024 bytes each (nitro.md §4.4 note).
_OPTIONAL_MAX: Final = 1024
#: COSE header label ``alg`` and the ES384 algorithm id (RFC 8152 tables 2 and 5).
_COSE_ALG: Final = 1
_ES384: Final = -35
#: COSE_Sign1 CBOR tag (RFC 8152 §4.2), optional on input.
_COSE_SIGN1_TAG: Final = 18
#: Deepest legal nesting: payload map → pcrs map / cabundle array → byte string = 2 containers;
#: the envelope is an array (inside an optional tag). 4 leaves margin and stops deep bombs.
_MAX_DEPTH: Final = 4
#: Largest timestamp an unsigned 64-bit CBOR integer can carry.
_U64_MAX: Final = (1 << 64) - 1
#: Tags cbor2 would otherwise decode into rich Python objects (datetime, bignum, decimal,
#: bigfloat, string/shared references, rational, regex, MIME, UUID, sets, IP addresses, self-
#: describe). Nothing in a document uses them; refusing them keeps decoding cheap and typed.
_SEMANTIC_TAGS: Final = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 256, 258, 260, 261, 55799)


def _refuse_tag(_decoder: Any, _value: Any) -> Any:
    raise ValueError("semantic CBOR tags are not allowed in attestation documents")


_SEMANTIC_DECODERS: Final = MappingProxyType(dict.fromkeys(_SEMANTIC_TAGS, _refuse_tag))


@dataclass(frozen=True, slots=True)
class CoseSign1:
    """A decoded COSE_Sign1 envelope (fields are the exact received bytes)."""

    protected: bytes
    unprotected: Mapping[Any, Any]
    payload: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    tagged: bool = False


@dataclass(frozen=True, eq=True)
class AttestationDocument:
    """The payload of a Nitro attestation document, with the spec's field names (§4.2).

    ``timestamp`` is in milliseconds since the epoch. ``pcrs`` maps PCR index to value.
    ``cabundle`` is root first. ``cose`` is set when the document came from :func:`parse_document`
    (it holds the exact signed bytes) and is ignored by equality.
    """

    module_id: str
    digest: str
    timestamp: int
    pcrs: Mapping[int, bytes]
    certificate: bytes = field(repr=False)
    cabundle: tuple[bytes, ...] = field(repr=False)
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None
    cose: CoseSign1 | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_bytes(cls, data: bytes) -> AttestationDocument:
        """Decode and syntactically check a COSE_Sign1 document (see :func:`parse_document`)."""
        return parse_document(data)

    def to_payload(self) -> bytes:
        """Encode the payload exactly as the NSM does (see :func:`encode_payload`)."""
        return encode_payload(self)

    @property
    def debug(self) -> bool:
        """True when the document comes from a debug-mode enclave (PCR0/1/2 zero or absent)."""
        return is_debug_pcrs(self.pcrs)

    @property
    def issued_at(self) -> datetime:
        """``timestamp`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.timestamp / 1000, tz=UTC)


def is_debug_pcrs(pcrs: Mapping[int, bytes]) -> bool:
    """Return True if the PCRs identify a debug-mode enclave.

    Nitro zeroes PCR0/1/2/8 in debug mode. Fail closed: a missing PCR0/1/2 also counts as debug,
    so a document cannot dodge the debug rule by leaving the image measurements out.
    """
    for index in _DEBUG_EVIDENCE_PCRS:
        value = pcrs.get(index)
        if value is None or not any(value):
            return True
    return False


# --- decoding ------------------------------------------------------------------------------


def _decode_cbor(data: bytes, what: str) -> Any:
    decoder = cbor2.CBORDecoder(
        io.BytesIO(data),
        max_depth=_MAX_DEPTH,
        allow_duplicate_keys=False,
        semantic_decoders=_SEMANTIC_DECODERS,
    )
    try:
        obj = decoder.decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise DocumentFormatError(f"{what}: not valid CBOR ({exc})") from exc
    try:
        decoder.read(1)
    except cbor2.CBORDecodeEOF:
        return obj
    except cbor2.CBORDecodeError as exc:  # pragma: no cover - read() only fails with EOF
        raise DocumentFormatError(f"{what}: not valid CBOR ({exc})") from exc
    raise DocumentFormatError(f"{what}: trailing bytes after the CBOR item")


def parse_cose_sign1(data: bytes) -> CoseSign1:
    """Decode the COSE_Sign1 envelope (tagged or untagged) and check its ES384 shape.

    Raises:
        DocumentFormatError: oversized input, bad CBOR, or an envelope rule broken.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("document must be bytes")
    data = bytes(data)
    if not data:
        raise DocumentFormatError("document is empty")
    if len(data) > MAX_DOCUMENT_SIZE:
        raise DocumentFormatError(
            f"document is {len(data)} bytes, more than the {MAX_DOCUMENT_SIZE}-byte limit"
        )
    obj = _decode_cbor(data, "COSE_Sign1")
    tagged = False
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != _COSE_SIGN1_TAG:
            raise DocumentFormatError(f"COSE_Sign1: unexpected CBOR tag {obj.tag}")
        obj, tagged = obj.value, True
    if not isinstance(obj, list | tuple) or len(obj) != 4:
        raise DocumentFormatError("COSE_Sign1: must be an array of 4 items")
    protected, unprotected, payload, signature = obj
    if not isinstance(protected, bytes):
        raise DocumentFormatError("COSE_Sign1: protected header must be a byte string")
    header = _decode_cbor(protected, "protected header") if protected else {}
    if not isinstance(header, Mapping) or dict(header) != {_COSE_ALG: _ES384}:
        raise DocumentFormatError("COSE_Sign1: protected header must be {1: -35} (ES384)")
    if not isinstance(unprotected, Mapping):
        raise DocumentFormatError("COSE_Sign1: unprotected header must be a map")
    if not isinstance(payload, bytes):
        raise DocumentFormatError("COSE_Sign1: payload must be a byte string")
    if not 1 <= len(payload) <= MAX_PAYLOAD_SIZE:
        raise DocumentFormatError(f"COSE_Sign1: payload length must be 1..{MAX_PAYLOAD_SIZE}")
    if not isinstance(signature, bytes):
        raise DocumentFormatError("COSE_Sign1: signature must be a byte string")
    if len(signature) != ES384_SIGNATURE_LENGTH:
        raise DocumentFormatError(
            f"COSE_Sign1: ES384 signature must be {ES384_SIGNATURE_LENGTH} bytes (r ‖ s)"
        )
    return CoseSign1(protected, unprotected, payload, signature, tagged)


def _require(payload: Mapping[Any, Any], key: str) -> Any:
    if key not in payload:
        raise DocumentFormatError(f"{key}: mandatory field missing")
    value = payload[key]
    if value is None:
        raise DocumentFormatError(f"{key}: mandatory field is null")
    return value


def _optional(payload: Mapping[Any, Any], key: str, min_len: int) -> bytes | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise DocumentFormatError(f"{key}: must be a byte string or null")
    if not min_len <= len(value) <= _OPTIONAL_MAX:
        raise DocumentFormatError(f"{key}: length must be {min_len}..{_OPTIONAL_MAX} bytes")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_payload(payload: bytes, *, cose: CoseSign1 | None = None) -> AttestationDocument:
    """Decode an attestation payload map and apply every syntactic rule of nitro.md §4.4.

    Unknown text keys are ignored (forward compatibility: they are signed but meaningless to
    us); non-text keys are an error.

    Raises:
        DocumentFormatError: naming the field and the rule it breaks.
    """
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise DocumentFormatError(f"payload is larger than {MAX_PAYLOAD_SIZE} bytes")
    obj = _decode_cbor(payload, "payload")
    if not isinstance(obj, dict):
        raise DocumentFormatError("payload: must be a CBOR map")
    if not all(isinstance(k, str) for k in obj):
        raise DocumentFormatError("payload: map keys must be text strings")

    module_id = _require(obj, "module_id")
    if not isinstance(module_id, str) or not module_id:
        raise DocumentFormatError("module_id: must be a non-empty text string")

    digest = _require(obj, "digest")
    if not isinstance(digest, str) or digest not in _DIGESTS:
        raise DocumentFormatError(f"digest: must be one of {sorted(_DIGESTS)}")

    timestamp = _require(obj, "timestamp")
    if not _is_int(timestamp) or not 0 < timestamp <= _U64_MAX:
        raise DocumentFormatError("timestamp: must be an unsigned integer > 0 (ms)")

    raw_pcrs = _require(obj, "pcrs")
    if not isinstance(raw_pcrs, dict):
        raise DocumentFormatError("pcrs: must be a map")
    if not 1 <= len(raw_pcrs) <= _MAX_PCRS:
        raise DocumentFormatError(f"pcrs: must hold 1..{_MAX_PCRS} entries")
    pcrs: dict[int, bytes] = {}
    for index, value in raw_pcrs.items():
        if not _is_int(index) or not 0 <= index < _MAX_PCRS:
            raise DocumentFormatError(f"pcrs: index must be an integer in [0, {_MAX_PCRS})")
        if not isinstance(value, bytes) or len(value) not in _PCR_LENGTHS:
            raise DocumentFormatError(f"pcrs: PCR{index} must be a byte string of 32/48/64 bytes")
        pcrs[index] = value

    certificate = _require(obj, "certificate")
    if not isinstance(certificate, bytes) or not 1 <= len(certificate) <= _CERT_MAX:
        raise DocumentFormatError(f"certificate: must be a byte string of 1..{_CERT_MAX} bytes")

    raw_bundle = _require(obj, "cabundle")
    if not isinstance(raw_bundle, list) or not raw_bundle:
        raise DocumentFormatError("cabundle: must be a non-empty array")
    for i, cert in enumerate(raw_bundle):
        if not isinstance(cert, bytes) or not 1 <= len(cert) <= _CERT_MAX:
            raise DocumentFormatError(
                f"cabundle: entry {i} must be a byte string of 1..{_CERT_MAX} bytes"
            )

    return AttestationDocument(
        module_id=module_id,
        digest=digest,
        timestamp=timestamp,
        pcrs=MappingProxyType(dict(sorted(pcrs.items()))),
        certificate=certificate,
        cabundle=tuple(raw_bundle),
        public_key=_optional(obj, "public_key", 1),
        user_data=_optional(obj, "user_data", 0),
        nonce=_optional(obj, "nonce", 0),
        cose=cose,
    )


def parse_document(data: bytes) -> AttestationDocument:
    """Decode a COSE_Sign1 attestation document and check its syntax (nitro.md §4.4 steps 1-2).

    This does not verify anything cryptographically; use :class:`attest.verify.Verifier`.

    Raises:
        DocumentFormatError: the bytes are not a well-formed Nitro attestation document.
        TypeError: ``data`` is not bytes.
    """
    cose = parse_cose_sign1(data)
    return parse_payload(cose.payload, cose=cose)


# --- encoding ------------------------------------------------------------------------------

_U64: Final = struct.Struct(">Q")


def encode_chain_fields(certificate: bytes, cabundle: Sequence[bytes]) -> bytes:
    """The encoded ``certificate`` and ``cabundle`` entries of a payload (a signer reuses them)."""
    if not cabundle:
        raise ValueError("cabundle must not be empty")
    return b"".join(
        (
            cbor2.dumps("certificate"),
            cbor2.dumps(bytes(certificate)),
            cbor2.dumps("cabundle"),
            cbor2.dumps([bytes(c) for c in cabundle]),
        )
    )


_KEY_MODULE_ID: Final = cbor2.dumps("module_id")
_KEY_DIGEST: Final = cbor2.dumps("digest")
_KEY_TIMESTAMP: Final = cbor2.dumps("timestamp")
_KEY_PCRS: Final = cbor2.dumps("pcrs")
_OPTIONAL_KEYS: Final = tuple(cbor2.dumps(k) for k in ("public_key", "user_data", "nonce"))


def encode_payload_fields(
    *,
    module_id: str,
    digest: str,
    timestamp: int,
    pcrs: Mapping[int, bytes] | bytes,
    chain_fields: bytes,
    public_key: bytes | None,
    user_data: bytes | None,
    nonce: bytes | None,
) -> bytes:
    """Encode a payload from its fields.

    ``chain_fields`` comes from :func:`encode_chain_fields`; ``pcrs`` may be given already
    encoded (from :func:`encode_pcrs`), which a signer reuses while the locked set is unchanged.
    """
    if not 0 < timestamp <= _U64_MAX:
        raise ValueError("timestamp must be a positive u64 (ms)")
    parts = [
        b"\xa9",  # map(9): the NSM always emits all nine keys
        _KEY_MODULE_ID,
        cbor2.dumps(module_id),
        _KEY_DIGEST,
        cbor2.dumps(digest),
        _KEY_TIMESTAMP,
        b"\x1b" + _U64.pack(timestamp),  # uint64 in its 8-byte form, as real documents
        _KEY_PCRS,
        pcrs if isinstance(pcrs, bytes) else encode_pcrs(pcrs),
        chain_fields,
    ]
    for key, value in zip(_OPTIONAL_KEYS, (public_key, user_data, nonce), strict=True):
        if value is not None and len(value) > _OPTIONAL_MAX:
            raise ValueError(f"optional fields must be at most {_OPTIONAL_MAX} bytes")
        parts.append(key)
        parts.append(cbor2.dumps(None if value is None else bytes(value)))
    return b"".join(parts)


def encode_pcrs(pcrs: Mapping[int, bytes]) -> bytes:
    """The CBOR map of PCRs, keys ascending, as the NSM emits it."""
    return cbor2.dumps({int(k): bytes(v) for k, v in sorted(pcrs.items())})


def encode_payload(doc: AttestationDocument) -> bytes:
    """Encode the payload map as the NSM does: Nitro key order, 8-byte timestamp, nulls.

    Raises:
        ValueError: a field is out of the ranges :func:`parse_payload` accepts.
    """
    return encode_payload_fields(
        module_id=doc.module_id,
        digest=doc.digest,
        timestamp=doc.timestamp,
        pcrs=doc.pcrs,
        chain_fields=encode_chain_fields(doc.certificate, doc.cabundle),
        public_key=doc.public_key,
        user_data=doc.user_data,
        nonce=doc.nonce,
    )


def sign_payload(payload: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Wrap an encoded payload in an untagged COSE_Sign1 / ES384 signed with ``key``."""
    signature = sign_es384(key, ES384_PROTECTED, payload)
    return cbor2.dumps([ES384_PROTECTED, {}, payload, signature])


def sign_document(doc: AttestationDocument, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Encode ``doc`` and sign it as an untagged COSE_Sign1 / ES384, like the NSM.

    ``key`` must be the private key of ``doc.certificate``.
    """
    return sign_payload(encode_payload(doc), key)
