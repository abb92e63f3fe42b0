"""The XKS proxy's request handling, independent of sockets: one request in, one reply out.

Per request, in this order (each step's failure is the reply; see the spec's error table):

1. method: POST only; anything else on an API URI is 405, elsewhere InvalidUriPathException;
2. SigV4 (:func:`kms.sigv4.verify_request`, service ``kms-xks-proxy``, the configured region,
   the configured credentials, 5 minutes of clock skew): any failure is
   ``AuthenticationFailedException`` with no detail, the reason goes to our log;
3. a disconnected proxy (``disconnected = true``, or a reload that failed) answers every
   authenticated request ``InvalidStateException``;
4. routing under the configured URI path (``InvalidUriPathException``), then the JSON body and
   ``requestMetadata`` (``ValidationException``);
5. the operation: key lookup (``KeyNotFoundException``), parameters, then the key's state
   (``InvalidStateException`` when disabled) and allowed operations
   (``InvalidKeyUsageException``), then the key manager, bounded by ``dependency_timeout_s``
   (``DependencyTimeoutException``).

Every request ends in exactly one log line, ``xks_request``, with the operation, key id, the
request metadata KMS sent (``kmsRequestId`` correlates with CloudTrail), the outcome and the
duration; plaintext never appears in it.

Configuration changes (:meth:`XksProxyService.install`) swap the whole state at once: a request
sees either the old configuration or the new one, and every request that starts after the swap
sees the new one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import structlog
import trio

from ..sigv4 import SecretEntry, SigV4Failure, verify_request
from . import codec
from ._http import HttpReply, HttpRequest
from .codec import EncryptResult, HealthStatus, KeyMetadata, Operation, RequestMetadata
from .config import SIGV4_SERVICE, XksProxyConfig
from .errors import (
    AuthenticationFailedError,
    DependencyTimeoutError,
    InternalError,
    InvalidKeyUsageError,
    InvalidStateError,
    InvalidUriPathError,
    KeyNotFoundError,
    MethodNotAllowedError,
    UnsupportedOperationError,
    ValidationError,
    XksApiError,
)
from .keyring import Keyring, LoadedKey

__all__ = ["XksProxyService", "VENDOR", "MODEL"]

log = structlog.get_logger()
_T = TypeVar("_T")

CONTENT_TYPE = "application/json"
#: GetHealthStatus's xksProxyVendor / xksProxyModel.
VENDOR = "enclave-runtime"
MODEL = "enclave-runtime XKS proxy 1"


@dataclass(frozen=True, slots=True)
class _State:
    config: XksProxyConfig
    keyring: Keyring
    #: Why every request is refused (a failed reload), or None.
    refusing: str | None = None


class XksProxyService:
    """Answers XKS Proxy API requests for one configuration (swappable at run time).

    Args:
        config: the configuration.
        keyring: its keys, opened (:meth:`Keyring.load`).
        clock: wall clock for SigV4 freshness (tests pin it).
    """

    def __init__(
        self, config: XksProxyConfig, keyring: Keyring, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._state = _State(config, keyring)
        self._clock = clock
        self._health: tuple[float, HealthStatus] | None = None

    @property
    def config(self) -> XksProxyConfig:
        return self._state.config

    @property
    def keyring(self) -> Keyring:
        return self._state.keyring

    def install(self, config: XksProxyConfig, keyring: Keyring) -> Keyring:
        """Make ``config`` and ``keyring`` current for every request from now on; returns the
        keyring it replaced (the caller closes it once its requests have ended)."""
        old = self._state.keyring
        self._state = _State(config, keyring)
        self._health = None
        return old

    def refuse_all(self, reason: str) -> None:
        """Answer InvalidStateException to every request until the next :meth:`install`
        (a reload whose file could not be used: the owner asked for a change that cannot be
        known, and it may have been a revocation)."""
        self._state = _State(self._state.config, self._state.keyring, refusing=reason)
        self._health = None

    # -- the HTTP face -----------------------------------------------------------------------

    def protocol_error(self, status: int, reason: str) -> HttpReply:
        """Reply to a request that never became one (malformed, too large)."""
        error: XksApiError
        if status == 413:
            error = UnsupportedOperationError(
                f"The request body is larger than the {self.config.max_body_bytes} bytes this "
                "proxy accepts.",
                reason=reason,
            )
        else:
            error = ValidationError("Malformed HTTP request.", reason=reason)
        log.info("xks_request_refused", status=error.status, reason=reason)
        return _error_reply(error)

    async def handle(self, request: HttpRequest) -> HttpReply:
        """Answer one request (never raises for bad input)."""
        started = time.perf_counter()
        state = self._state  # one state for the whole request
        fields: dict[str, object] = {"source": request.source}
        authenticated = False
        try:
            authenticated = self._authenticate(state, request, fields)
            body = await self._dispatch(state, request, fields)
            reply = HttpReply(200, [("Content-Type", CONTENT_TYPE)], body, authenticated=True)
            fields["status"] = 200
        except XksApiError as exc:
            reply = _error_reply(exc, authenticated=authenticated)
            fields.update(status=exc.status, error=exc.error_name, reason=exc.reason)
        except Exception as exc:  # a bug: answer, log, keep serving
            log.exception("xks_request_failed", **fields)
            reply = _error_reply(InternalError(reason=repr(exc)), authenticated=authenticated)
            fields.update(status=500, error="InternalException")
        fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        log.info("xks_request", **{k: v for k, v in fields.items() if v is not None})
        return reply

    # -- steps -------------------------------------------------------------------------------

    def _authenticate(self, state: _State, request: HttpRequest, fields: dict[str, object]) -> bool:
        config = state.config
        path = request.target.partition("?")[0]
        if request.method != "POST":
            try:
                codec.route(path, config.uri_path)
            except InvalidUriPathError:
                raise InvalidUriPathError(reason=f"{request.method} {path[:200]}") from None
            raise MethodNotAllowedError(reason=f"{request.method} on an API URI")
        secrets = {c.access_key_id: c.secret_access_key for c in config.credentials}

        def lookup(access_key_id: str) -> SecretEntry | None:
            secret = secrets.get(access_key_id)
            return None if secret is None else SecretEntry(secret, f"xks:{access_key_id}")

        try:
            verified = verify_request(
                method=request.method,
                target=request.target,
                headers=request.headers,
                body=request.body,
                lookup=lookup,
                region=config.region,
                service=SIGV4_SERVICE,
                now=datetime.fromtimestamp(self._clock(), UTC),
                max_skew_s=config.clock_skew_s,
            )
        except SigV4Failure as exc:
            raise AuthenticationFailedError(reason=f"{exc.type_name}: {exc.reason}") from None
        fields["access_key_id"] = verified.access_key_id
        return True

    async def _dispatch(
        self, state: _State, request: HttpRequest, fields: dict[str, object]
    ) -> bytes:
        config = state.config
        if config.disconnected or state.refusing is not None:
            raise InvalidStateError(
                "The key store is disconnected by its owner.",
                reason=state.refusing or "disconnected = true",
            )
        target = codec.route(request.target, config.uri_path)
        fields["operation"] = target.operation.name
        if target.key_id is not None:
            fields["key_id"] = target.key_id
        try:
            body = codec.parse_json(request.body)
        except ValueError as exc:
            raise ValidationError(
                "The request body is not a valid JSON object.", reason=str(exc)
            ) from None
        metadata = codec.parse_request_metadata(body, target.operation)
        fields.update(
            kms_request_id=metadata.kms_request_id,
            kms_operation=metadata.kms_operation,
            aws_principal_arn=metadata.aws_principal_arn,
            kms_key_arn=metadata.kms_key_arn,
            kms_via_service=metadata.kms_via_service,
        )
        if target.operation is Operation.GET_HEALTH_STATUS:
            return _json((await self._health_status(state)).to_json())
        assert target.key_id is not None
        key = state.keyring.get(target.key_id)
        if key is None:
            raise KeyNotFoundError(reason=f"no key {target.key_id!r}")
        if target.operation is Operation.GET_KEY_METADATA:
            return _json(_key_metadata(key).to_json())
        if target.operation is Operation.ENCRYPT:
            enc = codec.parse_encrypt_request(body)
            _check_usable(key, encrypt=True)
            result = await self._encrypt(state, key, enc, metadata)
            return _json(result.to_json())
        dec = codec.parse_decrypt_request(body)
        _check_usable(key, encrypt=False)
        aad = codec.gcm_aad(dec.aad, dec.ciphertext_metadata)
        plaintext = await self._bounded(
            state, key.backing.decrypt(dec.iv, dec.ciphertext, dec.tag, aad)
        )
        return _json({"plaintext": codec.b64(plaintext)})

    async def _encrypt(
        self, state: _State, key: LoadedKey, req: codec.EncryptRequest, _: RequestMetadata
    ) -> EncryptResult:
        # This proxy adds no ciphertextMetadata: the AAD still carries its (zero) length.
        aad = codec.gcm_aad(req.aad)
        iv, ciphertext, tag = await self._bounded(state, key.backing.encrypt(req.plaintext, aad))
        result = EncryptResult(ciphertext, iv, tag)
        if not req.want_cdiv:
            return result
        # Appendix C's order: the integrity value first, then a decrypt of what will be
        # returned, so a corruption after encryption cannot go unnoticed.
        value = codec.cdiv(req.aad, result)
        check = await self._bounded(state, key.backing.decrypt(iv, ciphertext, tag, aad))
        if check != req.plaintext:
            raise InternalError(reason="the encrypt output did not decrypt back (CDIV check)")
        return EncryptResult(ciphertext, iv, tag, cdiv=value)

    async def _bounded(self, state: _State, call: Awaitable[_T]) -> _T:
        """Await a key manager call within ``dependency_timeout_s``."""
        with trio.move_on_after(state.config.dependency_timeout_s):
            return await call
        raise DependencyTimeoutError(reason="key manager did not answer in time")

    async def _health_status(self, state: _State) -> HealthStatus:
        now = trio.current_time()
        cached = self._health
        if cached is not None and now - cached[0] < state.config.health_cache_s:
            return cached[1]
        details = []
        for manager in state.keyring.managers[:10]:  # spec: at most ten entries
            status = "UNAVAILABLE"
            with trio.move_on_after(state.config.dependency_timeout_s):
                status = await manager.check_health()
            details.append(codec.EkmDetails(manager.id, manager.model, status))
        health = HealthStatus(1, VENDOR, MODEL, VENDOR, tuple(details))
        if self._state is state:  # not replaced meanwhile
            self._health = (now, health)
        return health


def _check_usable(key: LoadedKey, *, encrypt: bool) -> None:
    if not key.config.enabled:
        raise InvalidStateError(
            "The external key is disabled in the external key manager.",
            reason=f"key {key.config.key_id!r} disabled",
        )
    ops = key.config.operations
    if not (ops.can_encrypt if encrypt else ops.can_decrypt):
        raise InvalidKeyUsageError(
            reason=f"key {key.config.key_id!r} allows {ops.value}, asked to "
            f"{'encrypt' if encrypt else 'decrypt'}"
        )


def _key_metadata(key: LoadedKey) -> KeyMetadata:
    ops = key.config.operations
    allowed = (ops.can_encrypt, ops.can_decrypt)
    usage = tuple(u for u, ok in zip(codec.KEY_USAGES, allowed, strict=True) if ok)
    return KeyMetadata("AES_256", usage, "ENABLED" if key.config.enabled else "DISABLED")


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error_reply(error: XksApiError, *, authenticated: bool = False) -> HttpReply:
    body = _json({"errorName": error.error_name, "errorMessage": error.message})
    return HttpReply(
        error.status, [("Content-Type", CONTENT_TYPE)], body, authenticated=authenticated
    )
