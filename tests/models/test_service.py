"""Server and client over in-memory streams with a real onnxruntime session (no channel)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio
import trio.testing

from models.client import InferenceClient
from models.digits import MODEL_PATH, load_test_split
from models.engine import ModelEngine, create_session
from models.errors import (
    InferenceError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from models.service import InferenceService, ModelEntry
from models.tensors import encode_tensor
from transport.rpc import RpcError, open_rpc_client, serve_rpc


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


@asynccontextmanager
async def connected(service: InferenceService) -> AsyncIterator[InferenceClient]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_rpc, server_stream, service.handle)
        async with open_rpc_client(client_stream) as rpc:
            yield InferenceClient(rpc, channel=None)
        nursery.cancel_scope.cancel()


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
