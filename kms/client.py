"""Async AWS KMS client (JSON 1.1 + SigV4 over HTTP/1.1 keep-alive, h11 on trio) and the
enclave-side :class:`AttestedKmsClient` that adds ``Recipient`` and opens the CMS answer.

The transport is chosen by the constructor: an ``endpoint`` URL (``http://127.0.0.1:4599``),
a vsock address (inside an enclave: the vsock-proxy at ``VsockAddr(3, 8000)``) or an injected
``connect`` callable returning any :class:`trio.abc.Stream` (tests use in-memory streams).
One connection is kept open and reused; calls on one client are serialised (open several
clients for concurrency).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import h11
import trio

from . import _wrap, cms
from .errors import KmsApiError, KmsError
from .sigv4 import sign_headers

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from transport.vsock import VsockAddr

__all__ = [
    "Credentials",
    "KmsClient",
    "AttestedKmsClient",
    "AttestationSource",
    "RecipientKey",
    "MAX_RESPONSE_BYTES",
]

#: Responses larger than this are refused (the largest KMS answer, a GenerateDataKeyPair with an
#: RSA-4096 key and a CiphertextForRecipient, is under 32 KiB of JSON).
MAX_RESPONSE_BYTES = 1024 * 1024
#: Bytes asked of the stream per receive (perf-baseline §3.2: ≤ 64 KiB).
_RECEIVE_SIZE = 65536
#: Wire content type of the AWS JSON 1.1 protocol.
CONTENT_TYPE = "application/x-amz-json-1.1"
_SERVICE = "kms"


@dataclass(frozen=True)
class Credentials:
    """AWS credentials used to sign requests (SigV4)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


