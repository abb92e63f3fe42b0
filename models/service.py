"""The inference service: the RPC methods the server answers on each attested channel.

Methods (msgpack messages, tensors as ``{dtype, shape, data}``; see :mod:`models.tensors`):

``catalog`` (unary)
    request ``{}`` -> ``{"models": [ModelInfo...]}``: name, availability (and why not),
    SHA-384 digest, size, inputs and outputs with dtypes and shapes.
``infer`` (unary)
    request ``{"model": NAME, "inputs": {NAME: tensor}}`` -> ``{"outputs": {NAME: tensor}}``.
``stream`` (streaming; metadata ``{"model": NAME}``)
    the client sends ``{"inputs": {...}}`` messages (or ``{"batch": [{...}, ...]}``: inputs it
    had ready, coalesced into one message) and ends its side; the server answers each with
    ``{"outputs": {...}}`` (``{"batch": [...]}``) in order, then ends. Messages already waiting
    are run together (one batched ``session.run``); flow control of the RPC layer gives
    backpressure both ways, and cancelling the stream stops its work.

Errors end only the stream they concern, with a stable code (``not_found``, ``unavailable``,
``invalid_argument``, ``deadline_exceeded``, ``resource_exhausted``, ``internal``) and a message
that says what was wrong; other streams and the connection carry on.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog
import trio

from models.engine import ModelEngine, concat_inputs, split_outputs
from models.errors import (
    InferenceError,
    InvalidInputError,
    ModelError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from models.tensors import Array, decode_tensors, encode_tensors
from transport.rpc import RpcError

__all__ = ["ModelEntry", "InferenceService", "ServerStream", "METHODS"]

log = structlog.get_logger()

METHODS: Final = ("catalog", "infer", "stream")
#: Longest wait for a client to accept an answer (credit) before the stream is failed (s).
_SEND_TIMEOUT_S: Final = 30.0
#: Most items one coalesced stream message may carry (the client sends at most 64).
MAX_ITEMS_PER_MESSAGE: Final = 256
#: Messages read ahead of the one being run on a stream (what can be batched together).
_STREAM_READ_AHEAD: Final = 64


class ServerStream(Protocol):
    """What the service needs of a server-side RPC stream (transport.rpc's RpcStream)."""

    @property
    def method(self) -> str: ...

    @property
    def metadata(self) -> Mapping[str, Any]: ...

    async def send(self, message: Any, *, end: bool = False) -> None: ...

    async def receive(self) -> Any: ...

    def __aiter__(self) -> AsyncIterator[Any]: ...


@dataclass(slots=True)
class ModelEntry:
    """A configured model: loaded (``engine`` set) or unavailable (``reason`` set)."""

    name: str
    digest: bytes | None = None
    size: int | None = None
    engine: ModelEngine | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "available": self.engine is not None,
            "digest": self.digest.hex() if self.digest else None,
            "size": self.size,
            "reason": self.reason,
        }
        if self.engine is not None:
            out.update(self.engine.signature.to_wire())
            out["batchable"] = self.engine.signature.batchable
        else:
            out.update({"inputs": [], "outputs": [], "batchable": False})
        return out


def _rpc_error(exc: ModelError) -> RpcError:
    return RpcError(exc.code, str(exc))


