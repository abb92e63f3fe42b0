"""Recipient verification: attest's verifier plus the KMS-specific checks (nitro.md §6.1).

Trust in the document comes from the configured roots (chain + ES384 signature, freshness by
``max_document_age_s``); the *key policy* then decides on PCRs through the
``kms:RecipientAttestation:*`` condition keys, as AWS does, so the attest policy used here
accepts any measurement and debug documents (a debug document's zeroed PCRs simply fail any
policy that names real measurements).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from attest.document import parse_document
from attest.errors import PolicyViolation, VerificationError
from attest.policy import Policy
from attest.verify import Verifier

from . import _wrap
from .service import Outcome, RecipientInfo, RecipientRejected

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["AttestRecipientVerifier"]


class AttestRecipientVerifier:
    """Callable ``(document, outcome) -> RecipientInfo`` for :class:`kms.service.KmsService`.

    Args:
        roots: trust anchors (AWS Nitro root G1 and/or the local CA root).
        max_document_age_s: documents older than this are refused.
        clock: wall clock (seconds), injectable for tests.
    """

    def __init__(
        self,
        roots: Sequence[x509.Certificate],
        *,
        max_document_age_s: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._verifier = Verifier(roots, cache_chains=True)
        self._policy = Policy(any_measurement=True, allow_debug=True, max_age_s=max_document_age_s)
        self._clock = clock

    def __call__(self, document: bytes, outcome: Outcome) -> RecipientInfo:
        at = datetime.fromtimestamp(self._clock() if self._clock else time.time(), tz=UTC)
        try:
            # Verifier.verify's own steps through attest's public step API (parse, chain -
            # cached by fingerprint -, ES384 signature, policy), minus the human-readable check
            # report verify() also assembles, which nothing here reads (~10-15 us a request).
            doc = parse_document(document)
            chain = self._verifier.verify_chain(doc, at)
            Verifier.verify_signature(doc, chain.leaf_key)
            failed = [c for c in self._policy.evaluate(doc, at) if not c.ok]
            if failed:
                raise PolicyViolation("; ".join(f"{c.name}: {c.detail}" for c in failed))
        except VerificationError as exc:
            raise RecipientRejected(
                f"attestation document rejected at {exc.step}: {exc.reason}",
                malformed=exc.step == "parse",
            ) from None
        outcome.recipient = {
            "module_id": doc.module_id,
            "image_sha384": doc.pcrs.get(0, b"").hex(),
        }
        if doc.public_key is None:
            raise RecipientRejected("attestation document has no public_key", malformed=True)
        try:
            public_key = _wrap.load_rsa_spki(doc.public_key)
        except ValueError as exc:
            raise RecipientRejected(
                f"attestation public_key is not an RSA SPKI: {exc}", malformed=True
            ) from None
        pcrs = {index: value.hex() for index, value in doc.pcrs.items()}
        return RecipientInfo(
            module_id=doc.module_id,
            image_sha384=pcrs.get(0, ""),
            pcrs=pcrs,
            public_key=public_key,
        )
