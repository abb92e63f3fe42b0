"""The bundled AWS Nitro Enclaves Root G1 and loaders for configured roots (see the face)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from transport.errors import ConfigurationError

__all__ = [
    "AWS_NITRO_ROOT_G1",
    "AWS_NITRO_ROOT_G1_SHA256",
    "fingerprint_sha256",
    "load_roots",
    "load_pem_roots",
]

#: SHA-256 of the DER of AWS Nitro Enclaves Root G1 (nitro.md §4.5).
AWS_NITRO_ROOT_G1_SHA256: Final = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of the certificate's DER."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def _load_bundled() -> x509.Certificate:
    pem = resources.files("attest.roots").joinpath("aws_nitro_root_g1.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    if not hmac.compare_digest(fingerprint_sha256(cert), AWS_NITRO_ROOT_G1_SHA256):
        raise RuntimeError("bundled AWS Nitro root G1 does not match its pinned fingerprint")
    return cert


#: The AWS Nitro Enclaves Root G1 certificate (bundled, fingerprint checked).
AWS_NITRO_ROOT_G1: Final = _load_bundled()


def load_pem_roots(path: Path) -> list[x509.Certificate]:
    """Read every certificate of a PEM file. Raises ConfigurationError if there is none."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read root certificate file {path}: {exc}") from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigurationError(f"{path} holds no PEM certificate: {exc}") from exc
    return certs


def load_roots(specs: Sequence[str], *, state_dir: Path | None) -> list[x509.Certificate]:
    """Resolve root specifications into certificates.

    Args:
        specs: each ``"aws"`` (bundled AWS root G1), ``"local"`` (the state directory's CA root,
            ``<state_dir>/ca/root.pem``) or a path to a PEM file.
        state_dir: the state directory for ``"local"`` (default
            :func:`transport.paths.default_state_dir`).

    Raises:
        ConfigurationError: no specs, a missing local CA, or an unreadable PEM file.
    """
    if not specs:
        raise ConfigurationError("no trust roots given")
    roots: list[x509.Certificate] = []
    for spec in specs:
        if spec == "aws":
            roots.append(AWS_NITRO_ROOT_G1)
        elif spec == "local":
            from attest.ca import LocalCA
            from transport.paths import default_state_dir

            roots.append(LocalCA.load_root((state_dir or default_state_dir()) / "ca"))
        else:
            roots.extend(load_pem_roots(Path(spec)))
    return roots
