"""The only module of kms/ that imports ``cryptography.hazmat``: small recipes over primitives.

* :class:`Aead` - AES-256-GCM with a random 96-bit nonce per message (keys here encrypt few
  messages each, far below the 2^32 random-nonce bound), used for key-material wrapping and for
  CiphertextBlobs.
* RSAES-OAEP with SHA-256 and MGF1-SHA-256, no label: the CMS key transport of Recipient answers.
* HKDF-SHA256 (one subkey of the master key per purpose, each under its own label) and
  HMAC-SHA256 with constant-time verification: the integrity of the state at rest (key records,
  aliases, the audit chain).
* AES-256-CBC with PKCS#7 padding: the CMS content encryption AWS uses (nitro.md §6.2). CBC is
  unauthenticated; the format is fixed by AWS, and the CEK is fresh per answer and only ever
  reaches the enclave holding the RSA private key.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives import hmac as _hmac
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import CiphertextFormatError

__all__ = [
    "AES_KEY_BYTES",
    "GCM_NONCE_BYTES",
    "GCM_TAG_BYTES",
    "CBC_IV_BYTES",
    "Aead",
    "InvalidTag",
    "random_bytes",
    "derive_subkey",
    "Mac",
    "rsa_oaep_sha256_encrypt",
    "rsa_oaep_sha256_decrypt",
    "aes256_cbc_encrypt",
    "aes256_cbc_decrypt",
    "generate_rsa_2048",
    "load_rsa_spki",
    "spki_der",
    "RSAPublicKey",
    "RSAPrivateKey",
]

#: AES-256 keys (KMS symmetric keys, data keys, the master key, the CMS CEK).
AES_KEY_BYTES = 32
#: The GCM nonce size NIST recommends (96 bits).
GCM_NONCE_BYTES = 12
#: Full 128-bit GCM tag.
GCM_TAG_BYTES = 16
#: AES block size = CBC IV size.
CBC_IV_BYTES = 16
#: RSA public exponent used by every SDK (F4).
_RSA_E = 65537
#: Smallest recipient modulus accepted (AWS requires RSA-2048 in the document).
MIN_RSA_BITS = 2048
#: Largest recipient modulus accepted (bounded work for the daemon).
MAX_RSA_BITS = 4096

RSAPublicKey = rsa.RSAPublicKey
RSAPrivateKey = rsa.RSAPrivateKey

_OAEP = asym_padding.OAEP(
    mgf=asym_padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the OS CSPRNG."""
    return os.urandom(n)


def derive_subkey(master: bytes, label: bytes) -> bytes:
    """A 32-byte key for one purpose: HKDF-SHA256 of ``master`` with ``label`` as the info.

    Distinct labels give independent keys, so a MAC key never doubles as a wrapping key.
    """
    if len(master) != AES_KEY_BYTES:
        raise ValueError("the master key must be 32 bytes.")
    return HKDF(algorithm=hashes.SHA256(), length=AES_KEY_BYTES, salt=None, info=label).derive(
        master
    )


class Mac:
    """HMAC-SHA256 under one key: ``tag`` and a constant-time ``verify``."""

    __slots__ = ("_keyed",)

    #: Length of a tag in bytes.
    TAG_BYTES = 32

    def __init__(self, key: bytes) -> None:
        if len(key) < AES_KEY_BYTES:
            raise ValueError("HMAC key must be at least 32 bytes.")
        # Keyed once; each tag copies it (skips re-hashing the padded key: ~0.5 µs a line).
        self._keyed = _hmac.HMAC(key, hashes.SHA256())

    def tag(self, data: bytes) -> bytes:
        """The tag of ``data``."""
        h = self._keyed.copy()
        h.update(data)
        return h.finalize()

    def verify(self, data: bytes, tag: bytes) -> bool:
        """True if ``tag`` authenticates ``data`` (compared in constant time)."""
        h = self._keyed.copy()
        h.update(data)
        try:
            h.verify(tag)
        except InvalidSignature:
            return False
        return True


class Aead:
    """AES-256-GCM with random nonces; ``seal`` returns ``nonce ‖ ciphertext ‖ tag``."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != AES_KEY_BYTES:
            raise ValueError("AES-256-GCM key must be 32 bytes.")
        self._aead = AESGCM(key)  # reused: building one costs ~2 µs (perf-baseline §2.1)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt with a fresh random nonce."""
        nonce = os.urandom(GCM_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def seal_with_nonce(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """Test seam (Fernet's ``_encrypt_from_parts``): callers never choose nonces."""
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """Inverse of :meth:`seal`. Raises :class:`CiphertextFormatError` (opaque) on failure."""
        if len(sealed) < GCM_NONCE_BYTES + GCM_TAG_BYTES:
            raise CiphertextFormatError("ciphertext too short")
        try:
            return self._aead.decrypt(sealed[:GCM_NONCE_BYTES], sealed[GCM_NONCE_BYTES:], aad)
        except InvalidTag:
            raise CiphertextFormatError("ciphertext failed authentication") from None


def rsa_oaep_sha256_encrypt(public_key: rsa.RSAPublicKey, data: bytes) -> bytes:
    """RSAES-OAEP, SHA-256, MGF1-SHA-256, empty label."""
    return public_key.encrypt(data, _OAEP)


def rsa_oaep_sha256_decrypt(private_key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    """Inverse of :func:`rsa_oaep_sha256_encrypt`; opaque :class:`CiphertextFormatError`."""
    try:
        return private_key.decrypt(data, _OAEP)
    except ValueError:
        raise CiphertextFormatError("key transport failed") from None


def aes256_cbc_encrypt(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """AES-256-CBC of PKCS#7-padded ``plaintext``."""
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(padded) + enc.finalize()


def aes256_cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """Inverse of :func:`aes256_cbc_encrypt`; opaque :class:`CiphertextFormatError`."""
    if len(key) != AES_KEY_BYTES or len(iv) != CBC_IV_BYTES:
        raise CiphertextFormatError("bad content-encryption parameters")
    if not ciphertext or len(ciphertext) % CBC_IV_BYTES:
        raise CiphertextFormatError("content is not a whole number of AES blocks")
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = dec.update(ciphertext) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise CiphertextFormatError("content padding is invalid") from None


def generate_rsa_2048() -> rsa.RSAPrivateKey:
    """A fresh RSA-2048 key (~50 ms median here, perf-baseline §2.1: call it off the hot path)."""
    return rsa.generate_private_key(public_exponent=_RSA_E, key_size=2048)


def spki_der(public_key: rsa.RSAPublicKey) -> bytes:
    """DER SubjectPublicKeyInfo of ``public_key`` (what goes into the attestation document)."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_rsa_spki(der: bytes) -> rsa.RSAPublicKey:
    """Load a DER SPKI holding an RSA key of 2048..4096 bits.

    Raises:
        ValueError: not DER SPKI, not RSA, or a size outside the accepted range.
    """
    key = serialization.load_der_public_key(der)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("public key is not RSA")
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise ValueError(f"RSA key size {key.key_size} outside {MIN_RSA_BITS}..{MAX_RSA_BITS}")
    return key


def load_pkcs8_private_key(der: bytes) -> rsa.RSAPrivateKey:
    """Load an unencrypted PKCS#8 DER RSA private key (test vectors)."""
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("private key is not RSA")
    return key
