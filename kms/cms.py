"""CMS EnvelopedData (RFC 5652) as AWS KMS returns ``CiphertextForRecipient`` (nitro.md §6.2).

Layout built here and required when opening::

    ContentInfo { envelopedData,
      EnvelopedData { version 2,
        recipientInfos = { KeyTransRecipientInfo { version 2,
            rid = [0] subjectKeyIdentifier = SHA-256(recipient SubjectPublicKeyInfo DER),
            keyEncryptionAlgorithm = rsaesOaep { hash sha256, mgf1(sha256) },
            encryptedKey = RSA-OAEP(CEK) } },
        encryptedContentInfo { data, aes256-CBC { IV(16) }, [0] AES-256-CBC(PKCS#7(content)) } } }

Encoding and decoding go through ``asn1crypto``; we emit DER (which is valid BER), and the
decoder accepts BER, indefinite lengths and a chunked (constructed) encryptedContent included,
as AWS sends. All crypto calls are in :mod:`kms._wrap`.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from asn1crypto import algos, cms, core

from . import _wrap
from .errors import CiphertextFormatError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = [
    "MAX_CMS_BYTES",
    "build_enveloped_data",
    "open_enveloped_data",
    "recipient_key_identifier",
]

#: Upper bound on an EnvelopedData we parse. AWS caps CiphertextForRecipient at 6144 bytes;
#: GenerateDataKeyPair's RSA-4096 private key (~2.4 KiB DER) fits well within 64 KiB.
MAX_CMS_BYTES = 64 * 1024
#: Largest content we put in an EnvelopedData (the largest KMS plaintext is 4096 B; a
#: data-key-pair private key stays under 4 KiB too).
MAX_CONTENT_BYTES = 16 * 1024


def recipient_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """The subjectKeyIdentifier AWS uses: SHA-256 of the recipient's SPKI DER."""
    return hashlib.sha256(_wrap.spki_der(public_key)).digest()


def _oaep_algorithm() -> cms.KeyEncryptionAlgorithm:
    sha256 = algos.DigestAlgorithm({"algorithm": "sha256", "parameters": core.Null()})
    return cms.KeyEncryptionAlgorithm(
        {
            "algorithm": "rsaes_oaep",
            "parameters": algos.RSAESOAEPParams(
                {
                    "hash_algorithm": sha256,
                    "mask_gen_algorithm": algos.MaskGenAlgorithm(
                        {"algorithm": "mgf1", "parameters": sha256}
                    ),
                }
            ),
        }
    )


#: The keyEncryptionAlgorithm (rsaesOaep, SHA-256, MGF1-SHA-256), encoded once.
_OAEP_ALGORITHM_DER: bytes = _oaep_algorithm().dump()


def build_enveloped_data(plaintext: bytes, recipient_public_key: rsa.RSAPublicKey) -> bytes:
    """Encrypt ``plaintext`` to ``recipient_public_key`` as a DER CMS ContentInfo.

    A fresh 256-bit CEK and IV are drawn per call.
    """
    if not isinstance(plaintext, bytes | bytearray):
        raise TypeError("plaintext must be bytes")
    if len(plaintext) > MAX_CONTENT_BYTES:
        raise ValueError(f"plaintext larger than {MAX_CONTENT_BYTES} bytes")
    cek = _wrap.random_bytes(_wrap.AES_KEY_BYTES)
    iv = _wrap.random_bytes(_wrap.CBC_IV_BYTES)
    return _assemble(_fields(bytes(plaintext), recipient_public_key, cek, iv))


def _fields(
    plaintext: bytes, public_key: rsa.RSAPublicKey, cek: bytes, iv: bytes
) -> tuple[bytes, bytes, bytes, bytes]:
    """The four variable fields of an answer: subjectKeyIdentifier, encryptedKey, IV and
    encryptedContent (the only cryptographic work: RSA-OAEP and AES-256-CBC)."""
    return (
        recipient_key_identifier(public_key),
        _wrap.rsa_oaep_sha256_encrypt(public_key, cek),
        iv,
        _wrap.aes256_cbc_encrypt(cek, iv, plaintext),
    )


