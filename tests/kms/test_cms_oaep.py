"""The CMS opener accepts only RSAES-OAEP with SHA-256 and MGF1-SHA-256, whatever the encoding."""

from __future__ import annotations

import pytest
from asn1crypto import algos, cms

from kms import _wrap
from kms import cms as kms_cms
from kms.errors import CiphertextFormatError


def _with_algorithm(envelope: bytes, algorithm: cms.KeyEncryptionAlgorithm) -> bytes:
    info = cms.ContentInfo.load(envelope)
    ktri = info["content"]["recipient_infos"][0].chosen
    ktri["key_encryption_algorithm"] = algorithm
    return bytes(info.dump(force=True))


@pytest.fixture(scope="module")
def key_and_envelope() -> tuple[object, bytes]:
    key = _wrap.generate_rsa_2048()
    return key, kms_cms.build_enveloped_data(b"\x42" * 32, key.public_key())


def _oaep(hash_name: str, mgf_hash: str) -> cms.KeyEncryptionAlgorithm:
    return cms.KeyEncryptionAlgorithm(
        {
            "algorithm": "rsaes_oaep",
            "parameters": algos.RSAESOAEPParams(
                {
                    "hash_algorithm": {"algorithm": hash_name},
                    "mask_gen_algorithm": {
                        "algorithm": "mgf1",
                        "parameters": {"algorithm": mgf_hash},
                    },
                }
            ),
        }
    )


@pytest.mark.parametrize(
    ("hash_name", "mgf_hash"), [("sha1", "sha256"), ("sha256", "sha1"), ("sha1", "sha1")]
)
def test_other_oaep_parameters_are_refused(
    key_and_envelope: tuple[object, bytes], hash_name: str, mgf_hash: str
) -> None:
    key, envelope = key_and_envelope
    tampered = _with_algorithm(envelope, _oaep(hash_name, mgf_hash))
    with pytest.raises(CiphertextFormatError):
        kms_cms.open_enveloped_data(tampered, key)  # type: ignore[arg-type]


def test_equivalent_encoding_of_the_right_parameters_is_accepted(
    key_and_envelope: tuple[object, bytes],
) -> None:
    key, envelope = key_and_envelope
    # Same parameters, re-encoded from scratch: takes the field-by-field path if the bytes differ.
    reencoded = _with_algorithm(envelope, _oaep("sha256", "sha256"))
    assert kms_cms.open_enveloped_data(reencoded, key) == b"\x42" * 32  # type: ignore[arg-type]
