"""Warm start: a pre-imported zygote per bootstrap digest that forks sandboxed enclaves.

Theory of operation. A fresh interpreter importing trio, onnxruntime, numpy, msgpack and
cryptography costs ~400 ms here; forking a process that already imported them costs a few ms
(``reference/perf-baseline.md`` §2.7). :class:`ZygotePool` (owned by a runtime's nursery) keeps
one zygote process per bootstrap digest (the image's PCR1, which measures the bootstrap
ramdisk):

* the pool extracts the zygote's **own** copy of the bootstrap (only the bootstrap ramdisk, which
  PCR1 measures) from the parsed, CRC- and measurement-checked image into
  ``<state>/zygotes/<PCR1 prefix>-<pool>-<n>/bootstrap``, checks it byte for byte against the
  image (``verify_tree``, plus the interpreter/dependency identity), then starts
  ``python -P runtime/_zygote_main.py`` with ``PYTHONPATH=<that copy>:<site-packages>``. The
  copy belongs to the zygote (removed with it), never to an enclave: the enclave it was
  started for may end, and its tree go, while the zygote keeps serving other images with the
  same bootstrap;
* the zygote imports the third-party stack and the enclave-side packages **from that verified
  bootstrap** (so the code objects it holds are the measured bytes), starts no thread, loop or
  session (OpenBLAS is limited to one thread; the thread count is checked), then serves fork
  requests on a SEQPACKET Unix socket: JSON + fds (fabric, NSM, init parameters, console);
* per request it runs :func:`runtime.sandbox.spawn` (same namespaces, mounts, Landlock, seccomp
  and limits as the fresh path) and, in the sandboxed grandchild, replaces the environment,
  points ``sys.path`` *and every pre-imported bootstrap module* (``__path__``, ``__file__``,
  spec, loader) at the enclave's own verified bootstrap, the only one mounted in its sandbox
  (so lazy imports such as ``models.__main__`` and package data resolve there), and calls
  ``runtime.enclave_init.main()`` in-process. The reply carries the pids, the layer report and
  the status pipe. (Start-up cost: the zygote records its bootstrap modules once, so the child
  rebases only those, not every module of numpy/onnxruntime; a pre-forked spare pre-faults the
  copy-on-write pages that rebase writes before its claim.)

What is trusted: the zygote's host-side loop and the sandbox code (loaded by file path from the
runtime's own tree under a private module name, like the supervisor itself), the interpreter and
site-packages (as on the fresh path: the image pins their identity, not their bytes). What is
measured: every enclave-side module the app can run, in both paths. A zygote is never shared
between bootstrap digests, and an enclave's own tree is verified before each start.
"""

from __future__ import annotations

import array
import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from runtime import sandbox
from runtime._unixsock import short_path
from runtime.spawners import ChildLaunch, SpawnObserver, SpawnPath, site_packages

if TYPE_CHECKING:
    from runtime.eif import EifFile
    from runtime.state import StateDir

__all__ = ["ZygotePool"]


#: The zygote process's script and the host sandbox package it loads by path.
_ZYGOTE_MAIN = str(Path(__file__).resolve().with_name("_zygote_main.py"))
_SANDBOX_DIR = str(Path(sandbox.__file__).resolve().parent)


class _Zygote:
    def __init__(self, proc: trio.Process, sock_path: str, tree: Path, bootstrap: str) -> None:
        self.proc = proc
        self.sock_path = sock_path
        #: the zygote's own verified bootstrap copy (``tree/bootstrap``), removed with it
        self.tree = tree
        self.bootstrap = bootstrap
        self.lock = trio.Lock()


def _extract_bootstrap(eif: EifFile | None, pcr1: str, dest: Path) -> Path:
    """Write ``eif``'s bootstrap ramdisk under ``dest`` and check it byte for byte against the
    image (and the interpreter/dependency identity the image measured); returns the bootstrap
    directory. ``eif`` is the parsed image (CRC and measurements checked by ``read_eif``).

    Raises:
        EifFormatError (E35), ImageTamperedError (E36), EifFileError (E19): from the image layer.
        OSError: no parsed image, or its PCR1 is not the zygote's digest.
    """
    from runtime.image._unpack import BOOTSTRAP_DIR, extract, verify_tree
    from runtime.image._unpacked import our_ramdisks, verify_environment

    if eif is None:
        raise OSError("no parsed image to take the zygote's bootstrap from")
    if eif.measurements.get("PCR1") != pcr1:
        raise OSError("the image's PCR1 is not the zygote's bootstrap digest")
    ramdisks = {BOOTSTRAP_DIR: our_ramdisks(eif)[BOOTSTRAP_DIR]}
    verify_environment(eif)
    extract(ramdisks, dest)
    verify_tree(ramdisks, dest)
    return dest / BOOTSTRAP_DIR


