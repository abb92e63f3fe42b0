"""The demo's first act, measured: the bundled digits model's whole test split streamed through
the enclave (accuracy), the split streamed again and again (steady-state throughput), and unary
round trips of one row (latency)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from runtime.demo.narration import Console
from runtime.demo.results import DemoFailure, DemoFigures

if TYPE_CHECKING:
    from models.client import InferenceClient

__all__ = [
    "Array",
    "LATENCY_SAMPLES",
    "STREAM_CHUNK",
    "THROUGHPUT_PASSES",
    "THROUGHPUT_CHUNK",
    "measure",
    "report",
]

#: Unary round trips used for the latency figures.
LATENCY_SAMPLES: Final = 200
#: Rows per stream message when streaming the test split for accuracy.
STREAM_CHUNK: Final = 50
#: Throughput: the split streamed this many times in one stream, in messages of this many rows.
THROUGHPUT_PASSES: Final = 10
THROUGHPUT_CHUNK: Final = 150

#: The test split's rows and labels as loaded by :func:`models.digits.load_test_split`.
Array = npt.NDArray[np.generic]


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def measure(client: InferenceClient, x: Array, y: Array) -> DemoFigures:
    """Stream the test split ``x`` through ``client`` and score it against ``y``; then the
    steady-state throughput and the unary latency.

    Raises:
        DemoFailure: the stream did not return one label per sample.
    """
    from models.digits import MODEL_NAME

    # Stream the whole test split (chunks of STREAM_CHUNK rows, pipelined).
    t0 = time.perf_counter()
    chunks = ({"pixels": x[i : i + STREAM_CHUNK]} for i in range(0, len(x), STREAM_CHUNK))
    labels = [o["label"] async for o in client.stream(MODEL_NAME, chunks)]
    stream_s = time.perf_counter() - t0
    pred = np.concatenate(labels)
    if pred.shape != y.shape:
        raise DemoFailure(f"stream returned {pred.shape[0]} labels for {y.shape[0]} samples")
    accuracy = float((pred == y).mean())
    # Steady-state throughput: the split THROUGHPUT_PASSES times in one stream.
    passes = [{"pixels": x[i : i + THROUGHPUT_CHUNK]} for i in range(0, len(x), THROUGHPUT_CHUNK)]
    t0 = time.perf_counter()
    streamed = 0
    async for o in client.stream(MODEL_NAME, passes * THROUGHPUT_PASSES):
        streamed += int(o["label"].shape[0])
    steady_s = time.perf_counter() - t0
    # Unary round-trip latency, batch 1.
    lat = []
    for i in range(LATENCY_SAMPLES):
        row = x[i % len(x) : i % len(x) + 1]
        t = time.perf_counter()
        await client.infer(MODEL_NAME, {"pixels": row})
        lat.append(time.perf_counter() - t)
    return DemoFigures(
        accuracy=accuracy,
        samples=len(y),
        stream_s=stream_s,
        throughput=streamed / steady_s,
        p50_ms=_pct(lat, 50) * 1e3,
        p99_ms=_pct(lat, 99) * 1e3,
    )


def report(out: Console, figures: DemoFigures) -> None:
    """Narrate ``figures``: accuracy, latency, throughput."""
    out.ok(f"accuracy   {figures.accuracy:.2%} on {figures.samples} held-out samples")
    out.ok(
        f"latency    p50 {figures.p50_ms:.2f} ms, p99 {figures.p99_ms:.2f} ms "
        f"(unary round trip, batch 1, {LATENCY_SAMPLES} requests)"
    )
    out.ok(
        f"throughput {figures.throughput:,.0f} samples/s streaming (steady state: the split "
        f"{THROUGHPUT_PASSES}x as {THROUGHPUT_CHUNK}-row inputs; one cold pass took "
        f"{figures.stream_s * 1e3:.1f} ms)"
    )
