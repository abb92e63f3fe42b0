"""The signing half of an NSM: a leaf key plus its chain, turning payload fields into documents.

A :class:`DocumentSigner` is what an :class:`~attest.nsm.device.NsmDevice` holds instead of
hardware: the per-enclave leaf private key (P-384), the leaf certificate and the CA bundle (root
first). Only the host-side supervisor ever has one; the enclave talks to the device.

Real Nitro leaves live ~3 hours and the NSM rotates them. A signer built by
:meth:`attest.ca.LocalCA.new_signer` does the same: before signing it checks that the document's
timestamp falls inside the whole chain's validity with :data:`RENEW_MARGIN_S` to spare, and if
not asks the CA for a fresh leaf (and intermediates, when those expire too).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from attest.document import (
    encode_chain_fields,
    encode_payload_fields,
    encode_pcrs,
    sign_payload,
)

__all__ = ["RENEW_MARGIN_S", "DocumentSigner"]

#: Renew the leaf when less than this much chain validity is left at signing time (seconds):
#: a document should stay verifiable for a while after it is issued (30 min of a 3 h leaf).
RENEW_MARGIN_S: Final = 30 * 60.0
#: Nitro's digest name for SHA-384 PCRs.
_DIGEST: Final = "SHA384"

Renew = Callable[
    [datetime], "tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Sequence[x509.Certificate]]"
]


class DocumentSigner:
    """Signs attestation documents with a leaf key whose chain is ``cabundle`` (root first).

    Args:
        key: the leaf's P-384 private key.
        certificate: the leaf certificate (its public key must match ``key``).
        cabundle: CA certificates, root first, each issuing the next, the last issuing the leaf.
        renew: optional ``renew(at) -> (key, certificate, cabundle)`` called when the chain would
            be invalid (or nearly so) at a document's timestamp.

    Thread-safe: one device may be driven from several threads.
    """

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        cabundle: Sequence[x509.Certificate],
        *,
        renew: Renew | None = None,
    ) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP384R1
        ):
            raise TypeError("the document signing key must be a P-384 private key")
        if not cabundle:
            raise ValueError("cabundle must hold at least the root certificate")
        self._renew = renew
        self._lock = threading.Lock()
        self._pcrs_source: dict[int, bytes] | None = None
        self._pcrs_encoded = b""
        self._install(key, certificate, cabundle)

    def _install(
        self,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        cabundle: Sequence[x509.Certificate],
    ) -> None:
        if certificate.public_key() != key.public_key():
            raise ValueError("leaf certificate does not match the signing key")
        chain = [certificate, *cabundle]
        self._key = key
        self._certificate = certificate
        self._cabundle = tuple(cabundle)
        self._chain_fields = encode_chain_fields(
            certificate.public_bytes(Encoding.DER),
            [c.public_bytes(Encoding.DER) for c in cabundle],
        )
        self._not_before = max(c.not_valid_before_utc for c in chain)
        self._not_after = min(c.not_valid_after_utc for c in chain)

    @property
    def certificate(self) -> x509.Certificate:
        """The current leaf certificate."""
        return self._certificate

    @property
    def cabundle(self) -> tuple[x509.Certificate, ...]:
        """The current CA bundle, root first."""
        return self._cabundle

    @property
    def not_after(self) -> datetime:
        """End of the current chain's common validity window."""
        return self._not_after

    def _ensure_valid(self, at: datetime) -> None:
        if self._not_before <= at <= self._not_after - timedelta(seconds=RENEW_MARGIN_S):
            return
        if self._renew is None:
            if not self._not_before <= at <= self._not_after:
                raise ValueError(f"signing chain is not valid at {at.isoformat()}")
            return
        self._install(*self._renew(at))

    def issue(
        self,
        *,
        module_id: str,
        timestamp_ms: int,
        pcrs: Mapping[int, bytes],
        public_key: bytes | None = None,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
    ) -> bytes:
        """Build and sign a document (untagged COSE_Sign1, ES384) exactly as the NSM would."""
        at = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
        with self._lock:
            self._ensure_valid(at)
            chain_fields, key = self._chain_fields, self._key
            # Locked PCRs rarely change between documents: reuse the encoded map when the
            # values are equal (a cheap compare) instead of re-encoding all 16 PCRs each time.
            if pcrs != self._pcrs_source:
                self._pcrs_source, self._pcrs_encoded = dict(pcrs), encode_pcrs(pcrs)
            encoded_pcrs = self._pcrs_encoded
        payload = encode_payload_fields(
            module_id=module_id,
            digest=_DIGEST,
            timestamp=timestamp_ms,
            pcrs=encoded_pcrs,
            chain_fields=chain_fields,
            public_key=public_key,
            user_data=user_data,
            nonce=nonce,
        )
        return sign_payload(payload, key)
