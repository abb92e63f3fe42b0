"""Text models in the inference service, over in-memory streams with the real MiniLM: the
catalog, embed and embed_stream, the limits (each its own error, other streams going on),
batching across concurrent requests, deadlines that stop the work, and the byte budgets."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio
import trio.testing

from models.digits import MODEL_PATH
from models.engine import ModelEngine, create_session
from models.errors import (
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    ModelUnavailableError,
)
from models.service import InferenceService, ModelEntry, ServiceLimits, message_bytes
from models.text.embedder import Embedder
from models.text.embeddings import Embeddings
from models.text.engine import TextEngine, TextEngineConfig
from models.text.errors import (
    EmptyInputError,
    EmptyTextError,
    InvalidUtf8Error,
    RequestTooLargeError,
    TextInputError,
    TextTooLargeError,
    TooManyTextsError,
)
from models.text.limits import TextLimits
from models.text.wire import decode_answer, encode_texts
from tests.models.helpers import connected, raw_connection
from tests.models.minilm_support import minilm_bundle, minilm_embedder
from transport.rpc import RpcError

TEXTS = [
    "The patient reports chest pain after climbing stairs.",
    "Invoice 4471 is overdue by thirty days.",
    "The tenant may terminate the lease with two months' notice.",
    "ok",
]
LONG = " ".join(["The loan agreement was signed in the presence of a notary."] * 40)


@pytest.fixture(scope="module")
def small_embedder() -> Embedder:
    """MiniLM with small request limits (the limit cases)."""
    return Embedder(
        minilm_bundle(),
        limits=TextLimits(max_texts=4, max_text_bytes=400, max_total_bytes=600),
    )


def _models(embedder: Embedder, **config: object) -> dict[str, ModelEntry]:
    data = MODEL_PATH.read_bytes()
    return {
        "minilm": ModelEntry(
            "minilm",
            digest=b"\x01" * 48,
            size=1,
            engine=TextEngine("minilm", embedder, config=TextEngineConfig(**config)),  # type: ignore[arg-type]
        ),
        "digits": ModelEntry("digits", engine=ModelEngine("digits", create_session(data))),
    }


@asynccontextmanager
async def serving(service: InferenceService) -> AsyncIterator[trio.Nursery]:
    """The service's background tasks (the text engines), for the block."""
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield nursery
        nursery.cancel_scope.cancel()


async def test_the_catalog_describes_text_in_embeddings_out() -> None:
    service = InferenceService(_models(minilm_embedder()))
    with trio.fail_after(10):
        async with serving(service), connected(service) as client:
            models = {m.name: m for m in await client.list_models()}
    text = models["minilm"]
    assert text.available
    assert text.is_text
    assert text.kind == "text-embedding"
    assert [(s.name, s.dtype, s.shape) for s in text.inputs] == [("texts", "string", (None,))]
    assert [(s.name, s.dtype, s.shape) for s in text.outputs] == [
        ("embeddings", "float32", (None, 384))
    ]
    assert text.text is not None
    assert text.text["max_seq_length"] == 256
    assert text.text["max_texts"] == 256
    assert models["digits"].kind == "tensor"
    assert not models["digits"].is_text


async def test_embed_matches_the_in_process_embedder_and_reports_truncation() -> None:
    embedder = minilm_embedder()
    service = InferenceService(_models(embedder))
    texts = [*TEXTS, LONG]
    with trio.fail_after(30):
        async with serving(service), connected(service) as client:
            got = await client.embed("minilm", texts)
            streamed = [e async for e in client.embed_stream("minilm", [texts[:2], texts[2:]])]
    want = embedder.embed(texts)
    assert got.vectors.shape == (5, 384)
    assert got.vectors.dtype == np.float32
    np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-5)
    assert got.truncated == (False, False, False, False, True)
    assert [len(e) for e in streamed] == [2, 3]
    np.testing.assert_allclose(
        np.concatenate([e.vectors for e in streamed]), want.vectors, atol=1e-5
    )
    assert streamed[1].truncated == (False, False, True)


@pytest.mark.parametrize(
    ("texts", "error"),
    [
        ([], EmptyInputError),
        (["a"] * 5, TooManyTextsError),
        (["a", "b" * 401], TextTooLargeError),
        (["a" * 300, "b" * 301], RequestTooLargeError),
        (["fine", b"\xff\xfe"], InvalidUtf8Error),
        (["fine", "   "], EmptyTextError),
        (["fine", "\u200b"], EmptyTextError),  # no tokens at all: found by the tokenizer
    ],
)
async def test_each_limit_is_its_own_error_and_other_streams_go_on(
    small_embedder: Embedder, texts: list[str | bytes], error: type[TextInputError]
) -> None:
    service = InferenceService(_models(small_embedder))
    with trio.fail_after(30):
        async with serving(service), connected(service) as client:
            done: list[Embeddings] = []

            async def other() -> None:  # a stream that is busy meanwhile, on the same connection
                async for e in client.embed_stream("minilm", [TEXTS[:2]] * 3):
                    done.append(e)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)
                with pytest.raises(error) as info:
                    await client.embed("minilm", texts)
            assert type(info.value) is error
            assert len(done) == 3
            # The connection is still usable after the refusal.
            assert len(await client.embed("minilm", ["still here"])) == 1


