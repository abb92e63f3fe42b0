"""Public value types of ``enclave-channel/1``: suites, the verified peer, the injected callables.

Pure: no I/O, no trio, no cryptography. The attester (enclave side) and the document verifier
(client side) are *injected* so that ``transport`` stays the bottom layer: ``attest.channel``
builds real ones from an NSM client and an ``attest.verify.Verifier`` + policy.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Attester", "DocumentVerifier", "PeerAttestation", "Suite"]


class Suite(enum.Enum):
    """Key-establishment suites of ``enclave-channel/1``; the value is the one-byte wire id.

    Both use HPKE base mode (RFC 9180) with HKDF-SHA256 and AES-256-GCM to seal the channel
    secret; they differ in the KEM. Records are AES-256-GCM under either suite.
    """

    #: DHKEM(X25519, HKDF-SHA256): classical, required.
    X25519 = 0x01
    #: ML-KEM-768 + X25519 hybrid KEM (post-quantum + classical); the enclave's 1216-byte public
    #: key travels beside the attestation document and the document carries its SHA-384.
    MLKEM768_X25519 = 0x02


@dataclass(frozen=True)
class PeerAttestation:
    """What a :class:`DocumentVerifier` established about the enclave at the other end (the
    server, or in mutual mode the calling enclave).

    Field names follow the Nitro attestation document. ``document`` is the exact bytes verified.
    The ``pcr0``/``pcr8``/``pcr16`` shortcuts and :attr:`debug` are what an application
    usually authorizes a peer by: the image, its signing certificate, the models it loaded.
    """

    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    document: bytes

    @property
    def pcr0(self) -> bytes | None:
        """The image measurement (None if the document has no PCR0)."""
        return self.pcrs.get(0)

    @property
    def pcr8(self) -> bytes | None:
        """The signing certificate's measurement (all zero for an unsigned image)."""
        return self.pcrs.get(8)

    @property
    def pcr16(self) -> bytes | None:
        """The first application PCR (the inference server extends it with its models)."""
        return self.pcrs.get(16)

    @property
    def debug(self) -> bool:
        """True for a debug-mode enclave: Nitro zeroes its PCR0 (a verifier allowed it)."""
        pcr0 = self.pcrs.get(0)
        return pcr0 is not None and not any(pcr0)


class Attester(Protocol):
    """Enclave side: obtain an attestation document from the NSM binding these three values."""

    async def __call__(
        self, *, nonce: bytes, public_key: bytes, user_data: bytes | None = None
    ) -> bytes: ...


class DocumentVerifier(Protocol):
    """Client side: fully verify ``document`` (root, chain, signature, PCR policy, debug rule,
    age) and check that its nonce equals ``nonce``. Raise an ``EnclaveError`` on any failure."""

    def __call__(self, document: bytes, *, nonce: bytes) -> PeerAttestation: ...
