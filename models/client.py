"""Client SDK for the confidential inference server (trio API and a blocking wrapper).

Every connection starts with the attested handshake of ``transport.channel``: the enclave sends
an NSM attestation document binding a fresh key and the client's nonce; the client verifies it
(root, chain, signature, PCR policy, debug rule, freshness) **before sending anything** and only
then talks ``enclave-rpc/1`` inside the encrypted channel. The host (ingress, vsock) only relays
ciphertext.

::

    verifier = make_verifier(roots=[ca_root], policy=policy_for(pcr0=..., model_digests=[...]))
    async with open_inference_client("127.0.0.1:5005", verifier=verifier) as client:
        print(client.attestation.module_id, client.attestation.pcrs[0].hex())
        models = await client.list_models()
        outputs = await client.infer("digits", {"pixels": x[:1]})
        async for out in client.stream("digits", ({"pixels": x[i:i+32]} for i in ...)):
            ...
        result = await client.embed("minilm", ["a clinical note", "a contract"])
        result.vectors  # float32 [2, 384]; result.truncated: (False, False)

Errors: a server-side refusal raises the matching :mod:`models.errors` class (unknown model:
``ModelNotFoundError``, bad input: ``InvalidInputError``, the server's buffers full:
``OverloadedError``...); nothing answering at the endpoint (refused, or a relay that could not
reach the enclave) raises ``transport.errors.PeerUnreachable``; a failed attestation or any
tampering with the bytes on the way raises ``transport.errors.AuthenticationFailed``; a peer
that goes away later raises a ``TransportError``. No call waits forever: each is bounded by
``timeout_s`` (default :data:`DEFAULT_TIMEOUT_S`) and ends in
:class:`~models.errors.InferenceTimeoutError`. No result is returned unless it arrived intact
over the verified channel.

Failover (clients that connect by address: ``HOST:PORT`` or a ``VsockAddr``). When the
connection breaks under a call (the replica died, a relay dropped it), an **idempotent** call is
retried once on a fresh connection, with a fresh attested handshake that must satisfy the same
verifier *and* show the same PCR0 and PCR16 as the enclave first verified: behind an ingress
the retry lands on another replica of the same image serving the same models, never on an
enclave that fails the policy. Idempotent: ``infer`` (a pure function of its inputs, no server
state) and ``list_models`` (read only). A stream is not retried (its inputs were partly
consumed): it raises :class:`StreamInterrupted`, whose ``acknowledged`` says how many inputs
were answered, so the caller can resume with the rest; the next call reconnects. A call that
fails again after its retry raises that error.
"""

from __future__ import annotations

import hmac
import threading
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import numpy.typing as npt
import structlog
import trio

from models.errors import (
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    ModelError,
    error_from_code,
)
from models.tensors import Array, TensorSpec, decode_tensors, encode_tensors
from models.text.embeddings import Embeddings
from models.text.errors import RequestTooLargeError
from models.text.wire import EMBED, EMBED_STREAM, decode_answer, embed_request, encode_texts
from transport.errors import (
    LocalProtocolError,
    PeerUnreachable,
    TransportError,
    VsockConnectionRefused,
)
from transport.hostport import format_host_port, parse_host_port
from transport.rpc import RpcError

if TYPE_CHECKING:
    from cryptography import x509

    from attest.policy import Policy
    from transport.channel import DocumentVerifier, PeerAttestation, SecureChannel, Suite
    from transport.rpc import RpcClient, RpcStream
    from transport.vsock import VsockAddr

__all__ = [
    "ModelInfo",
    "InferenceClient",
    "open_inference_client",
    "BlockingInferenceClient",
    "make_verifier",
    "policy_for",
    "parse_endpoint",
    "STREAM_IN_FLIGHT",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "Inputs",
    "StreamInterrupted",
    "Reconnect",
    "Embeddings",
]

log = structlog.get_logger()

_T = TypeVar("_T")

#: One request's inputs: input name -> array (anything ``numpy.asarray`` takes).
Inputs = Mapping[str, npt.ArrayLike]

#: Longest wait for one answer (a unary call, the next stream output, stream credit), seconds.
#: A peer that stops answering mid-call ends in InferenceTimeoutError after this.
DEFAULT_TIMEOUT_S: Final = 30.0
#: Longest wait to connect and complete the attested handshake, seconds.
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0

