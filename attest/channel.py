"""Glue between attest and the secure channel (``transport.channel``).

* :func:`nsm_attester` makes the enclave side's ``Attester`` from an :class:`NsmClient`: the
  channel asks for a document binding its ephemeral public key and the hello nonce.
* :func:`channel_verifier` makes the client side's ``DocumentVerifier``: full verification
  (chain, signature, the caller's policy) with the channel's nonce enforced, returning the
  ``PeerAttestation`` the channel exposes as ``SecureChannel.peer``.

Failures raise :class:`~attest.errors.VerificationError` (an ``EnclaveError``); the channel turns
them into an opaque ``AuthenticationFailed`` for the caller and logs the detailed reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from attest.nsm.client import NsmClient
from attest.policy import Policy
from attest.verify import Verifier

if TYPE_CHECKING:
    from transport.channel import Attester, DocumentVerifier

__all__ = ["nsm_attester", "channel_verifier"]


def nsm_attester(client: NsmClient) -> Attester:
    """An ``Attester`` asking ``client``'s NSM for documents."""

    async def attest(*, nonce: bytes, public_key: bytes, user_data: bytes | None = None) -> bytes:
        return await client.attestation(nonce=nonce, public_key=public_key, user_data=user_data)

    return attest


def channel_verifier(
    verifier: Verifier,
    policy: Policy,
    *,
    clock: Callable[[], datetime] | None = None,
) -> DocumentVerifier:
    """A ``DocumentVerifier``: verify with ``policy`` plus the handshake's nonce.

    Args:
        verifier: holds the trust roots (and the chain cache).
        policy: PCR sets, debug rule, max age; its ``nonce`` is replaced by the channel's.
        clock: verification time source (default: now), for tests with pinned documents.
    """
    from transport.channel import PeerAttestation

    def verify(document: bytes, *, nonce: bytes) -> PeerAttestation:
        bound = dataclasses.replace(policy, nonce=nonce)
        result = verifier.verify(document, policy=bound, at=clock() if clock else None)
        doc = result.document
        return PeerAttestation(
            module_id=doc.module_id,
            digest=doc.digest,
            timestamp_ms=doc.timestamp,
            pcrs=dict(doc.pcrs),
            public_key=doc.public_key,
            user_data=doc.user_data,
            nonce=doc.nonce,
            document=bytes(document),
        )

    return verify
