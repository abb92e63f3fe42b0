"""Errors of the XKS proxy (server side) and of the XKS client (the KMS side).

::

    kms.errors.KmsError
    └── XksError                         anything kms.xks reports
        ├── XksApiError                  an XKS Proxy API error: ``error_name`` + HTTP ``status``
        │   ├── ValidationError              400 ValidationException
        │   ├── InvalidStateError            400 InvalidStateException
        │   ├── InvalidCiphertextError       400 InvalidCiphertextException
        │   ├── InvalidKeyUsageError         400 InvalidKeyUsageException
        │   ├── AuthenticationFailedError    401 AuthenticationFailedException
        │   ├── AccessDeniedError            403 AccessDeniedException
        │   ├── KeyNotFoundError             404 KeyNotFoundException
        │   ├── InvalidUriPathError          404 InvalidUriPathException
        │   ├── MethodNotAllowedError        405 (the spec's rule for GET; no error name of its own)
        │   ├── ThrottlingError              429 ThrottlingException
        │   ├── InternalError                500 InternalException
        │   ├── UnsupportedOperationError    501 UnsupportedOperationException
        │   └── DependencyTimeoutError       503 DependencyTimeoutException
        └── XksProxyError                (client) a call to a proxy failed: ``failure`` says how,
                                         ``kms_error(context)`` is the error AWS KMS answers with

The server raises the :class:`XksApiError` subclasses and the adapter turns them into the reply
``{"errorName": ..., "errorMessage": ...}`` with the class's status (the spec's "Error codes"
table). ``reason`` is for our log only: authentication failures in particular reach the peer
as the bare error name. Configuration problems raise
:class:`transport.errors.ConfigurationError`.
"""

from __future__ import annotations

from typing import ClassVar

from ..errors import KmsApiError, KmsError
from .failures import XksCallContext, XksFailure

__all__ = [
    "XksError",
    "XksApiError",
    "ValidationError",
    "InvalidStateError",
    "InvalidCiphertextError",
    "InvalidKeyUsageError",
    "AuthenticationFailedError",
    "AccessDeniedError",
    "KeyNotFoundError",
    "InvalidUriPathError",
    "MethodNotAllowedError",
    "ThrottlingError",
    "InternalError",
    "UnsupportedOperationError",
    "DependencyTimeoutError",
    "API_ERRORS",
    "XksProxyError",
]

#: The spec caps ``errorMessage`` below 512 printable ASCII characters.
MAX_ERROR_MESSAGE = 511


class XksError(KmsError):
    """Root of the kms.xks errors."""


class XksApiError(XksError):
    """An error answer of the XKS Proxy API.

    Attributes:
        error_name: the spec's ``errorName`` (class attribute).
        status: the HTTP status the spec pairs with it (class attribute).
        message: the ``errorMessage`` sent to the caller (printable ASCII, < 512 characters).
        reason: what exactly went wrong, for our log only (never sent).
    """

    error_name: ClassVar[str] = "InternalException"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "The request failed."

    def __init__(self, message: str | None = None, *, reason: str | None = None) -> None:
        text = message if message is not None else self.default_message
        # Printable ASCII only, bounded (spec "Error codes"): anything else is replaced.
        text = "".join(c if " " <= c <= "~" else "?" for c in text)[:MAX_ERROR_MESSAGE]
        super().__init__(f"{self.error_name}: {reason or text}")
        self.message = text
        self.reason = reason or text


class ValidationError(XksApiError):
    """One or more input parameters are invalid."""

    error_name = "ValidationException"
    status = 400
    default_message = "The request was rejected because one or more input parameters is invalid."


class InvalidStateError(XksApiError):
    """The external key or the key store is disabled (by the owner, in the proxy)."""

    error_name = "InvalidStateException"
    status = 400
    default_message = (
        "The request was rejected because the specified external key or key store is disabled."
    )


class InvalidCiphertextError(XksApiError):
    """Ciphertext, IV, AAD or tag are corrupted or do not belong together (opaque by design)."""

    error_name = "InvalidCiphertextException"
    status = 400
    default_message = (
        "The request was rejected because the specified ciphertext, initialization vector, "
        "additional authenticated data or authentication tag is corrupted, missing, or "
        "otherwise invalid."
    )


