"""Custom key store operations for external key stores: CreateCustomKeyStore,
ConnectCustomKeyStore, DisconnectCustomKeyStore, UpdateCustomKeyStore, DeleteCustomKeyStore,
DescribeCustomKeyStores.

These operations are authorized by IAM in AWS, not by a key policy; no IAM is emulated here, so
they are recorded as allowed "not key-scoped", like CreateKey. The state rules are
:mod:`kms.keystores.record`'s table.

Calls to the proxy (GetHealthStatus, kmsOperation = the KMS operation) happen when a store is
created, connected, or updated while CONNECTED with a new URI path or credential, as AWS's
do; they run without the write lock (a proxy may take the whole call timeout) and what they
relied on is checked again under it before anything is written:

* **Create**: the proxy must answer a health check with the new settings (the failure's
  ``Xks*`` exception otherwise, as for AWS); the store starts DISCONNECTED.
* **Connect**: CONNECTING with a fresh attempt id is written, the proxy is asked, then
  CONNECTED or FAILED (with the failure's ``ConnectionErrorCode``) is written if that attempt
  is still the store's. The answer comes once the attempt has finished (at most the proxy
  timeout); AWS answers at once and callers poll DescribeCustomKeyStores, which shows the same
  states here.
* **Disconnect**: one write, DISCONNECTED; this process's connections to the proxy close, other
  worker processes drop theirs at their next request. The key store's keys are refused from
  the next request on. The transient DISCONNECTING of AWS (whose disconnection takes time) is
  therefore never stored.

The proxy credential's secret is written wrapped (:mod:`kms.integrity`), never logged, never
answered (DescribeCustomKeyStores shows its access key id only, as AWS does).
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from ..errors import KmsApiError
from ..keystores.record import (
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    DISCONNECTING,
    EXTERNAL_KEY_STORE,
    FAILED,
    MAX_KEY_STORES,
    PUBLIC_ENDPOINT,
    CustomKeyStoresListEntry,
    EndpointError,
    KeyStore,
    new_store_id,
    validate_endpoint,
)
from ..xks.codec import RequestMetadata, validate_uri_path
from ..xks.errors import XksProxyError
from ..xks.failures import XksCallContext
from ._model import Answer, Params
from ._scaffold import Operation, Request
from .external import request_metadata

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = ["OPERATIONS"]

log = structlog.get_logger()

_CLOUDHSM_MEMBERS = ("CloudHsmClusterId", "TrustAnchorCertificate", "KeyStorePassword")
_VPC_MEMBERS = ("XksProxyVpcEndpointServiceName", "XksProxyVpcEndpointServiceOwner")
#: Connection states in which DescribeCustomKeyStores-visible properties may be updated, and
#: those of them that allow only the name, credential and URI path (AWS).
_UPDATABLE = frozenset({CONNECTED, DISCONNECTED})


def _invalid_state(store: KeyStore, operation: str, why: str) -> KmsApiError:
    return KmsApiError(
        "CustomKeyStoreInvalidStateException",
        f"{operation} is not valid for custom key store {store.store_id} in connection state "
        f"{store.state}: {why}",
    )


def _not_found(what: str) -> KmsApiError:
    return KmsApiError(
        "CustomKeyStoreNotFoundException", f"Custom key store {what[:256]} does not exist."
    )


def _store(svc: KmsService, store_id: str) -> KeyStore:
    store = svc.key_stores.get(store_id)
    if store is None:
        raise _not_found(store_id)
    return store


def _check_common(p: Params, *, create: bool) -> None:
    """Members of CloudHSM key stores and VPC endpoint services: not here."""
    for member in _CLOUDHSM_MEMBERS:
        if member in p:
            raise KmsApiError(
                "ValidationException",
                f"{member} is valid only for an AWS CloudHSM key store; this KMS has external "
                "key stores only.",
            )
    connectivity = p.opt_text("XksProxyConnectivity")
    if connectivity == "VPC_ENDPOINT_SERVICE":
        raise KmsApiError(
            "UnsupportedOperationException",
            "XksProxyConnectivity VPC_ENDPOINT_SERVICE needs an Amazon VPC endpoint service; "
            "this KMS reaches external key store proxies through public endpoints only.",
        )
    if create and connectivity is None:
        raise KmsApiError(
            "ValidationException",
            "XksProxyConnectivity is required for an external key store (PUBLIC_ENDPOINT).",
        )
    for member in _VPC_MEMBERS:
        if member in p:
            raise KmsApiError(
                "ValidationException",
                f"{member} is valid only with XksProxyConnectivity VPC_ENDPOINT_SERVICE.",
            )
    if "XksProxyUriEndpoint" in p:
        try:
            validate_endpoint(p.text("XksProxyUriEndpoint"))
        except EndpointError as exc:
            raise KmsApiError("ValidationException", str(exc)) from None
    if "XksProxyUriPath" in p:
        try:
            validate_uri_path(p.text("XksProxyUriPath"))
        except ValueError:
            raise KmsApiError(
                "ValidationException",
                "XksProxyUriPath must be [/<prefix>]/kms/xks/v1 (this KMS speaks version 1 of "
                "the XKS Proxy API).",
            ) from None


def _check_create(p: Params) -> None:
    kind = p.opt_text("CustomKeyStoreType", "AWS_CLOUDHSM")
    if kind != EXTERNAL_KEY_STORE:
        raise KmsApiError(
            "UnsupportedOperationException",
            "CreateCustomKeyStore: AWS CloudHSM key stores are not supported by this KMS; "
            "create an external key store (CustomKeyStoreType EXTERNAL_KEY_STORE).",
        )
    _check_common(p, create=True)
    for member in ("XksProxyUriEndpoint", "XksProxyUriPath", "XksProxyAuthenticationCredential"):
        if member not in p:
            raise KmsApiError(
                "ValidationException", f"{member} is required for an external key store."
            )


def _check_update(p: Params) -> None:
    _check_common(p, create=False)


def _check_unique(svc: KmsService, candidate: KeyStore) -> None:
    """The name is unique in the account and Region; so is the proxy's endpoint and path."""
    for other in svc.key_stores.values():
        if other.store_id == candidate.store_id:
            continue
        if other.name == candidate.name:
            raise KmsApiError(
                "CustomKeyStoreNameInUseException",
                f"The custom key store name {candidate.name} is already in use by "
                f"{other.store_id}.",
            )
        if other.endpoint_and_path == candidate.endpoint_and_path:
            raise KmsApiError(
                "XksProxyUriInUseException",
                f"{candidate.endpoint_and_path} is already the proxy of {other.store_id}.",
            )


