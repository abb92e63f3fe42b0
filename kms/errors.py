"""Errors of the ``kms`` package.

::

    transport.errors.EnclaveError
    └── KmsError                     anything kms/ reports
        ├── KmsApiError              an AWS KMS error answer: ``type_name`` (``__type``) + message
        │                            (raised by the client; raised by the service core and turned
        │                            into the HTTP error reply by the daemon)
        ├── CiphertextFormatError    a CiphertextBlob / CMS structure is malformed or fails its tag
        ├── SigV4Failure             (kms.sigv4) a request failed SigV4 authentication
        ├── RecipientRejected        (kms.service) a Recipient's attestation document is refused
        ├── PolicyError              a key policy document is malformed
        ├── KeyMaterialError         key material does not fit its key spec (also a ValueError)
        └── AuditChainError          an audit log line breaks the hash chain

Configuration problems raise :class:`transport.errors.ConfigurationError`.
"""

from __future__ import annotations

from typing import ClassVar

from transport.errors import EnclaveError

__all__ = [
    "KmsError",
    "KmsApiError",
    "CiphertextFormatError",
    "PolicyError",
    "KeyMaterialError",
    "AuditChainError",
]


class KmsError(EnclaveError):
    """Root of the kms package's errors."""


class KmsApiError(KmsError):
    """An AWS KMS error: ``type_name`` is the wire ``__type`` (``NotFoundException``...).

    Attributes:
        type_name: the AWS exception name, e.g. ``"AccessDeniedException"``.
        message: the human-readable message sent on the wire.
        status: the HTTP status the daemon answers with (400 for client errors, 500 for ours).
    """

    #: HTTP status for error types that are not 400.
    _STATUS: ClassVar[dict[str, int]] = {
        "KMSInternalException": 500,
        "KeyUnavailableException": 500,
        "DependencyTimeoutException": 503,
        "RequestEntityTooLargeException": 413,
    }

    def __init__(self, type_name: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.status = status if status is not None else self._STATUS.get(type_name, 400)


class CiphertextFormatError(KmsError):
    """A ciphertext (KMS CiphertextBlob or CMS EnvelopedData) is malformed or not authentic.

    Deliberately uninformative about *which* check failed when the cause is authentication.
    """


class PolicyError(KmsError):
    """A key policy document is not valid JSON or not in the supported IAM subset."""


class KeyMaterialError(KmsError, ValueError):
    """Key material (generated, stored or imported) does not fit its key spec."""


class AuditChainError(KmsError):
    """The audit log's hash chain is broken.

    Attributes:
        line: 1-based number of the first broken line.
    """

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"audit log broken at line {line}: {reason}")
        self.line = line
        self.reason = reason
