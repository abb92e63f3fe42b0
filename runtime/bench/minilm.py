"""MiniLM in-process anchors: the figures ``enclave bench minilm`` will hold the enclave to.

This round measures the in-process side only (the enclave side arrives with the text service):

* ``inproc_ms_12``, ``inproc_ms_128``: p50 of ``Embedder.embed`` of one sentence of 12 and of
  128 tokens (tokenization included, as the enclave will do it), batch 1;
* ``run_ms_12``, ``run_ms_128`` (diagnostic): p50 of ``session.run`` alone on the same tokens;
* ``inproc_b32_per_s``: texts/s embedding a realistic mix of lengths (queries, sentences,
  paragraphs, a few documents cut at 256 tokens) in calls of 32 texts, batched by length;
* ``inproc_all_per_s``: the same texts in one call (the plan then batches across all of them);
* ``naive_b32_per_s``, ``naive_waste``, ``sorted_waste``: the same texts in the caller's order,
  each chunk of 32 padded to its longest text, and the padding fraction of both plans;
* ``load_s``: reading the cached bundle and creating the session (the in-process part of a cold
  start);
* ``peak_rss_mb``: peak RSS of a fresh process that loads the bundle and embeds the mix;
* with ``optimizer=True`` (needs sympy), the same for the graph after onnxruntime's transformer
  optimizer (``opt_*``) and its largest output difference (``opt_max_abs_diff``).

Same session options as the product (:func:`models.text.embedder.session_options`: intra-op
threads = the CPUs this process may use).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np

__all__ = ["run", "SHORT_SENTENCE", "mixed_corpus", "text_of_tokens"]

#: A 12-token sentence ([CLS] + 10 word pieces + [SEP]).
SHORT_SENTENCE: Final = "The patient was discharged after three days of observation."
#: Words that are one word piece each in BERT's uncased vocabulary (checked at run time).
_WORDS: Final = (
    "the",
    "patient",
    "was",
    "given",
    "a",
    "dose",
    "of",
    "medicine",
    "after",
    "doctor",
    "said",
    "that",
    "his",
    "heart",
    "and",
    "lungs",
    "were",
    "fine",
    "but",
    "contract",
    "between",
    "bank",
    "company",
    "will",
    "end",
    "next",
    "year",
    "because",
    "payment",
    "for",
    "loan",
    "is",
    "late",
    "court",
    "must",
    "decide",
    "who",
    "pays",
    "interest",
    "on",
    "money",
    "owed",
)
#: Texts in the throughput mix, and the share of each kind: short queries, sentences,
#: paragraphs, documents cut at the 256-token cap.
CORPUS_SIZE: Final = 256
_MIX: Final = ((0.35, 4, 16), (0.4, 12, 48), (0.2, 48, 200), (0.05, 300, 400))


def text_of_tokens(n: int, seed: int = 0) -> str:
    """A text of ``n`` tokens including [CLS] and [SEP] (``n - 2`` single-piece words)."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(_WORDS, size=max(1, n - 2)).tolist())