async def _health_check(
    svc: KmsService, store: KeyStore, secret: str, request: Request
) -> XksProxyError | None:
    """Ask the proxy (with ``store``'s settings) for its health; the failure, if any."""
    client = svc.proxies.make(store, secret)
    metadata: RequestMetadata = request_metadata(svc, request, None)
    try:
        await client.test_connection(metadata)
    except XksProxyError as exc:
        request.outcome.reason = f"external key store proxy GetHealthStatus: {exc.failure.name}"
        log.warning(
            "xks_proxy_health_check_failed",
            custom_key_store_id=store.store_id,
            proxy=store.host,
            operation=request.operation,
            kms_request_id=request.outcome.request_id,
            failure=exc.failure.name,
            detail=exc.detail,
            proxy_message=exc.error_message,
        )
        return exc
    finally:
        await client.aclose()
    return None


async def _create(svc: KmsService, r: Request) -> Answer:
    p = r.params
    credential = p.mapping("XksProxyAuthenticationCredential")
    store = KeyStore(
        store_id=new_store_id(),
        name=p.text("CustomKeyStoreName"),
        created=svc.clock(),
        endpoint=p.text("XksProxyUriEndpoint"),
        uri_path=p.text("XksProxyUriPath"),
        access_key_id=credential["AccessKeyId"],
        connectivity=PUBLIC_ENDPOINT,
    )
    secret = str(credential["RawSecretAccessKey"])

    def admissible() -> None:
        if len(svc.key_stores) >= MAX_KEY_STORES:
            raise KmsApiError(
                "LimitExceededException",
                f"An account may have at most {MAX_KEY_STORES} custom key stores per Region.",
            )
        _check_unique(svc, store)

    admissible()
    failure = await _health_check(svc, store, secret, r)
    if failure is not None:
        raise failure.kms_error(XksCallContext.KEY_STORE_MANAGEMENT)
    async with svc.write_lock:
        admissible()
        await svc.put_store(store, secret)
    log.info(
        "kms_custom_key_store_created",
        custom_key_store_id=store.store_id,
        proxy=store.endpoint_and_path,
        access_key_id=store.access_key_id,
    )
    return {"CustomKeyStoreId": store.store_id}


