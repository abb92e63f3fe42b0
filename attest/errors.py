"""Errors raised by :mod:`attest`.

::

    transport.errors.EnclaveError
    └── AttestError                     anything attest/ reports on purpose
        ├── NsmError                    the NSM answered {"Error": "<Name>"} (``.code`` = the name)
        ├── NsmUnavailableError         no NSM device/channel, or it broke mid-request
        ├── CAError                     the local CA's state directory is unusable
        └── VerificationError           a document failed verification (``.step``, ``.reason``)
            ├── DocumentFormatError     step "parse": CBOR/COSE or a §4.4 syntactic rule
            ├── ChainError              step "chain": certificate path to a trusted root
            ├── SignatureError          step "signature": COSE ES384 signature by the leaf
            └── PolicyViolation         step "policy": PCRs, debug rule, age, nonce

``ConfigurationError`` (from :mod:`transport.errors`) is raised for unusable configuration, e.g.
a :class:`~attest.verify.Verifier` without trust roots or an invalid policy file.

Verification errors carry the operator-facing reason; a peer should only ever learn "failed"
(the secure channel turns them into an opaque ``AuthenticationFailed``).
"""

from __future__ import annotations

from typing import ClassVar, Final, Literal

from transport.errors import EnclaveError

__all__ = [
    "NSM_ERROR_NAMES",
    "AttestError",
    "NsmError",
    "NsmUnavailableError",
    "CAError",
    "VerificationError",
    "DocumentFormatError",
    "ChainError",
    "SignatureError",
    "PolicyViolation",
    "Step",
    "STEPS",
]

#: NSM ``ErrorCode`` names in C ABI order (nsm-api ``src/api/mod.rs``; nitro.md §3.3). On the
#: wire an error is ``{"Error": "<Name>"}``; ``Success`` never appears as an error.
NSM_ERROR_NAMES: Final[tuple[str, ...]] = (
    "Success",
    "InvalidArgument",
    "InvalidIndex",
    "InvalidResponse",
    "ReadOnlyIndex",
    "InvalidOperation",
    "BufferTooSmall",
    "InputTooLarge",
    "InternalError",
)

Step = Literal["parse", "chain", "signature", "policy"]
#: The verification steps in the order they run.
STEPS: Final[tuple[Step, ...]] = ("parse", "chain", "signature", "policy")


class AttestError(EnclaveError):
    """Root of the errors raised by the attest package."""


class NsmError(AttestError):
    """The NSM rejected a request with one of its error codes.

    Attributes:
        code: the NSM ``ErrorCode`` name, e.g. ``"ReadOnlyIndex"`` (one of :data:`NSM_ERROR_NAMES`).
    """

    def __init__(self, code: str, message: str | None = None) -> None:
        self.code = code
        super().__init__(message or f"NSM error: {code}")


class NsmUnavailableError(AttestError):
    """No NSM is reachable (no ``/dev/nsm``, no ``ENCLAVE_NSM_FD``) or the channel broke."""


class CAError(AttestError):
    """The local CA's directory holds unusable state (unreadable or mismatched key/certificate)."""


class VerificationError(AttestError):
    """An attestation document failed verification.

    Attributes:
        step: which step failed: ``"parse"``, ``"chain"``, ``"signature"`` or ``"policy"``.
        reason: human-readable reason, for the operator (never send it to the peer).
    """

    default_step: ClassVar[Step] = "parse"

    def __init__(self, reason: str, *, step: Step | None = None) -> None:
        self.step: Step = step if step is not None else self.default_step
        self.reason = reason
        super().__init__(f"{self.step}: {reason}")


class DocumentFormatError(VerificationError):
    """The bytes are not a well-formed Nitro attestation document (step ``"parse"``)."""

    default_step: ClassVar[Step] = "parse"


class ChainError(VerificationError):
    """The certificate chain does not reach a trusted root at the given time (step ``"chain"``)."""

    default_step: ClassVar[Step] = "chain"


class SignatureError(VerificationError):
    """The COSE_Sign1 signature does not verify with the leaf key (step ``"signature"``)."""

    default_step: ClassVar[Step] = "signature"


class PolicyViolation(VerificationError):
    """The document is authentic but the relying party's policy rejects it (step ``"policy"``)."""

    default_step: ClassVar[Step] = "policy"
