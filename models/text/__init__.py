"""models.text: text models (all-MiniLM-L6-v2 sentence embeddings) as pure, testable pieces.

Layers, bottom up:

- ``errors``: one class per way a text request or a bundle can be wrong;
- ``limits``: request caps (texts, bytes per text, total bytes, UTF-8, empty texts);
- ``batching``: group texts by token length, pad per batch, restore the caller's order;
- ``bundle``: the ONNX graph + ``tokenizer.json`` + config as one deterministic, strictly
  parsed unit (sealed and digested as one by ``models.sealed``);
- ``tokenizer``: the `tokenizers` library set up as sentence-transformers uses it;
- ``embedder``: ``Embedder(bundle).embed(texts) -> Embeddings`` over onnxruntime;
- ``weights``, ``graph``, ``minilm``: build time only: read the pinned weights package, build
  the ONNX graph from its safetensors arrays, and cache the bundle under its recorded digest.

This face re-exports the light pieces; ``tokenizer``, ``embedder`` and the build modules pull in
`tokenizers`, onnxruntime or onnx and are imported by path (``from models.text.embedder import
Embedder``).
"""

from __future__ import annotations

from models.text.batching import Batch, naive_batches, pad_batch, padding_waste, plan_batches
from models.text.bundle import (
    BundleConfig,
    BundleConfigMap,
    ModelBundle,
    decode_bundle,
    encode_bundle,
    read_bundle,
)
from models.text.errors import (
    BundleFormatError,
    EmptyInputError,
    EmptyTextError,
    InvalidUtf8Error,
    ModelBuildError,
    RequestTooLargeError,
    TextInputError,
    TextTooLargeError,
    TooManyTextsError,
)
from models.text.limits import TextLimits, check_texts

__all__ = [
    # errors
    "TextInputError",
    "EmptyInputError",
    "EmptyTextError",
    "InvalidUtf8Error",
    "TooManyTextsError",
    "TextTooLargeError",
    "RequestTooLargeError",
    "BundleFormatError",
    "ModelBuildError",
    # limits
    "TextLimits",
    "check_texts",
    # batching
    "Batch",
    "plan_batches",
    "naive_batches",
    "padding_waste",
    "pad_batch",
    # bundle
    "BundleConfig",
    "BundleConfigMap",
    "ModelBundle",
    "encode_bundle",
    "decode_bundle",
    "read_bundle",
]
