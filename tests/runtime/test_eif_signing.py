"""Signed images: the signature section's exact shape, an independent COSE_Sign1 check, PCR8,
describe-eif's SignatureCheck/SigningCertificate, tampering, and sign-eif."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from runtime.cli import main
from runtime.eif import (
    EifFile,
    EifSignatureError,
    EifSigningError,
    SectionType,
    build_eif,
    read_eif,
    sign_eif,
)
from runtime.image._format import encode_eif

NOW = datetime.datetime.now(datetime.UTC)


def _write_pair(
    directory: Path,
    curve: ec.EllipticCurve | None = None,
    *,
    days: tuple[int, int] = (-1, 30),
    cn: str = "image-signer",
) -> tuple[Path, Path]:
    key = ec.generate_private_key(curve or ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Org"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + datetime.timedelta(days=days[0]))
        .not_valid_after(NOW + datetime.timedelta(days=days[1]))
        .sign(key, hashes.SHA384())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    app = tmp_path_factory.mktemp("signing") / "app"
    app.mkdir()
    (app / "main.py").write_text("print('signed')\n")
    return app


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _write_pair(tmp_path_factory.mktemp("keys"))


def _build_signed(app: Path, out: Path, pair: tuple[Path, Path]) -> EifFile:
    build_eif(
        app_dir=app,
        cmd="python main.py",
        env={},
        output=out,
        signing_certificate=pair[0],
        private_key=pair[1],
    )
    return read_eif(out)


def _independent_cose_check(section: bytes, cert_pem: bytes, pcr0: bytes) -> None:
    """Decode the section by hand (nitro.md §2.5) and verify the COSE_Sign1 per RFC 8152."""
    decoded = cbor2.loads(section)
    assert isinstance(decoded, list)
    assert len(decoded) == 1
    entry = decoded[0]
    assert list(entry) == ["signing_certificate", "signature"]
    # serde_cbor without serde_bytes: byte vectors are CBOR arrays of small uints
    assert isinstance(entry["signing_certificate"], list)
    assert isinstance(entry["signature"], list)
    assert bytes(entry["signing_certificate"]) == cert_pem
    cose = cbor2.loads(bytes(entry["signature"]))
    assert not isinstance(cose, cbor2.CBORTag)  # untagged, like as_bytes(false)
    protected, unprotected, payload, signature = cose
    assert cbor2.loads(protected) == {1: -35}  # ES384 for a P-384 key
    assert unprotected == {}
    assert cbor2.loads(payload) == {"register_index": 0, "register_value": list(pcr0)}
    assert payload[:1] == b"\xa2"  # a 2-entry map, register_index first (serde order)
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    r = int.from_bytes(signature[:48], "big")
    s = int.from_bytes(signature[48:], "big")
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))


def test_signed_build(app: Path, pair: tuple[Path, Path], tmp_path: Path) -> None:
    eif = _build_signed(app, tmp_path / "s.eif", pair)
    assert eif.is_signed
    assert eif.signature_ok is True
    eif.check_signature()
    cert_pem = pair[0].read_bytes()
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    assert (
        eif.measurements["PCR8"]
        == hashlib.sha384(bytes(48) + hashlib.sha384(der).digest()).hexdigest()
    )
    sig = [s for s in eif.sections if s.section_type is SectionType.SIGNATURE]
    assert len(sig) == 1
    assert eif.sections[-1] is sig[0]  # appended last, as EifBuilder does
    _independent_cose_check(sig[0].data, cert_pem, eif.pcrs[0])
    # PCR0/1/2 do not depend on the signature
    build_eif(app_dir=app, cmd="python main.py", env={}, output=tmp_path / "u.eif")
    unsigned = read_eif(tmp_path / "u.eif")
    assert {k: v for k, v in eif.pcrs.items() if k != 8} == unsigned.pcrs
    # deterministic ECDSA: signed builds are reproducible too
    assert _build_signed(app, tmp_path / "s2.eif", pair).sections == eif.sections


def test_describe_signed(
    app: Path, pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build-enclave", "--app-dir", str(app), "--cmd", "python main.py"]
    argv += ["--output-file", str(tmp_path / "s.eif")]
    argv += ["--signing-certificate", str(pair[0]), "--private-key", str(pair[1])]
    assert main(argv) == 0
    built = json.loads(capsys.readouterr().out)
    assert list(built["Measurements"]) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert main(["describe-eif", "--eif-path", str(tmp_path / "s.eif")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out)[:6] == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "SigningCertificate",
        "CheckCRC",
        "SignatureCheck",
    ]
    assert out["Measurements"] == built["Measurements"]
    assert out["IsSigned"] is True
    assert out["SignatureCheck"] is True
    info = out["SigningCertificate"]
    assert list(info) == ["IssuerName", "Algorithm", "NotBefore", "NotAfter", "Signature"]
    assert info["IssuerName"] == {
        "commonName": "image-signer",
        "countryName": "US",
        "organizationName": "Example Org",
    }
    assert info["Algorithm"] == "ecdsa-with-SHA384"
    assert info["NotBefore"].endswith(" GMT")
    cert = x509.load_pem_x509_certificate(pair[0].read_bytes())
    assert info["Signature"] == cert.signature.hex(":").upper()


def test_signature_from_other_image_fails(
    app: Path, pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    signed = _build_signed(app, tmp_path / "s.eif", pair)
    other_app = tmp_path / "other"
    other_app.mkdir()
    (other_app / "main.py").write_text("print('evil')\n")
    build_eif(app_dir=other_app, cmd="python main.py", env={}, output=tmp_path / "o.eif")
    other = read_eif(tmp_path / "o.eif")
    stolen = next(s.data for s in signed.sections if s.section_type is SectionType.SIGNATURE)
    forged = encode_eif(
        [*((s.section_type, s.data) for s in other.sections), (SectionType.SIGNATURE, stolen)]
    )
    (tmp_path / "forged.eif").write_bytes(forged)
    eif = read_eif(tmp_path / "forged.eif")
    assert eif.check_crc
    assert eif.signature_ok is False
    assert eif.measurements["PCR8"] == signed.measurements["PCR8"]
    with pytest.raises(EifSignatureError) as exc:
        eif.check_signature()
    assert exc.value.code == "E59"
    assert main(["describe-eif", "--eif-path", str(tmp_path / "forged.eif")]) == 0
    assert json.loads(capsys.readouterr().out)["SignatureCheck"] is False


def test_corrupted_cose_signature_fails(app: Path, pair: tuple[Path, Path], tmp_path: Path) -> None:
    signed = _build_signed(app, tmp_path / "s.eif", pair)
    section = next(s.data for s in signed.sections if s.section_type is SectionType.SIGNATURE)
    entry = cbor2.loads(section)[0]
    cose = cbor2.loads(bytes(entry["signature"]))
    cose[3] = cose[3][:-1] + bytes([cose[3][-1] ^ 1])
    entry["signature"] = list(cbor2.dumps(cose))
    bad = cbor2.dumps([entry])
    forged = encode_eif(
        [
            *((s.section_type, s.data) for s in signed.sections[:-1]),
            (SectionType.SIGNATURE, bad),
        ]
    )
    assert EifFile.from_bytes(forged).signature_ok is False


def test_expired_certificate_refused_at_launch(app: Path, tmp_path: Path) -> None:
    expired = _write_pair(tmp_path / "old", days=(-30, -1))
    eif = _build_signed(app, tmp_path / "e.eif", expired)
    assert eif.signature_ok is True
    with pytest.raises(EifSignatureError, match="not valid"):
        eif.check_signature()
    eif.check_signature(at=NOW - datetime.timedelta(days=2))


def test_p256_uses_es256(app: Path, tmp_path: Path) -> None:
    eif = _build_signed(app, tmp_path / "p256.eif", _write_pair(tmp_path / "k", ec.SECP256R1()))
    assert eif.signature_ok is True
    section = next(s.data for s in eif.sections if s.section_type is SectionType.SIGNATURE)
    cose = cbor2.loads(bytes(cbor2.loads(section)[0]["signature"]))
    assert cbor2.loads(cose[0]) == {1: -7}


def test_signing_errors(app: Path, pair: tuple[Path, Path], tmp_path: Path) -> None:
    other_cert, other_key = _write_pair(tmp_path / "other")
    with pytest.raises(EifSigningError, match="does not match") as exc:
        build_eif(
            app_dir=app,
            cmd="x",
            env={},
            output=tmp_path / "o.eif",
            signing_certificate=pair[0],
            private_key=other_key,
        )
    assert exc.value.code == "E60"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_path = tmp_path / "rsa.pem"
    rsa_path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(EifSigningError, match="EC key"):
        build_eif(
            app_dir=app,
            cmd="x",
            env={},
            output=tmp_path / "o.eif",
            signing_certificate=pair[0],
            private_key=rsa_path,
        )
    with pytest.raises(EifSigningError):
        build_eif(
            app_dir=app,
            cmd="x",
            env={},
            output=tmp_path / "o.eif",
            signing_certificate=pair[1],  # a key is not a certificate
            private_key=pair[1],
        )
    assert not (tmp_path / "o.eif").exists()
    assert other_cert.exists()


def test_sign_eif_matches_signed_build(
    app: Path, pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_eif(app_dir=app, cmd="python main.py", env={}, output=tmp_path / "u.eif")
    argv = ["sign-eif", "--eif-path", str(tmp_path / "u.eif")]
    argv += ["--signing-certificate", str(pair[0]), "--private-key", str(pair[1])]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == "Enclave Image successfully signed.\n"
    assert "PCR8" in json.loads(captured.out)["Measurements"]
    _build_signed(app, tmp_path / "s.eif", pair)
    assert (tmp_path / "u.eif").read_bytes() == (tmp_path / "s.eif").read_bytes()
    # re-signing with another certificate replaces the section
    new_pair = _write_pair(tmp_path / "new", cn="rotated")
    info = sign_eif(tmp_path / "u.eif", signing_certificate=new_pair[0], private_key=new_pair[1])
    eif = read_eif(tmp_path / "u.eif")
    assert eif.signature_ok is True
    assert [s.section_type for s in eif.sections].count(SectionType.SIGNATURE) == 1
    assert (
        eif.measurements["PCR8"]
        == info.measurements["PCR8"]
        != read_eif(tmp_path / "s.eif").measurements["PCR8"]
    )


def test_hostile_signature_sections_are_format_errors() -> None:
    from runtime.eif import EifFormatError

    base = [(SectionType.KERNEL, b"k"), (SectionType.CMDLINE, b"c"), (SectionType.METADATA, b"{}")]
    for junk in (
        b"\xff",
        cbor2.dumps([]),
        cbor2.dumps([{"signing_certificate": [1, 2], "signature": [3]}]),
        cbor2.dumps([{"signing_certificate": [300], "signature": []}]),
        cbor2.dumps([{"x": 1}]),
        b"\x81" * 10_000,  # deep nesting
    ):
        with pytest.raises(EifFormatError):
            EifFile.from_bytes(encode_eif([*base, (SectionType.SIGNATURE, junk)]))
    with pytest.raises(ValueError):  # over the 32 KiB limit of the spec
        encode_eif([*base, (SectionType.SIGNATURE, b"\0" * 32769)])
