"""What each KMS key spec is for: key usages and algorithms, as AWS documents them (pure).

One table (:data:`SPECS`) drives CreateKey's validation, DescribeKey's algorithm lists, the
key-usage checks of every cryptographic operation and GetPublicKey's answer. A spec that
``cryptography`` cannot implement here is listed with ``supported=False``: CreateKey answers
UnsupportedOperationException naming it, never a half-working key.

Sources: the AWS KMS developer guide's key spec reference (symmetric, RSA, ECC, HMAC, SM2,
ML-DSA, ML-KEM) and botocore's service model (the enum values).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SpecInfo",
    "SPECS",
    "SYMMETRIC",
    "ENCRYPT_DECRYPT",
    "SIGN_VERIFY",
    "GENERATE_VERIFY_MAC",
    "KEY_AGREEMENT",
    "ENCAPSULATE_DECAPSULATE",
    "ML_DSA_SIGNING",
    "ML_DSA_MU_BYTES",
    "ML_KEM",
    "HASH_OF",
    "DIGEST_BYTES",
    "MAC_ALGORITHMS",
    "HMAC_MAX_BYTES",
    "CMK_SPECS",
    "UNSUPPORTED_SIGNING",
    "UNSUPPORTED_SPECS",
    "spec_info",
    "rsa_max_plaintext",
]

SYMMETRIC = "SYMMETRIC_DEFAULT"
ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
SIGN_VERIFY = "SIGN_VERIFY"
GENERATE_VERIFY_MAC = "GENERATE_VERIFY_MAC"
KEY_AGREEMENT = "KEY_AGREEMENT"
ENCAPSULATE_DECAPSULATE = "ENCAPSULATE_DECAPSULATE"
#: The one signing algorithm of ML-DSA keys (FIPS 204 ML-DSA, whose hash is SHAKE256).
ML_DSA_SIGNING = "ML_DSA_SHAKE_256"
#: EXTERNAL_MU messages are the 64-byte message representative mu (FIPS 204 §6.2, line 6).
ML_DSA_MU_BYTES = 64
#: The one encapsulation algorithm of ML-KEM keys (FIPS 203).
ML_KEM = "ML_KEM"

_RSA_SIGNING = (
    "RSASSA_PSS_SHA_256",
    "RSASSA_PSS_SHA_384",
    "RSASSA_PSS_SHA_512",
    "RSASSA_PKCS1_V1_5_SHA_256",
    "RSASSA_PKCS1_V1_5_SHA_384",
    "RSASSA_PKCS1_V1_5_SHA_512",
)
_RSA_ENCRYPTION = ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256")

#: The hash each signing/MAC algorithm names (RAW messages are hashed with it; DIGEST messages
#: must be exactly its size).
HASH_OF: dict[str, str] = {
    **{alg: "SHA" + alg[-4:].replace("_", "") for alg in _RSA_SIGNING},
    "ECDSA_SHA_256": "SHA256",
    "ECDSA_SHA_384": "SHA384",
    "ECDSA_SHA_512": "SHA512",
    "ED25519_SHA_512": "SHA512",
    "ED25519_PH_SHA_512": "SHA512",
    "HMAC_SHA_224": "SHA224",
    "HMAC_SHA_256": "SHA256",
    "HMAC_SHA_384": "SHA384",
    "HMAC_SHA_512": "SHA512",
}
#: Digest sizes in bytes.
DIGEST_BYTES = {"SHA224": 28, "SHA256": 32, "SHA384": 48, "SHA512": 64, "SHA1": 20}

#: Signing algorithms of a supported spec that this KMS still refuses, with the reason (the
#: message of the UnsupportedOperationException). Ed25519ph (RFC 8032 with a prehash and dom2
#: prefix) is not offered by ``cryptography``; a pure-Python signer would not be constant time.
UNSUPPORTED_SIGNING: dict[str, str] = {
    "ED25519_PH_SHA_512": "ED25519_PH_SHA_512 (Ed25519ph) is not supported by this KMS: the "
    "cryptography library offers no Ed25519ph signer. Use ED25519_SHA_512 with MessageType RAW.",
}

#: Why CreateKey refuses a spec with ``supported=False`` (the end of its
#: UnsupportedOperationException message).
UNSUPPORTED_SPECS: dict[str, str] = {
    "SM2": "SM2 (China Regions only) is not offered by the cryptography library",
    "ML_KEM_512": "the cryptography library offers ML-KEM-768 and ML-KEM-1024 only; "
    "use ML_KEM_768 or ML_KEM_1024",
}

#: Imported HMAC material may be as long as the hash's block size (AWS: 28..64 bytes for
#: HMAC_224, 32..64 for HMAC_256, 48..128 for HMAC_384, 64..128 for HMAC_512).
HMAC_MAX_BYTES = {"HMAC_224": 64, "HMAC_256": 64, "HMAC_384": 128, "HMAC_512": 128}

#: HMAC key spec → its one MAC algorithm.
MAC_ALGORITHMS = {
    "HMAC_224": "HMAC_SHA_224",
    "HMAC_256": "HMAC_SHA_256",
    "HMAC_384": "HMAC_SHA_384",
    "HMAC_512": "HMAC_SHA_512",
}


@dataclass(frozen=True, slots=True)
class SpecInfo:
    """One key spec.

    Attributes:
        name: the KeySpec value.
        kind: ``symmetric`` | ``rsa`` | ``ec`` | ``ed25519`` | ``mldsa`` | ``mlkem`` | ``hmac``
            | ``other``.
        usages: the KeyUsage values the spec allows, the default first.
        signing: SigningAlgorithms (SIGN_VERIFY keys).
        encryption: EncryptionAlgorithms (ENCRYPT_DECRYPT keys).
        mac: MacAlgorithms (HMAC keys).
        agreement: KeyAgreementAlgorithms (KEY_AGREEMENT keys).
        encapsulation: EncapsulationAlgorithms (ENCAPSULATE_DECAPSULATE keys).
        size: RSA modulus bits, HMAC key bytes, the ML-DSA / ML-KEM parameter set, or 0.
        curve: the EC curve name (``secp256r1``...), or "".
        supported: this KMS can create keys of this spec.
    """

    name: str
    kind: str
    usages: tuple[str, ...]
    signing: tuple[str, ...] = ()
    encryption: tuple[str, ...] = ()
    mac: tuple[str, ...] = ()
    agreement: tuple[str, ...] = ()
    encapsulation: tuple[str, ...] = ()
    size: int = 0
    curve: str = ""
    supported: bool = True

    @property
    def asymmetric(self) -> bool:
        """RSA, elliptic-curve, ML-DSA or ML-KEM: has a public key (GetPublicKey)."""
        return self.kind in ("rsa", "ec", "ed25519", "mldsa", "mlkem")

    def algorithms(self, usage: str) -> dict[str, list[str]]:
        """The KeyMetadata algorithm lists of a key of this spec and ``usage``."""
        if usage == ENCRYPT_DECRYPT:
            return {"EncryptionAlgorithms": list(self.encryption)}
        if usage == SIGN_VERIFY:
            return {"SigningAlgorithms": list(self.signing)}
        if usage == GENERATE_VERIFY_MAC:
            return {"MacAlgorithms": list(self.mac)}
        if usage == KEY_AGREEMENT:
            return {"KeyAgreementAlgorithms": list(self.agreement)}
        if usage == ENCAPSULATE_DECAPSULATE:
            return {"EncapsulationAlgorithms": list(self.encapsulation)}
        return {}


def _rsa(bits: int) -> SpecInfo:
    return SpecInfo(
        f"RSA_{bits}",
        "rsa",
        (ENCRYPT_DECRYPT, SIGN_VERIFY),
        signing=_RSA_SIGNING,
        encryption=_RSA_ENCRYPTION,
        size=bits,
    )


def _ec(name: str, curve: str, ecdsa: str, *, agreement: bool = True) -> SpecInfo:
    return SpecInfo(
        name,
        "ec",
        (SIGN_VERIFY, KEY_AGREEMENT) if agreement else (SIGN_VERIFY,),
        signing=(ecdsa,),
        agreement=("ECDH",) if agreement else (),
        curve=curve,
    )


def _hmac(bits: int) -> SpecInfo:
    name = f"HMAC_{bits}"
    return SpecInfo(
        name, "hmac", (GENERATE_VERIFY_MAC,), mac=(MAC_ALGORITHMS[name],), size=bits // 8
    )


#: Every KeySpec of the model. ``usages[0]`` is not a default: AWS requires KeyUsage for every
#: asymmetric spec that allows more than one (ValidationException otherwise).
SPECS: dict[str, SpecInfo] = {
    s.name: s
    for s in (
        SpecInfo(SYMMETRIC, "symmetric", (ENCRYPT_DECRYPT,), encryption=(SYMMETRIC,)),
        _rsa(2048),
        _rsa(3072),
        _rsa(4096),
        _ec("ECC_NIST_P256", "secp256r1", "ECDSA_SHA_256"),
        _ec("ECC_NIST_P384", "secp384r1", "ECDSA_SHA_384"),
        _ec("ECC_NIST_P521", "secp521r1", "ECDSA_SHA_512"),
        # secp256k1 is for signing only (blockchain use), as in AWS.
        _ec("ECC_SECG_P256K1", "secp256k1", "ECDSA_SHA_256", agreement=False),
        SpecInfo(
            "ECC_NIST_EDWARDS25519",
            "ed25519",
            (SIGN_VERIFY,),
            signing=("ED25519_SHA_512", "ED25519_PH_SHA_512"),
        ),
        _hmac(224),
        _hmac(256),
        _hmac(384),
        _hmac(512),
        # China Regions only (SM2/SM3/SM4): not in cryptography.
        SpecInfo(
            "SM2",
            "other",
            (ENCRYPT_DECRYPT, SIGN_VERIFY, KEY_AGREEMENT),
            signing=("SM2DSA",),
            encryption=("SM2PKE",),
            agreement=("ECDH",),
            supported=False,
        ),
        # Post-quantum (FIPS 204 signatures, FIPS 203 key encapsulation).
        *(
            SpecInfo(f"ML_DSA_{n}", "mldsa", (SIGN_VERIFY,), (ML_DSA_SIGNING,), size=n)
            for n in (44, 65, 87)
        ),
        # ML_KEM_512: refused (UNSUPPORTED_SPECS says why).
        *(
            SpecInfo(
                f"ML_KEM_{n}",
                "mlkem",
                (ENCAPSULATE_DECAPSULATE,),
                encapsulation=(ML_KEM,),
                size=n,
                supported=n != 512,
            )
            for n in (512, 768, 1024)
        ),
    )
}


#: The values of the deprecated CustomerMasterKeySpec field (its enum stopped growing; keys of
#: newer specs answer without it).
CMK_SPECS = frozenset(
    {
        "RSA_2048",
        "RSA_3072",
        "RSA_4096",
        "ECC_NIST_P256",
        "ECC_NIST_P384",
        "ECC_NIST_P521",
        "ECC_SECG_P256K1",
        "SYMMETRIC_DEFAULT",
        "HMAC_224",
        "HMAC_256",
        "HMAC_384",
        "HMAC_512",
        "SM2",
    }
)


def spec_info(name: str) -> SpecInfo:
    """The table entry of a stored key's spec (KeyError only for a corrupt record)."""
    return SPECS[name]


def rsa_max_plaintext(bits: int, algorithm: str) -> int:
    """The largest plaintext RSAES-OAEP takes: k - 2*hLen - 2 bytes (RFC 8017 §7.1.1)."""
    h = DIGEST_BYTES["SHA1" if algorithm == "RSAES_OAEP_SHA_1" else "SHA256"]
    return bits // 8 - 2 * h - 2
