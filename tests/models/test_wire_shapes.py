"""The wire shapes of models.tensors and models.text.wire as TypedDicts (issue 11, typed faces).

The encoders' bytes are pinned to what main produced before the shapes were typed (the types
changed, the wire did not), the TypedDicts name exactly the keys the encoders write, and the
decoders of peer messages take any object and answer bad input with their own error only.
"""

from __future__ import annotations

import typing

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.errors import InferenceError, InvalidInputError
from models.tensors import (
    ModelSignature,
    TensorSpec,
    WireSignature,
    WireTensor,
    WireTensorSpec,
    decode_tensor,
    decode_tensors,
    encode_tensor,
    encode_tensors,
)
from models.text.embeddings import Embeddings
from models.text.errors import TextInputError
from models.text.wire import (
    EmbedAnswer,
    EmbedRequest,
    decode_answer,
    embed_request,
    encode_answer,
    request_texts,
)

#: The RPC layer's packer (transport/rpc/_core.py).
_pack = msgpack.Packer(use_bin_type=True, autoreset=True, datetime=False).pack


def _tensors() -> dict[str, WireTensor]:
    return encode_tensors(
        {
            "pixels": np.arange(6, dtype=np.float32).reshape(2, 3),
            "mask": np.array([True, False]),
            "ids": np.array([[1, -2]], dtype=">i8"),  # big-endian in, little-endian on the wire
        }
    )


def _signature() -> WireSignature:
    return ModelSignature(
        inputs=(TensorSpec("pixels", "float32", (None, 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
    ).to_wire()


def _request() -> EmbedRequest:
    return embed_request("minilm", ["héllo", b"raw"])


def _answer() -> EmbedAnswer:
    vectors = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    return encode_answer(Embeddings(vectors=vectors, truncated=(True,)))


#: The msgpack bytes main produced for the same inputs before the shapes were typed.
PINNED = {
    "tensors": (
        _tensors,
        "83a6706978656c7383a56474797065a7666c6f61743332a57368617065920203a464617461c4180000"
        "00000000803f0000004000004040000080400000a040a46d61736b83a56474797065a4626f6f6ca573"
        "686170659102a464617461c4020100a369647383a56474797065a5696e743634a57368617065920102"
        "a464617461c4100100000000000000feffffffffffffff",
    ),
    "signature": (
        _signature,
        "82a6696e707574739183a46e616d65a6706978656c73a56474797065a7666c6f61743332a573686170"
        "6592c040a76f7574707574739183a46e616d65a66c6f67697473a56474797065a7666c6f61743332a5"
        "736861706592a562617463680a",
    ),
    "request": (
        _request,
        "82a56d6f64656ca66d696e696c6da5746578747392c40668c3a96c6c6fc403726177",
    ),
    "answer": (
        _answer,
        "82aa656d62656464696e677383a56474797065a7666c6f61743332a57368617065920103a464617461"
        "c40c0000003f000080bf00000040a97472756e636174656491c3",
    ),
}


@pytest.mark.parametrize("case", sorted(PINNED))
def test_the_wire_bytes_are_unchanged(case: str) -> None:
    encode, expected = PINNED[case]
    assert _pack(encode()).hex() == expected


def _keys(shape: type) -> list[str]:
    return list(typing.get_type_hints(shape))


def test_the_typed_dicts_name_exactly_what_the_encoders_write() -> None:
    tensor = encode_tensor(np.zeros((2, 1), np.int32))
    assert list(tensor) == _keys(WireTensor)
    signature = _signature()
    assert list(signature) == _keys(WireSignature)
    assert list(signature["inputs"][0]) == _keys(WireTensorSpec)
    assert list(_request()) == _keys(EmbedRequest)
    answer = _answer()
    assert list(answer) == _keys(EmbedAnswer)
    assert list(answer["embeddings"]) == _keys(WireTensor)
    for shape in (WireTensor, WireTensorSpec, WireSignature, EmbedRequest, EmbedAnswer):
        assert shape.__required_keys__ == frozenset(_keys(shape))  # all required: no partial map


def test_the_wire_shapes_are_exported() -> None:
    import models.tensors
    import models.text.wire

    assert {"WireTensor", "WireTensorSpec", "WireSignature"} <= set(models.tensors.__all__)
    assert {"EmbedRequest", "EmbedAnswer"} <= set(models.text.wire.__all__)


def test_decoded_answers_are_float32_rows() -> None:
    embeddings = decode_answer(_answer(), texts=1)
    assert embeddings.vectors.dtype == np.float32
    assert embeddings.vectors.tolist() == [[0.5, -1.0, 2.0]]
    assert embeddings.truncated == (True,)


#: Anything msgpack can carry: what a peer can put in a message.
_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.integers(0, 3), inner, max_size=4)
    ),
    max_leaves=12,
)
#: Peer messages close to the real shapes, so that the checks past the first are reached.
_near_tensors = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["float32", "int64", "bool", "complex64"]) | _msgpack_values,
        "shape": st.lists(st.integers(-1, 4), max_size=3) | _msgpack_values,
        "data": st.binary(max_size=32) | _msgpack_values,
    }
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_msgpack_values, _near_tensors))
def test_decode_tensor_takes_any_object(obj: object) -> None:
    try:
        decode_tensor(obj, max_bytes=1 << 10)
    except InvalidInputError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.one_of(_msgpack_values, st.dictionaries(st.text(max_size=4), _near_tensors, max_size=3)))
def test_decode_tensors_takes_any_object(obj: object) -> None:
    try:
        decode_tensors(obj, max_bytes=1 << 10)
    except InvalidInputError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        _msgpack_values,
        st.fixed_dictionaries(
            {"embeddings": _near_tensors | _msgpack_values, "truncated": _msgpack_values}
        ),
    )
)
def test_decode_answer_takes_any_object(obj: object) -> None:
    try:
        decode_answer(obj, texts=1)
    except InferenceError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.one_of(_msgpack_values, st.fixed_dictionaries({"texts": _msgpack_values})))
def test_request_texts_takes_any_object(obj: object) -> None:
    try:
        texts = request_texts(obj)
    except TextInputError:
        return
    assert isinstance(obj, dict)
    assert texts is obj["texts"]
