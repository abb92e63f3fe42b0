"""models: sealed ONNX models, the in-enclave inference server, the client SDK and the bundled
digits model.

Layers: pure cores (``sealed`` format, ``tensors`` wire format and signatures, the batching
helpers of ``engine``, ``_budget``, ``_startup``) under trio adapters (``engine.ModelEngine``,
``service``, ``server``, ``client``, ``store``); ``sealing`` joins the sealed format to KMS.
This face only re-exports the errors: the rest is imported from its module (``models.client``,
``models.sealing``...), so that ``import models`` stays cheap (no numpy, no onnxruntime).
"""

from __future__ import annotations

from models.errors import (
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    OverloadedError,
    SealedFormatError,
    SealedIntegrityError,
)

__all__ = [
    "ModelError",
    "SealedFormatError",
    "SealedIntegrityError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "InvalidInputError",
    "InferenceTimeoutError",
    "OverloadedError",
    "InferenceError",
]
