"""``python -m kms._worker``: one worker process of a daemon started with ``--workers N``.

Started only by :mod:`kms.workers` (the parent), which writes a :class:`~kms.workers.WorkerSetup`
on this process's stdin and keeps stdin open; the listening sockets arrive as inherited
descriptors. The worker serves them with :func:`kms.daemon.serve_kms` until SIGTERM/SIGINT or
until its stdin ends (the parent is gone), then drains like a single daemon does. It writes
``ready`` on its stdout once it listens. Linux kills it if the parent dies
(``PR_SET_PDEATHSIG``): a daemon killed with ``kill -9`` is killed whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import socket
import sys
from functools import partial

import structlog
import trio

from transport.errors import EnclaveError
from transport.logs import configure_logging

from .app import build_worker_app
from .daemon import serve_kms
from .workers import _LENGTH, MAX_SETUP_BYTES, WorkerSetup

log = structlog.get_logger()

_PR_SET_PDEATHSIG = 1


def _read_setup() -> WorkerSetup:
    head = os.read(0, _LENGTH.size)
    if len(head) != _LENGTH.size:
        raise SystemExit("kms._worker is started by the KMS daemon (--workers), not by hand")
    (size,) = _LENGTH.unpack(head)
    if size > MAX_SETUP_BYTES:
        raise SystemExit("kms._worker: setup too large")
    data = b""
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            raise SystemExit("kms._worker: the parent closed the setup pipe early")
        data += chunk
    setup = pickle.loads(data)  # our own parent wrote it, on a private pipe
    if not isinstance(setup, WorkerSetup):
        raise SystemExit("kms._worker: not a worker setup")
    return setup


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux for SIGKILL when the parent dies; exit if it is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


async def _serve(setup: WorkerSetup) -> None:
    config = setup.config
    shutdown = trio.Event()
    sockets = [
        trio.socket.from_stdlib_socket(socket.socket(fileno=fd)) for fd in setup.listen_fds
    ]
    listeners = [trio.SocketListener(s) for s in sockets]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    shutdown.set()
                    return

            async def on_parent_gone() -> None:
                async with trio.lowlevel.FdStream(os.dup(0)) as control:
                    while await control.receive_some(4096):
                        pass
                log.warning("kms_worker_parent_gone", worker=setup.index)
                shutdown.set()

            async def serve(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                await serve_kms(
                    config,
                    shutdown=shutdown,
                    listeners=listeners,
                    build=partial(
                        build_worker_app, config, index=setup.index, workers=setup.workers
                    ),
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # drained: stop the watchers

            nursery.start_soon(on_signal)
            nursery.start_soon(on_parent_gone)
            await nursery.start(serve)
            os.write(1, b"ready\n")
            # The parent stops reading: nothing may write into that pipe any more.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)


def main() -> int:
    try:
        setup = _read_setup()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group, workers included
        return 130
    _die_with_parent(setup.parent_pid)
    configure_logging()
    structlog.contextvars.bind_contextvars(worker=setup.index)
    try:
        trio.run(_serve, setup)
    except KeyboardInterrupt:  # before the signal receiver was installed: the parent stops us
        return 130
    except EnclaveError as exc:
        print(f"error: KMS worker {setup.index}: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        leaves = [e for e in _leaves(group)]
        if len(leaves) == 1 and isinstance(leaves[0], EnclaveError):
            print(f"error: KMS worker {setup.index}: {leaves[0]}", file=sys.stderr)
            return 1
        raise
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


if __name__ == "__main__":
    sys.exit(main())
