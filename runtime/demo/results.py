"""What one demo run yields: its figures and measurements (:class:`DemoResults`), or the
failure of a step (:class:`DemoFailure`)."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.stack import StackError

__all__ = ["DemoFailure", "DemoFigures", "DemoResults"]


class DemoFailure(StackError):
    """A demo step failed (message says which and why)."""


@dataclass(frozen=True)
class DemoFigures:
    """What the client measured through the enclave."""

    #: Share of the test split classified correctly, and the split's size.
    accuracy: float
    samples: int
    #: One cold pass of the split (seconds), steady-state samples/s, unary latency (ms).
    stream_s: float
    throughput: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class DemoResults(DemoFigures):
    """The figures and measurements of one demo run."""

    #: PCR0 of the server image and the SHA-384 of the served model (hex).
    pcr0: str
    model_sha384: str
    #: What the client verified: the enclave's module id and PCR16 (hex).
    module_id: str
    pcr16: str
    #: Why the KMS refused the debug enclave (from the audit log).
    debug_denial: str
    #: SHA-384s (hex) of the served models in the server's order (PCR16 extends them all):
    #: digits, then MiniLM.
    model_digests: tuple[str, ...] = ()
    #: The second act: per query (query, best document, cosine), and one query's p50 through
    #: the enclave and in-process (ms).
    text_matches: tuple[tuple[str, int, float], ...] = ()
    text_enclave_ms: float = 0.0
    text_inproc_ms: float = 0.0
    #: Third act: the error the KMS answered the restarted enclave once the owner disabled its
    #: key in its XKS proxy (``KMSInvalidStateException``), and the audit log's reason.
    hyok_refusal: str = ""
