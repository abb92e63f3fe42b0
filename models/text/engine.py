"""A text model in the inference service: requests batched by length across clients, run in a
worker thread, with deadlines that stop the work (the trio adapter over
:class:`~models.text.embedder.Embedder`).

Theory of operation
-------------------
A request (one client's texts) is checked against the model's limits at once: a broken limit is
that request's own error, and nothing is queued. Checked requests join a queue. One runner task
(:meth:`TextEngine.run`, started by the service) takes the queued requests as a *round* (up to
``max_round_texts`` texts, whole requests) and hands it to one worker thread, which

1. tokenizes each request (an error, such as a text with no tokens, fails that request only);
2. plans batches by token length over **all** the round's texts
   (:func:`models.text.batching.plan_batches`): texts of different requests with similar
   lengths share a ``session.run``, padded only to their own batch's longest text;
3. runs the batches one after the other and scatters each batch's rows into their requests; a
   request is answered as soon as its last row is in (``TrioToken.run_sync_soon``), not at the
   end of the round.

One round at a time: onnxruntime already has every CPU of the enclave (intra-op threads); two
rounds would only share them. Requests that arrive during a round wait for the next one, which
takes them all: under load the rounds grow and batch better; an idle engine starts a request at
once. So 32 clients sending one text each cost about what one client sending 32 texts costs.

Deadlines: a request waits at most ``timeout_s`` from its arrival (then
:class:`~models.errors.InferenceTimeoutError`). A request that gives up (its deadline, or its
client went away: a cancellation) is *abandoned*: its texts not yet run are skipped, and if the
batch running in onnxruntime holds only abandoned texts it is stopped between two nodes
(``RunOptions.terminate``). A batch shared with a live request runs to its end; a batch is
bounded (``max_batch_tokens`` padded tokens), so that is a bounded wait.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import structlog
import trio

from models.errors import (
    InferenceError,
    InferenceTimeoutError,
    ModelError,
    ModelUnavailableError,
    OverloadedError,
)
from models.text.batching import Batch
from models.text.embeddings import Embeddings
from models.text.errors import TextInputError
from models.text.limits import check_texts

if TYPE_CHECKING:
    from models.text.embedder import Embedder

__all__ = [
    "TextEngineConfig",
    "TextEngineStats",
    "TextEngine",
    "TextRequest",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_MAX_QUEUE_TEXTS",
    "DEFAULT_MAX_ROUND_TEXTS",
]

log = structlog.get_logger()

#: A request's deadline (seconds), from its arrival to its answer.
DEFAULT_TIMEOUT_S: Final = 30.0
#: Texts queued (not yet in a round) before new requests are refused with ``OverloadedError``:
#: 16 full requests, ~40 s of 256-token texts on one CPU.
DEFAULT_MAX_QUEUE_TEXTS: Final = 4096
#: Texts one round takes (whole requests; at least one request). 256 is one full request, so a
#: large request is never split, and a round of short texts stays well under a second.
DEFAULT_MAX_ROUND_TEXTS: Final = 256
#: Rounds expected to take up to this long run inline (in the event loop's thread). Handing a
#: round to a worker thread and back costs two context switches (0.2-0.4 ms on an idle machine,
#: several ms when other processes compete for the CPU): 1-2 % of a 128-token MiniLM run, the
#: whole margin of the 1.05 latency budget. Inline, the loop does no I/O for the round's length;
#: 50 ms bounds that pause (a 128-token text takes ~23 ms on one CPU), and a deadline passing
#: during an inline round is late by that much at most. Longer rounds go to the thread, where
#: a deadline stops onnxruntime mid-run.
DEFAULT_INLINE_MAX_S: Final = 0.05
#: Texts whose UTF-8 size together stays under this are tokenized in the event loop to decide
#: where the round runs (~0.1 ms for a 128-token text); larger rounds go to the thread whole.
_INLINE_PLAN_BYTES: Final = 16 << 10
#: Weight of a new observation in the per-token cost average.
_EWMA_ALPHA: Final = 0.2


@dataclass(frozen=True, slots=True)
class TextEngineConfig:
    """Execution settings of one text model (``server.toml``'s ``[[models]]`` keys)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    max_queue_texts: int = DEFAULT_MAX_QUEUE_TEXTS
    max_round_texts: int = DEFAULT_MAX_ROUND_TEXTS
    #: Join concurrent requests into shared rounds (False: one request per round).
    batching: bool = True
    #: "auto": a round expected to take at most ``inline_max_s`` runs in the event loop's own
    #: thread (no hand-off to a worker and back), longer ones in a worker thread; or always
    #: "inline" / "thread".
    execution: str = "auto"
    inline_max_s: float = DEFAULT_INLINE_MAX_S

    def __post_init__(self) -> None:
        if not isinstance(self.timeout_s, int | float) or not 0 < self.timeout_s <= 3600:
            raise ValueError(f"timeout_s must be in (0, 3600] seconds, got {self.timeout_s!r}")
        for name in ("max_queue_texts", "max_round_texts"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if type(self.batching) is not bool:
            raise ValueError("batching must be true or false")
        if self.execution not in ("auto", "inline", "thread"):
            raise ValueError("execution must be auto, inline or thread")
        if not isinstance(self.inline_max_s, int | float) or not 0 <= self.inline_max_s <= 1:
            raise ValueError(f"inline_max_s must be in [0, 1] seconds, got {self.inline_max_s!r}")


@dataclass(slots=True)
class TextEngineStats:
    """Counters (read with :meth:`TextEngine.statistics`)."""

    requests: int = 0
    texts: int = 0
    rounds: int = 0
    runs: int = 0
    padded_tokens: int = 0
    #: Most requests one round served, and most texts one run carried.
    largest_round: int = 0
    largest_run: int = 0
    timeouts: int = 0
    abandoned: int = 0
    #: Batches skipped (every owner gone) and batches stopped in onnxruntime.
    skipped_runs: int = 0
    terminated_runs: int = 0
    errors: int = 0
    #: Rounds run in the event loop's thread (the others ran in a worker thread).
    inline_rounds: int = 0


@dataclass(eq=False, slots=True)
class TextRequest:
    """One queued request (see :meth:`TextEngine.submit`)."""

    texts: list[str]
    deadline: float
    done: trio.Event = field(default_factory=trio.Event)
    #: Set from the trio thread when the request gives up; read by the worker.
    abandoned: bool = False
    #: Written by the worker before ``done`` is set.
    error: ModelError | None = None
    vectors: npt.NDArray[np.float32] | None = None
    truncated: tuple[bool, ...] = ()
    remaining: int = 0

    def __len__(self) -> int:
        return len(self.texts)


class TextEngine:
    """One text model's embedder and the execution policy around it (module docstring).

    Args:
        name: the model's name in the catalog.
        embedder: the loaded bundle (its limits and batch caps apply).
        config: deadlines, queue and round sizes.
    """

    def __init__(
        self, name: str, embedder: Embedder, *, config: TextEngineConfig | None = None
    ) -> None:
        self.name = name
        self.embedder = embedder
        self.config = config or TextEngineConfig()
        self._queue: deque[TextRequest] = deque()
        self._queued_texts = 0
        self._wake = trio.Event()
        self._running = False
        self._token: trio.lowlevel.TrioToken | None = None
        #: The thread of the loop running :meth:`run` (rounds run inline there answer at once).
        self._loop_thread: int | None = None
        #: The batch in onnxruntime now: its requests and its RunOptions (worker-published).
        self._current: tuple[Sequence[TextRequest], Any] | None = None
        self._stats = TextEngineStats()
        #: Duration of the latest round (s), for per-request diagnostics.
        self.last_round_s = 0.0
        #: Measured cost of one padded token (s): an average over the runs (see warm_up).
        self.token_cost_s = 0.0

    # -- description -------------------------------------------------------------------------

    def catalog_fields(self) -> dict[str, Any]:
        """What the catalog says of this model: text in, float32[dim] out, and its limits."""
        config, limits = self.embedder.config, self.embedder.limits
        return {
            "kind": "text-embedding",
            "inputs": [{"name": "texts", "dtype": "string", "shape": [None]}],
            "outputs": [
                {"name": "embeddings", "dtype": "float32", "shape": [None, config.embedding_dim]}
            ],
            "batchable": True,
            "text": {
                "model_name": config.model_name,
                "max_seq_length": config.max_seq_length,
                "embedding_dim": config.embedding_dim,
                "pooling": config.pooling,
                "normalize": config.normalize,
                "max_texts": limits.max_texts,
                "max_text_bytes": limits.max_text_bytes,
                "max_total_bytes": limits.max_total_bytes,
            },
        }

    def warm_up(self, tokens: int = 64) -> float:
        """Run one text of ``tokens`` tokens (twice: the first run sizes onnxruntime's arena)
        to measure the cost of a padded token, which decides where rounds run; returns it.
        Blocking: call it before serving (the server does, in a worker thread)."""
        text = " ".join(["word"] * max(1, tokens - 2))
        self.embedder.embed([text])
        t0 = time.perf_counter()
        self.embedder.embed([text])
        self.token_cost_s = (time.perf_counter() - t0) / tokens
        return self.token_cost_s

    def statistics(self) -> TextEngineStats:
        """A copy of the counters."""
        s = self._stats
        return TextEngineStats(**{k: getattr(s, k) for k in TextEngineStats.__dataclass_fields__})

    @property
    def running(self) -> bool:
        """Whether the runner task is serving (see :meth:`run`)."""
        return self._running

    # -- requests (trio thread) ---------------------------------------------------------------

    def submit(self, texts: Sequence[object]) -> TextRequest:
        """Check ``texts`` against the limits and queue them; :meth:`wait` for the answer.

        Raises:
            TextInputError: a limit is broken (the subclass says which; nothing is queued).
            OverloadedError: too many texts already wait.
            ModelUnavailableError: the engine is not running.
        """
        if not self._running:
            raise ModelUnavailableError(f"model {self.name!r} is not running")
        checked = check_texts(texts, self.embedder.limits)
        if self._queued_texts + len(checked) > self.config.max_queue_texts:
            raise OverloadedError(
                f"model {self.name!r} has {self._queued_texts} texts waiting; retry later"
            )
        req = TextRequest(checked, deadline=trio.current_time() + self.config.timeout_s)
        self._queue.append(req)
        self._queued_texts += len(req)
        self._stats.requests += 1
        self._stats.texts += len(req)
        self._wake.set()
        return req

    async def wait(self, req: TextRequest) -> Embeddings:
        """The answer to ``req``, by its deadline.

        Raises:
            InferenceTimeoutError: the deadline passed (the request's remaining work is
                skipped or stopped).
            TextInputError: a text has no tokens.
            InferenceError: onnxruntime failed.
        """
        try:
            with trio.move_on_at(req.deadline):
                await req.done.wait()
        finally:
            if not req.done.is_set():  # deadline, or the caller was cancelled
                self._abandon(req)
        if not req.done.is_set():
            self._stats.timeouts += 1
            raise InferenceTimeoutError(
                f"embedding with {self.name!r} exceeded {self.config.timeout_s:g} s and was stopped"
            )
        if req.error is not None:
            raise req.error
        assert req.vectors is not None
        return Embeddings(vectors=req.vectors, truncated=req.truncated)

    async def embed(self, texts: Sequence[object]) -> Embeddings:
        """:meth:`submit` then :meth:`wait`."""
        return await self.wait(self.submit(texts))

    def cancel(self, req: TextRequest) -> None:
        """Give up on ``req`` (its answer is no longer wanted): skip or stop its work."""
        if not req.done.is_set() and not req.abandoned:
            self._abandon(req)

    def _abandon(self, req: TextRequest) -> None:
        req.abandoned = True
        self._stats.abandoned += 1
        try:
            self._queue.remove(req)
        except ValueError:
            pass  # in a round already
        else:
            self._queued_texts -= len(req)
        current = self._current
        if current is not None:
            owners, options = current
            if all(r.abandoned for r in owners):
                options.terminate = True  # stops onnxruntime between two nodes

    # -- the runner ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve rounds until cancelled (start it with ``nursery.start(engine.run)``).

        Cancellation: the round in progress is abandoned (its runs stopped) and every waiting
        request fails with :class:`~models.errors.ModelUnavailableError`.
        """
        if self._running:
            raise RuntimeError(f"text engine {self.name!r} is already running")
        self._running = True
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        task_status.started()
        try:
            while True:
                while not self._queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                batch = self._take_round()
                try:
                    prepared = self._prepare_inline(batch)
                    if prepared is not None and prepared.inline:
                        self._stats.inline_rounds += 1
                        self._execute(prepared, now=trio.current_time)
                        await trio.lowlevel.cancel_shielded_checkpoint()  # let the answers go
                    else:
                        await trio.to_thread.run_sync(
                            self._run_round, prepared or batch, abandon_on_cancel=True
                        )
                except trio.Cancelled:
                    for req in batch:
                        if not req.done.is_set():
                            req.error = ModelUnavailableError(f"model {self.name!r} stopped")
                            req.done.set()
                            self._abandon(req)
                    raise
                except Exception as exc:  # a bug in a round must not stop the model
                    log.error("text_round_failed", model=self.name, exc_info=exc)
                    for req in batch:
                        if not req.done.is_set():
                            req.error = InferenceError(f"{self.name}: inference failed")
                            req.done.set()
        finally:
            self._running = False
            while self._queue:
                req = self._queue.popleft()
                req.error = ModelUnavailableError(f"model {self.name!r} stopped")
                req.done.set()
            self._queued_texts = 0

    def _take_round(self) -> list[TextRequest]:
        """Whole queued requests, oldest first, up to ``max_round_texts`` texts (one at least)."""
        taken: list[TextRequest] = []
        count = 0
        cap = self.config.max_round_texts if self.config.batching else 1
        while self._queue:
            req = self._queue[0]
            if taken and (count + len(req) > cap or not self.config.batching):
                break
            self._queue.popleft()
            self._queued_texts -= len(req)
            taken.append(req)
            count += len(req)
        self._stats.rounds += 1
        self._stats.largest_round = max(self._stats.largest_round, len(taken))
        return taken

    # -- the round (worker thread) -------------------------------------------------------------

    def _finish(self, req: TextRequest) -> None:
        """Answer ``req``: its event is set in the trio thread (at once in an inline round;
        from the worker through the loop's entry queue)."""
        if threading.get_ident() == self._loop_thread:
            # Inline: already in the loop's thread. run_sync_soon would cost a wake-up write,
            # an epoll round and a read before the answer goes (tens of µs per request).
            req.done.set()
            return
        assert self._token is not None
        try:
            self._token.run_sync_soon(req.done.set)
        except trio.RunFinishedError:  # the service is gone; nobody waits any more
            pass

    def _prepare_inline(self, requests: list[TextRequest]) -> _Round | None:
        """The round tokenized and planned in the loop when it is small (``inline`` says
        whether to run it there too: see ``execution``); None to hand it to the worker thread
        whole."""
        mode = self.config.execution
        if mode == "thread":
            return None
        if mode == "auto":
            size = sum(len(t) for r in requests for t in r.texts)  # characters: >= tokens
            if self.token_cost_s <= 0 or size > _INLINE_PLAN_BYTES:
                return None
        prepared = self._prepare(requests)
        if mode == "auto":
            padded = sum(len(b.indices) * b.length for b in prepared.plan)
            prepared.inline = padded * self.token_cost_s <= self.config.inline_max_s
        return prepared

    def _prepare(self, requests: list[TextRequest]) -> _Round:
        """Tokenize each request (its own errors answered at once) and plan the batches."""
        embedder = self.embedder
        prepared = _Round()
        for req in requests:
            if req.abandoned or req.error is not None or req.vectors is not None:
                continue
            try:
                tokenized = embedder.tokenizer.encode(req.texts)
            except TextInputError as exc:
                req.error = exc
                self._finish(req)
                continue
            req.truncated = tuple(t.truncated for t in tokenized)
            req.vectors = np.empty((len(req), embedder.config.embedding_dim), dtype=np.float32)
            req.remaining = len(req)
            for index, tok in enumerate(tokenized):
                prepared.sequences.append(tok.ids)
                prepared.owners.append((req, index))
        prepared.plan = embedder.plan([len(seq) for seq in prepared.sequences])
        return prepared

    def _run_round(self, requests: list[TextRequest] | _Round) -> None:
        """Worker thread: prepare the round if needed, then run it."""
        prepared = requests if isinstance(requests, _Round) else self._prepare(requests)
        self._execute(prepared, now=None)

    def _execute(self, prepared: _Round, *, now: Callable[[], float] | None) -> None:
        """Run the planned batches, skipping or stopping those nobody waits for any more.

        ``now`` is given inline (the loop cannot mark requests abandoned while this runs, so
        deadlines are checked here, between batches); in the worker thread the waiters mark
        them (see _abandon)."""
        import onnxruntime as ort  # imported with the embedder already; kept off this import

        t0 = time.perf_counter()
        embedder = self.embedder
        stats = self._stats
        sequences, owners = prepared.sequences, prepared.owners
        for batch in prepared.plan:
            members = [owners[i] for i in batch.indices]
            reqs = list({id(r): r for r, _ in members}.values())
            if now is not None:
                late = now()
                for r in reqs:
                    if not r.abandoned and r.deadline <= late:
                        r.abandoned = True  # its waiter raises the timeout when it wakes
            options = ort.RunOptions()
            self._current = (reqs, options)  # published before the check: see _abandon
            if all(r.abandoned or r.error is not None for r in reqs):
                self._current = None
                stats.skipped_runs += 1
                continue
            t1 = time.perf_counter()
            try:
                vectors = embedder.run_batch(sequences, batch, options)
            except InferenceError as exc:
                self._current = None
                if options.terminate:
                    stats.terminated_runs += 1
                    continue
                stats.errors += 1
                log.error("text_run_failed", model=self.name, error=repr(exc.__cause__))
                for r in reqs:
                    if r.error is None and not r.abandoned:
                        r.error = exc
                        self._finish(r)
                continue
            self._current = None
            self._observe(time.perf_counter() - t1, len(batch.indices) * batch.length)
            stats.runs += 1
            stats.padded_tokens += len(batch.indices) * batch.length
            stats.largest_run = max(stats.largest_run, len(batch.indices))
            for row, (req, index) in enumerate(members):
                if req.error is not None or req.abandoned:
                    continue
                assert req.vectors is not None
                req.vectors[index] = vectors[row]
                req.remaining -= 1
                if req.remaining == 0:
                    self._finish(req)
        self.last_round_s = time.perf_counter() - t0

    def _observe(self, elapsed: float, padded_tokens: int) -> None:
        """Track the cost of a padded token (bounded against outliers, as in ModelEngine)."""
        if padded_tokens <= 0:
            return
        cost = elapsed / padded_tokens
        if self.token_cost_s <= 0:
            self.token_cost_s = cost
            return
        cost = min(max(cost, self.token_cost_s / 4), self.token_cost_s * 8)
        self.token_cost_s = (1 - _EWMA_ALPHA) * self.token_cost_s + _EWMA_ALPHA * cost


@dataclass(slots=True)
class _Round:
    """A round tokenized and planned: every text's ids, its owner, and the batches."""

    sequences: list[npt.NDArray[np.int64]] = field(default_factory=list)
    owners: list[tuple[TextRequest, int]] = field(default_factory=list)
    plan: list[Batch] = field(default_factory=list)
    #: False: prepared in the loop but expected to run too long there (the worker runs it).
    inline: bool = True
