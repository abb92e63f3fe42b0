"""The sealed model format: an ONNX model envelope-encrypted under a KMS data key.

Theory of operation
-------------------
A sealed file is::

    PREFIX (8 bytes "ERSEALv1") | header length (u32 big-endian) | header (CBOR map) | body

The **header** (canonical CBOR, every field bounded on read) names the KMS key and carries the
KMS ``CiphertextBlob`` of the data key, the encryption context it was generated under, the model
name, the SHA-384 of the plaintext model, the chunk size, the total size and a random 32-byte
salt. Nothing in it is secret: ``enclave model inspect`` prints it without any key.

The **body** is the model cut into ``chunk_size`` pieces (the last may be shorter; an empty model
is one empty chunk), each sealed with AES-256-GCM under a per-file key::

    file_key = HKDF-SHA384(data_key, salt=header.salt, info="enclave-runtime sealed-model v1")
    nonce_i  = final_i (1 byte) | 0x000000 | i (u64 big-endian)
    aad_i    = SHA-384(PREFIX | length | header) | i (u64) | final_i (1 byte)

so every chunk is bound to the exact header bytes (editing any header field breaks every chunk),
to its position (reordering and swapping chunks between files fail: another file has another
salt and header hash), and the last chunk says it is last (truncation at a chunk boundary fails,
as does appending). Chunk ciphertext lengths follow from ``total_size`` and ``chunk_size``, so
the reader never trusts a length it has not bounded, and memory stays at one chunk whatever the
model size. After the last chunk the reader checks the SHA-384 of the plaintext against the
header (a second, independent check) and that the file ends there.

Nonces are never reused: the file key is fresh per file (random salt), and within a file the
nonce is the chunk index.

This module is pure (file objects in, file objects out, no KMS, no trio).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from models.errors import SealedFormatError, SealedIntegrityError

__all__ = [
    "PREFIX",
    "MAGIC",
    "FORMAT_VERSION",
    "DEFAULT_CHUNK_SIZE",
    "SealedHeader",
    "new_header",
    "seal_stream",
    "iter_unseal",
    "unseal_bytes",
    "Unsealer",
    "read_header",
    "sha384_file",
    "ProgressCallback",
]

#: File prefix, for sniffing (``file(1)``-style) before parsing anything.
PREFIX: Final = b"ERSEALv1"
#: Magic string inside the CBOR header.
MAGIC: Final = "enclave-runtime/sealed-model"
#: Format version (bumped on any incompatible change).
FORMAT_VERSION: Final = 1
#: Default plaintext bytes per chunk: 1 MiB amortises the 16-byte tag and per-call cost while
#: keeping memory small.
DEFAULT_CHUNK_SIZE: Final = 1 << 20
#: Smallest / largest accepted chunk size (bytes). 16 MiB bounds the reader's one allocation.
MIN_CHUNK_SIZE: Final = 1 << 10
MAX_CHUNK_SIZE: Final = 16 << 20
#: Largest accepted model (bytes): protobuf caps a single ONNX file at 2 GiB.
MAX_MODEL_SIZE: Final = 2 << 30
#: Largest accepted CBOR header (bytes); a real one is ~1 KiB (the data key blob dominates).
MAX_HEADER_SIZE: Final = 64 << 10
#: Field bounds (a KMS CiphertextBlob is a few hundred bytes; AWS key ARNs < 2048 chars).
MAX_BLOB_SIZE: Final = 8 << 10
MAX_KEY_ID_LEN: Final = 2048
MAX_NAME_LEN: Final = 128
MAX_CONTEXT_ENTRIES: Final = 32
MAX_CONTEXT_STR_LEN: Final = 1024
SALT_SIZE: Final = 32
DATA_KEY_SIZE: Final = 32  # AES-256 data key from GenerateDataKey(KeySpec=AES_256)
TAG_SIZE: Final = 16
DIGEST_SIZE: Final = 48  # SHA-384
_LEN: Final = struct.Struct(">I")
_HKDF_INFO: Final = b"enclave-runtime sealed-model v1"

#: Called with (bytes done, bytes total) as sealing/unsealing progresses.
ProgressCallback = Callable[[int, int], None]

_HEADER_FIELDS: Final = frozenset(
    {
        "magic",
        "version",
        "key_id",
        "encrypted_data_key",
        "encryption_context",
        "model_name",
        "model_sha384",
        "chunk_size",
        "total_size",
        "salt",
        "aead",
        "kdf",
    }
)


@dataclass(frozen=True, slots=True)
class SealedHeader:
    """The authenticated, non-secret header of a sealed model."""

    key_id: str
    encrypted_data_key: bytes
    model_name: str
    model_sha384: bytes
    total_size: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    encryption_context: Mapping[str, str] = field(default_factory=dict)
    salt: bytes = b""
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_header(self)

    @property
    def chunk_count(self) -> int:
        """Number of body chunks (an empty model is one empty chunk)."""
        return max(1, -(-self.total_size // self.chunk_size))

    def to_cbor(self) -> bytes:
        """Canonical CBOR encoding (deterministic, so equal headers give equal bytes)."""
        return cbor2.dumps(
            {
                "magic": MAGIC,
                "version": self.version,
                "key_id": self.key_id,
                "encrypted_data_key": bytes(self.encrypted_data_key),
                "encryption_context": dict(self.encryption_context),
                "model_name": self.model_name,
                "model_sha384": bytes(self.model_sha384),
                "chunk_size": self.chunk_size,
                "total_size": self.total_size,
                "salt": bytes(self.salt),
                "aead": "AES-256-GCM",
                "kdf": "HKDF-SHA384",
            },
            canonical=True,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly view (binary fields in hex, the blob in base64) for ``inspect``."""
        import base64

        return {
            "magic": MAGIC,
            "format_version": self.version,
            "key_id": self.key_id,
            "encrypted_data_key": base64.b64encode(self.encrypted_data_key).decode(),
            "encryption_context": dict(self.encryption_context),
            "model_name": self.model_name,
            "model_sha384": self.model_sha384.hex(),
            "chunk_size": self.chunk_size,
            "total_size": self.total_size,
            "chunk_count": self.chunk_count,
            "salt": self.salt.hex(),
            "aead": "AES-256-GCM",
            "kdf": "HKDF-SHA384",
        }

    @classmethod
    def from_cbor(cls, data: bytes) -> SealedHeader:
        """Parse and bound-check a header (raises :class:`SealedFormatError`)."""
        try:
            obj = cbor2.loads(data, max_depth=4, allow_duplicate_keys=False)
        except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as exc:
            raise SealedFormatError("sealed header is not valid CBOR") from exc
        if not isinstance(obj, dict):
            raise SealedFormatError("sealed header is not a CBOR map")
        if set(obj) != _HEADER_FIELDS:
            raise SealedFormatError("sealed header has missing or unknown fields")
        if obj["magic"] != MAGIC:
            raise SealedFormatError("not a sealed model (bad magic)")
        if obj["version"] != FORMAT_VERSION:
            raise SealedFormatError(f"unsupported sealed format version {obj['version']!r}")
        if obj["aead"] != "AES-256-GCM" or obj["kdf"] != "HKDF-SHA384":
            raise SealedFormatError("unsupported sealed model algorithms")
        ctx = obj["encryption_context"]
        if not isinstance(ctx, dict):
            raise SealedFormatError("encryption_context must be a map")
        try:
            return cls(
                key_id=obj["key_id"],
                encrypted_data_key=obj["encrypted_data_key"],
                model_name=obj["model_name"],
                model_sha384=obj["model_sha384"],
                total_size=obj["total_size"],
                chunk_size=obj["chunk_size"],
                encryption_context=ctx,
                salt=obj["salt"],
                version=obj["version"],
            )
        except (TypeError, ValueError) as exc:
            raise SealedFormatError(f"invalid sealed header: {exc}") from exc


