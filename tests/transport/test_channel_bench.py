"""The channel benchmark runs end to end (peer in a second process, over the vsock fabric).

Budgets are reported by ``enclave bench``, never asserted here (the machine is shared)."""

from __future__ import annotations

import pytest

from runtime.bench import channel as bench


@pytest.mark.slow
def test_quick_bench_measures_every_figure() -> None:
    figures = bench.run(quick=True)
    for key in ("aead_gbps", "plain_stream_gbps", "channel_gbps", "pingpong_us", "channel_rtt_us"):
        value = figures[key]
        assert isinstance(value, float)
        assert value > 0
    # Figures are rounded to 3 decimals, hence the absolute tolerance.
    assert figures["channel_ratio"] == pytest.approx(
        figures["channel_gbps"] / figures["aead_gbps"], rel=0.01, abs=0.002
    )
    rpc = figures["rpc_rtt_us"]
    assert rpc is None or (isinstance(rpc, float) and rpc > 0)
