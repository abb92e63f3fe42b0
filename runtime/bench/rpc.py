"""Micro-benchmark of the RPC layer against a raw trio ping-pong on the same kind of stream.

``python -m runtime.bench.rpc [--json] [--quick] [--processes]`` measures, over a Unix
socketpair, the p50 round trip of

* ``pingpong_us``: a raw trio 64-byte ping-pong (``send_all`` + ``receive_some`` both sides);
* ``rpc_task_us``: ``rpc.call`` of an ``unary(async fn)`` echo (a handler task per call);
* ``rpc_inline_us``: ``rpc.call`` of a ``unary_inline(fn)`` echo (answered in the reader);

and the ratios to the ping-pong. By default client and server are two tasks of one process;
``--processes`` puts the server in a child process (closer to the enclave case). Each figure is
the best of several runs' medians (``perf_counter_ns`` p50 over 3000 round trips after 500 of
warm-up, five rounds interleaved across modes; the CI VM is shared and noisy, see
perf-baseline.md §0).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from typing import Any, Final

import trio

from transport.rpc import open_rpc_client, serve_rpc, unary, unary_inline

__all__ = ["run"]

#: Request used for the RPC figures: a small dict, as an inference request header would be.
REQUEST: Final = {"id": 1, "x": b"y" * 32}
PING: Final = b"x" * 64  # the raw ping-pong payload, as in perf-baseline.md §2.3
_MODES: Final = ("raw", "task", "inline")


def _stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _echo(request: Any, stream: Any) -> Any:
    return request


def _echo_inline(request: Any, stream: Any) -> Any:
    return request


async def _serve(mode: str, stream: trio.SocketStream) -> None:
    if mode == "raw":
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        return
    await serve_rpc(stream, unary_inline(_echo_inline) if mode == "inline" else unary(_echo))


async def _client(mode: str, stream: trio.SocketStream, n: int, warmup: int) -> float:
    times: list[int] = []
    clock = time.perf_counter_ns
    if mode == "raw":
        for i in range(n + warmup):
            start = clock()
            await stream.send_all(PING)
            got = 0
            while got < len(PING):
                got += len(await stream.receive_some(65536))
            if i >= warmup:
                times.append(clock() - start)
        await stream.aclose()
    else:
        async with open_rpc_client(stream) as rpc:
            for i in range(n + warmup):
                start = clock()
                await rpc.call("echo", REQUEST)
                if i >= warmup:
                    times.append(clock() - start)
    return statistics.median(times) / 1e3  # ns -> µs


async def _one_run(mode: str, n: int, warmup: int, processes: bool) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if not processes:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve, mode, _stream(b))
            return await _client(mode, _stream(a), n, warmup)
    child = await trio.lowlevel.open_process(
        [sys.executable, "-m", "runtime.bench.rpc", "--child", mode, str(b.fileno())],
        pass_fds=[b.fileno()],
    )
    b.close()
    try:
        return await _client(mode, _stream(a), n, warmup)
    finally:
        with trio.move_on_after(10):  # the child exits when the client closes its end
            await child.wait()
        if child.returncode is None:
            child.kill()
            await child.wait()


def run(*, quick: bool = False, processes: bool = False) -> dict[str, float]:
    """Measure the figures described in the module docstring; returns a flat dict."""
    n, warmup, repeats = (1000, 200, 3) if quick else (3000, 500, 5)
    results: dict[str, list[float]] = {m: [] for m in _MODES}

    async def main() -> None:
        for _ in range(repeats):
            for mode in _MODES:  # interleaved, so load changes hit every mode alike
                results[mode].append(await _one_run(mode, n, warmup, processes))

    trio.run(main)
    raw, task, inline = (min(results[m]) for m in _MODES)
    return {
        "pingpong_us": round(raw, 1),
        "rpc_task_us": round(task, 1),
        "rpc_inline_us": round(inline, 1),
        "rpc_task_ratio": round(task / raw, 2),
        "rpc_inline_ratio": round(inline / raw, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.rpc", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer round trips")
    parser.add_argument("--processes", action="store_true", help="server in a child process")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, fd = args.child
        sock = socket.socket(fileno=int(fd))
        trio.run(_serve, mode, _stream(sock))
        return 0
    figures = run(quick=args.quick, processes=args.processes)
    if args.json:
        print(json.dumps({"rpc": figures}))
    else:
        for key, value in figures.items():
            print(f"{key:18} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