def _check_header(h: SealedHeader) -> None:
    def bad(msg: str) -> SealedFormatError:
        return SealedFormatError(f"invalid sealed header: {msg}")

    if not isinstance(h.key_id, str) or not 0 < len(h.key_id) <= MAX_KEY_ID_LEN:
        raise bad("key_id")
    if not isinstance(h.encrypted_data_key, bytes) or not 0 < len(h.encrypted_data_key) <= (
        MAX_BLOB_SIZE
    ):
        raise bad("encrypted_data_key")
    if not isinstance(h.model_name, str) or not 0 < len(h.model_name) <= MAX_NAME_LEN:
        raise bad("model_name")
    if not isinstance(h.model_sha384, bytes) or len(h.model_sha384) != DIGEST_SIZE:
        raise bad("model_sha384")
    if type(h.chunk_size) is not int or not MIN_CHUNK_SIZE <= h.chunk_size <= MAX_CHUNK_SIZE:
        raise bad("chunk_size")
    if type(h.total_size) is not int or not 0 <= h.total_size <= MAX_MODEL_SIZE:
        raise bad("total_size")
    if not isinstance(h.salt, bytes) or len(h.salt) != SALT_SIZE:
        raise bad("salt")
    ctx = h.encryption_context
    if len(ctx) > MAX_CONTEXT_ENTRIES:
        raise bad("encryption_context has too many entries")
    for k, v in ctx.items():
        if not (isinstance(k, str) and isinstance(v, str)):
            raise bad("encryption_context must map strings to strings")
        if not (0 < len(k) <= MAX_CONTEXT_STR_LEN and len(v) <= MAX_CONTEXT_STR_LEN):
            raise bad("encryption_context entry too long")