#: Stream messages sent ahead of the outputs received: enough to keep the enclave busy (it
#: batches what is waiting) and below the RPC's initial window of 16 messages, so neither side
#: ever waits on the other's credit.
STREAM_IN_FLIGHT: Final = 12
#: Tensor bytes a stream message may coalesce from inputs that are ready together (256 KiB:
#: per-message costs amortised, well under the RPC's 1 MiB window and 4 MiB message cap).
COALESCE_BYTES: Final = 256 << 10
#: Most inputs coalesced into one stream message.
MAX_COALESCED_ITEMS: Final = 64
#: Cap on tensors decoded from one answer (bytes; the RPC layer caps messages at 4 MiB anyway).
MAX_ANSWER_BYTES: Final = 64 << 20


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One catalog entry."""

    name: str
    available: bool
    digest: str | None
    size: int | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batchable: bool = False
    reason: str | None = None
    #: "tensor" (infer/stream) or "text-embedding" (embed/embed_stream); "" when unavailable.
    kind: str = ""
    #: For a text model: its token cap, embedding width, pooling and request limits.
    text: Mapping[str, object] | None = None

    @classmethod
    def from_wire(cls, obj: object) -> ModelInfo:
        """Parse one catalog entry of the server's answer, checking every field's type.

        Raises:
            InferenceError: the entry is not a map, or a field has the wrong type (named in the
                message; the value is not echoed).
        """
        if not isinstance(obj, Mapping):
            raise InferenceError("malformed catalog entry")
        name = obj.get("name")
        if not isinstance(name, str):
            raise InferenceError("malformed catalog entry: name")
        digest = _optional_field(obj, "digest", str)
        size = _optional_field(obj, "size", int)
        reason = _optional_field(obj, "reason", str)
        kind = _optional_field(obj, "kind", str) or ""
        text = obj.get("text")
        if text is not None and not isinstance(text, Mapping):
            raise InferenceError("malformed catalog entry: text")
        specs: dict[str, tuple[TensorSpec, ...]] = {}
        for field_name in ("inputs", "outputs"):
            value = obj.get(field_name) or ()
            if not isinstance(value, list | tuple):
                raise InferenceError(f"malformed catalog entry: {field_name}")
            specs[field_name] = tuple(TensorSpec.from_wire(s) for s in value)
        return cls(
            name=name,
            available=obj.get("available") is True,
            digest=digest,
            size=size,
            inputs=specs["inputs"],
            outputs=specs["outputs"],
            batchable=obj.get("batchable") is True,
            reason=reason,
            kind=kind,
            text=dict(text) if text is not None else None,
        )

    @property
    def is_text(self) -> bool:
        """Whether the model takes texts (:meth:`InferenceClient.embed`)."""
        return self.kind == "text-embedding"


_F = TypeVar("_F", str, int)


def _optional_field(entry: Mapping[object, object], key: str, kind: type[_F]) -> _F | None:
    """``entry[key]`` if absent/None or of ``kind`` (a bool is not an int), else InferenceError."""
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InferenceError(f"malformed catalog entry: {key}")
    return value


def _map_error(exc: RpcError) -> ModelError:
    return error_from_code(exc.code, exc.message)


class StreamInterrupted(InferenceError):
    """The connection broke during a stream; streams are not retried.

    Attributes:
        acknowledged: inputs whose outputs were received (and yielded), in order: resume with
            ``inputs[acknowledged:]``. The next call on the client reconnects.
    """

    def __init__(self, message: str, *, acknowledged: int) -> None:
        super().__init__(message)
        self.acknowledged = acknowledged


#: Errors out of an RPC call that may mean the connection broke (then ``rpc.closed`` says so).
_CONNECTION_ERRORS: Final = (TransportError, trio.BrokenResourceError, trio.ClosedResourceError)


class Reconnect(Protocol):
    """Opens a fresh attested connection whose enclave shows ``pinned``'s PCR0 and PCR16."""

    async def __call__(self, pinned: PeerAttestation) -> tuple[RpcClient, _Attested]: ...


class _Attested(Protocol):
    """What the client needs of its channel: the verified peer."""

    @property
    def peer(self) -> PeerAttestation | None: ...


def _timeout(what: str, timeout_s: float) -> InferenceTimeoutError:
    return InferenceTimeoutError(f"no answer from the enclave within {timeout_s:g} s ({what})")


def _outputs(answer: Any) -> dict[str, Array]:
    if not isinstance(answer, Mapping) or "outputs" not in answer:
        raise InferenceError("malformed answer from the server")
    return decode_tensors(answer["outputs"], max_bytes=MAX_ANSWER_BYTES, what="outputs")