async def test_a_stream_fails_at_the_bad_message_after_answering_the_ones_before() -> None:
    service = InferenceService(_models(minilm_embedder()))
    answered: list[Embeddings] = []
    with trio.fail_after(30):
        async with serving(service), connected(service) as client:

            async def collect() -> None:
                batches = [TEXTS[:1], TEXTS[1:3], [b"ok", b"\xc3"], TEXTS[:1]]
                async for e in client.embed_stream("minilm", batches):
                    answered.append(e)

            with pytest.raises(InvalidUtf8Error, match="stream message 2"):
                await collect()
            assert [len(e) for e in answered] == [1, 2]


async def test_the_wrong_method_for_the_kind_of_model_is_refused() -> None:
    service = InferenceService(_models(minilm_embedder()))
    x = np.zeros((1, 64), np.float32)
    with trio.fail_after(10):
        async with serving(service), connected(service) as client:
            with pytest.raises(InvalidInputError, match="takes texts"):
                await client.infer("minilm", {"pixels": x})
            with pytest.raises(InvalidInputError, match="takes tensors"):
                await client.embed("digits", ["hello"])
            assert (await client.infer("digits", {"pixels": x}))["label"].shape == (1,)


async def test_a_model_whose_engine_does_not_run_is_unavailable() -> None:
    service = InferenceService(_models(minilm_embedder()))
    with trio.fail_after(10):
        async with connected(service) as client:  # service.run never started
            with pytest.raises(ModelUnavailableError, match="not running"):
                await client.embed("minilm", ["hello"])


async def test_concurrent_requests_are_batched_by_length_in_shared_rounds() -> None:
    """32 clients with one text each: the engine joins them into a few rounds (the first one
    alone, the others together), and each gets its own row, as if it had been alone."""
    embedder = minilm_embedder()
    service = InferenceService(_models(embedder))
    engine = service.models["minilm"].engine
    assert isinstance(engine, TextEngine)
    texts = [f"{TEXTS[i % 3]} Case {i}." for i in range(32)]
    results: dict[int, Embeddings] = {}
    before = engine.statistics()
    with trio.fail_after(60):
        async with serving(service), connected(service) as client:

            async def one(i: int) -> None:
                results[i] = await client.embed("minilm", [texts[i]])

            async with trio.open_nursery() as nursery:
                for i in range(32):
                    nursery.start_soon(one, i)
    stats = engine.statistics()
    rounds = stats.rounds - before.rounds
    assert rounds < 8, rounds  # not 32
    assert stats.largest_round > 1
    want = embedder.embed(texts).vectors
    got = np.stack([results[i].vectors[0] for i in range(32)])
    np.testing.assert_allclose(got, want, atol=1e-5)


async def test_a_deadline_stops_the_work_and_the_model_keeps_serving() -> None:
    """A request past its deadline ends in InferenceTimeoutError, its remaining batches are
    skipped or stopped in onnxruntime (RunOptions.terminate), and the next request is served."""
    embedder = Embedder(minilm_bundle(), threads=1, max_batch_texts=4)
    service = InferenceService(_models(embedder, timeout_s=0.3))
    engine = service.models["minilm"].engine
    assert isinstance(engine, TextEngine)
    heavy = [LONG + f" {i}" for i in range(64)]  # 16 runs of 4 x 256 tokens: seconds
    with trio.fail_after(60):
        async with serving(service), connected(service) as client:
            with pytest.raises(InferenceTimeoutError, match=r"exceeded 0\.3 s"):
                await client.embed("minilm", heavy)
            # The answer came at the deadline, not when the work ran out: most of the 16
            # runs were not done when the client had it.
            at_answer = engine.statistics()
            assert at_answer.timeouts == 1
            assert at_answer.runs < 16
            assert len(await client.embed("minilm", ["quick"])) == 1
    stats = engine.statistics()
    assert stats.timeouts == 1
    assert stats.terminated_runs + stats.skipped_runs >= 1
    assert stats.runs < 16  # the work stopped; it did not run to the end


