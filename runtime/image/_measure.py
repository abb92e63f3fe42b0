"""PCR helpers of images: nitro-cli's ``Measurements`` and the PCRs Nitro derives from the
parent instance (PCR3, PCR4) and the signing certificate (PCR8). Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from attest.pcrs import pcr_extend
from runtime.image._cose import (
    load_certificate,
)
from runtime.image._format import pcr_from_bytes as _pcr_from_bytes

__all__ = [
    "HASH_ALGORITHM",
    "pcr_from_bytes",
    "pcr3_role_arn",
    "pcr4_instance_id",
    "pcr8_from_certificate",
    "nitro_measurements",
]

#: nitro-cli prints the Rust ``Debug`` of ``sha2::Sha384`` as the hash algorithm.
HASH_ALGORITHM: Final = "Sha384 { ... }"


def pcr_from_bytes(data: bytes) -> bytes:
    """``SHA384(0^48 || SHA384(data))``: what ``enclave pcr --input`` prints (nitro.md §2.6)."""
    return _pcr_from_bytes(data)


def pcr3_role_arn(arn: str) -> bytes:
    """PCR3 of an enclave whose parent instance has IAM role ``arn``: ``SHA384(0^48 || arn)``.

    The raw UTF-8 string is extended (not its digest), as on Nitro (nitro.md §2.6).
    """
    return pcr_extend(b"\0" * 48, arn.encode("utf-8"))


def pcr4_instance_id(iid: str) -> bytes:
    """PCR4 of an enclave whose parent instance id is ``iid``: ``SHA384(0^48 || iid)``."""
    return pcr_extend(b"\0" * 48, iid.encode("utf-8"))


def pcr8_from_certificate(pem: bytes) -> bytes:
    """PCR8 for a PEM signing certificate: ``SHA384(0^48 || SHA384(cert DER))``.

    Raises:
        EifSigningError: not a PEM certificate with a supported EC key.
    """
    from cryptography.hazmat.primitives.serialization import Encoding

    return _pcr_from_bytes(load_certificate(pem).public_bytes(Encoding.DER))


def nitro_measurements(pcrs: Mapping[int, bytes]) -> dict[str, str]:
    """nitro-cli's ``Measurements`` map: ``HashAlgorithm`` then ``PCRn`` in BTreeMap order."""
    out = {"HashAlgorithm": HASH_ALGORITHM}
    for key in sorted(f"PCR{i}" for i in pcrs):
        out[key] = pcrs[int(key[3:])].hex()
    return out
