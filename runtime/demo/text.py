"""The demo's second act: confidential text search with MiniLM inside the enclave.

Twenty short synthetic confidential documents (clinical notes, contract clauses, bank
transactions) are embedded *inside the enclave* (sent over the attested channel, tokenized and
embedded there: the host relays only ciphertext); queries are embedded the same way and matched
by cosine similarity (the vectors are L2-normalised: a dot product). The act prints the best
matches, the latency of one query through the enclave, and the same query's latency in this
process with onnxruntime (the same bundle, the same session options, as many threads as the
enclave has CPUs, run on the enclave's CPU while the enclave is idle): the overhead of the
confidential path.

The documents and queries are written so that the right answer shares almost no words with the
query (a paraphrase, not a keyword hit); the act fails if a query does not find its document.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import trio

from runtime.stack import StackError

if TYPE_CHECKING:
    from models.client import InferenceClient
    from models.text.embedder import Embedder
    from runtime.demo.narration import Console

__all__ = ["DOCUMENTS", "QUERIES", "TextAct", "text_act", "LATENCY_SAMPLES"]

#: The confidential documents (synthetic; any resemblance is the point of the demo).
DOCUMENTS: Final = (
    "Clinical note: 58-year-old man with chest tightness when climbing stairs, relieved by rest; "
    "exercise ECG ordered.",
    "Clinical note: child with fever and ear pain for two days; amoxicillin prescribed.",
    "Clinical note: persistent dry cough and night sweats for three weeks; chest X-ray clear.",
    "Clinical note: woman, 34, recurring migraine with aura; preventive therapy started.",
    "Clinical note: type 2 diabetes follow-up, HbA1c 7.9 percent, metformin dose increased.",
    "Clinical note: sprained left ankle playing football, swelling, no fracture on X-ray.",
    "Contract: the supplier delivers 500 units per month; late delivery costs a 2 percent "
    "penalty per week.",
    "Contract: either party may terminate this lease with sixty days' written notice.",
    "Contract: the employee will not work for a competitor for twelve months after leaving.",
    "Contract: all intellectual property created under this agreement belongs to the client.",
    "Contract: the loan of 250,000 euros is repayable over ten years at a fixed rate of 3.1 "
    "percent.",
    "Contract: confidential information must not be disclosed to third parties for five years.",
    "Transaction: wire transfer of 48,000 USD to an account in a new jurisdiction, flagged for "
    "review.",
    "Transaction: card payment of 12.50 EUR at a bakery on Tuesday morning.",
    "Transaction: monthly salary of 3,200 GBP credited by the employer.",
    "Transaction: three cash deposits just under the reporting threshold within one hour.",
    "Transaction: refund of 89.99 USD for returned headphones.",
    "Transaction: streaming subscription payment declined for insufficient funds.",
    "Insurance claim: water damage in the kitchen after a burst pipe; plumber's invoice attached.",
    "HR record: employee requested four months of parental leave starting in March.",
)
#: Queries and the index of the document each must find.
QUERIES: Final = (
    ("Which patient gets chest pain going up the stairs?", 0),
    ("cash split into small deposits to avoid being reported", 15),
)
#: Query round trips for the latency figure (each way: enclave and in-process).
LATENCY_SAMPLES: Final = 30


@dataclass(frozen=True)
class TextAct:
    """What the second act found and measured."""

    documents: int
    #: Per query: (query, best document's index, its cosine similarity).
    matches: tuple[tuple[str, int, float], ...]
    #: Embedding every document inside the enclave (one request), ms.
    documents_ms: float
    #: p50 of one query's embedding: through the enclave, and in this process (ms).
    enclave_p50_ms: float
    inproc_p50_ms: float

    @property
    def overhead(self) -> float:
        """enclave_p50_ms / inproc_p50_ms."""
        return self.enclave_p50_ms / self.inproc_p50_ms


class TextActFailure(StackError):
    """A query did not find its document (the embeddings are wrong)."""


@contextmanager
def _on_cpus(cpus: Sequence[int]) -> Iterator[None]:
    """This thread on ``cpus`` for the block (no-op when they are not ours to use)."""
    saved = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _load_anchor(bundle: Path, threads: int) -> Embedder:
    """The same bundle in this process, loaded the way the enclave loads it."""
    from models.text.embedder import Embedder

    with bundle.open("rb") as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(buf)
    return Embedder.from_buffer(buf, threads=threads)


async def text_act(
    client: InferenceClient,
    out: Console,
    *,
    model: str,
    bundle: Path,
    enclave_cpus: Sequence[int],
) -> TextAct:
    """Run the act against ``model`` on ``client`` (see the module docstring).

    Raises:
        TextActFailure: a query's best match is not its document.
    """
    out.step(f"second act: {len(DOCUMENTS)} confidential documents embedded inside the enclave")
    t0 = time.perf_counter()
    docs = await client.embed(model, list(DOCUMENTS))
    documents_ms = (time.perf_counter() - t0) * 1e3
    out.ok(
        f"{len(DOCUMENTS)} documents -> float32 {list(docs.vectors.shape)} in "
        f"{documents_ms:.0f} ms (sent as ciphertext, tokenized and embedded in the enclave)"
    )
    matches = []
    for query, expected in QUERIES:
        (vector,) = (await client.embed(model, [query])).vectors
        scores = docs.vectors @ vector
        best = int(np.argmax(scores))
        if best != expected:
            raise TextActFailure(
                f"query {query!r} matched document {best}, not {expected}: {DOCUMENTS[best]!r}"
            )
        runner_up = float(np.sort(scores)[-2])
        out.ok(f"query      {query!r}")
        out.info(f"best match {DOCUMENTS[best]!r}")
        out.info(f"cosine     {scores[best]:.3f} (next best {runner_up:.3f})")
        matches.append((query, best, float(scores[best])))

    query = QUERIES[0][0]
    anchor = await trio.to_thread.run_sync(_load_anchor, bundle, len(enclave_cpus))
    enclave: list[float] = []
    inproc: list[float] = []
    with _on_cpus(enclave_cpus):
        anchor.embed([query])
    await client.embed(model, [query])
    for _ in range(3):  # alternating blocks: a change of load hits both
        with _on_cpus(enclave_cpus):
            for _ in range(LATENCY_SAMPLES // 3):
                t1 = time.perf_counter()
                anchor.embed([query])
                inproc.append(time.perf_counter() - t1)
        for _ in range(LATENCY_SAMPLES // 3):
            t1 = time.perf_counter()
            await client.embed(model, [query])
            enclave.append(time.perf_counter() - t1)
    del anchor
    act = TextAct(
        documents=len(DOCUMENTS),
        matches=tuple(matches),
        documents_ms=documents_ms,
        enclave_p50_ms=float(np.median(enclave)) * 1e3,
        inproc_p50_ms=float(np.median(inproc)) * 1e3,
    )
    out.ok(
        f"latency    p50 {act.enclave_p50_ms:.2f} ms per query through the enclave, "
        f"{act.inproc_p50_ms:.2f} ms in-process onnxruntime ({len(enclave_cpus)} CPU): "
        f"overhead x{act.overhead:.2f}"
    )
    return act
