"""Text requests and answers on the wire (``enclave-rpc/1`` messages; pure, numpy only).

Methods of the inference service for text models (see :mod:`models.service`):

``embed`` (unary)
    request ``{"model": NAME, "texts": [bytes, ...]}`` ->
    ``{"embeddings": tensor float32 [N, dim], "truncated": [bool, ...]}``
``embed_stream`` (streaming; metadata ``{"model": NAME}``)
    the client sends ``{"texts": [...]}`` messages and ends its side; the server answers each
    with ``{"embeddings": ..., "truncated": [...]}``, in order, then ends.

Texts travel as UTF-8 **bytes** (msgpack bin), not msgpack strings: the RPC layer decodes
strings itself and fails the whole connection on invalid UTF-8 (a protocol error), whereas bytes
reach the model's limits, which refuse a bad text with its own error
(:class:`~models.text.errors.InvalidUtf8Error`) and leave the other streams alone. The server
accepts strings too. The answer's tensor is the ordinary wire tensor of :mod:`models.tensors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, TypedDict

import numpy as np

from models.errors import InferenceError, InvalidInputError
from models.tensors import WireTensor, decode_tensor, encode_tensor
from models.text.embeddings import Embeddings
from models.text.errors import InvalidUtf8Error, TextInputError

__all__ = [
    "EMBED",
    "EMBED_STREAM",
    "EmbedRequest",
    "EmbedAnswer",
    "encode_texts",
    "embed_request",
    "request_texts",
    "encode_answer",
    "decode_answer",
]

#: Method names (the service's routing table).
EMBED: Final = "embed"
EMBED_STREAM: Final = "embed_stream"
#: Largest answer decoded by a client: 1024 texts of 4096 dimensions (float32).
MAX_ANSWER_BYTES: Final = 16 << 20


class EmbedRequest(TypedDict):
    """The ``embed`` request: the model's name and its texts as UTF-8 bytes."""

    model: str
    texts: list[bytes]


class EmbedAnswer(TypedDict):
    """The answer to one request or stream message: float32 ``[N, dim]`` rows and, per text,
    whether it was cut at the model's token cap."""

    embeddings: WireTensor
    truncated: list[bool]


def encode_texts(texts: Sequence[str | bytes]) -> list[bytes]:
    """The texts as UTF-8 bytes (``bytes`` pass through unchecked: the server checks them).

    Raises:
        InvalidUtf8Error: a ``str`` with lone surrogates (it has no UTF-8 form).
        TextInputError: an item that is neither ``str`` nor ``bytes``.
    """
    if isinstance(texts, str | bytes):
        raise TextInputError("texts must be a sequence of strings, not one string")
    out: list[bytes] = []
    for index, text in enumerate(texts):
        if isinstance(text, str):
            try:
                out.append(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise InvalidUtf8Error(
                    f"text {index} holds lone surrogates (no UTF-8 form)", index=index
                ) from None
        elif isinstance(text, bytes | bytearray | memoryview):
            out.append(bytes(text))
        else:
            raise TextInputError(
                f"text {index} is a {type(text).__name__}, not a string", index=index
            )
    return out


def embed_request(model: str, texts: Sequence[str | bytes]) -> EmbedRequest:
    """The ``embed`` request."""
    return {"model": model, "texts": encode_texts(texts)}


def request_texts(message: object) -> list[object]:
    """The ``texts`` list of a request or stream message, as the peer sent it (its items are
    unchecked: the model's limits check them).

    Raises:
        TextInputError: no ``texts`` list.
    """
    texts = message.get("texts") if isinstance(message, Mapping) else None
    if not isinstance(texts, list):
        raise TextInputError("a text request is a map with 'texts', a list of strings")
    return texts


def encode_answer(embeddings: Embeddings) -> EmbedAnswer:
    """The answer to one request (or stream message)."""
    return {
        "embeddings": encode_tensor(embeddings.vectors),
        "truncated": list(embeddings.truncated),
    }


def decode_answer(answer: object, *, texts: int) -> Embeddings:
    """Check and decode an answer to a request of ``texts`` texts.

    Raises:
        InferenceError: malformed answer (wrong dtype, shape, row count or flags).
    """
    if not isinstance(answer, Mapping) or set(answer) != {"embeddings", "truncated"}:
        raise InferenceError("malformed answer from the server (expected embeddings)")
    try:
        vectors = decode_tensor(answer["embeddings"], what="embeddings", max_bytes=MAX_ANSWER_BYTES)
    except InvalidInputError as exc:
        raise InferenceError(f"malformed embeddings from the server: {exc}") from None
    truncated = answer["truncated"]
    if (
        vectors.dtype != np.float32
        or vectors.ndim != 2
        or vectors.shape[0] != texts
        or not isinstance(truncated, list)
        or len(truncated) != texts
        or not all(type(t) is bool for t in truncated)
    ):
        raise InferenceError(
            f"malformed answer from the server: expected {texts} float32 rows and flags, got "
            f"{vectors.dtype} {list(vectors.shape)}"
        )
    # The dtype is checked above: astype returns the same array, typed float32.
    return Embeddings(vectors=vectors.astype(np.float32, copy=False), truncated=tuple(truncated))
