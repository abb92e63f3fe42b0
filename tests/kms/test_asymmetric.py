"""Asymmetric, HMAC and key-agreement keys through boto3 and the AWS CLI against a real daemon.

Every signature and public key is checked independently: with ``cryptography`` and with the
system ``openssl``. Shared secrets are recomputed locally from the KMS key's public half.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from attest.ca import LocalCA
from kms import cms

from .conftest import boto_client
from .helpers import ADMIN, DaemonThread, FakeEnclave, aws_cli, openssl

pytestmark = pytest.mark.timeout(120)

_HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_RSA_SIGNING = [
    "RSASSA_PSS_SHA_256",
    "RSASSA_PSS_SHA_384",
    "RSASSA_PSS_SHA_512",
    "RSASSA_PKCS1_V1_5_SHA_256",
    "RSASSA_PKCS1_V1_5_SHA_384",
    "RSASSA_PKCS1_V1_5_SHA_512",
]
#: (key spec, signing algorithm): every algorithm of every signing spec.
_SIGNING = [
    *((f"RSA_{bits}", alg) for bits in (2048, 3072, 4096) for alg in _RSA_SIGNING),
    ("ECC_NIST_P256", "ECDSA_SHA_256"),
    ("ECC_NIST_P384", "ECDSA_SHA_384"),
    ("ECC_NIST_P521", "ECDSA_SHA_512"),
    ("ECC_SECG_P256K1", "ECDSA_SHA_256"),
    ("ECC_NIST_EDWARDS25519", "ED25519_SHA_512"),
]
_MESSAGE = b"the message a model owner signs"


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


@pytest.fixture(scope="module")
def admin(daemon: DaemonThread) -> Any:
    return boto_client(daemon.endpoint, ADMIN)


@pytest.fixture(scope="module")
def keys(admin: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """One key per (spec, usage) this module uses, created once."""
    wanted = {(spec, "SIGN_VERIFY") for spec, _ in _SIGNING}
    wanted |= {(f"RSA_{b}", "ENCRYPT_DECRYPT") for b in (2048, 3072, 4096)}
    wanted |= {(f"ECC_NIST_P{n}", "KEY_AGREEMENT") for n in (256, 384, 521)}
    wanted |= {(f"HMAC_{n}", "GENERATE_VERIFY_MAC") for n in (224, 256, 384, 512)}
    return {
        (spec, usage): admin.create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]
        for spec, usage in sorted(wanted)
    }


def _public(admin: Any, key_id: str) -> Any:
    out = admin.get_public_key(KeyId=key_id)
    return serialization.load_der_public_key(out["PublicKey"]), out


def _verify_locally(public: Any, alg: str, message: bytes, signature: bytes, digest: bool) -> None:
    """Verify with cryptography as AWS documents the algorithms (raises InvalidSignature)."""
    h = _HASH.get(alg[-3:], hashes.SHA512)()
    data_hash: Any = Prehashed(h) if digest else h
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, message)
    elif isinstance(public, rsa.RSAPublicKey):
        pad: Any = (
            padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
            if "PSS" in alg
            else padding.PKCS1v15()
        )
        public.verify(signature, message, pad, data_hash)
    else:
        public.verify(signature, message, ec.ECDSA(data_hash))


def _verify_with_openssl(tmp: Path, public_der: bytes, alg: str, signature: bytes) -> None:
    (tmp / "pub.der").write_bytes(public_der)
    code, _, err = openssl(
        "pkey",
        "-pubin",
        "-inform",
        "DER",
        "-in",
        str(tmp / "pub.der"),
        "-out",
        str(tmp / "pub.pem"),
    )
    assert code == 0, err
    (tmp / "msg").write_bytes(_MESSAGE)
    (tmp / "sig").write_bytes(signature)
    if alg.startswith("ED25519"):
        args = ["pkeyutl", "-verify", "-pubin", "-inkey", str(tmp / "pub.pem"), "-rawin"]
        args += ["-in", str(tmp / "msg"), "-sigfile", str(tmp / "sig")]
    else:
        args = ["dgst", f"-sha{alg[-3:]}", "-verify", str(tmp / "pub.pem")]
        if "PSS" in alg:
            args += ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"]
        args += ["-signature", str(tmp / "sig"), str(tmp / "msg")]
    code, out, err = openssl(*args)
    assert code == 0, err
    assert b"Verified" in out + err, (out, err)


def test_metadata_and_public_keys(
    admin: Any, keys: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    for (spec, usage), meta in keys.items():
        assert meta["KeySpec"] == spec
        assert meta["KeyUsage"] == usage
        assert meta["KeyState"] == "Enabled"
        assert "CurrentKeyMaterialId" not in meta  # symmetric keys only (AWS)
        if usage == "GENERATE_VERIFY_MAC":
            assert meta["MacAlgorithms"] == [f"HMAC_SHA_{spec[5:]}"]
            with pytest.raises(ClientError) as e:
                admin.get_public_key(KeyId=meta["KeyId"])
            assert _code(e) == "UnsupportedOperationException"
            continue
        public, out = _public(admin, meta["KeyId"])
        assert out["KeySpec"] == spec
        assert out["KeyUsage"] == usage
        if spec.startswith("RSA"):
            assert isinstance(public, rsa.RSAPublicKey)
            assert public.key_size == int(spec[4:])
        elif spec == "ECC_NIST_EDWARDS25519":
            assert isinstance(public, ed25519.Ed25519PublicKey)
            assert out["SigningAlgorithms"] == ["ED25519_SHA_512", "ED25519_PH_SHA_512"]
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            curve = {"P256": "secp256r1", "P384": "secp384r1", "P521": "secp521r1"}
            assert public.curve.name == curve.get(spec[-4:], "secp256k1")
        if usage == "ENCRYPT_DECRYPT":
            assert out["EncryptionAlgorithms"] == ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]
        if usage == "KEY_AGREEMENT":
            assert out["KeyAgreementAlgorithms"] == ["ECDH"]
        # openssl reads the same DER SubjectPublicKeyInfo.
        (tmp_path / "k.der").write_bytes(out["PublicKey"])
        code, _text, err = openssl(
            "pkey", "-pubin", "-inform", "DER", "-in", str(tmp_path / "k.der"), "-noout", "-text"
        )
        assert code == 0, err


@pytest.mark.parametrize(
    ("spec", "alg", "message_type"),
    [
        (spec, alg, kind)
        for spec, alg in _SIGNING
        for kind in ("RAW", "DIGEST")
        # ED25519_SHA_512 takes RAW messages only (refused otherwise: test_sign_rules).
        if not (alg == "ED25519_SHA_512" and kind == "DIGEST")
    ],
)
def test_sign_verify(
    admin: Any,
    keys: dict[tuple[str, str], dict[str, Any]],
    tmp_path: Path,
    spec: str,
    alg: str,
    message_type: str,
) -> None:
    key_id = keys[(spec, "SIGN_VERIFY")]["KeyId"]
    public, out = _public(admin, key_id)
    h = _HASH.get(alg[-3:], hashes.SHA512)
    message = _MESSAGE
    if message_type == "DIGEST":
        d = hashes.Hash(h())
        d.update(_MESSAGE)
        message = d.finalize()
    signed = admin.sign(
        KeyId=key_id, Message=message, MessageType=message_type, SigningAlgorithm=alg
    )
    assert signed["SigningAlgorithm"] == alg
    assert signed["KeyId"].endswith(key_id)
    signature = signed["Signature"]
    # Independently: a DIGEST signature is a signature over the message it digests.
    _verify_locally(public, alg, message, signature, digest=message_type == "DIGEST")
    _verify_locally(public, alg, _MESSAGE, signature, digest=False)
    _verify_with_openssl(tmp_path, out["PublicKey"], alg, signature)
    ok = admin.verify(
        KeyId=key_id,
        Message=message,
        MessageType=message_type,
        Signature=signature,
        SigningAlgorithm=alg,
    )
    assert ok["SignatureValid"] is True
    with pytest.raises(ClientError) as e:  # AWS answers an error, not SignatureValid=false
        admin.verify(
            KeyId=key_id,
            Message=bytes([message[0] ^ 1]) + message[1:],
            MessageType=message_type,
            Signature=signature,
            SigningAlgorithm=alg,
        )
    assert _code(e) == "KMSInvalidSignatureException"
    with pytest.raises(InvalidSignature):
        _verify_locally(public, alg, b"another message", signature, digest=False)


def test_sign_rules(admin: Any, keys: dict[tuple[str, str], dict[str, Any]]) -> None:
    rsa_key = keys[("RSA_2048", "SIGN_VERIFY")]["KeyId"]
    ed_key = keys[("ECC_NIST_EDWARDS25519", "SIGN_VERIFY")]["KeyId"]
    cases = [
        # a DIGEST of the wrong length for the algorithm's hash
        (rsa_key, "RSASSA_PSS_SHA_384", "DIGEST", b"x" * 32, "ValidationException"),
        # an algorithm of another spec
        (rsa_key, "ECDSA_SHA_256", "RAW", _MESSAGE, "InvalidKeyUsageException"),
        (ed_key, "ED25519_SHA_512", "DIGEST", b"x" * 64, "ValidationException"),
        (ed_key, "ED25519_PH_SHA_512", "RAW", _MESSAGE, "ValidationException"),
        # ML-DSA's external mu on a key that is not ML-DSA
        (rsa_key, "RSASSA_PSS_SHA_256", "EXTERNAL_MU", b"x" * 64, "ValidationException"),
    ]
    for key_id, alg, kind, message, code in cases:
        with pytest.raises(ClientError) as e:
            admin.sign(KeyId=key_id, Message=message, MessageType=kind, SigningAlgorithm=alg)
        assert _code(e) == code, (alg, kind)
    with pytest.raises(ClientError) as e:  # Ed25519ph: refused, and the message says why
        admin.sign(
            KeyId=ed_key,
            Message=hashlib.sha512(_MESSAGE).digest(),
            MessageType="DIGEST",
            SigningAlgorithm="ED25519_PH_SHA_512",
        )
    assert _code(e) == "UnsupportedOperationException"
    assert "ED25519_PH_SHA_512" in e.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as e:  # DryRun: authorized, nothing signed
        admin.sign(
            KeyId=rsa_key, Message=_MESSAGE, SigningAlgorithm="RSASSA_PSS_SHA_256", DryRun=True
        )
    assert _code(e) == "DryRunOperationException"


@pytest.mark.parametrize("bits", [2048, 3072, 4096])
@pytest.mark.parametrize("alg", ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"])
def test_rsa_encrypt_decrypt(
    admin: Any, keys: dict[tuple[str, str], dict[str, Any]], tmp_path: Path, bits: int, alg: str
) -> None:
    key_id = keys[(f"RSA_{bits}", "ENCRYPT_DECRYPT")]["KeyId"]
    public, out = _public(admin, key_id)
    h = hashes.SHA1() if alg.endswith("_1") else hashes.SHA256()
    # Encrypted locally to the public key: KMS decrypts it.
    local = public.encrypt(b"owner secret", padding.OAEP(padding.MGF1(h), h, None))
    dec = admin.decrypt(CiphertextBlob=local, KeyId=key_id, EncryptionAlgorithm=alg)
    assert dec["Plaintext"] == b"owner secret"
    assert dec["EncryptionAlgorithm"] == alg
    assert "KeyMaterialId" not in dec  # symmetric keys only
    # Encrypted by KMS: it decrypts its own.
    enc = admin.encrypt(KeyId=key_id, Plaintext=b"kms secret", EncryptionAlgorithm=alg)
    assert enc["EncryptionAlgorithm"] == alg
    assert len(enc["CiphertextBlob"]) == bits // 8
    dec = admin.decrypt(CiphertextBlob=enc["CiphertextBlob"], KeyId=key_id, EncryptionAlgorithm=alg)
    assert dec["Plaintext"] == b"kms secret"
    # Encrypted by openssl (OAEP, MGF1 with the same hash): KMS decrypts it.
    (tmp_path / "pub.der").write_bytes(out["PublicKey"])
    (tmp_path / "plain").write_bytes(b"from openssl")
    md = "sha1" if alg.endswith("_1") else "sha256"
    code, _, err = openssl(
        "pkeyutl", "-encrypt", "-pubin", "-keyform", "DER", "-inkey", str(tmp_path / "pub.der"),
        "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", f"rsa_oaep_md:{md}",
        "-pkeyopt", f"rsa_mgf1_md:{md}", "-in", str(tmp_path / "plain"),
        "-out", str(tmp_path / "ct"),
    )  # fmt: skip
    assert code == 0, err
    dec = admin.decrypt(
        CiphertextBlob=(tmp_path / "ct").read_bytes(), KeyId=key_id, EncryptionAlgorithm=alg
    )
    assert dec["Plaintext"] == b"from openssl"
    # The other OAEP hash does not decrypt it; the failure is opaque.
    other = "RSAES_OAEP_SHA_256" if alg.endswith("_1") else "RSAES_OAEP_SHA_1"
    with pytest.raises(ClientError) as e:
        admin.decrypt(CiphertextBlob=local, KeyId=key_id, EncryptionAlgorithm=other)
    assert _code(e) == "InvalidCiphertextException"
    # RSAES-OAEP takes at most k - 2*hLen - 2 bytes.
    limit = bits // 8 - 2 * h.digest_size - 2
    admin.encrypt(KeyId=key_id, Plaintext=b"x" * limit, EncryptionAlgorithm=alg)
    with pytest.raises(ClientError) as e:
        admin.encrypt(KeyId=key_id, Plaintext=b"x" * (limit + 1), EncryptionAlgorithm=alg)
    assert _code(e) == "ValidationException"


def test_rsa_decrypt_rules(admin: Any, keys: dict[tuple[str, str], dict[str, Any]]) -> None:
    key_id = keys[("RSA_2048", "ENCRYPT_DECRYPT")]["KeyId"]
    blob = admin.encrypt(KeyId=key_id, Plaintext=b"s", EncryptionAlgorithm="RSAES_OAEP_SHA_256")[
        "CiphertextBlob"
    ]
    with pytest.raises(ClientError) as e:  # an asymmetric ciphertext names no key: KeyId needed
        admin.decrypt(CiphertextBlob=blob, EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    assert _code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:  # RSA keys take no SYMMETRIC_DEFAULT
        admin.encrypt(KeyId=key_id, Plaintext=b"s")
    assert _code(e) == "InvalidKeyUsageException"
    with pytest.raises(ClientError) as e:  # nor an encryption context
        admin.encrypt(
            KeyId=key_id,
            Plaintext=b"s",
            EncryptionAlgorithm="RSAES_OAEP_SHA_256",
            EncryptionContext={"a": "b"},
        )
    assert _code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:  # data keys come from symmetric keys only
        admin.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert _code(e) == "InvalidKeyUsageException"
    sign_key = keys[("RSA_2048", "SIGN_VERIFY")]["KeyId"]
    with pytest.raises(ClientError) as e:
        admin.encrypt(KeyId=sign_key, Plaintext=b"s", EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    assert _code(e) == "InvalidKeyUsageException"
    # A symmetric key re-encrypts an RSA ciphertext (ReEncrypt from an asymmetric source).
    sym = admin.create_key()["KeyMetadata"]["KeyId"]
    out = admin.re_encrypt(
        CiphertextBlob=blob,
        SourceKeyId=key_id,
        SourceEncryptionAlgorithm="RSAES_OAEP_SHA_256",
        DestinationKeyId=sym,
    )
    assert admin.decrypt(CiphertextBlob=out["CiphertextBlob"])["Plaintext"] == b"s"
    assert len(out["DestinationKeyMaterialId"]) == 64
    assert "SourceKeyMaterialId" not in out


def test_rsa_decrypt_with_recipient(
    daemon: DaemonThread, test_ca: LocalCA, keys: dict[tuple[str, str], dict[str, Any]]
) -> None:
    admin = boto_client(daemon.endpoint, ADMIN)
    key_id = keys[("RSA_3072", "ENCRYPT_DECRYPT")]["KeyId"]
    blob = admin.encrypt(
        KeyId=key_id, Plaintext=b"for the enclave", EncryptionAlgorithm="RSAES_OAEP_SHA_256"
    )["CiphertextBlob"]
    enclave_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = enclave_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    doc = FakeEnclave.create(test_ca).document(spki)
    out = admin.decrypt(
        CiphertextBlob=blob,
        KeyId=key_id,
        EncryptionAlgorithm="RSAES_OAEP_SHA_256",
        Recipient={"AttestationDocument": doc, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
    )
    assert out.get("Plaintext") is None
    assert cms.open_enveloped_data(out["CiphertextForRecipient"], enclave_key) == b"for the enclave"


@pytest.mark.parametrize("bits", [224, 256, 384, 512])
def test_hmac(admin: Any, keys: dict[tuple[str, str], dict[str, Any]], bits: int) -> None:
    key_id = keys[(f"HMAC_{bits}", "GENERATE_VERIFY_MAC")]["KeyId"]
    alg = f"HMAC_SHA_{bits}"
    out = admin.generate_mac(KeyId=key_id, Message=_MESSAGE, MacAlgorithm=alg)
    assert out["MacAlgorithm"] == alg
    assert len(out["Mac"]) == bits // 8
    again = admin.generate_mac(KeyId=key_id, Message=_MESSAGE, MacAlgorithm=alg)
    assert again["Mac"] == out["Mac"]  # deterministic, as HMAC is
    ok = admin.verify_mac(KeyId=key_id, Message=_MESSAGE, MacAlgorithm=alg, Mac=out["Mac"])
    assert ok["MacValid"] is True
    bad = bytes([out["Mac"][0] ^ 1]) + out["Mac"][1:]
    with pytest.raises(ClientError) as e:
        admin.verify_mac(KeyId=key_id, Message=_MESSAGE, MacAlgorithm=alg, Mac=bad)
    assert _code(e) == "KMSInvalidMacException"
    other = "HMAC_SHA_512" if bits != 512 else "HMAC_SHA_256"
    with pytest.raises(ClientError) as e:
        admin.generate_mac(KeyId=key_id, Message=_MESSAGE, MacAlgorithm=other)
    assert _code(e) == "InvalidKeyUsageException"
    with pytest.raises(ClientError) as e:  # HMAC keys do not encrypt
        admin.encrypt(KeyId=key_id, Plaintext=b"x")
    assert _code(e) == "InvalidKeyUsageException"


@pytest.mark.parametrize("n", [256, 384, 521])
def test_derive_shared_secret(
    daemon: DaemonThread, test_ca: LocalCA, keys: dict[tuple[str, str], dict[str, Any]], n: int
) -> None:
    admin = boto_client(daemon.endpoint, ADMIN)
    key_id = keys[(f"ECC_NIST_P{n}", "KEY_AGREEMENT")]["KeyId"]
    kms_public, _ = _public(admin, key_id)
    curve = {256: ec.SECP256R1(), 384: ec.SECP384R1(), 521: ec.SECP521R1()}[n]
    peer = ec.generate_private_key(curve)
    peer_spki = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out = admin.derive_shared_secret(
        KeyId=key_id, KeyAgreementAlgorithm="ECDH", PublicKey=peer_spki
    )
    # Bob computes the same raw secret from his private key and the KMS key's public key.
    assert out["SharedSecret"] == peer.exchange(ec.ECDH(), kms_public)
    assert out["KeyAgreementAlgorithm"] == "ECDH"
    assert out["KeyOrigin"] == "AWS_KMS"
    # With a Recipient, only the enclave can read it.
    enclave_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    doc = FakeEnclave.create(test_ca).document(
        enclave_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    sealed = admin.derive_shared_secret(
        KeyId=key_id,
        KeyAgreementAlgorithm="ECDH",
        PublicKey=peer_spki,
        Recipient={"AttestationDocument": doc, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
    )
    assert sealed.get("SharedSecret") is None
    assert (
        cms.open_enveloped_data(sealed["CiphertextForRecipient"], enclave_key)
        == out["SharedSecret"]
    )
    # A public key on another curve, or not a public key at all, is refused.
    other = ec.generate_private_key(ec.SECP256K1()).public_key()
    for bad in (
        other.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        b"\x30\x03\x02\x01\x01",
    ):
        with pytest.raises(ClientError) as e:
            admin.derive_shared_secret(KeyId=key_id, KeyAgreementAlgorithm="ECDH", PublicKey=bad)
        assert _code(e) == "ValidationException"


def test_data_key_pair_ed25519_and_recipient(daemon: DaemonThread, test_ca: LocalCA) -> None:
    admin = boto_client(daemon.endpoint, ADMIN)
    key_id = admin.create_key()["KeyMetadata"]["KeyId"]
    out = admin.generate_data_key_pair(KeyId=key_id, KeyPairSpec="ECC_NIST_EDWARDS25519")
    private = serialization.load_der_private_key(out["PrivateKeyPlaintext"], password=None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert len(out["KeyMaterialId"]) == 64
    enclave_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    doc = FakeEnclave.create(test_ca).document(
        enclave_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    sealed = admin.generate_data_key_pair(
        KeyId=key_id,
        KeyPairSpec="ECC_NIST_P256",
        Recipient={"AttestationDocument": doc, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
    )
    assert sealed.get("PrivateKeyPlaintext") is None
    der = cms.open_enveloped_data(sealed["CiphertextForRecipient"], enclave_key)
    key = serialization.load_der_private_key(der, password=None)
    assert (
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == sealed["PublicKey"]
    )


def test_create_key_rules(admin: Any) -> None:
    cases = [
        ({"KeySpec": "RSA_2048"}, "ValidationException"),  # RSA needs a KeyUsage
        ({"KeySpec": "HMAC_256", "KeyUsage": "ENCRYPT_DECRYPT"}, "ValidationException"),
        ({"KeySpec": "ECC_SECG_P256K1", "KeyUsage": "KEY_AGREEMENT"}, "ValidationException"),
        # SM2 (China Regions only): not in cryptography. ML-DSA keys: tests/kms/test_pq_mldsa.py.
        ({"KeySpec": "SM2", "KeyUsage": "SIGN_VERIFY"}, "UnsupportedOperationException"),
        # ML_KEM_512: not in cryptography (ML-KEM-768/1024 keys: tests/kms/test_pq_mlkem.py).
        (
            {"KeySpec": "ML_KEM_512", "KeyUsage": "ENCAPSULATE_DECAPSULATE"},
            "UnsupportedOperationException",
        ),
        ({"Origin": "AWS_CLOUDHSM"}, "UnsupportedOperationException"),
        ({"MultiRegion": True}, "UnsupportedOperationException"),
    ]
    for params, code in cases:
        with pytest.raises(ClientError) as e:
            admin.create_key(**params)
        assert _code(e) == code, params
    # A spec with one possible usage needs none.
    meta = admin.create_key(KeySpec="HMAC_384")["KeyMetadata"]
    assert meta["KeyUsage"] == "GENERATE_VERIFY_MAC"
    meta = admin.create_key(KeySpec="ECC_NIST_EDWARDS25519")["KeyMetadata"]
    assert meta["KeyUsage"] == "SIGN_VERIFY"


def test_disabled_key_refuses(admin: Any) -> None:
    key_id = admin.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"][
        "KeyId"
    ]
    admin.disable_key(KeyId=key_id)
    with pytest.raises(ClientError) as e:
        admin.sign(KeyId=key_id, Message=b"m", SigningAlgorithm="ECDSA_SHA_256")
    assert _code(e) == "DisabledException"
    with pytest.raises(ClientError) as e:
        admin.get_public_key(KeyId=key_id)
    assert _code(e) == "DisabledException"
    admin.enable_key(KeyId=key_id)
    assert admin.sign(KeyId=key_id, Message=b"m", SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    for op in ("enable_key_rotation", "rotate_key_on_demand", "list_key_rotations"):
        with pytest.raises(ClientError) as e:
            getattr(admin, op)(KeyId=key_id)
        assert _code(e) == "UnsupportedOperationException", op


def test_aws_cli_drives_asymmetric_operations(daemon: DaemonThread, tmp_path: Path) -> None:
    def cli(*args: str) -> Any:
        code, out, err = aws_cli(daemon.endpoint, ADMIN, *args)
        assert code == 0, err
        return out

    msg = tmp_path / "msg"
    msg.write_bytes(_MESSAGE)
    key = cli("create-key", "--key-spec", "ECC_NIST_P384", "--key-usage", "SIGN_VERIFY")
    kid = key["KeyMetadata"]["KeyId"]
    public_der = base64.b64decode(cli("get-public-key", "--key-id", kid)["PublicKey"])
    sig = base64.b64decode(
        cli("sign", "--key-id", kid, "--message", f"fileb://{msg}", "--signing-algorithm",
            "ECDSA_SHA_384")["Signature"]
    )  # fmt: skip
    _verify_with_openssl(tmp_path, public_der, "ECDSA_SHA_384", sig)
    (tmp_path / "sig.bin").write_bytes(sig)
    ok = cli("verify", "--key-id", kid, "--message", f"fileb://{msg}", "--signature",
             f"fileb://{tmp_path / 'sig.bin'}", "--signing-algorithm", "ECDSA_SHA_384")  # fmt: skip
    assert ok["SignatureValid"] is True
    mac_key = cli("create-key", "--key-spec", "HMAC_256", "--key-usage", "GENERATE_VERIFY_MAC")
    mid = mac_key["KeyMetadata"]["KeyId"]
    mac = cli("generate-mac", "--key-id", mid, "--message", f"fileb://{msg}", "--mac-algorithm",
              "HMAC_SHA_256")["Mac"]  # fmt: skip
    (tmp_path / "mac.bin").write_bytes(base64.b64decode(mac))
    assert cli("verify-mac", "--key-id", mid, "--message", f"fileb://{msg}", "--mac-algorithm",
               "HMAC_SHA_256", "--mac", f"fileb://{tmp_path / 'mac.bin'}")["MacValid"]  # fmt: skip
    agree = cli("create-key", "--key-spec", "ECC_NIST_P256", "--key-usage", "KEY_AGREEMENT")
    aid = agree["KeyMetadata"]["KeyId"]
    peer = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "peer.der").write_bytes(
        peer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    shared = cli("derive-shared-secret", "--key-id", aid, "--key-agreement-algorithm", "ECDH",
                 "--public-key", f"fileb://{tmp_path / 'peer.der'}")["SharedSecret"]  # fmt: skip
    kms_public = serialization.load_der_public_key(
        base64.b64decode(cli("get-public-key", "--key-id", aid)["PublicKey"])
    )
    assert isinstance(kms_public, ec.EllipticCurvePublicKey)
    assert base64.b64decode(shared) == peer.exchange(ec.ECDH(), kms_public)
    enc_key = cli("create-key", "--key-spec", "RSA_2048", "--key-usage", "ENCRYPT_DECRYPT")
    eid = enc_key["KeyMetadata"]["KeyId"]
    blob = cli("encrypt", "--key-id", eid, "--plaintext", f"fileb://{msg}",
               "--encryption-algorithm", "RSAES_OAEP_SHA_1")["CiphertextBlob"]  # fmt: skip
    (tmp_path / "blob").write_bytes(base64.b64decode(blob))
    dec = cli("decrypt", "--key-id", eid, "--ciphertext-blob", f"fileb://{tmp_path / 'blob'}",
              "--encryption-algorithm", "RSAES_OAEP_SHA_1")  # fmt: skip
    assert base64.b64decode(dec["Plaintext"]) == _MESSAGE
    sym = cli("create-key")["KeyMetadata"]["KeyId"]
    pair = cli("generate-data-key-pair", "--key-id", sym, "--key-pair-spec",
               "ECC_NIST_EDWARDS25519")  # fmt: skip
    private = serialization.load_der_private_key(
        base64.b64decode(pair["PrivateKeyPlaintext"]), password=None
    )
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert len(pair["KeyMaterialId"]) == 64
    # An RSA key makes no data keys: the CLI reports AWS's error and exits non-zero.
    code, _, err = aws_cli(daemon.endpoint, ADMIN, "generate-data-key-pair-without-plaintext",
                           "--key-id", eid, "--key-pair-spec", "RSA_2048")  # fmt: skip
    assert code != 0
    assert "InvalidKeyUsageException" in err
