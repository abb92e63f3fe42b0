"""``enclave bench channel``: throughput and latency of the secure channel against its anchors.

All figures come from one run on this machine (``reference/perf-baseline.md`` §4):

* ``aead_gbps``: single-core AES-256-GCM ``encrypt`` of 64 KiB with a reused ``AESGCM`` object
  (the anchor of the throughput budget);
* ``plain_stream_gbps``: a trio stream between two processes over the vsock fabric (host
  backend, temporary fabric directory), no encryption, with the same 1 MiB socket buffers
  ``SecureChannel`` sets on AF_UNIX transports;
* ``channel_gbps``: the same set-up through ``enclave-channel/1`` with 64 KiB records;
* ``channel_ratio`` = channel_gbps / aead_gbps (budget ≥ 0.5), and for context
  ``channel_vs_plain`` = channel_gbps / plain_stream_gbps;
* ``pingpong_us``: p50 of a trio 64-byte round trip over the fabric;
* ``channel_rtt_us``: the same round trip through the channel (no RPC framing), and
  ``channel_rtt_ratio`` = channel_rtt_us / pingpong_us;
* ``rpc_rtt_us``: p50 of one small unary call through channel + ``enclave-rpc/1``;
* ``rpc_ratio`` = rpc_rtt_us / pingpong_us (budget ≤ 1.3).

The peer of every measurement is a second process running this module
(``python -m runtime.bench.channel --peer``); it attests with the throwaway test authority of
:mod:`transport.channel.testing` (transport may not import attest).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from transport.channel import SOCKET_BUFFER_SIZE, Suite, accept_channel, connect_channel
from transport.channel.testing import TestAuthority, TestVerifier, default_pcrs
from transport.logs import configure_logging
from transport.rpc import RpcStream, open_rpc_client, route, serve_rpc, unary_inline
from transport.vsock import VMADDR_CID_PARENT, VsockAddr, open_vsock_listener, open_vsock_stream

__all__ = ["run", "main"]

BenchResult = dict[str, float | int | str | None]

#: Record / AEAD message size of the budget (bytes).
RECORD_SIZE: Final = 64 * 1024
#: Application write size for bulk runs (bytes): four records per send_all.
WRITE_SIZE: Final = 4 * RECORD_SIZE
#: Ping-pong / RPC message size (bytes).
SMALL: Final = 64
#: Latency runs are split into this many interleaved blocks (plus one warm-up block).
_LATENCY_BLOCKS: Final = 10
#: Fabric port the peer listens on (any free port would do; the fabric dir is private).
PORT: Final = 5900
#: Budgets (perf-baseline §4 and issue 2).
CHANNEL_RATIO_BUDGET: Final = 0.5
RPC_RATIO_BUDGET: Final = 1.3
#: Hard bound on the measurements (seconds): a full run takes ~5 s on an idle 2-vCPU VM.
RUN_TIMEOUT_S: Final = 120.0
#: Seconds to wait for the peer process to be ready (it imports trio + cryptography).
PEER_READY_TIMEOUT_S: Final = 30.0

_MODE_SINK, _MODE_ECHO, _MODE_CHANNEL_SINK, _MODE_CHANNEL_ECHO, _MODE_RPC = (
    b"S",
    b"E",
    b"C",
    b"H",
    b"R",
)


# ----------------------------------------------------------------------------- anchors


def measure_aead_gbps(seconds: float) -> float:
    """Single-core AES-256-GCM encrypt throughput at 64 KiB, reused object (GB/s)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(256))
    data = os.urandom(RECORD_SIZE)
    nonce = bytes(12)  # a benchmark of the primitive: the ciphertexts are discarded
    runs: list[float] = []
    for _ in range(5):  # median of 5, as in perf-baseline §2.1
        n = 0
        start = time.perf_counter()
        deadline = start + seconds / 5
        while True:
            for _ in range(16):
                aead.encrypt(nonce, data, None)
            n += 16
            now = time.perf_counter()
            if now >= deadline:
                break
        runs.append(n * RECORD_SIZE / (now - start) / 1e9)
    return statistics.median(runs)


# ----------------------------------------------------------------------------- the peer


async def _peer_main(fabric_dir: Path, port: int) -> None:
    authority = TestAuthority()
    attester = authority.attester()
    listener = await open_vsock_listener(port, fabric_dir=fabric_dir)
    public = authority.public_key.public_bytes_raw().hex()
    print(f"ready {public}", flush=True)
    async with listener, trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(_handle, stream, attester, nursery.cancel_scope)