# --- body crypto ------------------------------------------------------------------------------


def _file_aead(data_key: bytes, salt: bytes) -> AESGCM:
    if not isinstance(data_key, bytes) or len(data_key) != DATA_KEY_SIZE:
        raise ValueError("data key must be 32 bytes")
    key = HKDF(algorithm=hashes.SHA384(), length=32, salt=salt, info=_HKDF_INFO).derive(data_key)
    return AESGCM(key)


def _nonce(index: int, final: bool) -> bytes:
    return bytes([1 if final else 0, 0, 0, 0]) + index.to_bytes(8, "big")


def _aad(header_hash: bytes, index: int, final: bool) -> bytes:
    return header_hash + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


def _framed_header(header: SealedHeader) -> bytes:
    raw = header.to_cbor()
    return PREFIX + _LEN.pack(len(raw)) + raw


def _read_exact(reader: BinaryIO, n: int) -> bytes:
    """Read exactly ``n`` bytes or raise (a short file is a truncation)."""
    buf = bytearray()
    while len(buf) < n:
        piece = reader.read(n - len(buf))
        if not piece:
            raise SealedIntegrityError("sealed model is truncated")
        buf += piece
    return bytes(buf)


# --- public API -------------------------------------------------------------------------------


def sha384_file(reader: BinaryIO, *, limit: int = MAX_MODEL_SIZE) -> tuple[bytes, int]:
    """SHA-384 and size of everything ``reader`` yields, in bounded memory."""
    h = hashlib.sha384()
    size = 0
    while piece := reader.read(DEFAULT_CHUNK_SIZE):
        size += len(piece)
        if size > limit:
            raise SealedFormatError(f"model is larger than {limit} bytes")
        h.update(piece)
    return h.digest(), size


