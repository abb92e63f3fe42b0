"""``enclave bench channel``: throughput and latency of the secure channel against its anchors.

All figures come from one run on this machine (``reference/perf-baseline.md`` §4):

* ``aead_gbps``: single-core AES-256-GCM ``encrypt`` of 64 KiB with a reused ``AESGCM`` object
  (the anchor of the throughput budget);
* ``plain_stream_gbps``: a trio stream between two processes over the vsock fabric (host
  backend, temporary fabric directory), no encryption, with the same 1 MiB socket buffers
  ``SecureChannel`` sets on AF_UNIX transports;
* ``channel_gbps``: the same set-up through ``enclave-channel/1`` with 64 KiB records;
* ``channel_ratio`` = channel_gbps / aead_gbps (a diagnostic: on fast CPUs the plain stream
  itself caps it), and ``channel_vs_plain`` = channel_gbps / plain_stream_gbps (budget ≥ 0.8);
* ``tls_gbps``: the peer a user would otherwise pick, ``trio.SSLStream`` with TLS 1.3 and
  AES-256-GCM (``tls_cipher`` says what was negotiated), over the same fabric stream, same
  writes; ``channel_vs_tls`` = channel_gbps / tls_gbps (budget ≥ 2);
* ``pingpong_us``: p50 of a trio 64-byte round trip over the fabric;
* ``channel_rtt_us``: the same round trip through the channel (no RPC framing), and
  ``channel_rtt_ratio`` = channel_rtt_us / pingpong_us; ``tls_rtt_us``: the same through TLS;
* ``rpc_rtt_us``: p50 of one small unary call through channel + ``enclave-rpc/1``;
* ``rpc_ratio`` = rpc_rtt_us / pingpong_us (budget ≤ 1.5 for now, goal 1.3);
* ``pingpong_calls``, ``channel_calls``, ``rpc_calls`` (diagnostics): Python calls this
  process makes per round trip of the ping-pong, of the channel round trip and of one RPC
  call (function calls, C calls and coroutine resumptions, trio's scheduler included; counted
  with ``sys.setprofile`` over a separate block, after the timed ones). Unlike the times they
  hardly move with the load of a shared machine: the figure to compare when cutting work from
  the client side of the hot paths (the peer's side is not counted);
* ``cores``: whether the sans-IO cores ran compiled (mypyc) or interpreted
  (:mod:`transport.accel`; ``ENCLAVE_PURE_PYTHON=1`` measures the interpreted ones);
* ``grpc_rtt_us``: p50 of a plaintext grpcio unary echo of the same request over a Unix
  socket (server in a second process), the RPC a user would otherwise pick; ``rpc_vs_grpc``
  = rpc_rtt_us / grpc_rtt_us (budget ≤ 0.6). None when grpcio is not installed (``pip install
  enclave-runtime[bench]``).

The latency figures are measured interleaved in blocks over connections opened up front, so
that load from elsewhere on a shared machine hits them alike. The peer of every measurement is
a second process running this module (``python -m runtime.bench.channel --peer``); it attests
with the throwaway test authority of :mod:`transport.channel.testing` (transport may not import
attest). The gRPC peer is a third (``--grpc-peer``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import msgpack
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from transport import accel
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
#: Budgets (DESIGN.md §9, issue 11).
CHANNEL_VS_PLAIN_BUDGET: Final = 0.8
CHANNEL_VS_TLS_BUDGET: Final = 2.0
RPC_RATIO_BUDGET: Final = 1.5
RPC_VS_GRPC_BUDGET: Final = 0.6
#: Host name in the TLS peer's throwaway certificate.
TLS_NAME: Final = "bench.invalid"
#: The gRPC peer's method (a generic handler: raw bytes in and out, no protobuf).
GRPC_METHOD: Final = "/bench.Echo/Echo"
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
_MODE_TLS_SINK, _MODE_TLS_ECHO = b"T", b"L"


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


async def _peer_main(fabric_dir: Path, port: int, tls: ssl.SSLContext) -> None:
    authority = TestAuthority()
    attester = authority.attester()
    listener = await open_vsock_listener(port, fabric_dir=fabric_dir)
    public = authority.public_key.public_bytes_raw().hex()
    print(f"ready {public}", flush=True)
    async with listener, trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(_handle, stream, attester, tls, nursery.cancel_scope)


async def _handle(
    stream: trio.SocketStream, attester: Any, tls: ssl.SSLContext, stop: trio.CancelScope
) -> None:
    try:
        mode = await stream.receive_some(1)
        if not mode or mode == b"Q":
            stop.cancel()
            return
        if mode in (_MODE_TLS_SINK, _MODE_TLS_ECHO):
            _same_buffers_as_the_channel(stream)
            await _serve_tls(trio.SSLStream(stream, tls, server_side=True), mode)
            return
        await _serve(stream, mode, attester)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_tls(tls: trio.SSLStream[trio.SocketStream], mode: bytes) -> None:
    await tls.do_handshake()
    if mode == _MODE_TLS_SINK:
        header = b""
        while len(header) < 8:
            header += await tls.receive_some(8 - len(header))
        left = int.from_bytes(header, "big")
        while left > 0:
            data = await tls.receive_some(RECORD_SIZE)
            if not data:
                return
            left -= len(data)
        await tls.send_all(b"k")
    else:
        while data := await tls.receive_some(RECORD_SIZE):
            await tls.send_all(data)
    await tls.aclose()


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


async def _open_tls(
    fabric_dir: Path, mode: bytes, tls: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    stream = await _open(fabric_dir, mode)
    _same_buffers_as_the_channel(stream)
    tls_stream = trio.SSLStream(stream, tls, server_hostname=TLS_NAME)
    await tls_stream.do_handshake()
    return tls_stream


async def _bulk(
    fabric_dir: Path,
    verifier: TestVerifier | None,
    total: int,
    *,
    tls: ssl.SSLContext | None = None,
) -> float:
    """Send ``total`` bytes in WRITE_SIZE writes, plain, through the channel or through TLS;
    GB/s."""
    payload = memoryview(os.urandom(WRITE_SIZE))
    stream: trio.abc.Stream
    if tls is not None:
        stream = await _open_tls(fabric_dir, _MODE_TLS_SINK, tls)
        await stream.send_all(total.to_bytes(8, "big"))
    elif verifier is None:
        stream = await _open(fabric_dir, _MODE_SINK)
    else:
        stream = await connect_channel(
            await _open(fabric_dir, _MODE_CHANNEL_SINK), verifier=verifier
        )
    start = time.perf_counter()
    sent = 0
    while sent < total:
        await stream.send_all(payload)
        sent += WRITE_SIZE
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    else:  # TLS has no half-close: the peer counts the bytes announced up front
        pass
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


async def _echo_once(stream: trio.abc.Stream, message: bytes) -> None:
    """One round of :func:`_echo_rounds` without its clock (for the call counts)."""
    await stream.send_all(message)
    got = 0
    while got < len(message):
        got += len(await stream.receive_some(RECORD_SIZE))


_GrpcCall = Callable[[bytes], bytes]


async def _latencies(
    fabric_dir: Path,
    verifier: TestVerifier,
    tls: ssl.SSLContext,
    grpc_call: _GrpcCall | None,
    rounds: int,
) -> dict[str, float]:
    """p50 round trips (µs): plain ping-pong, the same through the channel and through TLS,
    one RPC call, one gRPC call (if grpcio is there).

    They run interleaved in blocks over connections opened up front, so that load from
    elsewhere on a shared machine hits them alike; the first block of each only warms up.
    """
    plain = await _open(fabric_dir, _MODE_ECHO)
    channel = await connect_channel(await _open(fabric_dir, _MODE_CHANNEL_ECHO), verifier=verifier)
    tls_stream = await _open_tls(fabric_dir, _MODE_TLS_ECHO, tls)
    samples: dict[str, list[float]] = {"plain": [], "channel": [], "tls": [], "rpc": []}
    if grpc_call is not None:
        samples["grpc"] = []
    block = max(rounds // _LATENCY_BLOCKS, 1)
    request = {"x": os.urandom(SMALL - 16)}
    encoded = msgpack.packb(request)  # gRPC carries the same bytes the RPC call does
    rpc_channel = await connect_channel(await _open(fabric_dir, _MODE_RPC), verifier=verifier)
    async with open_rpc_client(rpc_channel) as rpc:
        for i in range(_LATENCY_BLOCKS + 1):
            keep = i > 0
            got = await _echo_rounds(plain, block)
            samples["plain"] += got if keep else []
            got = await _echo_rounds(channel, block)
            samples["channel"] += got if keep else []
            got = await _echo_rounds(tls_stream, block)
            samples["tls"] += got if keep else []
            for _ in range(block):
                start = time.perf_counter()
                await rpc.call("echo", request)
                if keep:
                    samples["rpc"].append(time.perf_counter() - start)
            if grpc_call is not None:
                # Blocking calls (grpcio's own client): nothing else runs meanwhile anyway.
                for _ in range(block):
                    start = time.perf_counter()
                    grpc_call(encoded)
                    if keep:
                        samples["grpc"].append(time.perf_counter() - start)
                await trio.lowlevel.checkpoint()
        p50 = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
        message = os.urandom(SMALL)
        p50["pingpong_calls"] = await _calls_per_round(lambda: _echo_once(plain, message), block)
        p50["channel_calls"] = await _calls_per_round(lambda: _echo_once(channel, message), block)
        p50["rpc_calls"] = await _calls_per_round(lambda: rpc.call("echo", request), block)
    await plain.aclose()
    await channel.aclose()
    await trio.aclose_forcefully(tls_stream)
    return p50


async def _calls_per_round(one_round: Callable[[], Awaitable[object]], rounds: int) -> float:
    """Python calls this process makes per ``one_round()`` (calls, C calls and coroutine
    resumptions, the scheduler's included), counted with ``sys.setprofile``."""
    count = 0

    def profile(_frame: object, event: str, _arg: object) -> None:
        nonlocal count
        if event == "call" or event == "c_call":
            count += 1

    await one_round()  # warm (caches, the first lead)
    sys.setprofile(profile)
    try:
        for _ in range(rounds):
            await one_round()
    finally:
        sys.setprofile(None)
    return count / rounds


async def _client_main(
    fabric_dir: Path,
    verifier: TestVerifier,
    tls: ssl.SSLContext,
    grpc_call: _GrpcCall | None,
    *,
    quick: bool,
) -> dict[str, float | str | None]:
    with trio.fail_after(RUN_TIMEOUT_S):
        return await _measure(fabric_dir, verifier, tls, grpc_call, quick=quick)


async def _measure(
    fabric_dir: Path,
    verifier: TestVerifier,
    tls: ssl.SSLContext,
    grpc_call: _GrpcCall | None,
    *,
    quick: bool,
) -> dict[str, float | str | None]:
    bulk = (32 if quick else 256) * 1024 * 1024
    repeats = 1 if quick else 5
    rounds = 300 if quick else 3000
    plain: list[float] = []
    channel: list[float] = []
    over_tls: list[float] = []
    for _ in range(repeats):  # interleaved, so that outside load hits them alike
        plain.append(await _bulk(fabric_dir, None, bulk))
        channel.append(await _bulk(fabric_dir, verifier, bulk))
        over_tls.append(await _bulk(fabric_dir, None, bulk, tls=tls))
    probe = await _open_tls(fabric_dir, _MODE_TLS_ECHO, tls)
    cipher = probe.cipher()
    await trio.aclose_forcefully(probe)
    p50 = await _latencies(fabric_dir, verifier, tls, grpc_call, rounds)
    quit_stream = await _open(fabric_dir, b"Q")
    await quit_stream.aclose()
    return {
        "plain_stream_gbps": statistics.median(plain),
        "channel_gbps": statistics.median(channel),
        "tls_gbps": statistics.median(over_tls),
        "tls_cipher": None if cipher is None else f"{cipher[1]} {cipher[0]}",
        "pingpong_us": p50["plain"],
        "channel_rtt_us": p50["channel"],
        "tls_rtt_us": p50["tls"],
        "rpc_rtt_us": p50["rpc"],
        "grpc_rtt_us": p50.get("grpc"),
        "pingpong_calls": p50["pingpong_calls"],
        "channel_calls": p50["channel_calls"],
        "rpc_calls": p50["rpc_calls"],
    }


# ----------------------------------------------------------------------------- TLS and gRPC


def _tls_contexts(tmp: Path) -> tuple[ssl.SSLContext, Path, Path]:
    """A throwaway certificate for the TLS peer; the client context that trusts it (TLS 1.3
    only; OpenSSL's default TLS 1.3 order puts AES-256-GCM first, checked in tls_cipher)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "tls.crt", tmp / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    client = ssl.create_default_context(cafile=str(cert_path))
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    return client, cert_path, key_path


def _tls_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(str(cert), str(key))
    return server


def _grpc_peer_main(socket_path: Path) -> int:
    """The gRPC peer process: a plaintext unary echo on a Unix socket (raw bytes, no
    protobuf: a generic handler, so nothing but gRPC itself is measured)."""
    from concurrent import futures

    import grpc

    def echo(request: bytes, context: object) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), handlers=[handler])
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    print("ready grpc", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(grace=None)
    return 0


def _start_grpc_peer(
    tmp: Path,
) -> tuple[subprocess.Popen[str], _GrpcCall, Callable[[], None]] | None:
    """Start the gRPC peer and connect to it; None if grpcio is not installed."""
    try:
        import grpc
    except ImportError:
        return None
    socket_path = tmp / "grpc.sock"
    peer = subprocess.Popen(
        [sys.executable, "-m", "runtime.bench.channel", "--grpc-peer", str(socket_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    _read_ready(peer)
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    grpc.channel_ready_future(channel).result(timeout=PEER_READY_TIMEOUT_S)
    call = channel.unary_unary(GRPC_METHOD)

    def close() -> None:
        channel.close()

    return peer, call, close


def _stop(peer: subprocess.Popen[str]) -> None:
    if peer.stdin is not None:
        peer.stdin.close()
    try:
        peer.wait(timeout=10)
    except subprocess.TimeoutExpired:
        peer.kill()
        peer.wait()


def run(*, quick: bool) -> BenchResult:
    """Run the channel suite; see the module docstring for the figures returned."""
    aead = measure_aead_gbps(0.2 if quick else 1.0)
    with tempfile.TemporaryDirectory(prefix="enclave-bench-") as tmp_name:
        tmp = Path(tmp_name)
        fabric_dir = tmp / "vsock"
        tls, cert, key = _tls_contexts(tmp)
        env = dict(os.environ, ENCLAVE_VSOCK_DIR=str(fabric_dir))
        peer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime.bench.channel",
                "--peer",
                "--fabric-dir",
                str(fabric_dir),
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
            ],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        grpc_peer = None
        try:
            assert peer.stdout is not None
            line = _read_ready(peer)
            trusted = Ed25519PublicKey.from_public_bytes(bytes.fromhex(line.split()[1]))
            verifier = TestVerifier(trusted, expected_pcrs=default_pcrs())
            grpc_peer = _start_grpc_peer(tmp)
            grpc_call = None if grpc_peer is None else grpc_peer[1]
            figures = trio.run(
                lambda: _client_main(fabric_dir, verifier, tls, grpc_call, quick=quick)
            )
            peer.wait(timeout=10)
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.wait()
            if grpc_peer is not None:
                grpc_peer[2]()
                _stop(grpc_peer[0])
    return _result(aead, figures)


def _num(figures: dict[str, float | str | None], key: str) -> float:
    value = figures[key]
    assert isinstance(value, float), key
    return value


def _result(aead: float, figures: dict[str, float | str | None]) -> BenchResult:
    channel_gbps = _num(figures, "channel_gbps")
    plain_gbps = _num(figures, "plain_stream_gbps")
    tls_gbps = _num(figures, "tls_gbps")
    pingpong = _num(figures, "pingpong_us")
    rpc = _num(figures, "rpc_rtt_us")
    grpc = figures["grpc_rtt_us"]
    return {
        "aead_gbps": round(aead, 3),
        "plain_stream_gbps": round(plain_gbps, 3),
        "channel_gbps": round(channel_gbps, 3),
        "tls_gbps": round(tls_gbps, 3),
        "tls_cipher": figures["tls_cipher"],
        "channel_ratio": round(channel_gbps / aead, 3),
        "channel_vs_plain": round(channel_gbps / plain_gbps, 3),
        "channel_vs_plain_budget": CHANNEL_VS_PLAIN_BUDGET,
        "channel_vs_tls": round(channel_gbps / tls_gbps, 3),
        "channel_vs_tls_budget": CHANNEL_VS_TLS_BUDGET,
        "pingpong_us": round(pingpong, 1),
        "channel_rtt_us": round(_num(figures, "channel_rtt_us"), 1),
        "channel_rtt_ratio": round(_num(figures, "channel_rtt_us") / pingpong, 3),
        "tls_rtt_us": round(_num(figures, "tls_rtt_us"), 1),
        "rpc_rtt_us": round(rpc, 1),
        "rpc_ratio": round(rpc / pingpong, 3),
        "rpc_ratio_budget": RPC_RATIO_BUDGET,
        "grpc_rtt_us": None if not isinstance(grpc, float) else round(grpc, 1),
        "rpc_vs_grpc": None if not isinstance(grpc, float) else round(rpc / grpc, 3),
        "rpc_vs_grpc_budget": RPC_VS_GRPC_BUDGET,
        "pingpong_calls": round(_num(figures, "pingpong_calls"), 1),
        "channel_calls": round(_num(figures, "channel_calls"), 1),
        "rpc_calls": round(_num(figures, "rpc_calls"), 1),
        "record_bytes": RECORD_SIZE,
        "transport": "vsock fabric (host backend, AF_UNIX); gRPC: Unix socket",
        "cores": _cores(),
    }


def _cores() -> str:
    """Which sans-IO cores this run measured (transport/accel.py); the peer process imports the
    same tree, so it runs the same ones."""
    status = accel.status()
    return "compiled (mypyc)" if status.compiled else f"interpreted ({status.detail})"


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
    """Entry point of the peer processes (``python -m runtime.bench.channel --peer``,
    ``--grpc-peer``), and of a standalone run (``python -m runtime.bench.channel``)."""
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.channel")
    parser.add_argument("--peer", action="store_true", help="run the bench peer")
    parser.add_argument("--grpc-peer", type=Path, metavar="SOCKET", help="run the gRPC peer")
    parser.add_argument("--fabric-dir", type=Path)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    configure_logging("warning")
    if args.grpc_peer is not None:
        return _grpc_peer_main(args.grpc_peer)
    if args.peer:
        if args.fabric_dir is None or args.tls_cert is None or args.tls_key is None:
            parser.error("--peer needs --fabric-dir, --tls-cert and --tls-key")
        tls = _tls_server_context(args.tls_cert, args.tls_key)
        trio.run(_peer_main, args.fabric_dir, args.port, tls)
        return 0
    import json

    print(json.dumps({"channel": run(quick=args.quick)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