def _build(plaintext: bytes, public_key: rsa.RSAPublicKey, cek: bytes, iv: bytes) -> bytes:
    """Reference build (test seam): fixed CEK and IV, every field through asn1crypto (RSA-OAEP
    stays randomised)."""
    return _encode(*_fields(plaintext, public_key, cek, iv))


def _encode(ski: bytes, encrypted_key: bytes, iv: bytes, encrypted_content: bytes) -> bytes:
    """The ContentInfo holding these fields, encoded by asn1crypto.

    Fields are assigned as typed values and the OAEP algorithm identifier is loaded from its
    pre-encoded DER: building it from nested dicts on every call made asn1crypto re-serialise
    it repeatedly (~27 ms per answer, measured; ~0.17 ms this way).
    """
    ktri = cms.KeyTransRecipientInfo()
    ktri["version"] = cms.CMSVersion(2)
    ktri["rid"] = cms.RecipientIdentifier(
        name="subject_key_identifier", value=core.OctetString(ski)
    )
    ktri["key_encryption_algorithm"] = cms.KeyEncryptionAlgorithm.load(_OAEP_ALGORITHM_DER)
    ktri["encrypted_key"] = core.OctetString(encrypted_key)
    eci = cms.EncryptedContentInfo()
    eci["content_type"] = cms.ContentType("data")
    eci["content_encryption_algorithm"] = cms.EncryptionAlgorithm(
        {"algorithm": "aes256_cbc", "parameters": core.OctetString(iv)}
    )
    eci["encrypted_content"] = core.OctetString(encrypted_content)
    enveloped = cms.EnvelopedData()
    enveloped["version"] = cms.CMSVersion(2)
    enveloped["recipient_infos"] = cms.RecipientInfos([cms.RecipientInfo(name="ktri", value=ktri)])
    enveloped["encrypted_content_info"] = eci
    info = cms.ContentInfo()
    info["content_type"] = cms.ContentType("enveloped_data")
    info["content"] = enveloped
    return bytes(info.dump())


class _Template:
    """An answer's DER with its four variable fields at known offsets.

    DER is a pure function of the field *lengths* once the structure is fixed: two answers whose
    encryptedKey (the RSA modulus size) and encryptedContent (the padded plaintext) have the
    same lengths differ only in those fields' bytes, the SKI and the IV. So asn1crypto encodes
    the structure once per length pair, with unique random placeholders whose offsets are then
    found, and each answer copies its fields in (~2 us instead of ~190 us of asn1crypto work per
    answer, measured; perf: the encoding otherwise cost about as much as the ES384 check).
    :func:`_encode` stays the reference: the tests hold both to byte equality.
    """

    __slots__ = ("der", "slots")

    def __init__(self, lengths: tuple[int, int, int, int]) -> None:
        while True:
            holders = [_wrap.random_bytes(n) for n in lengths]
            der = _encode(*holders)
            found = [der.find(h) for h in holders]
            # Each placeholder occurs exactly once (random bytes: a repeat is ~2^-128 unlikely).
            if all(i >= 0 and der.find(h, i + 1) < 0 for h, i in zip(holders, found, strict=True)):
                break
        self.der = der
        self.slots = tuple(zip(found, lengths, strict=True))

    def fill(self, fields: tuple[bytes, bytes, bytes, bytes]) -> bytes:
        out = bytearray(self.der)
        for (offset, length), value in zip(self.slots, fields, strict=True):
            if len(value) != length:
                raise AssertionError("field length differs from the template's")
            out[offset : offset + length] = value
        return bytes(out)


#: Templates by field lengths. Bounded: encryptedKey is 256..512 bytes (RSA-2048..4096) and
#: encryptedContent at most MAX_CONTENT_BYTES + 16, in 16-byte steps, so at most a few thousand
#: small entries even under hostile input; in practice a handful (one per key size and data-key
#: length).
_TEMPLATES: dict[tuple[int, int, int, int], _Template] = {}
_MAX_TEMPLATES = 4096


