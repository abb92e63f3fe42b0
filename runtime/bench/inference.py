"""``enclave bench inference``: the confidential inference path against its anchors.

All figures come from one run on the bundled digits model (perf-baseline.md §2.5, §2.6, §4 #2):

* ``inproc_us``: p50 of ``session.run`` at batch 1 in this process (the work itself);
* ``enclave_us``: p50 of a unary round trip, batch 1, client -> TCP ingress -> vsock -> attested
  channel -> RPC -> the server enclave (a sandboxed subprocess) -> back;
* ``rpc_floor_us`` (diagnostic): p50 of a ``catalog`` call over the same channel and RPC, no
  tensors and no inference: the part of ``enclave_us`` the channel and RPC layers cost;
* ``pingpong_us``: p50 of a trio 64-byte round trip over the same path (ingress, vsock fabric,
  a sandboxed enclave process) to an echo app: the transport floor without channel, RPC or
  inference;
* ``added_ratio`` = (enclave_us - inproc_us) / pingpong_us (budget <= 1.5);
* ``inproc_batch_per_s``: samples/s of ``session.run`` at batch 32 in this process;
* ``stream_per_s``: samples/s streaming the test split through the enclave (the split in
  messages of ``stream_chunk`` rows, repeated for steady state, pipelined);
* ``stream_ratio`` = stream_per_s / inproc_batch_per_s (budget >= 0.5).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import trio

__all__ = ["run", "ADDED_RATIO_BUDGET", "STREAM_RATIO_BUDGET"]

ADDED_RATIO_BUDGET: Final = 1.5
STREAM_RATIO_BUDGET: Final = 0.5
#: Rows per stream message in the streaming figure (the split is 450 rows: 2 messages).
STREAM_CHUNK: Final = 225
#: vsock port of the echo app.
ECHO_PORT: Final = 5006

_ECHO_APP = '''\
"""Echo app for the ping-pong anchor of the inference benchmark."""
import trio
from transport.vsock import open_vsock_listener


async def handle(stream):
    async with stream:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            await stream.send_all(data)


async def main():
    listener = await open_vsock_listener(5006)
    await trio.serve_listeners(handle, [listener])


trio.run(main)
'''


class _parent_cpus:  # a context manager used like a function
    """Keep this (parent) thread off the enclave's CPUs while measuring, as on Nitro where the
    CPUs given to an enclave leave the parent instance. No-op if no other CPU is left."""

    def __init__(self, enclave_cpus: Sequence[int]) -> None:
        self._saved = os.sched_getaffinity(0)
        self._wanted = self._saved - set(enclave_cpus)

    def __enter__(self) -> None:
        if self._wanted:
            os.sched_setaffinity(0, self._wanted)

    def __exit__(self, *exc: object) -> None:
        os.sched_setaffinity(0, self._saved)


def _p50(samples: list[float]) -> float:
    return float(np.median(np.asarray(samples)))


def _time_calls(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _inproc(quick: bool) -> dict[str, float]:
    from models.digits import INPUT_NAME, MODEL_PATH, load_test_split
    from models.engine import create_session

    session = create_session(MODEL_PATH.read_bytes())
    x, _ = load_test_split()
    one, batch = {INPUT_NAME: x[:1]}, {INPUT_NAME: x[:32]}
    n = 300 if quick else 3000
    _time_calls(lambda: session.run(None, one), 100)  # warm-up
    inproc = _p50(_time_calls(lambda: session.run(None, one), n))
    _time_calls(lambda: session.run(None, batch), 100)
    per_batch = _p50(_time_calls(lambda: session.run(None, batch), n))
    return {"inproc_us": inproc * 1e6, "inproc_batch_per_s": 32 / per_batch}


async def _pingpong(endpoint: str, n: int) -> float:
    host, port = endpoint.rsplit(":", 1)
    payload = b"\xa5" * 64
    deadline = trio.current_time() + 10
    while True:  # the echo app starts listening a moment after the enclave reports running
        try:
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                samples = []
                for i in range(n + 50):
                    t0 = time.perf_counter()
                    await stream.send_all(payload)
                    got = 0
                    while got < len(payload):
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            raise trio.BrokenResourceError("echo closed")
                        got += len(chunk)
                    if i >= 50:
                        samples.append(time.perf_counter() - t0)
                return _p50(samples)
        except (OSError, trio.BrokenResourceError):
            if trio.current_time() > deadline:
                raise
            await trio.sleep(0.05)


async def _measure(quick: bool) -> dict[str, float | int]:
    from models.client import open_inference_client
    from models.digits import INPUT_NAME, MODEL_NAME, load_test_split
    from runtime.eif import build_eif
    from runtime.stack import open_inference_stack

    tmp = Path(tempfile.mkdtemp(prefix="er-bench-"))
    figures: dict[str, float | int] = {}
    try:
        async with open_inference_stack(tmp / "s") as served:
            n = 300 if quick else 2000
            with _parent_cpus(served.server.info.cpu_ids):
                x, y = load_test_split()
                async with open_inference_client(
                    served.endpoint, verifier=served.verifier()
                ) as client:
                    one = {INPUT_NAME: x[:1]}
                    for _ in range(50):
                        await client.infer(MODEL_NAME, one)
                    samples = []
                    for _ in range(n):
                        t0 = time.perf_counter()
                        await client.infer(MODEL_NAME, one)
                        samples.append(time.perf_counter() - t0)
                    figures["enclave_us"] = _p50(samples) * 1e6
                    figures["enclave_p99_us"] = float(np.percentile(samples, 99)) * 1e6
                    # Diagnostic: the same round trip without tensors or inference (the
                    # catalog call): what the channel and RPC layers cost on this path.
                    samples = []
                    for _ in range(n):
                        t0 = time.perf_counter()
                        await client.list_models()
                        samples.append(time.perf_counter() - t0)
                    figures["rpc_floor_us"] = _p50(samples) * 1e6

                    passes = 10 if quick else 60
                    chunks = [
                        {INPUT_NAME: x[i : i + STREAM_CHUNK]}
                        for i in range(0, len(x), STREAM_CHUNK)
                    ]

                    async def stream_once(reps: int) -> tuple[float, int]:
                        items = chunks * reps
                        t0 = time.perf_counter()
                        got = 0
                        async for out in client.stream(MODEL_NAME, items):
                            got += int(out["label"].shape[0])
                        return time.perf_counter() - t0, got

                    await stream_once(2)  # warm-up
                    rates = []
                    for _ in range(3):
                        elapsed, got = await stream_once(passes)
                        if got != passes * len(y):
                            raise RuntimeError(
                                f"stream returned {got} of {passes * len(y)} samples"
                            )
                        rates.append(got / elapsed)
                    figures["stream_per_s"] = float(np.median(rates))
                    figures["stream_chunk"] = STREAM_CHUNK
                    figures["stream_split_passes"] = passes
            # Anchor: 64-byte ping-pong through the same ingress and fabric to an echo app in an
            # enclave (same sandbox, its own CPU, the parent on the other one), measured after
            # the server (idle by then). Started second: the runtime's zygote is shared by images
            # with the same bootstrap and must outlive the first one.
            echo_dir = tmp / "echo"
            echo_dir.mkdir()
            (echo_dir / "echo.py").write_text(_ECHO_APP)
            echo_eif = tmp / "echo.eif"
            build_eif(app_dir=echo_dir, cmd=["python", "echo.py"], env={}, output=echo_eif)
            stack = served.stack
            echo = await stack.runtime.run_enclave(echo_eif, cpu_count=1, memory_mib=512)
            echo_port = await stack.start_ingress(echo.enclave_cid, ECHO_PORT)
            with _parent_cpus(echo.cpu_ids):
                figures["pingpong_us"] = await _pingpong(f"127.0.0.1:{echo_port}", n) * 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


def run(*, quick: bool) -> dict[str, float | int | str | None]:
    """Run the suite (see the module docstring); returns the flat figures."""
    from transport.logs import configure_logging

    if "ENCLAVE_LOG_LEVEL" not in os.environ:
        configure_logging("error")  # service logs would drown the figures
    figures: dict[str, float | int] = dict(_inproc(quick))
    figures.update(trio.run(_measure, quick))
    figures["added_ratio"] = (figures["enclave_us"] - figures["inproc_us"]) / figures["pingpong_us"]
    figures["added_ratio_budget"] = ADDED_RATIO_BUDGET
    figures["stream_ratio"] = figures["stream_per_s"] / figures["inproc_batch_per_s"]
    figures["stream_ratio_budget"] = STREAM_RATIO_BUDGET
    order = [
        "inproc_us",
        "enclave_us",
        "enclave_p99_us",
        "rpc_floor_us",
        "pingpong_us",
        "added_ratio",
        "added_ratio_budget",
        "inproc_batch_per_s",
        "stream_per_s",
        "stream_ratio",
        "stream_ratio_budget",
        "stream_chunk",
        "stream_split_passes",
    ]
    return {k: figures[k] for k in order if k in figures}
