"""Verify attestation documents: parse → chain → signature → policy (nitro.md §4.4), pure.

One code path serves our local documents and real AWS ones; only the configured trust roots
differ. Steps:

1. **parse**: :func:`attest.document.parse_document` (COSE envelope + every syntactic rule),
   plus DER decoding of the certificates.
2. **chain**: ``cabundle[0]`` must be one of the configured roots (byte-for-byte); the bundle
   must be in root-first issuing order ending at the leaf's issuer; then PKIX path validation
   with ``cryptography.x509.verification`` (signatures, basicConstraints and pathLen, CA
   keyUsage, every certificate valid at the injectable time ``at``, CRLs not checked as AWS
   documents); the leaf must be an end entity with digitalSignature and a P-384 key.
3. **signature**: the COSE_Sign1 ES384 signature by the leaf key, over the exact bytes received.
4. **policy**: :class:`attest.policy.Policy` (PCR sets, debug rule, max age, nonce).

Chain results are cached per :class:`Verifier` keyed by the SHA-256 fingerprints of
``[certificate, *cabundle]``; a hit still checks that ``at`` lies inside the chain's common
validity window, and the document signature is always checked. A leaf is reused for all
documents of an enclave for ~3 hours, so a KMS verifying many documents pays one ECDSA
verification per document instead of five.

Failures raise :class:`~attest.errors.VerificationError` subclasses whose ``step`` names the
failed step and ``reason`` says why (for the operator; peers only learn "failed").
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store
from cryptography.x509.verification import VerificationError as X509VerificationError

from attest.cose import verify_es384
from attest.document import AttestationDocument, parse_document
from attest.errors import (
    ChainError,
    DocumentFormatError,
    PolicyViolation,
    SignatureError,
    Step,
    VerificationError,
)
from attest.policy import Policy
from transport.errors import ConfigurationError

__all__ = [
    "CheckResult",
    "VerifiedDocument",
    "VerificationReport",
    "ChainResult",
    "Verifier",
    "DEFAULT_CACHE_SIZE",
]

#: Chains remembered per verifier (one per enclave leaf; LRU beyond this).
DEFAULT_CACHE_SIZE: Final = 1024
#: Longest accepted cabundle: AWS uses 4 (root, regional, zonal, instance); a little slack.
MAX_CABUNDLE: Final = 8


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check and its outcome; ``step`` is the verification step it belongs to."""

    step: Step
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class ChainResult:
    """A validated certificate path (leaf first, root last) and its common validity window."""

    chain: tuple[x509.Certificate, ...]
    leaf_key: ec.EllipticCurvePublicKey = field(repr=False)
    not_before: datetime
    not_after: datetime
    cached: bool = False


@dataclass(frozen=True)
class VerifiedDocument:
    """A document that passed every step."""

    document: AttestationDocument
    chain: tuple[x509.Certificate, ...]
    verified_at: datetime
    checks: tuple[CheckResult, ...]
    chain_cached: bool = False

    @property
    def root(self) -> x509.Certificate:
        """The trust root the chain ends at."""
        return self.chain[-1]

    @property
    def pcrs(self) -> dict[int, bytes]:
        return dict(self.document.pcrs)

    @property
    def module_id(self) -> str:
        return self.document.module_id


@dataclass(frozen=True)
class VerificationReport:
    """Every check's outcome, for tools (``enclave attest verify``); never raises."""

    ok: bool
    verified_at: datetime
    checks: tuple[CheckResult, ...]
    document: AttestationDocument | None = None
    chain: tuple[x509.Certificate, ...] | None = None
    failed_step: Step | None = None
    reason: str | None = None


