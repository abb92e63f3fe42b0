"""The SGD math in-process: the gradient, sharded gradients summing to the batch gradient,
determinism, and a short data-parallel run over the in-process ring that learns."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from models.training import DataSpec, LocalData, Mlp, TrainingError, make_dataset, ring_allreduce
from models.training.data import (
    batch_indices,
    decode_shard,
    encode_shard,
    owned_shards,
    split_shards,
)

SMALL = DataSpec(train=1024, test=512)


def test_the_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    model = Mlp.initial((5, 7, 3), seed=1)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=6).astype(np.int64)
    grad = np.empty_like(model.params)
    model.gradient(x, y, 6, grad)
    params64 = model.params.astype(np.float64)
    for i in rng.choice(len(params64), size=12, replace=False):

        def loss(delta: float, i: int = i) -> float:
            trial = Mlp((5, 7, 3), (params64 + np.eye(1, len(params64), i)[0] * delta)
                        .astype(np.float32))  # fmt: skip
            out = np.empty_like(trial.params)
            return trial.gradient(x, y, 6, out)

        numeric = (loss(1e-2) - loss(-1e-2)) / 2e-2
        assert grad[i] == pytest.approx(numeric, abs=2e-3, rel=2e-2)


def test_shard_gradients_sum_to_the_batch_gradient() -> None:
    data = make_dataset(SMALL)
    model = Mlp.initial((64, 32, 10), seed=2)
    shards = split_shards(data.x_train, data.y_train, 4)
    idx = batch_indices(SMALL.seed, 5, SMALL.train, 128)
    full = np.empty_like(model.params)
    model.gradient(data.x_train[idx], data.y_train[idx], 128, full)
    total = np.zeros_like(full)
    part = np.empty_like(full)
    for rank in range(3):
        local = LocalData([shards[s] for s in owned_shards(rank, 3, 4)])
        x, y = local.select(idx)
        model.gradient(x, y, 128, part)
        total += part
    np.testing.assert_allclose(total, full, atol=1e-6)


def test_everything_is_a_function_of_the_seed() -> None:
    a, b = make_dataset(SMALL), make_dataset(SMALL)
    assert a.x_train.tobytes() == b.x_train.tobytes()
    first, again = Mlp.initial((64, 8, 10), 3), Mlp.initial((64, 8, 10), 3)
    assert first.params.tobytes() == again.params.tobytes()
    assert np.array_equal(batch_indices(1, 9, 1000, 100), batch_indices(1, 9, 1000, 100))
    assert not np.array_equal(batch_indices(1, 9, 1000, 100), batch_indices(1, 19, 1000, 100))


@settings(max_examples=30, deadline=None)
@given(world=st.integers(1, 4), shards=st.integers(4, 6), step=st.integers(0, 50))
def test_owned_samples_partition_every_batch(world: int, shards: int, step: int) -> None:
    x = np.arange(600, dtype=np.float32).reshape(300, 2)
    y = np.arange(300, dtype=np.int64)
    cut = split_shards(x, y, shards)
    idx = batch_indices(4, step, 300, 32)
    seen = np.concatenate(
        [
            LocalData([cut[s] for s in owned_shards(r, world, shards)]).select(idx)[1]
            for r in range(world)
        ]
    )
    assert sorted(seen.tolist()) == sorted(idx.tolist())


def test_a_shard_round_trips_and_bad_shards_are_refused() -> None:
    data = make_dataset(SMALL)
    shard = split_shards(data.x_train, data.y_train, 2)[1]
    back = decode_shard(encode_shard(shard), features=64, classes=10)
    assert back.start == shard.start
    assert back.x.tobytes() == shard.x.tobytes()
    with pytest.raises(TrainingError):
        decode_shard(b"not a zip", features=64, classes=10)
    with pytest.raises(TrainingError, match="x is"):
        decode_shard(encode_shard(shard), features=32, classes=10)
    with pytest.raises(TrainingError, match="label"):
        decode_shard(encode_shard(shard), features=64, classes=3)
    with pytest.raises(TrainingError):
        owned_shards(2, 5, 4)


async def test_data_parallel_sgd_over_the_ring_learns_and_matches_across_workers() -> None:
    data = make_dataset(SMALL)
    shards = split_shards(data.x_train, data.y_train, 4)
    world, batch, lr = 2, 128, 0.05
    models = [Mlp.initial((64, 64, 10), seed=5) for _ in range(world)]
    local = [LocalData([shards[s] for s in owned_shards(r, world, 4)]) for r in range(world)]
    links = [trio.testing.memory_stream_one_way_pair() for _ in range(world)]
    grads = [np.empty_like(m.params) for m in models]
    before = models[0].accuracy(data.x_test, data.y_test)
    with trio.fail_after(60):
        for step in range(80):
            idx = batch_indices(SMALL.seed, step, SMALL.train, batch)
            for r in range(world):
                models[r].gradient(*local[r].select(idx), batch, grads[r])
            async with trio.open_nursery() as nursery:
                for r in range(world):
                    nursery.start_soon(
                        partial(
                            ring_allreduce,
                            grads[r],
                            rank=r,
                            world=world,
                            send=links[r][0],
                            receive=links[(r - 1) % world][1],
                            round_id=step,
                            timeout_s=30,
                        )
                    )
            for r in range(world):
                models[r].sgd(grads[r], lr)
    assert models[0].params.tobytes() == models[1].params.tobytes()
    after = models[0].accuracy(data.x_test, data.y_test)
    assert after > 0.8 > before
