"""The inference service: the RPC methods the server answers on each attested channel.

Methods (msgpack messages, tensors as ``{dtype, shape, data}``; see :mod:`models.tensors`),
dispatched by :func:`transport.rpc.route`:

``catalog`` (unary, answered inline in the connection's reader)
    request ``{}`` -> ``{"models": [ModelInfo...]}``: name, availability (and why not),
    SHA-384 digest, size, inputs and outputs with dtypes and shapes.
``infer`` (unary)
    request ``{"model": NAME, "inputs": {NAME: tensor}}`` -> ``{"outputs": {NAME: tensor}}``.
``stream`` (streaming; metadata ``{"model": NAME}``)
    the client sends ``{"inputs": {...}}`` messages (or ``{"batch": [{...}, ...]}``: inputs it
    had ready, coalesced into one message) and ends its side; the server answers each with
    ``{"outputs": {...}}`` (``{"batch": [...]}``) in order, then ends. Messages already waiting
    are run together (one batched ``session.run``).

``embed`` (unary) and ``embed_stream`` (streaming), for text models
    texts in (UTF-8), embeddings out: see :mod:`models.text.wire` for the messages and
    :mod:`models.text.engine` for how concurrent requests are batched by length.

Errors end only the stream they concern, with a stable code (``not_found``, ``unavailable``,
``invalid_argument``, ``deadline_exceeded``, ``resource_exhausted``, ``internal``) and a message
that says what was wrong; other streams and the connection carry on.

Memory, theory of operation
---------------------------
What a client can make the enclave hold is bounded in bytes, so that no client, however it
behaves, can exhaust the enclave's memory (issue 10, item 4):

* the RPC layer holds at most one stream's receive window of input that nobody took yet
  (transport.rpc's flow control: credit goes back only as the handler takes messages);
* a handler takes messages off its stream only when it is about to run them: there is no
  read-ahead queue of our own. What it holds (the batch being run, then its answers until the
  client has read them) is counted in a :class:`~models._budget.ByteBudget` at three levels:
  the stream's batch (``stream_buffer_bytes``), the connection (``connection_buffer_bytes``)
  and the server (``server_buffer_bytes``). A handler waits for room before it runs more, so a
  client that does not read its answers stops itself, not the others, and the credit it would
  need to send more is never returned;
* a handler learns a message's size only once it took it (the RPC layer then returns its
  credit), so a handler waiting for room holds one message outside the budgets. Waiters are
  bounded (:data:`MAX_WAITING_PER_CONNECTION`, :data:`MAX_WAITING_PER_SERVER`); a stream that
  would be one more fails with ``resource_exhausted`` and its message is dropped at once;
* a batch takes what already waits on its stream only while every budget has room, in one
  synchronous step, so all batches together overshoot the server budget by one message at most;
* answers a client does not read within ``send_timeout_s`` fail the stream, and a stream with no
  input for ``idle_timeout_s`` is closed: both give their memory back.

So the service holds at most ``server_buffer_bytes`` + (``MAX_WAITING_PER_SERVER`` + 1) messages,
plus the answers of the runs in progress (charged when they exist: at most ``max_batch`` rows of
outputs per run), whatever the clients do.

The service serves two kinds of model: a :class:`ModelEntry`'s engine is a
:class:`~models.engine.ModelEngine` (tensors in, tensors out: ``infer``, ``stream``) or a
:class:`~models.text.engine.TextEngine` (texts in, embeddings out: ``embed``, ``embed_stream``),
each kind under the same budgets and timeouts; a request for one kind through the other's
method is ``invalid_argument``. Text engines run a task of their own: start them with
:meth:`InferenceService.run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog
import trio

from models._budget import BudgetStatistics, ByteBudget, Lease
from models.engine import ModelEngine, concat_inputs, split_outputs
from models.errors import (
    InferenceTimeoutError,
    InvalidInputError,
    ModelError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from models.tensors import MAX_RANK, MAX_TENSORS, Array, decode_tensors, encode_tensors
from models.text.engine import TextEngine, TextRequest
from models.text.errors import TextInputError
from models.text.wire import EMBED, EMBED_STREAM, encode_answer, request_texts
from transport.rpc import DEFER, Handler, Router, RpcError, route, unary_inline

__all__ = [
    "ModelEntry",
    "InferenceService",
    "ServerStream",
    "ServiceLimits",
    "METHODS",
    "MAX_ITEMS_PER_MESSAGE",
    "DEFAULT_STREAM_BUFFER_BYTES",
    "DEFAULT_CONNECTION_BUFFER_BYTES",
    "DEFAULT_SERVER_BUFFER_BYTES",
    "DEFAULT_SEND_TIMEOUT_S",
    "DEFAULT_IDLE_TIMEOUT_S",
    "MAX_WAITING_PER_CONNECTION",
    "MAX_WAITING_PER_SERVER",
    "message_bytes",
]

log = structlog.get_logger()

METHODS: Final = ("catalog", "infer", "stream", EMBED, EMBED_STREAM)
#: Most items one coalesced stream message may carry (the client sends at most 64).
MAX_ITEMS_PER_MESSAGE: Final = 256
#: Most messages run together on one stream (what the client pipelines, with room to spare;
#: the byte budget usually stops a batch first).
MAX_MESSAGES_PER_RUN: Final = 64
#: Input one stream takes off the wire to run as one batch (4 MiB: one message at the RPC's
#: message cap, so a large request runs alone and small ones batch up to that much).
DEFAULT_STREAM_BUFFER_BYTES: Final = 4 << 20
#: Bytes held for one connection's streams together (16 MiB: four full batches in progress).
DEFAULT_CONNECTION_BUFFER_BYTES: Final = 16 << 20
#: Bytes held for all connections together (64 MiB: an eighth of the 512 MiB enclave, the rest
#: being the interpreter, onnxruntime, the models and the RPC layer's windows).
DEFAULT_SERVER_BUFFER_BYTES: Final = 64 << 20
#: How long an answer may wait for the client to read it before its stream fails (seconds).
DEFAULT_SEND_TIMEOUT_S: Final = 30.0
#: How long a stream may wait for the client's next message before it is closed (seconds): a
#: client that pauses longer opens a new stream.
DEFAULT_IDLE_TIMEOUT_S: Final = 60.0
#: Streams of one connection that may wait for buffer space, each holding the one message it
#: took: more are refused with ``resource_exhausted`` (a waiter's message is memory in hand).
MAX_WAITING_PER_CONNECTION: Final = 4
#: The same for the whole server (16 x a 4 MiB message: 64 MiB at most in hand while waiting).
MAX_WAITING_PER_SERVER: Final = 16
#: Bytes counted for each container or scalar of a message, beyond the bytes it carries: a
#: decoded msgpack object costs tens of bytes of Python memory however small it is on the wire.
_OBJECT_OVERHEAD: Final = 64
#: Most objects walked when sizing a message; a message with more is counted as this many
#: objects, 4 MiB of overhead (as much as the RPC layer's message cap lets it carry).
_MAX_OBJECTS_WALKED: Final = 1 << 16
#: Most texts of a message sized directly (4x the default per-request cap); more are walked.
_MAX_TEXTS_SIZED: Final = 1024


class ServerStream(Protocol):
    """What the service needs of a server-side RPC stream (transport.rpc's RpcStream)."""

    @property
    def method(self) -> str: ...

    @property
    def metadata(self) -> Mapping[str, Any]: ...

    async def send(self, message: Any, *, end: bool = False) -> None: ...

    async def receive(self) -> Any: ...

    def receive_nowait(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    """Bounds on what clients can make the service hold or wait for (see the module docstring).

    Attributes:
        max_request_bytes: tensor bytes in one request or stream message.
        max_concurrent_requests: model runs in progress at once, over all connections.
        stream_buffer_bytes: input bytes one stream takes off the wire to run as one batch.
        connection_buffer_bytes: bytes (inputs being run, answers not yet read) held for one
            connection's streams together.
        server_buffer_bytes: the same for every connection together.
        send_timeout_s: how long an answer may wait for the client to read it (credit).
        idle_timeout_s: how long a stream may wait for the client's next message.
    """

    max_request_bytes: int = 16 << 20
    max_concurrent_requests: int = 256
    stream_buffer_bytes: int = DEFAULT_STREAM_BUFFER_BYTES
    connection_buffer_bytes: int = DEFAULT_CONNECTION_BUFFER_BYTES
    server_buffer_bytes: int = DEFAULT_SERVER_BUFFER_BYTES
    send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in (
            "max_request_bytes",
            "max_concurrent_requests",
            "stream_buffer_bytes",
            "connection_buffer_bytes",
            "server_buffer_bytes",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.stream_buffer_bytes <= self.connection_buffer_bytes <= self.server_buffer_bytes:
            raise ValueError(
                "buffers must nest: stream_buffer_bytes <= connection_buffer_bytes <= "
                "server_buffer_bytes"
            )
        for name in ("send_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value <= 3600:
                raise ValueError(f"{name} must be in (0, 3600] seconds, got {value!r}")


@dataclass(slots=True)
class ModelEntry:
    """A configured model: loaded (``engine`` set) or unavailable (``reason`` set)."""

    name: str
    digest: bytes | None = None
    size: int | None = None
    #: Tensors in and out (ModelEngine) or texts in, embeddings out (TextEngine).
    engine: ModelEngine | TextEngine | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        """Whether the model is loaded and served."""
        return self.engine is not None

    def info(self) -> dict[str, Any]:
        """The catalog entry (wire form)."""
        out: dict[str, Any] = {
            "name": self.name,
            "available": self.engine is not None,
            "digest": self.digest.hex() if self.digest else None,
            "size": self.size,
            "reason": self.reason,
        }
        if isinstance(self.engine, TextEngine):
            out.update(self.engine.catalog_fields())
        elif self.engine is not None:
            out["kind"] = "tensor"
            out.update(self.engine.signature.to_wire())
            out["batchable"] = self.engine.signature.batchable
        else:
            out.update({"inputs": [], "outputs": [], "batchable": False})
        return out


class InferenceService:
    """The models and the RPC methods that serve them.

    Serve each connection with its own handler: ``serve_rpc(channel,
    service.connection_handler())``; the connection's byte budget lives in that handler.

    Args:
        models: model name -> entry (loaded or unavailable).
        limits: memory and time bounds (default :class:`ServiceLimits`); the keyword arguments
            ``max_request_bytes`` and ``max_concurrent_requests`` override its fields.
    """

    def __init__(
        self,
        models: Mapping[str, ModelEntry],
        *,
        limits: ServiceLimits | None = None,
        max_request_bytes: int | None = None,
        max_concurrent_requests: int | None = None,
    ) -> None:
        base = limits or ServiceLimits()
        overrides: dict[str, int] = {}
        if max_request_bytes is not None:
            overrides["max_request_bytes"] = max_request_bytes
        if max_concurrent_requests is not None:
            overrides["max_concurrent_requests"] = max_concurrent_requests
        if overrides:
            base = ServiceLimits(**{**_fields(base), **overrides})
        self.limits = base
        self.models = dict(models)
        self._limiter = trio.CapacityLimiter(base.max_concurrent_requests)
        self._budget = ByteBudget(base.server_buffer_bytes, max_waiters=MAX_WAITING_PER_SERVER)

    @property
    def max_request_bytes(self) -> int:
        return self.limits.max_request_bytes

    def statistics(self) -> BudgetStatistics:
        """Bytes the service holds for all connections now, and the most it ever held."""
        return self._budget.statistics()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run what the models need in the background (each text model's engine) until
        cancelled; ``started`` once they all serve. Start it before serving connections:
        ``await nursery.start(service.run)``."""
        async with trio.open_nursery() as nursery:
            for entry in self.models.values():
                if isinstance(entry.engine, TextEngine):
                    await nursery.start(entry.engine.run)
            task_status.started()
            await trio.sleep_forever()

    def catalog(self) -> dict[str, Any]:
        """The catalog answer: every configured model, available or not."""
        return {"models": [entry.info() for entry in self.models.values()]}

    def connection_handler(self) -> Router:
        """The RPC handler for one connection (its own byte budget, nested in the server's)."""
        conn = _ConnectionBudget(
            ByteBudget(
                self.limits.connection_buffer_bytes,
                max_waiters=MAX_WAITING_PER_CONNECTION,
                parent=self._budget,
            )
        )
        return route(
            {
                "catalog": unary_inline(lambda _request, _stream: self.catalog()),
                "infer": unary_inline(
                    lambda request, _stream: self._infer_now(conn, request),
                    otherwise=self._method(conn, self._infer),
                ),
                "stream": self._method(conn, self._stream),
                EMBED: self._method(conn, self._embed),
                EMBED_STREAM: self._method(conn, self._embed_stream),
            }
        )

    def _method(self, conn: _ConnectionBudget, fn: _Method) -> Handler:
        async def handler(stream: ServerStream) -> None:
            try:
                await fn(conn, stream)
            except ModelError as exc:
                log.info("inference_failed", method=stream.method, code=exc.code, error=str(exc))
                raise RpcError(exc.code, str(exc)) from None

        return handler

    def _served(self, name: object) -> ModelEngine | TextEngine:
        if not isinstance(name, str):
            raise InvalidInputError("request must name a model (a string)")
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFoundError(f"no model named {name[:128]!r}; see the catalog")
        if entry.engine is None:
            raise ModelUnavailableError(f"model {name!r} is unavailable: {entry.reason}")
        return entry.engine

    def _engine(self, name: object) -> ModelEngine:
        engine = self._served(name)
        if isinstance(engine, TextEngine):
            raise InvalidInputError(
                f"model {engine.name!r} takes texts, not tensors: call {EMBED} or "
                f"{EMBED_STREAM} (enclave infer --text)"
            )
        return engine

    def _text_engine(self, name: object) -> TextEngine:
        engine = self._served(name)
        if not isinstance(engine, TextEngine):
            raise InvalidInputError(
                f"model {engine.name!r} takes tensors, not texts: call infer or stream"
            )
        return engine

    async def _acquire_run_slot(self) -> None:
        """A request slot (concurrency limit); no scheduling round when one is free."""
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await self._limiter.acquire()

    async def _receive(self, stream: ServerStream) -> Any:
        """The client's next message, waiting at most ``idle_timeout_s``.

        Raises:
            trio.EndOfChannel: the client ended its side.
            InferenceTimeoutError: nothing arrived in time (the stream is closed).
        """
        try:
            return stream.receive_nowait()  # usually already there: no scheduling round
        except trio.WouldBlock:
            pass
        with trio.move_on_after(self.limits.idle_timeout_s):
            return await stream.receive()
        raise InferenceTimeoutError(
            f"no input for {self.limits.idle_timeout_s:g} s; the stream is closed"
        )

    async def _send(self, stream: ServerStream, message: Any, *, end: bool = False) -> None:
        """Send, bounded by ``send_timeout_s``: a client that does not read its answers fails
        its stream, which frees them.

        Not shielded: a wait for the client's credit sends nothing and is safe to cancel (server
        shutdown, the connection's end), and transport.rpc itself keeps a cancellation from
        cutting a frame (a peer's CANCEL waits for the handler's write; large writes are
        shielded inside the RPC layer).
        """
        timeout = self.limits.send_timeout_s
        with trio.move_on_after(timeout):
            await stream.send(message, end=end)
            return
        raise InferenceTimeoutError(
            f"the client did not read its answers for {timeout:g} s; the stream is closed"
        )

    # -- methods ---------------------------------------------------------------------------

    def _infer_now(self, conn: _ConnectionBudget, request: Any) -> Any:
        """``infer``'s common case, answered in the RPC reader task (no handler task, no hop
        between tasks: about 50 µs of a 500 µs round trip through an enclave here): a small
        model, idle, with room in the budgets. Anything that would have to wait (the budget
        full or with waiters, every request slot taken, the model busy, queued, or too slow to
        run inline) returns DEFER, and :meth:`_infer` takes the request in a task, where it
        may wait. Errors are the same either way.

        The answer is not charged to the byte budget: it goes to the connection's outbox at
        once, which the reader writes before it reads on (a client that does not read stops
        the reader, so answers cannot pile up).
        """
        try:
            if not isinstance(request, Mapping):
                raise InvalidInputError("infer request must be a map with model and inputs")
            engine = self._engine(request.get("model"))
            size = message_bytes(request)
            if not conn.budget.try_acquire(size):
                return DEFER
            try:
                try:
                    self._limiter.acquire_nowait()
                except trio.WouldBlock:
                    return DEFER
                try:
                    t0 = time.perf_counter()
                    inputs = decode_tensors(request.get("inputs"), max_bytes=self.max_request_bytes)
                    outputs = engine.infer_now(inputs)
                finally:
                    self._limiter.release()
            finally:
                conn.budget.release(size)
            if outputs is None:
                return DEFER
            answer = {"outputs": encode_tensors(outputs)}
        except ModelError as exc:
            log.info("inference_failed", method="infer", code=exc.code, error=str(exc))
            raise RpcError(exc.code, str(exc)) from None
        log.debug(
            "infer_completed",
            model=engine.name,
            run_us=round((time.perf_counter() - t0) * 1e6, 1),
            session_run_us=round(engine.last_run_s * 1e6, 1),
            inline=True,
        )
        return answer

    async def _infer(self, conn: _ConnectionBudget, stream: ServerStream) -> None:
        try:
            request = await self._receive(stream)
        except trio.EndOfChannel:
            raise InvalidInputError("infer needs one request") from None
        t0 = time.perf_counter()
        lease = conn.budget.lease()
        try:
            await lease.acquire(message_bytes(request))
            if not isinstance(request, Mapping):
                raise InvalidInputError("infer request must be a map with model and inputs")
            engine = self._engine(request.get("model"))
            inputs = decode_tensors(request.get("inputs"), max_bytes=self.max_request_bytes)
            del request  # the arrays view its bytes; nothing else needs it
            await self._acquire_run_slot()
            try:
                outputs = await engine.infer(inputs)
            finally:
                self._limiter.release()
            t1 = time.perf_counter()
            lease.charge(_nbytes(outputs))
            await self._send(stream, {"outputs": encode_tensors(outputs)}, end=True)
        finally:
            lease.release()
        # Canonical per-request line, at debug level (free when filtered out).
        log.debug(
            "infer_completed",
            model=engine.name,
            run_us=round((t1 - t0) * 1e6, 1),
            session_run_us=round(engine.last_run_s * 1e6, 1),
            send_us=round((time.perf_counter() - t1) * 1e6, 1),
        )

    def _with_waiting(
        self,
        conn: _ConnectionBudget,
        stream: ServerStream,
        lease: Lease,
        first: Any,
        cost: Callable[[Any], int],
    ) -> list[Any]:
        """``first`` and the messages already waiting behind it on ``stream``, to run together.

        Takes them while this stream's batch and every budget above it have room, charging
        each to ``lease`` at ``cost(message)``: the RPC layer returns credit as we take
        messages, so we take only what we will run now.
        """
        batch = [first]
        while (
            lease.bytes < self.limits.stream_buffer_bytes
            and len(batch) < MAX_MESSAGES_PER_RUN
            and conn.budget.has_room()
        ):
            try:
                message = stream.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            lease.charge(cost(message))
            batch.append(message)
        return batch

    async def _stream(self, conn: _ConnectionBudget, stream: ServerStream) -> None:
        engine = self._engine(stream.metadata.get("model"))
        t0 = time.perf_counter()
        index = 0
        busy = 0.0
        while True:
            try:
                first = await self._receive(stream)
            except trio.EndOfChannel:
                break
            lease = conn.budget.lease()
            try:
                await lease.acquire(message_bytes(first))
                batch = self._with_waiting(conn, stream, lease, first, message_bytes)
                del first
                tb = time.perf_counter()
                index = await self._run_stream_batch(stream, engine, batch, index, lease)
                busy += time.perf_counter() - tb
            finally:
                lease.release()
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
        self,
        stream: ServerStream,
        engine: ModelEngine,
        batch: list[Any],
        index: int,
        lease: Lease,
    ) -> int:
        """Run the messages waiting on a stream together; answer each, in order.

        A message is ``{"inputs": {...}}`` (one item, answered with ``{"outputs": {...}}``) or
        ``{"batch": [{...}, ...]}`` (items a client coalesced, answered with
        ``{"batch": [outputs, ...]}``). Items are numbered across the stream for errors.
        Answers are counted in ``lease`` until they are sent.
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
        batch.clear()  # the decoded arrays keep what they need of the messages
        # Consecutive items with the same non-batch shapes run as one request.
        outs: list[dict[str, Array]] = []
        for group in _group_compatible(items, sizes, engine):
            members = [items[i] for i in group]
            await self._acquire_run_slot()
            try:
                if len(members) == 1:
                    result = [await engine.infer(members[0], join_batches=False)]
                else:
                    merged = await engine.infer(concat_inputs(members), join_batches=False)
                    result = split_outputs(merged, [sizes[i] for i in group])
            finally:
                self._limiter.release()
            lease.charge(sum(_nbytes(o) for o in result))
            outs.extend(result)
        items.clear()
        pos = 0
        for is_batch, count in messages:
            mine = outs[pos : pos + count]
            pos += count
            if is_batch:
                await self._send(stream, {"batch": [encode_tensors(o) for o in mine]})
            else:
                await self._send(stream, {"outputs": encode_tensors(mine[0])})
        if failure is not None:
            raise failure
        return index + len(sizes)

    async def _embed(self, conn: _ConnectionBudget, stream: ServerStream) -> None:
        try:
            request = await self._receive(stream)
        except trio.EndOfChannel:
            raise InvalidInputError(f"{EMBED} needs one request") from None
        lease = conn.budget.lease()
        try:
            await lease.acquire(message_bytes(request))
            if not isinstance(request, Mapping):
                raise InvalidInputError(f"{EMBED} request must be a map with model and texts")
            engine = self._text_engine(request.get("model"))
            texts = request_texts(request)
            del request
            # The answer is larger than the texts (1.5 KiB per text for MiniLM): its room is
            # taken before the run, waiting like any input would.
            await lease.acquire(_answer_bytes(engine, texts))
            await self._acquire_run_slot()
            t0 = time.perf_counter()
            try:
                result = await engine.embed(texts)
            finally:
                self._limiter.release()
            del texts
            t1 = time.perf_counter()
            await self._send(stream, encode_answer(result), end=True)
        finally:
            lease.release()
        # Canonical per-request line, at debug level (free when filtered out).
        log.debug(
            "embed_completed",
            model=engine.name,
            texts=len(result),
            embed_us=round((t1 - t0) * 1e6, 1),
            round_us=round(engine.last_round_s * 1e6, 1),
            send_us=round((time.perf_counter() - t1) * 1e6, 1),
        )

    async def _embed_stream(self, conn: _ConnectionBudget, stream: ServerStream) -> None:
        engine = self._text_engine(stream.metadata.get("model"))
        t0 = time.perf_counter()
        index = 0
        while True:
            try:
                first = await self._receive(stream)
            except trio.EndOfChannel:
                break
            lease = conn.budget.lease()
            try:
                await lease.acquire(message_bytes(first))
                await lease.acquire(_answer_bytes(engine, first))  # as in _embed
                # Each message is counted with the answer it will get.
                batch = self._with_waiting(
                    conn,
                    stream,
                    lease,
                    first,
                    lambda message: message_bytes(message) + _answer_bytes(engine, message),
                )
                del first
                index = await self._run_text_batch(stream, engine, batch, index, lease)
            finally:
                lease.release()
        stats = engine.statistics()
        log.info(
            "embed_stream_completed",
            model=engine.name,
            messages=index,
            ms=round((time.perf_counter() - t0) * 1e3, 2),
            rounds=stats.rounds,
            runs=stats.runs,
            largest_round=stats.largest_round,
        )

    async def _run_text_batch(
        self,
        stream: ServerStream,
        engine: TextEngine,
        batch: list[Any],
        index: int,
        lease: Lease,
    ) -> int:
        """Submit the text messages waiting on a stream together (the engine batches their
        texts by length in one round), then answer each, in order.

        A message that breaks a limit fails the stream after the messages before it were
        answered; its error names it (``stream message N: ...``) and keeps its class.
        """
        failure: ModelError | None = None
        requests: list[TextRequest] = []
        await self._acquire_run_slot()
        try:
            for offset, message in enumerate(batch):
                try:
                    requests.append(engine.submit(request_texts(message)))
                except TextInputError as exc:
                    failure = type(exc)(f"stream message {index + offset}: {exc}", index=exc.index)
                    break
                except ModelError as exc:
                    failure = exc
                    break
            batch.clear()
            try:
                for req in requests:
                    result = await engine.wait(req)  # (its room was taken with the message)
                    await self._send(stream, encode_answer(result))
                    index += 1
            finally:
                for req in requests:
                    engine.cancel(req)  # those not answered (an error or cancellation above)
        finally:
            self._limiter.release()
        if failure is not None:
            raise failure
        return index


class _Method(Protocol):
    async def __call__(self, conn: _ConnectionBudget, stream: ServerStream, /) -> None: ...


@dataclass(frozen=True, slots=True)
class _ConnectionBudget:
    """What the streams of one connection share."""

    budget: ByteBudget


def _fields(limits: ServiceLimits) -> dict[str, Any]:
    return {name: getattr(limits, name) for name in ServiceLimits.__dataclass_fields__}


def _nbytes(arrays: Mapping[str, Array]) -> int:
    return sum(int(a.nbytes) for a in arrays.values())


def _answer_bytes(engine: TextEngine, message: object) -> int:
    """What the answer to a text request will hold: a float32 row per text (the count capped
    at the model's limit: more are refused), plus a fixed overhead per text."""
    texts = message.get("texts") if isinstance(message, Mapping) else message
    if not isinstance(texts, list):
        return 0
    count = min(len(texts), engine.embedder.limits.max_texts)
    return _OBJECT_OVERHEAD * (2 + count) + count * 4 * engine.embedder.config.embedding_dim


def message_bytes(message: object) -> int:
    """Memory a decoded message holds, for the byte budgets: the bytes and strings it carries
    plus a fixed overhead per object. Messages of the expected shapes are sized directly (a
    few microseconds, as the unary path needs); anything else is walked, at most
    :data:`_MAX_OBJECTS_WALKED` objects."""
    try:
        return _expected_size(message)
    except _Unexpected:
        return _walked_size(message)


class _Unexpected(Exception):
    """A message not of the shapes :func:`_expected_size` knows (sized by walking it)."""


def _expected_size(message: object) -> int:
    """Size of ``{"model"?, "inputs": {name: tensor}}``, ``{"batch": [{name: tensor}]}`` or
    ``{"model"?, "texts": [bytes | str]}``."""
    if type(message) is not dict or len(message) > 2:
        raise _Unexpected
    total = _OBJECT_OVERHEAD
    for key, value in message.items():
        if key == "inputs":
            total += _tensors_size(value)
        elif key == "texts" and type(value) is list and len(value) <= _MAX_TEXTS_SIZED:
            total += _OBJECT_OVERHEAD * (1 + len(value))
            for text in value:
                if type(text) is not bytes and type(text) is not str:
                    raise _Unexpected
                total += len(text)
        elif key == "batch" and type(value) is list and len(value) <= MAX_ITEMS_PER_MESSAGE:
            total += _OBJECT_OVERHEAD * (1 + len(value))
            for item in value:
                total += _tensors_size(item)
        elif key == "model" and type(value) is str:
            total += 2 * _OBJECT_OVERHEAD + len(value)
        else:
            raise _Unexpected
    return total


def _tensors_size(tensors: object) -> int:
    if type(tensors) is not dict or len(tensors) > MAX_TENSORS:
        raise _Unexpected
    total = _OBJECT_OVERHEAD
    for name, tensor in tensors.items():
        if type(name) is not str or type(tensor) is not dict or len(tensor) != 3:
            raise _Unexpected
        data, shape = tensor.get("data"), tensor.get("shape")
        if type(data) is not bytes or type(shape) is not list or len(shape) > MAX_RANK:
            raise _Unexpected
        # name, the map, its three keys and values, the shape's items; the data's bytes
        total += (9 + len(shape)) * _OBJECT_OVERHEAD + len(name) + len(data)
    return total


def _walk(message: object) -> Iterator[object]:
    stack = [message]
    while stack:
        obj = stack.pop()
        yield obj
        if isinstance(obj, Mapping):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple):
            stack.extend(obj)


def _walked_size(message: object) -> int:
    total = 0
    for count, obj in enumerate(_walk(message)):
        if count == _MAX_OBJECTS_WALKED:
            break
        total += _OBJECT_OVERHEAD
        if isinstance(obj, bytes | bytearray | str):
            total += len(obj)
    return total


def _message_items(message: object) -> tuple[bool, list[Any]]:
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
