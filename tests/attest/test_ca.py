"""LocalCA: persistent root (0600, atomic, concurrent), Nitro-shaped chain, leaf renewal."""

from __future__ import annotations

import stat
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from attest.ca import ROOT_CERT_FILE, ROOT_KEY_FILE, CAConfig, LocalCA
from attest.document import parse_document
from attest.errors import CAError
from attest.policy import Policy
from attest.verify import Verifier
from transport.errors import ConfigurationError

from .helpers import MODULE_ID, T0, pcr


def test_root_is_created_once_and_kept(tmp_path: Path) -> None:
    ca1 = LocalCA.load_or_create(tmp_path / "ca")
    key_file = tmp_path / "ca" / ROOT_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    ca2 = LocalCA.load_or_create(tmp_path / "ca")
    assert ca1.root_pem == ca2.root_pem
    assert LocalCA.load_root(tmp_path / "ca") == ca1.root_certificate
    assert not [p for p in (tmp_path / "ca").iterdir() if p.name.endswith(".tmp")]


def test_concurrent_creation_yields_one_root(tmp_path: Path) -> None:
    pems: list[bytes] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            pems.append(LocalCA.load_or_create(tmp_path / "ca").root_pem)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(set(pems)) == 1
    assert len(pems) == 6


def test_root_shape(local_ca: LocalCA) -> None:
    root = local_ca.root_certificate
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length is None
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    assert root.not_valid_after_utc - root.not_valid_before_utc > timedelta(days=365 * 29)


def test_chain_shape_matches_nitro(local_ca: LocalCA) -> None:
    key, leaf, bundle = local_ca.issue_leaf(MODULE_ID, T0)
    assert len(bundle) == 4
    assert bundle[0] == local_ca.root_certificate
    path_lengths = [
        c.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
        for c in bundle
    ]
    assert path_lengths == [None, 2, 1, 0]
    cn = leaf.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == f"{MODULE_ID}.local-1.aws"
    instance_cn = bundle[3].subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert instance_cn == "i-0123456789abcdef0.local-1.aws.nitro-enclaves"
    assert ".zonal.local-1." in bundle[2].subject.rfc4514_string()
    leaf_bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert leaf_bc.critical
    assert not leaf_bc.value.ca
    leaf_ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert leaf_ku.digital_signature
    assert leaf_ku.content_commitment
    assert not leaf_ku.key_cert_sign
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=3)
    assert bundle[3].extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    for child, parent in zip([*bundle[1:], leaf], bundle, strict=True):
        child.verify_directly_issued_by(parent)
    assert key.public_key() == leaf.public_key()


def test_signer_renews_expiring_leaf(tmp_path: Path) -> None:
    now = [T0.timestamp()]
    ca = LocalCA.load_or_create(tmp_path / "ca", clock=lambda: now[0])
    signer = ca.new_signer(MODULE_ID)
    first_leaf = signer.certificate
    verifier = Verifier([ca.root_certificate])
    pcrs = {i: pcr(i + 1) for i in range(16)}
    for hours in (
        0,
        2.75,
        30,
        24 * 25,
    ):  # within, near the end of the leaf, past instance/zonal/regional
        at_ms = int((T0.timestamp() + hours * 3600) * 1000)
        doc = signer.issue(module_id=MODULE_ID, timestamp_ms=at_ms, pcrs=pcrs)
        parsed = parse_document(doc)
        at = parsed.issued_at
        verifier.verify(doc, policy=Policy(any_measurement=True), at=at)
        verifier.verify(doc, policy=Policy(any_measurement=True), at=at + timedelta(minutes=29))
    assert signer.certificate != first_leaf


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown"):
        LocalCA.load_or_create(tmp_path / "ca", colour="blue")
    with pytest.raises(ConfigurationError):
        CAConfig(leaf_validity_s=-1)
    with pytest.raises(ConfigurationError):
        CAConfig(leaf_validity_s=10 * 86400)
    ca = LocalCA.load_or_create(tmp_path / "ca2", region="eu-test-1", leaf_validity_s=600)
    _, leaf, _ = ca.issue_leaf(MODULE_ID)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(seconds=600)
    assert "eu-test-1" in leaf.subject.rfc4514_string()


def test_broken_state_is_reported(tmp_path: Path) -> None:
    LocalCA.load_or_create(tmp_path / "ca")
    (tmp_path / "ca" / ROOT_KEY_FILE).chmod(0o644)
    with pytest.raises(CAError, match="readable by others"):
        LocalCA.load_or_create(tmp_path / "ca")
    (tmp_path / "ca" / ROOT_KEY_FILE).unlink()
    with pytest.raises(CAError, match="without its key"):
        LocalCA.load_or_create(tmp_path / "ca")
    with pytest.raises(ConfigurationError, match="no local CA"):
        LocalCA.load_root(tmp_path / "nothing")


def test_missing_certificate_is_reissued_from_the_key(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path / "ca")
    (tmp_path / "ca" / ROOT_CERT_FILE).unlink()
    again = LocalCA.load_or_create(tmp_path / "ca")
    assert again.root_certificate.public_key() == ca.root_certificate.public_key()