async def _handle(stream: trio.SocketStream, attester: Any, stop: trio.CancelScope) -> None:
    try:
        mode = await stream.receive_some(1)
        if not mode or mode == b"Q":
            stop.cancel()
            return
        await _serve(stream, mode, attester)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def _same_buffers_as_the_channel(stream: trio.SocketStream) -> None:
    """Give a plain stream the socket buffers SecureChannel sets, so the comparison is fair."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        stream.socket.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_SIZE)


async def _serve(stream: trio.SocketStream, mode: bytes, attester: Any) -> None:
    if mode in (_MODE_SINK, _MODE_ECHO):
        _same_buffers_as_the_channel(stream)
    if mode == _MODE_SINK:
        while await stream.receive_some(RECORD_SIZE):
            pass
        await stream.send_all(b"k")
    elif mode == _MODE_ECHO:
        while echoed := await stream.receive_some(RECORD_SIZE):
            await stream.send_all(echoed)
    elif mode == _MODE_CHANNEL_SINK:
        channel = await accept_channel(stream, attester=attester, suites=[Suite.X25519])
        while await channel.receive_some():
            pass
        await channel.send_all(b"k")
        await channel.aclose()
    elif mode == _MODE_CHANNEL_ECHO:
        channel = await accept_channel(stream, attester=attester, suites=[Suite.X25519])
        while data := await channel.receive_some():
            await channel.send_all(data)
        await channel.aclose()
    elif mode == _MODE_RPC:

        def echo(request: Any, _stream: RpcStream) -> Any:
            return request

        # A small synchronous method is answered in the reader task (no handler task), as the
        # inference server answers its catalog and small-model requests.
        channel = await accept_channel(stream, attester=attester, suites=[Suite.X25519])
        await serve_rpc(channel, route({"echo": unary_inline(echo)}))


# ----------------------------------------------------------------------------- the client


async def _open(fabric_dir: Path, mode: bytes) -> trio.SocketStream:
    stream = await open_vsock_stream(VsockAddr(VMADDR_CID_PARENT, PORT), fabric_dir=fabric_dir)
    if mode in (_MODE_SINK, _MODE_ECHO):
        _same_buffers_as_the_channel(stream)
    await stream.send_all(mode)
    return stream


async def _bulk(fabric_dir: Path, verifier: TestVerifier | None, total: int) -> float:
    """Send ``total`` bytes in WRITE_SIZE writes, plain or through the channel; GB/s."""
    payload = memoryview(os.urandom(WRITE_SIZE))
    if verifier is None:
        stream: trio.abc.HalfCloseableStream = await _open(fabric_dir, _MODE_SINK)
    else:
        stream = await connect_channel(
            await _open(fabric_dir, _MODE_CHANNEL_SINK), verifier=verifier
        )
    start = time.perf_counter()
    sent = 0
    while sent < total:
        await stream.send_all(payload)
        sent += WRITE_SIZE
    await stream.send_eof()
    ack = await stream.receive_some(1)
    elapsed = time.perf_counter() - start
    await stream.aclose()
    if ack != b"k":
        raise RuntimeError("the bench peer did not acknowledge the transfer")
    return sent / elapsed / 1e9


async def _echo_rounds(stream: trio.abc.Stream, rounds: int) -> list[float]:
    """Round-trip times (s) of 64 bytes echoed by the peer."""
    message = os.urandom(SMALL)
    samples: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        await stream.send_all(message)
        got = 0
        while got < SMALL:
            got += len(await stream.receive_some(RECORD_SIZE))
        samples.append(time.perf_counter() - start)
    return samples


async def _latencies(
    fabric_dir: Path, verifier: TestVerifier, rounds: int
) -> tuple[float, float, float]:
    """p50 round trips (µs): plain ping-pong, the same through the channel, one RPC call.

    The three run interleaved in blocks over three open connections, so that load from
    elsewhere on a shared machine hits them alike; the first block of each only warms up.
    """
    plain = await _open(fabric_dir, _MODE_ECHO)
    channel = await connect_channel(await _open(fabric_dir, _MODE_CHANNEL_ECHO), verifier=verifier)
    samples: dict[str, list[float]] = {"plain": [], "channel": [], "rpc": []}
    block = max(rounds // _LATENCY_BLOCKS, 1)
    request = {"x": os.urandom(SMALL - 16)}
    rpc_channel = await connect_channel(await _open(fabric_dir, _MODE_RPC), verifier=verifier)
    async with open_rpc_client(rpc_channel) as rpc:
        for i in range(_LATENCY_BLOCKS + 1):
            keep = i > 0
            got = await _echo_rounds(plain, block)
            samples["plain"] += got if keep else []
            got = await _echo_rounds(channel, block)
            samples["channel"] += got if keep else []
            for _ in range(block):
                start = time.perf_counter()
                await rpc.call("echo", request)
                if keep:
                    samples["rpc"].append(time.perf_counter() - start)
    await plain.aclose()
    await channel.aclose()
    p50 = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    return p50["plain"], p50["channel"], p50["rpc"]


async def _client_main(
    fabric_dir: Path, verifier: TestVerifier, *, quick: bool
) -> dict[str, float | None]:
    with trio.fail_after(RUN_TIMEOUT_S):
        return await _measure(fabric_dir, verifier, quick=quick)


async def _measure(
    fabric_dir: Path, verifier: TestVerifier, *, quick: bool
) -> dict[str, float | None]:
    bulk = (32 if quick else 256) * 1024 * 1024
    repeats = 1 if quick else 5
    rounds = 300 if quick else 3000
    plain: list[float] = []
    channel: list[float] = []
    for _ in range(repeats):  # interleaved, so that outside load hits both alike
        plain.append(await _bulk(fabric_dir, None, bulk))
        channel.append(await _bulk(fabric_dir, verifier, bulk))
    pingpong, channel_rtt, rpc = await _latencies(fabric_dir, verifier, rounds)
    quit_stream = await _open(fabric_dir, b"Q")
    await quit_stream.aclose()
    return {
        "plain_stream_gbps": statistics.median(plain),
        "channel_gbps": statistics.median(channel),
        "pingpong_us": pingpong,
        "channel_rtt_us": channel_rtt,
        "rpc_rtt_us": rpc,
    }


def run(*, quick: bool) -> BenchResult:
    """Run the channel suite; see the module docstring for the figures returned."""
    aead = measure_aead_gbps(0.2 if quick else 1.0)
    with tempfile.TemporaryDirectory(prefix="enclave-bench-") as tmp:
        fabric_dir = Path(tmp) / "vsock"
        env = dict(os.environ, ENCLAVE_VSOCK_DIR=str(fabric_dir))
        peer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime.bench.channel",
                "--peer",
                "--fabric-dir",
                str(fabric_dir),
            ],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        try:
            assert peer.stdout is not None
            line = _read_ready(peer)
            trusted = Ed25519PublicKey.from_public_bytes(bytes.fromhex(line.split()[1]))
            verifier = TestVerifier(trusted, expected_pcrs=default_pcrs())
            figures = trio.run(lambda: _client_main(fabric_dir, verifier, quick=quick))
            peer.wait(timeout=10)
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.wait()
    channel_gbps = figures["channel_gbps"]
    rpc = figures["rpc_rtt_us"]
    assert channel_gbps is not None
    pingpong = figures["pingpong_us"]
    assert pingpong is not None
    result: BenchResult = {
        "aead_gbps": round(aead, 3),
        "plain_stream_gbps": round(figures["plain_stream_gbps"] or 0.0, 3),
        "channel_gbps": round(channel_gbps, 3),
        "channel_ratio": round(channel_gbps / aead, 3),
        "channel_ratio_budget": CHANNEL_RATIO_BUDGET,
        "channel_vs_plain": round(channel_gbps / (figures["plain_stream_gbps"] or 1.0), 3),
        "pingpong_us": round(pingpong, 1),
        "channel_rtt_us": round(figures["channel_rtt_us"] or 0.0, 1),
        "channel_rtt_ratio": round((figures["channel_rtt_us"] or 0.0) / pingpong, 3),
        "rpc_rtt_us": None if rpc is None else round(rpc, 1),
        "rpc_ratio": None if rpc is None else round(rpc / pingpong, 3),
        "rpc_ratio_budget": RPC_RATIO_BUDGET,
        "record_bytes": RECORD_SIZE,
        "transport": "vsock fabric (host backend, AF_UNIX)",
    }
    return result


def _read_ready(peer: subprocess.Popen[str]) -> str:
    assert peer.stdout is not None
    deadline = time.monotonic() + PEER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        line = peer.stdout.readline()
        if line.startswith("ready "):
            return line
        if not line and peer.poll() is not None:
            break
    raise RuntimeError("the bench peer process did not start")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the peer process (``python -m runtime.bench.channel --peer``)."""
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.channel")
    parser.add_argument("--peer", action="store_true", help="run the bench peer")
    parser.add_argument("--fabric-dir", type=Path)
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    configure_logging("warning")
    if args.peer:
        if args.fabric_dir is None:
            parser.error("--peer needs --fabric-dir")
        trio.run(_peer_main, args.fabric_dir, args.port)
        return 0
    import json

    print(json.dumps({"channel": run(quick=args.quick)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
