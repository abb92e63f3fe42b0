"""Warm start: a pre-imported zygote per bootstrap digest that forks sandboxed enclaves.

Theory of operation. A fresh interpreter importing trio, onnxruntime, numpy, msgpack and
cryptography costs ~400 ms here; forking a process that already imported them costs a few ms
(``reference/perf-baseline.md`` §2.7). :class:`ZygotePool` (owned by a runtime's nursery) keeps
one zygote process per bootstrap digest (the image's PCR1, which measures the bootstrap
ramdisk):

* the pool unpacks the image into ``<state>/zygotes/<PCR1 prefix>/`` and checks the tree with
  ``runtime.eif.verify_unpacked`` (the same check as every enclave start), then starts
  ``python -P runtime/zygote.py`` with ``PYTHONPATH=<that bootstrap>:<site-packages>``;
* the zygote imports the third-party stack and the enclave-side packages **from that verified
  bootstrap** (so the code objects it holds are the measured bytes), starts no thread, loop or
  session (OpenBLAS is limited to one thread; the thread count is checked), then serves fork
  requests on a SEQPACKET Unix socket: JSON + fds (fabric, NSM, init parameters, console);
* per request it runs :func:`runtime.sandbox.spawn` (same namespaces, mounts, Landlock, seccomp
  and limits as the fresh path) and, in the sandboxed grandchild, replaces the environment,
  points ``sys.path`` at the enclave's own verified bootstrap, and calls
  ``runtime.enclave_init.main()`` in-process. The reply carries the pids, the layer report and
  the status pipe.

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
from typing import Any

import structlog
import trio

from runtime import sandbox
from runtime._unixsock import short_path
from runtime.supervisor import ChildLaunch

__all__ = ["ZygotePool"]


#: The zygote process's script and the host sandbox package it loads by path.
_ZYGOTE_MAIN = str(Path(__file__).resolve().with_name("_zygote_main.py"))
_SANDBOX_DIR = str(Path(sandbox.__file__).resolve().parent)


class _Zygote:
    def __init__(self, proc: trio.Process, sock_path: str, bootstrap: str) -> None:
        self.proc = proc
        self.sock_path = sock_path
        self.bootstrap = bootstrap
        self.lock = trio.Lock()


class ZygotePool:
    """Zygotes keyed by bootstrap digest (PCR1), started on first use, owned by ``nursery``'s
    owner (closed by :meth:`aclose`)."""

    kind = "zygote"

    def __init__(self, state: Any, nursery: trio.Nursery) -> None:
        self.state = state
        self._nursery = nursery
        self._zygotes: dict[str, _Zygote] = {}
        #: time the zygote spent on the last fork request, and whether a spare served it
        self.last_fork_ms = 0.0
        self.last_used_spare = False
        self._start_lock = trio.Lock()
        self.dir = state.path / "zygotes"

    async def _get(self, launch: ChildLaunch) -> _Zygote:
        key = launch.pcr1[:32] or "unmeasured"
        async with self._start_lock:
            z = self._zygotes.get(key)
            if z is not None and z.proc.returncode is None:
                return z
            z = await self._start(key, launch)
            self._zygotes[key] = z
            return z

    @staticmethod
    def _sweep_dead_zygote_cgroups() -> None:
        """Remove empty spare cgroups of zygotes that died without cleaning up (SIGKILL)."""
        for cg in sandbox.CGROUP_MEMORY_ROOT.glob("z*-*"):
            pid_text = cg.name[1:].partition("-")[0]
            if not pid_text.isdigit() or os.path.exists(f"/proc/{pid_text}"):
                continue
            sandbox.remove_cgroup(str(cg))  # fails harmlessly while tasks remain

    async def _start(self, key: str, launch: ChildLaunch) -> _Zygote:
        # launch.bootstrap_dir was verified against the EIF right before this call, and stays
        # in the runtime's image cache (read-only) for the runtime's lifetime.
        bootstrap = launch.bootstrap_dir
        self.dir.mkdir(mode=0o700, exist_ok=True)
        await trio.to_thread.run_sync(self._sweep_dead_zygote_cgroups)
        # unique per runtime: two runtimes on one state dir must not share a zygote socket
        sock_path = str(self.dir / f"{key[:16]}-{os.getpid()}-{id(self):x}.sock")
        env = {
            "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin",
            "PYTHONPATH": launch.env.get("PYTHONPATH", ""),
            "OPENBLAS_NUM_THREADS": "1",  # no BLAS thread pool in the zygote (fork safety)
            # The zygote runs as real root: it must never write .pyc files into the verified
            # bootstrap tree (verification would then rightly refuse the tree).
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
        with trio.fail_after(60):
            while b"\n" not in buf:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise OSError("zygote exited during start-up")
                buf += chunk
        hello = json.loads(buf.split(b"\n", 1)[0])
        structlog.get_logger("runtime.zygote").info(
            "zygote_ready", digest=key, pid=proc.pid, threads=hello.get("threads")
        )
        return _Zygote(proc, sock_path, bootstrap)

    async def spawn(self, launch: ChildLaunch) -> sandbox.Spawned:
        z = await self._get(launch)
        s = launch.sandbox_spec
        fds = [s.fds[3], s.fds[4], s.fds[5]]
        if s.console_fd is not None:
            fds.append(s.console_fd)
        req = {
            "sandbox": {
                "enclave_id": s.enclave_id,
                "cpu_ids": list(s.cpu_ids),
                "memory_mib": s.memory_mib,
                "image_root": s.image_root,
                "strict": s.strict,
                "cwd": s.cwd,
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
                if launch.on_request_sent is not None:
                    launch.on_request_sent()
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
            attached=bool(reply.get("attached", False)),
            timing={
                "zygote_request": float(reply.get("t_request", 0.0)),
                **{str(k): float(v) for k, v in dict(reply.get("timing") or {}).items()},
            },
        )

    def reap(self, spawned: sandbox.Spawned) -> None:
        """The zygote reaps its own children."""

    async def aclose(self) -> None:
        for z in list(self._zygotes.values()):
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
            for cg in sandbox.CGROUP_MEMORY_ROOT.glob(f"z{z.proc.pid}-*"):
                await trio.to_thread.run_sync(
                    functools.partial(sandbox.remove_cgroup, str(cg), wait_s=2.0)
                )
        self._zygotes.clear()


def _array_fds(fds: list[int]) -> bytes:
    return array.array("i", fds).tobytes()