class InvalidKeyUsageError(XksApiError):
    """The key is not allowed the requested operation (encrypt-only, decrypt-only, neither)."""

    error_name = "InvalidKeyUsageException"
    status = 400
    default_message = (
        "The request was rejected because the specified key does not support the requested "
        "operation."
    )


class AuthenticationFailedError(XksApiError):
    """The SigV4 signature did not verify (the detail is in ``reason``, never on the wire)."""

    error_name = "AuthenticationFailedException"
    status = 401
    default_message = "The request was rejected due to an invalid AWS SigV4 signature."


class AccessDeniedError(XksApiError):
    """The operation is not authorized for the request metadata (secondary authorization)."""

    error_name = "AccessDeniedException"
    status = 403
    default_message = "The request was rejected because the operation is not authorized."


class KeyNotFoundError(XksApiError):
    """No external key has this id (at this path prefix)."""

    error_name = "KeyNotFoundException"
    status = 404
    default_message = "The request was rejected because the specified external key is not found."


class InvalidUriPathError(XksApiError):
    """The URI path is not one of the API's."""

    error_name = "InvalidUriPathException"
    status = 404
    default_message = "The request was rejected because the specified URI path is not valid."


class MethodNotAllowedError(XksApiError):
    """A method other than POST on an API URI: the spec demands 405 (it names no error; the
    body still carries an ``errorName`` so that a client can parse it)."""

    error_name = "ValidationException"
    status = 405
    default_message = "The XKS Proxy API accepts POST requests only."


class ThrottlingError(XksApiError):
    """The request rate is too high."""

    error_name = "ThrottlingException"
    status = 429
    default_message = "The request was rejected because the request rate is too high."


class InternalError(XksApiError):
    """The key manager (file or token) failed."""

    error_name = "InternalException"
    status = 500
    default_message = "The request failed because of an internal error of the proxy."


class UnsupportedOperationError(XksApiError):
    """The operation, or a parameter's size beyond the spec's minimum, is not supported."""

    error_name = "UnsupportedOperationException"
    status = 501
    default_message = (
        "The request was rejected because the specified cryptographic operation is not "
        "implemented, or a parameter exceeded the maximum size this proxy supports."
    )


class DependencyTimeoutError(XksApiError):
    """The key manager did not answer in time."""

    error_name = "DependencyTimeoutException"
    status = 503
    default_message = "The proxy timed out while trying to access the external key manager."


#: errorName → class, for every name the spec defines (the client parses answers with it).
API_ERRORS: dict[str, type[XksApiError]] = {
    cls.error_name: cls
    for cls in (
        ValidationError,
        InvalidStateError,
        InvalidCiphertextError,
        InvalidKeyUsageError,
        AuthenticationFailedError,
        AccessDeniedError,
        KeyNotFoundError,
        InvalidUriPathError,
        ThrottlingError,
        InternalError,
        UnsupportedOperationError,
        DependencyTimeoutError,
    )
}


class XksProxyError(XksError):
    """A call to an XKS proxy failed (raised by :class:`kms.xks.client.XksProxyClient`).

    Attributes:
        failure: the failure scenario: which row of the spec's "KMS Considerations" table
            applies (:class:`kms.xks.failures.XksFailure`).
        detail: what happened, for the KMS daemon's log (never for its caller).
        error_message: the proxy's ``errorMessage`` when it sent one (AWS logs it, never
            returns it to its caller).
    """

    def __init__(
        self, failure: XksFailure, detail: str, *, error_message: str | None = None
    ) -> None:
        super().__init__(f"{failure.name}: {detail}")
        self.failure = failure
        self.detail = detail
        self.error_message = error_message

    def kms_error(self, context: XksCallContext) -> KmsApiError:
        """The AWS KMS error for this failure when it happens during ``context``."""
        return self.failure.kms_error(context)

    @property
    def connection_error_code(self) -> str:
        """The ``ConnectionErrorCode`` a failed ConnectCustomKeyStore reports."""
        return self.failure.connection_error_code
