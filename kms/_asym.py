"""Recipes for asymmetric, HMAC and key-import crypto (the second and last kms/ module, after
:mod:`kms._wrap`, that imports ``cryptography.hazmat``).

* :class:`AsymmetricKey` - one RSA / EC / Ed25519 / ML-DSA / ML-KEM KMS key: Sign and Verify
  (RAW and DIGEST messages, and EXTERNAL_MU for ML-DSA, as AWS defines them), RSAES-OAEP with
  SHA-1 or SHA-256 (MGF1 with the same hash, no label), ECDH (the raw shared secret AWS's
  DeriveSharedSecret returns), ML-KEM encapsulation and decapsulation (FIPS 203) and its DER
  SubjectPublicKeyInfo.
* :class:`HmacKey` - one HMAC KMS key (HMAC-SHA-224/256/384/512), constant-time verification.
* :func:`generate_data_key_pair` - GenerateDataKeyPair's PKCS#8 / SPKI pair.
* BYOK: :func:`generate_wrapping_key` and :func:`unwrap_import` - the RSA wrapping key of
  GetParametersForImport and the two wrapping algorithms (RSAES-OAEP, and RSA-OAEP of an
  ephemeral AES-256 key followed by AES Key Wrap with Padding, RFC 5649).
* :func:`material_id` - the KeyMaterialId of a material: an HMAC-SHA256 keyed by the material
  over the key id, so it identifies the material for that key and reveals nothing about it.

Signatures are what AWS returns: ECDSA as DER (ANSI X9.62), RSA-PSS with a salt as long as the
digest, Ed25519 as its 64 bytes (RFC 8032), ML-DSA as FIPS 204's encoding with an empty
context string (pure ML-DSA, not HashML-DSA: what AWS signs). Private keys are stored as
PKCS#8 DER; ML-DSA and ML-KEM ones in the seed-only form ``cryptography`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as _hmac
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, mlkem, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding

from . import _wrap
from .errors import CiphertextFormatError, KeyMaterialError
from .keyspecs import DIGEST_BYTES, HASH_OF, ML_DSA_MU_BYTES, SpecInfo

__all__ = [
    "AsymmetricKey",
    "HmacKey",
    "KeyMaterialError",
    "generate_private_key",
    "generate_hmac_key",
    "generate_data_key_pair",
    "DATA_KEY_PAIR_SPECS",
    "generate_wrapping_key",
    "wrapping_public_key",
    "unwrap_import",
    "material_id",
    "MATERIAL_ID_LABEL",
]

#: RSA public exponent of every key this KMS generates (F4, as AWS).
_RSA_E = 65537
#: The info of :func:`material_id` (changing it changes every KeyMaterialId).
MATERIAL_ID_LABEL = b"enclave-kms/key-material-id/v1\x00"
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA1": hashes.SHA1,
    "SHA224": hashes.SHA224,
    "SHA256": hashes.SHA256,
    "SHA384": hashes.SHA384,
    "SHA512": hashes.SHA512,
}
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
    "secp521r1": ec.SECP521R1,
    "secp256k1": ec.SECP256K1,
}
#: Data key pair specs this KMS generates → (kind, RSA bits or curve name).
DATA_KEY_PAIR_SPECS: dict[str, tuple[str, int | str]] = {
    "RSA_2048": ("rsa", 2048),
    "RSA_3072": ("rsa", 3072),
    "RSA_4096": ("rsa", 4096),
    "ECC_NIST_P256": ("ec", "secp256r1"),
    "ECC_NIST_P384": ("ec", "secp384r1"),
    "ECC_NIST_P521": ("ec", "secp521r1"),
    "ECC_SECG_P256K1": ("ec", "secp256k1"),
    "ECC_NIST_EDWARDS25519": ("ed25519", 0),
    # AWS: the PKCS#8 of an ML-KEM data key pair holds the seed form (same length for both).
    "ML_KEM_768": ("mlkem", 768),
    "ML_KEM_1024": ("mlkem", 1024),
}

_MlDsaPrivate = mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
_MlDsaPublic = mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey
_MlKemPrivate = mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey
_MlKemPublic = mlkem.MLKEM768PublicKey | mlkem.MLKEM1024PublicKey
_Private = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | _MlDsaPrivate
    | _MlKemPrivate
)
#: ML-DSA / ML-KEM parameter set (the spec's ``size``) → the private key class.
_ML_DSA: dict[int, type[_MlDsaPrivate]] = {
    44: mldsa.MLDSA44PrivateKey,
    65: mldsa.MLDSA65PrivateKey,
    87: mldsa.MLDSA87PrivateKey,
}
_ML_KEM: dict[int, type[_MlKemPrivate]] = {
    768: mlkem.MLKEM768PrivateKey,
    1024: mlkem.MLKEM1024PrivateKey,
}
#: ML-KEM ciphertext bytes by parameter set (FIPS 203 Table 3: c = 32(du*k + dv)).
ML_KEM_CIPHERTEXT_BYTES = {768: 1088, 1024: 1568}


def _hash(name: str) -> hashes.HashAlgorithm:
    return _HASHES[name]()


def _oaep(algorithm: str) -> asym_padding.OAEP:
    h = _hash("SHA1" if algorithm == "RSAES_OAEP_SHA_1" else "SHA256")
    return asym_padding.OAEP(mgf=asym_padding.MGF1(algorithm=h), algorithm=h, label=None)


def _private_der(key: _Private) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _spki(key: _Private) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate_private_key(spec: SpecInfo) -> bytes:
    """A fresh private key of ``spec`` as unencrypted PKCS#8 DER.

    RSA-4096 takes up to ~1 s here: call it from a worker thread.
    """
    key: _Private
    if spec.kind == "rsa":
        key = rsa.generate_private_key(public_exponent=_RSA_E, key_size=spec.size)
    elif spec.kind == "ec":
        key = ec.generate_private_key(_CURVES[spec.curve]())
    elif spec.kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif spec.kind == "mldsa":
        key = _ML_DSA[spec.size].generate()
    elif spec.kind == "mlkem" and spec.size in _ML_KEM:
        key = _ML_KEM[spec.size].generate()
    else:
        raise KeyMaterialError(f"{spec.name} is not an asymmetric key spec")
    return _private_der(key)


def generate_hmac_key(spec: SpecInfo) -> bytes:
    """Fresh HMAC key material: as many random bytes as the spec's digest (AWS)."""
    return _wrap.random_bytes(spec.size)


