"""An independent numpy forward pass of all-MiniLM-L6-v2, for checking the ONNX graph.

Written from the BERT paper and the Hugging Face ``BertModel`` / sentence-transformers
definitions, not from ``models.text.graph``: it shares no code with the builder and reads the
weights itself (from the safetensors bytes, by their checkpoint names, in the checkpoint's own
[out, in] layout). Float64 throughout, so its own rounding is far below the 1e-4 tolerance.

    embeddings = LayerNorm(word[ids] + position[0..L) + token_type[0])
    per layer:   attention over 12 heads of 32 with the padding mask, residual, LayerNorm;
                 GELU (the exact, erf form) feed-forward, residual, LayerNorm
    sentence   = mean of the token vectors where attention_mask == 1, divided by its L2 norm
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]

HIDDEN = 384
HEADS = 12
LAYERS = 6
LN_EPS = 1e-12

_erf = np.frompyfunc(math.erf, 1, 1)


def load_weights(safetensors_bytes: bytes) -> dict[str, Array]:
    """The checkpoint's tensors as float64 arrays, keyed by their names."""
    from safetensors.numpy import load

    return {k: v.astype(np.float64) for k, v in load(safetensors_bytes).items()}


def layer_norm(x: Array, gamma: Array, beta: Array) -> Array:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * gamma + beta


def gelu(x: Array) -> Array:
    """GELU, exact form: x * Phi(x) = x/2 (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def linear(x: Array, w: Mapping[str, Array], name: str) -> Array:
    """``torch.nn.Linear``: the weight is [out, in]; y = x W^T + b."""
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def softmax(x: Array) -> Array:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def encode(
    w: Mapping[str, Array], input_ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]
) -> Array:
    """Token vectors [batch, seq, 384] of BertModel's last layer."""
    batch, seq = input_ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][input_ids]
        + w["embeddings.position_embeddings.weight"][np.arange(seq)][None, :, :]
        + w["embeddings.token_type_embeddings.weight"][0][None, None, :]
    )
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    head = HIDDEN // HEADS
    # Padding keys get -inf before the softmax: they receive exactly zero attention.
    key_is_pad = (mask == 0)[:, None, None, :]
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."

        def split(t: Array) -> Array:
            return t.reshape(batch, seq, HEADS, head).transpose(0, 2, 1, 3)

        q = split(linear(x, w, p + "attention.self.query"))
        k = split(linear(x, w, p + "attention.self.key"))
        v = split(linear(x, w, p + "attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head)
        scores = np.where(key_is_pad, -np.inf, scores)
        context = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, HIDDEN)
        attn = linear(context, w, p + "attention.output.dense")
        x = layer_norm(
            attn + x,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
        )
        ffn = linear(gelu(linear(x, w, p + "intermediate.dense")), w, p + "output.dense")
        x = layer_norm(ffn + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
    return x


def sentence_embeddings(
    w: Mapping[str, Array], input_ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]
) -> Array:
    """sentence-transformers' output: masked mean of the token vectors, L2-normalised."""
    tokens = encode(w, input_ids, mask)
    m = mask[:, :, None].astype(np.float64)
    mean = (tokens * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
