"""The model bundle: deterministic, round-trips, strict and bounded on bad input, seals as one."""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import sealed
from models.text.bundle import (
    MAGIC,
    MAX_HEADER_SIZE,
    PREFIX,
    BundleConfig,
    decode_bundle,
    encode_bundle,
    read_bundle,
)
from models.text.errors import BundleFormatError
from tests.models.minilm_support import minilm_bundle, minilm_bundle_path

CONFIG = BundleConfig(model_name="tiny", max_seq_length=16, embedding_dim=8, vocab_size=100)
ONNX = b"\x08\x08onnx-graph-bytes" * 10
TOKENIZER = b'{"version": "1.0", "model": {"type": "WordPiece"}}'


def sample() -> bytes:
    return encode_bundle(CONFIG, onnx=ONNX, tokenizer_json=TOKENIZER)


def _split(data: bytes) -> tuple[dict[str, object], int]:
    (n,) = struct.unpack(">I", data[8:12])
    return cbor2.loads(data[12 : 12 + n]), 12 + n


def _with_header(data: bytes, header: dict[str, object], *, canonical: bool = True) -> bytes:
    _, end = _split(data)
    raw = cbor2.dumps(header, canonical=canonical)
    return PREFIX + struct.pack(">I", len(raw)) + raw + data[end:]


def test_round_trip_and_determinism() -> None:
    data = sample()
    assert data == sample()
    assert data.startswith(PREFIX)
    b = decode_bundle(data)
    assert b.config == CONFIG
    assert bytes(b.onnx) == ONNX
    assert bytes(b.tokenizer_json) == TOKENIZER
    assert b.tokenizer_text() == TOKENIZER.decode()
    assert b.onnx_sha384 == hashlib.sha384(ONNX).digest()
    assert b.tokenizer_sha384 == hashlib.sha384(TOKENIZER).digest()


def test_members_are_views_not_copies() -> None:
    buf = bytearray(sample())
    b = decode_bundle(buf)
    assert isinstance(b.onnx, memoryview)
    assert b.onnx.obj is buf


@settings(max_examples=100, deadline=None)
@given(
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
    seq=st.integers(2, 8192),
    dim=st.integers(2, 4096),
    normalize=st.booleans(),
    onnx=st.binary(max_size=300),
    tok=st.binary(max_size=300),
)
def test_round_trip_any_valid_bundle(
    name: str, seq: int, dim: int, normalize: bool, onnx: bytes, tok: bytes
) -> None:
    config = BundleConfig(
        model_name=name, max_seq_length=seq, embedding_dim=dim, vocab_size=50, normalize=normalize
    )
    b = decode_bundle(encode_bundle(config, onnx=onnx, tokenizer_json=tok))
    assert (b.config, bytes(b.onnx), bytes(b.tokenizer_json)) == (config, onnx, tok)


def _header_cases() -> dict[str, object]:
    h, _ = _split(sample())
    cases: dict[str, object] = {}

    def case(name: str, **changes: object) -> None:
        cases[name] = {**h, **changes}

    case("bad magic", magic="something-else")
    case("future version", version=2)
    case("unknown field", extra=1)
    cases["missing field"] = {k: v for k, v in h.items() if k != "config"}
    case("config not a map", config=[1])
    case("config unknown key", config={**h["config"], "layers": 6})  # type: ignore[dict-item]
    case("config bad kind", config={**h["config"], "kind": "image"})  # type: ignore[dict-item]
    case("config bad pooling", config={**h["config"], "pooling": "cls"})  # type: ignore[dict-item]
    case("config seq too long", config={**h["config"], "max_seq_length": 10**6})  # type: ignore[dict-item]
    case("config bool as int", config={**h["config"], "max_seq_length": True})  # type: ignore[dict-item]
    case("config bad name", config={**h["config"], "model_name": "../etc/passwd"})  # type: ignore[dict-item]
    members = h["members"]
    case("members reordered", members=list(reversed(members)))  # type: ignore[call-overload]
    case("member missing", members=members[:1])  # type: ignore[index]
    case("member unknown", members=[members[0], ["weights.bin", *members[1][1:]]])  # type: ignore[index]
    case("member extra", members=[*members, members[1]])  # type: ignore[misc]
    case("size negative", members=[members[0], [members[1][0], -1, members[1][2]]])  # type: ignore[index]
    case("size over cap", members=[members[0], [members[1][0], 2**40, members[1][2]]])  # type: ignore[index]
    case("digest short", members=[members[0], [*members[1][:2], b"\x00" * 4]])  # type: ignore[index]
    case("entry not a list", members=[members[0], "model.onnx"])  # type: ignore[index]
    return cases


@pytest.mark.parametrize(("case", "header"), list(_header_cases().items()))
def test_malformed_headers_are_refused(case: str, header: dict[str, object]) -> None:
    with pytest.raises(BundleFormatError):
        decode_bundle(_with_header(sample(), header))