def generate_data_key_pair(spec: str) -> tuple[bytes, bytes]:
    """A data key pair: ``(PKCS#8 DER private key, DER SubjectPublicKeyInfo)``.

    RSA-4096 takes up to ~1 s (perf-baseline §2.1): call it from a worker thread.
    """
    kind, param = DATA_KEY_PAIR_SPECS[spec]
    key: _Private
    if kind == "rsa":
        assert isinstance(param, int)
        key = rsa.generate_private_key(public_exponent=_RSA_E, key_size=param)
    elif kind == "ec":
        key = ec.generate_private_key(_CURVES[str(param)]())
    elif kind == "mlkem":
        assert isinstance(param, int)
        key = _ML_KEM[param].generate()
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    return _private_der(key), _spki(key)


@dataclass(frozen=True, slots=True)
class AsymmetricKey:
    """One asymmetric KMS key's private half, checked against its spec at load.

    Build with :meth:`load`. Every method takes AWS algorithm names; callers check that the
    algorithm belongs to the key's spec and usage first (:mod:`kms.keyspecs`).
    """

    spec: SpecInfo
    _key: _Private

    @classmethod
    def load(cls, spec: SpecInfo, der: bytes) -> AsymmetricKey:
        """Load PKCS#8 DER material for ``spec`` (generated here or imported).

        Raises:
            KeyMaterialError: not PKCS#8 DER, or a key of another type, size or curve.
        """
        try:
            key = serialization.load_der_private_key(der, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyMaterialError("the key material is not an unencrypted PKCS#8 key") from None
        if spec.kind == "rsa":
            ok = isinstance(key, rsa.RSAPrivateKey) and key.key_size == spec.size
        elif spec.kind == "ec":
            ok = isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == spec.curve
        elif spec.kind == "mldsa":
            ok = isinstance(key, _ML_DSA[spec.size])
        elif spec.kind == "mlkem":
            ok = spec.size in _ML_KEM and isinstance(key, _ML_KEM[spec.size])
        else:
            ok = spec.kind == "ed25519" and isinstance(key, ed25519.Ed25519PrivateKey)
        if not ok:
            raise KeyMaterialError(f"the key material is not a {spec.name} private key")
        assert isinstance(
            key,
            rsa.RSAPrivateKey
            | ec.EllipticCurvePrivateKey
            | ed25519.Ed25519PrivateKey
            | _MlDsaPrivate
            | _MlKemPrivate,
        )
        return cls(spec, key)

    def public_der(self) -> bytes:
        """The DER SubjectPublicKeyInfo (GetPublicKey)."""
        return _spki(self._key)

    # -- signing

    def _hash_input(
        self, algorithm: str, message: bytes, digest: bool
    ) -> tuple[hashes.HashAlgorithm | Prehashed, bytes]:
        name = HASH_OF[algorithm]
        if digest:
            if len(message) != DIGEST_BYTES[name]:
                raise ValueError(
                    f"a DIGEST message for {algorithm} must be {DIGEST_BYTES[name]} bytes"
                )
            return Prehashed(_hash(name)), message
        return _hash(name), message

    def sign(self, algorithm: str, message: bytes, *, digest: bool, mu: bool = False) -> bytes:
        """Sign ``message`` (or, with ``digest``, the given digest) with ``algorithm``.

        ``mu``: ``message`` is ML-DSA's 64-byte external mu (FIPS 204 §6.2), signed as is.

        Raises:
            ValueError: a DIGEST message of the wrong length, DIGEST with Ed25519 or ML-DSA,
                EXTERNAL_MU with another key or of the wrong length.
        """
        key = self._key
        if isinstance(key, _MlDsaPrivate):
            if self._ml_dsa_input(message, digest=digest, mu=mu):
                return key.sign_mu(message)
            return key.sign(message)
        if mu:
            raise ValueError("MessageType EXTERNAL_MU is valid only with ML-DSA keys")
        if isinstance(key, _MlKemPrivate):
            raise ValueError(f"{self.spec.name} keys do not sign")
        if isinstance(key, ed25519.Ed25519PrivateKey):
            if digest:
                raise ValueError("ED25519_SHA_512 signs RAW messages only")
            return key.sign(message)
        algo, data = self._hash_input(algorithm, message, digest)
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, self._rsa_padding(algorithm), algo)
        return key.sign(data, ec.ECDSA(algo))

    @staticmethod
    def _ml_dsa_input(message: bytes, *, digest: bool, mu: bool) -> bool:
        """Check an ML-DSA message's type; True if it is an external mu."""
        if digest:
            raise ValueError("ML_DSA_SHAKE_256 takes MessageType RAW or EXTERNAL_MU, not DIGEST")
        if mu and len(message) != ML_DSA_MU_BYTES:
            raise ValueError(f"an EXTERNAL_MU message must be {ML_DSA_MU_BYTES} bytes")
        return mu

    def verify(
        self, algorithm: str, message: bytes, signature: bytes, *, digest: bool, mu: bool = False
    ) -> bool:
        """True if ``signature`` is valid for ``message`` (raises ValueError as :meth:`sign`)."""
        public = self._key.public_key()
        if isinstance(public, _MlKemPublic):
            raise ValueError(f"{self.spec.name} keys do not verify")
        if mu and not isinstance(public, _MlDsaPublic):
            raise ValueError("MessageType EXTERNAL_MU is valid only with ML-DSA keys")
        try:
            if isinstance(public, _MlDsaPublic):
                if self._ml_dsa_input(message, digest=digest, mu=mu):
                    public.verify_mu(signature, message)
                else:
                    public.verify(signature, message)
                return True
            if isinstance(public, ed25519.Ed25519PublicKey):
                if digest:
                    raise ValueError("ED25519_SHA_512 verifies RAW messages only")
                public.verify(signature, message)
                return True
            algo, data = self._hash_input(algorithm, message, digest)
            if isinstance(public, rsa.RSAPublicKey):
                public.verify(signature, data, self._rsa_padding(algorithm), algo)
            else:
                assert isinstance(public, ec.EllipticCurvePublicKey)
                public.verify(signature, data, ec.ECDSA(algo))
        except InvalidSignature:
            return False
        return True

    @staticmethod
    def _rsa_padding(algorithm: str) -> asym_padding.AsymmetricPadding:
        if algorithm.startswith("RSASSA_PSS_"):
            h = _hash(HASH_OF[algorithm])
            # AWS: MGF1 with the message hash, salt length = digest length.
            return asym_padding.PSS(mgf=asym_padding.MGF1(h), salt_length=h.digest_size)
        return asym_padding.PKCS1v15()

    # -- RSA encryption

    def _rsa(self) -> rsa.RSAPrivateKey:
        if not isinstance(self._key, rsa.RSAPrivateKey):
            raise ValueError("not an RSA key")
        return self._key

    def encrypt(self, algorithm: str, plaintext: bytes) -> bytes:
        """RSAES-OAEP (``RSAES_OAEP_SHA_1`` or ``RSAES_OAEP_SHA_256``) to the public half."""
        return self._rsa().public_key().encrypt(plaintext, _oaep(algorithm))

    def decrypt(self, algorithm: str, ciphertext: bytes) -> bytes:
        """Inverse of :meth:`encrypt`; opaque :class:`CiphertextFormatError` on any failure."""
        try:
            return self._rsa().decrypt(ciphertext, _oaep(algorithm))
        except ValueError:
            raise CiphertextFormatError("RSA decryption failed") from None

    # -- ML-KEM (FIPS 203)

    def _ml_kem(self) -> _MlKemPrivate:
        if not isinstance(self._key, _MlKemPrivate):
            raise ValueError("not an ML-KEM key")
        return self._key

    def encapsulate(self) -> tuple[bytes, bytes]:
        """ML-KEM.Encaps to the public half: ``(32-byte shared secret, ciphertext)``."""
        return self._ml_kem().public_key().encapsulate()

    def decapsulate(self, ciphertext: bytes) -> bytes:
        """ML-KEM.Decaps: the 32-byte shared secret.

        A ciphertext of the right length always yields a secret: one that was not made for
        this key yields an unrelated pseudo-random value (FIPS 203 implicit rejection), so
        nothing tells a forger what went wrong.

        Raises:
            CiphertextFormatError: the ciphertext's length is not the parameter set's.
        """
        key = self._ml_kem()
        if len(ciphertext) != ML_KEM_CIPHERTEXT_BYTES[self.spec.size]:
            raise CiphertextFormatError(
                f"an {self.spec.name} ciphertext is {ML_KEM_CIPHERTEXT_BYTES[self.spec.size]} "
                "bytes"
            )
        try:
            return key.decapsulate(ciphertext)
        except ValueError:  # only a malformed length reaches here, checked above
            raise CiphertextFormatError("ML-KEM decapsulation failed") from None

    # -- key agreement

    def derive_shared_secret(self, peer_spki: bytes) -> bytes:
        """ECDH with the peer's DER SPKI public key: the raw shared secret (x coordinate).

        Raises:
            ValueError: not DER SPKI, not an EC key, or not on this key's curve.
        """
        key = self._key
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("not an elliptic-curve key")
        try:
            peer = serialization.load_der_public_key(peer_spki)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("the public key is not a DER-encoded SubjectPublicKeyInfo") from None
        if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != key.curve.name:
            raise ValueError(f"the public key is not on the key's curve ({key.curve.name})")
        return key.exchange(ec.ECDH(), peer)