class _Connection:
    """One HTTP/1.1 connection: h11 state machine over a trio stream (TrioHTTPWrapper shape)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)

    async def request(
        self, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        data = self.conn.send(h11.Request(method="POST", target="/", headers=headers))
        data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        status = 0
        resp_headers: dict[str, str] = {}
        chunks: list[bytes] = []
        size = 0
        closed = False
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                # h11 reports an EOF before the answer ended as a protocol error; that is a
                # transport failure (the server died or dropped us), not a malformed answer.
                if closed:
                    raise trio.BrokenResourceError(
                        "KMS closed the connection before it answered"
                    ) from exc
                raise KmsError(f"KMS answer is not valid HTTP/1.1: {exc}") from exc
            if event is h11.NEED_DATA:
                data = bytes(await self.stream.receive_some(_RECEIVE_SIZE))
                closed = not data
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise KmsError(f"KMS response larger than {MAX_RESPONSE_BYTES} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise trio.BrokenResourceError("KMS closed the connection")
            elif isinstance(event, h11.InformationalResponse):
                continue
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        else:
            self.conn = h11.Connection(h11.CLIENT)  # not reusable: mark closed
            raise _NotReusable(status, resp_headers, b"".join(chunks))
        return status, resp_headers, b"".join(chunks)

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE


class _NotReusable(Exception):
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.result = (status, headers, body)


class KmsClient:
    """An async client of the AWS KMS JSON API (this project's daemon or AWS's).

    Args:
        endpoint: ``http://host:port`` (TCP). Exactly one of ``endpoint``, ``vsock``,
            ``connect`` is given.
        vsock: reach the daemon over vsock (inside an enclave, the vsock-proxy at (3, 8000)).
        connect: a callable opening a fresh stream (tests, custom transports).
        credentials: signing credentials.
        region: the SigV4 region (must match the daemon's).
        host: the ``Host`` header; default from the endpoint, else ``kms.<region>.amazonaws.com``.
        clock: returns "now" for X-Amz-Date (tests).

    Resource handling: the connection is opened lazily and kept alive; :meth:`aclose` closes it.
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        vsock: VsockAddr | None = None,
        connect: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
        credentials: Credentials,
        region: str = "us-east-1",
        host: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if sum(x is not None for x in (endpoint, vsock, connect)) != 1:
            raise ValueError("give exactly one of endpoint=, vsock=, connect=")
        self._credentials = credentials
        self._region = region
        self._clock = clock or (lambda: datetime.now(UTC))
        self._conn: _Connection | None = None
        self._lock = trio.Lock()
        default_host = f"kms.{region}.amazonaws.com"
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"endpoint must be http://HOST[:PORT], got {endpoint!r}")
            tcp_host, tcp_port = parts.hostname, parts.port or 80  # http default port
            self._host = host or parts.netloc

            async def _tcp() -> trio.abc.Stream:
                return await trio.open_tcp_stream(tcp_host, tcp_port)

            self._connect: Callable[[], Awaitable[trio.abc.Stream]] = _tcp
        elif vsock is not None:
            addr = vsock
            self._host = host or default_host

            async def _vsock() -> trio.abc.Stream:
                from transport.vsock import open_vsock_stream

                return await open_vsock_stream(addr)

            self._connect = _vsock
        else:
            assert connect is not None
            self._host = host or default_host
            self._connect = connect

    @property
    def region(self) -> str:
        """The SigV4 region requests are signed for."""
        return self._region

    async def call(self, operation: str, payload: Mapping[str, object]) -> dict[str, object]:
        """Call ``TrentService.<operation>`` with a JSON payload (binary fields base64 strings).

        Returns:
            The decoded JSON answer: an object, its members as the peer sent them (check each
            member's type before use; the typed helpers of :class:`AttestedKmsClient` do).

        Raises:
            KmsApiError: the service answered with an error (``type_name`` = AWS ``__type``).
            KmsError: the answer was not a KMS answer (not HTTP/1.1, bad JSON, too large).
            OSError / trio.BrokenResourceError: the transport failed.
        """
        body = json.dumps(payload, separators=(",", ":")).encode()
        async with self._lock:
            status, _headers, raw = await self._round_trip(operation, body)
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise KmsError(f"KMS answered HTTP {status} with a non-JSON body") from exc
        if not isinstance(answer, dict):
            raise KmsError(f"KMS answered HTTP {status} with a non-object body")
        if status >= 300:
            type_name = str(answer.get("__type", f"HTTP{status}")).rpartition("#")[2]
            message = str(answer.get("message", answer.get("Message", "")))
            raise KmsApiError(type_name, message, status=status)
        return answer

    async def _round_trip(self, operation: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        creds = self._credentials
        headers = sign_headers(
            method="POST",
            host=self._host,
            path="/",
            headers={"Content-Type": CONTENT_TYPE, "X-Amz-Target": f"TrentService.{operation}"},
            body=body,
            access_key_id=creds.access_key_id,
            secret_access_key=creds.secret_access_key,
            session_token=creds.session_token,
            region=self._region,
            service=_SERVICE,
            now=self._clock(),
        )
        wire = [(k, v) for k, v in headers.items()]
        wire.append(("Content-Length", str(len(body))))
        # A kept-alive connection may have been closed by the server while idle: retry once on a
        # fresh connection if the reused one fails before any answer.
        for attempt in (0, 1):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = _Connection(await self._connect())
            conn = self._conn
            try:
                return await conn.request(wire, body)
            except _NotReusable as nr:
                await self._drop()
                return nr.result
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._drop()
                if not reused or attempt:
                    raise
            except BaseException:
                await self._drop()
                raise
        raise AssertionError("unreachable")

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.move_on_after(1.0) as scope:
                scope.shield = True
                await conn.stream.aclose()

    async def aclose(self) -> None:
        """Close the kept-alive connection (the client can still be used; it reconnects)."""
        async with self._lock:
            await self._drop()

    async def __aenter__(self) -> KmsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AttestationSource(Protocol):
    """What :class:`AttestedKmsClient` needs from the NSM (``attest.nsm.client.NsmClient``)."""

    async def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes: ...


class RecipientKey:
    """The enclave's RSA-2048 recipient key pair, generated in a background thread.

    RSA-2048 keygen costs ~50 ms median (perf-baseline §2.1); :meth:`start` begins it at once so
    it overlaps with the rest of the enclave's start-up, :meth:`get` waits for it.
    """

    def __init__(self) -> None:
        self._done = threading.Event()
        self._key: rsa.RSAPrivateKey | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._spki: bytes = b""

    def start(self) -> None:
        """Start key generation in a daemon thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._generate, name="kms-rsa-keygen", daemon=True
            )
            self._thread.start()

    def _generate(self) -> None:
        try:
            key = _wrap.generate_rsa_2048()
            self._spki = _wrap.spki_der(key.public_key())
            self._key = key
        except BaseException as exc:  # surfaced to the caller of get()
            self._error = exc
        finally:
            self._done.set()

    async def get(self) -> tuple[rsa.RSAPrivateKey, bytes]:
        """The private key and its DER SPKI, waiting for generation if needed."""
        self.start()
        if not self._done.is_set():
            await trio.to_thread.run_sync(self._done.wait)
        if self._error is not None:
            raise KmsError("recipient key generation failed") from self._error
        assert self._key is not None
        return self._key, self._spki


class AttestedKmsClient:
    """Enclave-side KMS client: every call carries ``Recipient`` (a fresh NSM attestation
    document over the enclave's RSA-2048 public key) and the answer's ``CiphertextForRecipient``
    is decrypted locally; no plaintext ever crosses the host.

    Call :meth:`prepare` as early as possible at enclave start (it starts key generation in a
    thread); otherwise the first call generates the key.
    """

    def __init__(self, client: KmsClient, nsm: AttestationSource) -> None:
        self._client = client
        self._nsm = nsm
        self._key = RecipientKey()

    def prepare(self) -> None:
        """Start generating the recipient key pair in the background (idempotent)."""
        self._key.start()

    async def _recipient(self) -> tuple[rsa.RSAPrivateKey, dict[str, str]]:
        private_key, spki = await self._key.get()
        document = await self._nsm.attestation(public_key=spki)
        return private_key, {
            "AttestationDocument": base64.b64encode(document).decode(),
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        }

    @staticmethod
    def _open(answer: Mapping[str, object], private_key: rsa.RSAPrivateKey) -> bytes:
        if answer.get("Plaintext"):
            raise KmsError("KMS returned a plaintext to a Recipient request")
        blob = answer.get("CiphertextForRecipient")
        if not isinstance(blob, str):
            raise KmsError("KMS answer lacks CiphertextForRecipient")
        try:
            data = base64.b64decode(blob, validate=True)
        except ValueError as exc:
            raise KmsError("CiphertextForRecipient is not base64") from exc
        return cms.open_enveloped_data(data, private_key)

    async def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """Decrypt a CiphertextBlob; the plaintext is released only to this enclave."""
        private_key, recipient = await self._recipient()
        payload: dict[str, object] = {
            "CiphertextBlob": base64.b64encode(ciphertext_blob).decode(),
            "Recipient": recipient,
        }
        if key_id is not None:
            payload["KeyId"] = key_id
        if encryption_context:
            payload["EncryptionContext"] = dict(encryption_context)
        return self._open(await self._client.call("Decrypt", payload), private_key)

    async def generate_data_key(
        self,
        key_id: str,
        *,
        key_spec: str = "AES_256",
        encryption_context: Mapping[str, str] | None = None,
    ) -> tuple[bytes, bytes]:
        """A fresh data key: ``(plaintext, ciphertext_blob)``."""
        private_key, recipient = await self._recipient()
        payload: dict[str, object] = {"KeyId": key_id, "KeySpec": key_spec, "Recipient": recipient}
        if encryption_context:
            payload["EncryptionContext"] = dict(encryption_context)
        answer = await self._client.call("GenerateDataKey", payload)
        plaintext = self._open(answer, private_key)
        try:
            blob = _base64_member(answer, "CiphertextBlob")
        except ValueError as exc:
            raise KmsError("GenerateDataKey answer lacks a valid CiphertextBlob") from exc
        return plaintext, blob

    async def generate_data_key_pair(
        self,
        key_id: str,
        *,
        key_pair_spec: str = "ECC_NIST_P256",
        encryption_context: Mapping[str, str] | None = None,
    ) -> tuple[bytes, bytes, bytes]:
        """A fresh data key pair: ``(private key PKCS#8 DER, public key SPKI DER,
        private key ciphertext blob)``; the private key is released to this enclave only."""
        private_key, recipient = await self._recipient()
        payload: dict[str, object] = {
            "KeyId": key_id,
            "KeyPairSpec": key_pair_spec,
            "Recipient": recipient,
        }
        if encryption_context:
            payload["EncryptionContext"] = dict(encryption_context)
        answer = await self._client.call("GenerateDataKeyPair", payload)
        if answer.get("PrivateKeyPlaintext"):
            raise KmsError("KMS returned a plaintext private key to a Recipient request")
        private_der = self._open(answer, private_key)
        try:
            public_der = _base64_member(answer, "PublicKey")
            blob = _base64_member(answer, "PrivateKeyCiphertextBlob")
        except ValueError as exc:
            raise KmsError("GenerateDataKeyPair answer is incomplete") from exc
        return private_der, public_der, blob

    async def generate_random(self, n: int) -> bytes:
        """``n`` random bytes from KMS, released to this enclave only."""
        private_key, recipient = await self._recipient()
        answer = await self._client.call(
            "GenerateRandom", {"NumberOfBytes": n, "Recipient": recipient}
        )
        return self._open(answer, private_key)

    async def aclose(self) -> None:
        """Close the underlying client's connection."""
        await self._client.aclose()


def _base64_member(answer: Mapping[str, object], name: str) -> bytes:
    """The binary member ``name`` of an answer, decoded.

    Raises:
        ValueError: absent, not a string, or not Base64.
    """
    value = answer.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} is absent or not a string")
    return base64.b64decode(value, validate=True)
