"""The per-enclave supervisor (nitro-cli's "enclave process").

One :class:`EnclaveSupervisor` owns one enclave from image check to teardown::

    read_eif → unpack into <state>/enclaves/<slot>/image (or the runtime's image cache)
    → verify_unpacked (refuse tampering) → NSM device (LocalCA of the state dir, the image's
    PCRs, debug rule) → socketpairs → serve_enclave_fabric with two in-process parent ports:
    the heartbeat (3, 9000) and the app status report (3, 9001) → serve_nsm
    → spawn the sandboxed child (a :class:`~runtime.spawners.Spawner`: fresh interpreter, or
      a fork of a zygote of the same bootstrap)
    → wait for 0xB7 (echoed) and the app-start byte under the boot timeout (else E36, teardown)
    → RUNNING record + control socket (:mod:`runtime.control`) → ``task_status.started(info)``
    → wait for the app's exit (status relayed by the sandbox) or a terminate request
    → teardown: SIGTERM, bounded grace, SIGKILL; cgroups, sockets, record and work dir removed;
      the exit reason (code, signal, OOM, terminated) logged and appended to events.jsonl.

The app's status report (:mod:`transport.app_status`) is optional: the first one is recorded
(later ones are acknowledged and ignored), written to the enclave's record (``describe-enclaves
--metadata`` shows it) and awaited by :meth:`EnclaveSupervisor.wait_app_ready`.

Supervisors run inside a :class:`~runtime.api.Runtime`: in an application
(:func:`runtime.api.open_runtime`), or in the host daemon that serves the CLI
(:mod:`runtime.host`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from runtime import sandbox
from runtime.console import CONSOLE_HISTORY_BYTES, ConsoleBuffer
from runtime.control import ControlServer
from runtime.errors import (
    AppExitedError,
    AppFailedError,
    AppReadyTimeoutError,
    ConsoleConnectionError,
    EnclaveBootError,
    NitroCliError,
    SignatureCheckError,
)
from runtime.image._cache import ImageCache
from runtime.records import (
    EnclaveInfo,
    EnclaveState,
    ExitKind,
    ExitReason,
    IsolationReport,
    LaunchSpec,
)
from runtime.spawners import ChildLaunch, FreshSpawner, Spawner, SpawnPath, site_packages
from runtime.state import StateDir

if TYPE_CHECKING:
    from attest.nsm.device import NsmDevice
    from runtime.eif import EifFile, UnpackedImage
    from runtime.enclave_init import LaunchParameters
    from transport.app_status import AppStatus

__all__ = ["EnclaveSupervisor", "CONSOLE_HISTORY_BYTES"]

log = structlog.get_logger("runtime.supervisor")

#: After the enclave's exit status, how long the console pump may take to reach EOF (every
#: writer is gone by then; this only bounds a pathological case).
CONSOLE_DRAIN_S: Final = 1.0
#: After SIGKILL, how long to wait for the status pipe before giving up on it.
KILL_WAIT_S: Final = 5.0
#: How long control requests in flight (a terminate waiting to answer) may finish at the end.
CONTROL_GRACE_S: Final = 2.0
#: fds the enclave inherits (ENCLAVE_FABRIC_FD, ENCLAVE_NSM_FD, ENCLAVE_INIT_FD).
FABRIC_FD, NSM_FD, INIT_FD = 3, 4, 5
#: Parent ports served in-process for every enclave (Nitro's heartbeat; our status report).
HEARTBEAT_PORT: Final = 9000
APP_STATUS_PORT: Final = 9001
#: runtime.enclave_init.EXIT_OOM (not imported: that package is enclave-side).
_EXIT_OOM: Final = 251
_E44: Final = (
    "The enclave was not started with the debug flag set, include '--debug-mode' in the "
    "run-enclave command"
)


class EnclaveSupervisor:
    """Owns one enclave. Start with ``info = await nursery.start(sup.run)``.

    Args:
        state: the state directory (records, CA, fabric).
        reservation: the STARTING record written by :meth:`StateDir.reserve`.
        spec: the launch parameters (CID, CPUs, memory, uid, debug, strictness, timeouts).
        spawner: fresh interpreter (default) or zygote.
        fabric_dir: the vsock fabric directory (default ``<state>/vsock``).
        image_cache: the runtime's cache of verified trees (None: unpack per enclave).
    """

    def __init__(
        self,
        state: StateDir,
        reservation: EnclaveInfo,
        spec: LaunchSpec,
        *,
        spawner: Spawner | None = None,
        fabric_dir: Path | None = None,
        image_cache: ImageCache | None = None,
    ) -> None:
        self.image_cache = image_cache
        self.state = state
        self.spec = spec
        self.info = reservation
        self.spawner: Spawner = spawner or FreshSpawner()
        self.fabric_dir = fabric_dir or (state.path / "vsock")
        self.log = log.bind(enclave_id=spec.enclave_id, enclave_name=spec.enclave_name)
        self._booted = trio.Event()
        self._ready = trio.Event()
        self._gone = trio.Event()
        self._cleaned = trio.Event()
        self._terminating = False
        self._spawned: sandbox.Spawned | None = None
        self.exit_reason: ExitReason | None = None
        #: the app's first status report (None until it reports)
        self.app_status: AppStatus | None = None
        self._status_reported = trio.Event()
        self._console = ConsoleBuffer()
        self.started_at = time.monotonic()
        self._marks: dict[str, float] = {}
        self._pending_verify = False
        #: set once the image is verified and the app is in its memory cgroup; the heartbeat
        #: echo (which lets init start the app) and the NSM wait for it.
        self._gate = trio.Event()
        self._verified = trio.Event()
        self._control: ControlServer | None = None
        self._control_nursery: trio.Nursery | None = None
        #: trio time by which the enclave must be ready (set when ``run`` starts: the boot
        #: timeout bounds the whole start, image preparation and spawn included, so a child
        #: that signals ready while the spawn is still being awaited is held to it too).
        self._boot_deadline = math.inf
        self._ready_at = math.inf

    # -- public ---------------------------------------------------------------------------
    @property
    def cid(self) -> int:
        """The enclave's CID."""
        return self.spec.cid

    @property
    def gone(self) -> bool:
        """Whether the enclave's processes are gone (resources may still be released)."""
        return self._gone.is_set()

    async def terminate(self) -> ExitReason:
        """SIGTERM the app, wait up to the grace period, then SIGKILL; returns when gone."""
        sp = self._spawned
        if sp is None:
            await self._cleaned.wait()
            assert self.exit_reason is not None
            return self.exit_reason
        if not self._terminating:
            self._terminating = True
            self.log.info("enclave_terminating", grace_s=self.spec.terminate_grace_s)
            self._write_record(state=EnclaveState.TERMINATING)
            _kill(sp.app_pid, signal.SIGTERM)
        with trio.move_on_after(self.spec.terminate_grace_s):
            await self._gone.wait()
        if not self._gone.is_set():
            self.log.warning("enclave_kill", reason="grace period over")
            _kill(sp.middle_pid, signal.SIGKILL)
            _kill(sp.app_pid, signal.SIGKILL)
            await self._gone.wait()
        await self._cleaned.wait()
        assert self.exit_reason is not None
        return self.exit_reason

    async def wait_exited(self) -> ExitReason:
        """Wait until the enclave is gone and its resources are released."""
        await self._cleaned.wait()
        assert self.exit_reason is not None
        return self.exit_reason

    async def wait_app_ready(self, timeout_s: float) -> AppStatus:
        """Wait for the app's status report; returns it when it says READY.

        Raises:
            AppFailedError: the app reported FAILED (``detail``: its own words).
            AppExitedError: the enclave ended before reporting (``detail``: the exit reason).
            AppReadyTimeoutError: no report within ``timeout_s``.
        """
        from transport.app_status import AppState

        with trio.move_on_after(timeout_s):
            async with trio.open_nursery() as n:

                async def _gone() -> None:
                    await self._gone.wait()
                    # a report racing the exit still wins: give the handler its moment
                    with trio.move_on_after(0.05):
                        await self._status_reported.wait()
                    n.cancel_scope.cancel()

                n.start_soon(_gone)
                await self._status_reported.wait()
                n.cancel_scope.cancel()
        status = self.app_status
        if status is not None and status.state is AppState.READY:
            return status
        if status is not None:
            raise AppFailedError(
                f"The enclave's app reported a failure: {status.detail or '(no detail)'}",
                detail=status.detail,
            )
        if self._gone.is_set():
            reason = self.exit_reason
            detail = _fmt_reason(reason)
            tail = self._console_tail()
            raise AppExitedError(
                f"The enclave's app exited before it was ready ({detail}){tail}", detail=detail
            )
        raise AppReadyTimeoutError(
            f"The enclave's app did not report ready within {timeout_s:g} s",
            detail=f"no report within {timeout_s:g} s",
        )

    async def console_stream(self) -> trio.MemoryReceiveChannel[bytes]:
        """History plus live console bytes (debug mode only); closes at enclave exit.

        Raises:
            ConsoleConnectionError: E44, the enclave is not in debug mode.
        """
        if not self.spec.debug:
            raise ConsoleConnectionError(_E44)
        return self._console.reader()

    # -- main task ------------------------------------------------------------------------
    async def run(
        self, *, task_status: trio.TaskStatus[EnclaveInfo] = trio.TASK_STATUS_IGNORED
    ) -> ExitReason:
        """Boot the enclave, report readiness, supervise it until it is gone.

        Raises (before ``started``): EifFormatError (E35), EnclaveBootError (E36: tampered
        image, boot failure or timeout, strict isolation refused), SignatureCheckError (E59);
        everything is torn down first.
        """
        async with _unwrap_single(), trio.open_nursery() as control:
            self._control_nursery = control
            try:
                return await self._run(task_status)
            finally:
                # in-flight control requests (a terminate waiting for cleanup) may answer
                if self._control is not None:
                    self._control.stop(CONTROL_GRACE_S)
                else:
                    control.cancel_scope.cancel()

    async def _run(self, task_status: trio.TaskStatus[EnclaveInfo]) -> ExitReason:
        sp: sandbox.Spawned | None = None
        socks: list[socket.socket] = []
        try:
            self._boot_deadline = trio.current_time() + self.spec.boot_timeout_s
            work = self.state.work_dir(self.spec.enclave_id)
            self._mark("run_start")
            hit = None
            if self.image_cache is not None and self.spawner.kind is SpawnPath.ZYGOTE:
                # Warm path: a tree already verified for this (unchanged-looking) file starts
                # at once; _verify_late re-reads the EIF and re-verifies the tree meanwhile,
                # and nothing of the enclave runs or attests before that passed (_gate).
                hit = self.image_cache.lookup(self.spec.eif_path)
            if hit is not None:
                image, eif = hit
                self._pending_verify = True
            else:
                image, eif = await trio.to_thread.run_sync(self._prepare_image, work)
            self._mark("image_verified")
            self.info = self._starting_info(eif)
            self._write_record(state=EnclaveState.STARTING)
            fab_p, fab_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            nsm_p, nsm_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            socks += [fab_p, fab_c, nsm_p, nsm_c]
            params: LaunchParameters = {"cmd": image.cmd, "cwd": str(image.app_dir)}
            init_fd = _memfd_json(params)
            console_r = console_w = -1
            if self.spec.debug:
                console_r, console_w = os.pipe2(os.O_CLOEXEC)
            launch = self._child_launch(image, eif, fab_c, nsm_c, init_fd, console_w)
            from attest.nsm.server import serve_nsm
            from transport.vsock import FabricPolicy, serve_enclave_fabric

            async with _unwrap_single(), trio.open_nursery() as nursery:
                policy = FabricPolicy(
                    cid=self.spec.cid,
                    parent_ports=self.spec.parent_ports,
                    peer_cids=self.spec.peer_cids,
                )
                await nursery.start(
                    lambda task_status: serve_enclave_fabric(
                        fab_p,
                        policy=policy,
                        fabric_dir=self.fabric_dir,
                        parent_handlers={
                            HEARTBEAT_PORT: self._heartbeat,
                            APP_STATUS_PORT: self._app_status_report,
                        },
                        task_status=task_status,
                    )
                )

                async def nsm() -> None:
                    # Key generation and leaf issuance (~6 ms) overlap the child's boot; the
                    # enclave's first NSM request simply waits in the socket buffer.
                    device = await trio.to_thread.run_sync(self._nsm_device, eif)
                    await self._gate.wait()
                    await serve_nsm(nsm_p, device)

                nursery.start_soon(nsm)
                late = _LateVerify(self, nursery, eif, image)
                if hit is not None:  # nothing to prepare: verify from the start
                    late.request_sent()
                try:
                    sp = self._spawned = await self.spawner.spawn(launch, late)
                except OSError as exc:
                    raise EnclaveBootError(f"Enclave boot failed: {exc}") from exc
                finally:
                    for fd in (init_fd, console_w):
                        if fd >= 0:
                            os.close(fd)
                    fab_c.close()
                    nsm_c.close()
                self._mark("spawned")
                for phase, at in sp.timing.items():
                    if at:
                        self._marks[phase] = round((at - self.started_at) * 1000, 2)
                self.log.info(
                    "enclave_spawned",
                    app_pid=sp.app_pid,
                    path=str(self.spawner.kind),
                    isolation=sp.layers,
                )
                late.request_sent()  # no-op when the spawner already reported it
                nursery.start_soon(self._open_gate, sp)
                if console_r >= 0:
                    nursery.start_soon(self._console.pump, console_r)
                nursery.start_soon(self._watch_exit, sp)
                await self._wait_ready()
                self.info = dataclasses.replace(
                    self.info,
                    state=EnclaveState.RUNNING,
                    app_pid=sp.app_pid,
                    isolation=IsolationReport(dict(sp.layers)),
                )
                self._write_record(state=EnclaveState.RUNNING)
                self._control = ControlServer(self.state.socket_path(self.spec.enclave_id), self)
                assert self._control_nursery is not None
                await self._control_nursery.start(self._control.run)
                boot_ms = (time.monotonic() - self.started_at) * 1000
                self.log.info(
                    "enclave_running",
                    cid=self.spec.cid,
                    boot_ms=round(boot_ms, 1),
                    phases_ms=self._marks,
                    missing_layers=self.info.isolation.missing,
                )
                self._event("enclave_running", boot_ms=round(boot_ms, 1))
                task_status.started(self.info)
                await self._gone.wait()
                if console_r >= 0:
                    # The app's last output may still be in the pipe when its exit status
                    # arrives: let the pump reach EOF (every writer is gone) before cancelling.
                    with trio.move_on_after(CONSOLE_DRAIN_S):
                        await self._console.done.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT_S + 2):
                await self._teardown(sp)
            for s in socks:
                s.close()
        assert self.exit_reason is not None
        return self.exit_reason

    # -- pieces ---------------------------------------------------------------------------
    def _mark(self, phase: str) -> None:
        self._marks[phase] = round((time.monotonic() - self.started_at) * 1000, 2)

    def _starting_info(self, eif: EifFile) -> EnclaveInfo:
        measurements = dict(eif.measurements)
        meta = dict(eif.metadata or {})
        return EnclaveInfo(
            enclave_name=self.spec.enclave_name,
            enclave_id=self.spec.enclave_id,
            process_id=os.getpid(),
            enclave_cid=self.spec.cid,
            cpu_ids=self.spec.cpu_ids,
            memory_mib=self.spec.memory_mib,
            state=EnclaveState.STARTING,
            debug=self.spec.debug,
            measurements={k: v for k, v in measurements.items() if k.startswith("PCR")},
            image_name=meta.get("ImageName"),
            image_version=meta.get("ImageVersion"),
            metadata=_metadata_view(meta),
            eif_path=self.spec.eif_path,
            outside_uid=self.spec.outside_uid,
        )

    def _child_launch(
        self,
        image: UnpackedImage,
        eif: EifFile,
        fab_c: socket.socket,
        nsm_c: socket.socket,
        init_fd: int,
        console_w: int,
    ) -> ChildLaunch:
        return ChildLaunch(
            sandbox.SandboxSpec(
                enclave_id=self.spec.enclave_id,
                cpu_ids=self.spec.cpu_ids,
                memory_mib=self.spec.memory_mib,
                image_root=str(image.root),
                fds={FABRIC_FD: fab_c.fileno(), NSM_FD: nsm_c.fileno(), INIT_FD: init_fd},
                console_fd=console_w if console_w >= 0 else None,
                strict=self.spec.strict_isolation,
                cwd=str(image.app_dir),
                outside_uid=self.spec.outside_uid,
                max_tasks=self.spec.max_tasks,
            ),
            env=self._app_env(image),
            bootstrap_dir=str(image.bootstrap_dir),
            pcr1=self.info.measurements.get("PCR1", ""),
            eif_path=self.spec.eif_path,
            eif=eif,
        )

    def _prepare_image(self, work: Path) -> tuple[UnpackedImage, EifFile]:
        from runtime.eif import read_eif, unpack_eif, verify_unpacked

        eif = read_eif(Path(self.spec.eif_path))
        if eif.is_signed and not eif.signature_ok:
            raise SignatureCheckError("EIF signature check failed")
        if self.image_cache is not None:
            image, verified = self.image_cache.get(
                eif, defer_verify=self.spawner.kind is SpawnPath.ZYGOTE
            )
            self._pending_verify = not verified
            self.image_cache.remember(self.spec.eif_path, eif, image)
            return image, eif
        work.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The image dir must be traversable by the enclave's uid: the bind mount is made as
        # real root, but files inside are opened as the enclave's own user.
        os.chmod(work, 0o711)
        image = unpack_eif(eif, work / "image")
        verify_unpacked(eif, image)  # what the enclave is about to run is what was measured
        return image, eif

    def _nsm_device(self, eif: EifFile) -> NsmDevice:
        from attest.ca import LocalCA
        from attest.nsm.device import EnclaveIdentity, NsmDevice

        pcrs = {i: bytes(v) for i, v in eif.pcrs.items() if i in (0, 1, 2, 3, 4, 8)}
        identity = EnclaveIdentity(module_id=self.spec.enclave_id, pcrs=pcrs, debug=self.spec.debug)
        signer = LocalCA.load_or_create(self.state.path / "ca").new_signer(self.spec.enclave_id)
        return NsmDevice(identity, signer)

    def _app_env(self, image: UnpackedImage) -> dict[str, str]:
        env = {str(k): str(v) for k, v in image.env.items()}
        bindir = os.path.dirname(sys.executable)
        env["PATH"] = bindir + (":" + env["PATH"] if env.get("PATH") else ":/usr/bin:/bin")
        env["PYTHONPATH"] = ":".join([str(image.bootstrap_dir), *site_packages()])
        env["ENCLAVE_FABRIC_FD"] = str(FABRIC_FD)
        env["ENCLAVE_NSM_FD"] = str(NSM_FD)
        env["ENCLAVE_CID"] = str(self.spec.cid)
        env["ENCLAVE_INIT_FD"] = str(INIT_FD)  # removed by init before the app starts
        return env

    async def _verify_late(self, eif: EifFile, image: UnpackedImage) -> None:
        """Zygote path: re-verify the cached tree while the enclave process is being forked."""
        if self._pending_verify:
            assert self.image_cache is not None
            await trio.to_thread.run_sync(
                self.image_cache.verify_fresh, self.spec.eif_path, eif, image
            )
            self._mark("image_verified_late")
        self._verified.set()

    async def _open_gate(self, sp: sandbox.Spawned) -> None:
        """Attach the memory cgroup (overlapping the enclave's boot) and wait for the image
        verification; until then neither the app nor the NSM can run."""
        if sp.cgroup and not sp.attached:
            await trio.to_thread.run_sync(sandbox.attach_cgroup, sp.cgroup, sp.app_pid)
            self._mark("cgroup_attached")
        await self._verified.wait()
        self._gate.set()

    async def _heartbeat(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_at(self._boot_deadline):
                b = await stream.receive_some(1)
                if b != b"\xb7":
                    self.log.warning("heartbeat_bad", got=b.hex())
                    return
                await self._gate.wait()
                await stream.send_all(b)
                self._booted.set()
                self._mark("heartbeat")
                self.log.info("enclave_heartbeat")
                r = await stream.receive_some(1)
                if r == b"R":
                    self._ready_at = trio.current_time()
                    self._ready.set()
                    await stream.send_all(b"A")

    async def _app_status_report(self, stream: trio.SocketStream) -> None:
        """The app's status report on (3, 9001): bounded, first one recorded, never fatal."""
        from transport.app_status import receive_app_status
        from transport.errors import RemoteProtocolError

        async with stream:
            try:
                status = await receive_app_status(stream)
            except (RemoteProtocolError, trio.TooSlowError) as exc:
                self.log.warning("app_status_bad", error=str(exc))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
        if self.app_status is not None:
            self.log.info("app_status_ignored", state=str(status.state), reason="not the first")
            return
        self.app_status = status
        self.log.info(
            "app_status", state=str(status.state), detail=status.detail, ports=list(status.ports)
        )
        self._event("app_status", state=str(status.state), detail=status.detail)
        self.info = dataclasses.replace(
            self.info,
            app_status={
                "State": str(status.state).upper(),
                "Detail": status.detail,
                "Ports": list(status.ports),
            },
        )
        if self.info.state in (EnclaveState.RUNNING, EnclaveState.TERMINATING):
            self._write_record(state=self.info.state)
        self._status_reported.set()

    async def _wait_ready(self) -> None:
        with trio.move_on_at(self._boot_deadline) as scope:
            async with trio.open_nursery() as n:

                async def _gone() -> None:
                    await self._gone.wait()
                    n.cancel_scope.cancel()

                n.start_soon(_gone)
                await self._ready.wait()
                n.cancel_scope.cancel()
        if self._ready_at <= self._boot_deadline:
            return
        if scope.cancelled_caught or self._ready.is_set():
            what = "heartbeat" if not self._booted.is_set() else "app start"
            raise EnclaveBootError(
                f"Enclave boot failed: no {what} within {self.spec.boot_timeout_s:g} s "
                "(the enclave was torn down)"
            )
        raise EnclaveBootError(
            "Enclave boot failed: the enclave exited during boot "
            f"({_fmt_reason(self.exit_reason)}){self._console_tail()}"
        )

    def _console_tail(self) -> str:
        tail = self._console.tail(2048)
        return "; console: " + tail.decode(errors="replace") if tail else ""

    async def _watch_exit(self, sp: sandbox.Spawned) -> None:
        await trio.lowlevel.wait_readable(sp.status_fd)
        data = os.read(sp.status_fd, 4)
        code, sig = (None, None)
        if len(data) == 4:
            code, sig = sandbox.decode_status(struct.unpack("<i", data)[0])
        else:
            sig = signal.SIGKILL  # the relay died (killed): the app died with it
        if sandbox.oom_killed(sp.cgroup) or code == _EXIT_OOM:
            reason = ExitReason(ExitKind.OOM, code, sig, "memory limit reached")
        elif self._terminating:
            reason = ExitReason(ExitKind.TERMINATED, code, sig)
        elif sig is not None:
            reason = ExitReason(ExitKind.SIGNALED, code, sig)
        else:
            reason = ExitReason(ExitKind.EXITED, code, None)
        self.exit_reason = reason
        self.log.info("enclave_exited", **reason.to_json())
        self._gone.set()

    async def _teardown(self, sp: sandbox.Spawned | None) -> None:
        if sp is not None:
            if not self._gone.is_set():
                _kill(sp.middle_pid, signal.SIGKILL)
                _kill(sp.app_pid, signal.SIGKILL)
                with trio.move_on_after(KILL_WAIT_S):
                    if self.exit_reason is None:
                        await trio.lowlevel.wait_readable(sp.status_fd)
                if self.exit_reason is None:
                    self.exit_reason = ExitReason(
                        ExitKind.BOOT_FAILED if not self._ready.is_set() else ExitKind.TERMINATED,
                        None,
                        signal.SIGKILL,
                    )
            os.close(sp.status_fd)
            await trio.to_thread.run_sync(self.spawner.reap, sp)
            # The relay reports (or dies) before the app has finished exiting: a killed PID
            # namespace init first waits for the rest of its namespace to die. Gone means gone.
            await _wait_pid_exited(sp.app_pid, KILL_WAIT_S)
            for cgroup in (sp.cgroup, sp.pids_cgroup):
                await self._remove_cgroup(cgroup)
        if self.exit_reason is None:
            self.exit_reason = ExitReason(ExitKind.BOOT_FAILED, detail="never started")
        self._gone.set()
        await trio.to_thread.run_sync(self.state.remove_record, self.spec.enclave_id)
        self._event("enclave_gone", exit_reason=self.exit_reason.to_json())
        self._cleaned.set()

    async def _remove_cgroup(self, cgroup: str | None) -> None:
        # rmdir fails (EBUSY) while the kernel still accounts dying tasks; retry for up to
        # 3 s (150 x 20 ms).
        for _ in range(150):
            sandbox.remove_cgroup(cgroup)
            if not cgroup or not os.path.exists(cgroup):  # noqa: ASYNC240 - sysfs
                return
            await trio.sleep(0.02)
        self.log.warning("enclave_cgroup_left", cgroup=cgroup, reason="still busy")

    def _write_record(self, *, state: str) -> None:
        self.info = dataclasses.replace(self.info, state=state, process_id=os.getpid())
        self.state.write_record(self.info, owner_pid=os.getpid())

    def _event(self, event: str, **fields: Any) -> None:
        rec = {
            "ts": time.time(),
            "event": event,
            "enclave_id": self.spec.enclave_id,
            "enclave_name": self.spec.enclave_name,
            **fields,
        }
        with contextlib.suppress(OSError):
            fd = os.open(
                self.state.path / "events.jsonl",
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                0o600,
            )
            try:
                os.write(fd, (json.dumps(rec) + "\n").encode())
            finally:
                os.close(fd)


class _LateVerify:
    """The supervisor's :class:`~runtime.spawners.SpawnObserver` (zygote path): once the fork
    request is out, start re-verifying the cached tree. Earlier, its thread would compete for
    the GIL with the request path (5 ms switch interval); now it overlaps the fork and boot,
    and still gates the app (``_open_gate``). Idempotent."""

    def __init__(
        self, sup: EnclaveSupervisor, nursery: trio.Nursery, eif: EifFile, image: UnpackedImage
    ) -> None:
        self._sup = sup
        self._nursery = nursery
        self._eif = eif
        self._image = image
        self._started = False

    def request_sent(self) -> None:
        if not self._started:
            self._started = True
            self._nursery.start_soon(self._sup._verify_late, self._eif, self._image)


@contextlib.asynccontextmanager
async def _unwrap_single() -> AsyncIterator[None]:
    """Re-raise a lone NitroCliError out of a nursery's ExceptionGroup (callers want the code)."""
    try:
        yield
    except BaseExceptionGroup as eg:
        flat = _flatten(eg)
        errs = [e for e in flat if isinstance(e, NitroCliError)]
        if errs and all(isinstance(e, NitroCliError | trio.Cancelled) for e in flat):
            raise errs[0] from eg
        raise


def _flatten(eg: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_flatten(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _fmt_reason(r: ExitReason | None) -> str:
    if r is None:
        return "unknown"
    if r.signal is not None:
        return f"{r.kind.value}, signal {r.signal}"
    return f"{r.kind.value}, exit code {r.code}"


def _metadata_view(meta: dict[str, Any]) -> dict[str, Any]:
    """describe-enclaves' ``Metadata``: BuildMetadata's fields, DockerInfo, then the custom
    metadata keys, flattened (nitro.md §1.3)."""
    out: dict[str, Any] = {}
    build = meta.get("BuildMetadata")
    if isinstance(build, dict):
        out.update(build)
    for k, v in meta.items():
        if k not in ("ImageName", "ImageVersion", "BuildMetadata", "CustomMetadata"):
            out[k] = v
    custom = meta.get("CustomMetadata")
    if isinstance(custom, dict):
        out.update(custom)
    return out


async def _wait_pid_exited(pid: int, timeout_s: float) -> None:
    """Wait, at most ``timeout_s``, until ``pid`` has exited (zombie or reaped).

    The app is not our child (no waitpid): its pidfd polls readable once it has exited. If the
    pid is already reaped and, unlikely within these milliseconds, reused, this only costs the
    bounded wait; without pidfd support (Linux < 5.3) it returns at once.
    """
    if pid <= 0:
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # ProcessLookupError: already reaped; others: no pidfds here
        return
    try:
        with trio.move_on_after(timeout_s):
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def _kill(pid: int, sig: int) -> None:
    if pid > 0:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _memfd_json(obj: Any) -> int:
    fd = os.memfd_create("enclave-init", os.MFD_CLOEXEC)
    os.write(fd, json.dumps(obj).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