def test_non_canonical_header_is_refused() -> None:
    h, _ = _split(sample())
    # Same content, keys in a non-canonical order: one encoding per bundle.
    reordered = dict(reversed(list(h.items())))
    with pytest.raises(BundleFormatError, match="canonical"):
        decode_bundle(_with_header(sample(), reordered, canonical=False))


def test_duplicate_keys_are_refused() -> None:
    data = sample()
    _, end = _split(data)
    raw = data[12:end]
    assert raw[0] == 0xA4  # a map of 4 pairs
    # The same map with a 5th pair repeating "magic" (a dict cannot express it: write CBOR).
    dup = b"\xa5" + raw[1:] + cbor2.dumps("magic") + cbor2.dumps(MAGIC)
    with pytest.raises(BundleFormatError, match="not valid CBOR"):
        decode_bundle(PREFIX + struct.pack(">I", len(dup)) + dup + data[end:])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d[:-1], "size"),
        (lambda d: d + b"\x00", "size"),
        (lambda d: d[:-5] + bytes(x ^ 1 for x in d[-5:]), "digest"),
        (lambda d: b"XRBNDLv1" + d[8:], "prefix"),
        (lambda d: d[:10], "prefix"),
        (lambda d: d[:8] + struct.pack(">I", MAX_HEADER_SIZE + 1) + d[12:], "header"),
        (lambda d: d[:8] + struct.pack(">I", 2**32 - 1) + d[12:], "header"),
        (lambda d: d[:20], "truncated"),
    ],
)
def test_body_tampering_and_truncation_are_refused(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BundleFormatError, match=match):
        decode_bundle(mutate(sample()))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_bundle_format_error(data: bytes) -> None:
    with pytest.raises(BundleFormatError):
        decode_bundle(data)
    with pytest.raises(BundleFormatError):
        decode_bundle(PREFIX + data)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_any_single_byte_change_is_refused_or_decodes_to_another_bundle(
    data: st.DataObject,
) -> None:
    """One encoding per bundle: changed bytes never parse as the same bundle. (The bundle
    carries no MAC of its own: sealing authenticates it, and its SHA-384 is what PCR16 pins.)"""
    good = sample()
    at = data.draw(st.integers(0, len(good) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = good[:at] + bytes([good[at] ^ flip]) + good[at + 1 :]
    try:
        parsed = decode_bundle(bad)
    except BundleFormatError:
        return
    original = decode_bundle(good)
    assert (parsed.config, bytes(parsed.onnx), bytes(parsed.tokenizer_json)) != (
        original.config,
        bytes(original.onnx),
        bytes(original.tokenizer_json),
    )
    assert at < len(good) - len(ONNX) - len(TOKENIZER)  # only the header, never a member


def test_read_bundle_bounds_the_file_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "b.bundle"
    path.write_bytes(sample())
    assert read_bundle(path).config == CONFIG
    with pytest.raises(BundleFormatError, match="larger"):
        read_bundle(path, max_size=len(sample()) - 1)


def test_encode_refuses_oversized_members(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.text.bundle as bundle_mod

    monkeypatch.setitem(bundle_mod._MEMBER_CAPS, "tokenizer.json", 4)
    with pytest.raises(BundleFormatError, match=r"tokenizer\.json"):
        encode_bundle(CONFIG, onnx=b"", tokenizer_json=b"12345")


def test_the_minilm_bundle_parses_and_names_its_config() -> None:
    b = minilm_bundle()
    assert b.config == BundleConfig(
        model_name="all-MiniLM-L6-v2", max_seq_length=256, embedding_dim=384, vocab_size=30522
    )
    assert 80 << 20 < len(b.onnx) < 100 << 20
    assert b"WordPiece" in bytes(b.tokenizer_json)


def test_the_bundle_seals_and_unseals_as_one_unit_with_models_sealed() -> None:
    """The unchanged sealed format carries the whole bundle; its digest covers the tokenizer."""
    plain = minilm_bundle_path().read_bytes()
    digest, size = sealed.sha384_file(io.BytesIO(plain))
    key = os.urandom(32)
    header = sealed.new_header(
        key_id="alias/models",
        encrypted_data_key=b"blob",
        model_name="all-MiniLM-L6-v2",
        model_sha384=digest,
        total_size=size,
    )
    out = io.BytesIO()
    sealed.seal_stream(io.BytesIO(plain), out, data_key=key, header=header)
    parsed, unsealed = sealed.unseal_bytes(out.getvalue(), key)
    assert parsed.model_sha384 == hashlib.sha384(plain).digest()
    b = decode_bundle(unsealed)
    assert bytes(b.tokenizer_json) == bytes(minilm_bundle().tokenizer_json)
    # Swapping the tokenizer changes the digest that PCR16 and the key policy pin.
    swapped = encode_bundle(b.config, onnx=bytes(b.onnx), tokenizer_json=b"{}")
    assert hashlib.sha384(swapped).digest() != parsed.model_sha384


def test_magic_constant_is_in_the_header() -> None:
    h, _ = _split(sample())
    assert h["magic"] == MAGIC