def _remove_tree(tree: Path) -> None:
    from runtime.eif import remove_unpacked

    with contextlib.suppress(OSError):
        remove_unpacked(tree)


class ZygotePool:
    """Zygotes keyed by bootstrap digest (PCR1), started on first use, owned by ``nursery``'s
    owner (closed by :meth:`aclose`)."""

    kind = SpawnPath.ZYGOTE

    def __init__(self, state: StateDir, nursery: trio.Nursery) -> None:
        self.state = state
        self._nursery = nursery
        #: by full PCR1 hex (a zygote is never shared between bootstrap digests)
        self._zygotes: dict[str, _Zygote] = {}
        self._started = 0
        #: time the zygote spent on the last fork request, and whether a spare served it
        self.last_fork_ms = 0.0
        self.last_used_spare = False
        self._start_lock = trio.Lock()
        self.dir = state.path / "zygotes"

    async def _get(self, launch: ChildLaunch) -> _Zygote:
        key = launch.pcr1
        if not key:
            raise OSError("the image has no PCR1: no zygote for an unmeasured bootstrap")
        async with self._start_lock:
            z = self._zygotes.get(key)
            if z is not None and z.proc.returncode is None:
                return z
            if z is not None:  # died: its bootstrap copy goes with it
                del self._zygotes[key]
                await self._close_one(z)
            z = await self._start(key, launch)
            self._zygotes[key] = z
            return z

    def _sweep_dead_zygote_cgroups(self) -> None:
        """Remove empty spare cgroups of zygotes that died without cleaning up (SIGKILL), and
        the bootstrap copies of pools whose runtime process is gone."""
        for root in (sandbox.CGROUP_MEMORY_ROOT, sandbox.CGROUP_PIDS_ROOT):
            for cg in root.glob("z*-*"):
                pid_text = cg.name[1:].partition("-")[0]
                if not pid_text.isdigit() or os.path.exists(f"/proc/{pid_text}"):
                    continue
                sandbox.remove_cgroup(str(cg))  # fails harmlessly while tasks remain
        for entry in self.dir.iterdir():  # <PCR1 prefix>-<runtime pid>-<pool>-<n>[.sock]
            pid_text = entry.name.split("-")[1] if entry.name.count("-") >= 3 else ""
            if pid_text.isdigit() and not os.path.exists(f"/proc/{pid_text}"):
                if entry.is_dir():
                    _remove_tree(entry)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()

    async def _start(self, key: str, launch: ChildLaunch) -> _Zygote:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        await trio.to_thread.run_sync(self._sweep_dead_zygote_cgroups)
        self._started += 1
        # unique per runtime: two runtimes on one state dir must not share a zygote's socket
        # or bootstrap copy (key[:16]: 64 bits of PCR1, only to tell the files apart)
        name = f"{key[:16]}-{os.getpid()}-{id(self):x}-{self._started}"
        tree = self.dir / name
        try:
            # The zygote's own copy, from the parsed image (not the enclave's tree, which
            # ends with the enclave): the code every forked enclave starts with is these
            # verified bytes, identical for every image with this PCR1.
            boot = await trio.to_thread.run_sync(_extract_bootstrap, launch.eif, key, tree)
            return await self._spawn_zygote(tree, str(boot), name)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove_tree, tree)
            raise

    async def _spawn_zygote(self, tree: Path, bootstrap: str, name: str) -> _Zygote:
        sock_path = str(self.dir / f"{name}.sock")
        env = {
            "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin",
            "PYTHONPATH": ":".join([bootstrap, *site_packages()]),
            "OPENBLAS_NUM_THREADS": "1",  # no BLAS thread pool in the zygote (fork safety)
            # The zygote runs as real root: it must never write .pyc files into the verified
            # bootstrap tree.
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        zygote_py = _ZYGOTE_MAIN
        sandbox_path = _SANDBOX_DIR
        proc = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-P",
                "-B",
                zygote_py,
                "--serve",
                sock_path,
                "--bootstrap",
                bootstrap,
                "--sandbox",
                sandbox_path,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        buf = b""
        try:
            with trio.fail_after(60):  # imports of the whole stack: well under 2 s here
                while b"\n" not in buf:
                    chunk = await proc.stdout.receive_some(4096)
                    if not chunk:
                        raise OSError("zygote exited during start-up")
                    buf += chunk
            hello = json.loads(buf.split(b"\n", 1)[0])
        except BaseException:
            with trio.CancelScope(shield=True):
                with contextlib.suppress(OSError):
                    proc.kill()
                await proc.wait()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sock_path)
            raise
        structlog.get_logger("runtime.zygote").info(
            "zygote_ready",
            digest=name.partition("-")[0],
            pid=proc.pid,
            threads=hello.get("threads"),
        )
        return _Zygote(proc, sock_path, tree, bootstrap)

    async def spawn(self, launch: ChildLaunch, observer: SpawnObserver) -> sandbox.Spawned:
        """Fork the enclave from the zygote of its bootstrap (started on first use)."""
        z = await self._get(launch)
        s = launch.sandbox_spec
        fds = [s.fds[3], s.fds[4], s.fds[5]]
        if s.console_fd is not None:
            fds.append(s.console_fd)
        req: sandbox.ForkRequest = {
            "sandbox": {
                "enclave_id": s.enclave_id,
                "cpu_ids": list(s.cpu_ids),
                "memory_mib": s.memory_mib,
                "image_root": s.image_root,
                "strict": s.strict,
                "cwd": s.cwd,
                "outside_uid": s.outside_uid,
                "max_tasks": s.max_tasks,
            },
            "env": launch.env,
            "bootstrap_dir": launch.bootstrap_dir,
            "console": s.console_fd is not None,
            "attach_cgroup": False,  # the supervisor attaches while the enclave boots
        }
        async with z.lock:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with sock:
                with short_path(z.sock_path) as connectable:
                    await sock.connect(connectable)
                await sock.sendmsg(
                    [json.dumps(req).encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _array_fds(fds))],
                )
                observer.request_sent()
                msg, ancdata, _flags, _addr = await sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
        got: list[int] = []
        for level, typ, data in ancdata:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[: len(data) - (len(data) % a.itemsize)])
                got.extend(a)
        reply: dict[str, Any] = json.loads(msg) if msg else {"ok": False, "error": "zygote closed"}
        if not reply.get("ok") or not got:
            for fd in got:
                os.close(fd)
            raise OSError(f"zygote spawn failed: {reply.get('error')}")
        for fd in got[1:]:
            os.close(fd)
        self.last_fork_ms = float(reply.get("zygote_ms", 0.0))
        self.last_used_spare = bool(reply.get("spare"))
        return sandbox.Spawned(
            middle_pid=int(reply["middle_pid"]),
            app_pid=int(reply["app_pid"]),
            status_fd=got[0],
            layers=dict(reply["layers"]),
            cgroup=reply.get("cgroup"),
            pids_cgroup=reply.get("pids_cgroup"),
            attached=bool(reply.get("attached", False)),
            timing={
                "zygote_request": float(reply.get("t_request", 0.0)),
                **{str(k): float(v) for k, v in dict(reply.get("timing") or {}).items()},
            },
        )

    def reap(self, spawned: sandbox.Spawned) -> None:
        """The zygote reaps its own children."""

    async def aclose(self) -> None:
        """Stop every zygote (SIGTERM, bounded wait, SIGKILL) and remove what it owned."""
        zygotes, self._zygotes = list(self._zygotes.values()), {}
        for z in zygotes:
            await self._close_one(z)

    @staticmethod
    async def _close_one(z: _Zygote) -> None:
        with contextlib.suppress(OSError):
            z.proc.terminate()
        with trio.move_on_after(3):
            await z.proc.wait()
        if z.proc.returncode is None:
            z.proc.kill()
            await z.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(z.sock_path)
        # A spare pre-forked by this zygote may outlive it only as an empty cgroup
        # (named z<zygote pid>-<n>, never shared with another zygote): sweep those.
        for root in (sandbox.CGROUP_MEMORY_ROOT, sandbox.CGROUP_PIDS_ROOT):
            for cg in root.glob(f"z{z.proc.pid}-*"):
                await trio.to_thread.run_sync(
                    functools.partial(sandbox.remove_cgroup, str(cg), wait_s=2.0)
                )
        await trio.to_thread.run_sync(_remove_tree, z.tree)


def _array_fds(fds: list[int]) -> bytes:
    return array.array("i", fds).tobytes()
