"""ModelEngine: batching, inline/thread execution, timeouts that stop onnxruntime."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import trio

from models.digits import MODEL_PATH, load_test_split
from models.engine import (
    EngineConfig,
    ModelEngine,
    concat_inputs,
    create_session,
    plan_batch,
    split_outputs,
)
from models.errors import (
    InferenceTimeoutError,
    InvalidInputError,
    ModelLoadError,
    OverloadedError,
)

from .helpers import fixed_model, gather_model, slow_model


def test_plan_batch() -> None:
    q = [(4, "a"), (10, "a"), (3, "b"), (2, "a"), (1, "a")]
    assert plan_batch(q, 0, 8) == [0, 3, 4]
    assert plan_batch(q, 2, 8) == [2]
    assert plan_batch(q, 1, 16) == [1, 0, 3]
    assert plan_batch(q, 1, 5) == [1]  # the leader always runs, even if larger than the cap


def test_concat_and_split() -> None:
    a = {"x": np.ones((2, 3))}
    b = {"x": np.zeros((1, 3))}
    cat = concat_inputs([a, b])
    assert cat["x"].shape == (3, 3)
    parts = split_outputs({"y": cat["x"] * 2, "l": np.arange(3)}, [2, 1])
    assert parts[0]["y"].shape == (2, 3)
    assert parts[1]["l"].tolist() == [2]
    with pytest.raises(Exception, match="batch dimension"):
        split_outputs({"y": np.zeros((4, 3))}, [2, 1])


def test_create_session_rejects_garbage() -> None:
    with pytest.raises(ModelLoadError):
        create_session(b"not an onnx model")


@pytest.fixture(scope="module")
def digits_session() -> object:
    return create_session(MODEL_PATH.read_bytes())


async def test_digits_accuracy_and_batching(digits_session: object) -> None:
    engine = ModelEngine("digits", digits_session)
    engine.warm_up()
    x, y = load_test_split()
    preds: dict[int, int] = {}

    async def one(i: int) -> None:
        out = await engine.infer({"pixels": x[i : i + 1]})
        preds[i] = int(out["label"][0])
        assert out["probabilities"].shape == (1, 10)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(len(y)):
                nursery.start_soon(one, i)
    acc = np.mean([preds[i] == y[i] for i in range(len(y))])
    assert acc > 0.95
    stats = engine.statistics()
    assert stats.requests == len(y)
    assert stats.runs < len(y) / 4  # concurrent requests were batched
    assert stats.largest_batch > 1
    assert stats.threaded_runs == 0


async def test_batched_results_match_unbatched(digits_session: object) -> None:
    engine = ModelEngine("digits", digits_session, config=EngineConfig(max_batch=7))
    x, _ = load_test_split()
    ref = digits_session.run(None, {"pixels": x[:40]})  # type: ignore[attr-defined]
    results: dict[int, dict[str, np.ndarray]] = {}

    async def one(i: int) -> None:
        results[i] = await engine.infer({"pixels": x[2 * i : 2 * i + 2]})

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
    assert engine.statistics().largest_batch <= 7
    labels = np.concatenate([results[i]["label"] for i in range(20)])
    probs = np.concatenate([results[i]["probabilities"] for i in range(20)])
    assert np.array_equal(labels, ref[0])
    np.testing.assert_allclose(probs, ref[1], rtol=1e-5, atol=1e-6)


async def test_invalid_input_does_not_disturb_others(digits_session: object) -> None:
    engine = ModelEngine("digits", digits_session)
    x, _ = load_test_split()
    with pytest.raises(InvalidInputError):
        await engine.infer({"pixels": np.zeros((1, 65), np.float32)})
    out = await engine.infer({"pixels": x[:3]})
    assert out["label"].shape == (3,)


async def test_zero_rows_is_invalid_input(digits_session: object) -> None:
    """Regression: an empty batch reached onnxruntime, whose kernel error came back as
    ``internal``; it is the request that is wrong."""
    engine = ModelEngine("digits", digits_session)
    with pytest.raises(InvalidInputError, match="empty"):
        await engine.infer({"pixels": np.zeros((0, 64), np.float32)})


async def test_values_a_kernel_refuses_are_invalid_input() -> None:
    """Regression: onnxruntime's INVALID_ARGUMENT (values past the signature check, here an
    index out of range) was reported as an internal failure."""
    engine = ModelEngine("gather", create_session(gather_model(rows=4)))
    ok = await engine.infer({"i": np.array([3, 0], np.int64)})
    assert ok["y"].tolist() == [[6.0, 7.0], [0.0, 1.0]]
    with pytest.raises(InvalidInputError, match="refused these input values") as info:
        await engine.infer({"i": np.array([9], np.int64)})
    assert "Gather" not in str(info.value)  # the model's internals stay in our log


async def test_queue_limit(digits_session: object) -> None:
    engine = ModelEngine("digits", digits_session, config=EngineConfig(max_queue=4))
    with pytest.raises(OverloadedError):
        await engine.infer({"pixels": np.zeros((5, 64), np.float32)})


async def test_fixed_model_runs_unbatched() -> None:
    engine = ModelEngine("fixed", create_session(fixed_model()))
    a = np.ones((2, 3), np.float32)
    b = np.full((2, 3), 2, np.int64)
    results = []

    async def one() -> None:
        results.append(await engine.infer({"a": a, "b": b}))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    assert all(np.array_equal(r["y"], np.full((2, 3), 3.0)) for r in results)
    assert engine.statistics().runs == 3


def test_run_options_terminate_really_stops_onnxruntime() -> None:
    """The primitive the timeouts rely on: terminate set from another thread ends run()."""
    import onnxruntime as ort

    sess = create_session(slow_model())
    x = np.ones((256, 512), np.float32)
    opts = ort.RunOptions()
    threading.Timer(0.05, lambda: setattr(opts, "terminate", True)).start()
    # A run that completes returns its outputs; only a terminated one raises this (a full run
    # at batch 256 takes seconds here, far longer than the 50 ms before the flag is set).
    with pytest.raises(Exception, match=r"(?i)terminat"):
        sess.run(None, {"x": x}, opts)


async def _wait_terminated(engine: ModelEngine, runs: int) -> None:
    """Until onnxruntime stopped ``runs`` threaded runs early. Without RunOptions.terminate the
    slow model would run to completion and never count here: the caller's fail_after fails."""
    while engine.statistics().terminated_runs < runs:
        await trio.sleep(0.01)


