"""The text model bundle: ONNX graph + tokenizer + config as ONE digested unit.

Theory of operation
-------------------
A text model is more than its graph: the tokenizer decides which ids reach it and the config
says how long a text may be and how the output is pooled. If the host could swap the tokenizer
beside an attested graph, it could change every answer without touching the measured model. So
the three travel as one file, sealed (``models.sealed``, unchanged) and digested as one unit: the
sealed header's SHA-384 and the PCR16 extension cover the whole bundle. A bundle is::

    PREFIX "ERBNDLv1" | header length (u32 big-endian) | header (canonical CBOR map) | members

    header = {"magic": "enclave-runtime/model-bundle", "version": 1,
              "config": {"kind": "sentence-embedding", "model_name": str,
                         "max_seq_length": int, "embedding_dim": int, "vocab_size": int,
                         "pooling": "mean", "normalize": bool},
              "members": [["tokenizer.json", size, sha384], ["model.onnx", size, sha384]]}

The members follow the header, raw, in that fixed order and nothing after them. Encoding is
deterministic (canonical CBOR, fixed order), so equal inputs give equal bytes and digests.

The reader is strict and bounded: the header length is capped before it is read; unknown,
missing or duplicate keys, non-canonical encodings, unknown or reordered members, sizes over
their caps or not adding up to the file's length exactly, and digests that differ are all
:class:`~models.text.errors.BundleFormatError`. Members are returned as ``memoryview`` slices of
the caller's buffer, so parsing a 90 MB bundle copies none of it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypedDict

import cbor2

from models.text.errors import BundleFormatError

__all__ = [
    "PREFIX",
    "MAGIC",
    "FORMAT_VERSION",
    "MEMBER_NAMES",
    "MAX_HEADER_SIZE",
    "MAX_ONNX_SIZE",
    "MAX_TOKENIZER_SIZE",
    "MAX_BUNDLE_SIZE",
    "BundleConfig",
    "BundleConfigMap",
    "ModelBundle",
    "encode_bundle",
    "decode_bundle",
    "read_bundle",
]

#: File prefix, for sniffing before parsing anything.
PREFIX: Final = b"ERBNDLv1"
#: Magic string inside the CBOR header.
MAGIC: Final = "enclave-runtime/model-bundle"
FORMAT_VERSION: Final = 1
#: The members, in file order: the small tokenizer first, the large graph last.
MEMBER_NAMES: Final = ("tokenizer.json", "model.onnx")
#: A real header is ~300 bytes; 16 KiB bounds the one allocation before the header is checked.
MAX_HEADER_SIZE: Final = 16 << 10
#: Graph cap: 1 GiB is ~11x MiniLM and well under protobuf's 2 GiB for one ONNX file (a bundle
#: carries no external-data files).
MAX_ONNX_SIZE: Final = 1 << 30
#: Tokenizer cap: BERT's is 0.5 MiB; large multilingual vocabularies reach ~10 MiB.
MAX_TOKENIZER_SIZE: Final = 16 << 20
MAX_BUNDLE_SIZE: Final = len(PREFIX) + 4 + MAX_HEADER_SIZE + MAX_ONNX_SIZE + MAX_TOKENIZER_SIZE
#: Config bounds: BERT-family position tables stop at 512..8192; vocabularies under 1M entries.
MAX_SEQ_LENGTH: Final = 8192
MAX_EMBEDDING_DIM: Final = 16384
MAX_VOCAB_SIZE: Final = 1 << 20
_MEMBER_CAPS: Final = {"tokenizer.json": MAX_TOKENIZER_SIZE, "model.onnx": MAX_ONNX_SIZE}
_LEN: Final = struct.Struct(">I")
_DIGEST_SIZE: Final = 48
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEADER_KEYS: Final = frozenset({"magic", "version", "config", "members"})
_CONFIG_KEYS: Final = frozenset(
    {"kind", "model_name", "max_seq_length", "embedding_dim", "vocab_size", "pooling", "normalize"}
)


class BundleConfigMap(TypedDict):
    """:class:`BundleConfig` in the bundle header's CBOR (and ``enclave model`` JSON) form."""

    kind: str
    model_name: str
    max_seq_length: int
    embedding_dim: int
    vocab_size: int
    pooling: str
    normalize: bool


