"""Builders for attest tests: custom certificate chains and re-signed documents."""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from attest.cose import ES384_PROTECTED, sign_es384
from attest.document import AttestationDocument, encode_payload

FIXTURE_PROD = "blocky-nitrite_nitro_attestation.b64"
FIXTURE_DEBUG = "blocky-nitrite_nitro_attestation_debug.b64"
PROD_TIME = datetime(2024, 9, 7, 14, 37, 39, 545000, tzinfo=UTC)
DEBUG_TIME = datetime(2024, 9, 7, 14, 38, 6, 508000, tzinfo=UTC)
PROD_PCRS = {
    0: "e72a46ca80a260fb044a125442f0c7e331813bcbaf9724d9"
    "f3857758992766f2d65710a27aa94ae3949dd54e7c9fe86a",
    1: "0343b056cd8485ca7890ddd833476d78460aed2aa161548e"
    "4e26bedf321726696257d623e8805f3f605946b3d8b0c6aa",
    2: "d5dcbdea0aa39c802f9d55ced2ea6e4d74ecec5f08fe40c5"
    "08882639c9090642669106a062a3e24ee2805a3024b9b75c",
    4: "45706d7b621e4620a332e147a5ddb000b049f73d47d3e61f"
    "6b03d2069152d4df6a4a786ad1c10102b955799a9dc96b44",
}
MODULE_ID = "i-0123456789abcdef0-enc0192e4188fef781d"
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def load_fixture(shared_dir: Path, name: str) -> bytes:
    return base64.b64decode((shared_dir / "nitro-fixtures" / name).read_bytes())


def pcr(byte: int) -> bytes:
    return bytes([byte]) * 48


@dataclasses.dataclass
class Chain:
    keys: list[ec.EllipticCurvePrivateKey]  # root first, leaf last
    certs: list[x509.Certificate]

    @property
    def root(self) -> x509.Certificate:
        return self.certs[0]

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[-1]

    @property
    def leaf_key(self) -> ec.EllipticCurvePrivateKey:
        return self.keys[-1]

    @property
    def bundle_der(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(Encoding.DER) for c in self.certs[:-1])

    @property
    def leaf_der(self) -> bytes:
        return self.leaf.public_bytes(Encoding.DER)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ku(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=not ca,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def build_chain(
    *,
    start: datetime = T0 - timedelta(hours=1),
    lifetime: timedelta = timedelta(hours=4),
    path_lengths: tuple[int | None, ...] = (None, 2, 1, 0),
    leaf_window: tuple[datetime, datetime] | None = None,
    leaf_ca: bool = False,
    tag: str = "t",
) -> Chain:
    """root → CA(pathlen 2) → CA(1) → CA(0) → leaf, all P-384, like the Nitro chain."""
    keys: list[ec.EllipticCurvePrivateKey] = []
    certs: list[x509.Certificate] = []
    n_ca = len(path_lengths)
    for i in range(n_ca + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        is_ca = i < n_ca or leaf_ca
        subject = _name(f"{tag}-ca{i}" if i < n_ca else f"{tag}-leaf")
        issuer_key = keys[-1] if keys else key
        issuer = certs[-1].subject if certs else subject
        nb, na = start, start + lifetime
        if i == n_ca and leaf_window:
            nb, na = leaf_window
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(
                x509.BasicConstraints(ca=is_ca, path_length=path_lengths[i] if i < n_ca else None),
                critical=True,
            )
            .add_extension(_ku(i < n_ca), critical=True)
        )
        if i < n_ca:
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            if i > 0:
                b = b.add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                    False,
                )
        certs.append(b.sign(issuer_key, hashes.SHA384()))
        keys.append(key)
    return Chain(keys, certs)


def make_doc(
    chain: Chain,
    *,
    timestamp: datetime = T0,
    pcrs: dict[int, bytes] | None = None,
    nonce: bytes | None = None,
    public_key: bytes | None = None,
    user_data: bytes | None = None,
    module_id: str = MODULE_ID,
) -> AttestationDocument:
    return AttestationDocument(
        module_id=module_id,
        digest="SHA384",
        timestamp=int(timestamp.timestamp() * 1000),
        pcrs=pcrs if pcrs is not None else {i: pcr(i + 1) for i in range(16)},
        certificate=chain.leaf_der,
        cabundle=chain.bundle_der,
        public_key=public_key,
        user_data=user_data,
        nonce=nonce,
    )


def sign_raw_payload(
    payload: bytes, key: ec.EllipticCurvePrivateKey, *, tagged: bool = False
) -> bytes:
    """COSE_Sign1 over arbitrary payload bytes (for mutated/indefinite payloads)."""
    sig = sign_es384(key, ES384_PROTECTED, payload)
    body = [ES384_PROTECTED, {}, payload, sig]
    return cbor2.dumps(cbor2.CBORTag(18, body) if tagged else body)


def sign_payload_map(payload: dict[str, object], key: ec.EllipticCurvePrivateKey) -> bytes:
    return sign_raw_payload(cbor2.dumps(payload), key)


def payload_map(doc: AttestationDocument) -> dict[str, object]:
    """The payload as a plain dict in Nitro order (to mutate one field)."""
    return dict(cbor2.loads(encode_payload(doc)))