class InferenceService:
    """Dispatches RPC streams to the models (pass :meth:`handle` to ``serve_rpc``)."""

    def __init__(
        self,
        models: Mapping[str, ModelEntry],
        *,
        max_request_bytes: int = 16 << 20,
        max_concurrent_requests: int = 256,
    ) -> None:
        self.models = dict(models)
        self.max_request_bytes = max_request_bytes
        self._limiter = trio.CapacityLimiter(max_concurrent_requests)

    async def _acquire(self) -> None:
        """A request slot (concurrency limit); no scheduling round when one is free."""
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await self._limiter.acquire()

    def catalog(self) -> dict[str, Any]:
        return {"models": [entry.info() for entry in self.models.values()]}

    def _engine(self, name: Any) -> ModelEngine:
        if not isinstance(name, str):
            raise InvalidInputError("request must name a model (a string)")
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFoundError(f"no model named {name[:128]!r}; see the catalog")
        if entry.engine is None:
            raise ModelUnavailableError(f"model {name!r} is unavailable: {entry.reason}")
        return entry.engine

    async def handle(self, stream: ServerStream) -> None:
        """Serve one RPC stream (any ``ModelError`` becomes a per-stream error)."""
        method = stream.method
        try:
            if method == "catalog":
                await stream.receive()
                await _send(stream, self.catalog(), end=True)
            elif method == "infer":
                await self._unary(stream)
            elif method == "stream":
                await self._stream(stream)
            else:
                raise RpcError("unimplemented", f"unknown method {method[:64]!r}")
        except ModelError as exc:
            log.info("inference_failed", method=method, code=exc.code, error=str(exc))
            raise _rpc_error(exc) from None

    async def _unary(self, stream: ServerStream) -> None:
        request = await stream.receive()
        t0 = time.perf_counter()
        if not isinstance(request, Mapping):
            raise InvalidInputError("infer request must be a map with model and inputs")
        engine = self._engine(request.get("model"))
        inputs = decode_tensors(request.get("inputs"), max_bytes=self.max_request_bytes)
        await self._acquire()
        try:
            outputs = await engine.infer(inputs)
        finally:
            self._limiter.release()
        t1 = time.perf_counter()
        await _send(stream, {"outputs": encode_tensors(outputs)}, end=True)
        # Canonical per-request line, at debug level (free when filtered out).
        log.debug(
            "infer_completed",
            model=engine.name,
            run_us=round((t1 - t0) * 1e6, 1),
            session_run_us=round(engine.last_run_s * 1e6, 1),
            send_us=round((time.perf_counter() - t1) * 1e6, 1),
        )

    async def _stream(self, stream: ServerStream) -> None:
        engine = self._engine(stream.metadata.get("model"))
        send_chan, recv_chan = trio.open_memory_channel[Any](_STREAM_READ_AHEAD)

        async def read_ahead() -> None:
            with send_chan:
                try:
                    async for message in stream:
                        await send_chan.send(message)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the worker stopped (it failed the stream): nothing more to read

        t0 = time.perf_counter()
        index = 0
        busy = 0.0
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_ahead)
                with recv_chan:  # closed without a checkpoint, so a failure below is not lost
                    async for first in recv_chan:
                        batch = [first]
                        while len(batch) < _STREAM_READ_AHEAD:
                            try:
                                batch.append(recv_chan.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        tb = time.perf_counter()
                        index = await self._run_stream_batch(stream, engine, batch, index)
                        busy += time.perf_counter() - tb
        except BaseExceptionGroup as group:
            raise _single(group) from None
        stats = engine.statistics()
        log.info(
            "stream_completed",
            model=engine.name,
            messages=index,
            ms=round((time.perf_counter() - t0) * 1e3, 2),
            busy_ms=round(busy * 1e3, 2),
            runs=stats.runs,
            threaded_runs=stats.threaded_runs,
            largest_batch=stats.largest_batch,
            run_cost_us=round(engine.expected_run_s(1) * 1e6, 1),
        )

    async def _run_stream_batch(
        self, stream: ServerStream, engine: ModelEngine, batch: list[Any], index: int
    ) -> int:
        """Run the messages waiting on a stream together; answer each, in order.

        A message is ``{"inputs": {...}}`` (one item, answered with ``{"outputs": {...}}``) or
        ``{"batch": [{...}, ...]}`` (items a client coalesced, answered with
        ``{"batch": [outputs, ...]}``). Items are numbered across the stream for errors.
        """
        messages: list[tuple[bool, int]] = []  # (is a batch message, its item count)
        items: list[dict[str, Array]] = []
        sizes: list[int] = []
        failure: InvalidInputError | None = None
        for message in batch:
            try:
                is_batch, raw_items = _message_items(message)
                budget = self.max_request_bytes
                decoded: list[tuple[dict[str, Array], int]] = []
                for raw in raw_items:
                    where = f"stream message {index + len(items) + len(decoded)}"
                    try:
                        inputs = decode_tensors(raw, max_bytes=budget)
                        decoded.append((inputs, engine.signature.validate(inputs)))
                    except InvalidInputError as exc:
                        raise InvalidInputError(f"{where}: {exc}") from None
                    budget -= sum(a.nbytes for a in inputs.values())
            except InvalidInputError as exc:
                # Answer the valid messages before it, then fail the stream at this one.
                failure = exc
                break
            messages.append((is_batch, len(decoded)))
            items.extend(d[0] for d in decoded)
            sizes.extend(d[1] for d in decoded)
        # Consecutive items with the same non-batch shapes run as one request.
        outs: list[dict[str, Array]] = []
        for group in _group_compatible(items, sizes, engine):
            members = [items[i] for i in group]
            await self._acquire()
            try:
                if len(members) == 1:
                    outs.append(await engine.infer(members[0], join_batches=False))
                else:
                    merged = await engine.infer(concat_inputs(members), join_batches=False)
                    outs.extend(split_outputs(merged, [sizes[i] for i in group]))
            finally:
                self._limiter.release()
        pos = 0
        for is_batch, count in messages:
            mine = outs[pos : pos + count]
            pos += count
            if is_batch:
                await _send(stream, {"batch": [encode_tensors(o) for o in mine]})
            else:
                await _send(stream, {"outputs": encode_tensors(mine[0])})
        if failure is not None:
            raise failure
        return index + len(items)


def _message_items(message: Any) -> tuple[bool, list[Any]]:
    """The items of a stream message (see :meth:`InferenceService._run_stream_batch`)."""
    if isinstance(message, Mapping) and len(message) == 1:
        if "inputs" in message:
            return False, [message["inputs"]]
        items = message.get("batch")
        if isinstance(items, list) and 0 < len(items) <= MAX_ITEMS_PER_MESSAGE:
            return True, items
    raise InvalidInputError(
        f"expected a map with only 'inputs', or 'batch' (a list of 1-{MAX_ITEMS_PER_MESSAGE})"
    )


async def _send(stream: ServerStream, message: Any, *, end: bool = False) -> None:
    """Send shielded from cancellation, bounded in time.

    transport.rpc fails the whole connection when a write is interrupted part-way (a partial
    frame would be on the wire), and a client's CANCEL cancels our handler at any await: an
    answer being written must not take the client's other streams down with it. A cancelled
    stream still ends promptly (the RPC layer wakes a sender parked on credit with an error).
    """
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + _SEND_TIMEOUT_S
        await stream.send(message, end=end)
    if scope.cancelled_caught:
        raise InferenceError("the client did not read its answers in time")


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error of a two-task nursery (the other task was cancelled by it)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for kind in (ModelError, RpcError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0] if len(leaves) == 1 else group


def _group_compatible(
    decoded: list[dict[str, Array]], sizes: list[int], engine: ModelEngine
) -> list[list[int]]:
    """Split a run of stream messages into consecutive groups that can run as one batch."""
    if not engine.signature.batchable:
        return [[i] for i in range(len(decoded))]
    groups: list[list[int]] = []
    cap = engine.config.max_batch
    key_prev: object = None
    total = 0
    for i, inputs in enumerate(decoded):
        key = tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in inputs.items()))
        if groups and key == key_prev and total + sizes[i] <= cap:
            groups[-1].append(i)
            total += sizes[i]
        else:
            groups.append([i])
            total = sizes[i]
        key_prev = key
    return groups
