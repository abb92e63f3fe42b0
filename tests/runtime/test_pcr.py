"""PCR helpers and ``enclave pcr``: the AWS examples of nitro.md §2.6, PCR4 of a real
attestation document (fixture README), and the CLI's JSON shapes and exit codes."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from runtime.cli import main
from runtime.eif import (
    HASH_ALGORITHM,
    nitro_measurements,
    pcr3_role_arn,
    pcr4_instance_id,
    pcr8_from_certificate,
    pcr_extend,
    pcr_from_bytes,
)

# nitro.md §2.6, the User Guide's two examples.
UG_ROLE_ARN = "arn:aws:iam::123456789012:role/Webserver"
UG_PCR3 = (
    "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef"
    "4fc1f1a452e315b9e98f9e312e6921e6"
)
UG_INSTANCE_ID = "i-1234567890abcdef0"
UG_PCR4 = (
    "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812"
    "719327281c401a67a10fcba87ae79ce0"
)


def test_pcr3_aws_example() -> None:
    assert pcr3_role_arn(UG_ROLE_ARN).hex() == UG_PCR3


def test_pcr4_aws_example() -> None:
    assert pcr4_instance_id(UG_INSTANCE_ID).hex() == UG_PCR4


def test_pcr4_matches_real_attestation_document(shared_dir: Path) -> None:
    readme = (shared_dir / "nitro-fixtures" / "README.md").read_text()
    m = re.search(r"PCR4 `([0-9a-f]{96})`\s*\n\s*= SHA384\(48.0x00 . b\"(i-[0-9a-f]+)\"\)", readme)
    assert m is not None, "fixture README changed shape"
    assert pcr4_instance_id(m.group(2)).hex() == m.group(1)


def test_pcr_from_bytes_is_extend_of_digest() -> None:
    data = b"enclave image bytes"
    expected = hashlib.sha384(bytes(48) + hashlib.sha384(data).digest()).digest()
    assert pcr_from_bytes(data) == expected
    assert pcr_extend(bytes(48), hashlib.sha384(data).digest()) == expected
    assert len(pcr_from_bytes(b"")) == 48
    # PCR3/4 extend the raw string, PCR0/1/2/8 a digest: they differ for the same input
    assert pcr3_role_arn("x") != pcr_from_bytes(b"x")


def test_nitro_measurements_order() -> None:
    m = nitro_measurements({8: bytes(48), 0: b"\1" * 48, 2: bytes(48), 1: bytes(48)})
    assert list(m) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert m["HashAlgorithm"] == HASH_ALGORITHM == "Sha384 { ... }"
    assert m["PCR0"] == "01" * 48


def _cert(tmp_path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> Path:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pcr-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_pcr_cli_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 40_000)  # hashed in chunks by the CLI
    assert main(["pcr", "--input", str(big)]) == 0
    assert json.loads(capsys.readouterr().out)["PCR"] == pcr_from_bytes(big.read_bytes()).hex()
    f = tmp_path / "blob"
    f.write_bytes(b"\x00\x01payload")
    assert main(["pcr", "--input", str(f)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"PCR": pcr_from_bytes(b"\x00\x01payload").hex()}
    assert out == '{\n  "PCR": "' + pcr_from_bytes(b"\x00\x01payload").hex() + '"\n}\n'


def test_pcr_cli_signing_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert_path = _cert(tmp_path, ec.generate_private_key(ec.SECP384R1()))
    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    expected = hashlib.sha384(bytes(48) + hashlib.sha384(der).digest()).hexdigest()
    assert pcr8_from_certificate(cert_path.read_bytes()).hex() == expected
    assert main(["pcr", "--signing-certificate", str(cert_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"PCR8": expected}


@pytest.mark.parametrize("argv", [["pcr"], ["pcr", "--input", "a", "--signing-certificate", "b"]])
def test_pcr_cli_needs_exactly_one_flag(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_pcr_cli_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pcr", "--input", str(tmp_path / "missing")]) == 19
    assert capsys.readouterr().err.startswith("[ E19 ] ")


def test_pcr_cli_bad_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    assert main(["pcr", "--signing-certificate", str(junk)]) == 57
    rsa_cert = _cert(tmp_path, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert main(["pcr", "--signing-certificate", str(rsa_cert)]) == 57
    assert "[ E57 ]" in capsys.readouterr().err