async def _connect(svc: KmsService, r: Request) -> Answer:
    store = _store(svc, r.params.text("CustomKeyStoreId"))
    if store.state in (DISCONNECTING, FAILED):
        raise _invalid_state(
            store,
            "ConnectCustomKeyStore",
            "disconnect it (DisconnectCustomKeyStore) first"
            if store.state == FAILED
            else "wait for the disconnection to end",
        )
    if store.state == CONNECTED:
        return {}
    attempt = str(uuid.uuid4())
    async with svc.write_lock:
        current = _store(svc, store.store_id)
        if current.state in (DISCONNECTING, FAILED, CONNECTED):
            if current.state == CONNECTED:
                return {}
            raise _invalid_state(current, "ConnectCustomKeyStore", "its state changed meanwhile")
        connecting = replace(current, attempt=attempt).with_state(CONNECTING)
        await svc.put_store(connecting)
    failure = await _health_check(svc, connecting, svc.store_secret(store.store_id), r)
    async with svc.write_lock:
        latest = svc.key_stores.get(store.store_id)
        if latest is None or latest.state != CONNECTING or latest.attempt != attempt:
            return {}  # disconnected, deleted or re-attempted meanwhile: that one wins
        if failure is None:
            await svc.put_store(latest.with_state(CONNECTED))
        else:
            await svc.put_store(latest.with_state(FAILED, error_code=failure.connection_error_code))
    log.info(
        "kms_custom_key_store_connection",
        custom_key_store_id=store.store_id,
        state=CONNECTED if failure is None else FAILED,
        connection_error_code=None if failure is None else failure.connection_error_code,
    )
    return {}


async def _disconnect(svc: KmsService, r: Request) -> Answer:
    store_id = r.params.text("CustomKeyStoreId")
    async with svc.write_lock:
        store = _store(svc, store_id)
        if store.state in (DISCONNECTING, DISCONNECTED):
            raise _invalid_state(store, "DisconnectCustomKeyStore", "it is not connected")
        await svc.put_store(store.with_state(DISCONNECTED))
    await svc.proxies.discard(store_id)
    log.info("kms_custom_key_store_disconnected", custom_key_store_id=store_id)
    return {}


def _updated(store: KeyStore, p: Params) -> tuple[KeyStore, str | None]:
    """``store`` with the request's new properties, and the new secret if one was given."""
    new = store
    secret: str | None = None
    if "NewCustomKeyStoreName" in p:
        new = replace(new, name=p.text("NewCustomKeyStoreName"))
    moved = False
    endpoint, uri_path = p.opt_text("XksProxyUriEndpoint"), p.opt_text("XksProxyUriPath")
    if endpoint is not None and endpoint != store.endpoint:
        new, moved = replace(new, endpoint=endpoint), True
    if uri_path is not None and uri_path != store.uri_path:
        new, moved = replace(new, uri_path=uri_path), True
    credential = p.opt_mapping("XksProxyAuthenticationCredential")
    if credential is not None:
        new = replace(new, access_key_id=credential["AccessKeyId"])
        secret = str(credential["RawSecretAccessKey"])
        moved = True
    if moved:
        new = replace(new, revision=store.revision + 1)
    return new, secret


