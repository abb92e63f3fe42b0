"""``BundleConfig.to_map`` answers a :class:`BundleConfigMap` (issue 11, "Typed faces"), and
the bundle bytes stay byte-for-byte those of the format before the type was given."""

from __future__ import annotations

import hashlib
import typing

import models.text
from models.text import BundleConfig, BundleConfigMap, decode_bundle, encode_bundle

CONFIG = BundleConfig(
    model_name="pinned-model", max_seq_length=128, embedding_dim=384, vocab_size=30522
)
#: sha256 of the bundle below as encoded before BundleConfigMap existed (343 bytes).
PINNED_SHA256 = "f41ba0f71b92d291ac3b2cd87236b58981310bcc08784d6e4f86208224aa268f"


def test_to_map_has_exactly_the_typed_keys() -> None:
    assert "BundleConfigMap" in models.text.__all__
    m = CONFIG.to_map()
    assert set(m) == set(typing.get_type_hints(BundleConfigMap))
    assert m == {
        "kind": "sentence-embedding",
        "model_name": "pinned-model",
        "max_seq_length": 128,
        "embedding_dim": 384,
        "vocab_size": 30522,
        "pooling": "mean",
        "normalize": True,
    }
    assert BundleConfig.from_map(dict(m)) == CONFIG


def test_bundle_bytes_are_pinned() -> None:
    data = encode_bundle(CONFIG, onnx=b"onnx-bytes", tokenizer_json=b'{"t": 1}')
    assert len(data) == 343
    assert hashlib.sha256(data).hexdigest() == PINNED_SHA256
    assert decode_bundle(data).config == CONFIG
