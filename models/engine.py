"""onnxruntime sessions with validation, dynamic batching, timeouts and inline/thread execution.

Theory of operation
-------------------
One :class:`ModelEngine` per loaded model holds the ``InferenceSession`` (created once), its
:class:`~models.tensors.ModelSignature` and the execution policy.

*Inline or thread.* A thread hand-off costs ~0.4 ms here (``perf-baseline.md`` §2.3), five times
a small MLP's whole run, so a run is done **inline** in the trio thread when its expected cost is
small, and in a worker thread (``trio.to_thread.run_sync`` with a limiter) otherwise. The
expected cost is measured: a warm-up at load time and then an exponentially weighted average of
the observed per-sample cost; a batch whose estimate exceeds ``inline_max_s`` goes to a thread.
Only threaded runs can be stopped by a timeout or a cancellation (``RunOptions.terminate``,
checked by onnxruntime between nodes); inline runs are short by construction.

*Dynamic batching.* Requests for the same model join a FIFO queue; the request that gets the
model's run slot (a ``CapacityLimiter``) takes every queued request whose non-batch shape matches
its own, up to ``max_batch`` samples, concatenates them on axis 0, runs once and hands each
request its slice of the outputs. Requests that arrive while a run is in flight (a thread run)
or in the same scheduling round are batched together: a request waits one checkpoint (~6 us)
only under load (others queued, or requests arriving back to back); at low load it runs at once,
so an idle server adds no latency. Batching applies only when every input and output has a
dynamic first dimension.
:func:`plan_batch`, :func:`concat_inputs` and :func:`split_outputs` are the pure parts.

Why not :class:`transport.sync.LeaderFollower` (issue 11 asked for one primitive): the run slot
admits ``max_parallel_runs`` leaders at once (each with its own batch, on its own worker thread),
and a request leads only for its own batch, then leaves; ``LeaderFollower`` has exactly one
leader, who keeps stepping until its own condition holds. Serialising the runs through it would
cost the parallel runs their point, so the slot stays a ``CapacityLimiter``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import structlog
import trio

from models.errors import (
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    ModelLoadError,
    OverloadedError,
)
from models.tensors import Array, ModelSignature, Session

__all__ = [
    "EngineConfig",
    "ModelEngine",
    "plan_batch",
    "concat_inputs",
    "split_outputs",
    "create_session",
]

log = structlog.get_logger()

#: A run expected to take less than this is done inline (a thread hop costs ~0.4 ms here).
DEFAULT_INLINE_MAX_S: Final = 0.002
#: Default cap on samples per batched run (32 reaches ~95 % of the MLP's peak, perf-baseline §2.5).
DEFAULT_MAX_BATCH: Final = 256
#: Default inference timeout (seconds) for threaded runs.
DEFAULT_TIMEOUT_S: Final = 10.0
#: Default most samples waiting per model before new requests are refused (backpressure).
DEFAULT_MAX_QUEUE: Final = 4096
#: A request arriving sooner than this after the previous run ended means load: it waits one
#: scheduling round to batch with the others (a sequential client's gap is a round trip, >100 us).
_BACK_TO_BACK_S: Final = 50e-6
#: Batch size of the second warm-up point (fits the per-sample slope of the cost model).
_WARM_BATCH: Final = 32
#: Weight of a new observation in the per-sample cost average.
_EWMA_ALPHA: Final = 0.2


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Execution settings for one model (see the server config documentation)."""

    intra_op_threads: int = 1
    max_batch: int = DEFAULT_MAX_BATCH
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_queue: int = DEFAULT_MAX_QUEUE
    #: "auto" (measure), "inline" or "thread".
    execution: str = "auto"
    inline_max_s: float = DEFAULT_INLINE_MAX_S
    #: Parallel runs of this model (each may use intra_op_threads threads).
    max_parallel_runs: int = 1
    batching: bool = True

    def __post_init__(self) -> None:
        if self.execution not in ("auto", "inline", "thread"):
            raise ValueError("execution must be auto, inline or thread")
        if not (1 <= self.intra_op_threads <= 64 and 1 <= self.max_batch <= 1 << 20):
            raise ValueError("intra_op_threads or max_batch out of range")
        if not (0 < self.timeout_s <= 3600 and self.max_queue >= 1 and self.max_parallel_runs >= 1):
            raise ValueError("timeout_s, max_queue or max_parallel_runs out of range")


