"""How AWS KMS reports a failed call to an XKS proxy: the failure scenarios and, for each, the
KMS exception per kind of KMS operation, the exception message, and the connection error code.

Source: the XKS Proxy API specification (aws/aws-kms-xksproxy-api-spec,
``xks_proxy_api_spec.md``, "Error codes" → "KMS Considerations" table), and botocore's KMS
model for the ``ConnectionErrorCodeType`` values and the exception names. AWS's developer guide
("Troubleshooting external key stores") states the rule the table follows: cryptographic
operations answer ``KMSInvalidStateException`` for every external failure, with the message
telling which; management operations use the specific ``Xks*`` exceptions.

Where the table is silent (a proxy answering AccessDenied to a health check, say) the mapping
below says so in a comment and picks the closest exception the KMS model has. The table names
``XksKeyInvalidResponseException`` for an UnsupportedOperationException during CreateKey; the
KMS model has no such shape, so that row uses ``XksKeyInvalidConfigurationException``, the
model's exception for an external key that does not meet the requirements.

``DependencyTimeoutException`` is not among them: AWS maps a slow or unreachable proxy to
``XksProxyUriUnreachableException`` (management), ``CustomKeyStoreInvalidStateException``
(CreateKey) and ``KMSInvalidStateException`` (cryptographic operations), whatever the proxy's own
``errorName`` was.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import KmsApiError

__all__ = ["XksCallContext", "XksFailure"]


class XksCallContext(enum.Enum):
    """The kind of KMS operation during which the proxy was called."""

    #: CreateCustomKeyStore / UpdateCustomKeyStore (GetHealthStatus).
    KEY_STORE_MANAGEMENT = "key-store-management"
    #: CreateKey with Origin EXTERNAL_KEY_STORE (GetKeyMetadata).
    CREATE_KEY = "create-key"
    #: Encrypt, Decrypt, ReEncrypt, GenerateDataKey*, DescribeKey (the proxy's crypto calls).
    CRYPTO = "crypto"


@dataclass(frozen=True, slots=True)
class _Row:
    #: The spec table's "Failure Scenario" (also keeps every member's value distinct: equal
    #: values would make enum aliases).
    scenario: str
    management: str
    create_key: str
    message: str
    connection_error_code: str


_CANNOT_INTERPRET = (
    "AWS KMS cannot interpret the response from the external key store proxy. If you see this "
    "error repeatedly, report it to your external key store proxy administrator."
)
_UNREACHABLE = "XksProxyUriUnreachableException"
_STORE_STATE = "CustomKeyStoreInvalidStateException"
_INVALID_RESPONSE = "XksProxyInvalidResponseException"


@enum.unique  # equal rows would silently become aliases of one another
class XksFailure(enum.Enum):
    """One row of the spec's table: a way a call to the proxy can fail."""

    #: The proxy answered ValidationException.
    VALIDATION = _Row(
        "Proxy returns a ValidationException",
        _INVALID_RESPONSE,
        _STORE_STATE,
        _CANNOT_INTERPRET,
        "XKS_PROXY_INVALID_RESPONSE",
    )
    #: The proxy answered InvalidStateException (key or key store disabled in the proxy).
    #: Management row absent from the table: a disabled key store is a configuration problem.
    INVALID_STATE = _Row(
        "Proxy returns an InvalidStateException",
        "XksProxyInvalidConfigurationException",
        "XksKeyInvalidConfigurationException",
        "The external key associated with this KMS key in an external key store is not enabled "
        "in the external key manager. Enable the external key in the external key manager and "
        "retry the request.",
        "XKS_PROXY_INVALID_CONFIGURATION",
    )
    #: The proxy answered InvalidCiphertextException (Decrypt).
    INVALID_CIPHERTEXT = _Row(
        "Proxy returns an InvalidCiphertextException",
        _INVALID_RESPONSE,
        _STORE_STATE,
        "The external key store proxy rejected the request because the specified ciphertext "
        "or encryption context is corrupted, missing, or otherwise invalid.",
        "XKS_PROXY_INVALID_RESPONSE",
    )
    #: What the proxy returned did not decrypt under KMS's own key material (double encryption)
    #: or failed its integrity value: a KMS-side finding, for the KMS daemon to raise.
    INVALID_PROXY_CIPHERTEXT = _Row(
        "Proxy returns an invalid ciphertext",
        _INVALID_RESPONSE,
        _STORE_STATE,
        "The ciphertext that the external key store proxy submitted for decryption, or the "
        "encryption context, is corrupted, missing, or otherwise invalid.",
        "XKS_PROXY_INVALID_RESPONSE",
    )
    #: The proxy answered InvalidKeyUsageException.
    INVALID_KEY_USAGE = _Row(
        "Proxy returns an InvalidKeyUsageException",
        _INVALID_RESPONSE,
        "XksKeyInvalidConfigurationException",
        "The external key associated with this KMS key in an external key store does not "
        "support the requested operation. Enable the operation on the key in your external key "
        "manager, and try the request again.",
        "XKS_PROXY_INVALID_CONFIGURATION",
    )
    #: The proxy answered AuthenticationFailedException.
    AUTHENTICATION_FAILED = _Row(
        "Proxy returns an AuthenticationFailedException",
        "XksProxyIncorrectAuthenticationCredentialException",
        _STORE_STATE,
        "The external key store proxy rejected the request because it could not authenticate "
        "AWS KMS. Verify the XKS proxy authentication credentials for your external key store "
        "and update if necessary.",
        "INVALID_CREDENTIALS",
    )
    #: The proxy answered AccessDeniedException. Management row absent from the table (the
    #: health check is exempt from authorization): the proxy broke the spec.
    ACCESS_DENIED = _Row(
        "Proxy returns an AccessDeniedException",
        _INVALID_RESPONSE,
        "KMSInvalidStateException",
        "The external key store proxy denied access to the operation. Verify that the user and "
        "the external key are both authorized for this operation, and try the request again.",
        "XKS_PROXY_ACCESS_DENIED",
    )
    #: The proxy answered KeyNotFoundException.
    KEY_NOT_FOUND = _Row(
        "Proxy returns a KeyNotFoundException",
        _INVALID_RESPONSE,
        "XksKeyNotFoundException",
        "The external key associated with this KMS key in an external key store was not found "
        "in its external key manager. If the external key ID associated with this KMS key is "
        "incorrect, create a new KMS key with the correct external key ID.",
        "XKS_PROXY_INVALID_RESPONSE",
    )
    #: The proxy answered InvalidUriPathException.
    INVALID_URI_PATH = _Row(
        "Proxy returns an InvalidUriPathException",
        "XksProxyInvalidConfigurationException",
        _STORE_STATE,
        "The external key store proxy rejected the request because of an invalid URI path. "
        "Verify the URI path for your external key store and update if necessary.",
        "XKS_PROXY_INVALID_CONFIGURATION",
    )
    #: The proxy answered UnsupportedOperationException.
    UNSUPPORTED_OPERATION = _Row(
        "Proxy returns an UnsupportedOperationException",
        _INVALID_RESPONSE,
        "XksKeyInvalidConfigurationException",
        "The external key store proxy rejected the request because it does not support the "
        "requested operation. If you see this error repeatedly, report it to your external key "
        "store proxy administrator.",
        "XKS_PROXY_INVALID_RESPONSE",
    )
    #: The proxy answered DependencyTimeoutException.
    DEPENDENCY_TIMEOUT = _Row(
        "Proxy returns a DependencyTimeoutException",
        _UNREACHABLE,
        _STORE_STATE,
        "The external key store proxy did not respond to the request in the time allotted. "
        "Retry the request. If you see this error repeatedly, report it to your external key "
        "store proxy administrator.",
        "XKS_PROXY_TIMED_OUT",
    )
    #: The proxy answered ThrottlingException.
    THROTTLING = _Row(
        "Proxy returns a ThrottlingException",
        _UNREACHABLE,
        _STORE_STATE,
        "The external key store proxy rejected the request due to a very high request rate. "
        "Reduce the frequency of your calls using KMS keys in this external key store.",
        "XKS_PROXY_TIMED_OUT",
    )
    #: The proxy answered InternalException.
    INTERNAL = _Row(
        "Proxy returns an InternalException",
        _INVALID_RESPONSE,
        _STORE_STATE,
        "The external key store proxy rejected the request because it cannot communicate with "
        "the external key manager. Verify that the external key store proxy configuration is "
        "correct and that the external key manager is available.",
        "XKS_PROXY_NOT_REACHABLE",
    )
    #: No TCP connection could be established (refused, no route, name not found).
    UNREACHABLE = _Row(
        "AWS KMS cannot establish a TCP connection",
        _UNREACHABLE,
        _STORE_STATE,
        "AWS KMS cannot communicate with the external key store proxy. This might be a "
        "transient network issue. If you see this error repeatedly, verify that your external "
        "key store proxy is active and is connected to the network, and that its endpoint URI "
        "is correct in your external keystore.",
        "XKS_PROXY_NOT_REACHABLE",
    )
    #: The TLS handshake failed (certificate, name, protocol).
    TLS_FAILED = _Row(
        "AWS KMS cannot establish a TLS connection",
        _UNREACHABLE,
        _STORE_STATE,
        "AWS KMS cannot establish a TLS connection to the external key store proxy. Verify the "
        "TLS configuration, including its certificate.",
        "XKS_PROXY_INVALID_TLS_CONFIGURATION",
    )
    #: The proxy did not answer within the call's time bound.
    TIMED_OUT = _Row(
        "AWS KMS encounters a socket timeout",
        _UNREACHABLE,
        _STORE_STATE,
        "AWS KMS rejected the request because the external key store proxy did not respond in "
        "time. Retry the request. If you see this error repeatedly, report it to your external "
        "key store proxy administrator.",
        "XKS_PROXY_TIMED_OUT",
    )
    #: The answer was not what the spec prescribes (not JSON, wrong fields, wrong sizes, an
    #: HTTP error without an errorName, a closed connection mid-answer).
    MALFORMED_RESPONSE = _Row(
        "Proxy returns a malformed response",
        _INVALID_RESPONSE,
        _STORE_STATE,
        _CANNOT_INTERPRET,
        "XKS_PROXY_INVALID_RESPONSE",
    )
    #: The health check answered that every external key manager is UNAVAILABLE (the model's
    #: XksProxyUriUnreachableException documentation names this case). Message: ours.
    ALL_KEY_MANAGERS_UNAVAILABLE = _Row(
        "Every external key manager is UNAVAILABLE",
        _UNREACHABLE,
        _STORE_STATE,
        "The external key store proxy reports that all of its external key managers are "
        "unavailable. Verify that your external key manager instances are operating properly.",
        "XKS_PROXY_NOT_REACHABLE",
    )
    #: The custom key store is not CONNECTED (a KMS-side state, for the KMS daemon to raise).
    NOT_CONNECTED = _Row(
        "Custom key store is not in CONNECTED state",
        _STORE_STATE,
        _STORE_STATE,
        "This KMS key is in a custom key store that is not connected to its external key store "
        "proxy. Connect the external key store and try the request again.",
        "XKS_PROXY_NOT_REACHABLE",
    )

    @property
    def message(self) -> str:
        """The KMS exception message (the same in every context)."""
        return self.value.message

    @property
    def connection_error_code(self) -> str:
        """The custom key store's ``ConnectionErrorCode`` after a failed connection attempt."""
        return self.value.connection_error_code

    def exception_name(self, context: XksCallContext) -> str:
        """The KMS exception (``__type``) for this failure during ``context``."""
        if context is XksCallContext.KEY_STORE_MANAGEMENT:
            return self.value.management
        if context is XksCallContext.CREATE_KEY:
            return self.value.create_key
        return "KMSInvalidStateException"

    def kms_error(self, context: XksCallContext) -> KmsApiError:
        """The :class:`~kms.errors.KmsApiError` AWS KMS answers with."""
        return KmsApiError(self.exception_name(context), self.message)

    @classmethod
    def for_error_name(cls, error_name: str) -> XksFailure:
        """The failure a proxy's ``errorName`` stands for (unknown names: malformed)."""
        return _BY_ERROR_NAME.get(error_name, cls.MALFORMED_RESPONSE)


_BY_ERROR_NAME = {
    "ValidationException": XksFailure.VALIDATION,
    "InvalidStateException": XksFailure.INVALID_STATE,
    "InvalidCiphertextException": XksFailure.INVALID_CIPHERTEXT,
    "InvalidKeyUsageException": XksFailure.INVALID_KEY_USAGE,
    "AuthenticationFailedException": XksFailure.AUTHENTICATION_FAILED,
    "AccessDeniedException": XksFailure.ACCESS_DENIED,
    "KeyNotFoundException": XksFailure.KEY_NOT_FOUND,
    "InvalidUriPathException": XksFailure.INVALID_URI_PATH,
    "UnsupportedOperationException": XksFailure.UNSUPPORTED_OPERATION,
    "DependencyTimeoutException": XksFailure.DEPENDENCY_TIMEOUT,
    "ThrottlingException": XksFailure.THROTTLING,
    "InternalException": XksFailure.INTERNAL,
}
