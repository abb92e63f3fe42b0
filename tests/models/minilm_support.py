"""The real MiniLM for tests, built once per test process from the cache (never downloaded).

``minilm_bundle_path()`` finds or builds the bundle (``models.text.minilm``: the first run on a
machine builds it in ~2.5 s; later runs only check its digest). The rest are cached on top of it,
so every test module shares one parsed bundle, one weights read and one onnxruntime session.
"""

from __future__ import annotations

import functools
from pathlib import Path

from models.text.bundle import ModelBundle, read_bundle
from models.text.embedder import Embedder
from models.text.minilm import ensure_minilm_bundle
from models.text.weights import MiniLMSource, load_source


@functools.cache
def minilm_bundle_path() -> Path:
    return ensure_minilm_bundle()


@functools.cache
def minilm_bundle() -> ModelBundle:
    return read_bundle(minilm_bundle_path())


@functools.cache
def minilm_source() -> MiniLMSource:
    return load_source()


@functools.cache
def minilm_embedder() -> Embedder:
    return Embedder(minilm_bundle())
