"""The attest bench runs end to end and reports consistent figures (budgets are not asserted)."""

from __future__ import annotations

from runtime.bench.attest import run


def test_quick_bench_figures() -> None:
    figures = run(quick=True)
    for key in (
        "es384_sign_per_s",
        "es384_verify_per_s",
        "doc_issue_per_s",
        "doc_verify_per_s",
        "doc_verify_full_per_s",
        "doc_verify_cached_per_s",
    ):
        assert isinstance(figures[key], float)
        assert figures[key] > 0
    assert figures["chain_certificates"] == 5
    ratio = figures["doc_issue_per_s"] / figures["es384_sign_per_s"]  # type: ignore[operator]
    assert abs(figures["issue_ratio"] - ratio) < 0.01  # type: ignore[operator]
    assert figures["verify_ratio"] == figures["verify_ratio_cached"]
    # caching the chain must pay off: 1 ECDSA verification per document instead of 5
    assert figures["verify_ratio_cached"] > figures["verify_ratio_full"]  # type: ignore[operator]
