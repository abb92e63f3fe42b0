"""The inference server's configuration (``server.toml`` in the enclave app directory).

The file is part of the measured image, so everything in it is attested by PCR0/PCR2. Secrets
never go here: KMS credentials come from the host at start (see :mod:`models.store`), and
model keys come from KMS only to an attested enclave. Unknown keys are errors.

Example (the shipped ``models/server_app/server.toml``)::

    listen_port = 5005            # vsock port the server accepts attested channels on
    host_port = 7000              # host-side model store / provisioning service, on (3, port)
    kms_proxy_port = 8000         # vsock-proxy to the KMS, on (3, port)
    kms_region = "us-east-1"
    suites = ["MLKEM768_X25519", "X25519"]   # channel suites offered, in preference order
    max_connections = 64
    max_streams_per_connection = 64
    max_request_bytes = 16777216  # per request / stream message, all tensors together
    max_concurrent_requests = 256
    handshake_timeout_s = 10.0
    stream_buffer_bytes = 4194304       # input one stream takes off the wire for one batch
    connection_buffer_bytes = 16777216  # inputs being run + answers not yet read, per connection
    server_buffer_bytes = 67108864      # the same, all connections together
    send_timeout_s = 30.0         # an answer the client does not read in time fails its stream
    idle_timeout_s = 60.0         # a stream with no input for this long is closed

    [[models]]
    name = "digits"
    source = "store"              # "store": fetched from the host store; "image": a file here
    # path = "sealed/digits.sealed"   # source = "image": relative to the app directory
    intra_op_threads = 1
    max_batch = 256
    timeout_s = 10.0
    execution = "auto"            # "auto" (measured), "inline" or "thread"

A sealed file holds an ONNX graph (tensors in, tensors out) or a text model bundle
(``models.text.bundle``: graph + tokenizer + config; texts in, embeddings out); the server
tells them apart by the unsealed bytes. A text model takes these keys too (defaults shown)::

    [[models]]
    name = "minilm"
    timeout_s = 30.0              # per request, arrival to answer; late work is stopped
    # intra_op_threads = N        # default: every CPU of the enclave
    max_texts = 256               # texts per request
    max_text_bytes = 32768        # UTF-8 bytes per text
    max_total_bytes = 1048576     # UTF-8 bytes per request
    max_batch_texts = 32          # texts per onnxruntime run
    max_batch_tokens = 2048       # padded tokens per run
    max_round_texts = 256         # texts batched together across concurrent requests
    max_queue_texts = 4096        # texts waiting before requests are refused
    batching = true               # batch concurrent requests together
    execution = "auto"            # short rounds in the event loop, long ones in a thread
    inline_max_s = 0.05           # "auto": the longest round run in the event loop

Keys of the other kind are refused once the model is unsealed (a text key on an ONNX graph
makes that model unavailable, with the reason).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any, Final

from models.engine import EngineConfig
from models.service import (
    DEFAULT_CONNECTION_BUFFER_BYTES,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_SEND_TIMEOUT_S,
    DEFAULT_SERVER_BUFFER_BYTES,
    DEFAULT_STREAM_BUFFER_BYTES,
    ServiceLimits,
)
from models.text.batching import DEFAULT_MAX_BATCH_TEXTS, DEFAULT_MAX_BATCH_TOKENS
from models.text.engine import TextEngineConfig
from models.text.limits import TextLimits
from transport.errors import ConfigurationError

__all__ = ["ModelConfig", "TextOptions", "ServerConfig", "DEFAULT_LISTEN_PORT", "DEFAULT_HOST_PORT"]

#: The server's vsock port (DESIGN.md §3).
DEFAULT_LISTEN_PORT: Final = 5005
#: The host-side model store / provisioning port on the parent (CID 3).
DEFAULT_HOST_PORT: Final = 7000
#: The vsock-proxy in front of KMS (Nitro's default, DESIGN.md §3).
DEFAULT_KMS_PROXY_PORT: Final = 8000
_SUITES: Final = ("MLKEM768_X25519", "X25519")
_MAX_MODELS: Final = 64

_ENGINE_KEYS: Final = {f.name for f in fields(EngineConfig)}
#: Keys only text models take (see the module docstring).
_TEXT_ONLY_KEYS: Final = frozenset(
    {
        "max_texts",
        "max_text_bytes",
        "max_total_bytes",
        "max_batch_texts",
        "max_batch_tokens",
        "max_round_texts",
        "max_queue_texts",
    }
)
#: Keys both kinds take (the rest of the engine keys are for tensor models only).
_SHARED_KEYS: Final = frozenset(
    {"timeout_s", "intra_op_threads", "batching", "execution", "inline_max_s"}
)


@dataclass(frozen=True, slots=True)
class TextOptions:
    """A text model's settings (``[[models]]`` keys; used when the sealed file is a bundle).

    ``threads`` is None unless ``intra_op_threads`` was given: every CPU of the enclave.
    """

    threads: int | None = None
    limits: TextLimits = field(default_factory=TextLimits)
    max_batch_texts: int = DEFAULT_MAX_BATCH_TEXTS
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    engine: TextEngineConfig = field(default_factory=TextEngineConfig)

    @classmethod
    def from_mapping(cls, name: str, m: Mapping[str, Any]) -> TextOptions:
        try:
            limits = TextLimits(
                **{k: m[k] for k in ("max_texts", "max_text_bytes", "max_total_bytes") if k in m}
            )
            engine = TextEngineConfig(
                **{
                    k: m[k]
                    for k in (
                        "timeout_s",
                        "max_round_texts",
                        "max_queue_texts",
                        "batching",
                        "execution",
                        "inline_max_s",
                    )
                    if k in m
                }
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"model {name}: {exc}") from exc
        out = cls(limits=limits, engine=engine)
        threads = m.get("intra_op_threads")
        if threads is not None:
            if type(threads) is not int or not 1 <= threads <= 64:
                raise ConfigurationError(f"model {name}: intra_op_threads must be 1-64")
            out = replace(out, threads=threads)
        for key, low in (("max_batch_texts", 1), ("max_batch_tokens", 2)):
            if key in m:
                if type(m[key]) is not int or not low <= m[key] <= 1 << 20:
                    raise ConfigurationError(f"model {name}: {key} must be an integer >= {low}")
                out = replace(out, **{key: m[key]})
        return out


def _port(value: Any, what: str) -> int:
    if type(value) is not int or not 0 < value < 2**32 - 1:
        raise ConfigurationError(f"{what} must be a port number, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One served model."""

    name: str
    source: str = "store"
    path: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    text: TextOptions = field(default_factory=TextOptions)
    #: The keys given in the file (to refuse one kind's keys on a model of the other kind).
    keys: frozenset[str] = frozenset()

    def keys_not_for(self, kind: str) -> list[str]:
        """The keys given that a model of ``kind`` ("text" or "tensor") does not take."""
        if kind == "text":
            allowed = {"name", "source", "path"} | _TEXT_ONLY_KEYS | _SHARED_KEYS
        else:
            allowed = {"name", "source", "path"} | _ENGINE_KEYS
        return sorted(self.keys - allowed)

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> ModelConfig:
        known = {"name", "source", "path"} | _ENGINE_KEYS | _TEXT_ONLY_KEYS
        unknown = sorted(set(m) - known)
        if unknown:
            raise ConfigurationError(f"unknown model config key(s): {unknown}")
        name = m.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 128 or "/" in name:
            raise ConfigurationError(f"model name must be 1-128 characters, no '/': {name!r}")
        source = m.get("source", "store")
        if source not in ("store", "image"):
            raise ConfigurationError(f"model {name}: source must be 'store' or 'image'")
        path = m.get("path")
        if source == "image":
            if not isinstance(path, str) or not path:
                raise ConfigurationError(f"model {name}: source 'image' needs a path")
            pure = PurePosixPath(path)
            if pure.is_absolute() or ".." in pure.parts:
                raise ConfigurationError(f"model {name}: path must stay inside the app dir")
        elif path is not None:
            raise ConfigurationError(f"model {name}: path is only for source 'image'")
        try:
            engine = EngineConfig(**{k: v for k, v in m.items() if k in _ENGINE_KEYS})
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"model {name}: {exc}") from exc
        text = TextOptions.from_mapping(name, m)
        return cls(name=name, source=source, path=path, engine=engine, text=text, keys=frozenset(m))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The whole server configuration (see the module docstring for the file format)."""

    models: tuple[ModelConfig, ...]
    listen_port: int = DEFAULT_LISTEN_PORT
    host_port: int = DEFAULT_HOST_PORT
    kms_proxy_port: int = DEFAULT_KMS_PROXY_PORT
    kms_region: str = "us-east-1"
    suites: tuple[str, ...] = _SUITES
    max_connections: int = 64
    max_streams_per_connection: int = 64
    max_request_bytes: int = 16 << 20
    max_concurrent_requests: int = 256
    handshake_timeout_s: float = 10.0
    stream_buffer_bytes: int = DEFAULT_STREAM_BUFFER_BYTES
    connection_buffer_bytes: int = DEFAULT_CONNECTION_BUFFER_BYTES
    server_buffer_bytes: int = DEFAULT_SERVER_BUFFER_BYTES
    send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> ServerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(m) - known)
        if unknown:
            raise ConfigurationError(f"unknown server config key(s): {unknown}")
        raw_models = m.get("models", [])
        if not isinstance(raw_models, list) or not 0 < len(raw_models) <= _MAX_MODELS:
            raise ConfigurationError(f"models must be a list of 1-{_MAX_MODELS} tables")
        models = tuple(ModelConfig.from_mapping(x) for x in raw_models)
        names = [mc.name for mc in models]
        if len(set(names)) != len(names):
            raise ConfigurationError("model names must be unique")
        suites = tuple(m.get("suites", _SUITES))
        if not suites or any(s not in _SUITES for s in suites):
            raise ConfigurationError(f"suites must be a non-empty subset of {list(_SUITES)}")
        kwargs: dict[str, Any] = {"models": models, "suites": suites}
        for key in ("listen_port", "host_port", "kms_proxy_port"):
            if key in m:
                kwargs[key] = _port(m[key], key)
        for key in (
            "max_connections",
            "max_streams_per_connection",
            "max_request_bytes",
            "max_concurrent_requests",
            "stream_buffer_bytes",
            "connection_buffer_bytes",
            "server_buffer_bytes",
        ):
            if key in m:
                if type(m[key]) is not int or m[key] < 1:
                    raise ConfigurationError(f"{key} must be a positive integer")
                kwargs[key] = m[key]
        for key, most in (
            ("handshake_timeout_s", 600),
            ("send_timeout_s", 3600),
            ("idle_timeout_s", 3600),
        ):
            if key in m:
                value = m[key]
                if type(value) not in (int, float) or not 0 < value <= most:
                    raise ConfigurationError(f"{key} must be in (0, {most}] seconds")
                kwargs[key] = float(value)
        if "kms_region" in m:
            if not isinstance(m["kms_region"], str) or not m["kms_region"]:
                raise ConfigurationError("kms_region must be a string")
            kwargs["kms_region"] = m["kms_region"]
        config = cls(**kwargs)
        try:
            config.service_limits()
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        return config

    def service_limits(self) -> ServiceLimits:
        """The inference service's bounds from this configuration."""
        return ServiceLimits(
            max_request_bytes=self.max_request_bytes,
            max_concurrent_requests=self.max_concurrent_requests,
            stream_buffer_bytes=self.stream_buffer_bytes,
            connection_buffer_bytes=self.connection_buffer_bytes,
            server_buffer_bytes=self.server_buffer_bytes,
            send_timeout_s=self.send_timeout_s,
            idle_timeout_s=self.idle_timeout_s,
        )

    @classmethod
    def from_file(cls, path: Path) -> ServerConfig:
        """Load ``server.toml`` (TOML) or ``server.json`` (JSON)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read server config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigurationError(f"{path}: top level must be a table")
        return cls.from_mapping(data)