async def test_timeout_terminates_threaded_run() -> None:
    engine = ModelEngine(
        "slow", create_session(slow_model()), config=EngineConfig(timeout_s=0.1, max_batch=4096)
    )
    engine.warm_up(runs=1)
    x = np.ones((512, 512), np.float32)
    with trio.fail_after(20):
        with pytest.raises(InferenceTimeoutError, match=r"exceeded 0\.1 s"):
            await engine.infer({"x": x})
        stats = engine.statistics()
        assert stats.threaded_runs == 1
        assert stats.timeouts == 1
        # The worker thread really stopped (onnxruntime ended the run early), so a following
        # run is not queued behind a runaway one.
        await _wait_terminated(engine, 1)
        await engine.infer({"x": x[:2]})
        assert engine.statistics().terminated_runs == 1


async def test_cancellation_terminates_threaded_run() -> None:
    engine = ModelEngine(
        "slow",
        create_session(slow_model()),
        config=EngineConfig(execution="thread", timeout_s=60, max_batch=4096),
    )
    x = np.ones((1024, 512), np.float32)
    with trio.fail_after(20):
        with trio.move_on_after(0.1) as scope:
            await engine.infer({"x": x})
        assert scope.cancelled_caught
        await _wait_terminated(engine, 1)  # the cancelled run stopped, not only our wait
        await engine.infer({"x": x[:1]})
        stats = engine.statistics()
        assert stats.timeouts == 0  # a cancellation, not a timeout
        assert stats.terminated_runs == 1