def seal_stream(
    reader: BinaryIO,
    writer: BinaryIO,
    *,
    data_key: bytes,
    header: SealedHeader,
    progress: ProgressCallback | None = None,
) -> None:
    """Write the sealed form of ``reader``'s bytes to ``writer``.

    ``header`` must already carry the plaintext's SHA-384 and size (a first pass with
    :func:`sha384_file`) and a fresh random salt (:meth:`new_header` does both defaults). The
    plaintext is re-hashed while sealing; if it changed between the passes, sealing fails.

    Raises:
        SealedFormatError: the input does not match ``header`` (size or digest changed).
        ValueError: ``data_key`` is not 32 bytes.
    """
    framed = _framed_header(header)
    header_hash = hashlib.sha384(framed).digest()
    aead = _file_aead(data_key, header.salt)
    writer.write(framed)
    digest = hashlib.sha384()
    done = 0
    count = header.chunk_count
    for index in range(count):
        want = min(header.chunk_size, header.total_size - done)
        piece = reader.read(want) if want else b""
        while len(piece) < want:
            more = reader.read(want - len(piece))
            if not more:
                raise SealedFormatError("model file shrank while sealing")
            piece += more
        final = index == count - 1
        digest.update(piece)
        writer.write(aead.encrypt(_nonce(index, final), piece, _aad(header_hash, index, final)))
        done += len(piece)
        if progress is not None:
            progress(done, header.total_size)
    if reader.read(1):
        raise SealedFormatError("model file grew while sealing")
    if not hmac.compare_digest(digest.digest(), header.model_sha384):
        raise SealedFormatError("model file changed while sealing (digest mismatch)")