async def _update(svc: KmsService, r: Request) -> Answer:
    p = r.params
    store = _store(svc, p.text("CustomKeyStoreId"))
    new, secret = _updated(store, p)
    if new == store and secret is None:
        return {}
    if store.state not in _UPDATABLE:
        raise _invalid_state(store, "UpdateCustomKeyStore", "it must be CONNECTED or DISCONNECTED")
    if store.state == CONNECTED and new.endpoint != store.endpoint:
        raise _invalid_state(
            store,
            "UpdateCustomKeyStore",
            "XksProxyUriEndpoint changes only while DISCONNECTED (the name, credential and "
            "URI path may change while CONNECTED)",
        )
    _check_unique(svc, new)
    if store.state == CONNECTED and new.revision != store.revision:
        # The store keeps serving under the new settings: they must work now.
        failure = await _health_check(
            svc, new, secret if secret is not None else svc.store_secret(store.store_id), r
        )
        if failure is not None:
            raise failure.kms_error(XksCallContext.KEY_STORE_MANAGEMENT)
    async with svc.write_lock:
        current = _store(svc, store.store_id)
        if (current.state, current.revision, current.name) != (
            store.state,
            store.revision,
            store.name,
        ):
            raise _invalid_state(
                current, "UpdateCustomKeyStore", "it changed while being updated; retry"
            )
        _check_unique(svc, new)
        await svc.put_store(new, secret)
    if new.revision != store.revision:
        await svc.proxies.discard(store.store_id)
    return {}


async def _delete(svc: KmsService, r: Request) -> Answer:
    store_id = r.params.text("CustomKeyStoreId")
    async with svc.write_lock:
        store = _store(svc, store_id)
        if store.state != DISCONNECTED:
            raise _invalid_state(store, "DeleteCustomKeyStore", "disconnect it first")
        keys = svc.keys_in_store(store_id)
        if keys:
            raise KmsApiError(
                "CustomKeyStoreHasCMKsException",
                f"Custom key store {store_id} contains {len(keys)} KMS key(s); schedule their "
                "deletion and delete the store once they are gone.",
            )
        await svc.delete_store(store_id)
    log.info("kms_custom_key_store_deleted", custom_key_store_id=store_id)
    return {}


async def _describe(svc: KmsService, r: Request) -> Answer:
    from .management import page

    p = r.params
    if "CustomKeyStoreId" in p and "CustomKeyStoreName" in p:
        raise KmsApiError(
            "ValidationException", "Specify CustomKeyStoreId or CustomKeyStoreName, not both."
        )
    stores = sorted(svc.key_stores.values(), key=lambda s: (s.created, s.store_id))
    if "CustomKeyStoreId" in p:
        stores = [s for s in stores if s.store_id == p.text("CustomKeyStoreId")]
        if not stores:
            raise _not_found(p.text("CustomKeyStoreId"))
    elif "CustomKeyStoreName" in p:
        stores = [s for s in stores if s.name == p.text("CustomKeyStoreName")]
        if not stores:
            raise _not_found(p.text("CustomKeyStoreName"))
    chunk, more = page(stores, p, 1000)
    entries: list[CustomKeyStoresListEntry] = [s.describe() for s in chunk]
    return {"CustomKeyStores": entries, **more}


OPERATIONS = (
    Operation("CreateCustomKeyStore", _create, check=_check_create),
    Operation("ConnectCustomKeyStore", _connect),
    Operation("DisconnectCustomKeyStore", _disconnect),
    Operation("UpdateCustomKeyStore", _update, check=_check_update),
    Operation("DeleteCustomKeyStore", _delete),
    Operation("DescribeCustomKeyStores", _describe),
)
