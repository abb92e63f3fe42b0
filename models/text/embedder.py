"""Text in, sentence embeddings out: a bundle's tokenizer and graph behind one call.

:class:`Embedder` is the piece the in-enclave service will hold (one per loaded text model). It
imports only what the enclave image carries (onnxruntime, numpy, tokenizers, cbor2 through the
bundle) and does no I/O of its own: it is handed a parsed :class:`~models.text.bundle.ModelBundle`
or the bytes of one (:meth:`Embedder.from_buffer`).

A call runs the pure pipeline: request limits (:mod:`models.text.limits`) -> tokenization with
truncation flags (:mod:`models.text.tokenizer`) -> batches by length (:mod:`models.text.batching`)
-> one ``session.run`` per batch -> rows scattered back into the caller's order.

Session options (:func:`session_options`) are chosen for latency on a small machine: intra-op
threads = the CPUs this process may run on (``sched_getaffinity``, which also follows an
enclave's ``--cpu-ids``), one inter-op thread with sequential execution (the graph is a chain),
and every onnxruntime graph optimisation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.errors import InferenceError, ModelLoadError
from models.text.batching import (
    DEFAULT_MAX_BATCH_TEXTS,
    DEFAULT_MAX_BATCH_TOKENS,
    Batch,
    pad_batch,
    plan_batches,
)
from models.text.bundle import BundleConfig, ModelBundle, decode_bundle
from models.text.embeddings import Embeddings
from models.text.graph import INPUT_NAMES, OUTPUT_NAME
from models.text.limits import TextLimits, check_texts
from models.text.tokenizer import TextTokenizer

__all__ = ["Embeddings", "Embedder", "available_cpus", "session_options", "release_model_bytes"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The onnxruntime options for text models (also the in-process benchmark anchor's)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cpus()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: shape-merge warnings are noise here
    return opts


class Embedder:
    """A loaded text-embedding bundle.

    Args:
        bundle: the parsed bundle (its graph is copied once into onnxruntime; the caller may drop
            the bundle afterwards).
        threads: intra-op threads (default: :func:`available_cpus`).
        limits: the request caps.
        max_batch_texts, max_batch_tokens: batch caps (:func:`models.text.batching.plan_batches`).

    Raises:
        ModelLoadError: the graph does not load, or its signature is not text-embedding's
            (int64 ``input_ids``/``attention_mask`` in, float32 [N, embedding_dim] out).
        BundleFormatError: the tokenizer is unusable.

    Concurrency: calls share the tokenizer and the session, which only read their state after
    construction (onnxruntime's ``run`` is thread-safe); the batch plan and buffers are per
    call. How many calls run at once is the service's decision.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        threads: int | None = None,
        limits: TextLimits | None = None,
        max_batch_texts: int = DEFAULT_MAX_BATCH_TEXTS,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> None:
        self._setup(
            bundle.config,
            bundle.tokenizer_text(),
            # onnxruntime takes only ``bytes``: one copy of the graph, released once the
            # session exists (see _create_session).
            bytes(bundle.onnx),
            threads=threads,
            limits=limits,
            max_batch_texts=max_batch_texts,
            max_batch_tokens=max_batch_tokens,
        )

    @classmethod
    def from_buffer(
        cls,
        buffer: bytearray,
        *,
        threads: int | None = None,
        limits: TextLimits | None = None,
        max_batch_texts: int = DEFAULT_MAX_BATCH_TEXTS,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> Embedder:
        """Load a bundle held in ``buffer`` (an unsealed bundle), **consuming it**.

        The buffer is emptied (its memory given back) as soon as the graph has been copied
        out, before onnxruntime makes its own copies: so the process never holds the bundle,
        the graph and onnxruntime's copies at once. Memory, for a bundle of B bytes whose graph
        is G: B + G while the graph is copied out, then G + onnxruntime's two transient copies
        while the session is created (the peak), then onnxruntime's weights only.

        Raises:
            BundleFormatError: not a valid bundle (the buffer is left as it was).
            ModelLoadError: the graph does not load or has the wrong signature.
        """
        bundle = decode_bundle(buffer)
        config, tokenizer_json = bundle.config, bundle.tokenizer_text()
        onnx = bytes(bundle.onnx)
        del bundle  # its members are views of the buffer: release them before emptying it
        del buffer[:]
        embedder = cls.__new__(cls)
        embedder._setup(
            config,
            tokenizer_json,
            onnx,
            threads=threads,
            limits=limits,
            max_batch_texts=max_batch_texts,
            max_batch_tokens=max_batch_tokens,
        )
        return embedder

    def _setup(
        self,
        config: BundleConfig,
        tokenizer_json: str,
        onnx: bytes,
        *,
        threads: int | None,
        limits: TextLimits | None,
        max_batch_texts: int,
        max_batch_tokens: int,
    ) -> None:
        if max_batch_tokens < config.max_seq_length:
            raise ValueError("max_batch_tokens must hold one text of max_seq_length tokens")
        self.config = config
        self.limits = limits or TextLimits()
        self.threads = threads or available_cpus()
        self._max_batch_texts = max_batch_texts
        self._max_batch_tokens = max_batch_tokens
        self.tokenizer = TextTokenizer(
            tokenizer_json, max_seq_length=config.max_seq_length, vocab_limit=config.vocab_size
        )
        self.session = _create_session(onnx, self.threads, config.model_name)
        del onnx
        self._check_signature()

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = self.session.get_outputs()
        ok = set(inputs) == set(INPUT_NAMES) and all(
            inputs[n].type == "tensor(int64)" and len(inputs[n].shape) == 2 for n in INPUT_NAMES
        )
        ok = ok and len(outputs) == 1 and outputs[0].name == OUTPUT_NAME
        ok = ok and outputs[0].type == "tensor(float)" and len(outputs[0].shape) == 2
        ok = ok and outputs[0].shape[1] == self.config.embedding_dim
        if not ok:
            raise ModelLoadError(
                f"{self.config.model_name}: the graph's signature is not int64 {list(INPUT_NAMES)}"
                f" -> float32 {OUTPUT_NAME}[N, {self.config.embedding_dim}]"
            )

    def embed(
        self, texts: Sequence[object], *, run_options: ort.RunOptions | None = None
    ) -> Embeddings:
        """Embed ``texts`` (``str`` or UTF-8 ``bytes``), in the caller's order.

        Args:
            texts: the request.
            run_options: passed to every ``session.run`` (a caller's deadline sets
                ``terminate`` on it from another thread).

        Raises:
            TextInputError: a request limit is broken (the subclass says which).
            InferenceError: onnxruntime failed, or the run was terminated through
                ``run_options`` (onnxruntime's error is the ``__cause__``).
        """
        checked = check_texts(texts, self.limits)
        tokenized = self.tokenizer.encode(checked)
        sequences = [t.ids for t in tokenized]
        out = np.empty((len(checked), self.config.embedding_dim), dtype=np.float32)
        for batch in self.plan([len(s) for s in sequences]):
            out[list(batch.indices)] = self.run_batch(sequences, batch, run_options)
        return Embeddings(vectors=out, truncated=tuple(t.truncated for t in tokenized))

    def plan(self, lengths: Sequence[int]) -> list[Batch]:
        """Batches for texts of these token lengths (this embedder's caps)."""
        return plan_batches(
            lengths, max_batch_texts=self._max_batch_texts, max_batch_tokens=self._max_batch_tokens
        )

    def run_batch(
        self,
        sequences: Sequence[npt.NDArray[np.int64]],
        batch: Batch,
        run_options: ort.RunOptions | None = None,
    ) -> npt.NDArray[np.float32]:
        """One ``session.run``: the texts of ``batch`` padded to its length; float32 rows in the
        batch's order.

        Raises:
            InferenceError: onnxruntime failed or the run was terminated (``__cause__``).
        """
        ids, mask = pad_batch(sequences, batch, pad_id=self.tokenizer.pad_id)
        feed = {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask}
        try:
            (vectors,) = self.session.run([OUTPUT_NAME], feed, run_options)
        except Exception as exc:  # onnxruntime's Fail/RuntimeException: no common base
            raise InferenceError(f"{self.config.model_name}: inference failed") from exc
        result: npt.NDArray[np.float32] = vectors
        return result


def _create_session(onnx: bytes, threads: int, name: str) -> ort.InferenceSession:
    """An onnxruntime session over ``onnx`` that does not keep ``onnx`` alive.

    onnxruntime's Python wrapper keeps the model bytes for the session's whole life, only to
    re-create the session when an execution provider fails and it falls back to another
    (its own source says: "This is bad as we're holding the memory indefinitely"). A CPU-only
    session has nothing to fall back to: with the fallback disabled the bytes are dropped, which
    gives the graph's size back (86 MB for MiniLM) for as long as the model is served.
    """
    try:
        session = ort.InferenceSession(
            onnx, session_options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph classes
        raise ModelLoadError(f"{name}: the graph does not load: {exc}") from None
    release_model_bytes(session)
    return session


def release_model_bytes(session: object) -> None:
    """Make a CPU-only onnxruntime session drop its copy of the model bytes (see
    :func:`_create_session`); nothing happens on a wrapper without that copy."""
    disable = getattr(session, "disable_fallback", None)
    if callable(disable) and getattr(session, "_model_bytes", None) is not None:
        disable()
        session._model_bytes = None  # type: ignore[attr-defined]
