"""An async client of the XKS Proxy API, for the KMS daemon: SigV4-signed requests over HTTP/1.1
keep-alive (h11 on trio, TLS when the endpoint is ``https``), every call bounded in time, every
failure a typed :class:`~kms.xks.errors.XksProxyError` that knows the AWS KMS error it becomes.

How failures are classified (:class:`~kms.xks.failures.XksFailure`, the rows of the spec's
"KMS Considerations" table):

* no TCP connection (refused, unreachable, name unknown, or the connect phase ran out of time):
  ``UNREACHABLE``; a fresh connection closed before the first byte of an answer: the same;
* the TLS handshake failed: ``TLS_FAILED``;
* no complete answer within ``timeout_s`` of the call's start: ``TIMED_OUT``;
* an HTTP error with a JSON ``errorName``: that error's row (unknown names: malformed);
* anything else (not JSON, missing or ill-sized fields, a CDIV that does not match, an error
  status without ``errorName``, an answer cut short, over :data:`MAX_RESPONSE_BYTES`):
  ``MALFORMED_RESPONSE``.

Then ``XksProxyError.kms_error(context)`` gives the KMS exception for the kind of KMS operation
(management, CreateKey, cryptographic) and ``connection_error_code`` the custom key store's
``ConnectionErrorCode``.

Connections: up to ``max_idle_connections`` kept open between calls (AWS KMS allows the proxy
250 ms per call, which leaves no room for a TCP and TLS handshake each time). A call on a kept
connection that the proxy has meanwhile closed is retried once on a new connection (nothing was
processed: no answer byte had arrived). Calls run concurrently, each on its own connection.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import urlsplit

import h11
import trio

from ..sigv4 import sign_headers
from . import codec
from .codec import (
    EncryptResult,
    HealthStatus,
    KeyMetadata,
    Operation,
    RequestMetadata,
    ResponseFormatError,
)
from .config import SIGV4_SERVICE, XksCredential
from .errors import XksProxyError
from .failures import XksFailure

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_RESPONSE_BYTES",
    "XksProxyClient",
]

#: Per-call bound. AWS KMS allows 250 ms; a local stack on a loaded 2-core machine needs more
#: headroom, and the KMS daemon passes its own.
DEFAULT_TIMEOUT_S = 2.0
#: Largest answer read: an Encrypt answer with 8600 bytes of ciphertext is ~12 KiB of JSON.
MAX_RESPONSE_BYTES = 64 * 1024
#: Kept connections idle longer than this are not reused (proxies close idle ones after ~60 s).
_IDLE_REUSE_S = 30.0
_RECEIVE_SIZE = 65536
_T = TypeVar("_T")


class _Broken(Exception):
    """A kept connection turned out closed before any answer byte (private: retry)."""


@dataclass
class _Conn:
    stream: trio.abc.Stream
    http: h11.Connection
    idle_since: float


class XksProxyClient:
    """A client of one XKS proxy (one external key store).

    Args:
        endpoint: the XksProxyUriEndpoint, ``https://host[:port]`` (``http://`` for loopback
            proxies and tests).
        uri_path: the XksProxyUriPath, ``[/<prefix>]/kms/xks/v1``.
        credential: the XksProxyAuthenticationCredential (SigV4 access key id and secret).
        region: the SigV4 region (the region of the calling KMS).
        ssl_context: trust (and client certificate, for mutual TLS) for ``https``; default: the
            system's trust store.
        timeout_s: bound on each call, connection set-up included.
        max_idle_connections: connections kept open between calls.
        connect: replaces the TCP (and TLS) connection with any stream (tests).
        clock: wall clock for ``X-Amz-Date`` (tests).

    Raises:
        ValueError: a malformed endpoint or URI path.
    """

    def __init__(
        self,
        endpoint: str,
        uri_path: str,
        credential: XksCredential,
        *,
        region: str = "us-east-1",
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_idle_connections: int = 8,
        connect: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint {endpoint!r} must be http(s)://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"endpoint {endpoint!r} must not have a path (give uri_path)")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._authority = parts.netloc
        self._uri_path = codec.validate_uri_path(uri_path)
        self._credential = credential
        self._region = region
        # Built once: the default context loads the system's trust store (milliseconds).
        self._ssl_context = ssl_context
        if self._ssl_context is None and parts.scheme == "https":
            self._ssl_context = ssl.create_default_context()
        self._timeout_s = timeout_s
        self._max_idle = max_idle_connections
        self._connect = connect
        self._clock = clock
        self._idle: list[_Conn] = []

    # -- the API -----------------------------------------------------------------------------

    async def get_key_metadata(self, key_id: str, metadata: RequestMetadata) -> KeyMetadata:
        """GetKeyMetadata. Raises :class:`XksProxyError`."""
        body = codec.encode_request(metadata)
        return await self._call(Operation.GET_KEY_METADATA, key_id, body, codec.parse_key_metadata)

    async def encrypt(
        self, key_id: str, plaintext: bytes, *, metadata: RequestMetadata, aad: bytes = b""
    ) -> EncryptResult:
        """Encrypt, always asking for the CDIV and checking it (spec, Appendix C).

        Raises:
            XksProxyError: the call failed (a wrong CDIV is a malformed response).
            ValueError: ``plaintext`` or ``aad`` beyond the API's sizes.
        """
        if len(plaintext) > codec.MAX_DATA_BYTES or len(aad) > codec.MAX_AAD_BYTES:
            raise ValueError("plaintext or aad larger than the XKS API carries")
        body = codec.encode_request(
            metadata,
            plaintext=plaintext,
            encryptionAlgorithm=codec.ENCRYPTION_ALGORITHM,
            additionalAuthenticatedData=aad or None,
            ciphertextDataIntegrityValueAlgorithm=codec.CDIV_ALGORITHM,
        )

        def parse(raw: bytes) -> EncryptResult:
            return codec.parse_encrypt_result(
                raw, plaintext_len=len(plaintext), aad=aad, want_cdiv=True
            )

        return await self._call(Operation.ENCRYPT, key_id, body, parse)

    async def decrypt(
        self,
        key_id: str,
        ciphertext: bytes,
        *,
        iv: bytes,
        tag: bytes,
        metadata: RequestMetadata,
        aad: bytes = b"",
        ciphertext_metadata: bytes = b"",
    ) -> bytes:
        """Decrypt; returns the plaintext.

        Raises:
            XksProxyError: the call failed (``INVALID_CIPHERTEXT`` when the proxy says so).
            ValueError: fields beyond the API's sizes.
        """
        if (
            len(ciphertext) > codec.MAX_DATA_BYTES
            or len(aad) > codec.MAX_AAD_BYTES
            or len(ciphertext_metadata) > codec.MAX_CIPHERTEXT_METADATA_BYTES
            or len(iv) not in codec.IV_SIZES
            or len(tag) != codec.TAG_SIZE
        ):
            raise ValueError("decrypt parameters outside the XKS API's sizes")
        body = codec.encode_request(
            metadata,
            ciphertext=ciphertext,
            ciphertextMetadata=ciphertext_metadata or None,
            encryptionAlgorithm=codec.ENCRYPTION_ALGORITHM,
            additionalAuthenticatedData=aad or None,
            initializationVector=iv,
            authenticationTag=tag,
        )

        def parse(raw: bytes) -> bytes:
            return codec.parse_plaintext(raw, ciphertext_len=len(ciphertext))

        return await self._call(Operation.DECRYPT, key_id, body, parse)

    async def get_health_status(self, metadata: RequestMetadata) -> HealthStatus:
        """GetHealthStatus. Raises :class:`XksProxyError`."""
        body = codec.encode_request(metadata)
        return await self._call(Operation.GET_HEALTH_STATUS, None, body, codec.parse_health_status)

    async def test_connection(self, metadata: RequestMetadata) -> HealthStatus:
        """GetHealthStatus as Create/Update/ConnectCustomKeyStore use it: a proxy whose key
        managers are all UNAVAILABLE fails (``ALL_KEY_MANAGERS_UNAVAILABLE``)."""
        health = await self.get_health_status(metadata)
        if health.all_unavailable:
            raise XksProxyError(
                XksFailure.ALL_KEY_MANAGERS_UNAVAILABLE,
                "every ekmFleetDetails entry is UNAVAILABLE",
            )
        return health

    async def aclose(self) -> None:
        """Close the kept connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            with trio.move_on_after(1.0) as scope:
                scope.shield = True
                await conn.stream.aclose()

    # -- one call ----------------------------------------------------------------------------

    async def _call(
        self,
        operation: Operation,
        key_id: str | None,
        body: bytes,
        parse: Callable[[bytes], _T],
    ) -> _T:
        path = codec.operation_path(self._uri_path, operation, key_id)
        headers = sign_headers(
            method="POST",
            host=self._authority,
            path=path,
            headers={"Content-Type": "application/json"},
            body=body,
            access_key_id=self._credential.access_key_id,
            secret_access_key=self._credential.secret_access_key,
            session_token=None,
            region=self._region,
            service=SIGV4_SERVICE,
            now=datetime.fromtimestamp(self._clock(), UTC),
        )
        phase = ["connect"]
        with trio.move_on_after(self._timeout_s) as scope:
            status, payload = await self._exchange(path, headers, body, phase)
        if scope.cancelled_caught:
            if phase[0] == "connect":
                raise XksProxyError(XksFailure.UNREACHABLE, "connect timed out")
            raise XksProxyError(XksFailure.TIMED_OUT, f"no answer within {self._timeout_s} s")
        if status == 200:
            try:
                return parse(payload)
            except ResponseFormatError as exc:
                raise XksProxyError(XksFailure.MALFORMED_RESPONSE, str(exc)) from None
        error = codec.parse_error(payload)
        if error is None:
            raise XksProxyError(
                XksFailure.MALFORMED_RESPONSE, f"HTTP {status} without an errorName"
            )
        name, message = error
        raise XksProxyError(
            XksFailure.for_error_name(name), f"HTTP {status} {name[:64]}", error_message=message
        )

    async def _exchange(
        self, path: str, headers: dict[str, str], body: bytes, phase: list[str]
    ) -> tuple[int, bytes]:
        now = trio.current_time()
        while self._idle:
            kept = self._idle.pop()
            if now - kept.idle_since >= _IDLE_REUSE_S:
                await _close_quietly(kept.stream)
                continue
            phase[0] = "request"
            try:
                return await self._request(kept, path, headers, body)
            except _Broken:
                break  # the proxy closed it while idle (nothing was processed): one fresh try
        phase[0] = "connect"
        conn = await self._open()
        phase[0] = "request"
        try:
            return await self._request(conn, path, headers, body)
        except _Broken:
            raise XksProxyError(
                XksFailure.UNREACHABLE, "the proxy closed the connection without answering"
            ) from None

    async def _open(self) -> _Conn:
        if self._connect is not None:
            stream = await self._connect()
        else:
            try:
                tcp = await trio.open_tcp_stream(self._host, self._port)
            except OSError as exc:
                raise XksProxyError(
                    XksFailure.UNREACHABLE, f"cannot connect to {self._authority}: {exc}"
                ) from None
            stream = tcp
            if self._scheme == "https":
                assert self._ssl_context is not None
                tls = trio.SSLStream(
                    tcp, self._ssl_context, server_hostname=self._host, https_compatible=True
                )
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as exc:
                    await _close_quietly(tcp)
                    raise XksProxyError(
                        XksFailure.TLS_FAILED, f"TLS handshake failed: {exc.__cause__ or exc}"
                    ) from None
                stream = tls
        return _Conn(stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024), 0.0)

    async def _request(
        self, conn: _Conn, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        """One request on ``conn``; the connection is kept if the exchange left it reusable.

        Raises:
            _Broken: closed before any answer byte.
            XksProxyError: MALFORMED_RESPONSE for a broken or oversized answer.
        """
        http = conn.http
        head = [*headers.items(), ("Content-Length", str(len(body)))]
        data = http.send(h11.Request(method="POST", target=path, headers=head))
        data += http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage())
        got_bytes = False
        try:
            await conn.stream.send_all(data)
            status = 0
            chunks: list[bytes] = []
            size = 0
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    chunk = await conn.stream.receive_some(_RECEIVE_SIZE)
                    got_bytes = got_bytes or bool(chunk)
                    http.receive_data(bytes(chunk))
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_RESPONSE_BYTES:
                        raise XksProxyError(
                            XksFailure.MALFORMED_RESPONSE,
                            f"answer larger than {MAX_RESPONSE_BYTES} bytes",
                        )
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise trio.BrokenResourceError("closed")
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError) as exc:
            await _close_quietly(conn.stream)
            if isinstance(exc.__cause__, ssl.SSLError):  # TLS 1.3 reports a refused client
                raise XksProxyError(  # certificate after the handshake, on the first read
                    XksFailure.TLS_FAILED, f"TLS failed: {exc.__cause__}"
                ) from None
            if not got_bytes:
                raise _Broken from None
            raise XksProxyError(
                XksFailure.MALFORMED_RESPONSE, f"answer cut short or not HTTP: {exc}"
            ) from None
        except BaseException:
            await _close_quietly(conn.stream)
            raise
        reusable = http.our_state is h11.DONE and http.their_state is h11.DONE
        if reusable and len(self._idle) < self._max_idle:
            http.start_next_cycle()
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            await _close_quietly(conn.stream)
        return status, b"".join(chunks)


async def _close_quietly(stream: trio.abc.Stream) -> None:
    with trio.move_on_after(1.0) as scope:
        scope.shield = True
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