def new_header(
    *,
    key_id: str,
    encrypted_data_key: bytes,
    model_name: str,
    model_sha384: bytes,
    total_size: int,
    encryption_context: Mapping[str, str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SealedHeader:
    """A header with a fresh random salt."""
    return SealedHeader(
        key_id=key_id,
        encrypted_data_key=encrypted_data_key,
        model_name=model_name,
        model_sha384=model_sha384,
        total_size=total_size,
        chunk_size=chunk_size,
        encryption_context=dict(encryption_context or {}),
        salt=os.urandom(SALT_SIZE),
    )


def read_header(reader: BinaryIO) -> tuple[SealedHeader, bytes]:
    """Read and parse the header; returns it and the framed header bytes (for the AAD hash).

    No key is needed. Raises :class:`SealedFormatError` on anything malformed.
    """
    prefix = reader.read(len(PREFIX))
    if prefix != PREFIX:
        raise SealedFormatError("not a sealed model (bad file prefix)")
    raw_len = reader.read(_LEN.size)
    if len(raw_len) != _LEN.size:
        raise SealedFormatError("sealed model header is truncated")
    (length,) = _LEN.unpack(raw_len)
    if not 0 < length <= MAX_HEADER_SIZE:
        raise SealedFormatError(f"sealed header length {length} out of bounds")
    raw = reader.read(length)
    if len(raw) != length:
        raise SealedFormatError("sealed model header is truncated")
    header = SealedHeader.from_cbor(raw)
    if header.to_cbor() != raw:  # one encoding per header: no malleable re-encodings
        raise SealedFormatError("sealed header is not canonically encoded")
    return header, prefix + raw_len + raw


def iter_unseal(
    reader: BinaryIO,
    data_key: bytes,
    *,
    header: tuple[SealedHeader, bytes] | None = None,
    progress: ProgressCallback | None = None,
) -> Iterator[bytes]:
    """Yield the plaintext chunks of a sealed model, authenticating each.

    Chunks are yielded as they authenticate, but the file as a whole is only valid once the
    iterator finishes without error (the digest and end-of-file checks come last): a consumer must
    discard what it received if iteration raises.

    Args:
        reader: the sealed file, positioned at its start (or just after the header when
            ``header`` is given, as returned by :func:`read_header`).
        data_key: the 32-byte plaintext data key.

    Raises:
        SealedFormatError: malformed header.
        SealedIntegrityError: wrong key, tampered or truncated body, trailing data, digest
            mismatch.
    """
    parsed, framed = header if header is not None else read_header(reader)
    header_hash = hashlib.sha384(framed).digest()
    aead = _file_aead(data_key, parsed.salt)
    digest = hashlib.sha384()
    done = 0
    count = parsed.chunk_count
    for index in range(count):
        plain_len = min(parsed.chunk_size, parsed.total_size - done)
        sealed = _read_exact(reader, plain_len + TAG_SIZE)
        final = index == count - 1
        try:
            piece = aead.decrypt(_nonce(index, final), sealed, _aad(header_hash, index, final))
        except InvalidTag:
            raise SealedIntegrityError() from None
        digest.update(piece)
        done += len(piece)
        if progress is not None:
            progress(done, parsed.total_size)
        if final:
            if reader.read(1):
                raise SealedIntegrityError("sealed model has trailing data")
            if not hmac.compare_digest(digest.digest(), parsed.model_sha384):
                raise SealedIntegrityError("sealed model digest mismatch")
        yield piece


class Unsealer:
    """Incremental unsealing, sans-IO: the sealed file's bytes go in as pieces of any size, the
    plaintext comes out in ONE buffer of the model's size, written in place.

    Why: a model of 90 MB must not be held three times over while it is unsealed (the sealed
    file, a list of plaintext chunks, their join). Here the sealed bytes are consumed as they
    arrive (at most one partial chunk is kept back, under ``chunk_size + 16`` bytes) and every
    chunk is authenticated and decrypted straight into its place in the plaintext buffer
    (``AESGCM.decrypt_into``): the process holds the plaintext once, plus one chunk.

    Use::

        u = Unsealer()
        rest = u.feed_header(piece)        # None until the whole header arrived
        ...                                # the header names the key: get it (KMS)
        u.start(data_key)
        u.feed(rest); u.feed(next_piece)   # pieces of any size
        header, plaintext = u.finish()     # plaintext: bytearray of header.total_size

    The plaintext is valid only once :meth:`finish` returned: each chunk is authentic as it is
    written, but truncation and the whole-model digest are checked at the end. On any error the
    buffer is wiped (:meth:`abort`; the errors below call it themselves).

    Raises (from the methods):
        SealedFormatError: malformed or oversized header, a method called out of order.
        SealedIntegrityError: wrong key, tampered, reordered, truncated or extended body,
            digest mismatch.
    """

    def __init__(self, *, progress: ProgressCallback | None = None) -> None:
        self._head = bytearray()
        self._header: SealedHeader | None = None
        self._framed = b""
        self._progress = progress
        self._aead: AESGCM | None = None
        self._header_hash = b""
        self._out = bytearray()
        self._view = memoryview(self._out)
        self._partial = bytearray()
        self._digest = hashlib.sha384()
        self._index = 0
        self._done = 0

    @property
    def header(self) -> SealedHeader | None:
        """The parsed header once :meth:`feed_header` completed it (None before)."""
        return self._header

    def feed_header(self, data: bytes | bytearray | memoryview) -> memoryview | None:
        """Take header bytes from ``data``; return the rest of ``data`` (possibly empty) once
        the header is complete and parsed, ``None`` while more bytes are needed.

        Only the header's own bytes are copied (at most 12 + :data:`MAX_HEADER_SIZE`).
        """
        if self._header is not None:
            raise SealedFormatError("the header is already complete")
        view = memoryview(data).cast("B")
        fixed = len(PREFIX) + _LEN.size
        if len(self._head) < fixed:
            take = fixed - len(self._head)
            self._head += view[:take]
            view = view[take:]
            if not PREFIX.startswith(bytes(self._head[: len(PREFIX)])):
                raise SealedFormatError("not a sealed model (bad file prefix)")
            if len(self._head) < fixed:
                return None
        (length,) = _LEN.unpack_from(self._head, len(PREFIX))
        if not 0 < length <= MAX_HEADER_SIZE:
            raise SealedFormatError(f"sealed header length {length} out of bounds")
        take = fixed + length - len(self._head)
        self._head += view[:take]
        view = view[take:]
        if len(self._head) < fixed + length:
            return None
        self._header, self._framed = read_header(io.BytesIO(bytes(self._head)))
        self._head = bytearray()
        return view

    def start(self, data_key: bytes) -> None:
        """Set the data key (after the header) and allocate the plaintext buffer.

        Raises:
            SealedFormatError: the header is not complete yet, or ``start`` was already called.
            ValueError: ``data_key`` is not 32 bytes.
        """
        header = self._header
        if header is None or self._aead is not None:
            raise SealedFormatError("start() needs a complete header, once")
        self._aead = _file_aead(data_key, header.salt)
        self._header_hash = hashlib.sha384(self._framed).digest()
        self._out = bytearray(header.total_size)
        self._view = memoryview(self._out)

    def _chunk_len(self) -> int:
        """Sealed length of the next chunk (0 once every chunk is in)."""
        assert self._header is not None
        if self._index >= self._header.chunk_count:
            return 0
        return min(self._header.chunk_size, self._header.total_size - self._done) + TAG_SIZE

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Unseal the body bytes in ``data`` (any size; a partial chunk is kept for later)."""
        if self._aead is None:
            raise SealedFormatError("feed() before start(): the body needs the data key")
        view = memoryview(data).cast("B")
        try:
            if self._partial:
                need = self._chunk_len() - len(self._partial)
                self._partial += view[:need]
                view = view[need:]
                if len(self._partial) < self._chunk_len():
                    return
                self._open_chunk(memoryview(self._partial))
                self._partial = bytearray()
            while view:
                size = self._chunk_len()
                if size == 0:
                    raise SealedIntegrityError("sealed model has trailing data")
                if len(view) < size:
                    self._partial += view
                    return
                self._open_chunk(view[:size])
                view = view[size:]
        except SealedIntegrityError:
            self.abort()
            raise

    def _open_chunk(self, sealed_chunk: memoryview) -> None:
        assert self._aead is not None
        assert self._header is not None
        index, count = self._index, self._header.chunk_count
        final = index == count - 1
        plain_len = len(sealed_chunk) - TAG_SIZE
        target = self._view[self._done : self._done + plain_len]
        try:
            self._aead.decrypt_into(
                _nonce(index, final), sealed_chunk, _aad(self._header_hash, index, final), target
            )
        except InvalidTag:
            raise SealedIntegrityError() from None
        self._digest.update(target)
        self._done += plain_len
        self._index += 1
        if self._progress is not None:
            self._progress(self._done, self._header.total_size)

    def finish(self) -> tuple[SealedHeader, bytearray]:
        """Check that the body was complete and the digest matches; return the plaintext.

        Raises:
            SealedIntegrityError: truncated body or digest mismatch (the buffer is wiped).
            SealedFormatError: called before :meth:`start`.
        """
        header = self._header
        if header is None or self._aead is None:
            raise SealedFormatError("finish() before start()")
        if self._partial or self._index != header.chunk_count:
            self.abort()
            raise SealedIntegrityError("sealed model is truncated")
        if not hmac.compare_digest(self._digest.digest(), header.model_sha384):
            self.abort()
            raise SealedIntegrityError("sealed model digest mismatch")
        self._view.release()
        out, self._out = self._out, bytearray()
        return header, out

    def abort(self) -> None:
        """Wipe and drop what was unsealed so far (plaintext of a file that is not valid)."""
        self._view[:] = bytes(len(self._view))
        self._view.release()
        self._out = bytearray()
        self._view = memoryview(self._out)
        self._partial = bytearray()


def unseal_bytes(
    data: bytes | bytearray | memoryview | BinaryIO,
    data_key: bytes,
    *,
    progress: ProgressCallback | None = None,
) -> tuple[SealedHeader, bytearray]:
    """Unseal a whole model into one buffer (the server needs the bytes for onnxruntime).

    ``data`` in memory is read in place (no copy of the sealed bytes); a file object is read in
    pieces of :data:`DEFAULT_CHUNK_SIZE`. The plaintext is written once (:class:`Unsealer`).
    """
    unsealer = Unsealer(progress=progress)
    if isinstance(data, bytes | bytearray | memoryview):
        rest = unsealer.feed_header(data)
        if rest is None:
            raise SealedFormatError("sealed model header is truncated")
        unsealer.start(data_key)
        unsealer.feed(rest)
        return unsealer.finish()
    rest = None
    while rest is None:
        piece = data.read(DEFAULT_CHUNK_SIZE)
        if not piece:
            raise SealedFormatError("sealed model header is truncated")
        rest = unsealer.feed_header(piece)
    unsealer.start(data_key)
    unsealer.feed(rest)
    while piece := data.read(DEFAULT_CHUNK_SIZE):
        unsealer.feed(piece)
    return unsealer.finish()
