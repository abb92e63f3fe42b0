"""The per-enclave supervisor (nitro-cli's "enclave process").

One :class:`EnclaveSupervisor` owns one enclave from image check to teardown::

    read_eif → unpack into <state>/enclaves/<slot>/image → verify_unpacked (refuse tampering)
    → NSM device (LocalCA of the state dir, the image's PCRs, debug rule) → socketpairs
    → serve_enclave_fabric (heartbeat on (3, 9000) in-process) + serve_nsm
    → spawn the sandboxed child (fresh interpreter, or a fork of a zygote of the same bootstrap)
    → wait for 0xB7 (echoed) and the app-start byte under the boot timeout (else E36, teardown)
    → RUNNING record + control socket → ``task_status.started(info)``
    → wait for the app's exit (status relayed by the sandbox) or a terminate request
    → teardown: SIGTERM, bounded grace, SIGKILL; cgroup, sockets, record and work dir removed;
      the exit reason (code, signal, OOM, terminated) logged and appended to events.jsonl.

The same class runs inside an application (:func:`runtime.api.open_runtime`, nursery-owned)
and as a detached process for the CLI (``python -m runtime.supervisor``, see :func:`main`),
which reports readiness to ``run-enclave`` through an inherited pipe.

Control socket (``<state>/enclaves/<slot>.sock``, 0600): one JSON line per connection,
``{"op": "terminate"}`` → ``{"ok": true, ...}`` once the enclave is gone, or
``{"op": "console"}`` → ``{"ok": true}`` then the raw console bytes until the enclave exits
(``{"ok": false, "code": "E44", ...}`` for a non-debug enclave).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import structlog
import trio

from runtime import sandbox
from runtime._unixsock import short_path
from runtime.errors import NitroCliError
from runtime.records import EnclaveInfo, ExitKind, ExitReason, IsolationReport, LaunchSpec
from runtime.state import StateDir

__all__ = [
    "EnclaveSupervisor",
    "Spawner",
    "FreshSpawner",
    "ChildLaunch",
    "main",
    "CONSOLE_HISTORY_BYTES",
]

log = structlog.get_logger("runtime.supervisor")

#: Console bytes kept for late ``console`` clients (older bytes are dropped).
CONSOLE_HISTORY_BYTES = 1 << 20
#: After the enclave's exit status, how long the console pump may take to reach EOF (every
#: writer is gone by then; this only bounds a pathological case).
CONSOLE_DRAIN_S = 1.0
#: Bound on a control request line.
MAX_CONTROL_LINE = 4096
#: After SIGKILL, how long to wait for the status pipe before giving up on it.
KILL_WAIT_S = 5.0
#: fds the enclave inherits (ENCLAVE_FABRIC_FD, ENCLAVE_NSM_FD, ENCLAVE_INIT_FD).
FABRIC_FD, NSM_FD, INIT_FD = 3, 4, 5


class ChildLaunch:
    """Everything a spawner needs: the sandbox spec and what init must run."""

    def __init__(
        self,
        sandbox_spec: sandbox.SandboxSpec,
        env: dict[str, str],
        bootstrap_dir: str,
        pcr1: str,
        eif_path: str,
        eif: Any = None,
    ) -> None:
        self.sandbox_spec = sandbox_spec
        self.eif_path = eif_path
        #: the parsed image (CRC and measurements checked) the enclave is started from; a
        #: zygote pool extracts its own bootstrap copy from it (never from the enclave's tree)
        self.eif = eif
        #: called by a spawner once its fork request is on its way (optional)
        self.on_request_sent: Callable[[], None] | None = None
        self.request_sent = False
        self.env = env
        self.bootstrap_dir = bootstrap_dir
        self.pcr1 = pcr1


class Spawner(Protocol):
    """Starts the sandboxed enclave process tree."""

    #: "fresh" or "zygote" (reported in logs)
    kind: str

    async def spawn(self, launch: ChildLaunch) -> sandbox.Spawned: ...

    def reap(self, spawned: sandbox.Spawned) -> None: ...


class FreshSpawner:
    """Fork here, sandbox, then exec a fresh interpreter running ``runtime.enclave_init``."""

    kind = "fresh"

    async def spawn(self, launch: ChildLaunch) -> sandbox.Spawned:
        argv = [sys.executable, "-P", "-m", "runtime.enclave_init"]
        env = dict(launch.env)

        def child() -> NoReturn:
            try:
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)

        # The handshake blocks for a few ms; forking must happen on this (the main) thread.
        # The supervisor attaches the cgroup while the enclave boots (see _gate).
        return sandbox.spawn(launch.sandbox_spec, child, attach=False)

    def reap(self, spawned: sandbox.Spawned) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(spawned.middle_pid, 0)


def _site_packages() -> list[str]:
    import sysconfig

    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return sorted(p for p in paths if os.path.isdir(p))


class ImageCache:
    """Verified unpacked images shared by the enclaves of one runtime, keyed by PCR0.

    Each start still parses the EIF (CRC, measurements) and re-verifies the cached tree
    against it byte for byte (``verify_unpacked``), so a cache entry never runs unchecked; the
    cache only saves the extraction. Owned by a runtime; :meth:`clear` removes the trees.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock = threading.Lock()
        #: stat key of an EIF file -> (its verified tree, its parsed EifFile, immutable)
        self._by_path: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def get(self, eif: Any, *, defer_verify: bool = False) -> tuple[Any, bool]:
        """``(tree, verified)`` for ``eif`` (thread-safe; called from worker threads).

        A fresh extraction is always verified here. With ``defer_verify`` a cached tree is
        returned unverified (``verified=False``): the caller must :meth:`verify` it before
        anything of the enclave's image runs or attests (the zygote path gates the heartbeat
        echo and the NSM on it).
        """
        with self._lock:
            return self._get(eif, defer_verify)

    def verify(self, eif: Any, image: Any) -> None:
        """Re-check a cached tree against ``eif`` (E36 ImageTamperedError on any difference)."""
        from runtime.eif import verify_unpacked

        verify_unpacked(eif, image)

    @staticmethod
    def _path_key(path: str) -> tuple[Any, ...]:
        st = os.stat(path)
        return (
            os.path.realpath(path),
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )

    def lookup(self, path: str) -> tuple[Any, Any] | None:
        """The tree and measurements last verified for the EIF file at ``path``, if the file
        looks unchanged (stat). Only a hint: :meth:`verify_fresh` must confirm it."""
        try:
            key = self._path_key(path)
        except OSError:
            return None
        with self._lock:
            return self._by_path.get(key)

    def remember(self, path: str, eif: Any, image: Any) -> None:
        with contextlib.suppress(OSError), self._lock:
            self._by_path[self._path_key(path)] = (image, eif)

    def verify_fresh(self, path: str, expected: Any, image: Any) -> None:
        """Verify the tree byte for byte against the EIF the start was prepared with
        (``expected``, parsed when the file had the same inode, size, mtime and ctime as
        now); if the file changed since, re-read it (CRC, measurements, signature) and
        require the same measurements. Raises E35/E36/E59."""
        from runtime.eif import read_eif, verify_unpacked

        try:
            same_file = self._by_path.get(self._path_key(path), (None, None))[1] is expected
        except OSError:
            same_file = False
        if same_file:
            verify_unpacked(expected, image)
            return
        eif = read_eif(Path(path))
        if eif.is_signed and not eif.signature_ok:
            raise NitroCliError("E59", "EIF signature check failed")
        if {i: bytes(v) for i, v in eif.pcrs.items()} != {
            i: bytes(v) for i, v in expected.pcrs.items()
        }:
            raise NitroCliError("E36", "Enclave boot failed: the EIF changed while starting")
        verify_unpacked(eif, image)

    def _get(self, eif: Any, defer_verify: bool) -> tuple[Any, bool]:
        from runtime.eif import remove_unpacked, unpack_eif, verify_unpacked

        key = eif.pcrs[0].hex()[:32]
        root = self.dir / key
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if root.exists():
            try:
                image = _describe_unpacked(root)
                if defer_verify:
                    return image, False
                verify_unpacked(eif, image)
                return image, True
            except NitroCliError:
                remove_unpacked(root)
        image = unpack_eif(eif, root)
        verify_unpacked(eif, image)
        return image, True

    def clear(self) -> None:
        from runtime.eif import remove_unpacked

        if self.dir.exists():
            for child in self.dir.iterdir():
                with contextlib.suppress(OSError):
                    if child.is_dir():
                        remove_unpacked(child)
                    else:
                        child.unlink()
            with contextlib.suppress(OSError):
                self.dir.rmdir()
                self.dir.parent.rmdir()  # the shared images/ dir, when no other runtime uses it