def _fingerprint(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


def _load_der(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    # InvalidVersion (a version field other than v1/v3) is not a ValueError: without it, a
    # single flipped bit there escaped verify() untyped (found by tests/attest/test_fuzz.py).
    except (ValueError, x509.InvalidVersion) as exc:
        raise DocumentFormatError(f"{what}: not a DER X.509 certificate ({exc})") from exc


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


class Verifier:
    """Verifies attestation documents against configured trust roots.

    Args:
        roots: trust anchors (e.g. ``[attest.roots.AWS_NITRO_ROOT_G1]``, a local CA root).
        cache_chains: remember validated chains by fingerprint (see module docstring).
        cache_size: how many chains to remember.

    Raises:
        ConfigurationError: no roots (there is no "accept everything" mode).

    Thread-safe.
    """

    def __init__(
        self,
        roots: Sequence[x509.Certificate],
        *,
        cache_chains: bool = True,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        roots = list(roots)
        if not roots:
            raise ConfigurationError("no trust roots configured: refusing to verify anything")
        for root in roots:
            if not isinstance(root, x509.Certificate):
                raise ConfigurationError("trust roots must be x509.Certificate objects")
        self._roots: dict[bytes, x509.Certificate] = {
            root.public_bytes(Encoding.DER): root for root in roots
        }
        self._cache_chains = cache_chains
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[bytes, ...], ChainResult] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def roots(self) -> list[x509.Certificate]:
        """The configured trust roots."""
        return list(self._roots.values())

    def clear_cache(self) -> None:
        """Forget every cached chain."""
        with self._lock:
            self._cache.clear()

    # --- the steps -------------------------------------------------------------------------

    def verify_chain(self, doc: AttestationDocument, at: datetime) -> ChainResult:
        """Step 2: validate ``[certificate, cabundle...]`` to a configured root at ``at``.

        Raises:
            ChainError: untrusted root, broken order, PKIX failure, or validity outside ``at``.
            DocumentFormatError: a certificate is not DER.
        """
        if len(doc.cabundle) > MAX_CABUNDLE:
            raise ChainError(f"cabundle has {len(doc.cabundle)} certificates (max {MAX_CABUNDLE})")
        key: tuple[bytes, ...] | None = None
        if self._cache_chains:
            key = (
                hashlib.sha256(doc.certificate).digest(),
                *(hashlib.sha256(c).digest() for c in doc.cabundle),
            )
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            if hit is not None:
                if hit.not_before <= at <= hit.not_after:
                    return ChainResult(hit.chain, hit.leaf_key, hit.not_before, hit.not_after, True)
                self._check_validity(hit.chain, at)  # raises with the precise certificate
        try:
            result = self._validate(doc, at)
        except (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension) as exc:
            if isinstance(exc, VerificationError):
                raise
            # a DER-valid certificate whose fields do not decode (bad key, bad extension...)
            raise ChainError(f"malformed certificate in the chain: {exc}") from exc
        if key is not None:
            with self._lock:
                self._cache[key] = result
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return result

    @staticmethod
    def _check_validity(chain: Sequence[x509.Certificate], at: datetime) -> None:
        names = ["leaf"] + [f"cabundle[{i}]" for i in range(len(chain) - 2, -1, -1)]
        for name, cert in zip(names, chain, strict=True):
            if at < cert.not_valid_before_utc:
                raise ChainError(
                    f"{name} ({_describe(cert)}) is not valid before "
                    f"{cert.not_valid_before_utc.isoformat()} (verification time {at.isoformat()})"
                )
            if at > cert.not_valid_after_utc:
                raise ChainError(
                    f"{name} ({_describe(cert)}) expired at "
                    f"{cert.not_valid_after_utc.isoformat()} (verification time {at.isoformat()})"
                )

    def _validate(self, doc: AttestationDocument, at: datetime) -> ChainResult:
        root = self._roots.get(doc.cabundle[0])
        if root is None:
            fp = hashlib.sha256(doc.cabundle[0]).hexdigest()
            raise ChainError(f"cabundle[0] (sha256 {fp}) is not a configured trust root")
        leaf = _load_der(doc.certificate, "certificate")
        intermediates = [_load_der(c, f"cabundle[{i + 1}]") for i, c in enumerate(doc.cabundle[1:])]
        chain = (leaf, *reversed(intermediates), root)
        # root-first issuing order, as the NSM emits it (nitro.md §4.4 step 3)
        for child, parent in itertools.pairwise(chain):
            if child.issuer != parent.subject:
                raise ChainError(
                    f"cabundle is not in root-first issuing order: {_describe(child)} is not "
                    f"issued by {_describe(parent)}"
                )
        self._check_validity(chain, at)
        leaf_key = leaf.public_key()
        if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or not isinstance(
            leaf_key.curve, ec.SECP384R1
        ):
            raise ChainError("leaf key is not ECDSA P-384 (ES384 requires it)")
        try:
            bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or bc.ca:
            raise ChainError("leaf certificate must have basicConstraints CA:FALSE")
        try:
            ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            ku = None
        if ku is None or not ku.digital_signature:
            raise ChainError("leaf certificate keyUsage must include digitalSignature")
        verifier = (
            PolicyBuilder()
            .store(Store([root]))
            .time(at)
            .max_chain_depth(MAX_CABUNDLE)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, intermediates)
        except X509VerificationError as exc:
            raise ChainError(f"certificate path validation failed: {exc}") from exc
        if [_fingerprint(c) for c in verified.chain] != [_fingerprint(c) for c in chain]:
            raise ChainError("validated path does not use the cabundle as given")
        return ChainResult(
            chain=chain,
            leaf_key=leaf_key,
            not_before=max(c.not_valid_before_utc for c in chain),
            not_after=min(c.not_valid_after_utc for c in chain),
        )

    @staticmethod
    def verify_signature(doc: AttestationDocument, leaf_key: ec.EllipticCurvePublicKey) -> None:
        """Step 3: check the COSE_Sign1 signature. Raises :class:`SignatureError`."""
        cose = doc.cose
        if cose is None:
            raise SignatureError("document has no COSE envelope (was it parsed from bytes?)")
        if not verify_es384(leaf_key, cose.protected, cose.payload, cose.signature):
            raise SignatureError("COSE_Sign1 ES384 signature does not verify with the leaf key")

    # --- all together ----------------------------------------------------------------------

    def verify(
        self, document: bytes, *, policy: Policy, at: datetime | None = None
    ) -> VerifiedDocument:
        """Run every step; return the verified document or raise.

        Args:
            document: COSE_Sign1 bytes (tagged or untagged).
            policy: the relying party's expectations.
            at: verification time (aware datetime); default now. Certificates must be valid
                then, and ``max_age_s`` / measurement windows are measured against it.

        Raises:
            VerificationError: ``.step`` is "parse", "chain", "signature" or "policy".
        """
        at = _resolve_time(at)
        doc = parse_document(document)
        chain = self.verify_chain(doc, at)
        self.verify_signature(doc, chain.leaf_key)
        policy_checks = policy.evaluate(doc, at)
        failed = [c for c in policy_checks if not c.ok]
        if failed:
            raise PolicyViolation("; ".join(f"{c.name}: {c.detail}" for c in failed))
        checks = (
            CheckResult("parse", "parse", True, "well-formed COSE_Sign1 attestation document"),
            CheckResult("chain", "chain", True, _chain_detail(chain)),
            CheckResult("signature", "signature", True, "ES384 signature by the leaf verifies"),
            *(CheckResult("policy", c.name, c.ok, c.detail) for c in policy_checks),
        )
        return VerifiedDocument(doc, chain.chain, at, checks, chain.cached)

    def report(
        self, document: bytes, *, policy: Policy, at: datetime | None = None
    ) -> VerificationReport:
        """Like :meth:`verify` but returns every outcome instead of raising.

        Steps after the first failure are reported as skipped (``ok=False``, detail "skipped").
        """
        at = _resolve_time(at)
        checks: list[CheckResult] = []
        doc: AttestationDocument | None = None
        chain: ChainResult | None = None
        try:
            doc = parse_document(document)
            checks.append(CheckResult("parse", "parse", True, "well-formed COSE_Sign1 document"))
            chain = self.verify_chain(doc, at)
            checks.append(CheckResult("chain", "chain", True, _chain_detail(chain)))
            self.verify_signature(doc, chain.leaf_key)
            checks.append(
                CheckResult("signature", "signature", True, "ES384 signature by the leaf verifies")
            )
            policy_checks = policy.evaluate(doc, at)
            checks.extend(CheckResult("policy", c.name, c.ok, c.detail) for c in policy_checks)
            failed = [c for c in policy_checks if not c.ok]
            if failed:
                raise PolicyViolation("; ".join(f"{c.name}: {c.detail}" for c in failed))
        except VerificationError as exc:
            if exc.step != "policy":
                # a DER failure found while loading certificates belongs to "parse"
                checks = [c for c in checks if c.step != exc.step]
                checks.append(CheckResult(exc.step, exc.step, False, exc.reason))
                order: tuple[Step, ...] = ("parse", "chain", "signature", "policy")
                for step in order[order.index(exc.step) + 1 :]:
                    checks.append(CheckResult(step, step, False, "skipped"))
            return VerificationReport(
                ok=False,
                verified_at=at,
                checks=tuple(checks),
                document=doc,
                chain=chain.chain if chain else None,
                failed_step=exc.step,
                reason=exc.reason,
            )
        return VerificationReport(True, at, tuple(checks), doc, chain.chain)


def _chain_detail(chain: ChainResult) -> str:
    how = "cached" if chain.cached else "validated"
    return f"{len(chain.chain)}-certificate path to {_describe(chain.chain[-1])} ({how})"


def _resolve_time(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(tz=UTC)
    if at.tzinfo is None:
        raise ValueError("verification time must be timezone-aware")
    return at.astimezone(UTC)
