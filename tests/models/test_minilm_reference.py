"""The ONNX graph against an independent numpy BERT, and against the meaning of sentences.

Nothing here trusts the graph: the reference (tests/models/minilm_reference.py) is separate
code reading the same safetensors weights; the similarity table is what the model is for.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.text.batching import Batch, pad_batch
from models.text.embedder import session_options
from models.text.graph import OPSET
from tests.models import minilm_reference as ref
from tests.models.minilm_support import minilm_bundle, minilm_embedder, minilm_source

# Real sentences of different lengths, so a batch of them carries padding.
SENTENCES = [
    "The patient was discharged after three days of observation.",
    "Hello, world!",
    "Interest rates rose sharply in the second quarter, squeezing lenders' margins.",
    "Café owners in Zürich don't like the new tax.",
    "A man is playing the guitar on a street corner while children dance around him.",
    "OK",
]


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(
        bytes(minilm_bundle().onnx), session_options(), providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return ref.load_weights(minilm_source().safetensors)


def _padded_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tokens = minilm_embedder().tokenizer.encode(texts)
    length = max(len(t) for t in tokens)
    return pad_batch([t.ids for t in tokens], Batch(tuple(range(len(texts))), length))


def test_onnx_graph_agrees_with_the_numpy_reference_on_a_padded_batch(
    session: ort.InferenceSession, weights: dict[str, np.ndarray]
) -> None:
    ids, mask = _padded_batch(SENTENCES)
    assert (mask == 0).any(), "the batch must carry padding"
    (got,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    want = ref.sentence_embeddings(weights, ids, mask)
    assert got.shape == (len(SENTENCES), 384)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_reference_tokens_ignore_padding(weights: dict[str, np.ndarray]) -> None:
    """The reference itself: a sentence alone and padded in a batch embed the same."""
    ids, mask = _padded_batch(SENTENCES[:2])
    alone_ids, alone_mask = _padded_batch(SENTENCES[1:2])
    both = ref.sentence_embeddings(weights, ids, mask)
    alone = ref.sentence_embeddings(weights, alone_ids, alone_mask)
    assert np.abs(both[1] - alone[0]).max() < 1e-9


def test_padding_does_not_change_the_graphs_embedding(session: ort.InferenceSession) -> None:
    ids, mask = _padded_batch(SENTENCES)
    (batched,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    for row, text in enumerate(SENTENCES):
        one_ids, one_mask = _padded_batch([text])
        (alone,) = session.run(None, {"input_ids": one_ids, "attention_mask": one_mask})
        assert np.abs(batched[row] - alone[0]).max() < 1e-5, text


# (paraphrase a, paraphrase b, unrelated c): sim(a, b) must beat sim(a, c) and sim(b, c).
TRIPLES = [
    (
        "The patient was given antibiotics for a chest infection.",
        "Antibiotics were prescribed to treat the patient's lung infection.",
        "The quarterly dividend will be paid on the first of March.",
    ),
    (
        "The contract may be terminated by either party with thirty days' notice.",
        "Either side can end the agreement by giving one month's notice.",
        "A small dog chased the ball across the park.",
    ),
    (
        "The bank declined the transaction because of suspected fraud.",
        "The payment was blocked by the bank as possibly fraudulent.",
        "Heavy snow is expected in the mountains this weekend.",
    ),
    (
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "What time does the museum open on Sundays?",
    ),
    (
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
    ),
]


def test_paraphrases_are_closer_than_unrelated_sentences() -> None:
    embedder = minilm_embedder()
    for a, b, c in TRIPLES:
        va, vb, vc = embedder.embed([a, b, c]).vectors
        para, unrelated = float(va @ vb), max(float(va @ vc), float(vb @ vc))
        assert para > 0.5, (a, b, para)
        assert unrelated < 0.3, (a, c, unrelated)
        assert para > unrelated + 0.3, (a, b, c)


def test_graph_signature_and_opset() -> None:
    model = onnx.load_from_string(bytes(minilm_bundle().onnx))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= OPSET >= 17

    def dims(value: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {i.name: i for i in model.graph.input}
    assert sorted(inputs) == ["attention_mask", "input_ids"]
    for value in inputs.values():
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert dims(value) == ["batch", "sequence"]  # both axes dynamic
    (out,) = model.graph.output
    assert out.name == "sentence_embedding"
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(out) == ["batch", 384]
