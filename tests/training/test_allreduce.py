"""The ring all-reduce in-process, over trio memory streams (one one-way pair per link)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from models.training import MemberLost, RingProtocolError, ring_allreduce

TIMEOUT_S = 30


async def _ring(
    vectors: list[np.ndarray], *, chunk_bytes: int, rounds: list[int] | None = None
) -> list[np.ndarray]:
    world = len(vectors)
    links = [trio.testing.memory_stream_one_way_pair() for _ in range(world)]
    # link i carries worker i -> worker i + 1
    bufs = [v.copy() for v in vectors]
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for r in range(world):
                nursery.start_soon(
                    partial(
                        ring_allreduce,
                        bufs[r],
                        rank=r,
                        world=world,
                        send=links[r][0],
                        receive=links[(r - 1) % world][1],
                        round_id=(rounds or [7] * world)[r],
                        timeout_s=TIMEOUT_S,
                        chunk_bytes=chunk_bytes,
                    )
                )
    return bufs


def _ring_order_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """What every worker must hold: segment j summed in ring order starting at worker j + 1."""
    world, n = len(vectors), len(vectors[0])
    bounds = [n * i // world for i in range(world + 1)]
    out = np.empty(n, dtype=np.float32)
    for seg in range(world):
        lo, hi = bounds[seg], bounds[seg + 1]
        acc = vectors[seg][lo:hi].copy()  # worker seg sends its own first
        for k in range(1, world):
            acc = vectors[(seg + k) % world][lo:hi] + acc
        out[lo:hi] = acc
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize(("n", "chunk_bytes"), [(1, 4), (3, 8), (1000, 64), (100_003, 4096)])
async def test_every_worker_ends_with_the_same_exact_sum(
    world: int, n: int, chunk_bytes: int
) -> None:
    rng = np.random.default_rng([world, n])
    vectors = [rng.normal(size=n).astype(np.float32) for _ in range(world)]
    out = await _ring(vectors, chunk_bytes=chunk_bytes)
    expected = _ring_order_sum(vectors)
    for buf in out:
        assert buf.tobytes() == expected.tobytes()  # bit for bit, every worker
    np.testing.assert_allclose(out[0], np.sum(vectors, axis=0), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    world=st.integers(1, 5),
    n=st.integers(0, 300),
    chunk_elems=st.integers(1, 70),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_size_any_chunk(world: int, n: int, chunk_elems: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vectors = [rng.integers(-50, 50, size=n).astype(np.float32) for _ in range(world)]
    out = trio.run(lambda: _ring(vectors, chunk_bytes=chunk_elems * 4))
    for buf in out:  # small integers: the sum is exact in any order
        assert np.array_equal(buf, np.sum(vectors, axis=0, dtype=np.float32))


async def test_a_neighbour_in_another_round_is_a_protocol_error() -> None:
    vectors = [np.ones(10, dtype=np.float32) for _ in range(3)]
    with pytest.raises(BaseException) as info:
        await _ring(vectors, chunk_bytes=8, rounds=[1, 1, 2])
    leaves = info.value.exceptions if isinstance(info.value, BaseExceptionGroup) else [info.value]
    assert any(isinstance(e, RingProtocolError) for e in leaves)


async def test_a_closed_link_mid_round_is_a_lost_member() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    my_send, _their_receive = trio.testing.memory_stream_one_way_pair()

    async def dying_neighbour() -> None:
        from models.training.allreduce import HEADER

        await send.send_all(HEADER.pack(b"RAR1", 1000, 3))
        await send.send_all(b"\0" * 100)  # part of one chunk, then gone
        await send.aclose()

    buf = np.ones(1000, dtype=np.float32)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dying_neighbour)
            with pytest.raises(MemberLost, match="closed"):
                await ring_allreduce(
                    buf, rank=0, world=2, send=my_send, receive=receive, round_id=3,
                    timeout_s=TIMEOUT_S, chunk_bytes=400,
                )  # fmt: skip


async def test_a_silent_neighbour_is_a_lost_member_after_the_timeout() -> None:
    _send, receive = trio.testing.memory_stream_one_way_pair()
    my_send, _their_receive = trio.testing.memory_stream_one_way_pair()
    buf = np.ones(10, dtype=np.float32)
    with trio.fail_after(TIMEOUT_S), pytest.raises(MemberLost, match="silent"):
        await ring_allreduce(
            buf, rank=1, world=2, send=my_send, receive=receive, round_id=0, timeout_s=0.2
        )


async def test_bad_arguments_are_refused() -> None:
    s, r = trio.testing.memory_stream_one_way_pair()
    wrong = np.ones(3)
    with pytest.raises(ValueError):
        await ring_allreduce(
            wrong,  # type: ignore[arg-type]  # float64: refused at run time too
            rank=0,
            world=2,
            send=s,
            receive=r,
            round_id=0,
            timeout_s=1,
        )
    with pytest.raises(ValueError):
        await ring_allreduce(np.ones(3, np.float32), rank=2, world=2, send=s, receive=r,
                             round_id=0, timeout_s=1)  # fmt: skip
