"""Worker processes: one daemon, N processes serving its listening socket and its store.

Why processes: a request's work is CPU-bound Python and OpenSSL (the ES384 verification of a
Recipient's attestation document alone is ~0.3 ms of one core), so one process serves at most
one core's worth; N processes serve N cores.

Theory of operation (the parent, :func:`run_workers`):

1. The parent does everything that happens once per daemon (:func:`kms.app.prepare_state`):
   it takes the state directory's lock and holds it for the daemon's life (workers never take
   or release it), creates or checks the master key, opens, migrates and seeds the store,
   checks the audit chain's tail. A bad configuration fails here, before any worker exists.
2. It binds the listening socket(s) and starts N workers (``python -m kms._worker``), passing
   the sockets (inherited descriptors) and the configuration (on the worker's stdin, which then
   stays open: its end-of-file tells a worker that the parent is gone). The kernel hands each
   new connection to one of the workers waiting in ``accept``.
3. Each worker (:mod:`kms._worker`) loads the key set under the store's writer lock and serves
   with :func:`kms.daemon.serve_kms` on the inherited sockets. Its key set is kept current and
   its writes serialised with the others' by :class:`kms.coherence.WriteSection`; its audit
   lines go into the one shared chain (:class:`kms.audit.AuditLog`). On PostgreSQL
   (``--storage``) each worker is to the database one more daemon: :mod:`kms.pg` keeps its key
   set current, orders its writes and chains its audit lines, and the machine-local file only
   spreads connections. It writes ``ready`` on its stdout once it listens; the parent prints
   ``kms listening on ...`` when all are ready.
4. A worker that dies (a crash, ``kill -9``) is reported (``kms_worker_died``, with its exit
   status) and replaced at once; the others keep serving meanwhile, and the connections it was
   serving are cut (their requests were not acknowledged: nothing acknowledged is lost, since a
   key write is committed and an audit line written before any reply). If workers keep dying
   (more than :data:`MAX_RESTARTS` within :data:`RESTART_WINDOW_S`), or one fails before it was
   ever ready, the daemon stops cleanly with an error instead of looping.
5. SIGTERM or SIGINT: the parent closes its copy of the sockets and sends SIGTERM to every
   worker; each stops accepting, closes idle connections and lets requests in flight finish
   (hypercorn's graceful deadline, ``graceful_timeout_s``). Workers still running
   :data:`KILL_GRACE_S` after that deadline are killed. Then the parent logs the audit chain's
   last MAC and releases the lock.
6. If the parent itself dies (``kill -9``), Linux kills the workers (``PR_SET_PDEATHSIG``): a
   daemon killed is killed whole, and its state directory is free for the next start at once.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import structlog
import trio

from transport.errors import ConfigurationError

from .config import KmsConfig
from .errors import KmsError

__all__ = [
    "KILL_GRACE_S",
    "MAX_RESTARTS",
    "RESTART_WINDOW_S",
    "START_TIMEOUT_S",
    "WorkerSetup",
    "WorkersFailed",
    "run_workers",
]

log = structlog.get_logger()

#: A worker imports, loads the key set and reports ready within this (a few hundred ms idle).
START_TIMEOUT_S = 60.0
#: More than MAX_RESTARTS worker deaths within RESTART_WINDOW_S: the daemon stops (a worker
#: that dies at once every time would otherwise be restarted forever).
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
#: After the graceful deadline, stragglers get this long before SIGKILL.
KILL_GRACE_S = 5.0
#: The setup sent on a worker's stdin is at most this large (a config is ~1 KiB).
MAX_SETUP_BYTES = 1024 * 1024
_LENGTH = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """What a worker is told on its stdin (pickled: parent and worker are the same code)."""

    config: KmsConfig
    index: int
    workers: int
    parent_pid: int
    listen_fds: tuple[int, ...]


class WorkersFailed(KmsError):
    """The daemon stopped because its workers could not be kept running."""


@dataclass
class _Running:
    """One worker process as the parent tracks it."""

    index: int
    popen: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


def _spawn(setup: WorkerSetup) -> subprocess.Popen[bytes]:
    """Start one worker. Runs on the main thread: ``PR_SET_PDEATHSIG`` is tied to the thread
    that forked the child, and trio's process helpers fork from cached worker threads that
    exit after a while (which would kill the worker)."""
    popen = subprocess.Popen(
        [sys.executable, "-m", "kms._worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=setup.listen_fds,
    )
    data = pickle.dumps(setup)
    stdin = popen.stdin
    assert stdin is not None
    try:
        stdin.write(_LENGTH.pack(len(data)) + data)  # fits the pipe buffer: never blocks
        stdin.flush()
    except BrokenPipeError:
        pass  # it died at once (killed): its start is seen to fail like any other
    return popen


def _exit_text(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


class _Supervisor:
    def __init__(self, config: KmsConfig, count: int, listen_fds: tuple[int, ...]) -> None:
        self.config = config
        self.count = count
        self.listen_fds = listen_fds
        self.running: dict[int, _Running] = {}
        self.stopping = False
        self.deaths: list[float] = []
        self.all_gone = trio.Event()
        self._controls: dict[int, IO[bytes]] = {}

    def _start(self, index: int) -> _Running:
        popen = _spawn(
            WorkerSetup(self.config, index, self.count, os.getpid(), self.listen_fds)
        )
        assert popen.stdin is not None
        self._controls[index] = popen.stdin  # kept open: its EOF tells the worker we are gone
        worker = _Running(index, popen)
        self.running[index] = worker
        log.info("kms_worker_started", worker=index, pid=popen.pid)
        return worker

    async def _ready(self, worker: _Running) -> bool:
        """True once the worker wrote ``ready``; False if it ended first (or took too long)."""
        stdout = worker.popen.stdout
        assert stdout is not None
        stream = trio.lowlevel.FdStream(os.dup(stdout.fileno()))
        stdout.close()
        got = b""
        async with stream:
            with trio.move_on_after(START_TIMEOUT_S):
                while b"\n" not in got and len(got) < 64:
                    chunk = await stream.receive_some(64)
                    if not chunk:
                        break
                    got += chunk
        return got.startswith(b"ready\n")

    async def _exited(self, worker: _Running) -> int:
        """Wait for the worker's end (a pidfd: no polling, no SIGCHLD handler) and reap it."""
        status = worker.popen.poll()
        if status is not None:  # already reaped (only we reap it: a pidfd would not open)
            return status
        pidfd = os.pidfd_open(worker.popen.pid)  # a zombie still opens: it is not reaped yet
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return worker.popen.wait()

    def _forget(self, worker: _Running) -> None:
        self.running.pop(worker.index, None)
        control = self._controls.pop(worker.index, None)
        if control is not None:
            with contextlib.suppress(OSError):
                control.close()
        if self.stopping and not self.running:
            self.all_gone.set()

    async def run_worker(
        self, index: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep worker ``index`` running until the daemon stops; ``started`` once it is first
        ready.

        Raises:
            WorkersFailed: it failed before it was ever ready, or workers keep dying.
        """
        first = True
        while True:
            worker = self._start(index)
            ready = await self._ready(worker)
            if not ready:
                if worker.popen.poll() is None:
                    worker.popen.kill()  # alive but never ready: hung at start
                status = await self._exited(worker)
                self._forget(worker)
                if self.stopping:
                    return
                if first:
                    raise WorkersFailed(
                        f"KMS worker {index} failed to start ({_exit_text(status)}); its "
                        "error is above"
                    )
                self._died(worker, status)
                continue
            if first:
                first = False
                task_status.started()
            status = await self._exited(worker)
            self._forget(worker)
            if self.stopping:
                log.info("kms_worker_stopped", worker=index, status=_exit_text(status))
                return
            self._died(worker, status)

    def _died(self, worker: _Running, status: int) -> None:
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW_S] + [now]
        log.error(
            "kms_worker_died",
            worker=worker.index,
            pid=worker.popen.pid,
            status=_exit_text(status),
            served_s=round(now - worker.started, 3),
            action="replacing it; the other workers keep serving",
        )
        if len(self.deaths) > MAX_RESTARTS:
            raise WorkersFailed(
                f"KMS workers died {len(self.deaths)} times within {RESTART_WINDOW_S:g} s "
                f"(last: worker {worker.index}, {_exit_text(status)}); stopping the daemon"
            )

    def stop_all(self, sig: int) -> None:
        for worker in list(self.running.values()):
            if worker.popen.poll() is None:
                worker.popen.send_signal(sig)

    async def reap_all(self) -> None:
        """Wait for every worker still known, then close their control pipes."""
        for worker in list(self.running.values()):
            await self._exited(worker)
            self._forget(worker)


async def run_workers(
    config: KmsConfig,
    count: int,
    *,
    on_ready: Callable[[str, int], None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, start ``count`` workers, call ``on_ready(host, port)`` once all serve, replace the
    ones that die, and return after a graceful stop on SIGTERM/SIGINT. The caller holds the
    state directory's lock (:func:`kms.app.prepare_state`).

    Raises:
        WorkersFailed: a worker failed at start, or workers keep dying.
        ConfigurationError: the address cannot be bound.
    """
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror}"
        ) from None
    sockname = listeners[0].socket.getsockname()
    host, port = str(sockname[0]), int(sockname[1])
    sup = _Supervisor(config, count, tuple(s.socket.fileno() for s in listeners))
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as starting:  # all start at once
                    for index in range(count):
                        starting.start_soon(nursery.start, sup.run_worker, index)
                log.info("kms_workers_ready", workers=count, host=host, port=port)
                if not config.trust_roots:
                    log.warning("kms_recipient_disabled", reason="no trust_roots configured")
                on_ready(host, port)
                task_status.started()
                async for signum in signals:
                    log.info("kms_shutting_down", signal=signal.Signals(signum).name)
                    break
                sup.stopping = True
                for listener in listeners:  # new connections: refused once workers close theirs
                    await listener.aclose()
                sup.stop_all(signal.SIGTERM)
                if not sup.running:
                    sup.all_gone.set()
                with trio.move_on_after(config.graceful_timeout_s + KILL_GRACE_S):
                    await sup.all_gone.wait()
                if sup.running:
                    log.error(
                        "kms_workers_killed",
                        workers=sorted(sup.running),
                        reason=f"still running {KILL_GRACE_S:g} s after the graceful deadline",
                    )
                    sup.stop_all(signal.SIGKILL)
        finally:
            sup.stopping = True
            sup.stop_all(signal.SIGKILL)  # a failure path: no worker outlives the parent
            with trio.CancelScope(shield=True):
                await sup.reap_all()
                for listener in listeners:
                    await listener.aclose()