def _describe_unpacked(root: Path) -> Any:
    from runtime import eif as _eif

    describe = getattr(_eif, "_describe_tree")  # noqa: B009 - the images module's reader
    return describe(root)


class EnclaveSupervisor:
    """Owns one enclave. Start with ``info = await nursery.start(sup.run)``.

    Args:
        state: the state directory (records, CA, fabric).
        reservation: the STARTING record written by :meth:`StateDir.reserve`.
        spec: the launch parameters (CID, CPUs, memory, debug, strictness, timeouts).
        spawner: fresh interpreter or zygote.
        fabric_dir: the vsock fabric directory (default ``<state>/vsock``).
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
        self._console_hist = bytearray()
        self._console_subs: list[trio.MemorySendChannel[bytes]] = []
        self._console_closed = False
        self._console_done = trio.Event()
        self.started_at = time.monotonic()
        self._marks: dict[str, float] = {}
        self._control_active = 0
        self._pending_verify = False
        #: set once the image is verified and the app is in its memory cgroup; the heartbeat
        #: echo (which lets init start the app) and the NSM wait for it.
        self._gate = trio.Event()
        self._verified = trio.Event()
        self._control_nursery: trio.Nursery | None = None
        #: trio time by which the enclave must be ready (set when ``run`` starts: the boot
        #: timeout bounds the whole start, image preparation and spawn included, so a child
        #: that signals ready while the spawn is still being awaited is held to it too).
        self._boot_deadline = math.inf
        self._ready_at = math.inf

    # -- public ---------------------------------------------------------------------------
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
            self._write_record(state="TERMINATING")
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

    @property
    def gone(self) -> bool:
        return self._gone.is_set()

    # -- main task ------------------------------------------------------------------------
    async def run(
        self, *, task_status: trio.TaskStatus[EnclaveInfo] = trio.TASK_STATUS_IGNORED
    ) -> ExitReason:
        """Boot the enclave, report readiness, supervise it until it is gone.

        Raises (before ``started``): NitroCliError E35 (bad image), E36 (tampered image, boot
        failure or timeout, strict isolation refused); everything is torn down first.
        """
        async with _unwrap_single(), trio.open_nursery() as control:
            self._control_nursery = control
            try:
                return await self._run(task_status)
            finally:
                # Let in-flight control requests (a terminate waiting for cleanup) answer.
                with trio.move_on_after(2):
                    while self._control_active:  # noqa: ASYNC110 - a counter, polled briefly
                        await trio.sleep(0.01)
                control.cancel_scope.cancel()

    async def _run(self, task_status: trio.TaskStatus[EnclaveInfo]) -> ExitReason:
        sp: sandbox.Spawned | None = None
        socks: list[socket.socket] = []
        try:
            self._boot_deadline = trio.current_time() + self.spec.boot_timeout_s
            work = self.state.work_dir(self.spec.enclave_id)
            self._mark("run_start")
            hit = None
            if self.image_cache is not None and self.spawner.kind == "zygote":
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
            measurements = dict(eif.measurements)
            meta = dict(eif.metadata or {})
            self.info = EnclaveInfo(
                enclave_name=self.spec.enclave_name,
                enclave_id=self.spec.enclave_id,
                process_id=os.getpid(),
                enclave_cid=self.spec.cid,
                cpu_ids=self.spec.cpu_ids,
                memory_mib=self.spec.memory_mib,
                state="STARTING",
                debug=self.spec.debug,
                measurements={k: v for k, v in measurements.items() if k.startswith("PCR")},
                image_name=meta.get("ImageName"),
                image_version=meta.get("ImageVersion"),
                metadata=_metadata_view(meta),
                eif_path=self.spec.eif_path,
            )
            self._write_record(state="STARTING")
            fab_p, fab_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            nsm_p, nsm_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            socks += [fab_p, fab_c, nsm_p, nsm_c]
            init_fd = _memfd_json({"cmd": image.cmd, "cwd": str(image.app_dir)})
            console_r = console_w = -1
            if self.spec.debug:
                console_r, console_w = os.pipe2(os.O_CLOEXEC)
            launch = ChildLaunch(
                sandbox.SandboxSpec(
                    enclave_id=self.spec.enclave_id,
                    cpu_ids=self.spec.cpu_ids,
                    memory_mib=self.spec.memory_mib,
                    image_root=str(image.root),
                    fds={FABRIC_FD: fab_c.fileno(), NSM_FD: nsm_c.fileno(), INIT_FD: init_fd},
                    console_fd=console_w if console_w >= 0 else None,
                    strict=self.spec.strict_isolation,
                    cwd=str(image.app_dir),
                ),
                env=self._app_env(image),
                bootstrap_dir=str(image.bootstrap_dir),
                pcr1=self.info.measurements.get("PCR1", ""),
                eif_path=self.spec.eif_path,
                eif=eif,
            )
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
                        parent_handlers={9000: self._heartbeat},
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

                # Start the (zygote path) re-verification once the fork request is out: earlier,
                # its thread would compete for the GIL with the request path (5 ms switch
                # interval); now it overlaps the fork and boot, and gates the app (_open_gate).
                def request_sent() -> None:
                    launch.request_sent = True
                    nursery.start_soon(self._verify_late, eif, image)

                launch.on_request_sent = request_sent
                if hit is not None:  # nothing to prepare: verify from the start
                    request_sent()
                    launch.on_request_sent = None
                try:
                    sp = self._spawned = await self.spawner.spawn(launch)
                except OSError as exc:
                    raise NitroCliError("E36", f"Enclave boot failed: {exc}") from exc
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
                    path=self.spawner.kind,
                    isolation=sp.layers,
                )
                if not launch.request_sent:
                    nursery.start_soon(self._verify_late, eif, image)
                nursery.start_soon(self._open_gate, sp)
                if console_r >= 0:
                    nursery.start_soon(self._console_pump, console_r)
                nursery.start_soon(self._watch_exit, sp)
                await self._wait_ready(sp)
                self.info = _replace(
                    self.info,
                    state="RUNNING",
                    app_pid=sp.app_pid,
                    isolation=IsolationReport(dict(sp.layers)),
                )
                self._write_record(state="RUNNING")
                assert self._control_nursery is not None
                await self._control_nursery.start(self._serve_control)
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
                        await self._console_done.wait()
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

    def _prepare_image(self, work: Path) -> tuple[Any, Any]:
        from runtime.eif import read_eif, unpack_eif, verify_unpacked

        eif = read_eif(Path(self.spec.eif_path))
        if eif.is_signed and not eif.signature_ok:
            raise NitroCliError("E59", "EIF signature check failed")
        if self.image_cache is not None:
            image, verified = self.image_cache.get(eif, defer_verify=self.spawner.kind == "zygote")
            self._pending_verify = not verified
            self.image_cache.remember(self.spec.eif_path, eif, image)
            return image, eif
        work.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The image dir must be traversable by the enclave's uid (65534): the bind mount is
        # made as real root, but files inside are opened as the enclave's user.
        os.chmod(work, 0o711)
        image = unpack_eif(eif, work / "image")
        verify_unpacked(eif, image)  # what the enclave is about to run is what was measured
        return image, eif

    def _nsm_device(self, eif: Any) -> Any:
        from attest.ca import LocalCA
        from attest.nsm.device import EnclaveIdentity, NsmDevice

        pcrs = {i: bytes(v) for i, v in eif.pcrs.items() if i in (0, 1, 2, 3, 4, 8)}
        identity = EnclaveIdentity(module_id=self.spec.enclave_id, pcrs=pcrs, debug=self.spec.debug)
        signer = LocalCA.load_or_create(self.state.path / "ca").new_signer(self.spec.enclave_id)
        return NsmDevice(identity, signer)

    def _app_env(self, image: Any) -> dict[str, str]:
        env = {str(k): str(v) for k, v in image.env.items()}
        bindir = os.path.dirname(sys.executable)
        env["PATH"] = bindir + (":" + env["PATH"] if env.get("PATH") else ":/usr/bin:/bin")
        env["PYTHONPATH"] = ":".join([str(image.bootstrap_dir), *_site_packages()])
        env["ENCLAVE_FABRIC_FD"] = str(FABRIC_FD)
        env["ENCLAVE_NSM_FD"] = str(NSM_FD)
        env["ENCLAVE_CID"] = str(self.spec.cid)
        env["ENCLAVE_INIT_FD"] = str(INIT_FD)  # removed by init before the app starts
        return env

    async def _verify_late(self, eif: Any, image: Any) -> None:
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

    async def _wait_ready(self, sp: sandbox.Spawned) -> None:
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
            raise NitroCliError(
                "E36",
                f"Enclave boot failed: no {what} within {self.spec.boot_timeout_s:g} s "
                "(the enclave was torn down)",
            )
        reason = self.exit_reason
        tail = ""
        if self._console_hist:
            tail = "; console: " + bytes(self._console_hist[-2048:]).decode(errors="replace")
        raise NitroCliError(
            "E36",
            f"Enclave boot failed: the enclave exited during boot ({_fmt_reason(reason)}){tail}",
        )

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

    async def _console_pump(self, fd: int) -> None:
        stream = trio.lowlevel.FdStream(fd)
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    self._console_hist += data
                    if len(self._console_hist) > CONSOLE_HISTORY_BYTES:
                        del self._console_hist[: len(self._console_hist) - CONSOLE_HISTORY_BYTES]
                    for ch in list(self._console_subs):
                        try:
                            ch.send_nowait(bytes(data))
                        except (
                            trio.WouldBlock,
                            trio.BrokenResourceError,
                            trio.ClosedResourceError,
                        ):
                            self._console_subs.remove(ch)
        finally:
            # also when cancelled: console readers must see the end, never hang
            self._console_closed = True
            for ch in self._console_subs:
                ch.close()
            self._console_subs.clear()
            self._console_done.set()

    async def console_stream(self) -> trio.MemoryReceiveChannel[bytes]:
        """History plus live console bytes (debug mode only); closes at enclave exit."""
        if not self.spec.debug:
            raise NitroCliError("E44", _E44)
        send, recv = trio.open_memory_channel[bytes](256)
        if self._console_hist:
            send.send_nowait(bytes(self._console_hist))
        if self._console_closed:
            send.close()
        else:
            self._console_subs.append(send)
        return recv

    async def _serve_control(self, *, task_status: trio.TaskStatus[None]) -> None:
        path = self.state.socket_path(self.spec.enclave_id)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            with short_path(path) as bindable:
                await sock.bind(bindable)
        finally:
            os.umask(old)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        async with listener:
            task_status.started()
            await trio.serve_listeners(self._control_conn, [listener])

    async def _control_conn(self, stream: trio.SocketStream) -> None:
        async with stream:
            line = b""
            with trio.move_on_after(5):
                while b"\n" not in line and len(line) < MAX_CONTROL_LINE:
                    chunk = await stream.receive_some(MAX_CONTROL_LINE)
                    if not chunk:
                        break
                    line += chunk
            try:
                req = json.loads(line.split(b"\n", 1)[0])
                op = req["op"]
            except (ValueError, KeyError, TypeError):
                await _send_json(stream, {"ok": False, "code": "E14", "message": "bad request"})
                return
            self._control_active += 1
            try:
                if op == "terminate":
                    reason = await self.terminate()
                    await _send_json(stream, {"ok": True, "exit_reason": reason.to_json()})
                elif op == "console":
                    recv = await self.console_stream()
                    await _send_json(stream, {"ok": True, "cid": self.spec.cid})
                    async with recv:
                        async for chunk in recv:
                            await stream.send_all(chunk)
                else:
                    await _send_json(
                        stream, {"ok": False, "code": "E14", "message": f"unknown op {op!r}"}
                    )
            except NitroCliError as exc:
                await _send_json(stream, {"ok": False, "code": exc.code, "message": exc.message})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self._control_active -= 1

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
            # cgroup rmdir fails (EBUSY) while the kernel still accounts dying tasks; retry
            # for up to 3 s (150 x 20 ms).
            for _ in range(150):
                sandbox.remove_cgroup(sp.cgroup)
                if not sp.cgroup or not os.path.exists(sp.cgroup):  # noqa: ASYNC240 - sysfs
                    break
                await trio.sleep(0.02)
            else:
                self.log.warning("enclave_cgroup_left", cgroup=sp.cgroup, reason="still busy")
        if self.exit_reason is None:
            self.exit_reason = ExitReason(ExitKind.BOOT_FAILED, detail="never started")
        self._gone.set()
        await trio.to_thread.run_sync(self.state.remove_record, self.spec.enclave_id)
        self._event("enclave_gone", exit_reason=self.exit_reason.to_json())
        self._cleaned.set()

    def _write_record(self, *, state: str) -> None:
        self.info = _replace(self.info, state=state, process_id=os.getpid())
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


_EXIT_OOM = 251  # runtime.enclave_init.EXIT_OOM (not imported: that package is enclave-side)
_E44 = (
    "The enclave was not started with the debug flag set, include '--debug-mode' in the "
    "run-enclave command"
)


@contextlib.asynccontextmanager
async def _unwrap_single() -> Any:
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


def _replace(info: EnclaveInfo, **changes: Any) -> EnclaveInfo:
    return dataclasses.replace(info, **changes)


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


async def _send_json(stream: trio.abc.SendStream, obj: Any) -> None:
    await stream.send_all((json.dumps(obj) + "\n").encode())


# -- detached process entry point ------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.supervisor --state-dir D --spec JSON --ready-fd N [--zygote]``.

    Started detached by ``run-enclave``; writes one JSON line to the ready fd
    (``{"ok": true, "info": {...}}`` or ``{"ok": false, "code": ..., "message": ...}``),
    then supervises the enclave until it is gone (SIGTERM/SIGINT terminate it).
    """
    from transport.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m runtime.supervisor")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--spec", required=True)
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--log-file")
    args = p.parse_args(argv)
    stream = open(args.log_file, "a", buffering=1) if args.log_file else sys.stderr  # noqa: SIM115
    configure_logging(json=True, stream=stream)
    state = StateDir(Path(args.state_dir))
    spec = LaunchSpec.from_json(json.loads(args.spec))
    ready = os.fdopen(args.ready_fd, "w", buffering=1)

    def report(obj: dict[str, Any]) -> None:
        with contextlib.suppress(OSError, ValueError):
            ready.write(json.dumps(obj) + "\n")
            ready.close()

    try:
        reservation = state.find(enclave_id=spec.enclave_id)
    except NitroCliError:
        reservation = EnclaveInfo(
            spec.enclave_name,
            spec.enclave_id,
            os.getpid(),
            spec.cid,
            spec.cpu_ids,
            spec.memory_mib,
            state="STARTING",
        )
    sup = EnclaveSupervisor(state, reservation, spec)

    async def amain() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        nursery.start_soon(sup.terminate)

            nursery.start_soon(on_signals)

            async def supervise(task_status: trio.TaskStatus[EnclaveInfo]) -> None:
                await sup.run(task_status=task_status)  # returns once cleaned up
                nursery.cancel_scope.cancel()

            info = await nursery.start(supervise)
            report({"ok": True, "info": info.to_record()})

    try:
        trio.run(amain)
    except NitroCliError as exc:
        report({"ok": False, "code": exc.code, "message": exc.message})
        return exc.exit_code
    except BaseExceptionGroup as eg:
        errs = [e for e in _flatten(eg) if isinstance(e, NitroCliError)]
        if not errs:
            report({"ok": False, "code": "E36", "message": f"Enclave boot failed: {eg!r}"})
            raise
        report({"ok": False, "code": errs[0].code, "message": errs[0].message})
        return errs[0].exit_code
    except BaseException as exc:
        report({"ok": False, "code": "E36", "message": f"Enclave boot failed: {exc!r}"})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
