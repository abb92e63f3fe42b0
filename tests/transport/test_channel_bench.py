"""The channel benchmark runs end to end (peer in a second process, over the vsock fabric; the
gRPC peer in a third), with its peers measured in the same run.

Budgets are reported by ``enclave bench``, never asserted here (the machine is shared)."""

from __future__ import annotations

import pytest

from runtime.bench import channel as bench


@pytest.mark.slow
def test_quick_bench_measures_every_figure() -> None:
    figures = bench.run(quick=True)
    for key in (
        "aead_gbps",
        "plain_stream_gbps",
        "channel_gbps",
        "tls_gbps",
        "pingpong_us",
        "channel_rtt_us",
        "tls_rtt_us",
        "rpc_rtt_us",
        "grpc_rtt_us",  # grpcio is in the test extra
    ):
        value = figures[key]
        assert isinstance(value, float), key
        assert value > 0, key
    # Diagnostics: Python calls per round trip in the client process (sys.setprofile). RPC adds
    # work on top of the channel. (The channel is not compared with the plain ping-pong: doing
    # its socket I/O itself it may make fewer calls than trio's SocketStream, how many fewer
    # depending on whether the answer is already there when it reads.)
    calls: list[float] = []
    for key in ("pingpong_calls", "channel_calls", "rpc_calls"):
        value = figures[key]
        assert isinstance(value, float), key
        calls.append(value)
    assert all(c > 0 for c in calls)
    assert calls[1] < calls[2]
    assert figures["tls_cipher"] == "TLSv1.3 TLS_AES_256_GCM_SHA384"
    # Ratios are the figures' quotients (rounded to 3 decimals, hence the tolerance).
    for ratio, num, den in (
        ("channel_vs_plain", "channel_gbps", "plain_stream_gbps"),
        ("channel_vs_tls", "channel_gbps", "tls_gbps"),
        ("rpc_ratio", "rpc_rtt_us", "pingpong_us"),
        ("rpc_vs_grpc", "rpc_rtt_us", "grpc_rtt_us"),
    ):
        num_value, den_value = figures[num], figures[den]
        assert isinstance(num_value, float)
        assert isinstance(den_value, float)
        assert figures[ratio] == pytest.approx(num_value / den_value, rel=0.02, abs=0.002)
    assert figures["rpc_ratio_budget"] == 1.5
    assert figures["rpc_vs_grpc_budget"] == 0.6
    assert figures["channel_vs_plain_budget"] == 0.8
    assert figures["channel_vs_tls_budget"] == 2.0