@dataclass(frozen=True, slots=True)
class BundleConfig:
    """How to run the bundled model: what it is, its token cap, pooling and output width."""

    model_name: str
    max_seq_length: int
    embedding_dim: int
    vocab_size: int
    kind: str = "sentence-embedding"
    pooling: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        def bad(what: str) -> BundleFormatError:
            return BundleFormatError(f"bundle config: invalid {what}")

        if self.kind != "sentence-embedding":
            raise bad(f"kind {self.kind!r} (only 'sentence-embedding')")
        if self.pooling != "mean":
            raise bad(f"pooling {self.pooling!r} (only 'mean')")
        if type(self.normalize) is not bool:
            raise bad("normalize")
        if not isinstance(self.model_name, str) or not _NAME_RE.fullmatch(self.model_name):
            raise bad("model_name")
        for name, top in (
            ("max_seq_length", MAX_SEQ_LENGTH),
            ("embedding_dim", MAX_EMBEDDING_DIM),
            ("vocab_size", MAX_VOCAB_SIZE),
        ):
            value = getattr(self, name)
            if type(value) is not int or not 2 <= value <= top:
                raise bad(name)

    def to_map(self) -> BundleConfigMap:
        """The CBOR/JSON form."""
        return {
            "kind": self.kind,
            "model_name": self.model_name,
            "max_seq_length": self.max_seq_length,
            "embedding_dim": self.embedding_dim,
            "vocab_size": self.vocab_size,
            "pooling": self.pooling,
            "normalize": self.normalize,
        }

    @classmethod
    def from_map(cls, obj: object) -> BundleConfig:
        """Parse the CBOR form (exact keys; raises :class:`BundleFormatError`)."""
        if not isinstance(obj, dict) or set(obj) != _CONFIG_KEYS:
            raise BundleFormatError("bundle config has missing or unknown fields")
        try:
            return cls(**obj)
        except TypeError as exc:
            raise BundleFormatError(f"bundle config: {exc}") from None


@dataclass(frozen=True, slots=True)
class ModelBundle:
    """A parsed bundle. ``onnx`` and ``tokenizer_json`` are views into the parsed buffer."""

    config: BundleConfig
    onnx: memoryview
    tokenizer_json: memoryview
    onnx_sha384: bytes
    tokenizer_sha384: bytes

    def tokenizer_text(self) -> str:
        """``tokenizer.json`` as text (raises :class:`BundleFormatError` if not UTF-8)."""
        try:
            return str(self.tokenizer_json, "utf-8")
        except UnicodeDecodeError:
            raise BundleFormatError("tokenizer.json is not UTF-8") from None


def encode_bundle(config: BundleConfig, *, onnx: bytes, tokenizer_json: bytes) -> bytes:
    """The bundle's bytes (deterministic: same inputs, same bytes).

    Raises:
        BundleFormatError: a member is over its cap.
    """
    members = {"tokenizer.json": bytes(tokenizer_json), "model.onnx": bytes(onnx)}
    entries = []
    for name in MEMBER_NAMES:
        data = members[name]
        if len(data) > _MEMBER_CAPS[name]:
            raise BundleFormatError(f"{name} is larger than {_MEMBER_CAPS[name]} bytes")
        entries.append([name, len(data), hashlib.sha384(data).digest()])
    header = _encode_header(config, entries)
    return b"".join([PREFIX, _LEN.pack(len(header)), header, *(members[n] for n in MEMBER_NAMES)])


