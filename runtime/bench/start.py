"""``enclave bench runtime``: enclave start-up against the cost of a bare interpreter import.

Figures (p50, milliseconds):

* ``bare_import_ms``: a fresh ``python -c "import trio, onnxruntime, numpy, msgpack,
  cryptography"`` (the anchor, measured in the same run);
* ``cold_start_ms``: ``run_enclave`` until the heartbeat arrived and the app started, fresh
  interpreter path (sandboxed ``python -m runtime.enclave_init``);
* ``warm_start_ms``: the same through a zygote of the image's bootstrap (first start, which
  launches the zygote, excluded);
* ``cli_warm_start_ms``: a start asked of the host daemon the way ``run-enclave`` asks it
  (request over its socket, reply once running), warm path: what the CLI adds is the daemon
  round trip (the ``enclave`` process's own interpreter start-up is not counted);
* ``cold_ratio`` = cold_start_ms / bare_import_ms (budget <= 1.3); warm budget <= 25 ms.

Both paths run the same minimal app, with the full sandbox, image verification and NSM set-up.
Measured starts are spaced by ``SPACING_S`` so the zygote has re-armed its pre-forked spare.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

__all__ = ["run"]

#: The anchor's import line (reference/perf-baseline.md §2.7).
BARE_IMPORT = "import trio, onnxruntime, numpy, msgpack, cryptography"
#: The minimal app both paths start.
MINIMAL_APP = "import time\ntime.sleep(600)\n"
#: Pause before each measured start (both paths), see _starts.
SPACING_S = 0.1
#: Budgets (DESIGN.md §9, issue 5).
COLD_RATIO_BUDGET = 1.3
WARM_BUDGET_MS = 25.0


def _bare_import_ms(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", BARE_IMPORT], check=True)
        out.append((time.perf_counter() - t) * 1000)
    return out


async def _starts(eif: Path, state: Path, *, zygote: bool, n: int) -> list[float]:
    from runtime.api import open_runtime

    out: list[float] = []
    async with open_runtime(state, zygote=zygote) as rt:
        if zygote:  # start the zygote (and fill the image cache) outside the measurement
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=256)
            await rt.terminate(info.enclave_id)
        for _ in range(n):
            # Starts are spaced so the zygote has re-armed its pre-forked spare (it does so
            # right after each start, ~20 ms); back-to-back starts pay that on top.
            await trio.sleep(SPACING_S)
            t = time.perf_counter()
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=256)
            out.append((time.perf_counter() - t) * 1000)
            await rt.terminate(info.enclave_id)
    return out


async def _cli_starts(eif: Path, state: Path, *, n: int) -> list[float]:
    """Starts through the host daemon (run-enclave's path), the daemon served in-process."""
    from runtime.control import terminate_via_control
    from runtime.host import launch_via_host, serve_host
    from runtime.launch import LaunchRequest
    from runtime.state import StateDir

    st = StateDir(state)
    req = LaunchRequest(eif_path=str(eif), memory_mib=256, cpu_count=1)
    out: list[float] = []
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            await serve_host(st, linger_s=3600, task_status=task_status)

        await nursery.start(serve)
        for i in range(n + 1):  # the first start launches the zygote: not measured
            await trio.sleep(SPACING_S)
            t = time.perf_counter()
            reply = await trio.to_thread.run_sync(lambda: launch_via_host(st, req))
            if i:
                out.append((time.perf_counter() - t) * 1000)
            await terminate_via_control(st, reply.info.enclave_id)
        nursery.cancel_scope.cancel()
    return out


def run(*, quick: bool) -> dict[str, float | int | str | None]:
    """Measure; ``quick`` finishes in a few seconds."""
    from runtime.eif import build_eif

    n_bare, n_cold, n_warm, n_cli = (3, 3, 5, 3) if quick else (7, 7, 20, 10)
    with tempfile.TemporaryDirectory(prefix="enclave-bench-") as tmp:
        root = Path(tmp)
        app = root / "app"
        app.mkdir()
        (app / "main.py").write_text(MINIMAL_APP)
        eif = root / "minimal.eif"
        build_eif(app_dir=app, cmd=["python3", "main.py"], env={}, output=eif, name="bench")
        state = root / "state"
        bare = _bare_import_ms(n_bare)
        cold = trio.run(lambda: _starts(eif, state, zygote=False, n=n_cold))
        warm = trio.run(lambda: _starts(eif, state, zygote=True, n=n_warm))
        cli = trio.run(lambda: _cli_starts(eif, root / "cli-state", n=n_cli))
    bare_p50 = statistics.median(bare)
    cold_p50 = statistics.median(cold)
    warm_p50 = statistics.median(warm)
    cli_p50 = statistics.median(cli)
    return {
        "bare_import_ms": round(bare_p50, 1),
        "cold_start_ms": round(cold_p50, 1),
        "warm_start_ms": round(warm_p50, 1),
        "warm_start_p90_ms": round(sorted(warm)[int(0.9 * (len(warm) - 1))], 1),
        "cli_warm_start_ms": round(cli_p50, 1),
        "cold_ratio": round(cold_p50 / bare_p50, 3),
        "cold_ratio_budget": COLD_RATIO_BUDGET,
        "warm_budget_ms": WARM_BUDGET_MS,
        "cold_ok": cold_p50 / bare_p50 <= COLD_RATIO_BUDGET,
        "warm_ok": warm_p50 <= WARM_BUDGET_MS,
        "samples": f"bare={n_bare} cold={n_cold} warm={n_warm} cli={n_cli}",
    }
