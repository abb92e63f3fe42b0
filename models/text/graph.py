"""The MiniLM sentence encoder as an ONNX graph, built from safetensors arrays (no torch).

Theory of operation
-------------------
The graph is what sentence-transformers runs for all-MiniLM-L6-v2 (BertModel -> mean Pooling
-> Normalize), written node by node with :mod:`onnx.helper` in standard ONNX ops (opset 17)::

    input_ids, attention_mask: int64 [batch, seq]
    h = LayerNorm(word_emb[input_ids] + pos_emb[0..seq) + type_emb[0])
    bias = (1 - mask) * float32.min            as Hugging Face's get_extended_attention_mask
    6 x:  q, k, v = h Wq + bq, h Wk + bk, h Wv + bv       (12 heads of 32)
          a = softmax(q k^T / sqrt(32) + bias) v
          h = LayerNorm(h + a Wo + bo)
          h = LayerNorm(h + GELU(h Wi + bi) Wo2 + bo2)    GELU(x) = x/2 (1 + erf(x / sqrt 2))
    e = sum_t(h * mask) / max(sum_t(mask), 1e-9)           mean pooling over real tokens
    sentence_embedding = e / max(||e||_2, 1e-12)           float32 [batch, 384]

Token type ids are all zero for single sentences, so their embedding is one constant row and
the graph takes no ``token_type_ids`` input. The node patterns follow the torch exporter's (MatMul
+ Add, Reshape/Transpose per head, Div by sqrt(d), Erf GELU) so that onnxruntime's fusions
recognise them.

Deterministic: the same arrays give the same bytes (fixed node and initializer names and order,
fixed IR version and producer, no timestamps); :mod:`models.text.minilm` checks the SHA-384.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from models.text.errors import ModelBuildError
from models.text.weights import BertConfig

if TYPE_CHECKING:
    import onnx

__all__ = ["OPSET", "IR_VERSION", "INPUT_NAMES", "OUTPUT_NAME", "build_sentence_encoder"]

#: ONNX opset: 17 brings LayerNormalization as a standard op; every onnxruntime >= 1.14 runs it.
OPSET: Final = 17
#: IR version 8 is the one opset 17 was released with (pinned: onnx's default moves).
IR_VERSION: Final = 8
INPUT_NAMES: Final = ("input_ids", "attention_mask")
OUTPUT_NAME: Final = "sentence_embedding"
PRODUCER: Final = "enclave-runtime models.text.graph"
#: Bump when the graph changes shape (the recorded SHA-384 changes with it).
GRAPH_VERSION: Final = "1"
#: sentence-transformers' clamp on the token count (Pooling) and F.normalize's epsilon.
POOL_MIN_COUNT: Final = 1e-9
NORMALIZE_EPS: Final = 1e-12


class _Builder:
    """Accumulates nodes and initializers with deterministic, readable names."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self._helper = helper
        self._numpy_helper = numpy_helper
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        if name in self._names:
            raise ModelBuildError(f"duplicate initializer {name}")
        self._names.add(name)
        self.initializers.append(self._numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        if output in self._names:
            raise ModelBuildError(f"duplicate tensor {output}")
        self._names.add(output)
        name = f"{output}/{op_type}"
        self.nodes.append(self._helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output


def _weight(weights: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = weights[name]
    except KeyError:
        raise ModelBuildError(f"weights lack {name}") from None
    if array.shape != shape or array.dtype != np.float32:
        raise ModelBuildError(f"{name} is {array.dtype}{array.shape}, expected float32{shape}")
    return array


def build_sentence_encoder(
    weights: Mapping[str, np.ndarray], config: BertConfig
) -> onnx.ModelProto:
    """The sentence-embedding graph for a BERT checkpoint's arrays.

    Args:
        weights: the Hugging Face ``BertModel`` state dict as numpy arrays (``embeddings.*``,
            ``encoder.layer.N.*``; the pooler is unused, as in sentence-transformers).
        config: the checkpoint's hyper-parameters.

    Returns:
        The ONNX model: inputs ``input_ids``/``attention_mask`` int64 [batch, seq], output
        ``sentence_embedding`` float32 [batch, hidden].

    Raises:
        ModelBuildError: an array is missing or has the wrong shape or dtype.
    """
    from onnx import TensorProto, helper

    b = _Builder()
    hid, heads, hd = config.hidden_size, config.num_heads, config.head_size
    eps = config.layer_norm_eps

    def w(name: str, *shape: int) -> np.ndarray:
        return _weight(weights, name, shape)

    # Shared constants.
    b.const("const/one_f", np.array(1.0, np.float32))
    b.const("const/mask_min", np.array(np.finfo(np.float32).min, np.float32))
    b.const("const/sqrt_head", np.array(np.sqrt(hd), np.float32))
    b.const("const/sqrt2", np.array(np.sqrt(2.0), np.float32))
    b.const("const/half", np.array(0.5, np.float32))
    b.const("const/zero_1d", np.array([0], np.int64))
    b.const("const/axes_1", np.array([1], np.int64))
    b.const("const/axes_2", np.array([2], np.int64))
    b.const("const/heads_shape", np.array([0, 0, heads, hd], np.int64))
    b.const("const/merge_shape", np.array([0, 0, hid], np.int64))
    b.const("const/pool_min", np.array(POOL_MIN_COUNT, np.float32))
    b.const("const/norm_eps", np.array(NORMALIZE_EPS, np.float32))

    # Embeddings.
    word = b.const("emb/word", w("embeddings.word_embeddings.weight", config.vocab_size, hid))
    pos = b.const(
        "emb/position",
        w("embeddings.position_embeddings.weight", config.max_position_embeddings, hid),
    )
    token_type = w("embeddings.token_type_embeddings.weight", config.type_vocab_size, hid)
    b.const("emb/token_type0", token_type[0])
    b.const("emb/ln_gamma", w("embeddings.LayerNorm.weight", hid))
    b.const("emb/ln_beta", w("embeddings.LayerNorm.bias", hid))
    # Positions 0..seq-1 are the first seq rows of the table: a Slice, with 1-D bounds (a
    # Range + Gather here is rewritten by onnxruntime 1.32's optimizer into a Slice with scalar
    # bounds that then fails at run time).
    b.op("Shape", ["input_ids"], "emb/ids_shape", start=1, end=2)
    b.op("Gather", [word, "input_ids"], "emb/words", axis=0)
    b.op("Slice", [pos, "const/zero_1d", "emb/ids_shape", "const/zero_1d"], "emb/positions")
    b.op("Add", ["emb/words", "emb/positions"], "emb/sum1")
    b.op("Add", ["emb/sum1", "emb/token_type0"], "emb/sum2")
    h = b.op(
        "LayerNormalization",
        ["emb/sum2", "emb/ln_gamma", "emb/ln_beta"],
        "emb/out",
        axis=-1,
        epsilon=eps,
    )

    # Additive attention bias [batch, 1, 1, seq]: 0 on real tokens, float32.min on padding.
    # (Unsqueeze, Unsqueeze, Cast, Sub, Mul: the exporter's node sequence, which onnxruntime's
    # attention fusion matches.)
    b.op("Unsqueeze", ["attention_mask", "const/axes_1"], "mask/b1s")
    b.op("Unsqueeze", ["mask/b1s", "const/axes_2"], "mask/b11s")
    b.op("Cast", ["mask/b11s"], "mask/b11s_float", to=TensorProto.FLOAT)
    b.op("Sub", ["const/one_f", "mask/b11s_float"], "mask/inverted")
    bias = b.op("Mul", ["mask/inverted", "const/mask_min"], "mask/bias")

    for i in range(config.num_layers):
        h = _layer(b, weights, config, i, h, bias)

    # Mean pooling over real tokens, then L2 normalisation (sentence-transformers' Pooling and
    # Normalize modules).
    b.op("Cast", ["attention_mask"], "mask/float", to=TensorProto.FLOAT)
    b.op("Unsqueeze", ["mask/float", "const/axes_2"], "pool/mask_bs1")
    b.op("Mul", [h, "pool/mask_bs1"], "pool/masked")
    b.op("ReduceSum", ["pool/masked", "const/axes_1"], "pool/sum", keepdims=0)
    b.op("ReduceSum", ["pool/mask_bs1", "const/axes_1"], "pool/count", keepdims=0)
    b.op("Max", ["pool/count", "const/pool_min"], "pool/count_clamped")
    b.op("Div", ["pool/sum", "pool/count_clamped"], "pool/mean")
    b.op("ReduceL2", ["pool/mean"], "norm/l2", axes=[1], keepdims=1)
    b.op("Max", ["norm/l2", "const/norm_eps"], "norm/l2_clamped")
    b.op("Div", ["pool/mean", "norm/l2_clamped"], OUTPUT_NAME)

    graph = helper.make_graph(
        b.nodes,
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in INPUT_NAMES
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", hid])],
        initializer=b.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version=GRAPH_VERSION,
        doc_string="all-MiniLM-L6-v2 sentence embeddings: BERT encoder, masked mean pooling, "
        "L2 normalisation (built from the safetensors weights by enclave-runtime)",
    )
    model.ir_version = IR_VERSION
    return model


def _layer(
    b: _Builder,
    weights: Mapping[str, np.ndarray],
    config: BertConfig,
    i: int,
    h: str,
    bias: str,
) -> str:
    """One encoder layer: self-attention + residual + LayerNorm, FFN + residual + LayerNorm."""
    hid, inter, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
    src = f"encoder.layer.{i}."
    p = f"l{i}/"

    def dense(name: str, x: str, weight: str, bias_name: str, n_in: int, n_out: int) -> str:
        # Hugging Face Linear stores [out, in] and computes x W^T + b: store W^T for MatMul.
        wt = _weight(weights, src + weight, (n_out, n_in)).T
        b.const(p + name + "/w", wt)
        b.const(p + name + "/b", _weight(weights, src + bias_name, (n_out,)))
        b.op("MatMul", [x, p + name + "/w"], p + name + "/mm")
        return b.op("Add", [p + name + "/mm", p + name + "/b"], p + name + "/out")

    def heads(x: str, name: str, perm: list[int]) -> str:
        b.op("Reshape", [x, "const/heads_shape"], p + name + "/split")
        return b.op("Transpose", [p + name + "/split"], p + name + "/heads", perm=perm)

    def layer_norm(x: str, name: str, weight_prefix: str) -> str:
        b.const(p + name + "/gamma", _weight(weights, src + weight_prefix + ".weight", (hid,)))
        b.const(p + name + "/beta", _weight(weights, src + weight_prefix + ".bias", (hid,)))
        return b.op(
            "LayerNormalization",
            [x, p + name + "/gamma", p + name + "/beta"],
            p + name + "/out",
            axis=-1,
            epsilon=eps,
        )

    q = dense("q", h, "attention.self.query.weight", "attention.self.query.bias", hid, hid)
    k = dense("k", h, "attention.self.key.weight", "attention.self.key.bias", hid, hid)
    v = dense("v", h, "attention.self.value.weight", "attention.self.value.bias", hid, hid)
    qh = heads(q, "q", [0, 2, 1, 3])  # [batch, heads, seq, head]
    kh = heads(k, "k", [0, 2, 3, 1])  # [batch, heads, head, seq]
    vh = heads(v, "v", [0, 2, 1, 3])
    b.op("MatMul", [qh, kh], p + "att/scores")
    b.op("Div", [p + "att/scores", "const/sqrt_head"], p + "att/scaled")
    b.op("Add", [p + "att/scaled", bias], p + "att/masked")
    b.op("Softmax", [p + "att/masked"], p + "att/probs", axis=-1)
    b.op("MatMul", [p + "att/probs", vh], p + "att/context")
    b.op("Transpose", [p + "att/context"], p + "att/context_t", perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [p + "att/context_t", "const/merge_shape"], p + "att/merged")
    att = dense(
        "att_out", ctx, "attention.output.dense.weight", "attention.output.dense.bias", hid, hid
    )
    b.op("Add", [att, h], p + "att/residual")
    h1 = layer_norm(p + "att/residual", "att_ln", "attention.output.LayerNorm")

    x = dense("ffn_in", h1, "intermediate.dense.weight", "intermediate.dense.bias", hid, inter)
    b.op("Div", [x, "const/sqrt2"], p + "gelu/scaled")
    b.op("Erf", [p + "gelu/scaled"], p + "gelu/erf")
    b.op("Add", [p + "gelu/erf", "const/one_f"], p + "gelu/plus1")
    b.op("Mul", [x, p + "gelu/plus1"], p + "gelu/mul")
    g = b.op("Mul", [p + "gelu/mul", "const/half"], p + "gelu/out")
    y = dense("ffn_out", g, "output.dense.weight", "output.dense.bias", inter, hid)
    b.op("Add", [y, h1], p + "ffn/residual")
    return layer_norm(p + "ffn/residual", "ffn_ln", "output.LayerNorm")
