"""The CiphertextBlob of a KMS key in an external key store: double encryption (pure).

AWS ("Double encryption", KMS developer guide, external key stores): each KMS key in an
external key store has two keys, key material that KMS generates and keeps, and the owner's
external key in its key manager. Data is encrypted first by KMS with the KMS key material, then
by the external key manager (through the XKS proxy) with the external key; decryption runs the
other way round. So a ciphertext is never weaker than a standard KMS key's, and it cannot be
opened without the owner's proxy answering *now*. The construction here::

    H      = 0x02 ‖ len(key id) as 1 byte ‖ key id (ASCII) ‖ material version as u32 BE
    AADin  = H ‖ encode_context(EncryptionContext)          (kms.ciphertext's canonical form)
    inner  = nonce(12) ‖ AES-256-GCM(KMS material, plaintext, AADin) ‖ tag(16)
    AADout = H ‖ SHA-256(encode_context(EncryptionContext))
    proxy Encrypt(externalKeyId, plaintext = inner, additionalAuthenticatedData = AADout)
        -> iv, ciphertextMetadata, ciphertext, authenticationTag (+ CDIV, checked by the client)

and the blob KMS returns (the spec: "KMS will embed all of the fields in the XKS Proxy's encrypt
response into the ciphertextBlob")::

    offset    size  field
    0         1     format version = 0x02 (the symmetric blob of kms.ciphertext is 0x01)
    1         1     n = length of the key id
    2         n     key id, ASCII
    2+n       4     KMS key material version, big-endian u32 (1: keys in custom key stores
                    do not rotate)
    6+n       1     v = length of the proxy's IV (12 or 16)
    7+n       1     m = length of the proxy's ciphertextMetadata (0..20)
    8+n       v     the proxy's IV
    8+n+v     m     ciphertextMetadata
    8+n+v+m   16    the proxy's authentication tag
    24+n+v+m  rest  the proxy's ciphertext (as long as ``inner``: GCM)

Bytes 0 .. 6+n are ``H``. The encryption context is bound by both layers: exactly, by the KMS
layer; through its digest, by the external key (the proxy's AES-GCM tag covers AADout), so a
wrong context fails in the owner's key manager before KMS's own material is ever used. The
digest keeps AADout at ``H`` + 32 bytes whatever the context's size (a context may be 8192
characters, up to four UTF-8 bytes each; the spec only promises that a proxy takes 8192 bytes
of AAD). The proxy's IV, metadata and tag are authenticated by its own AES-GCM; their lengths
are fixed by them.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .. import _wrap
from ..ciphertext import MAX_BLOB_BYTES, encode_context
from ..errors import CiphertextFormatError
from ..xks.codec import IV_SIZES, MAX_CIPHERTEXT_METADATA_BYTES, TAG_SIZE, EncryptResult

__all__ = [
    "FORMAT_VERSION",
    "INNER_OVERHEAD",
    "XksBlob",
    "header",
    "inner_aad",
    "outer_aad",
    "assemble",
    "parse",
    "is_external_blob",
]

FORMAT_VERSION: Final = 2
#: Bytes the KMS layer adds to a plaintext: its nonce and its tag.
INNER_OVERHEAD: Final = _wrap.GCM_NONCE_BYTES + _wrap.GCM_TAG_BYTES
_U32 = struct.Struct(">I")
#: The smallest blob: a one-byte key id, a 12-byte IV, no metadata, the tag, an inner layer
#: around an empty plaintext.
_MIN_BLOB = 2 + 1 + 4 + 2 + min(IV_SIZES) + TAG_SIZE + INNER_OVERHEAD


@dataclass(frozen=True, slots=True)
class XksBlob:
    """A parsed external-key-store blob."""

    key_id: str
    key_version: int
    #: ``H``: the exact header bytes (part of both AADs).
    header: bytes
    iv: bytes
    ciphertext_metadata: bytes
    tag: bytes
    #: The proxy's ciphertext (the encrypted inner layer).
    ciphertext: bytes


def header(key_id: str, key_version: int) -> bytes:
    """``H`` for a key and its material version."""
    raw = key_id.encode("ascii")
    if not 1 <= len(raw) <= 255:
        raise ValueError("key id must be 1..255 ASCII bytes")
    return bytes([FORMAT_VERSION, len(raw)]) + raw + _U32.pack(key_version)


def inner_aad(head: bytes, context: Mapping[str, str] | None) -> bytes:
    """The AAD of the KMS layer: ``H`` and the whole canonical context."""
    return head + encode_context(context)


def outer_aad(head: bytes, context: Mapping[str, str] | None) -> bytes:
    """The AAD sent to the proxy: ``H`` and the SHA-256 of the canonical context."""
    return head + hashlib.sha256(encode_context(context)).digest()


def assemble(head: bytes, result: EncryptResult) -> bytes:
    """The blob from ``H`` and the proxy's Encrypt answer (its sizes already checked by the
    client).

    Raises:
        ValueError: an answer the format cannot hold (a bug of the caller's checks).
    """
    if (
        len(result.iv) not in IV_SIZES
        or len(result.ciphertext_metadata) > MAX_CIPHERTEXT_METADATA_BYTES
        or len(result.tag) != TAG_SIZE
    ):
        raise ValueError("proxy answer outside the XKS sizes")
    blob = b"".join(
        (
            head,
            bytes([len(result.iv), len(result.ciphertext_metadata)]),
            result.iv,
            result.ciphertext_metadata,
            result.tag,
            result.ciphertext,
        )
    )
    if len(blob) > MAX_BLOB_BYTES:
        raise ValueError("blob longer than a CiphertextBlob may be")
    return blob


def is_external_blob(blob: bytes) -> bool:
    """Whether ``blob`` claims this format (its first byte)."""
    return len(blob) > 0 and blob[0] == FORMAT_VERSION


def parse(blob: bytes) -> XksBlob:
    """Read a blob. Raises :class:`CiphertextFormatError` (opaque) if it is not one."""
    if not _MIN_BLOB <= len(blob) <= MAX_BLOB_BYTES or blob[0] != FORMAT_VERSION:
        raise CiphertextFormatError("not an external key store ciphertext")
    n = blob[1]
    end = 2 + n + 4
    if n == 0 or len(blob) < end + 2:
        raise CiphertextFormatError("not an external key store ciphertext")
    try:
        key_id = blob[2 : 2 + n].decode("ascii")
    except UnicodeDecodeError:
        raise CiphertextFormatError("not an external key store ciphertext") from None
    (version,) = _U32.unpack_from(blob, 2 + n)
    v, m = blob[end], blob[end + 1]
    if v not in IV_SIZES or m > MAX_CIPHERTEXT_METADATA_BYTES:
        raise CiphertextFormatError("not an external key store ciphertext")
    at = end + 2
    iv, at = blob[at : at + v], at + v
    metadata, at = blob[at : at + m], at + m
    tag, at = blob[at : at + TAG_SIZE], at + TAG_SIZE
    body = blob[at:]
    if len(tag) != TAG_SIZE or len(body) < INNER_OVERHEAD:
        raise CiphertextFormatError("not an external key store ciphertext")
    return XksBlob(key_id, version, bytes(blob[:end]), iv, metadata, tag, body)
