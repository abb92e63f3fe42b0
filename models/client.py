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

Errors: a server-side refusal raises the matching :mod:`models.errors` class (unknown model:
``ModelNotFoundError``, bad input: ``InvalidInputError``...); a failed attestation or any
tampering with the bytes on the way raises ``transport.errors.AuthenticationFailed``; a peer
that goes away raises a ``TransportError``/``trio.BrokenResourceError``. No result is returned
unless it arrived intact over the verified channel.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import trio

from models.errors import InferenceError, InvalidInputError, ModelError, error_from_code
from models.tensors import Array, TensorSpec, decode_tensors, encode_tensors
from transport.errors import LocalProtocolError
from transport.rpc import RpcError

__all__ = [
    "ModelInfo",
    "InferenceClient",
    "open_inference_client",
    "BlockingInferenceClient",
    "make_verifier",
    "policy_for",
    "parse_endpoint",
    "STREAM_IN_FLIGHT",
]

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

    @classmethod
    def from_wire(cls, obj: Any) -> ModelInfo:
        if not isinstance(obj, Mapping):
            raise InferenceError("malformed catalog entry")
        return cls(
            name=str(obj.get("name")),
            available=bool(obj.get("available")),
            digest=obj.get("digest"),
            size=obj.get("size"),
            inputs=tuple(TensorSpec.from_wire(s) for s in obj.get("inputs") or ()),
            outputs=tuple(TensorSpec.from_wire(s) for s in obj.get("outputs") or ()),
            batchable=bool(obj.get("batchable")),
            reason=obj.get("reason"),
        )


def _map_error(exc: RpcError) -> ModelError:
    return error_from_code(exc.code, exc.message)


def _outputs(answer: Any) -> dict[str, Array]:
    if not isinstance(answer, Mapping) or "outputs" not in answer:
        raise InferenceError("malformed answer from the server")
    return decode_tensors(answer["outputs"], max_bytes=MAX_ANSWER_BYTES, what="outputs")


class InferenceClient:
    """A connected, attested client (use :func:`open_inference_client`)."""

    def __init__(self, rpc: Any, channel: Any) -> None:
        self._rpc = rpc
        self._channel = channel

    @property
    def attestation(self) -> Any:
        """The verified :class:`transport.channel.PeerAttestation` of the enclave."""
        return self._channel.peer

    async def list_models(self) -> list[ModelInfo]:
        """The server's catalog (available and unavailable models)."""
        try:
            answer = await self._rpc.call("catalog", {})
        except RpcError as exc:
            raise _map_error(exc) from None
        models = answer.get("models") if isinstance(answer, Mapping) else None
        if not isinstance(models, list):
            raise InferenceError("malformed catalog")
        return [ModelInfo.from_wire(m) for m in models]

    async def infer(self, model: str, inputs: Mapping[str, Any]) -> dict[str, Array]:
        """One request: ``inputs`` name -> array; returns output name -> array."""
        request = {"model": model, "inputs": encode_tensors(inputs)}
        try:
            answer = await self._rpc.call("infer", request)
        except RpcError as exc:
            raise _map_error(exc) from None
        except LocalProtocolError as exc:  # refused before sending (message size cap)
            raise InvalidInputError(
                f"request too large for one message ({exc}); exceeds the limit, "
                "split it or use stream()"
            ) from None
        return _outputs(answer)

    async def stream(
        self,
        model: str,
        inputs: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        *,
        in_flight: int = STREAM_IN_FLIGHT,
        coalesce_bytes: int = COALESCE_BYTES,
    ) -> AsyncIterator[dict[str, Array]]:
        """Stream ``inputs`` through ``model``; yields one output map per input, in order.

        Up to ``in_flight`` messages are outstanding at once (pipelining, so the enclave can
        batch them); the RPC layer's credits give backpressure. Inputs of a plain (non-async)
        iterable that are ready together are coalesced into one message up to
        ``coalesce_bytes`` of tensor data (0 disables it): every message costs a round of
        framing, encryption and scheduling on both sides, whatever its size. Leaving the loop
        early cancels the stream on the server (wrap in ``contextlib.aclosing`` to do it
        promptly).
        """
        if not 1 <= in_flight <= 16:
            raise ValueError("in_flight must be between 1 and 16 (the RPC window)")
        source: Iterator[Mapping[str, Any]] | AsyncIterator[Mapping[str, Any]] = (
            aiter(inputs) if isinstance(inputs, AsyncIterable) else iter(inputs)
        )
        async with self._rpc.open_stream("stream", {"model": model}) as st:
            pending: deque[int] = deque()  # per outstanding message: 0 single, else batch size
            exhausted = False
            try:
                while True:
                    while not exhausted and len(pending) < in_flight:
                        group, exhausted = await _next_group(source, coalesce_bytes)
                        if group:
                            await _send_group(st, group)
                            pending.append(len(group) if len(group) > 1 else 0)
                        if exhausted:
                            await st.send_end()
                    if not pending:
                        break
                    try:
                        answer = await st.receive()
                    except trio.EndOfChannel:
                        raise InferenceError("server ended the stream early") from None
                    count = pending.popleft()
                    if count == 0:
                        yield _outputs(answer)
                        continue
                    batch = answer.get("batch") if isinstance(answer, Mapping) else None
                    if not isinstance(batch, list) or len(batch) != count:
                        raise InferenceError("malformed batch answer from the server")
                    for outputs in batch:
                        yield _outputs({"outputs": outputs})
                try:
                    extra = await st.receive()
                except trio.EndOfChannel:
                    return
                raise InferenceError(f"server sent an unexpected extra message: {type(extra)}")
            except RpcError as exc:
                raise _map_error(exc) from None


