"""Text in, sentence embeddings out: a bundle's tokenizer and graph behind one call.

:class:`Embedder` is the piece the in-enclave service will hold (one per loaded text model). It
imports only what the enclave image carries (onnxruntime, numpy, tokenizers, cbor2 through the
bundle) and does no I/O of its own: it is handed a parsed :class:`~models.text.bundle.ModelBundle`.

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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.errors import InferenceError, ModelLoadError
from models.text.batching import (
    DEFAULT_MAX_BATCH_TEXTS,
    DEFAULT_MAX_BATCH_TOKENS,
    pad_batch,
    plan_batches,
)
from models.text.bundle import ModelBundle
from models.text.graph import INPUT_NAMES, OUTPUT_NAME
from models.text.limits import TextLimits, check_texts
from models.text.tokenizer import TextTokenizer

__all__ = ["Embeddings", "Embedder", "available_cpus", "session_options"]


@dataclass(frozen=True, slots=True)
class Embeddings:
    """The answer to one request, in the caller's order.

    Attributes:
        vectors: float32 [texts, embedding_dim], L2-normalised when the bundle says so.
        truncated: per text, whether it was cut at the model's token cap.
    """

    vectors: npt.NDArray[np.float32]
    truncated: tuple[bool, ...]


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
        config = bundle.config
        if max_batch_tokens < config.max_seq_length:
            raise ValueError("max_batch_tokens must hold one text of max_seq_length tokens")
        self.config = config
        self.limits = limits or TextLimits()
        self._max_batch_texts = max_batch_texts
        self._max_batch_tokens = max_batch_tokens
        self.tokenizer = TextTokenizer(
            bundle.tokenizer_text(),
            max_seq_length=config.max_seq_length,
            vocab_limit=config.vocab_size,
        )
        try:
            # onnxruntime takes only ``bytes``: one copy of the graph, held by the session.
            self.session = ort.InferenceSession(
                bytes(bundle.onnx), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph classes
            raise ModelLoadError(f"{config.model_name}: the graph does not load: {exc}") from None
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
        plan = plan_batches(
            [len(s) for s in sequences],
            max_batch_texts=self._max_batch_texts,
            max_batch_tokens=self._max_batch_tokens,
        )
        out = np.empty((len(checked), self.config.embedding_dim), dtype=np.float32)
        for batch in plan:
            ids, mask = pad_batch(sequences, batch, pad_id=self.tokenizer.pad_id)
            feed = {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask}
            try:
                (vectors,) = self.session.run([OUTPUT_NAME], feed, run_options)
            except Exception as exc:  # onnxruntime's Fail/RuntimeException: no common base
                raise InferenceError(f"{self.config.model_name}: inference failed") from exc
            out[list(batch.indices)] = vectors
        return Embeddings(vectors=out, truncated=tuple(t.truncated for t in tokenized))