def mixed_corpus(size: int = CORPUS_SIZE, seed: int = 0) -> list[str]:
    """Texts with a realistic mix of token lengths (deterministic)."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(_MIX), size=size, p=[m[0] for m in _MIX])
    return [
        text_of_tokens(int(rng.integers(_MIX[k][1], _MIX[k][2])), seed=seed + i)
        for i, k in enumerate(kinds)
    ]


def _p50_ms(fn: Callable[[], object], n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples)) * 1e3


def _measure(onnx_bytes: bytes | None, quick: bool) -> dict[str, float]:
    """Figures for the cached bundle, or for the same bundle with ``onnx_bytes`` as its graph."""
    from models.text.batching import naive_batches, pad_batch, padding_waste, plan_batches
    from models.text.bundle import decode_bundle, encode_bundle, read_bundle
    from models.text.embedder import Embedder
    from models.text.minilm import ensure_minilm_bundle

    path = ensure_minilm_bundle()
    t0 = time.perf_counter()
    bundle = read_bundle(path)
    if onnx_bytes is not None:
        bundle = decode_bundle(
            encode_bundle(
                bundle.config, onnx=onnx_bytes, tokenizer_json=bytes(bundle.tokenizer_json)
            )
        )
    embedder = Embedder(bundle)
    load_s = time.perf_counter() - t0
    tok = embedder.tokenizer
    long_text = text_of_tokens(128)
    (short_ids,), (long_ids,) = tok.encode([SHORT_SENTENCE]), tok.encode([long_text])
    if (len(short_ids), len(long_ids)) != (12, 128):
        raise RuntimeError(f"token counts {len(short_ids)}, {len(long_ids)} (expected 12, 128)")

    def run_ids(ids: np.ndarray) -> None:
        feed = {"input_ids": ids[None, :], "attention_mask": np.ones((1, len(ids)), np.int64)}
        embedder.session.run(None, feed)

    n_short, n_long = (100, 30) if quick else (1000, 200)
    out: dict[str, float] = {
        "inproc_ms_12": _p50_ms(lambda: embedder.embed([SHORT_SENTENCE]), n_short),
        "inproc_ms_128": _p50_ms(lambda: embedder.embed([long_text]), n_long),
        "run_ms_12": _p50_ms(lambda: run_ids(short_ids.ids), n_short),
        "run_ms_128": _p50_ms(lambda: run_ids(long_ids.ids), n_long),
        "load_s": load_s,
    }
    corpus = mixed_corpus()
    calls = [corpus[i : i + 32] for i in range(0, len(corpus), 32)]
    rounds = 1 if quick else 3

    def sorted_pass() -> None:
        for call in calls:
            embedder.embed(call)

    seqs = [t.ids for t in tok.encode(corpus)]
    lengths = [len(s) for s in seqs]
    naive = naive_batches(lengths, max_batch_texts=32)

    def naive_pass() -> None:
        for batch in naive:
            ids, mask = pad_batch(seqs, batch)
            embedder.session.run(None, {"input_ids": ids, "attention_mask": mask})

    out["inproc_b32_per_s"] = len(corpus) / (_p50_ms(sorted_pass, rounds, warmup=1) / 1e3)
    out["inproc_all_per_s"] = len(corpus) / (
        _p50_ms(lambda: embedder.embed(corpus), rounds, warmup=1) / 1e3
    )
    # (the naive pass skips tokenization, so it is, if anything, flattered)
    out["naive_b32_per_s"] = len(corpus) / (_p50_ms(naive_pass, rounds, warmup=1) / 1e3)
    sorted_plan = [
        b
        for call in range(0, len(lengths), 32)
        for b in _offset(plan_batches(lengths[call : call + 32]), call)
    ]
    out["sorted_waste"] = padding_waste(sorted_plan, lengths)
    out["naive_waste"] = padding_waste(naive, lengths)
    return out


def _offset(batches: list[Any], by: int) -> list[Any]:
    from models.text.batching import Batch

    return [Batch(tuple(i + by for i in b.indices), b.length) for b in batches]


def optimized_graph(onnx_bytes: bytes) -> bytes:
    """The graph after onnxruntime's transformer optimizer (BERT fusions; needs sympy)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        onnx.load_from_string(onnx_bytes),
        model_type="bert",
        num_heads=12,
        hidden_size=384,
        opt_level=0,
    )
    return bytes(model.model.SerializeToString(deterministic=True))


def _rss_probe(bundle_path: str) -> None:
    """Child process: load a bundle, embed the mix in calls of 32, print the peak RSS."""
    from models.text.bundle import read_bundle
    from models.text.embedder import Embedder

    embedder = Embedder(read_bundle(Path(bundle_path)))  # the parsed bundle is dropped here
    corpus = mixed_corpus()
    for i in range(0, len(corpus), 32):
        embedder.embed(corpus[i : i + 32])
    print(json.dumps({"peak_rss_mb": _vm_hwm_mb()}))


def _vm_hwm_mb() -> float:
    """Peak RSS of this process image. Not ``ru_maxrss``: Linux carries that over fork and
    exec, so a child of a large parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_rss_mb(bundle_path: Path) -> float:
    """Peak RSS of a fresh process serving ``bundle_path`` (built beforehand: the build's own
    memory, such as the optimizer's, is not the serving process's)."""
    code = f"from runtime.bench.minilm import _rss_probe; _rss_probe({str(bundle_path)!r})"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def run(*, quick: bool, optimizer: bool = False) -> dict[str, float | int | str | None]:
    """Run the in-process MiniLM measurements (see the module docstring)."""
    from models.text.bundle import read_bundle
    from models.text.embedder import available_cpus
    from models.text.minilm import ensure_minilm_bundle

    figures: dict[str, float | int | str | None] = {"threads": available_cpus()}
    figures.update(_measure(None, quick))
    figures["peak_rss_mb"] = _peak_rss_mb(ensure_minilm_bundle())
    if optimizer:
        from models.text.bundle import decode_bundle, encode_bundle
        from models.text.embedder import Embedder

        plain = read_bundle(ensure_minilm_bundle())
        opt_bytes = optimized_graph(bytes(plain.onnx))
        figures.update({f"opt_{k}": v for k, v in _measure(opt_bytes, quick).items()})
        opt_bundle = encode_bundle(
            plain.config, onnx=opt_bytes, tokenizer_json=bytes(plain.tokenizer_json)
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "optimized.bundle"
            path.write_bytes(opt_bundle)
            figures["opt_peak_rss_mb"] = _peak_rss_mb(path)
        opt = Embedder(decode_bundle(opt_bundle))
        base = Embedder(plain)
        corpus = mixed_corpus(64, seed=1)
        diff = np.abs(opt.embed(corpus).vectors - base.embed(corpus).vectors).max()
        figures["opt_max_abs_diff"] = float(diff)
    return figures


if __name__ == "__main__":
    print(
        json.dumps(run(quick="--quick" in sys.argv, optimizer="--optimizer" in sys.argv), indent=1)
    )