def decode_bundle(data: bytes | bytearray | memoryview) -> ModelBundle:
    """Parse and check a bundle held in memory, without copying its members.

    Raises:
        BundleFormatError: anything malformed (see the module docstring).
    """
    view = memoryview(data).cast("B")
    fixed = len(PREFIX) + _LEN.size
    if len(view) < fixed or bytes(view[: len(PREFIX)]) != PREFIX:
        raise BundleFormatError("not a model bundle (bad prefix)")
    (header_len,) = _LEN.unpack(view[len(PREFIX) : fixed])
    if header_len > MAX_HEADER_SIZE:
        raise BundleFormatError(f"bundle header is larger than {MAX_HEADER_SIZE} bytes")
    if len(view) < fixed + header_len:
        raise BundleFormatError("bundle is truncated (header)")
    raw = bytes(view[fixed : fixed + header_len])
    config, entries = _decode_header(raw)
    offset = fixed + header_len
    if len(view) != offset + sum(size for _, size, _ in entries):
        raise BundleFormatError("bundle size does not match its members (truncated or trailing)")
    slices: dict[str, memoryview] = {}
    digests: dict[str, bytes] = {}
    for name, size, digest in entries:
        member = view[offset : offset + size]
        if not hmac.compare_digest(hashlib.sha384(member).digest(), digest):
            raise BundleFormatError(f"bundle member {name} does not match its digest")
        slices[name], digests[name] = member, digest
        offset += size
    return ModelBundle(
        config=config,
        onnx=slices["model.onnx"],
        tokenizer_json=slices["tokenizer.json"],
        onnx_sha384=digests["model.onnx"],
        tokenizer_sha384=digests["tokenizer.json"],
    )


def read_bundle(path: Path, *, max_size: int = MAX_BUNDLE_SIZE) -> ModelBundle:
    """Read and parse a plaintext bundle file (its size bounded before it is read).

    Raises:
        BundleFormatError: the file is over ``max_size`` or malformed.
        OSError: it cannot be read.
    """
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size  # the file opened, not whatever the path names now
        if size > max_size:
            raise BundleFormatError(f"{path} is larger than {max_size} bytes")
        buf = bytearray(size)
        got = f.readinto(buf)
        if got != size or f.read(1):
            raise BundleFormatError(f"{path} changed while being read")
    return decode_bundle(buf)


def _encode_header(config: BundleConfig, entries: list[list[str | int | bytes]]) -> bytes:
    return cbor2.dumps(
        {"magic": MAGIC, "version": FORMAT_VERSION, "config": config.to_map(), "members": entries},
        canonical=True,
    )


def _decode_header(raw: bytes) -> tuple[BundleConfig, list[tuple[str, int, bytes]]]:
    try:
        obj = cbor2.loads(raw, max_depth=4, allow_duplicate_keys=False)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise BundleFormatError("bundle header is not valid CBOR") from None
    if not isinstance(obj, dict) or set(obj) != _HEADER_KEYS:
        raise BundleFormatError("bundle header has missing or unknown fields")
    if obj["magic"] != MAGIC:
        raise BundleFormatError("not a model bundle (bad magic)")
    if obj["version"] != FORMAT_VERSION:
        raise BundleFormatError(f"unsupported bundle version {obj['version']!r}")
    config = BundleConfig.from_map(obj["config"])
    members = obj["members"]
    if not isinstance(members, list) or len(members) != len(MEMBER_NAMES):
        raise BundleFormatError(f"bundle must hold exactly the members {list(MEMBER_NAMES)}")
    entries: list[tuple[str, int, bytes]] = []
    for want, entry in zip(MEMBER_NAMES, members, strict=True):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise BundleFormatError("bundle member entry is malformed")
        name, size, digest = entry
        if name != want:
            raise BundleFormatError(f"unexpected bundle member {name!r} (expected {want!r})")
        if type(size) is not int or not 0 <= size <= _MEMBER_CAPS[want]:
            raise BundleFormatError(f"bundle member {want} has an invalid size")
        if not isinstance(digest, bytes) or len(digest) != _DIGEST_SIZE:
            raise BundleFormatError(f"bundle member {want} has an invalid digest")
        entries.append((want, size, digest))
    if _encode_header(config, [list(e) for e in entries]) != raw:
        raise BundleFormatError("bundle header is not canonically encoded")
    return config, entries
