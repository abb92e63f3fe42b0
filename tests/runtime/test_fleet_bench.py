"""The fleet benchmark runs end to end (a stack with three replicas, load, a replica
terminated under load, handshakes), shortened. Budgets are reported by ``enclave bench``,
never asserted here (the machine is shared), except the failover's: no call may fail."""

from __future__ import annotations

import pytest
import trio

from runtime.bench import fleet

pytestmark = pytest.mark.slow


async def test_a_short_fleet_run_measures_every_figure() -> None:
    with trio.fail_after(240):
        figures = await fleet.measure(seconds=0.3, window_s=2.0, concurrency=(1, 8), handshakes=5)
    for replicas in (1, 2):
        for clients in (1, 8):
            for key in ("per_s", "p50_ms", "p99_ms"):
                value = figures[f"r{replicas}_c{clients}_{key}"]
                assert isinstance(value, float)
                assert value > 0
    for key in ("conn_rss_kib", "failover_gap_ms", "failover_max_ms", "mutual_handshake_ms",
                "one_sided_handshake_ms"):  # fmt: skip
        assert isinstance(figures[key], float), key
    assert figures["failover_failed_calls"] == 0
    assert figures["failover_calls_after"] > 0
    assert figures["mutual_handshake_ratio"] == pytest.approx(
        figures["mutual_handshake_ms"] / figures["one_sided_handshake_ms"]  # type: ignore[operator]
    )


async def test_the_relay_figures() -> None:
    """Plaintext and the mutually attested channel between two emulated enclaves (child
    processes on their own brokers) through the parent's relay."""
    with trio.fail_after(240):
        figures = await fleet.measure_relay(True)
    assert figures["relay_plain_gbps"] > 0
    assert figures["relay_channel_gbps"] > 0
    assert figures["relay_exchange_ratio"] == pytest.approx(
        figures["relay_plain_gbps"] / figures["relay_channel_gbps"]
    )
