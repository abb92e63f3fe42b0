"""The post-quantum recipes of :mod:`kms._asym` without a daemon: material checks at load, and
peer bytes (signatures, mu, ciphertexts) that may be anything, under Hypothesis."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, mlkem
from hypothesis import given, settings
from hypothesis import strategies as st

from kms import _asym
from kms.errors import CiphertextFormatError, KeyMaterialError
from kms.keyspecs import ML_DSA_SIGNING, SPECS, UNSUPPORTED_SPECS


def _pkcs8(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


_DSA = _asym.AsymmetricKey.load(SPECS["ML_DSA_44"], _asym.generate_private_key(SPECS["ML_DSA_44"]))
_KEM = _asym.AsymmetricKey.load(
    SPECS["ML_KEM_768"], _asym.generate_private_key(SPECS["ML_KEM_768"])
)


def test_every_refused_spec_says_why() -> None:
    refused = {name for name, spec in SPECS.items() if not spec.supported}
    assert refused == set(UNSUPPORTED_SPECS) == {"SM2", "ML_KEM_512"}
    with pytest.raises(KeyMaterialError):
        _asym.generate_private_key(SPECS["ML_KEM_512"])


@pytest.mark.parametrize(
    ("spec", "material"),
    [
        # another parameter set of the same family
        ("ML_DSA_65", _pkcs8(mldsa.MLDSA44PrivateKey.generate())),
        ("ML_DSA_44", _pkcs8(mldsa.MLDSA87PrivateKey.generate())),
        ("ML_KEM_1024", _pkcs8(mlkem.MLKEM768PrivateKey.generate())),
        # the other family, and a classical key
        ("ML_KEM_768", _pkcs8(mldsa.MLDSA65PrivateKey.generate())),
        ("ML_DSA_65", _pkcs8(mlkem.MLKEM768PrivateKey.generate())),
        ("ML_DSA_87", _pkcs8(ec.generate_private_key(ec.SECP256R1()))),
        # not PKCS#8 at all: a raw seed
        ("ML_KEM_768", b"\x00" * 64),
    ],
)
def test_load_refuses_material_of_another_spec(spec: str, material: bytes) -> None:
    with pytest.raises(KeyMaterialError):
        _asym.AsymmetricKey.load(SPECS[spec], material)


def test_ml_dsa_message_types() -> None:
    with pytest.raises(ValueError, match="DIGEST"):
        _DSA.sign(ML_DSA_SIGNING, b"d" * 64, digest=True)
    with pytest.raises(ValueError, match="64 bytes"):
        _DSA.sign(ML_DSA_SIGNING, b"m" * 63, digest=False, mu=True)
    signature = _DSA.sign(ML_DSA_SIGNING, b"message", digest=False)
    assert _DSA.verify(ML_DSA_SIGNING, b"message", signature, digest=False)
    # An external mu is refused on every key that is not ML-DSA, and ML-KEM keys never sign.
    p256 = _asym.AsymmetricKey.load(SPECS["ECC_NIST_P256"], _asym.generate_private_key(
        SPECS["ECC_NIST_P256"]
    ))  # fmt: skip
    with pytest.raises(ValueError, match="EXTERNAL_MU"):
        p256.sign("ECDSA_SHA_256", b"m" * 64, digest=False, mu=True)
    with pytest.raises(ValueError, match="EXTERNAL_MU"):
        p256.verify("ECDSA_SHA_256", b"m" * 64, b"s", digest=False, mu=True)
    with pytest.raises(ValueError):
        _KEM.sign(ML_DSA_SIGNING, b"m", digest=False)
    with pytest.raises(ValueError):
        p256.encapsulate()


@settings(max_examples=60, deadline=None)
@given(signature=st.binary(max_size=3000), message=st.binary(max_size=200), mu=st.booleans())
def test_ml_dsa_verify_of_any_bytes_is_a_clean_no(
    signature: bytes, message: bytes, mu: bool
) -> None:
    if mu:
        message = (message * 64)[:64].ljust(64, b"\x00")
    assert _DSA.verify(ML_DSA_SIGNING, message, signature, digest=False, mu=mu) is False


@settings(max_examples=60, deadline=None)
@given(ciphertext=st.one_of(st.binary(max_size=2000), st.binary(min_size=1088, max_size=1088)))
def test_ml_kem_decapsulate_of_any_bytes(ciphertext: bytes) -> None:
    """The right length always yields 32 bytes (implicit rejection); any other is refused."""
    if len(ciphertext) == 1088:
        assert len(_KEM.decapsulate(ciphertext)) == 32
    else:
        with pytest.raises(CiphertextFormatError):
            _KEM.decapsulate(ciphertext)


def test_ml_kem_round_trip_and_data_key_pairs() -> None:
    secret, ciphertext = _KEM.encapsulate()
    assert _KEM.decapsulate(ciphertext) == secret
    for spec in ("ML_KEM_768", "ML_KEM_1024"):
        private_der, public_der = _asym.generate_data_key_pair(spec)
        key = _asym.AsymmetricKey.load(SPECS[spec], private_der)
        assert key.public_der() == public_der
