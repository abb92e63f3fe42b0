"""Trust roots: the bundled AWS root and root specifications."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from attest.ca import LocalCA
from attest.roots import AWS_NITRO_ROOT_G1, AWS_NITRO_ROOT_G1_SHA256, load_roots
from transport.errors import ConfigurationError

from .helpers import FIXTURE_PROD, load_fixture


def test_bundled_root_is_the_fixture_cabundle_root(shared_dir: Path) -> None:
    import cbor2

    der = AWS_NITRO_ROOT_G1.public_bytes(Encoding.DER)
    assert hashlib.sha256(der).hexdigest() == AWS_NITRO_ROOT_G1_SHA256
    payload = cbor2.loads(cbor2.loads(load_fixture(shared_dir, FIXTURE_PROD))[2])
    assert payload["cabundle"][0] == der
    assert (
        AWS_NITRO_ROOT_G1.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    )


def test_load_roots(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        load_roots([], state_dir=tmp_path)
    assert load_roots(["aws"], state_dir=tmp_path) == [AWS_NITRO_ROOT_G1]
    with pytest.raises(ConfigurationError, match="no local CA"):
        load_roots(["local"], state_dir=tmp_path)
    ca = LocalCA.load_or_create(tmp_path / "ca")
    assert load_roots(["local", "aws"], state_dir=tmp_path) == [
        ca.root_certificate,
        AWS_NITRO_ROOT_G1,
    ]
    pem = tmp_path / "roots.pem"
    pem.write_bytes(ca.root_pem + AWS_NITRO_ROOT_G1.public_bytes(Encoding.PEM))
    assert load_roots([str(pem)], state_dir=None) == [ca.root_certificate, AWS_NITRO_ROOT_G1]
    bad = tmp_path / "bad.pem"
    bad.write_text("nothing here")
    with pytest.raises(ConfigurationError):
        load_roots([str(bad)], state_dir=None)
    with pytest.raises(ConfigurationError):
        load_roots([str(tmp_path / "missing.pem")], state_dir=None)