def _assemble(fields: tuple[bytes, bytes, bytes, bytes]) -> bytes:
    """``_encode(*fields)`` by template (the same bytes)."""
    lengths = (len(fields[0]), len(fields[1]), len(fields[2]), len(fields[3]))
    template = _TEMPLATES.get(lengths)
    if template is None:
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            return _encode(*fields)
        template = _TEMPLATES[lengths] = _Template(lengths)
    return template.fill(fields)


def _native(value: Any) -> Any:
    return value.native if value is not None else None


def open_enveloped_data(data: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """Decrypt a CiphertextForRecipient with the recipient's RSA private key.

    Accepts BER (indefinite lengths, chunked content) and DER. The recipient must be identified
    by subjectKeyIdentifier = SHA-256(SPKI of ``private_key``'s public key); key transport must be
    RSAES-OAEP-SHA256/MGF1-SHA256 and content encryption AES-256-CBC.

    Raises:
        CiphertextFormatError: malformed, unsupported, not for this key, or failed to decrypt.
    """
    if not isinstance(data, bytes | bytearray):
        raise TypeError("data must be bytes")
    if not data or len(data) > MAX_CMS_BYTES:
        raise CiphertextFormatError(f"EnvelopedData must be 1..{MAX_CMS_BYTES} bytes")
    try:
        info = cms.ContentInfo.load(bytes(data))
        if info["content_type"].native != "enveloped_data":
            raise CiphertextFormatError("ContentInfo is not envelopedData")
        env = info["content"]
        if env["version"].native != "v2":
            raise CiphertextFormatError("EnvelopedData version must be 2")
        want_ski = recipient_key_identifier(private_key.public_key())
        encrypted_key: bytes | None = None
        for ri in env["recipient_infos"]:
            if ri.name != "ktri":
                continue
            ktri = ri.chosen
            rid = ktri["rid"]
            if rid.name != "subject_key_identifier" or rid.chosen.native != want_ski:
                continue
            _check_oaep(ktri["key_encryption_algorithm"])
            encrypted_key = ktri["encrypted_key"].native
            break
        if encrypted_key is None:
            raise CiphertextFormatError("no RecipientInfo for this key")
        eci = env["encrypted_content_info"]
        alg = eci["content_encryption_algorithm"]
        if alg["algorithm"].native != "aes256_cbc":
            raise CiphertextFormatError("content encryption must be aes256-CBC")
        iv = alg["parameters"].native
        content = _native(eci["encrypted_content"])
        if not isinstance(iv, bytes) or not isinstance(content, bytes):
            raise CiphertextFormatError("missing IV or encrypted content")
    except CiphertextFormatError:
        raise
    except Exception as exc:  # asn1crypto raises ValueError/TypeError/KeyError on bad input
        raise CiphertextFormatError(f"malformed EnvelopedData: {type(exc).__name__}") from None
    cek = _wrap.rsa_oaep_sha256_decrypt(private_key, encrypted_key)
    if len(cek) != _wrap.AES_KEY_BYTES:
        raise CiphertextFormatError("content-encryption key must be 32 bytes")
    return _wrap.aes256_cbc_decrypt(cek, iv, content)


def _check_oaep(alg: cms.KeyEncryptionAlgorithm) -> None:
    # Fast path: the exact DER asn1crypto produced for the expected identifier (what AWS and we
    # send). Anything else, e.g. a BER or parameter-explicit encoding, is checked field by field.
    if alg.dump() == _OAEP_ALGORITHM_DER:
        return
    if alg["algorithm"].native != "rsaes_oaep":
        raise CiphertextFormatError("key transport must be RSAES-OAEP")
    params = alg["parameters"]
    if params["hash_algorithm"]["algorithm"].native != "sha256":
        raise CiphertextFormatError("OAEP hash must be SHA-256")
    mgf = params["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1" or mgf["parameters"]["algorithm"].native != "sha256":
        raise CiphertextFormatError("OAEP mask generation must be MGF1-SHA-256")
    if params["p_source_algorithm"]["parameters"].native not in (b"", None):
        raise CiphertextFormatError("OAEP label must be empty")
