"""CiphertextForRecipient by template: byte-identical to asn1crypto's full encoding."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms import _wrap, cms


@pytest.fixture(scope="module")
def keys() -> dict[int, rsa.RSAPrivateKey]:
    return {
        bits: rsa.generate_private_key(public_exponent=65537, key_size=bits)
        for bits in (2048, 3072, 4096)
    }


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bits=st.sampled_from([2048, 3072, 4096]),
    plaintext=st.binary(min_size=0, max_size=cms.MAX_CONTENT_BYTES),
)
def test_template_equals_the_full_encoding(
    keys: dict[int, rsa.RSAPrivateKey], bits: int, plaintext: bytes
) -> None:
    key = keys[bits]
    fields = cms._fields(plaintext, key.public_key(), os.urandom(32), os.urandom(16))
    assert cms._assemble(fields) == cms._encode(*fields)
    assert cms.open_enveloped_data(cms._assemble(fields), key) == plaintext


def test_answers_differ_and_open(keys: dict[int, rsa.RSAPrivateKey]) -> None:
    key = keys[2048]
    a = cms.build_enveloped_data(b"k" * 32, key.public_key())
    b = cms.build_enveloped_data(b"k" * 32, key.public_key())
    assert a != b  # fresh CEK, IV and OAEP randomness each time
    assert cms.open_enveloped_data(a, key) == cms.open_enveloped_data(b, key) == b"k" * 32


def test_no_placeholder_survives(keys: dict[int, rsa.RSAPrivateKey]) -> None:
    key = keys[2048]
    fields = cms._fields(b"x" * 32, key.public_key(), os.urandom(32), os.urandom(16))
    lengths = tuple(len(f) for f in fields)
    out = cms._assemble(fields)
    template = cms._TEMPLATES[lengths]  # type: ignore[index]
    for offset, length in template.slots:
        holder = template.der[offset : offset + length]
        assert holder not in out


def test_a_wrong_length_field_is_refused(keys: dict[int, rsa.RSAPrivateKey]) -> None:
    key = keys[2048]
    fields = cms._fields(b"x" * 32, key.public_key(), os.urandom(32), os.urandom(16))
    template = cms._Template((32, 256, 16, 48))
    with pytest.raises(AssertionError):
        template.fill((fields[0], fields[1] + b"\x00", fields[2], fields[3]))


def test_the_template_cache_is_bounded(
    keys: dict[int, rsa.RSAPrivateKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cms, "_TEMPLATES", {})
    monkeypatch.setattr(cms, "_MAX_TEMPLATES", 2)
    key = keys[2048]
    for n in (1, 17, 33, 49):  # four padded lengths: 16, 32, 48, 64
        fields = cms._fields(b"z" * n, key.public_key(), os.urandom(32), os.urandom(16))
        assert cms._assemble(fields) == cms._encode(*fields)
    assert len(cms._TEMPLATES) == 2


def test_the_fields_are_the_ones_aws_sends(keys: dict[int, rsa.RSAPrivateKey]) -> None:
    """rid = SHA-256 of the recipient's SPKI; encryptedKey = one RSA block; content padded."""
    key = keys[3072]
    cek, iv = os.urandom(32), os.urandom(16)
    ski, encrypted_key, iv_out, content = cms._fields(b"x", key.public_key(), cek, iv)
    assert ski == cms.recipient_key_identifier(key.public_key())
    assert len(encrypted_key) == 384
    assert iv_out == iv
    assert len(content) == 16
    assert _wrap.rsa_oaep_sha256_decrypt(key, encrypted_key) == cek
