"""NSM request/response messages and their CBOR encoding (nitro.md §3.2), pure.

The real NSM speaks serde_cbor of nsm-api's ``Request``/``Response`` enums, externally tagged:

* a unit variant is a CBOR text string (``"DescribeNSM"``, ``"GetRandom"``, ``"LockPCR"``);
* a struct variant is a one-entry map ``{variant: {field: value, ...}}``;
* ``ByteBuf`` fields are byte strings, ``Option::None`` is ``null``;
* an error response is ``{"Error": "<ErrorCode name>"}``.

Encoders here produce exactly nsm-api's bytes (field order as declared in the Rust structs;
cbor2 emits minimal-length integers, as serde_cbor does). Decoders accept field maps in any
order and, like QEMU's ``virtio-nsm``, text strings where bytes are expected. Every decode site
bounds its input first (:data:`NSM_REQUEST_MAX_SIZE` / :data:`NSM_RESPONSE_MAX_SIZE`) and uses
cbor2 with a small ``max_depth`` and duplicate keys refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2

from attest.errors import NSM_ERROR_NAMES, AttestError

__all__ = [
    "NSM_REQUEST_MAX_SIZE",
    "NSM_RESPONSE_MAX_SIZE",
    "MAX_PCRS",
    "BOOT_LOCKED_PCRS",
    "PCR_LENGTH",
    "ATTESTATION_FIELD_MAX",
    "RANDOM_LENGTH",
    "NSM_VERSION",
    "Request",
    "DescribePCR",
    "ExtendPCR",
    "LockPCR",
    "LockPCRs",
    "DescribeNSM",
    "Attestation",
    "GetRandom",
    "Response",
    "DescribePCRResponse",
    "ExtendPCRResponse",
    "LockPCRResponse",
    "LockPCRsResponse",
    "DescribeNSMResponse",
    "AttestationResponse",
    "GetRandomResponse",
    "ErrorResponse",
    "MessageError",
    "encode_request",
    "decode_request",
    "encode_response",
    "decode_response",
]

#: Largest request the driver accepts (nsm-api ``NSM_REQUEST_MAX_SIZE`` = 0x1000 bytes).
NSM_REQUEST_MAX_SIZE: Final = 0x1000
#: Size of the response buffer the driver hands the device (``NSM_RESPONSE_MAX_SIZE`` = 0x3000).
NSM_RESPONSE_MAX_SIZE: Final = 0x3000
#: Number of PCRs of the NSM (nsm-check asserts ``max_pcrs == 32``).
MAX_PCRS: Final = 32
#: PCRs locked at boot: 0-15 (nsm-check ``locked_pcrs_ref = (0..16)``).
BOOT_LOCKED_PCRS: Final = range(16)
#: SHA-384 output, the NSM's PCR width in bytes.
PCR_LENGTH: Final = 48
#: Largest user_data / nonce / public_key the NSM accepts in an Attestation request (bytes).
ATTESTATION_FIELD_MAX: Final = 1024
#: Bytes returned by GetRandom (nsm-lib: "up to 256 bytes"; QEMU returns 256).
RANDOM_LENGTH: Final = 256
#: DescribeNSM version triple (QEMU's virtio-nsm reports 1.0.0).
NSM_VERSION: Final = (1, 0, 0)

# Nesting depth of the deepest legal message: {"DescribeNSM": {"locked_pcrs": [..]}} is 3.
_MAX_DEPTH: Final = 4
_U16_MAX: Final = 0xFFFF


class MessageError(AttestError, ValueError):
    """A message could not be decoded (the sender's fault); ``code`` is the NSM error name to
    answer with. An :class:`~attest.errors.AttestError` (the project's root) and, as before,
    a ``ValueError``."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DescribePCR:
    """Read a PCR and its lock state."""

    index: int


@dataclass(frozen=True, slots=True)
class ExtendPCR:
    """Extend PCR ``index`` with ``data``: new = SHA-384(old ‖ data)."""

    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class LockPCR:
    """Lock one PCR against further extension."""

    index: int


@dataclass(frozen=True, slots=True)
class LockPCRs:
    """Lock PCRs ``[0, range)``."""

    range: int


@dataclass(frozen=True, slots=True)
class DescribeNSM:
    """Ask for the module's version, id, PCR count and locked set."""


@dataclass(frozen=True, slots=True)
class Attestation:
    """Ask for a signed attestation document."""

    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class GetRandom:
    """Ask for random bytes."""


Request = DescribePCR | ExtendPCR | LockPCR | LockPCRs | DescribeNSM | Attestation | GetRandom

# --- responses -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DescribePCRResponse:
    lock: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class ExtendPCRResponse:
    data: bytes


@dataclass(frozen=True, slots=True)
class LockPCRResponse:
    pass


@dataclass(frozen=True, slots=True)
class LockPCRsResponse:
    pass


@dataclass(frozen=True, slots=True)
class DescribeNSMResponse:
    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: str = "SHA384"


@dataclass(frozen=True, slots=True)
class AttestationResponse:
    document: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class GetRandomResponse:
    random: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """``{"Error": code}``; ``code`` is one of :data:`attest.errors.NSM_ERROR_NAMES`."""

    code: str


Response = (
    DescribePCRResponse
    | ExtendPCRResponse
    | LockPCRResponse
    | LockPCRsResponse
    | DescribeNSMResponse
    | AttestationResponse
    | GetRandomResponse
    | ErrorResponse
)


# --- encoding ------------------------------------------------------------------------------


def encode_request(request: Request) -> bytes:
    """Encode a request exactly as nsm-api's serde_cbor does."""
    obj: Any
    match request:
        case DescribePCR(index=index):
            obj = {"DescribePCR": {"index": index}}
        case ExtendPCR(index=index, data=data):
            obj = {"ExtendPCR": {"index": index, "data": bytes(data)}}
        case LockPCR(index=index):
            obj = {"LockPCR": {"index": index}}
        case LockPCRs(range=range_):
            obj = {"LockPCRs": {"range": range_}}
        case DescribeNSM():
            obj = "DescribeNSM"
        case Attestation(user_data=user_data, nonce=nonce, public_key=public_key):
            obj = {
                "Attestation": {
                    "user_data": _opt_bytes(user_data),
                    "nonce": _opt_bytes(nonce),
                    "public_key": _opt_bytes(public_key),
                }
            }
        case GetRandom():
            obj = "GetRandom"
        case _:  # pragma: no cover - exhaustive over Request
            raise TypeError(f"not an NSM request: {request!r}")
    return cbor2.dumps(obj)


def encode_response(response: Response) -> bytes:
    """Encode a response exactly as nsm-api's serde_cbor does."""
    obj: Any
    match response:
        case DescribePCRResponse(lock=lock, data=data):
            obj = {"DescribePCR": {"lock": bool(lock), "data": bytes(data)}}
        case ExtendPCRResponse(data=data):
            obj = {"ExtendPCR": {"data": bytes(data)}}
        case LockPCRResponse():
            obj = "LockPCR"
        case LockPCRsResponse():
            obj = "LockPCRs"
        case DescribeNSMResponse():
            obj = {
                "DescribeNSM": {
                    "version_major": response.version_major,
                    "version_minor": response.version_minor,
                    "version_patch": response.version_patch,
                    "module_id": response.module_id,
                    "max_pcrs": response.max_pcrs,
                    "locked_pcrs": sorted(response.locked_pcrs),
                    "digest": response.digest,
                }
            }
        case AttestationResponse(document=document):
            obj = {"Attestation": {"document": bytes(document)}}
        case GetRandomResponse(random=random):
            obj = {"GetRandom": {"random": bytes(random)}}
        case ErrorResponse(code=code):
            obj = {"Error": code}
        case _:  # pragma: no cover - exhaustive over Response
            raise TypeError(f"not an NSM response: {response!r}")
    return cbor2.dumps(obj)


def _opt_bytes(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


# --- decoding ------------------------------------------------------------------------------


def _loads(data: bytes, limit: int) -> Any:
    if len(data) > limit:
        raise MessageError("InputTooLarge", f"message of {len(data)} bytes exceeds {limit}")
    try:
        return cbor2.loads(data, max_depth=_MAX_DEPTH, allow_duplicate_keys=False)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise MessageError("InvalidOperation", f"undecodable CBOR: {exc}") from exc


def _split(obj: Any) -> tuple[str, Mapping[str, Any] | None]:
    """Split an externally tagged enum value into (variant name, fields or None for units)."""
    if isinstance(obj, str):
        return obj, None
    if isinstance(obj, Mapping) and len(obj) == 1:
        ((name, fields),) = obj.items()
        if isinstance(name, str):
            if isinstance(fields, Mapping):
                return name, fields
            if name == "Error":
                return name, {"code": fields}
    raise MessageError("InvalidOperation", "not an externally tagged NSM enum value")


def _field(fields: Mapping[str, Any] | None, name: str) -> Any:
    if fields is None or name not in fields:
        raise MessageError("InvalidArgument", f"missing field {name!r}")
    return fields[name]


def _u16(fields: Mapping[str, Any] | None, name: str) -> int:
    value = _field(fields, name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U16_MAX:
        raise MessageError("InvalidArgument", f"field {name!r} must be a u16")
    return value


def _bytes(value: Any, name: str) -> bytes:
    # QEMU's decoder also takes text strings where serde_bytes are expected.
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise MessageError("InvalidArgument", f"field {name!r} must be a byte string")


def _opt_field(fields: Mapping[str, Any] | None, name: str) -> bytes | None:
    if fields is None:
        return None
    value = fields.get(name)
    return None if value is None else _bytes(value, name)


def decode_request(data: bytes) -> Request:
    """Decode a request; raises :class:`MessageError` carrying the NSM error name to answer."""
    name, fields = _split(_loads(data, NSM_REQUEST_MAX_SIZE))
    match name, fields is None:
        case "DescribeNSM", True:
            return DescribeNSM()
        case "GetRandom", True:
            return GetRandom()
        case "DescribePCR", False:
            return DescribePCR(_u16(fields, "index"))
        case "ExtendPCR", False:
            return ExtendPCR(_u16(fields, "index"), _bytes(_field(fields, "data"), "data"))
        case "LockPCR", False:
            return LockPCR(_u16(fields, "index"))
        case "LockPCRs", False:
            return LockPCRs(_u16(fields, "range"))
        case "Attestation", False:
            return Attestation(
                user_data=_opt_field(fields, "user_data"),
                nonce=_opt_field(fields, "nonce"),
                public_key=_opt_field(fields, "public_key"),
            )
    raise MessageError("InvalidOperation", f"unknown request {name!r}")


def decode_response(data: bytes) -> Response:
    """Decode a device response.

    Raises:
        MessageError: with code ``"InternalError"`` when the response is oversized or malformed
            (the nsm-api driver maps an undecodable response to ``InternalError``).
    """
    try:
        return _decode_response(data)
    except MessageError as exc:
        raise MessageError("InternalError", f"bad NSM response: {exc}") from exc


def _decode_response(data: bytes) -> Response:
    name, fields = _split(_loads(data, NSM_RESPONSE_MAX_SIZE))
    if fields is None:
        if name == "LockPCR":
            return LockPCRResponse()
        if name == "LockPCRs":
            return LockPCRsResponse()
        raise MessageError("InvalidResponse", f"unknown unit response {name!r}")
    match name:
        case "Error":
            code = fields.get("code")
            if not isinstance(code, str) or code not in NSM_ERROR_NAMES:
                raise MessageError("InvalidResponse", "unknown NSM error code")
            return ErrorResponse(code)
        case "DescribePCR":
            lock = _field(fields, "lock")
            if not isinstance(lock, bool):
                raise MessageError("InvalidResponse", "lock must be a bool")
            return DescribePCRResponse(lock, _bytes(_field(fields, "data"), "data"))
        case "ExtendPCR":
            return ExtendPCRResponse(_bytes(_field(fields, "data"), "data"))
        case "Attestation":
            return AttestationResponse(_bytes(_field(fields, "document"), "document"))
        case "GetRandom":
            return GetRandomResponse(_bytes(_field(fields, "random"), "random"))
        case "DescribeNSM":
            locked = _field(fields, "locked_pcrs")
            if not isinstance(locked, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in locked
            ):
                raise MessageError("InvalidResponse", "locked_pcrs must be a list of ints")
            module_id = _field(fields, "module_id")
            digest = _field(fields, "digest")
            if not isinstance(module_id, str) or not isinstance(digest, str):
                raise MessageError("InvalidResponse", "module_id and digest must be text")
            return DescribeNSMResponse(
                version_major=_u16(fields, "version_major"),
                version_minor=_u16(fields, "version_minor"),
                version_patch=_u16(fields, "version_patch"),
                module_id=module_id,
                max_pcrs=_u16(fields, "max_pcrs"),
                locked_pcrs=tuple(locked),
                digest=digest,
            )
    raise MessageError("InvalidResponse", f"unknown response {name!r}")
