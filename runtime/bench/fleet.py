"""``enclave bench fleet``: many clients, replicas, failover, mutual attestation.

One inference stack (``runtime.stack``: KMS, model store, the bundled digits model sealed under
a key only the server image may use) with three replicas of the server image; ingresses in this
process (no per-source cap: every bench client is 127.0.0.1); clients in this process, each its
own attested connection, calling ``infer`` (batch 1) in a loop:

* ``r{1,2}_c{1,8,64}_per_s``, ``..._p50_ms``, ``..._p99_ms``: throughput (calls/s, all clients)
  and latency at 1, 8 and 64 concurrent clients, through an ingress to 1 and to 2 replicas
  (least connections). On this 2-core machine the replicas, the ingress and the clients share
  two CPUs: a second replica adds little past one busy core (see the README for the curve with
  more cores); ``r1_c{n}_server_cpu_us`` / ``r1_c{n}_host_cpu_us``: CPU time per call of the
  server enclave's process and of this process (clients and ingress), which says where the
  time goes and what more cores would buy;
* ``conn_rss_kib``: the server enclave's resident memory per open connection, at 64 clients
  (VmRSS of the enclave's process with 64 connections open and each used once, minus idle,
  over 64);
* ``failover_failed_calls`` (budget 0): with 3 replicas behind one ingress and 8 clients in
  steady load, one replica is terminated (``Runtime.terminate``, the operator's action; the
  enclave goes away under its open connections); unary calls that still failed after the
  client's one retry; ``failover_retried_calls``: calls that did fail over;
  ``failover_gap_ms``: p99 latency of the calls that completed in the window after the
  termination (60 s; 10 s with ``--quick``), against ``failover_base_p99_ms`` before it, and
  ``failover_max_ms``, the slowest call of that window (a retried call: its fresh handshake);
* ``mutual_handshake_ms`` / ``one_sided_handshake_ms``: p50 of a complete ``enclave-channel/1``
  handshake over a Unix socket pair in this process, mutual vs one-sided, with Nitro-format
  documents from two in-process NSMs (``attest.nsm.InProcessNsm``) and the real verifier on
  each side that checks one; ``mutual_handshake_ratio`` is their ratio;
* ``relay_plain_gbps`` / ``relay_channel_gbps``: bulk transfer from one emulated enclave to
  another through the parent's relay (``transport.peers``: two processes, each on its own
  broker like a real enclave, the relay in this process), plaintext (``open_relayed_stream``)
  and over the mutually attested channel (``open_peer_channel``), and
  ``relay_exchange_ratio`` = channel time / plaintext time for the same bytes: the cost of
  protecting an exchange between enclaves (issue 16's budget for gradients: <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import trio

if TYPE_CHECKING:
    from runtime.stack import InferenceStack
    from transport.vsock import VsockAddr

__all__ = ["run", "measure", "measure_relay", "FAILOVER_FAILED_CALLS_BUDGET", "CONCURRENCY"]

#: Unary calls that may fail after their retry when a replica is terminated.
FAILOVER_FAILED_CALLS_BUDGET: Final = 0
#: Concurrent clients of the load points.
CONCURRENCY: Final = (1, 8, 64)
#: Clients in steady load during the failover.
FAILOVER_CLIENTS: Final = 8
#: Replicas behind the failover's ingress.
FAILOVER_REPLICAS: Final = 3
#: Handshakes per kind for the handshake figures.
_HANDSHAKES_QUICK, _HANDSHAKES_FULL = 40, 300


@dataclass
class _Load:
    """What a load run collected."""

    latencies: list[tuple[float, float]] = field(default_factory=list)  # (end time, seconds)
    failed: int = 0
    retried: int = 0
    errors: list[str] = field(default_factory=list)


async def _client_loop(
    endpoint: str,
    verifier: Any,
    x: Any,
    index: int,
    stop: trio.Event,
    load: _Load,
    ready: trio.Semaphore | None = None,
) -> None:
    from models.client import open_inference_client
    from models.digits import INPUT_NAME, MODEL_NAME

    row = {INPUT_NAME: x[index % len(x) : index % len(x) + 1]}
    async with open_inference_client(endpoint, verifier=verifier) as client:
        await client.infer(MODEL_NAME, row)  # connected and warm
        if ready is not None:
            ready.release()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                await client.infer(MODEL_NAME, row)
            except Exception as exc:  # counted: the figure is how many fail
                load.failed += 1
                if len(load.errors) < 5:
                    load.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            t1 = time.perf_counter()
            load.latencies.append((t1, t1 - t0))
        load.retried += client.failovers


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure_point(
    endpoint: str, verifier: Any, x: Any, clients: int, seconds: float, server_pid: int | None
) -> dict[str, float]:
    load = _Load()
    stop = trio.Event()
    ready = trio.Semaphore(0)
    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(_client_loop, endpoint, verifier, x, i, stop, load, ready)
        for _ in range(clients):  # every client connected (attested) and warm
            await ready.acquire()
        load.latencies.clear()
        t0 = time.perf_counter()
        host0 = time.process_time()
        server0 = _cpu_s(server_pid) if server_pid is not None else 0.0
        await trio.sleep(seconds)
        stop.set()
        host_cpu = time.process_time() - host0
        server_cpu = _cpu_s(server_pid) - server0 if server_pid is not None else 0.0
    elapsed = time.perf_counter() - t0
    samples = np.asarray([lat for end, lat in load.latencies if end <= t0 + elapsed])
    if load.failed:
        raise RuntimeError(f"{load.failed} calls failed under load: {load.errors}")
    figures = {
        "per_s": len(samples) / elapsed,
        "p50_ms": float(np.percentile(samples, 50)) * 1e3,
        "p99_ms": float(np.percentile(samples, 99)) * 1e3,
    }
    if server_pid is not None and len(samples):
        figures["server_cpu_us"] = server_cpu / len(samples) * 1e6
        figures["host_cpu_us"] = host_cpu / len(samples) * 1e6
    return figures


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _connection_memory(endpoint: str, verifier: Any, x: Any, pid: int) -> float:
    """Resident KiB of the server per open connection at 64 clients (each used once)."""
    from models.client import open_inference_client
    from models.digits import INPUT_NAME, MODEL_NAME

    await trio.sleep(0.5)  # the earlier load's connections are closed on the server too
    idle = _rss_kib(pid)
    opened = trio.Semaphore(0)
    done = trio.Event()

    async def hold(i: int) -> None:
        async with open_inference_client(endpoint, verifier=verifier) as client:
            await client.infer(MODEL_NAME, {INPUT_NAME: x[i : i + 1]})
            opened.release()
            await done.wait()

    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(hold, i)
        for _ in range(64):
            await opened.acquire()
        await trio.sleep(0.2)
        busy = _rss_kib(pid)
        done.set()
    return (busy - idle) / 64


async def _failover(
    served: InferenceStack, endpoint: str, verifier: Any, x: Any, window_s: float
) -> dict[str, float | int]:
    load = _Load()
    stop = trio.Event()
    ready = trio.Semaphore(0)
    victim = served.servers[0]
    async with trio.open_nursery() as nursery:
        for i in range(FAILOVER_CLIENTS):
            nursery.start_soon(_client_loop, endpoint, verifier, x, i, stop, load, ready)
        for _ in range(FAILOVER_CLIENTS):
            await ready.acquire()
        await trio.sleep(min(2.0, window_s / 5))  # steady load before
        before = [lat for _, lat in load.latencies]
        terminated_at = time.perf_counter()
        await served.stack.runtime.terminate(victim.enclave_id)
        await trio.sleep(window_s - (time.perf_counter() - terminated_at))
        stop.set()
    after = [lat for end, lat in load.latencies if end >= terminated_at]
    return {
        "failover_failed_calls": load.failed,
        "failover_failed_calls_budget": FAILOVER_FAILED_CALLS_BUDGET,
        "failover_retried_calls": load.retried,
        "failover_gap_ms": float(np.percentile(after, 99)) * 1e3,
        "failover_max_ms": float(np.max(after)) * 1e3,
        "failover_base_p99_ms": float(np.percentile(before, 99)) * 1e3,
        "failover_window_s": window_s,
        "failover_calls_after": len(after),
    }


async def _handshakes(n: int) -> dict[str, float]:
    """p50 of a one-sided and of a mutual handshake (module docstring)."""
    from attest.ca import LocalCA
    from attest.channel import channel_verifier, nsm_attester
    from attest.nsm.local import InProcessNsm
    from attest.policy import MeasurementSet, Policy
    from attest.verify import Verifier
    from transport.channel import accept_channel, connect_channel
    from transport.peers import PEER_SUITES

    with tempfile.TemporaryDirectory(prefix="er-bench-ca-") as tmp:
        ca = LocalCA.load_or_create(Path(tmp) / "ca")
    image = {i: bytes([i + 1]) * 48 for i in (0, 1, 2)}
    server_nsm = InProcessNsm.create(
        ca, pcrs=image, module_id="i-0123456789abcdef0-enc0000000000000001"
    )
    client_nsm = InProcessNsm.create(
        ca, pcrs=image, module_id="i-0123456789abcdef0-enc0000000000000002"
    )
    policy = Policy([MeasurementSet({0: image[0]})], max_age_s=300)
    verifier = Verifier([ca.root_certificate])  # one per side would cache the same chain

    async def once(mutual: bool) -> float:
        a, b = socket.socketpair()
        ca_stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
        sb_stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:

            async def server() -> None:
                channel = await accept_channel(
                    sb_stream,
                    attester=nsm_attester(server_nsm),
                    peer_verifier=channel_verifier(verifier, policy) if mutual else None,
                    suites=PEER_SUITES,
                )
                await channel.aclose()

            nursery.start_soon(server)
            channel = await connect_channel(
                ca_stream,
                verifier=channel_verifier(verifier, policy),
                attester=nsm_attester(client_nsm) if mutual else None,
                suites=PEER_SUITES,
            )
            elapsed = time.perf_counter() - t0
            await channel.aclose()
        return elapsed

    for _ in range(10):  # warm-up: chain cache, imports
        await once(False)
        await once(True)
    one_sided, mutual = [], []
    for _ in range(n):  # interleaved, so load from elsewhere hits both alike
        one_sided.append(await once(False))
        mutual.append(await once(True))
    p50_one, p50_mutual = float(np.median(one_sided)), float(np.median(mutual))
    return {
        "one_sided_handshake_ms": p50_one * 1e3,
        "mutual_handshake_ms": p50_mutual * 1e3,
        "mutual_handshake_ratio": p50_mutual / p50_one,
    }


async def _ingress(nursery: trio.Nursery, targets: Sequence[VsockAddr] | Any) -> str:
    from transport.ingress import serve_ingress

    port: int = await nursery.start(
        lambda task_status: serve_ingress(
            "127.0.0.1", 0, targets, max_per_source=None, task_status=task_status
        )
    )
    return f"127.0.0.1:{port}"


async def measure(
    *,
    seconds: float,
    window_s: float,
    concurrency: Sequence[int] = CONCURRENCY,
    handshakes: int = _HANDSHAKES_FULL,
) -> dict[str, float | int | str | None]:
    """Every figure of the module docstring: ``seconds`` per load point, a failover window of
    ``window_s``, ``handshakes`` of each kind (``run`` picks them; tests use small ones)."""
    from models.digits import load_test_split
    from runtime.stack import open_inference_stack
    from runtime.targets import RuntimeTargets
    from transport.ingress import TargetPool
    from transport.vsock import VsockAddr

    x, _ = load_test_split()
    figures: dict[str, float | int | str | None] = {"host_cpus": len(os.sched_getaffinity(0))}
    tmp = Path(tempfile.mkdtemp(prefix="er-bench-fleet-"))
    try:
        async with (
            open_inference_stack(tmp / "s", replicas=FAILOVER_REPLICAS) as served,
            trio.open_nursery() as nursery,
        ):
            verifier = served.verifier()
            a, b = (VsockAddr(s.cid, 5005) for s in served.servers[:2])
            one = await _ingress(nursery, a)
            two = await _ingress(nursery, TargetPool([a, b]))
            pid = served.servers[0].info.app_pid
            for replicas, endpoint in ((1, one), (2, two)):
                for clients in concurrency:
                    point = await _measure_point(
                        endpoint, verifier, x, clients, seconds, pid if replicas == 1 else None
                    )
                    for key, value in point.items():
                        figures[f"r{replicas}_c{clients}_{key}"] = value
            figures["conn_rss_kib"] = (
                None if pid is None else await _connection_memory(one, verifier, x, pid)
            )
            group = served.server.info.enclave_name
            source = RuntimeTargets(served.stack.runtime.state, name=group, port=5005)
            pool = TargetPool(await source.healthy(), source=source)
            endpoint = await _ingress(nursery, pool)
            figures.update(await _failover(served, endpoint, verifier, x, window_s))
            nursery.cancel_scope.cancel()
        figures.update(await _handshakes(handshakes))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


#: The emulated enclaves of the relay figures, and their ports (plain, channel).
_SENDER_CID, _RECEIVER_CID = 31, 32
_PLAIN_PORT, _CHANNEL_PORT = 6000, 6001
_RELAY_PORT = 7200
#: Bytes per transfer and transfers per kind (quick / full).
_RELAY_BYTES_QUICK, _RELAY_BYTES_FULL = 32 << 20, 256 << 20
_RELAY_REPS_QUICK, _RELAY_REPS_FULL = 3, 5
#: The sender's writes (bytes): 1 MiB, as a bulk exchange would write.
_WRITE = 1 << 20


async def measure_relay(quick: bool) -> dict[str, float]:
    """The relay figures (module docstring): two child processes as enclaves."""
    from attest.ca import LocalCA
    from transport.peers import EnclaveEntry, RelayPolicy, StaticDirectory, serve_peer_relay
    from transport.vsock import (
        FabricPolicy,
        enclave_fabric_env,
        fabric_socketpair,
        serve_enclave_fabric,
    )

    size = _RELAY_BYTES_QUICK if quick else _RELAY_BYTES_FULL
    reps = _RELAY_REPS_QUICK if quick else _RELAY_REPS_FULL
    with tempfile.TemporaryDirectory(prefix="er-bench-relay-") as tmp_name:
        tmp = Path(tmp_name)
        fabric_dir = tmp / "vsock"
        fabric_dir.mkdir(mode=0o700)
        LocalCA.load_or_create(tmp / "ca")  # both "enclaves" sign under it
        policy = RelayPolicy(
            [f"sender={_RECEIVER_CID}:{_PLAIN_PORT}", f"sender={_RECEIVER_CID}:{_CHANNEL_PORT}"]
        )
        directory = StaticDirectory(
            [EnclaveEntry(_SENDER_CID, "sender"), EnclaveEntry(_RECEIVER_CID, "receiver")]
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_peer_relay, policy, directory, port=_RELAY_PORT, fabric_dir=fabric_dir
                )
            )
            procs = []
            for cid, role in ((_RECEIVER_CID, "receive"), (_SENDER_CID, "send")):
                broker_end, enclave_end = fabric_socketpair()
                await nursery.start(
                    partial(
                        serve_enclave_fabric,
                        broker_end,
                        policy=FabricPolicy(cid=cid, parent_ports=frozenset({_RELAY_PORT})),
                        fabric_dir=fabric_dir,
                    )
                )
                env = {**os.environ, **enclave_fabric_env(enclave_end, cid)}
                argv = [
                    *(sys.executable, "-m", "runtime.bench.fleet", "--relay-peer", role),
                    *("--ca", str(tmp / "ca"), "--size", str(size), "--reps", str(reps)),
                ]
                proc = await trio.lowlevel.open_process(
                    argv, env=env, pass_fds=(enclave_end.fileno(),), stdout=subprocess.PIPE
                )
                enclave_end.close()
                procs.append(proc)
                if role == "receive":  # listening before the sender starts
                    assert proc.stdout is not None
                    seen = b""
                    with trio.fail_after(60):
                        while b"ready\n" not in seen:
                            chunk = await proc.stdout.receive_some(4096)
                            if not chunk:
                                raise RuntimeError("the relay benchmark's receiver ended")
                            seen += chunk
            receiver, sender = procs
            assert sender.stdout is not None
            output = b""
            with trio.fail_after(600):
                while chunk := await sender.stdout.receive_some(65536):
                    output += chunk
                await sender.wait()
                receiver.kill()
                await receiver.wait()
            nursery.cancel_scope.cancel()
    if sender.returncode != 0:
        raise RuntimeError(f"the relay benchmark's sender failed ({sender.returncode})")
    times: dict[str, list[float]] = json.loads(output)
    plain, channel = min(times["plain"]), min(times["channel"])
    return {
        "relay_plain_gbps": size / plain / 1e9,
        "relay_channel_gbps": size / channel / 1e9,
        "relay_exchange_ratio": channel / plain,
        "relay_bytes": float(size),
    }


async def _relay_peer(role: str, ca_dir: Path, size: int, reps: int) -> None:
    """One emulated enclave of :func:`measure_relay` (runs in a child process)."""
    from attest.ca import LocalCA
    from attest.channel import channel_verifier, nsm_attester
    from attest.nsm.local import InProcessNsm
    from attest.policy import MeasurementSet, Policy
    from attest.verify import Verifier
    from transport.channel import SecureChannel
    from transport.peers import open_peer_channel, open_relayed_stream, serve_peer_channels
    from transport.vsock import open_vsock_listener

    ca = LocalCA.load_or_create(ca_dir)
    image = {i: bytes([0x40 + i]) * 48 for i in (0, 1, 2)}
    nsm = InProcessNsm.create(
        ca, pcrs=image, module_id=f"i-0123456789abcdef0-enc00000000000000{len(role):02d}"
    )
    attester = nsm_attester(nsm)
    verifier = channel_verifier(
        Verifier([ca.root_certificate]), Policy([MeasurementSet({0: image[0]})])
    )

    async def drain(stream: trio.abc.Stream) -> None:
        """Read into one buffer (no allocation per read, either way) and acknowledge every
        ``size`` bytes."""
        buf = bytearray(_WRITE)
        view = memoryview(buf)
        got = 0
        while True:
            if isinstance(stream, SecureChannel):
                n = await stream.receive_into(buf)
            else:
                assert isinstance(stream, trio.SocketStream)
                n = await stream.socket.recv_into(view)
            if not n:
                break
            got += n
            if got >= size:
                await stream.send_all(b"k")  # the whole transfer arrived
                got -= size

    if role == "receive":

        async def plain(stream: trio.abc.Stream) -> None:
            async with stream:
                await drain(stream)

        async with trio.open_nursery() as nursery:
            listener = await open_vsock_listener(_PLAIN_PORT)
            nursery.start_soon(trio.serve_listeners, plain, [listener])
            await nursery.start(
                partial(
                    serve_peer_channels,
                    _CHANNEL_PORT,
                    drain,
                    attester=attester,
                    peer_verifier=verifier,
                )
            )
            print("ready", flush=True)
        return
    payload = memoryview(bytes(_WRITE))
    times: dict[str, list[float]] = {"plain": [], "channel": []}

    async def transfer(stream: trio.abc.Stream) -> float:
        t0 = time.perf_counter()
        sent = 0
        while sent < size:
            await stream.send_all(payload[: min(_WRITE, size - sent)])
            sent += min(_WRITE, size - sent)
        if await stream.receive_some(1) != b"k":
            raise RuntimeError("no acknowledgement")
        return time.perf_counter() - t0

    for _ in range(reps + 1):  # the first round warms up and is not counted
        stream, _cid = await open_relayed_stream(_RECEIVER_CID, _PLAIN_PORT, relay_port=_RELAY_PORT)
        async with stream:
            times["plain"].append(await transfer(stream))
        channel = await open_peer_channel(
            _RECEIVER_CID,
            _CHANNEL_PORT,
            verifier=verifier,
            attester=attester,
            relay_port=_RELAY_PORT,
        )
        async with channel:
            times["channel"].append(await transfer(channel))
    print(json.dumps({k: v[1:] for k, v in times.items()}), flush=True)


def _relay_peer_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.fleet", allow_abbrev=False)
    parser.add_argument("--relay-peer", choices=("send", "receive"), required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--reps", type=int, required=True)
    args = parser.parse_args(argv)
    from transport.logs import configure_logging

    configure_logging("error")
    trio.run(_relay_peer, args.relay_peer, args.ca, args.size, args.reps)
    return 0


def run(*, quick: bool) -> dict[str, float | int | str | None]:
    """Run the suite (see the module docstring); returns the flat figures."""
    from transport.logs import configure_logging

    if "ENCLAVE_LOG_LEVEL" not in os.environ:
        configure_logging("error")  # service logs (a terminated replica's clients) would drown it
    figures = trio.run(
        lambda: measure(
            seconds=1.0 if quick else 5.0,
            window_s=10.0 if quick else 60.0,
            handshakes=_HANDSHAKES_QUICK if quick else _HANDSHAKES_FULL,
        )
    )
    figures.update(trio.run(measure_relay, quick))
    return figures


if __name__ == "__main__":
    sys.exit(_relay_peer_main())