def create_session(model: bytes, *, intra_op_threads: int = 1) -> Session:
    """An ``onnxruntime.InferenceSession`` over model bytes (CPU, fixed thread counts).

    Raises:
        ModelLoadError: the bytes are not a loadable ONNX model.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    try:
        session: Session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise ModelLoadError(f"not a loadable ONNX model: {exc}") from exc
    return session


# --- pure batching helpers ---------------------------------------------------------------------


def _shape_key(inputs: Mapping[str, Array]) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    return tuple(sorted((k, tuple(v.shape[1:]), v.dtype.str) for k, v in inputs.items()))


def plan_batch(
    sizes_and_keys: Sequence[tuple[int, object]], first: int, max_batch: int
) -> list[int]:
    """Indices of the queued requests to run together with request ``first``.

    ``sizes_and_keys[i]`` is (samples, shape key) of queued request ``i``. Request ``first`` is
    always taken; others follow in FIFO order if their key matches and the total stays within
    ``max_batch``.
    """
    size0, key0 = sizes_and_keys[first]
    chosen = [first]
    total = size0
    for i, (size, key) in enumerate(sizes_and_keys):
        if i == first or key != key0:
            continue
        if total + size > max_batch:
            continue
        chosen.append(i)
        total += size
    return chosen


def concat_inputs(batch: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
    """Concatenate requests on axis 0 (a single request is passed through untouched)."""
    if len(batch) == 1:
        return dict(batch[0])
    return {name: np.concatenate([req[name] for req in batch], axis=0) for name in batch[0]}


def split_outputs(outputs: Mapping[str, Array], sizes: Sequence[int]) -> list[dict[str, Array]]:
    """Split batched outputs back per request (checks every output has the total batch size)."""
    if len(sizes) == 1:
        return [dict(outputs)]
    total = sum(sizes)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise InferenceError(f"output {name!r} does not follow the batch dimension")
    bounds = np.cumsum([0, *sizes])
    return [
        {name: arr[bounds[i] : bounds[i + 1]] for name, arr in outputs.items()}
        for i in range(len(sizes))
    ]


# --- the engine ---------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Request:
    inputs: Mapping[str, Array]
    size: int
    key: object
    result: dict[str, Array] | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass(slots=True)
class EngineStats:
    """Counters (read with :meth:`ModelEngine.statistics`)."""

    requests: int = 0
    runs: int = 0
    samples: int = 0
    threaded_runs: int = 0
    timeouts: int = 0
    #: threaded runs onnxruntime stopped early (``RunOptions.terminate``, after a timeout or a
    #: cancellation): the worker thread is free again
    terminated_runs: int = 0
    largest_batch: int = 0
    per_sample_s: float = 0.0
    fixed_s: float = 0.0
    errors: int = 0


class ModelEngine:
    """One model's session, signature and execution policy (see the module docstring)."""

    def __init__(self, name: str, session: Session, *, config: EngineConfig | None = None) -> None:
        self.name = name
        self.session = session
        self.config = config or EngineConfig()
        self.signature = ModelSignature.from_session(session)
        self._output_names = [o.name for o in self.signature.outputs]
        self._queue: deque[_Request] = deque()
        self._queued_samples = 0
        self._slot = trio.CapacityLimiter(self.config.max_parallel_runs)
        self._stats = EngineStats()
        self._per_sample_s = 0.0
        self._fixed_s = 0.0
        self._last_end = -1.0
        self._scale = 1.0
        #: Duration of the latest inline run (s), for per-request diagnostics.
        self.last_run_s = 0.0

    # -- measurement --

    def warm_up(self, runs: int = 10) -> float:
        """Time zero inputs at batch 1 (and 32 when batchable) to fit the cost model.

        The expected run time of ``n`` samples is ``fixed + per_sample * n``; both terms come
        from the fastest of ``runs`` runs and are then tracked from real runs. Returns the
        batch-1 time (s).
        """

        def fastest_run(n: int) -> float:
            feeds = {}
            for spec in self.signature.inputs:
                shape = [d if isinstance(d, int) else 1 for d in spec.shape]
                if spec.batch_dynamic:
                    shape[0] = n
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                self.session.run(self._output_names, feeds)
                times.append(time.perf_counter() - t0)
            # The fastest run is the model's cost; slower ones measured contention (the CPU is
            # shared at boot), which must not push a small model onto threads.
            return min(times)

        t1 = fastest_run(1)
        if self.signature.batchable:
            n = _WARM_BATCH
            tn = fastest_run(n)
            self._per_sample_s = max(0.0, (tn - t1) / (n - 1))
            self._fixed_s = max(0.0, t1 - self._per_sample_s)
        else:
            self._per_sample_s, self._fixed_s = t1, 0.0
        return t1

    def expected_run_s(self, samples: int) -> float:
        """Estimated run time of a batch of ``samples`` (fixed + per-sample cost, measured)."""
        return self._scale * (self._fixed_s + self._per_sample_s * max(1, samples))

    def _inline(self, samples: int) -> bool:
        mode = self.config.execution
        if mode != "auto":
            return mode == "inline"
        return self.expected_run_s(samples) <= self.config.inline_max_s

    def statistics(self) -> EngineStats:
        s = self._stats
        return EngineStats(
            requests=s.requests,
            runs=s.runs,
            samples=s.samples,
            threaded_runs=s.threaded_runs,
            timeouts=s.timeouts,
            terminated_runs=s.terminated_runs,
            largest_batch=s.largest_batch,
            per_sample_s=self._per_sample_s,
            fixed_s=self._fixed_s,
            errors=s.errors,
        )

    # -- running --

    def _run_sync(self, feeds: Mapping[str, Array], options: Any) -> dict[str, Array]:
        return self._timed_run(feeds, options)[0]

    def _timed_run(
        self, feeds: Mapping[str, Array], options: Any
    ) -> tuple[dict[str, Array], float]:
        """``session.run`` and its own duration (not the thread hand-off around it)."""
        t0 = time.perf_counter()
        try:
            values = self.session.run(self._output_names, dict(feeds), options)
        except Exception as exc:  # onnxruntime's exceptions are untyped
            if options is not None and options.terminate:
                self._stats.terminated_runs += 1  # (only this worker thread writes it)
                raise InferenceTimeoutError("inference terminated") from exc
            if type(exc).__name__ == "InvalidArgument":
                # The inputs passed the signature check but a kernel refused their values (an
                # index out of range...): the request's fault, not ours. Its text names the
                # model's internal nodes, so it goes to our log, not to the client.
                log.info("inference_input_refused", model=self.name, detail=str(exc)[:500])
                raise InvalidInputError(
                    "the model refused these input values (onnxruntime INVALID_ARGUMENT)"
                ) from exc
            raise InferenceError(f"inference failed in onnxruntime: {type(exc).__name__}") from exc
        return dict(zip(self._output_names, values, strict=True)), time.perf_counter() - t0

    async def _run(self, feeds: Mapping[str, Array], samples: int) -> dict[str, Array]:
        if self._inline(samples):
            t0 = time.perf_counter()
            out = self._run_sync(feeds, None)
            self._observe(time.perf_counter() - t0, samples)
            return out
        import onnxruntime as ort

        options = ort.RunOptions()
        self._stats.threaded_runs += 1
        with trio.move_on_after(self.config.timeout_s) as deadline:
            try:
                out, elapsed = await trio.to_thread.run_sync(
                    self._timed_run, feeds, options, abandon_on_cancel=True
                )
            except trio.Cancelled:
                # Cancellation (timeout or caller) must stop the work, not only the wait:
                # onnxruntime checks the flag between nodes and returns an error.
                options.terminate = True
                raise
            # The run's own time: counting the ~0.4 ms hand-off would keep a small model on
            # threads forever.
            self._observe(elapsed, samples)
            return out
        assert deadline.cancelled_caught
        self._stats.timeouts += 1
        raise InferenceTimeoutError(
            f"inference on {self.name!r} exceeded {self.config.timeout_s:g} s and was stopped"
        )

    def _observe(self, elapsed: float, samples: int) -> None:
        # Track how real runs compare with the warm-up model (one factor for both terms, so a
        # slow batch-1 run is not mistaken for a per-sample cost), bounded against outliers.
        expected = self._fixed_s + self._per_sample_s * max(1, samples)
        if expected > 0:
            ratio = min(max(elapsed / expected, 0.25), 8.0)
            self._scale = (1 - _EWMA_ALPHA) * self._scale + _EWMA_ALPHA * ratio

    async def infer(
        self, inputs: Mapping[str, Array], *, join_batches: bool = True
    ) -> dict[str, Array]:
        """Validate and run one request (possibly batched with concurrent ones).

        Args:
            join_batches: False for a caller that already batched its own work (a stream
                running the messages waiting on it): run it as is, without the batching queue.

        Raises:
            InvalidInputError: the inputs do not match the signature.
            OverloadedError: too many samples are already queued for this model.
            InferenceTimeoutError: the run exceeded ``timeout_s`` and was terminated.
            InferenceError: onnxruntime failed.
        """
        samples = self.signature.validate(inputs, max_batch=self.config.max_batch)
        self._stats.requests += 1
        batchable = self.config.batching and self.signature.batchable and join_batches
        if not batchable:
            await self._acquire_slot()
            try:
                return await self._counted_run(inputs, samples)
            finally:
                self._slot.release()
        if self._queued_samples + samples > self.config.max_queue:
            raise OverloadedError(f"model {self.name!r} has too many queued requests")
        if (
            not self._queue
            and time.perf_counter() - self._last_end >= _BACK_TO_BACK_S
            and self._inline(samples)
        ):
            # Fast path at low load: nothing to batch with, a short run, the slot free:
            # run now, with no queue bookkeeping and no scheduling round.
            try:
                self._slot.acquire_nowait()
            except trio.WouldBlock:
                pass
            else:
                try:
                    return self._run_inline_now(inputs, samples)
                finally:
                    self._slot.release()
        req = _Request(inputs, samples, _shape_key(inputs))
        self._queue.append(req)
        self._queued_samples += samples
        try:
            if len(self._queue) > 1 or time.perf_counter() - self._last_end < _BACK_TO_BACK_S:
                # Under load (others queued, or requests arriving back to back) one scheduling
                # round lets the requests that are ready join this batch. At low load a request
                # runs at once: the round would only add latency.
                await trio.lowlevel.checkpoint()
            if not req.done:
                await self._acquire_slot()
                try:
                    if not req.done:
                        await self._lead(req)
                finally:
                    self._slot.release()
        finally:
            if not req.done and req in self._queue:  # cancelled while queued
                self._queue.remove(req)
                self._queued_samples -= req.size
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def infer_now(self, inputs: Mapping[str, Array]) -> dict[str, Array] | None:
        """Run one request at once in the calling task, if that is what :meth:`infer` would do
        now: a short run (the inline policy), nothing queued, no request just before it to
        batch with, the run slot free. Otherwise return None having done nothing, and the
        caller uses :meth:`infer` (which may wait). For a server answering in its reader task.

        Raises:
            InvalidInputError: the inputs do not match the signature.
            InferenceError: onnxruntime failed.
        """
        samples = self.signature.validate(inputs, max_batch=self.config.max_batch)
        if self._queue or not self._inline(samples):
            return None
        batchable = self.config.batching and self.signature.batchable
        if batchable and time.perf_counter() - self._last_end < _BACK_TO_BACK_S:
            return None  # under load: infer() gives the requests behind it a chance to join
        try:
            self._slot.acquire_nowait()
        except trio.WouldBlock:
            return None
        try:
            self._stats.requests += 1
            return self._run_inline_now(inputs, samples)
        finally:
            self._slot.release()

    def _run_inline_now(self, inputs: Mapping[str, Array], samples: int) -> dict[str, Array]:
        stats = self._stats
        stats.runs += 1
        stats.samples += samples
        if samples > stats.largest_batch:
            stats.largest_batch = samples
        t0 = time.perf_counter()
        try:
            out = self._run_sync(inputs, None)
        except InferenceError:
            stats.errors += 1
            raise
        finally:
            self._last_end = end = time.perf_counter()
        self.last_run_s = end - t0
        self._observe(end - t0, samples)
        return out

    async def _acquire_slot(self) -> None:
        """Take the run slot; without a scheduling round when it is free (the common case)."""
        try:
            self._slot.acquire_nowait()
        except trio.WouldBlock:
            await self._slot.acquire()

    async def _counted_run(self, feeds: Mapping[str, Array], samples: int) -> dict[str, Array]:
        self._stats.runs += 1
        self._stats.samples += samples
        self._stats.largest_batch = max(self._stats.largest_batch, samples)
        try:
            return await self._run(feeds, samples)
        except InferenceError:
            self._stats.errors += 1
            raise
        finally:
            self._last_end = time.perf_counter()

    async def _lead(self, req: _Request) -> None:
        queued = list(self._queue)
        chosen_idx = plan_batch(
            [(r.size, r.key) for r in queued], queued.index(req), self.config.max_batch
        )
        batch = [queued[i] for i in chosen_idx]
        for r in batch:
            self._queue.remove(r)
            self._queued_samples -= r.size
        sizes = [r.size for r in batch]
        try:
            outputs = await self._counted_run(concat_inputs([r.inputs for r in batch]), sum(sizes))
            parts = split_outputs(outputs, sizes)
        except BaseException as exc:
            for r in batch:
                r.done = True
                if r is not req:
                    r.error = (
                        exc
                        if isinstance(exc, Exception)
                        else InferenceError("batched run was cancelled; retry")
                    )
            if isinstance(exc, Exception):
                req.error = exc
                return
            raise
        for r, part in zip(batch, parts, strict=True):
            r.result = part
            r.done = True
