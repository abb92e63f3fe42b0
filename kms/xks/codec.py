"""The XKS Proxy API on the wire, sans-IO: URI routing, request and response JSON for both ends,
the AES-GCM AAD construction and the ciphertext data integrity value (CDIV).

Followed: the XKS Proxy API specification (aws/aws-kms-xksproxy-api-spec,
``xks_proxy_api_spec.md``, "Last Updated: Nov 10, 2022"):

* URIs: ``[/<prefix>]/kms/xks/v1/keys/<externalKeyId>/{metadata,encrypt,decrypt}`` and
  ``[/<prefix>]/kms/xks/v1/health``; the URI path is at most 128 characters of
  ``[A-Za-z0-9/_-]``; an external key id is 1-128 characters of ``[A-Za-z0-9._-]``.
* Request bodies: ``requestMetadata`` (``kmsRequestId`` and ``kmsOperation`` always,
  ``awsPrincipalArn`` for key operations, ``kmsKeyArn`` for Encrypt and Decrypt; optional
  ``awsSourceVpc``, ``awsSourceVpce``, ``kmsViaService``; fields AWS may add later are
  accepted), binary fields in standard Base64 (RFC 4648 §4), ``encryptionAlgorithm`` =
  ``AES_GCM``, ``ciphertextDataIntegrityValueAlgorithm`` = ``SHA_256``.
* Sizes: the spec's minimums are 4300 bytes of plaintext/ciphertext and 8192 bytes of AAD; this
  proxy takes up to :data:`MAX_DATA_BYTES` and :data:`MAX_AAD_BYTES` and answers
  ``UnsupportedOperationException`` beyond (the spec's error for sizes past an implementation's
  maximum). IVs are 12 or 16 bytes, tags 16, ``ciphertextMetadata`` at most 20 bytes.
* AES-GCM AAD (spec, Encrypt, ``ciphertextMetadata``): ``len(aad) as 2 bytes big-endian ‖ aad ‖
  len(ciphertextMetadata) as 1 byte ‖ ciphertextMetadata``, absent fields counting as empty, so
  AAD and metadata can never be swapped for one another (:func:`gcm_aad`).
* CDIV (spec, Appendix C): SHA-256 over ``aad ‖ ciphertextMetadata ‖ iv ‖ ciphertext ‖ tag``
  (:func:`cdiv`).

The encryption context is not a field of this API: AWS KMS folds it, with its own ciphertext
header, into ``additionalAuthenticatedData`` (spec change log 0.0.6), so the proxy treats AAD as
opaque bytes and a KMS caller's encryption context is bound by the tag through it.

Request parsers raise the server's :class:`~kms.xks.errors.XksApiError` subclasses (the reply
the caller gets); response parsers, used by the client, raise
:class:`ResponseFormatError`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypedDict

from .errors import (
    InvalidUriPathError,
    UnsupportedOperationError,
    ValidationError,
    XksError,
)

__all__ = [
    "API_SUFFIX",
    "MAX_URI_PATH",
    "MAX_DATA_BYTES",
    "MAX_AAD_BYTES",
    "MAX_CIPHERTEXT_METADATA_BYTES",
    "MAX_METADATA_FIELD",
    "IV_SIZES",
    "TAG_SIZE",
    "ENCRYPTION_ALGORITHM",
    "CDIV_ALGORITHM",
    "KEY_USAGES",
    "HEALTH_STATUSES",
    "ResponseFormatError",
    "Operation",
    "Route",
    "RequestMetadata",
    "EncryptRequest",
    "DecryptRequest",
    "KeyMetadata",
    "EncryptResult",
    "EkmDetails",
    "HealthStatus",
    "KeyMetadataJson",
    "EncryptResultJson",
    "EkmDetailsJson",
    "HealthStatusJson",
    "validate_uri_path",
    "validate_key_id",
    "route",
    "operation_path",
    "parse_json",
    "parse_request_metadata",
    "parse_encrypt_request",
    "parse_decrypt_request",
    "encode_request",
    "parse_key_metadata",
    "parse_encrypt_result",
    "parse_plaintext",
    "parse_health_status",
    "parse_error",
    "gcm_aad",
    "cdiv",
    "b64",
]

#: Every API URI path ends with this (version 1 of the API).
API_SUFFIX: Final = "/kms/xks/v1"
#: XksProxyUriPath: at most 128 characters (spec "API operations").
MAX_URI_PATH: Final = 128
#: Plaintext and ciphertext bytes accepted: twice the spec's 4300-byte minimum, so KMS's
#: double-encrypted data keys always fit, and still a small bounded buffer.
MAX_DATA_BYTES: Final = 8600
#: AAD bytes accepted: twice the spec's 8192-byte minimum.
MAX_AAD_BYTES: Final = 16384
#: ciphertextMetadata: at most 20 bytes (spec, Encrypt).
MAX_CIPHERTEXT_METADATA_BYTES: Final = 20
#: requestMetadata strings: ARNs up to 2048 characters (spec, "API operations").
MAX_METADATA_FIELD: Final = 2048
#: AES-GCM IV lengths the spec allows.
IV_SIZES: Final = frozenset({12, 16})
#: AES-GCM tag length the spec requires (128 bits).
TAG_SIZE: Final = 16
ENCRYPTION_ALGORITHM: Final = "AES_GCM"
CDIV_ALGORITHM: Final = "SHA_256"
#: keyUsage values this proxy reports (the spec allows up to ten, ENCRYPT/DECRYPT required).
KEY_USAGES: Final = ("ENCRYPT", "DECRYPT")
HEALTH_STATUSES: Final = frozenset({"ACTIVE", "DEGRADED", "UNAVAILABLE"})
#: Bound on keyUsage and ekmFleetDetails entries (spec: at most ten each).
_MAX_LIST = 10
#: Nesting allowed in a request or response body: the API's deepest is 3 (body → list → entry).
_MAX_DEPTH = 8

_URI_PATH_RE = re.compile(r"^[A-Za-z0-9/_-]+$")
#: The spec's key id characters; "." and ".." excluded: HTTP clients remove such dot segments
#: from URIs (RFC 3986 §5.2.4), so a key with that id could never be addressed.
_KEY_ID_RE = re.compile(r"^(?!\.\.?$)[A-Za-z0-9._-]{1,128}$")


class ResponseFormatError(XksError):
    """A proxy's answer is not what the spec prescribes (the client maps it to
    ``XksProxyInvalidResponseException``)."""


class Operation(enum.Enum):
    """The API's operations, by the last segment of their URI."""

    GET_KEY_METADATA = "metadata"
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    GET_HEALTH_STATUS = "health"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: the operation and, for key operations, the external key id."""

    operation: Operation
    key_id: str | None


# -- URIs ----------------------------------------------------------------------------------


def validate_uri_path(path: str) -> str:
    """Check an XksProxyUriPath (``[/<prefix>]/kms/xks/v1``) and return it.

    Raises:
        ValueError: it breaks the spec's rules.
    """
    if len(path) > MAX_URI_PATH or not _URI_PATH_RE.match(path):
        raise ValueError(
            f"URI path {path[:140]!r} must be at most {MAX_URI_PATH} characters of "
            "A-Z, a-z, 0-9, '/', '-' and '_'"
        )
    if not path.startswith("/") or not path.endswith(API_SUFFIX) or "//" in path:
        raise ValueError(f"URI path {path!r} must look like [/<prefix>]{API_SUFFIX}")
    return path


def validate_key_id(key_id: str) -> str:
    """Check an external key id (1-128 of ``[A-Za-z0-9._-]``, not ``.`` or ``..``).

    Raises:
        ValueError: it breaks the spec's rules.
    """
    if not isinstance(key_id, str) or not _KEY_ID_RE.match(key_id):
        raise ValueError(
            f"external key id {str(key_id)[:140]!r} must be 1-128 characters of "
            "A-Z, a-z, 0-9, '.', '-' and '_'"
        )
    return key_id


def operation_path(uri_path: str, operation: Operation, key_id: str | None = None) -> str:
    """The request path of ``operation`` under ``uri_path`` (client side)."""
    if operation is Operation.GET_HEALTH_STATUS:
        return f"{uri_path}/health"
    if key_id is None:
        raise ValueError(f"{operation.name} needs an external key id")
    return f"{uri_path}/keys/{validate_key_id(key_id)}/{operation.value}"


def route(target: str, uri_path: str) -> Route:
    """Route a request target (path, no query) under the configured ``uri_path``.

    Raises:
        InvalidUriPathError: not an API URI under ``uri_path`` (including any query string
            and any key id outside the spec's character set).
    """
    if "?" in target or "#" in target or not target.startswith(uri_path + "/"):
        raise InvalidUriPathError(reason=f"not under {uri_path}: {target[:200]!r}")
    rest = target[len(uri_path) + 1 :].split("/")
    if rest == ["health"]:
        return Route(Operation.GET_HEALTH_STATUS, None)
    if len(rest) == 3 and rest[0] == "keys" and _KEY_ID_RE.match(rest[1]):
        for op in (Operation.GET_KEY_METADATA, Operation.ENCRYPT, Operation.DECRYPT):
            if rest[2] == op.value:
                return Route(op, rest[1])
    raise InvalidUriPathError(reason=f"no such API URI: {target[:200]!r}")


# -- JSON and Base64 -------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:64]!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any, limit: int) -> bool:
    """True if ``value`` nests no deeper than ``limit`` (iterative: no recursion on input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children)
    return True


def parse_json(body: bytes) -> dict[str, Any]:
    """Decode a JSON object strictly: UTF-8, no duplicate keys, no NaN/Infinity, bounded depth.

    Raises:
        ValueError: anything else (the caller maps it to its own error).
    """
    try:
        text = body.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError:  # deeply nested arrays: the decoder's own recursion limit
        raise ValueError("JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("the body is not a JSON object")
    if not _depth(value, _MAX_DEPTH):
        raise ValueError("JSON nested too deeply")
    return value


def b64(data: bytes) -> str:
    """Standard Base64 with padding (RFC 4648 §4), as the spec's fields use."""
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, max_bytes: int) -> bytes:
    """Strict standard Base64; the encoded length is checked before decoding (bounded work).

    Raises:
        ValueError: not standard Base64.
        OverflowError: more than ``max_bytes`` once decoded.
    """
    if len(text) > 4 * ((max_bytes + 2) // 3):
        raise OverflowError(f"more than {max_bytes} bytes")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError("not standard Base64") from None
    if len(data) > max_bytes:
        raise OverflowError(f"more than {max_bytes} bytes")
    return data


# -- requests (server side) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestMetadata:
    """The ``requestMetadata`` object: who asked KMS for what (logged, never trusted)."""

    kms_request_id: str
    kms_operation: str
    aws_principal_arn: str | None = None
    kms_key_arn: str | None = None
    aws_source_vpc: str | None = None
    aws_source_vpce: str | None = None
    kms_via_service: str | None = None

    _FIELDS = (
        ("kms_request_id", "kmsRequestId"),
        ("kms_operation", "kmsOperation"),
        ("aws_principal_arn", "awsPrincipalArn"),
        ("kms_key_arn", "kmsKeyArn"),
        ("aws_source_vpc", "awsSourceVpc"),
        ("aws_source_vpce", "awsSourceVpce"),
        ("kms_via_service", "kmsViaService"),
    )

    def to_json(self) -> dict[str, str]:
        """The wire object (absent fields omitted)."""
        return {
            wire: getattr(self, attr)
            for attr, wire in self._FIELDS
            if getattr(self, attr) is not None
        }


#: requestMetadata fields each operation requires (spec, each operation's parameters).
_REQUIRED_METADATA: dict[Operation, tuple[str, ...]] = {
    Operation.GET_HEALTH_STATUS: ("kmsRequestId", "kmsOperation"),
    Operation.GET_KEY_METADATA: ("kmsRequestId", "kmsOperation", "awsPrincipalArn"),
    Operation.ENCRYPT: ("kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"),
    Operation.DECRYPT: ("kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"),
}


def parse_request_metadata(body: Mapping[str, Any], operation: Operation) -> RequestMetadata:
    """The request's ``requestMetadata``, with the fields ``operation`` requires.

    Raises:
        ValidationError: missing, not an object, a field of the wrong type, a required field
            missing or empty, a field longer than :data:`MAX_METADATA_FIELD`.
    """
    raw = body.get("requestMetadata")
    if not isinstance(raw, dict):
        raise ValidationError(
            "requestMetadata is required.", reason="requestMetadata missing or not an object"
        )
    values: dict[str, str | None] = {}
    for attr, wire in RequestMetadata._FIELDS:
        value = raw.get(wire)
        if value is None:
            values[attr] = None
            continue
        if not isinstance(value, str) or len(value) > MAX_METADATA_FIELD:
            raise ValidationError(
                f"requestMetadata.{wire} must be a string of at most {MAX_METADATA_FIELD} "
                "characters.",
                reason=f"bad requestMetadata.{wire}",
            )
        values[attr] = value
    for wire in _REQUIRED_METADATA[operation]:
        if not raw.get(wire):
            raise ValidationError(
                f"requestMetadata.{wire} is required.", reason=f"requestMetadata.{wire} missing"
            )
    return RequestMetadata(**values)  # type: ignore[arg-type]


def _binary(body: Mapping[str, Any], name: str, max_bytes: int) -> bytes | None:
    """An optional Base64 field (None when absent)."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a Base64 string.", reason=f"{name} not a string")
    try:
        return _b64decode(value, max_bytes)
    except OverflowError:
        raise UnsupportedOperationError(
            f"{name} is larger than the {max_bytes} bytes this proxy supports.",
            reason=f"{name} too large",
        ) from None
    except ValueError:
        raise ValidationError(
            f"{name} must be standard Base64.", reason=f"{name} not Base64"
        ) from None


def _required_binary(body: Mapping[str, Any], name: str, max_bytes: int) -> bytes:
    value = _binary(body, name, max_bytes)
    if value is None:
        raise ValidationError(f"{name} is required.", reason=f"{name} missing")
    return value


def _algorithm(body: Mapping[str, Any]) -> None:
    value = body.get("encryptionAlgorithm")
    if value is None:
        raise ValidationError(
            "encryptionAlgorithm is required.", reason="encryptionAlgorithm missing"
        )
    if value != ENCRYPTION_ALGORITHM:
        raise ValidationError(
            f"encryptionAlgorithm must be {ENCRYPTION_ALGORITHM}.",
            reason="unsupported encryptionAlgorithm",
        )


@dataclass(frozen=True, slots=True)
class EncryptRequest:
    """An Encrypt request's parameters (``metadata`` aside)."""

    plaintext: bytes
    aad: bytes
    want_cdiv: bool


@dataclass(frozen=True, slots=True)
class DecryptRequest:
    """A Decrypt request's parameters (``metadata`` aside)."""

    ciphertext: bytes
    iv: bytes
    tag: bytes
    aad: bytes
    ciphertext_metadata: bytes


def parse_encrypt_request(body: Mapping[str, Any]) -> EncryptRequest:
    """Parse an Encrypt body.

    Raises:
        ValidationError, UnsupportedOperationError: as the spec assigns them.
    """
    plaintext = _required_binary(body, "plaintext", MAX_DATA_BYTES)
    _algorithm(body)
    aad = _binary(body, "additionalAuthenticatedData", MAX_AAD_BYTES)
    cdiv_algorithm = body.get("ciphertextDataIntegrityValueAlgorithm")
    if cdiv_algorithm is not None and cdiv_algorithm != CDIV_ALGORITHM:
        raise ValidationError(
            f"ciphertextDataIntegrityValueAlgorithm must be {CDIV_ALGORITHM}.",
            reason="unsupported CDIV algorithm",
        )
    return EncryptRequest(plaintext, aad or b"", cdiv_algorithm is not None)


def parse_decrypt_request(body: Mapping[str, Any]) -> DecryptRequest:
    """Parse a Decrypt body. A wrong IV or tag length is an invalid ciphertext (spec, Decrypt).

    Raises:
        ValidationError, UnsupportedOperationError: as the spec assigns them.
    """
    ciphertext = _required_binary(body, "ciphertext", MAX_DATA_BYTES)
    _algorithm(body)
    aad = _binary(body, "additionalAuthenticatedData", MAX_AAD_BYTES)
    metadata = _binary(body, "ciphertextMetadata", MAX_CIPHERTEXT_METADATA_BYTES)
    iv = _required_binary(body, "initializationVector", max(IV_SIZES))
    tag = _required_binary(body, "authenticationTag", TAG_SIZE)
    if len(iv) not in IV_SIZES:
        raise ValidationError(
            "initializationVector must be 12 or 16 bytes.", reason=f"IV of {len(iv)} bytes"
        )
    if len(tag) != TAG_SIZE:
        raise ValidationError(
            "authenticationTag must be 16 bytes.", reason=f"tag of {len(tag)} bytes"
        )
    return DecryptRequest(ciphertext, iv, tag, aad or b"", metadata or b"")


def encode_request(metadata: RequestMetadata, **fields: bytes | str | None) -> bytes:
    """A request body (client side): ``requestMetadata`` plus the given fields, bytes Base64
    encoded, None omitted. Field names are the spec's (``plaintext``, ``initializationVector``...).
    """
    body: dict[str, Any] = {"requestMetadata": metadata.to_json()}
    for name, value in fields.items():
        if value is None:
            continue
        body[name] = b64(value) if isinstance(value, bytes) else value
    return json.dumps(body, separators=(",", ":")).encode()


# -- responses -------------------------------------------------------------------------------


class KeyMetadataJson(TypedDict):
    """GetKeyMetadata's answer on the wire (spec: GetKeyMetadata, response payload)."""

    keySpec: str
    keyUsage: list[str]
    keyStatus: str


class _EncryptResultRequired(TypedDict):
    ciphertext: str
    initializationVector: str
    authenticationTag: str


# The optional fields by inheritance, not NotRequired[]: under ``from __future__ import
# annotations`` Python 3.11 counts NotRequired fields among ``__required_keys__``.
class EncryptResultJson(_EncryptResultRequired, total=False):
    """Encrypt's answer on the wire, binary fields in Base64 (spec: Encrypt, response
    payload); the optional fields are absent, never null."""

    ciphertextMetadata: str
    ciphertextDataIntegrityValue: str


class EkmDetailsJson(TypedDict):
    """One ``ekmFleetDetails`` entry on the wire."""

    id: str
    model: str
    healthStatus: str


class HealthStatusJson(TypedDict):
    """GetHealthStatus's answer on the wire (spec: GetHealthStatus, response payload)."""

    xksProxyFleetSize: int
    xksProxyVendor: str
    xksProxyModel: str
    ekmVendor: str
    ekmFleetDetails: list[EkmDetailsJson]


@dataclass(frozen=True, slots=True)
class KeyMetadata:
    """GetKeyMetadata's answer."""

    key_spec: str
    key_usage: tuple[str, ...]
    key_status: str

    def to_json(self) -> KeyMetadataJson:
        """The wire object."""
        return {
            "keySpec": self.key_spec,
            "keyUsage": list(self.key_usage),
            "keyStatus": self.key_status,
        }


@dataclass(frozen=True, slots=True)
class EncryptResult:
    """Encrypt's answer (``cdiv`` only when it was asked for)."""

    ciphertext: bytes
    iv: bytes
    tag: bytes
    ciphertext_metadata: bytes = b""
    cdiv: bytes | None = None

    def to_json(self) -> EncryptResultJson:
        """The wire object (Base64; ``ciphertextMetadata`` only when not empty)."""
        out: EncryptResultJson = {
            "ciphertext": b64(self.ciphertext),
            "initializationVector": b64(self.iv),
            "authenticationTag": b64(self.tag),
        }
        if self.ciphertext_metadata:
            out["ciphertextMetadata"] = b64(self.ciphertext_metadata)
        if self.cdiv is not None:
            out["ciphertextDataIntegrityValue"] = b64(self.cdiv)
        return out


@dataclass(frozen=True, slots=True)
class EkmDetails:
    """One ``ekmFleetDetails`` entry: a key manager behind the proxy."""

    id: str
    model: str
    health_status: str

    def to_json(self) -> EkmDetailsJson:
        """The wire object."""
        return {"id": self.id, "model": self.model, "healthStatus": self.health_status}


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """GetHealthStatus's answer."""

    xks_proxy_fleet_size: int
    xks_proxy_vendor: str
    xks_proxy_model: str
    ekm_vendor: str
    ekm_fleet_details: tuple[EkmDetails, ...]

    def to_json(self) -> HealthStatusJson:
        """The wire object."""
        return {
            "xksProxyFleetSize": self.xks_proxy_fleet_size,
            "xksProxyVendor": self.xks_proxy_vendor,
            "xksProxyModel": self.xks_proxy_model,
            "ekmVendor": self.ekm_vendor,
            "ekmFleetDetails": [e.to_json() for e in self.ekm_fleet_details],
        }

    @property
    def all_unavailable(self) -> bool:
        """Every key manager reports UNAVAILABLE (KMS refuses to connect then)."""
        return all(e.health_status == "UNAVAILABLE" for e in self.ekm_fleet_details)


def _response(body: bytes) -> dict[str, Any]:
    try:
        return parse_json(body)
    except ValueError as exc:
        raise ResponseFormatError(str(exc)) from None


def _string(obj: Mapping[str, Any], name: str, *, limit: int = 1024) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ResponseFormatError(f"{name} missing, empty, too long or not a string")
    return value


def _response_binary(obj: Mapping[str, Any], name: str, max_bytes: int) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ResponseFormatError(f"{name} missing or not a string")
    try:
        return _b64decode(value, max_bytes)
    except (ValueError, OverflowError) as exc:
        raise ResponseFormatError(f"{name}: {exc}") from None


def parse_key_metadata(body: bytes) -> KeyMetadata:
    """Parse GetKeyMetadata's answer. Raises :class:`ResponseFormatError`."""
    obj = _response(body)
    usage = obj.get("keyUsage")
    if (
        not isinstance(usage, list)
        or len(usage) > _MAX_LIST
        or not all(isinstance(u, str) and 0 < len(u) <= 64 for u in usage)
    ):
        raise ResponseFormatError("keyUsage must be a list of at most ten strings")
    status = _string(obj, "keyStatus")
    if status not in ("ENABLED", "DISABLED"):
        raise ResponseFormatError(f"keyStatus {status[:32]!r} is neither ENABLED nor DISABLED")
    return KeyMetadata(_string(obj, "keySpec", limit=64), tuple(usage), status)


def parse_encrypt_result(
    body: bytes, *, plaintext_len: int, aad: bytes, want_cdiv: bool
) -> EncryptResult:
    """Parse and check Encrypt's answer: sizes (ciphertext as long as the plaintext, IV 12 or
    16 bytes, tag 16, metadata ≤ 20) and, when asked for, the CDIV.

    Raises:
        ResponseFormatError: any deviation, a CDIV mismatch included.
    """
    obj = _response(body)
    ciphertext = _response_binary(obj, "ciphertext", MAX_DATA_BYTES)
    iv = _response_binary(obj, "initializationVector", max(IV_SIZES))
    tag = _response_binary(obj, "authenticationTag", TAG_SIZE)
    metadata = b""
    if obj.get("ciphertextMetadata") is not None:
        metadata = _response_binary(obj, "ciphertextMetadata", MAX_CIPHERTEXT_METADATA_BYTES)
    if len(ciphertext) != plaintext_len:
        raise ResponseFormatError("ciphertext length differs from the plaintext's")
    if len(iv) not in IV_SIZES or len(tag) != TAG_SIZE:
        raise ResponseFormatError("initializationVector or authenticationTag has a wrong size")
    result = EncryptResult(ciphertext, iv, tag, metadata)
    if want_cdiv:
        got = _response_binary(obj, "ciphertextDataIntegrityValue", 32)
        expected = cdiv(aad, result)
        # Not a secret (the proxy computed it in the open): plain comparison is fine.
        if got != expected:
            raise ResponseFormatError("ciphertextDataIntegrityValue does not match")
        result = EncryptResult(ciphertext, iv, tag, metadata, got)
    return result


def parse_plaintext(body: bytes, *, ciphertext_len: int) -> bytes:
    """Parse Decrypt's answer (the plaintext must be as long as the ciphertext).

    Raises:
        ResponseFormatError: otherwise.
    """
    plaintext = _response_binary(_response(body), "plaintext", MAX_DATA_BYTES)
    if len(plaintext) != ciphertext_len:
        raise ResponseFormatError("plaintext length differs from the ciphertext's")
    return plaintext


def parse_health_status(body: bytes) -> HealthStatus:
    """Parse GetHealthStatus's answer. Raises :class:`ResponseFormatError`."""
    obj = _response(body)
    size = obj.get("xksProxyFleetSize")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ResponseFormatError("xksProxyFleetSize must be an integer greater than zero")
    fleet = obj.get("ekmFleetDetails")
    if not isinstance(fleet, list) or not 1 <= len(fleet) <= _MAX_LIST:
        raise ResponseFormatError("ekmFleetDetails must hold one to ten entries")
    details = []
    for entry in fleet:
        if not isinstance(entry, dict):
            raise ResponseFormatError("an ekmFleetDetails entry is not an object")
        status = _string(entry, "healthStatus")
        if status not in HEALTH_STATUSES:
            raise ResponseFormatError(f"healthStatus {status[:32]!r} is not one of the spec's")
        details.append(EkmDetails(_string(entry, "id"), _string(entry, "model"), status))
    return HealthStatus(
        size,
        _string(obj, "xksProxyVendor"),
        _string(obj, "xksProxyModel"),
        _string(obj, "ekmVendor"),
        tuple(details),
    )


def parse_error(body: bytes) -> tuple[str, str | None] | None:
    """``(errorName, errorMessage)`` of an error answer, or None if it has none."""
    try:
        obj = parse_json(body)
    except ValueError:
        return None
    name = obj.get("errorName")
    message = obj.get("errorMessage")
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        return None
    return name, message[:512] if isinstance(message, str) else None


# -- cryptographic framing -------------------------------------------------------------------


def gcm_aad(aad: bytes, ciphertext_metadata: bytes = b"") -> bytes:
    """The AAD given to AES-GCM: both lengths included, so neither field can be passed off as
    the other (spec, Encrypt, ``ciphertextMetadata``).

    Raises:
        ValueError: ``aad`` longer than 65535 or metadata longer than 20 bytes.
    """
    if len(aad) > 0xFFFF or len(ciphertext_metadata) > MAX_CIPHERTEXT_METADATA_BYTES:
        raise ValueError("AAD or ciphertextMetadata too long")
    return (
        len(aad).to_bytes(2, "big")
        + aad
        + len(ciphertext_metadata).to_bytes(1, "big")
        + ciphertext_metadata
    )


def cdiv(aad: bytes, result: EncryptResult) -> bytes:
    """The ciphertext data integrity value, SHA-256 (spec, Appendix C)."""
    h = hashlib.sha256()
    for part in (aad, result.ciphertext_metadata, result.iv, result.ciphertext, result.tag):
        h.update(part)
    return h.digest()
