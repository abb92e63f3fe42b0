"""KMS keys in an external key store (Origin ``EXTERNAL_KEY_STORE``): their creation through the
proxy's GetKeyMetadata and their cryptography, double encryption through the proxy.

Every Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext) and every Recipient
release on such a key calls the store's XKS proxy; nothing about the external key is cached.
So what the owner does in its proxy (disable the key, disconnect the store, stop the proxy)
and what a KMS administrator does here (DisconnectCustomKeyStore) refuses the very next call:
the documented bound on anything outliving a revocation is zero. The blob format and the
layering are :mod:`kms.keystores.blob`'s.

Each call sends the proxy the request metadata AWS sends (spec, "API operations"):
``awsPrincipalArn`` (the caller), ``kmsKeyArn``, ``kmsOperation`` (the KMS operation that led to
the call), ``kmsRequestId`` (this request's id, as in our audit log). ``kmsViaService`` is
present only when an AWS service calls KMS on a caller's behalf, which never happens here, and
``awsSourceVpc(e)`` only for VPC endpoints, which do not exist here.

Failures answer as AWS KMS does (:mod:`kms.xks.failures`): ``KMSInvalidStateException`` with
the spec's message for every proxy failure of a cryptographic operation, the ``Xks*``
exceptions for CreateKey; the detail (which failure, the proxy's own errorMessage) goes to our
log and the audit line's reason, never to the caller.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog

from ..errors import CiphertextFormatError, KmsApiError
from ..keystores import blob
from ..keystores.record import CONNECTED, EXTERNAL_KEY_STORE_ORIGIN, KeyStore
from ..xks.codec import RequestMetadata
from ..xks.errors import XksProxyError
from ..xks.failures import XksCallContext, XksFailure
from ._model import Key, Outcome

if TYPE_CHECKING:
    from ._core import KmsService
    from ._scaffold import Request

__all__ = [
    "is_external",
    "require_connected",
    "seal",
    "open_blob",
    "check_external_key",
    "request_metadata",
    "XKS_KEY_SPEC",
]

log = structlog.get_logger()

#: The only external key the XKS Proxy API v1 supports (GetKeyMetadata's ``keySpec``).
XKS_KEY_SPEC = "AES_256"
_REQUIRED_USAGES = frozenset({"ENCRYPT", "DECRYPT"})


def is_external(key: Key) -> bool:
    """Whether ``key`` is in an external key store."""
    return bool(key.meta["Origin"] == EXTERNAL_KEY_STORE_ORIGIN)


def _not_connected(key: Key, outcome: Outcome, why: str) -> KmsApiError:
    outcome.reason = why
    failure = XksFailure.NOT_CONNECTED
    return KmsApiError("KMSInvalidStateException", f"{key.arn} is unavailable. {failure.message}")


def require_connected(svc: KmsService, key: Key, outcome: Outcome) -> KeyStore:
    """The key's store, which must be CONNECTED (KMSInvalidStateException otherwise: AWS's
    key state ``Unavailable``)."""
    store_id = str(key.meta.get("CustomKeyStoreId"))
    store = svc.key_stores.get(store_id)
    if store is None:
        raise _not_connected(key, outcome, f"custom key store {store_id} is missing or refused")
    if store.state != CONNECTED:
        raise _not_connected(key, outcome, f"custom key store {store_id} is {store.state}")
    return store


def request_metadata(svc: KmsService, request: Request, key_arn: str | None) -> RequestMetadata:
    """The ``requestMetadata`` of a proxy call made for ``request``."""
    outcome = request.outcome
    if outcome.request_id is None:  # an embedding caller gave none: one for both calls
        outcome.request_id = str(uuid.uuid4())
    return RequestMetadata(
        kms_request_id=outcome.request_id,
        kms_operation=request.operation,
        aws_principal_arn=request.caller.principal_arn,
        kms_key_arn=key_arn,
    )


def _failed(
    exc: XksProxyError,
    store: KeyStore,
    request: Request,
    context: XksCallContext,
    call: str,
) -> KmsApiError:
    """Log a failed proxy call (the detail is ours) and return the error AWS answers."""
    out = request.outcome
    out.reason = f"external key store proxy {call}: {exc.failure.name}"
    log.warning(
        "xks_proxy_call_failed",
        custom_key_store_id=store.store_id,
        proxy=store.host,
        call=call,
        operation=request.operation,
        kms_request_id=out.request_id,
        failure=exc.failure.name,
        detail=exc.detail,
        proxy_message=exc.error_message,
    )
    return exc.kms_error(context)


async def seal(
    svc: KmsService,
    key: Key,
    plaintext: bytes,
    context: Mapping[str, str] | None,
    request: Request,
) -> bytes:
    """Double-encrypt ``plaintext`` under an external key store's key: the KMS key material,
    then the external key (through the proxy). Returns the CiphertextBlob.

    Raises:
        KmsApiError: KMSInvalidStateException (store not connected, any proxy failure).
    """
    store = require_connected(svc, key, request.outcome)
    version = key.current_version
    head = blob.header(key.key_id, version)
    inner = key.versions[version].seal(plaintext, blob.inner_aad(head, context))
    client = await svc.proxies.client(store, svc.store_secret(store.store_id))
    try:
        result = await client.encrypt(
            str(key.meta["XksKeyId"]),
            inner,
            metadata=request_metadata(svc, request, key.arn),
            aad=blob.outer_aad(head, context),
        )
    except XksProxyError as exc:
        raise _failed(exc, store, request, XksCallContext.CRYPTO, "Encrypt") from None
    return blob.assemble(head, result)


async def open_blob(
    svc: KmsService,
    key: Key,
    parsed: blob.XksBlob,
    context: Mapping[str, str] | None,
    request: Request,
) -> bytes:
    """Open a blob of an external key store's key: the proxy removes the outer layer, then
    the KMS key material the inner one.

    Raises:
        KmsApiError: KMSInvalidStateException (store not connected, any proxy failure, the
            proxy's answer not opening under KMS's material), InvalidCiphertextException (no
            such material version).
    """
    store = require_connected(svc, key, request.outcome)
    aead = key.versions.get(parsed.key_version)
    if aead is None:
        raise KmsApiError("InvalidCiphertextException", "")
    client = await svc.proxies.client(store, svc.store_secret(store.store_id))
    try:
        inner = await client.decrypt(
            str(key.meta["XksKeyId"]),
            parsed.ciphertext,
            iv=parsed.iv,
            tag=parsed.tag,
            metadata=request_metadata(svc, request, key.arn),
            aad=blob.outer_aad(parsed.header, context),
            ciphertext_metadata=parsed.ciphertext_metadata,
        )
    except XksProxyError as exc:
        raise _failed(exc, store, request, XksCallContext.CRYPTO, "Decrypt") from None
    try:
        return aead.open(inner, blob.inner_aad(parsed.header, context))
    except CiphertextFormatError:
        # The proxy's AES-GCM accepted the ciphertext and AAD, yet what it returned is not
        # what KMS encrypted: the proxy (or its key manager) is broken or lying.
        broken = XksProxyError(
            XksFailure.INVALID_PROXY_CIPHERTEXT, "decrypted layer fails KMS's own key material"
        )
        raise _failed(broken, store, request, XksCallContext.CRYPTO, "Decrypt") from None


async def check_external_key(
    svc: KmsService, store: KeyStore, xks_key_id: str, request: Request
) -> None:
    """CreateKey's check of the external key (GetKeyMetadata): an AES_256 key, enabled, that
    encrypts and decrypts.

    Raises:
        KmsApiError: the proxy failed (AWS's CreateKey mapping: XksKeyNotFoundException,
            CustomKeyStoreInvalidStateException...), or XksKeyInvalidConfigurationException.
    """
    client = await svc.proxies.client(store, svc.store_secret(store.store_id))
    try:
        meta = await client.get_key_metadata(xks_key_id, request_metadata(svc, request, None))
    except XksProxyError as exc:
        raise _failed(exc, store, request, XksCallContext.CREATE_KEY, "GetKeyMetadata") from None
    problems = []
    if meta.key_spec != XKS_KEY_SPEC:
        problems.append(f"its key spec is {meta.key_spec[:32]}, not {XKS_KEY_SPEC}")
    missing = _REQUIRED_USAGES - set(meta.key_usage)
    if missing:
        problems.append(f"it is not allowed to {' and '.join(sorted(missing))}")
    if meta.key_status != "ENABLED":
        problems.append(f"its status is {meta.key_status[:32]}")
    if problems:
        request.outcome.reason = f"external key {xks_key_id}: " + "; ".join(problems)
        raise KmsApiError(
            "XksKeyInvalidConfigurationException",
            f"The external key {xks_key_id} does not meet the requirements for a KMS key in an "
            "external key store: it must be an enabled AES_256 key that can encrypt and "
            f"decrypt ({'; '.join(problems)}).",
        )
