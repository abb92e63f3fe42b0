"""The sealed model format: round trips and every kind of tampering."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import sealed
from models.errors import SealedFormatError, SealedIntegrityError
from models.sealed import SealedHeader, iter_unseal, read_header, unseal_bytes

CHUNK = sealed.MIN_CHUNK_SIZE  # small chunks so a few KiB give several of them


def seal(plain: bytes, key: bytes, *, name: str = "m", chunk: int = CHUNK) -> bytes:
    header = sealed.new_header(
        key_id="alias/models",
        encrypted_data_key=b"blob:" + os.urandom(16),
        model_name=name,
        model_sha384=hashlib.sha384(plain).digest(),
        total_size=len(plain),
        encryption_context={"model": name},
        chunk_size=chunk,
    )
    out = io.BytesIO()
    sealed.seal_stream(io.BytesIO(plain), out, data_key=key, header=header)
    return out.getvalue()


def body_offset(blob: bytes) -> int:
    (length,) = struct.unpack(">I", blob[8:12])
    return 12 + length


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def plain() -> bytes:
    return os.urandom(3 * CHUNK + 100)  # 4 chunks, the last one short


def test_round_trip(key: bytes, plain: bytes) -> None:
    blob = seal(plain, key)
    header, out = unseal_bytes(blob, key)
    assert out == plain
    assert header.model_name == "m"
    assert header.chunk_count == 4
    assert header.model_sha384 == hashlib.sha384(plain).digest()
    assert len(blob) == body_offset(blob) + len(plain) + 4 * sealed.TAG_SIZE


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 5 * CHUNK), chunk=st.sampled_from([CHUNK, 2 * CHUNK, 4096]))
def test_round_trip_sizes(size: int, chunk: int) -> None:
    key = os.urandom(32)
    plain = os.urandom(size)
    assert unseal_bytes(seal(plain, key, chunk=chunk), key)[1] == plain


def test_header_readable_without_key(key: bytes, plain: bytes) -> None:
    header, framed = read_header(io.BytesIO(seal(plain, key)))
    view = header.to_json()
    assert view["model_name"] == "m"
    assert view["total_size"] == len(plain)
    assert view["encryption_context"] == {"model": "m"}
    assert len(framed) > 12


def test_wrong_key(key: bytes, plain: bytes) -> None:
    with pytest.raises(SealedIntegrityError):
        unseal_bytes(seal(plain, key), os.urandom(32))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_name", "other"),
        ("key_id", "alias/other"),
        ("encryption_context", {"model": "other"}),
        ("encrypted_data_key", b"another blob"),
        ("salt", b"\x00" * 32),
    ],
)
def test_header_edit_detected(key: bytes, plain: bytes, field: str, value: object) -> None:
    blob = seal(plain, key)
    header, _ = read_header(io.BytesIO(blob))
    fields = {f: getattr(header, f) for f in SealedHeader.__dataclass_fields__}
    fields[field] = value
    forged = SealedHeader(**fields).to_cbor()  # type: ignore[arg-type]
    tampered = sealed.PREFIX + struct.pack(">I", len(forged)) + forged + blob[body_offset(blob) :]
    with pytest.raises(SealedIntegrityError):
        unseal_bytes(tampered, key)


def test_header_digest_edit_detected(key: bytes, plain: bytes) -> None:
    # Even a consistent-looking digest change breaks every chunk (header hash in the AAD).
    blob = seal(plain, key)
    header, _ = read_header(io.BytesIO(blob))
    other = SealedHeader(
        **{
            **{f: getattr(header, f) for f in SealedHeader.__dataclass_fields__},
            "model_sha384": hashlib.sha384(b"x").digest(),
        }
    ).to_cbor()
    tampered = sealed.PREFIX + struct.pack(">I", len(other)) + other + blob[body_offset(blob) :]
    with pytest.raises(SealedIntegrityError):
        unseal_bytes(tampered, key)


@pytest.mark.parametrize("where", [0, 1, 2, 3])
def test_chunk_bit_flip(key: bytes, plain: bytes, where: int) -> None:
    blob = bytearray(seal(plain, key))
    pos = body_offset(bytes(blob)) + where * (CHUNK + sealed.TAG_SIZE) + 5
    blob[pos] ^= 0x01
    with pytest.raises(SealedIntegrityError):
        unseal_bytes(bytes(blob), key)


@pytest.mark.parametrize("cut", [1, sealed.TAG_SIZE, 100 + sealed.TAG_SIZE, 2 * (CHUNK + 16)])
def test_truncation(key: bytes, plain: bytes, cut: int) -> None:
    blob = seal(plain, key)
    with pytest.raises(SealedIntegrityError):
        unseal_bytes(blob[:-cut], key)


def test_truncation_at_chunk_boundary_with_forged_size(key: bytes) -> None:
    # Drop the last chunk AND shrink total_size in the header: the header hash changes, and the
    # new last chunk was not sealed as final.
    plain = os.urandom(2 * CHUNK)
    blob = seal(plain, key)
    header, _ = read_header(io.BytesIO(blob))
    fields = {f: getattr(header, f) for f in SealedHeader.__dataclass_fields__}
    fields["total_size"] = CHUNK
    forged = SealedHeader(**fields).to_cbor()  # type: ignore[arg-type]
    off = body_offset(blob)
    tampered = (
        sealed.PREFIX + struct.pack(">I", len(forged)) + forged + blob[off : off + CHUNK + 16]
    )
    with pytest.raises(SealedIntegrityError):
        unseal_bytes(tampered, key)


def test_trailing_data(key: bytes, plain: bytes) -> None:
    with pytest.raises(SealedIntegrityError):
        unseal_bytes(seal(plain, key) + b"\x00", key)


def test_reorder_chunks(key: bytes, plain: bytes) -> None:
    blob = seal(plain, key)
    off = body_offset(blob)
    n = CHUNK + sealed.TAG_SIZE
    c0, c1 = blob[off : off + n], blob[off + n : off + 2 * n]
    swapped = blob[:off] + c1 + c0 + blob[off + 2 * n :]
    with pytest.raises(SealedIntegrityError):
        unseal_bytes(swapped, key)


def test_chunk_swap_between_files_same_key(key: bytes) -> None:
    a = seal(os.urandom(2 * CHUNK), key)
    b = seal(os.urandom(2 * CHUNK), key)
    off_a, off_b = body_offset(a), body_offset(b)
    n = CHUNK + sealed.TAG_SIZE
    mixed = a[:off_a] + b[off_b : off_b + n] + a[off_a + n :]
    with pytest.raises(SealedIntegrityError):
        unseal_bytes(mixed, key)


def test_streaming_yields_nothing_unauthenticated(key: bytes, plain: bytes) -> None:
    blob = bytearray(seal(plain, key))
    blob[-1] ^= 1  # last chunk's tag
    got: list[bytes] = []

    def consume() -> None:
        got.extend(iter_unseal(io.BytesIO(bytes(blob)), key))

    with pytest.raises(SealedIntegrityError):
        consume()
    assert len(got) == 3  # earlier chunks authenticated; the consumer must discard them


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"NOTSEALD" + b"\x00" * 10,
        sealed.PREFIX + struct.pack(">I", 0),
        sealed.PREFIX + struct.pack(">I", sealed.MAX_HEADER_SIZE + 1) + b"x",
        sealed.PREFIX + struct.pack(">I", 100) + b"short",
        sealed.PREFIX + struct.pack(">I", 3) + b"\xff\xff\xff",
        sealed.PREFIX + struct.pack(">I", 1) + b"\x01",  # CBOR int, not a map
    ],
)
def test_malformed_headers(blob: bytes, key: bytes) -> None:
    with pytest.raises(SealedFormatError):
        unseal_bytes(blob, key)


def test_header_field_bounds() -> None:
    good = dict(
        key_id="k",
        encrypted_data_key=b"b",
        model_name="m",
        model_sha384=b"\x00" * 48,
        total_size=0,
        salt=b"\x00" * 32,
    )
    SealedHeader(**good)  # type: ignore[arg-type]
    for field, bad in [
        ("chunk_size", 10),
        ("chunk_size", sealed.MAX_CHUNK_SIZE + 1),
        ("total_size", -1),
        ("total_size", sealed.MAX_MODEL_SIZE + 1),
        ("model_sha384", b"\x00" * 32),
        ("salt", b""),
        ("model_name", ""),
        ("model_name", "x" * 1000),
        ("encrypted_data_key", b"x" * (sealed.MAX_BLOB_SIZE + 1)),
        ("encryption_context", {str(i): "v" for i in range(100)}),
    ]:
        with pytest.raises(SealedFormatError):
            SealedHeader(**{**good, field: bad})  # type: ignore[arg-type]


def test_non_canonical_header_rejected(key: bytes, plain: bytes) -> None:
    import cbor2

    blob = seal(plain, key)
    header, _ = read_header(io.BytesIO(blob))
    obj = cbor2.loads(header.to_cbor())
    raw = cbor2.dumps(dict(reversed(list(obj.items()))))  # same content, other key order
    tampered = sealed.PREFIX + struct.pack(">I", len(raw)) + raw + blob[body_offset(blob) :]
    with pytest.raises(SealedFormatError):
        unseal_bytes(tampered, key)


def test_seal_detects_changed_input(key: bytes) -> None:
    plain = os.urandom(2 * CHUNK)
    header = sealed.new_header(
        key_id="k",
        encrypted_data_key=b"b",
        model_name="m",
        model_sha384=hashlib.sha384(b"something else").digest(),
        total_size=len(plain),
        chunk_size=CHUNK,
    )
    with pytest.raises(SealedFormatError):
        sealed.seal_stream(io.BytesIO(plain), io.BytesIO(), data_key=key, header=header)


def test_bad_data_key_length(plain: bytes) -> None:
    with pytest.raises(ValueError):
        seal(plain, b"short")


# --- incremental unsealing (models.sealed.Unsealer) --------------------------------------------


def unseal_in_pieces(blob: bytes, key: bytes, cuts: list[int]) -> tuple[SealedHeader, bytearray]:
    """Feed ``blob`` split at ``cuts`` (sorted offsets), as a network peer would deliver it."""
    u = sealed.Unsealer()
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(blob)), len(blob)]
    pieces = [blob[a:b] for a, b in itertools.pairwise(bounds)]
    rest = None
    while rest is None:
        if not pieces:
            raise SealedFormatError("sealed model header is truncated")
        rest = u.feed_header(pieces.pop(0))
    u.start(key)
    u.feed(rest)
    for piece in pieces:
        u.feed(piece)
    return u.finish()


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=5 * CHUNK),
    cuts=st.lists(st.integers(min_value=0, max_value=6 * CHUNK), max_size=12),
)
def test_unsealer_any_chunking_gives_the_same_plaintext(size: int, cuts: list[int]) -> None:
    """Re-chunking: the same sealed bytes split anywhere unseal to the same model."""
    key = bytes(range(32))
    plain = hashlib.sha384(str(size).encode()).digest() * (size // 48 + 1)
    plain = plain[:size]
    header, out = unseal_in_pieces(seal(plain, key), key, cuts)
    assert out == plain
    assert header.total_size == size
    assert isinstance(out, bytearray)


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(min_value=1, max_value=4 * (CHUNK + 16)), split=st.integers(0, 5000))
def test_unsealer_truncation_anywhere_is_detected(cut: int, split: int) -> None:
    key = bytes(32)
    plain = bytes(range(256)) * (3 * CHUNK // 256) + b"tail"
    blob = seal(plain, key)
    with pytest.raises((SealedIntegrityError, SealedFormatError)):
        unseal_in_pieces(blob[: len(blob) - cut], key, [split])


def test_unsealer_trailing_bytes_and_tampering(key: bytes, plain: bytes) -> None:
    blob = seal(plain, key)
    with pytest.raises(SealedIntegrityError, match="trailing"):
        unseal_in_pieces(blob + b"\x00", key, [len(blob)])
    tampered = bytearray(blob)
    tampered[body_offset(blob) + CHUNK + 40] ^= 1
    with pytest.raises(SealedIntegrityError):
        unseal_in_pieces(bytes(tampered), key, [100, 3000])


def test_unsealer_wipes_what_it_unsealed_on_failure(key: bytes, plain: bytes) -> None:
    """Chunks that authenticated before a later one failed are not left in memory."""
    blob = bytearray(seal(plain, key))
    blob[-5] ^= 1  # the last chunk fails; the first three were written
    u = sealed.Unsealer()
    rest = u.feed_header(bytes(blob))
    assert rest is not None
    u.start(key)
    buffer = u._out  # the plaintext buffer, to check what is left in it
    with pytest.raises(SealedIntegrityError):
        u.feed(rest)
    assert not any(buffer)


def test_unsealer_checks_order_of_calls_and_the_prefix(key: bytes, plain: bytes) -> None:
    blob = seal(plain, key)
    u = sealed.Unsealer()
    with pytest.raises(SealedFormatError):
        u.feed(blob)  # no key yet
    with pytest.raises(SealedFormatError):
        u.start(key)  # no header yet
    with pytest.raises(SealedFormatError, match="prefix"):
        sealed.Unsealer().feed_header(b"PK\x03\x04")  # refused at once, not after 64 KiB
    assert u.feed_header(blob[:5]) is None
    assert u.feed_header(blob[5:20]) is None
    rest = u.feed_header(blob[20:])
    assert rest is not None
    assert u.header is not None
    u.start(key)
    with pytest.raises(SealedFormatError):
        u.start(key)
    u.feed(rest)
    assert u.finish()[1] == plain


def test_unsealer_holds_one_partial_chunk_at_most(key: bytes) -> None:
    """Bounded memory: whatever the pieces, only the plaintext and part of one chunk are kept."""
    plain = os.urandom(6 * CHUNK)
    blob = seal(plain, key)
    u = sealed.Unsealer()
    rest = u.feed_header(blob[: body_offset(blob)])
    assert rest is not None
    u.start(key)
    largest = 0
    for i in range(body_offset(blob), len(blob), 700):
        u.feed(blob[i : i + 700])
        largest = max(largest, len(u._partial))
    assert largest < CHUNK + 16
    assert u.finish()[1] == plain
