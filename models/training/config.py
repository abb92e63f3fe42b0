"""The training image's configuration (``train.toml`` in the app directory: measured, PCR2).

What decides the model, the data and where keys come from lives here, inside the measurement,
so the host cannot change it without changing the image (and losing the keys bound to it). What
the host decides per run (how many workers, which enclaves, how many steps, where to resume)
comes in the plan (:mod:`models.training.plan`) and is checked, never trusted for secrecy.
Unknown keys are refused.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from models.training.data import DataSpec
from models.training.errors import TrainingError

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """See ``models/train_app/train.toml`` for each field's meaning."""

    data: DataSpec = field(default_factory=DataSpec)
    hidden: tuple[int, ...] = (256, 256)
    batch: int = 1024
    lr: float = 0.2
    shards: int = 4
    checkpoint_every: int = 10
    chunk_bytes: int = 64 << 10
    key_id: str = "alias/confidential-training"
    peer_port: int = 5100
    plain_port: int = 5101
    coordinator_port: int = 7100
    host_port: int = 7000
    kms_proxy_port: int = 8000
    step_timeout_s: float = 60.0
    ring_timeout_s: float = 60.0
    allow_unprotected: bool = False

    @property
    def sizes(self) -> tuple[int, ...]:
        """Layer widths: features, the hidden layers, classes."""
        return (self.data.features, *self.hidden, self.data.classes)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed (the model and the data)."""
        return {
            "data": [getattr(self.data, f.name) for f in fields(DataSpec)],
            "sizes": list(self.sizes),
            "batch": self.batch,
            "lr": self.lr,
            "shards": self.shards,
        }

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> TrainConfig:
        """Build from parsed TOML; unknown keys and wrong types are a TrainingError."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(raw) - set(known)
        if unknown:
            raise TrainingError(f"unknown training config keys: {sorted(unknown)}")
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name == "data":
                if not isinstance(value, dict) or set(value) - {f.name for f in fields(DataSpec)}:
                    raise TrainingError("[data] holds unknown keys")
                if not all(type(v) is int and v > 0 for v in value.values()):
                    raise TrainingError("[data] values are positive integers")
                values[name] = DataSpec(**value)
            elif name == "hidden":
                if not isinstance(value, list) or not all(type(v) is int and v > 0 for v in value):
                    raise TrainingError("hidden is a list of positive integers")
                values[name] = tuple(value)
            else:
                default = known[name].default
                kind = type(default)
                if kind is float and type(value) is int:
                    value = float(value)
                if type(value) is not kind:
                    raise TrainingError(f"{name} must be {kind.__name__}")
                values[name] = value
        config = cls(**values)
        if config.shards < 1 or config.batch < 1 or config.batch > config.data.train:
            raise TrainingError("shards and batch must be positive, batch at most the data set")
        if config.checkpoint_every < 1 or config.chunk_bytes < 4:
            raise TrainingError("checkpoint_every >= 1 and chunk_bytes >= 4")
        return config

    @classmethod
    def from_file(cls, path: Path) -> TrainConfig:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TrainingError(f"training config {path}: {exc}") from None
        return cls.from_mapping(raw)
