"""Confidential training across enclaves: data-parallel SGD of a numpy MLP.

Layers (the README's "Confidential training" section tells the whole story):

    data.py        the synthetic data set, its shards, each step's global batch (pure)
    mlp.py         the MLP, its gradient and SGD on one flat float32 vector (pure)
    allreduce.py   the ring all-reduce over byte streams (trio; chunked, pipelined)
    checkpoint.py  the model state as bytes (pure; sealed by models.enclave_seal)
    plan.py        what the host asks a worker to do (untrusted input, checked)
    worker.py      the enclave app: load sealed shards, form the attested ring, train
    host.py        the host side: image, keys, sealed shards, the workers, resume
"""

from __future__ import annotations

from models.training.allreduce import DEFAULT_CHUNK_BYTES, ExchangeStats, ring_allreduce
from models.training.data import Dataset, DataSpec, Shard, make_dataset
from models.training.errors import (
    CheckpointError,
    MemberLost,
    RingProtocolError,
    TooFewWorkers,
    TrainingError,
    UnprotectedRefused,
)
from models.training.mlp import LocalData, Mlp, param_count

__all__ = [
    "ring_allreduce",
    "ExchangeStats",
    "DEFAULT_CHUNK_BYTES",
    "DataSpec",
    "Dataset",
    "Shard",
    "make_dataset",
    "Mlp",
    "LocalData",
    "param_count",
    "TrainingError",
    "MemberLost",
    "RingProtocolError",
    "TooFewWorkers",
    "UnprotectedRefused",
    "CheckpointError",
]