class HmacKey:
    """One HMAC KMS key: ``mac`` and a constant-time ``verify``."""

    __slots__ = ("_key", "algorithm")

    def __init__(self, algorithm: str, key: bytes) -> None:
        self.algorithm = algorithm
        self._key = key

    def mac(self, message: bytes) -> bytes:
        """The HMAC of ``message`` under the key's algorithm."""
        h = _hmac.HMAC(self._key, _hash(HASH_OF[self.algorithm]))
        h.update(message)
        return h.finalize()

    def verify(self, message: bytes, tag: bytes) -> bool:
        """True if ``tag`` is the HMAC of ``message`` (compared in constant time)."""
        h = _hmac.HMAC(self._key, _hash(HASH_OF[self.algorithm]))
        h.update(message)
        try:
            h.verify(tag)
        except InvalidSignature:
            return False
        return True


# -- BYOK ---------------------------------------------------------------------------------------


def generate_wrapping_key(bits: int) -> bytes:
    """A fresh RSA wrapping key pair for GetParametersForImport (PKCS#8 DER; use a thread)."""
    return _private_der(rsa.generate_private_key(public_exponent=_RSA_E, key_size=bits))


def wrapping_public_key(private_der: bytes) -> bytes:
    """The DER SPKI of a wrapping key (the PublicKey GetParametersForImport returns)."""
    key = serialization.load_der_private_key(private_der, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return _spki(key)


#: Wrapping algorithms → the OAEP hash they use.
_WRAPPING = {
    "RSAES_OAEP_SHA_1": "RSAES_OAEP_SHA_1",
    "RSAES_OAEP_SHA_256": "RSAES_OAEP_SHA_256",
    "RSA_AES_KEY_WRAP_SHA_1": "RSAES_OAEP_SHA_1",
    "RSA_AES_KEY_WRAP_SHA_256": "RSAES_OAEP_SHA_256",
}


def unwrap_import(private_der: bytes, algorithm: str, encrypted: bytes) -> bytes:
    """Recover imported key material wrapped under a wrapping key.

    ``RSAES_OAEP_*``: the material itself is RSA-OAEP encrypted. ``RSA_AES_KEY_WRAP_*``: the
    first ``k`` bytes (the modulus length) are an RSA-OAEP encrypted AES-256 key, the rest the
    material under AES Key Wrap with Padding (RFC 5649) with that key, as AWS and OpenSSL's
    ``id-aes256-wrap-pad`` produce it.

    Raises:
        CiphertextFormatError: the blob does not decrypt (opaque: wrong key, tampered, wrong
            algorithm all look the same).
    """
    key = serialization.load_der_private_key(private_der, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    oaep = _oaep(_WRAPPING[algorithm])
    try:
        if algorithm.startswith("RSAES_OAEP_"):
            return key.decrypt(encrypted, oaep)
        k = key.key_size // 8
        if len(encrypted) <= k:
            raise ValueError("no wrapped material after the RSA block")
        aes_key = key.decrypt(encrypted[:k], oaep)
        if len(aes_key) != _wrap.AES_KEY_BYTES:
            raise ValueError("the ephemeral key is not AES-256")
        return aes_key_unwrap_with_padding(aes_key, encrypted[k:])
    except (ValueError, InvalidUnwrap):
        raise CiphertextFormatError("the key material does not unwrap") from None


def material_id(key_id: str, material: bytes) -> str:
    """The KeyMaterialId of ``material`` in key ``key_id`` (64 lower-case hex digits).

    Deterministic, so a re-import of the same material is recognised (AWS: "based on the KMS key
    ID and the imported key material"); keyed by the material, so it discloses nothing of it.
    """
    h = _hmac.HMAC(material, hashes.SHA256())
    h.update(MATERIAL_ID_LABEL + key_id.encode())
    return h.finalize().hex()