async def _next_group(
    source: Iterator[Mapping[str, Any]] | AsyncIterator[Mapping[str, Any]],
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


async def _send_group(st: Any, group: list[dict[str, Any]]) -> None:
    message = {"inputs": group[0]} if len(group) == 1 else {"batch": group}
    try:
        await st.send(message)
    except LocalProtocolError as exc:  # refused before sending (message size cap)
        raise InvalidInputError(
            f"stream input too large for one message ({exc}); exceeds the limit, "
            "send smaller chunks"
        ) from None


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint must be HOST:PORT, got {endpoint!r}")
    return host.strip("[]"), int(port)


@asynccontextmanager
async def open_inference_client(
    stream_or_endpoint: trio.abc.Stream | str | Any,
    *,
    verifier: Any,
    suites: Sequence[Any] | None = None,
    connect_timeout_s: float = 10.0,
) -> AsyncIterator[InferenceClient]:
    """Connect (TCP ``"HOST:PORT"`` to the ingress, a ``VsockAddr``, or an open stream),
    verify the enclave's attestation with ``verifier`` and yield an :class:`InferenceClient`.

    Args:
        verifier: a ``transport.channel.DocumentVerifier`` (see :func:`make_verifier`).
        suites: channel suites to offer (default: hybrid ML-KEM-768+X25519, then X25519).

    Raises:
        AuthenticationFailed: the attestation did not verify or the handshake was tampered with.
    """
    from transport.channel import Suite, connect_channel
    from transport.rpc import open_rpc_client

    offered = list(suites) if suites is not None else [Suite.MLKEM768_X25519, Suite.X25519]
    with trio.fail_after(connect_timeout_s):
        if isinstance(stream_or_endpoint, str):
            host, port = parse_endpoint(stream_or_endpoint)
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        elif isinstance(stream_or_endpoint, trio.abc.Stream):
            stream = stream_or_endpoint
        else:
            from transport.vsock import open_vsock_stream

            stream = await open_vsock_stream(stream_or_endpoint)
        try:
            channel = await connect_channel(stream, verifier=verifier, suites=offered)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
            raise
    async with channel, open_rpc_client(channel) as rpc:
        yield InferenceClient(rpc, channel)


def make_verifier(roots: Sequence[Any], policy: Any) -> Any:
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
) -> Any:
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
    """

    def __init__(self, endpoint: Any, *, verifier: Any, suites: Sequence[Any] | None = None):
        self._endpoint = endpoint
        self._verifier = verifier
        self._suites = suites
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
                    self._endpoint, verifier=self._verifier, suites=self._suites
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

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._token is None or self._client is None:
            raise RuntimeError("client is not open")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    @property
    def attestation(self) -> Any:
        assert self._client is not None
        return self._client.attestation

    def list_models(self) -> list[ModelInfo]:
        return list(self._call(self._client_method("list_models")))

    def infer(self, model: str, inputs: Mapping[str, Any]) -> dict[str, Array]:
        return dict(self._call(self._client_method("infer"), model, inputs))

    def stream(self, model: str, inputs: Iterable[Mapping[str, Any]]) -> list[dict[str, Array]]:
        """Stream all ``inputs``; returns the outputs in order."""
        items = list(inputs)

        async def collect() -> list[dict[str, Array]]:
            assert self._client is not None
            return [out async for out in self._client.stream(model, items)]

        result: list[dict[str, Array]] = self._call(collect)
        return result

    def _client_method(self, name: str) -> Any:
        assert self._client is not None
        return getattr(self._client, name)
