"""An enclave's identity for enclave-to-enclave channels: its attester and a peer verifier.

``transport.peers`` opens and serves mutually attested channels but, being the bottom layer,
takes the attester and the verifiers as parameters. Inside an enclave they come from the NSM::

    identity = await enclave_peer_identity(await NsmClient.open())
    channel = await open_peer_channel(
        "worker_1", 6000, verifier=identity.verifier, attester=identity.attester
    )
    await serve_peer_channels(
        6000, handle, attester=identity.attester, peer_verifier=identity.verifier
    )

By default a peer must run **the same image** (its PCR0 equal to ours) and not be in debug mode
(a debug enclave's PCR0 is zero, and the debug rule refuses it): the policy of a replica group
or a training ring. Pass ``policy`` to accept other images (a front enclave calling a model
enclave pins the model image's PCR0, and PCR16 if it pins the models).

The trust root is the one this enclave's own NSM chains to: the root certificate of a document
it asks its own NSM for (on Nitro that is the AWS Nitro root, the same the bundled copy holds;
under the emulator, the runtime's local CA). Pass ``roots`` to pin them explicitly instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from cryptography import x509

from attest.channel import channel_verifier, nsm_attester
from attest.document import parse_document
from attest.errors import VerificationError
from attest.nsm.client import NsmClient
from attest.policy import MeasurementSet, Policy
from attest.verify import Verifier

if TYPE_CHECKING:
    from transport.channel import Attester, DocumentVerifier

__all__ = ["PeerIdentity", "enclave_peer_identity", "PEER_MAX_AGE_S"]

#: A peer's document may be at most this old (seconds): each handshake asks for a fresh one,
#: so this only absorbs clock skew and slow handshakes.
PEER_MAX_AGE_S: Final = 300.0


@dataclass(frozen=True)
class PeerIdentity:
    """What :func:`enclave_peer_identity` returns.

    Attributes:
        attester: this enclave's ``Attester`` (its NSM), for its side of mutual channels.
        verifier: checks a peer's document against ``roots`` and ``policy``.
        policy: the peer policy in force.
        roots: the trust roots.
        module_id / pcr0: this enclave's own module id and image measurement.
    """

    attester: Attester
    verifier: DocumentVerifier
    policy: Policy
    roots: tuple[x509.Certificate, ...]
    module_id: str
    pcr0: bytes


async def enclave_peer_identity(
    nsm: NsmClient,
    *,
    policy: Policy | None = None,
    roots: Sequence[x509.Certificate] | None = None,
    allow_debug: bool = False,
    max_age_s: float = PEER_MAX_AGE_S,
) -> PeerIdentity:
    """This enclave's attester and a verifier for its peers (see the module docstring).

    Args:
        nsm: this enclave's NSM.
        policy: which peers to accept (default: PCR0 equal to ours, not debug).
        roots: trust roots (default: the root our own NSM's documents chain to).
        allow_debug: with the default policy, accept debug-mode peers too (whose PCR0 is zero,
            like ours if we are one): for development rings only.
        max_age_s: the default policy's maximum document age.

    Raises:
        VerificationError: our own document does not verify against ``roots`` (a misconfigured
            root, or an NSM we cannot trust).
        AttestError: the NSM failed.
    """
    raw = await nsm.attestation(nonce=os.urandom(32))
    own = parse_document(raw)
    if roots is None:
        if not own.cabundle:
            raise VerificationError("our own attestation document carries no CA bundle")
        roots = [x509.load_der_x509_certificate(own.cabundle[0])]
    verifier = Verifier(list(roots))
    # Our own document must chain to the roots we will hold peers to.
    verifier.verify(raw, policy=Policy(any_measurement=True, allow_debug=True))
    pcr0 = bytes(own.pcrs.get(0, b""))
    if policy is None:
        if not pcr0:
            raise VerificationError("our own attestation document carries no PCR0")
        policy = Policy([MeasurementSet({0: pcr0})], allow_debug=allow_debug, max_age_s=max_age_s)
    return PeerIdentity(
        attester=nsm_attester(nsm),
        verifier=channel_verifier(verifier, policy),
        policy=policy,
        roots=tuple(roots),
        module_id=own.module_id,
        pcr0=pcr0,
    )
