"""The symmetric CiphertextBlob format of this KMS (pure; crypto via :mod:`kms._wrap`).

AWS's format is opaque and undocumented (nitro.md §6.5); ours is documented so it can be
inspected and tested::

    offset  size  field
    0       1     format version = 0x01
    1       1     n = length of the key id (36 for a UUID key id)
    2       n     key id, ASCII (the UUID, not the ARN: region/account come from the daemon)
    2+n     4     key material version, big-endian u32 (rotation adds versions)
    6+n     12    AES-GCM nonce (random)
    18+n    m+16  AES-256-GCM(key material[version], plaintext) ‖ tag

AAD = bytes 0 .. 6+n (the header: a blob cannot be re-labelled to another key or version) ‖
the canonical encoding of the EncryptionContext::

    u32 count ‖ for each pair sorted by the UTF-8 bytes of the key:
        u32 len(key) ‖ key (UTF-8) ‖ u32 len(value) ‖ value (UTF-8)

so the context is bound exactly (order-independent, unambiguous) and a wrong or missing context
fails authentication like a tampered blob does.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from . import _wrap
from .errors import CiphertextFormatError

__all__ = [
    "FORMAT_VERSION",
    "MAX_BLOB_BYTES",
    "BlobHeader",
    "encode_context",
    "parse_header",
    "seal",
    "open_blob",
]

FORMAT_VERSION = 1
#: AWS's CiphertextBlob limit.
MAX_BLOB_BYTES = 6144
_U32 = struct.Struct(">I")
_HEADER_MIN = 2 + 1 + 4 + _wrap.GCM_NONCE_BYTES + _wrap.GCM_TAG_BYTES


@dataclass(frozen=True, slots=True)
class BlobHeader:
    """The clear part of a blob: which key and version sealed it."""

    key_id: str
    key_version: int
    header: bytes  # the exact header bytes (part of the AAD)
    body: bytes  # nonce ‖ ciphertext ‖ tag


def encode_context(context: Mapping[str, str] | None) -> bytes:
    """Canonical, sorted, length-prefixed encoding of an EncryptionContext."""
    items = sorted(
        ((k.encode("utf-8"), v.encode("utf-8")) for k, v in (context or {}).items()),
        key=lambda kv: kv[0],
    )
    out = [_U32.pack(len(items))]
    for k, v in items:
        out += [_U32.pack(len(k)), k, _U32.pack(len(v)), v]
    return b"".join(out)


def _header(key_id: str, key_version: int) -> bytes:
    raw = key_id.encode("ascii")
    if not 1 <= len(raw) <= 255:
        raise ValueError("key id must be 1..255 ASCII bytes")
    return bytes([FORMAT_VERSION, len(raw)]) + raw + _U32.pack(key_version)


def seal(
    aead: _wrap.Aead,
    key_id: str,
    key_version: int,
    plaintext: bytes,
    context: Mapping[str, str] | None,
) -> bytes:
    """Encrypt ``plaintext`` under one key version, binding ``context``."""
    header = _header(key_id, key_version)
    return header + aead.seal(plaintext, header + encode_context(context))


def parse_header(blob: bytes) -> BlobHeader:
    """Read the clear header. Raises :class:`CiphertextFormatError` if malformed."""
    if not _HEADER_MIN <= len(blob) <= MAX_BLOB_BYTES or blob[0] != FORMAT_VERSION:
        raise CiphertextFormatError("not a ciphertext of this KMS")
    n = blob[1]
    end = 2 + n + 4
    if len(blob) < end + _wrap.GCM_NONCE_BYTES + _wrap.GCM_TAG_BYTES:
        raise CiphertextFormatError("not a ciphertext of this KMS")
    try:
        key_id = blob[2 : 2 + n].decode("ascii")
    except UnicodeDecodeError:
        raise CiphertextFormatError("not a ciphertext of this KMS") from None
    (version,) = _U32.unpack_from(blob, 2 + n)
    return BlobHeader(key_id, version, bytes(blob[:end]), bytes(blob[end:]))


def open_blob(aead: _wrap.Aead, header: BlobHeader, context: Mapping[str, str] | None) -> bytes:
    """Decrypt a parsed blob with its key version's AEAD; opaque error on any mismatch."""
    return aead.open(header.body, header.header + encode_context(context))