async def test_a_client_that_never_reads_is_held_to_the_byte_budgets() -> None:
    """The service's byte budgets count text requests and their answers like tensors."""
    limits = ServiceLimits(
        stream_buffer_bytes=64 << 10, connection_buffer_bytes=256 << 10, server_buffer_bytes=1 << 20
    )
    service = InferenceService(_models(minilm_embedder()), limits=limits)
    message = {"texts": encode_texts([f"short text number {i}" for i in range(200)])}
    # What one message holds: its texts, then the answer: 200 rows of 384 float32 (300 KiB).
    size = message_bytes(message) + 200 * 384 * 4 + 202 * 64
    sent = 0
    with trio.fail_after(60):
        async with (
            serving(service),
            raw_connection(service) as attacker,
            connected(service) as other,
        ):

            async def flood() -> None:
                nonlocal sent
                with contextlib.suppress(RpcError):
                    async with attacker.open_stream("embed_stream", {"model": "minilm"}) as st:
                        for _ in range(200):
                            await st.send(message)
                            sent += 1

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(flood)
                await trio.sleep(2)
                stalled_at = sent
                await trio.sleep(0.5)
                assert sent == stalled_at  # held by flow control and the budgets
                assert len(await other.embed("minilm", ["served meanwhile"])) == 1
                held = service.statistics()
                nursery.cancel_scope.cancel()
    # The connection's budget, overshot by one message at most (a batch takes what waits).
    assert held.peak <= limits.connection_buffer_bytes + size, held
    assert sent < 4 * 40, sent


def test_message_bytes_sizes_text_requests_by_their_bytes() -> None:
    small = message_bytes({"model": "m", "texts": [b"a"]})
    big = message_bytes({"model": "m", "texts": [b"a" * 1000] * 100})
    assert big >= 100_000 > small
    assert message_bytes({"texts": ["é" * 10]}) > message_bytes({"texts": []})


def test_wire_answers_are_checked() -> None:
    good = {
        "embeddings": {"dtype": "float32", "shape": [1, 3], "data": bytes(12)},
        "truncated": [False],
    }
    assert decode_answer(good, texts=1).vectors.shape == (1, 3)
    for bad in (
        {**good, "truncated": [False, True]},
        {**good, "truncated": [1]},
        {**good, "embeddings": {"dtype": "float64", "shape": [1, 3], "data": bytes(24)}},
        {**good, "embeddings": {"dtype": "float32", "shape": [1, 3], "data": bytes(8)}},
        {"embeddings": good["embeddings"]},
        [good],
    ):
        with pytest.raises(InferenceError):
            decode_answer(bad, texts=1)
    with pytest.raises(InvalidUtf8Error):
        encode_texts(["ok", "\ud800"])
    with pytest.raises(TextInputError, match="not one string"):
        encode_texts("one string")  # type: ignore[arg-type]


async def test_short_rounds_run_inline_and_long_ones_in_the_worker_thread() -> None:
    """execution = "auto": once a token's cost is measured, a round expected to fit in
    inline_max_s runs in the event loop (no hand-off to a thread and back), a longer one in
    the worker thread; the answers are the same either way."""
    embedder = minilm_embedder()
    service = InferenceService(_models(embedder, inline_max_s=0.05))
    engine = service.models["minilm"].engine
    assert isinstance(engine, TextEngine)
    assert engine.warm_up() > 0
    with trio.fail_after(60):
        async with serving(service), connected(service) as client:
            before = engine.statistics()
            short = await client.embed("minilm", TEXTS[:1])
            after_short = engine.statistics()
            long = await client.embed("minilm", [LONG] * 8)  # 8 x 256 tokens: far over 50 ms
            after_long = engine.statistics()
    assert after_short.inline_rounds == before.inline_rounds + 1
    assert after_long.inline_rounds == after_short.inline_rounds  # the thread ran it
    np.testing.assert_allclose(short.vectors, embedder.embed(TEXTS[:1]).vectors, atol=1e-5)
    np.testing.assert_allclose(long.vectors, embedder.embed([LONG] * 8).vectors, atol=1e-5)


async def test_inline_rounds_skip_the_batches_of_requests_past_their_deadline() -> None:
    """Inline, nothing can mark a request abandoned while the round runs: the round checks
    the deadlines itself between batches."""
    embedder = Embedder(minilm_bundle(), threads=1, max_batch_texts=1)
    service = InferenceService(_models(embedder, timeout_s=0.2, execution="inline"))
    engine = service.models["minilm"].engine
    assert isinstance(engine, TextEngine)
    with trio.fail_after(60):
        async with serving(service), connected(service) as client:
            with pytest.raises(InferenceTimeoutError):
                await client.embed("minilm", [LONG + f" {i}" for i in range(40)])
            assert len(await client.embed("minilm", ["quick"])) == 1
    stats = engine.statistics()
    assert stats.skipped_runs >= 1
    assert stats.runs < 40
