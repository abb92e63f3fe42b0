"""Embedder: text in, float32 [N, 384] out, in the caller's order, with truncation flags."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.errors import InferenceError, ModelLoadError
from models.text.bundle import BundleConfig, decode_bundle, encode_bundle
from models.text.embedder import Embedder, available_cpus
from models.text.errors import (
    EmptyInputError,
    EmptyTextError,
    InvalidUtf8Error,
    TextInputError,
    TextTooLargeError,
    TooManyTextsError,
)
from models.text.limits import TextLimits
from tests.models.helpers import slow_model
from tests.models.minilm_support import minilm_bundle, minilm_embedder

MIXED = [
    "Short query",
    " ".join(["The loan agreement was signed by both parties in the presence of a notary."] * 5),
    "Refund requested for order 5512.",
    " ".join(["The patient reports mild chest pain on exertion, relieved by rest."] * 40),
    "ok then",
    "Quarterly revenue grew by twelve percent, mostly from subscriptions.",
]


def test_embeds_in_the_callers_order_whatever_the_batching() -> None:
    e = minilm_embedder()
    out = e.embed(MIXED)
    assert out.vectors.shape == (len(MIXED), 384)
    assert out.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)
    for i, text in enumerate(MIXED):
        alone = e.embed([text]).vectors[0]
        assert np.abs(out.vectors[i] - alone).max() < 1e-5, i


def test_tiny_batches_give_the_same_answer() -> None:
    e = minilm_embedder()
    small = Embedder(minilm_bundle(), max_batch_texts=1)
    np.testing.assert_allclose(small.embed(MIXED).vectors, e.embed(MIXED).vectors, atol=1e-5)


def test_truncation_is_reported_per_text() -> None:
    out = minilm_embedder().embed(MIXED)
    assert out.truncated == (False, False, False, True, False, False)


def test_bytes_texts_are_utf8() -> None:
    e = minilm_embedder()
    a = e.embed(["Zürich café"]).vectors
    b = e.embed(["Zürich café".encode()]).vectors
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def small_limits() -> Embedder:
    return Embedder(
        minilm_bundle(), limits=TextLimits(max_texts=2, max_text_bytes=64, max_total_bytes=128)
    )


@pytest.mark.parametrize(
    ("texts", "error"),
    [
        ([], EmptyInputError),
        (["ok", ""], EmptyTextError),
        (["ok", b"\xff"], InvalidUtf8Error),
        (["x"] * 3, TooManyTextsError),
        (["x" * 65], TextTooLargeError),
    ],
)
def test_limits_apply_before_any_work(
    small_limits: Embedder, texts: list[object], error: type[Exception]
) -> None:
    e = small_limits
    with pytest.raises(error):
        e.embed(texts)
    assert e.embed(["still serving"]).vectors.shape == (1, 384)


def test_intra_op_threads_default_to_the_cpus_we_may_use() -> None:
    assert minilm_embedder().session.get_session_options().intra_op_num_threads == available_cpus()


def test_a_graph_with_another_signature_is_refused() -> None:
    config = BundleConfig(model_name="slow", max_seq_length=16, embedding_dim=384, vocab_size=30522)
    bundle = decode_bundle(
        encode_bundle(
            config,
            onnx=slow_model(nodes=1, width=8),
            tokenizer_json=bytes(minilm_bundle().tokenizer_json),
        )
    )
    with pytest.raises(ModelLoadError, match="signature"):
        Embedder(bundle)


def test_a_graph_that_does_not_load_is_refused() -> None:
    b = minilm_bundle()
    bundle = decode_bundle(
        encode_bundle(b.config, onnx=b"not onnx", tokenizer_json=bytes(b.tokenizer_json))
    )
    with pytest.raises(ModelLoadError, match="does not load"):
        Embedder(bundle)


def test_a_bundle_whose_dimension_disagrees_with_the_graph_is_refused() -> None:
    b = minilm_bundle()
    config = BundleConfig(model_name="x", max_seq_length=256, embedding_dim=768, vocab_size=30522)
    bundle = decode_bundle(
        encode_bundle(config, onnx=bytes(b.onnx), tokenizer_json=bytes(b.tokenizer_json))
    )
    with pytest.raises(ModelLoadError, match="signature"):
        Embedder(bundle)


def test_the_embedder_imports_only_what_the_enclave_image_carries() -> None:
    """No onnx, safetensors, torch or the weights package at serving time."""
    code = (
        "import sys, models.text.embedder, models.text.bundle;"
        "bad = {'onnx', 'safetensors', 'torch', 'all_minilm_l6_v2', 'sentence_transformers'};"
        "print(sorted(bad & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=4))
def test_any_unicode_text_embeds_to_a_unit_vector_or_is_refused_clearly(texts: list[str]) -> None:
    try:
        out = minilm_embedder().embed(texts)
    except TextInputError:
        return
    assert out.vectors.shape == (len(texts), 384)
    assert np.isfinite(out.vectors).all()
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-4)
    assert len(out.truncated) == len(texts)


def test_a_terminated_run_is_an_inference_error_and_the_embedder_keeps_serving() -> None:
    """RunOptions.terminate (what a deadline sets from another thread) stops the run."""
    e = minilm_embedder()
    stop = ort.RunOptions()
    stop.terminate = True
    with pytest.raises(InferenceError, match="inference failed") as info:
        e.embed(MIXED, run_options=stop)
    assert "terminate" in str(info.value.__cause__).lower()
    assert e.embed(["still serving"]).vectors.shape == (1, 384)
