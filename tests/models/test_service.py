"""Server and client over in-memory streams with a real onnxruntime session (no channel)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import trio
import trio.testing

from models.digits import MODEL_PATH, load_test_split
from models.engine import EngineConfig, ModelEngine, create_session
from models.errors import (
    InferenceError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from models.service import (
    MAX_WAITING_PER_CONNECTION,
    InferenceService,
    ModelEntry,
    ServiceLimits,
    message_bytes,
)
from models.tensors import encode_tensor, encode_tensors
from tests.models.helpers import connected, raw_connection
from transport.rpc import RpcError, RpcStream


@pytest.fixture(scope="module")
def service_models() -> dict[str, ModelEntry]:
    import hashlib

    data = MODEL_PATH.read_bytes()
    engine = ModelEngine("digits", create_session(data))
    engine.warm_up()
    return {
        "digits": ModelEntry(
            "digits", digest=hashlib.sha384(data).digest(), size=len(data), engine=engine
        ),
        "secret": ModelEntry("secret", reason="AccessDeniedException: attestation mismatch"),
    }


async def test_catalog(service_models: dict[str, ModelEntry]) -> None:
    with trio.fail_after(10):
        async with connected(InferenceService(service_models)) as client:
            models = {m.name: m for m in await client.list_models()}
    assert models["digits"].available
    assert models["digits"].digest == service_models["digits"].digest.hex()  # type: ignore[union-attr]
    assert [(s.name, s.dtype, s.shape) for s in models["digits"].inputs] == [
        ("pixels", "float32", (None, 64))
    ]
    assert models["digits"].batchable
    assert not models["secret"].available
    assert "AccessDenied" in (models["secret"].reason or "")


async def test_unary_and_stream_accuracy(service_models: dict[str, ModelEntry]) -> None:
    x, y = load_test_split()
    with trio.fail_after(20):
        async with connected(InferenceService(service_models)) as client:
            out = await client.infer("digits", {"pixels": x[:5]})
            assert out["label"].tolist() == y[:5].tolist() or (out["label"] == y[:5]).mean() > 0.5
            chunks = ({"pixels": x[i : i + 16]} for i in range(0, len(x), 16))
            labels = [o["label"] async for o in client.stream("digits", chunks)]
    pred = np.concatenate(labels)
    assert pred.shape == y.shape
    assert (pred == y).mean() > 0.95


async def test_errors_are_per_stream(service_models: dict[str, ModelEntry]) -> None:
    x, _ = load_test_split()
    with trio.fail_after(20):
        async with connected(InferenceService(service_models)) as client:
            with pytest.raises(ModelNotFoundError):
                await client.infer("nope", {"pixels": x[:1]})
            with pytest.raises(ModelUnavailableError, match="attestation mismatch"):
                await client.infer("secret", {"pixels": x[:1]})
            with pytest.raises(InvalidInputError, match="dtype float64"):
                await client.infer("digits", {"pixels": x[:1].astype(np.float64)})
            with pytest.raises(InvalidInputError, match="dimension 1 is 10"):
                await client.infer("digits", {"pixels": np.zeros((1, 10), np.float32)})
            with pytest.raises(InvalidInputError, match="unknown input"):
                await client.infer("digits", {"image": x[:1]})
            # Raw malformed tensors straight through RPC.
            rpc = client._rpc
            bad = {"dtype": "float32", "shape": [1, 64], "data": b"\x00" * 10}
            with pytest.raises(RpcError) as info:
                await rpc.call("infer", {"model": "digits", "inputs": {"pixels": bad}})
            assert info.value.code == "invalid_argument"
            with pytest.raises(RpcError) as info:
                await rpc.call("infer", ["not", "a", "map"])
            assert info.value.code == "invalid_argument"
            with pytest.raises(RpcError) as info:
                await rpc.call("shutdown", {})
            assert info.value.code == "unimplemented"
            # A bad message mid-stream ends that stream with an error naming its position.
            good = {"pixels": x[:2]}
            items = [good, good, {"pixels": x[:2].astype(np.float16)}, good]
            got: list[object] = []

            async def consume(coalesce: int) -> None:
                async for o in client.stream("digits", items, coalesce_bytes=coalesce):
                    got.append(o)

            # One input per message: the two before the bad one are answered.
            with pytest.raises(InvalidInputError, match="stream message 2"):
                await consume(0)
            assert len(got) == 2
            # Coalesced into one message: that message fails as a whole, naming the item.
            got.clear()
            with pytest.raises(InvalidInputError, match="stream message 2"):
                await consume(1 << 20)
            assert got == []
            # ... and the connection still serves.
            assert (await client.infer("digits", {"pixels": x[:3]}))["label"].shape == (3,)


async def test_zero_rows_answer_invalid_argument(service_models: dict[str, ModelEntry]) -> None:
    """Regression (issue 10, item 11): a zero-row request answered ``internal``."""
    x, _ = load_test_split()
    empty = {"pixels": np.zeros((0, 64), np.float32)}
    with trio.fail_after(10):
        async with connected(InferenceService(service_models)) as client:
            wire = {"pixels": encode_tensor(empty["pixels"])}
            with pytest.raises(RpcError) as info:
                await client._rpc.call("infer", {"model": "digits", "inputs": wire})
            assert info.value.code == "invalid_argument"
            assert "empty" in info.value.message
            with pytest.raises(InvalidInputError, match=r"stream message 1: .*empty"):
                async for _ in client.stream("digits", [{"pixels": x[:1]}, empty]):
                    pass
            assert (await client.infer("digits", {"pixels": x[:2]}))["label"].shape == (2,)


async def test_oversized_request_refused(service_models: dict[str, ModelEntry]) -> None:
    service = InferenceService(service_models, max_request_bytes=64 * 4 * 100)
    with trio.fail_after(10):
        async with connected(service) as client:
            with pytest.raises(InvalidInputError, match="exceeds"):
                await client.infer("digits", {"pixels": np.zeros((101, 64), np.float32)})
            out = await client.infer("digits", {"pixels": np.zeros((100, 64), np.float32)})
            assert out["label"].shape == (100,)


async def test_concurrent_streams_and_unary(service_models: dict[str, ModelEntry]) -> None:
    x, y = load_test_split()
    results: dict[int, np.ndarray] = {}
    with trio.fail_after(30):
        async with connected(InferenceService(service_models)) as client:

            async def streamer(k: int) -> None:
                chunks = ({"pixels": x[i : i + 8]} for i in range(0, 160, 8))
                results[k] = np.concatenate(
                    [o["label"] async for o in client.stream("digits", chunks)]
                )

            async def bad_streamer() -> None:
                with pytest.raises(InvalidInputError):
                    async for _ in client.stream("digits", [{"pixels": x[:1, :3]}]):
                        pass

            async with trio.open_nursery() as nursery:
                for k in range(6):
                    nursery.start_soon(streamer, k)
                for _ in range(3):
                    nursery.start_soon(bad_streamer)
    for k in range(6):
        assert np.array_equal(results[k], results[0])
    assert (results[0] == y[:160]).mean() > 0.95
    stats = service_models["digits"].engine.statistics()  # type: ignore[union-attr]
    assert stats.largest_batch > 8  # messages of different streams/messages were batched


async def test_stream_cancellation_leaves_connection_usable(
    service_models: dict[str, ModelEntry],
) -> None:
    x, _ = load_test_split()
    with trio.fail_after(10):
        async with connected(InferenceService(service_models)) as client:

            def endless() -> object:
                while True:
                    yield {"pixels": x[:4]}

            n = 0
            gen = client.stream("digits", endless())  # type: ignore[arg-type]
            async for _ in gen:
                n += 1
                if n == 25:
                    break
            await gen.aclose()
            assert (await client.infer("digits", {"pixels": x[:1]}))["label"].shape == (1,)


async def test_wire_tensor_roundtrip_through_encode() -> None:
    from models.client import _outputs

    with pytest.raises(InferenceError):
        _outputs({"nothing": 1})
    assert encode_tensor(np.zeros(2, np.int64))["dtype"] == "int64"


async def test_stream_coalescing_matches_single_messages(
    service_models: dict[str, ModelEntry],
) -> None:
    x, _ = load_test_split()
    items = [{"pixels": x[i : i + 3]} for i in range(0, 300, 3)]  # 100 inputs
    with trio.fail_after(20):
        async with connected(InferenceService(service_models)) as client:
            single = [o async for o in client.stream("digits", items, coalesce_bytes=0)]

            async def agen() -> object:
                for item in items:
                    yield item

            coalesced = [o async for o in client.stream("digits", items)]
            from_async = [o async for o in client.stream("digits", agen())]  # type: ignore[arg-type]
    assert len(single) == len(coalesced) == len(from_async) == 100
    for a, b, c in zip(single, coalesced, from_async, strict=True):
        assert np.array_equal(a["label"], b["label"])
        assert np.array_equal(a["label"], c["label"])
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=1e-5, atol=1e-7)


# --- memory and time bounds (issue 10, items 4 and 5) ---------------------------------------

#: Small budgets, so the tests reach them with small messages.
SMALL = ServiceLimits(
    max_request_bytes=1 << 20,
    stream_buffer_bytes=64 << 10,
    connection_buffer_bytes=256 << 10,
    server_buffer_bytes=512 << 10,
)


def _inline_models(service_models: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
    """The digits model run inline: no worker threads, so an autojump clock stays exact."""
    import hashlib

    data = MODEL_PATH.read_bytes()
    engine = ModelEngine("digits", create_session(data), config=EngineConfig(execution="inline"))
    return {"digits": ModelEntry("digits", digest=hashlib.sha384(data).digest(), engine=engine)}


async def _drain(st: RpcStream) -> None:
    """Receive until the stream ends or fails."""
    while True:
        await st.receive()


def _attack_message(rows: int, items: int = 1) -> dict[str, object]:
    x = np.random.default_rng(1).random((rows, 64), dtype=np.float32)
    if items == 1:
        return {"inputs": encode_tensors({"pixels": x})}
    return {"batch": [encode_tensors({"pixels": x}) for _ in range(items)]}


async def test_a_client_that_never_reads_is_held_to_the_budgets(
    service_models: dict[str, ModelEntry],
) -> None:
    """Regression (issue 10, item 4): the stream's read-ahead took 64 messages per stream and
    returned their credit, so a client that never read its answers could make the server hold
    without bound. Now what the service holds stays within its byte budgets, the attacker's
    sends stop, and another connection is served meanwhile."""
    service = InferenceService(service_models, limits=SMALL)
    message = _attack_message(rows=200)  # 51 KB of tensor data
    size = message_bytes(message)
    sent = 0
    with trio.fail_after(20):
        async with raw_connection(service) as attacker, connected(service) as other:

            async def flood() -> None:
                nonlocal sent
                with contextlib.suppress(RpcError):
                    async with attacker.open_stream("stream", {"model": "digits"}) as st:
                        while True:
                            await st.send(message)
                            sent += 1

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(flood)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                stalled_at = sent
                await trio.sleep(0.2)
                assert sent == stalled_at  # every flooding stream is held by flow control
                x, _ = load_test_split()
                assert (await other.infer("digits", {"pixels": x[:4]}))["label"].shape == (4,)
                held = service.statistics()
                nursery.cancel_scope.cancel()
    # Accounted: the connection's budget plus one message (a batch's one overshoot); the
    # answers of the batches in progress are tiny next to their inputs here.
    assert held.peak <= SMALL.connection_buffer_bytes + size + (64 << 10), held
    # Per stream: the answers the client's receive window takes without being read (16
    # messages), the one batch the server holds (64 KiB: two messages), and the server's
    # receive window (16). The old read-ahead took 64 more per stream.
    assert sent <= 8 * (16 + 2 + 16), sent


async def test_waiting_streams_beyond_the_limit_are_refused(
    service_models: dict[str, ModelEntry],
) -> None:
    """A stream that took a message and finds no room waits (holding it); waiters are bounded,
    the next is refused with resource_exhausted and its message dropped at once."""
    service = InferenceService(service_models, limits=SMALL)
    message = _attack_message(rows=250, items=4)  # 256 KB: one fills the connection budget
    codes: list[str] = []
    with trio.fail_after(20):
        async with raw_connection(service) as attacker:

            async def one() -> None:
                try:
                    async with attacker.open_stream("stream", {"model": "digits"}) as st:
                        while True:
                            await st.send(message)
                except RpcError as exc:
                    codes.append(exc.code)

            async with trio.open_nursery() as nursery:
                for _ in range(MAX_WAITING_PER_CONNECTION + 4):
                    nursery.start_soon(one)
                with trio.move_on_after(5):
                    while not codes:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    assert "resource_exhausted" in codes


async def test_unread_answers_fail_the_stream_and_free_their_memory(
    service_models: dict[str, ModelEntry], autojump_clock: trio.testing.MockClock
) -> None:
    """Issue 10, item 5: answers a client does not read fail the stream after send_timeout_s
    (deadline_exceeded), which frees what the server held for it."""
    limits = ServiceLimits(send_timeout_s=5.0, idle_timeout_s=600.0)
    service = InferenceService(_inline_models(service_models), limits=limits)
    message = _attack_message(rows=100)
    with trio.fail_after(60):
        async with (
            raw_connection(service) as client,
            client.open_stream("stream", {"model": "digits"}) as st,
        ):
            for _ in range(40):  # until the server stops taking more: its answers wait
                with trio.move_on_after(1) as blocked:
                    await st.send(message)
                if blocked.cancelled_caught:
                    break
            assert service.statistics().used > 0
            await trio.sleep(limits.send_timeout_s + 1)
            assert service.statistics().used == 0
            with pytest.raises(RpcError) as info:
                await _drain(st)
            assert info.value.code == "deadline_exceeded"
            assert "did not read its answers" in info.value.message


async def test_idle_stream_is_closed(
    service_models: dict[str, ModelEntry], autojump_clock: trio.testing.MockClock
) -> None:
    limits = ServiceLimits(idle_timeout_s=7.0)
    service = InferenceService(_inline_models(service_models), limits=limits)
    with trio.fail_after(60):
        async with raw_connection(service) as client:
            t0 = trio.current_time()
            async with client.open_stream("stream", {"model": "digits"}) as st:
                await st.send(_attack_message(rows=2))
                await st.receive()
                with pytest.raises(RpcError) as info:
                    await st.receive()  # no more input from us: the server gives up
            assert info.value.code == "deadline_exceeded"
            assert "no input for 7 s" in info.value.message
            assert 7 <= trio.current_time() - t0 < 8
            # An infer request that never comes is bounded the same way.
            async with client.open_stream("infer") as st:
                with pytest.raises(RpcError, match="no input"):
                    await st.receive()


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="nest"):
        ServiceLimits(stream_buffer_bytes=2 << 20, connection_buffer_bytes=1 << 20)
    with pytest.raises(ValueError, match="positive"):
        ServiceLimits(server_buffer_bytes=0)
    with pytest.raises(ValueError, match="send_timeout_s"):
        ServiceLimits(send_timeout_s=0)


def test_message_bytes_counts_payload_and_objects() -> None:
    small = message_bytes({"inputs": {}})
    big = message_bytes(_attack_message(rows=100))
    assert big >= 100 * 64 * 4
    assert small < 1000
    # Many tiny objects are counted by number, and the walk is bounded (at 4 MiB's worth).
    assert message_bytes([None] * 1000) >= 1000 * 64
    assert message_bytes([None] * 200_000) >= 4 << 20
