"""Fixtures for the end-to-end tests: a real KMS daemon, runtime, vsock-proxy, model store,
ingress and server enclave (subprocess) per test, in a short private state directory.

The ready stack itself is the ``inference_stack`` fixture of the project's pytest plugin
(:mod:`runtime.testing`); ``served`` is its name in these tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.stack import InferenceStack

#: What ``served`` yields (the plugin's ready stack).
Served = InferenceStack


@pytest.fixture
def short_state_dir() -> Iterator[Path]:
    """A short path (Unix socket paths are limited to 108 bytes), removed afterwards.
    (``runtime.stack.open_stack`` restores the environment it sets itself.)"""
    path = Path(tempfile.mkdtemp(prefix="er-it-"))
    try:
        yield path / "s"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def served(inference_stack: InferenceStack) -> InferenceStack:
    """The digits model served from a real enclave, reachable through an ingress."""
    return inference_stack