class InferenceClient:
    """A connected, attested client (use :func:`open_inference_client`).

    Args:
        rpc: the RPC client on the attested channel.
        channel: the channel (its verified ``peer``); None for tests over a plain stream.
        timeout_s: default bound on each call (see :data:`DEFAULT_TIMEOUT_S`).
    """

    def __init__(
        self,
        rpc: RpcClient,
        channel: _Attested | None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        reconnect: Reconnect | None = None,
    ) -> None:
        if not 0 < timeout_s <= 24 * 3600:
            raise ValueError(f"timeout_s must be in (0, 86400] seconds, got {timeout_s!r}")
        self._rpc = rpc
        self._channel = channel
        self.timeout_s = timeout_s
        self._reconnect = reconnect
        self._failover_lock = trio.Lock()
        #: connections replaced after a break (failovers that succeeded)
        self.failovers = 0

    @property
    def attestation(self) -> PeerAttestation:
        """The verified :class:`transport.channel.PeerAttestation` of the enclave."""
        peer = self._channel.peer if self._channel is not None else None
        if peer is None:
            raise RuntimeError("this client has no attested channel")
        return peer

    async def _call(
        self,
        method: str,
        request: object,
        timeout_s: float | None,
        *,
        idempotent: bool = False,
    ) -> Any:
        """One unary call under the client's deadline. ``idempotent``: if the connection
        breaks under it, retry once on a fresh, re-attested connection (module docstring)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        with trio.move_on_after(limit):
            rpc = self._rpc
            try:
                return await rpc.call(method, request)
            except RpcError as exc:
                raise _map_error(exc) from None
            except _CONNECTION_ERRORS as exc:
                if not (idempotent and rpc.closed and self._reconnect is not None):
                    raise
                await self._fail_over(rpc, exc)
            try:  # once, on the fresh connection
                return await self._rpc.call(method, request)
            except RpcError as exc:
                raise _map_error(exc) from None
        raise _timeout(method, limit)

    async def _fail_over(self, broken: RpcClient, cause: BaseException) -> None:
        """Replace the broken connection (once, however many calls saw it break)."""
        assert self._reconnect is not None
        async with self._failover_lock:
            if self._rpc is not broken:
                return  # another call already reconnected
            pinned = self.attestation
            log.warning(
                "inference_connection_lost",
                module_id=pinned.module_id,
                error=f"{type(cause).__name__}: {cause}",
            )
            self._rpc, self._channel = await self._reconnect(pinned)
            self.failovers += 1
            log.info(
                "inference_failover",
                from_module_id=pinned.module_id,
                to_module_id=self.attestation.module_id,
            )

    async def _live_rpc(self) -> RpcClient:
        """The connection to use for a new stream: a fresh one if the last one broke."""
        rpc = self._rpc
        if rpc.closed and self._reconnect is not None:
            await self._fail_over(rpc, TransportError("the previous connection broke"))
        return self._rpc

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """The server's catalog (available and unavailable models).

        Raises:
            InferenceTimeoutError: no answer within ``timeout_s`` (default: the client's).
        """
        answer = await self._call("catalog", {}, timeout_s, idempotent=True)
        models = answer.get("models") if isinstance(answer, Mapping) else None
        if not isinstance(models, list):
            raise InferenceError("malformed catalog")
        return [ModelInfo.from_wire(m) for m in models]

    async def infer(
        self, model: str, inputs: Inputs, *, timeout_s: float | None = None
    ) -> dict[str, Array]:
        """One request: ``inputs`` name -> array; returns output name -> array.

        Raises:
            InvalidInputError: the inputs do not match the model, or exceed a size limit.
            ModelNotFoundError / ModelUnavailableError / OverloadedError: refused by the server.
            InferenceTimeoutError: no answer within ``timeout_s`` (default: the client's).
        """
        request = {"model": model, "inputs": encode_tensors(inputs)}
        try:
            answer = await self._call("infer", request, timeout_s, idempotent=True)
        except LocalProtocolError as exc:  # refused before sending (message size cap)
            raise InvalidInputError(
                f"request too large for one message ({exc}); exceeds the limit, "
                "split it or use stream()"
            ) from None
        return _outputs(answer)

    async def stream(
        self,
        model: str,
        inputs: Iterable[Inputs] | AsyncIterable[Inputs],
        *,
        in_flight: int = STREAM_IN_FLIGHT,
        coalesce_bytes: int = COALESCE_BYTES,
        timeout_s: float | None = None,
    ) -> AsyncIterator[dict[str, Array]]:
        """Stream ``inputs`` through ``model``; yields one output map per input, in order.

        Up to ``in_flight`` messages are outstanding at once (pipelining, so the enclave can
        batch them); the RPC layer's credits give backpressure. Inputs of a plain (non-async)
        iterable that are ready together are coalesced into one message up to
        ``coalesce_bytes`` of tensor data (0 disables it): every message costs a round of
        framing, encryption and scheduling on both sides, whatever its size. Leaving the loop
        early cancels the stream on the server (wrap in ``contextlib.aclosing`` to do it
        promptly).

        Raises:
            InferenceTimeoutError: the server took more than ``timeout_s`` (default: the
                client's) to answer the next input or to accept more.
            StreamInterrupted: the connection broke; ``acknowledged`` inputs were answered
                (streams are not retried; the next call reconnects).
        """
        limit = self.timeout_s if timeout_s is None else timeout_s
        if not 1 <= in_flight <= 16:
            raise ValueError("in_flight must be between 1 and 16 (the RPC window)")
        source: Iterator[Inputs] | AsyncIterator[Inputs] = (
            aiter(inputs) if isinstance(inputs, AsyncIterable) else iter(inputs)
        )
        rpc = await self._live_rpc()
        acknowledged = 0
        try:
            async with aclosing(
                self._stream_on(rpc, model, source, in_flight, coalesce_bytes, limit)
            ) as outputs_of:
                async for outputs in outputs_of:
                    acknowledged += 1
                    yield outputs
        except _CONNECTION_ERRORS as exc:
            if not rpc.closed:
                raise
            raise StreamInterrupted(
                f"the connection broke during the stream after {acknowledged} answered "
                f"input(s) ({type(exc).__name__}: {exc}); resume with the remaining inputs",
                acknowledged=acknowledged,
            ) from exc

    async def _stream_on(
        self,
        rpc: RpcClient,
        model: str,
        source: Iterator[Inputs] | AsyncIterator[Inputs],
        in_flight: int,
        coalesce_bytes: int,
        limit: float,
    ) -> AsyncGenerator[dict[str, Array], None]:
        async with rpc.open_stream("stream", {"model": model}) as st:
            pending: deque[int] = deque()  # per outstanding message: 0 single, else batch size
            exhausted = False
            try:
                while True:
                    while not exhausted and len(pending) < in_flight:
                        group, exhausted = await _next_group(source, coalesce_bytes)
                        if group:
                            await _bounded(_send_group(st, group), "stream input", limit)
                            pending.append(len(group) if len(group) > 1 else 0)
                        if exhausted:
                            await st.send_end()
                    if not pending:
                        break
                    answer = await _next_answer(st, limit)
                    count = pending.popleft()
                    if count == 0:
                        yield _outputs(answer)
                        continue
                    batch = answer.get("batch") if isinstance(answer, Mapping) else None
                    if not isinstance(batch, list) or len(batch) != count:
                        raise InferenceError("malformed batch answer from the server")
                    for outputs in batch:
                        yield _outputs({"outputs": outputs})
                await _end_of_stream(st, limit)
            except RpcError as exc:
                raise _map_error(exc) from None

    # -- text models (texts in, embeddings out) -------------------------------------------

    async def embed(
        self, model: str, texts: Sequence[str | bytes], *, timeout_s: float | None = None
    ) -> Embeddings:
        """Embed ``texts`` with a text model: float32 [len(texts), dim] rows, in order, and
        per text whether it was truncated at the model's token cap.

        Texts are sent as UTF-8 (``bytes`` are sent as they are: the server checks them).

        Raises:
            TextInputError: a limit is broken (its subclass says which: too many texts, one too
                large, invalid UTF-8, an empty text...), here or on the server.
            ModelNotFoundError / ModelUnavailableError / OverloadedError: refused.
            InvalidInputError: the model is not a text model.
            InferenceTimeoutError: no answer within ``timeout_s`` (default: the client's).
        """
        request = embed_request(model, texts)
        count = len(request["texts"])
        try:
            answer = await self._call(EMBED, request, timeout_s)
        except LocalProtocolError as exc:  # refused before sending (message size cap)
            raise RequestTooLargeError(
                f"the texts are too large for one message ({exc}); send fewer per request"
            ) from None
        return decode_answer(answer, texts=count)

    async def embed_stream(
        self,
        model: str,
        batches: Iterable[Sequence[str | bytes]] | AsyncIterable[Sequence[str | bytes]],
        *,
        in_flight: int = STREAM_IN_FLIGHT,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Embeddings]:
        """Stream batches of texts through a text model; yields one :class:`Embeddings` per
        batch, in order. Up to ``in_flight`` batches are outstanding (the server batches the
        texts of those waiting by length, in one round). Leaving the loop early cancels the
        stream on the server.

        Raises:
            the errors of :meth:`embed`; a batch that breaks a limit ends the stream after the
            batches before it were answered.
            StreamInterrupted: the connection broke; ``acknowledged`` batches were answered
                (streams are not retried; the next call reconnects, as for :meth:`stream`).
        """
        limit = self.timeout_s if timeout_s is None else timeout_s
        if not 1 <= in_flight <= 16:
            raise ValueError("in_flight must be between 1 and 16 (the RPC window)")
        source: Iterator[Sequence[str | bytes]] | AsyncIterator[Sequence[str | bytes]] = (
            aiter(batches) if isinstance(batches, AsyncIterable) else iter(batches)
        )
        rpc = await self._live_rpc()  # a fresh connection if the last one broke
        acknowledged = 0
        try:
            async with aclosing(self._embed_stream_on(rpc, model, source, in_flight, limit)) as it:
                async for embeddings in it:
                    acknowledged += 1
                    yield embeddings
        except _CONNECTION_ERRORS as exc:
            if not rpc.closed:
                raise
            raise StreamInterrupted(
                f"the connection broke during the stream after {acknowledged} answered "
                f"batch(es) ({type(exc).__name__}: {exc}); resume with the remaining batches",
                acknowledged=acknowledged,
            ) from exc

    async def _embed_stream_on(
        self,
        rpc: RpcClient,
        model: str,
        source: Iterator[Sequence[str | bytes]] | AsyncIterator[Sequence[str | bytes]],
        in_flight: int,
        limit: float,
    ) -> AsyncGenerator[Embeddings, None]:
        async with rpc.open_stream(EMBED_STREAM, {"model": model}) as st:
            pending: deque[int] = deque()  # texts per outstanding message
            exhausted = False
            try:
                while True:
                    while not exhausted and len(pending) < in_flight:
                        try:
                            batch = (
                                await anext(source)
                                if isinstance(source, AsyncIterator)
                                else next(source)
                            )
                        except (StopIteration, StopAsyncIteration):
                            exhausted = True
                            await st.send_end()
                            break
                        message = {"texts": encode_texts(batch)}
                        try:
                            await _bounded(st.send(message), "stream input", limit)
                        except LocalProtocolError as exc:
                            raise RequestTooLargeError(
                                f"a batch is too large for one message ({exc})"
                            ) from None
                        pending.append(len(message["texts"]))
                    if not pending:
                        break
                    answer = await _next_answer(st, limit)
                    yield decode_answer(answer, texts=pending.popleft())
                await _end_of_stream(st, limit)
            except RpcError as exc:
                raise _map_error(exc) from None


async def _next_answer(st: RpcStream, limit: float) -> Any:
    """The server's next answer on a stream that still owes some."""
    try:
        return await _bounded(st.receive(), "stream output", limit)
    except trio.EndOfChannel:
        raise InferenceError("server ended the stream early") from None


async def _end_of_stream(st: RpcStream, limit: float) -> None:
    """Wait for the server to end a stream whose answers all came; anything more is an error."""
    try:
        extra = await _bounded(st.receive(), "end of stream", limit)
    except trio.EndOfChannel:
        return
    raise InferenceError(f"server sent an unexpected extra message: {type(extra)}")


async def _bounded(operation: Awaitable[_T], what: str, timeout_s: float) -> _T:
    """Await ``operation``, or raise InferenceTimeoutError after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        return await operation
    raise _timeout(what, timeout_s)


async def _next_group(
    source: Iterator[Inputs] | AsyncIterator[Inputs],
    coalesce_bytes: int,
) -> tuple[list[dict[str, Any]], bool]:
    """The next message's worth of encoded inputs, and whether the source is exhausted."""
    group: list[dict[str, Any]] = []
    if isinstance(source, AsyncIterator):
        try:
            group.append(encode_tensors(await anext(source)))
        except StopAsyncIteration:
            return group, True
        return group, False
    size = 0
    exhausted = False
    while len(group) < MAX_COALESCED_ITEMS:
        try:
            item = next(source)
        except StopIteration:
            exhausted = True
            break
        encoded = encode_tensors(item)
        group.append(encoded)
        size += sum(len(t["data"]) for t in encoded.values())
        if size >= coalesce_bytes:
            break
    await trio.lowlevel.checkpoint()
    return group, exhausted


async def _send_group(st: RpcStream, group: list[dict[str, Any]]) -> None:
    message = {"inputs": group[0]} if len(group) == 1 else {"batch": group}
    try:
        await st.send(message)
    except LocalProtocolError as exc:  # refused before sending (message size cap)
        raise InvalidInputError(
            f"stream input too large for one message ({exc}); exceeds the limit, "
            "send smaller chunks"
        ) from None


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port), by
    :func:`transport.hostport.parse_host_port` (the project's one parser).

    Raises:
        AddressError: not a valid ``HOST:PORT`` (a ``ValueError``).
    """
    return parse_host_port(endpoint, what="endpoint")


async def _connect(target: str | VsockAddr | trio.abc.Stream) -> trio.abc.Stream:
    """The byte stream to the enclave."""
    from transport.vsock import VsockAddr, open_vsock_stream

    if isinstance(target, trio.abc.Stream):
        return target
    if isinstance(target, VsockAddr):
        where = f"vsock ({target.cid}, {target.port})"
        try:
            return await open_vsock_stream(target)
        except (VsockConnectionRefused, OSError) as exc:
            raise PeerUnreachable(f"enclave unreachable at {where}: {exc}") from exc
    if not isinstance(target, str):
        raise TypeError(f"connect to a 'HOST:PORT', a VsockAddr or a stream, not {target!r}")
    host, port = parse_host_port(target, what="endpoint")
    where = format_host_port(host, port)
    try:
        return await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise PeerUnreachable(f"enclave unreachable at {where}: {_why(exc)}") from exc


def _why(exc: OSError) -> str:
    """What went wrong connecting (trio groups the attempts' errors under one OSError)."""
    causes: list[BaseException] = [exc]
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup):
        causes = list(group.exceptions)
    if causes and all(isinstance(c, ConnectionRefusedError) for c in causes):
        return "connection refused (nothing listens there)"
    first = causes[0]
    if isinstance(first, OSError) and first.strerror:
        return first.strerror.lower()
    return str(first) or type(first).__name__


@asynccontextmanager
async def open_inference_client(
    target: str | VsockAddr | trio.abc.Stream,
    *,
    verifier: DocumentVerifier,
    suites: Sequence[Suite] | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    failover: bool = True,
) -> AsyncIterator[InferenceClient]:
    """Connect (TCP ``"HOST:PORT"`` to the ingress, a ``VsockAddr``, or an open stream),
    verify the enclave's attestation with ``verifier`` and yield an :class:`InferenceClient`.

    Args:
        target: where the enclave is: the host ingress's ``HOST:PORT``, a vsock address, or a
            connected byte stream (which the client then owns).
        verifier: a ``transport.channel.DocumentVerifier`` (see :func:`make_verifier`).
        suites: channel suites to offer (default: hybrid ML-KEM-768+X25519, then X25519).
        connect_timeout_s: bound on connecting plus the attested handshake.
        timeout_s: the client's default bound on each call (:attr:`InferenceClient.timeout_s`).
        failover: retry an idempotent call once on a fresh, re-attested connection to
            ``target`` when its connection breaks (module docstring); not for a ``target``
            that is an open stream.

    Raises:
        AddressError: ``target`` is not a valid ``HOST:PORT``.
        PeerUnreachable: nothing answered: the connection was refused, or a relay (the
            ingress) could not reach the enclave. Nothing was sent.
        AuthenticationFailed: the attestation did not verify or the handshake was tampered
            with. Nothing was sent.
        InferenceTimeoutError: no attested channel within ``connect_timeout_s``.
    """
    channel = await _open_channel(target, verifier, suites, connect_timeout_s)
    from transport.rpc import open_rpc_client

    if failover and not isinstance(target, trio.abc.Stream):
        async with _failover_connections(
            target, verifier, suites, connect_timeout_s
        ) as connections:
            rpc, attested = await connections.attach(channel)
            yield InferenceClient(
                rpc, attested, timeout_s=timeout_s, reconnect=connections.reconnect
            )
        return
    async with channel, open_rpc_client(channel) as rpc:
        yield InferenceClient(rpc, channel, timeout_s=timeout_s)


async def _open_channel(
    target: str | VsockAddr | trio.abc.Stream,
    verifier: DocumentVerifier,
    suites: Sequence[Suite] | None,
    timeout_s: float,
) -> SecureChannel:
    from transport.channel import Suite, connect_channel

    offered = list(suites) if suites is not None else [Suite.MLKEM768_X25519, Suite.X25519]
    with trio.move_on_after(timeout_s):
        stream = await _connect(target)
        try:
            return await connect_channel(stream, verifier=verifier, suites=offered)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
            raise
    raise InferenceTimeoutError(f"no attested channel to the enclave within {timeout_s:g} s")


@asynccontextmanager
async def _failover_connections(
    target: str | VsockAddr,
    verifier: DocumentVerifier,
    suites: Sequence[Suite] | None,
    connect_timeout_s: float,
) -> AsyncIterator[_Connections]:
    """A :class:`_Connections` whose nursery lives as long as the ``async with`` block."""
    try:
        async with trio.open_nursery() as nursery:
            yield _Connections(nursery, target, verifier, suites, connect_timeout_s)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:  # a lone error (the block's own, say) as itself
        if len(eg.exceptions) == 1 and not isinstance(eg.exceptions[0], BaseExceptionGroup):
            lone = eg.exceptions[0]
            raise lone from lone.__cause__
        raise


class _Connections:
    """The connections of one failover client, each held open by a task of ``nursery`` (an
    RPC client must be closed by the task that opened it)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        target: str | VsockAddr,
        verifier: DocumentVerifier,
        suites: Sequence[Suite] | None,
        connect_timeout_s: float,
    ) -> None:
        self._nursery = nursery
        self.target = target
        self.verifier = verifier
        self.suites = suites
        self.connect_timeout_s = connect_timeout_s
        self._current: trio.CancelScope | None = None

    async def attach(self, channel: SecureChannel) -> tuple[RpcClient, _Attested]:
        """Hold ``channel`` (and an RPC client on it) open; closes the previous one."""
        rpc, scope = await self._nursery.start(_hold_connection, channel)
        if self._current is not None:
            self._current.cancel()
        self._current = scope
        return rpc, channel

    async def reconnect(self, pinned: PeerAttestation) -> tuple[RpcClient, _Attested]:
        """A fresh connection whose enclave passes the verifier and shows ``pinned``'s PCR0
        and PCR16 (raises what ``open_inference_client`` raises otherwise).

        An attempt that reached no enclave (``PeerUnreachable``: nothing was sent, nothing
        attested; e.g. an ingress that still routed to the replica that just died) is tried
        again, with a short backoff, within ``connect_timeout_s``.
        """
        verifier = _pinned(self.verifier, pinned)
        deadline = trio.current_time() + self.connect_timeout_s
        delay = _RECONNECT_FIRST_DELAY_S
        while True:
            left = deadline - trio.current_time()
            try:
                channel = await _open_channel(self.target, verifier, self.suites, max(left, 0.0))
            except PeerUnreachable:
                if trio.current_time() + delay >= deadline:
                    raise
                await trio.sleep(delay)
                delay = min(2 * delay, _RECONNECT_MAX_DELAY_S)
                continue
            return await self.attach(channel)


async def _hold_connection(
    channel: SecureChannel,
    *,
    task_status: trio.TaskStatus[tuple[RpcClient, trio.CancelScope]],
) -> None:
    from transport.rpc import open_rpc_client

    with trio.CancelScope() as scope:
        async with channel, open_rpc_client(channel) as rpc:
            task_status.started((rpc, scope))
            await trio.sleep_forever()


#: Backoff between failover connection attempts that reached no enclave (seconds): an
#: ingress learns a replica died within its health interval (0.5 s) or at once on a refused
#: connect, so a few short retries find a live one.
_RECONNECT_FIRST_DELAY_S: Final = 0.02
_RECONNECT_MAX_DELAY_S: Final = 0.5

#: PCRs a failover's fresh attestation must repeat: the image and the models it serves.
_PINNED_PCRS: Final = (0, 16)


class _NotTheSameEnclave(Exception):
    """A failover's enclave passed the policy but shows another PCR0 or PCR16."""


def _pinned(verifier: DocumentVerifier, pinned: PeerAttestation) -> DocumentVerifier:
    """``verifier``, plus: PCR0 and PCR16 equal to ``pinned``'s (both absent also counts)."""

    def verify(document: bytes, *, nonce: bytes) -> PeerAttestation:
        peer = verifier(document, nonce=nonce)
        for index in _PINNED_PCRS:
            want, got = pinned.pcrs.get(index), peer.pcrs.get(index)
            if (want is None) != (got is None) or (
                want is not None and got is not None and not hmac.compare_digest(want, got)
            ):
                raise _NotTheSameEnclave(f"PCR{index} differs from the enclave first verified")
        return peer

    return verify


def make_verifier(roots: Sequence[x509.Certificate], policy: Policy) -> DocumentVerifier:
    """A channel ``DocumentVerifier`` from trust roots (x509 certificates) and a Policy."""
    from attest.channel import channel_verifier
    from attest.verify import Verifier

    return channel_verifier(Verifier(list(roots)), policy)


def policy_for(
    *,
    pcr0: bytes | str | None = None,
    model_digests: Sequence[bytes | str] | None = None,
    extra_pcrs: Mapping[int, bytes] | None = None,
    allow_debug: bool = False,
    max_age_s: float | None = 300.0,
) -> Policy:
    """An ``attest.policy.Policy`` pinning PCR0 and/or the served models (PCR16).

    ``model_digests`` are the SHA-384 digests of the models the server loads, in its
    configuration order (PCR16 is their extend chain, see ``models.server.expected_pcr16``).
    """
    from attest.policy import MeasurementSet, Policy
    from models.server import expected_pcr16

    pcrs: dict[int, bytes] = dict(extra_pcrs or {})
    if pcr0 is not None:
        pcrs[0] = bytes.fromhex(pcr0) if isinstance(pcr0, str) else pcr0
    if model_digests is not None:
        pcrs[16] = expected_pcr16(
            [bytes.fromhex(d) if isinstance(d, str) else d for d in model_digests]
        )
    if not pcrs:
        raise ValueError("a policy must pin at least one PCR")
    return Policy(
        measurements=[MeasurementSet(pcrs=pcrs)], allow_debug=allow_debug, max_age_s=max_age_s
    )


class BlockingInferenceClient:
    """The same client for plain (non-async) scripts: a trio loop in a private thread.

    ::

        with BlockingInferenceClient("127.0.0.1:5005", verifier=verifier) as client:
            print(client.list_models())
            out = client.infer("digits", {"pixels": x[:1]})

    Takes the arguments of :func:`open_inference_client` (but not an open trio stream) and
    raises the same errors.
    """

    def __init__(
        self,
        endpoint: str | VsockAddr,
        *,
        verifier: DocumentVerifier,
        suites: Sequence[Suite] | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._endpoint = endpoint
        self._verifier = verifier
        self._suites = suites
        self._connect_timeout_s = connect_timeout_s
        self._timeout_s = timeout_s
        self._token: trio.lowlevel.TrioToken | None = None
        self._client: InferenceClient | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, daemon=True)

    def _thread_main(self) -> None:
        async def amain() -> None:
            self._stop = trio.Event()
            try:
                async with open_inference_client(
                    self._endpoint,
                    verifier=self._verifier,
                    suites=self._suites,
                    connect_timeout_s=self._connect_timeout_s,
                    timeout_s=self._timeout_s,
                ) as client:
                    self._client = client
                    self._token = trio.lowlevel.current_trio_token()
                    self._started.set()
                    await self._stop.wait()
            except BaseException as exc:
                self._error = exc
                self._started.set()

        trio.run(amain)

    def __enter__(self) -> BlockingInferenceClient:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and stop the loop thread."""
        if self._token is not None and self._stop is not None:
            stop = self._stop
            try:
                trio.from_thread.run_sync(stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._token = None
        self._thread.join(timeout=10)

    def _run(self, fn: Callable[[InferenceClient], Awaitable[_T]]) -> _T:
        client = self._client
        if self._token is None or client is None:
            raise RuntimeError("client is not open")
        return trio.from_thread.run(fn, client, trio_token=self._token)

    @property
    def attestation(self) -> PeerAttestation:
        """The verified attestation of the enclave."""
        if self._client is None:
            raise RuntimeError("client is not open")
        return self._client.attestation

    def list_models(self) -> list[ModelInfo]:
        """The server's catalog."""
        return self._run(lambda client: client.list_models())

    def infer(self, model: str, inputs: Inputs) -> dict[str, Array]:
        """One request (see :meth:`InferenceClient.infer`)."""
        return self._run(lambda client: client.infer(model, inputs))

    def stream(self, model: str, inputs: Iterable[Inputs]) -> list[dict[str, Array]]:
        """Stream all ``inputs``; returns the outputs in order."""
        items = list(inputs)

        async def collect(client: InferenceClient) -> list[dict[str, Array]]:
            return [out async for out in client.stream(model, items)]

        return self._run(collect)

    def embed(self, model: str, texts: Sequence[str | bytes]) -> Embeddings:
        """Embed texts with a text model (see :meth:`InferenceClient.embed`)."""
        return self._run(lambda client: client.embed(model, texts))

    def embed_stream(
        self, model: str, batches: Iterable[Sequence[str | bytes]]
    ) -> list[Embeddings]:
        """Stream all ``batches`` of texts; returns one :class:`Embeddings` per batch, in order."""
        items = list(batches)

        async def collect(client: InferenceClient) -> list[Embeddings]:
            return [out async for out in client.embed_stream(model, items)]

        return self._run(collect)
