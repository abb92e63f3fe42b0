"""Pre-forked spares: the zygote's fast path.

A spare is an enclave process tree forked ahead of time (relay, then the future app as PID 1 of
a new PID namespace, both already in the spare's cgroups), waiting for its enclave. A claim
hands it the enclave's parameters; it then builds the mounts, enters its user namespace (the
claimer writes the id maps), the network/IPC/UTS namespaces and the rest of the sandbox,
exactly as :func:`~._spawn.spawn`'s child does. Both forks and the cgroup migrations (~10 ms:
a cgroup v1 migration waits for an RCU grace period) are thereby off the start-up path.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import _sys
from ._cgroups import (
    CGROUP_MEMORY_ROOT,
    CGROUP_PIDS_ROOT,
    attach_cgroup,
    mem_layer,
    pids_layer,
    remove_cgroup,
    set_memory_limit,
    set_pids_limit,
)
from ._mounts import mount_point, private_root_then_userns, ro_paths
from ._spawn import handshake, run_app, unshare_rest
from ._spec import ChildMain, ForkRequest, SandboxSpec, Spawned
from ._util import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    describe_exc,
    kill_quietly,
    mark,
)

__all__ = ["Spare", "SpareFactory", "prefork_spare", "claim_spare", "discard_spare"]


def _spare_cgroup(root: Path, name: str) -> str | None:
    """A spare's cgroup (``z<zygote pid>-<n>``: never shared with another zygote)."""
    try:
        (root / name).mkdir(exist_ok=True)
        return str(root / name)
    except OSError:
        return None


#: Builds the enclave's sandbox spec and child entry from a claim request and its fds.
SpareFactory = Callable[[ForkRequest, list[int]], tuple[SandboxSpec, ChildMain]]


@dataclass
class Spare:
    """An enclave process tree forked ahead of time, waiting for its enclave.

    ``pid`` is the relay (in the parent's namespaces, in the memory cgroup); ``app_pid`` its
    child, already PID 1 of a new PID namespace and in the cgroup, still real root with no
    other namespace and nothing of any enclave. A claim hands it the enclave's parameters;
    it then builds the mounts, enters its user namespace (the claimer writes the id maps),
    the network/IPC/UTS namespaces and the rest of the sandbox, exactly as :func:`spawn`'s
    child does. Both forks and the cgroup migration (~10 ms: a cgroup v1 migration waits for
    an RCU grace period) are thereby off the start-up path.
    """

    pid: int
    app_pid: int
    ctl: socket.socket
    status_r: int
    cgroup: str | None
    pidns: str
    #: the spare's pids cgroup (its limit is written at the claim)
    pids_cgroup: str | None = None


def prefork_spare(
    name: str, factory: SpareFactory, *, prepare: Callable[[], None] | None = None
) -> Spare:
    """Fork a spare (from a single-threaded loop such as the zygote's). Raises OSError.

    ``prepare`` (optional) runs in the future app while it waits for its claim (errors
    ignored): work such as pre-faulting the copy-on-write pages its child entry will write,
    taken off the start-up path. It must not depend on the enclave (not yet known)."""
    cgroup = _spare_cgroup(CGROUP_MEMORY_ROOT, name) if mem_layer() == "cgroup" else None
    pids_cgroup = _spare_cgroup(CGROUP_PIDS_ROOT, name) if pids_layer() == "cgroup" else None
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the spare relay
        code = 127
        try:
            parent_end.close()
            code = _spare_relay(child_end, cgroup, pids_cgroup, factory, prepare)
        finally:
            os._exit(code)
    child_end.close()
    try:
        if cgroup:
            attach_cgroup(cgroup, pid)
        if pids_cgroup:
            attach_cgroup(pids_cgroup, pid)
        parent_end.send(b"A")  # attached: the relay may fork the app (which inherits it)
        msg, fds, _flags, _addr = socket.recv_fds(parent_end, 4096, 1)
        if not msg or len(fds) != 1:
            raise OSError("spare failed to start")
        report = json.loads(msg)
    except BaseException:
        parent_end.close()
        kill_quietly(pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        remove_cgroup(cgroup, wait_s=2.0)
        remove_cgroup(pids_cgroup, wait_s=2.0)
        raise
    return Spare(
        pid=pid,
        app_pid=int(report["app_pid"]),
        ctl=parent_end,
        status_r=fds[0],
        cgroup=cgroup,
        pidns=str(report["pidns"]),
        pids_cgroup=pids_cgroup,
    )


def claim_spare(spare: Spare, spec: SandboxSpec, request: bytes, fds: list[int]) -> Spawned:
    """Hand an enclave to a spare; returns like :func:`spawn` (cgroup already joined).

    ``request`` and ``fds`` are what the spare's factory receives. Raises OSError; the spare
    is consumed either way."""
    os.makedirs(mount_point(spec), mode=0o700, exist_ok=True)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        socket.send_fds(spare.ctl, [request], [sync_w, go_r, *fds])
    except OSError:
        for fd in (sync_r, go_w, spare.status_r):
            os.close(fd)
        kill_quietly(spare.pid)
        kill_quietly(spare.app_pid)
        raise
    finally:
        for fd in (sync_w, go_r):
            os.close(fd)
        spare.ctl.close()
    return handshake(
        spec,
        spare.pid,
        sync_r,
        go_w,
        spare.status_r,
        spare.cgroup,
        spare.pids_cgroup,
        attach=False,
        attached=True,
        userns_pid=spare.app_pid,
        app_pid=spare.app_pid,
    )


def discard_spare(spare: Spare) -> None:
    """Kill an unclaimed spare and remove its cgroup (reaps the relay)."""
    spare.ctl.close()
    os.close(spare.status_r)
    kill_quietly(spare.app_pid)
    kill_quietly(spare.pid)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(spare.pid, 0)
    remove_cgroup(spare.cgroup, wait_s=2.0)
    remove_cgroup(spare.pids_cgroup, wait_s=2.0)


def _spare_relay(
    ctl: socket.socket,
    cgroup: str | None,
    pids_cgroup: str | None,
    factory: SpareFactory,
    prepare: Callable[[], None] | None = None,
) -> int:
    """In the spare relay: once in the cgroup, fork the future app into a new PID namespace,
    report it, then relay its wait status (as ``_middle`` does)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    os.setsid()
    _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
    if ctl.recv(1) != b"A":
        return 0
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    if _sys.libc.unshare(ctypes.c_int(CLONE_NEWPID)) == 0:
        pidns = "enforced"
    else:
        pidns = f"missing: unshare: {os.strerror(ctypes.get_errno())}"
    app = os.fork()
    if app == 0:
        code = 127
        try:
            os.close(status_r)
            os.close(status_w)
            code = _spare_app(ctl, cgroup, pids_cgroup, factory, pidns, prepare)
        finally:
            os._exit(code)
    socket.send_fds(ctl, [json.dumps({"app_pid": app, "pidns": pidns}).encode()], [status_r])
    os.close(status_r)
    ctl.close()  # from now on the claim goes to the app only
    while True:
        try:
            _, status = os.waitpid(app, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            status = 0
            break
    with contextlib.suppress(OSError):
        os.write(status_w, struct.pack("<i", status))
    return 0


def _spare_app(
    ctl: socket.socket,
    cgroup: str | None,
    pids_cgroup: str | None,
    factory: SpareFactory,
    pidns: str,
    prepare: Callable[[], None] | None = None,
) -> int:
    """In the future app (PID 1 of its PID namespace, still real root): run ``prepare``,
    wait for the claim, then build the sandbox like ``_middle`` + ``_app`` (mounts before
    the user namespace)."""
    _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
    if prepare is not None:
        with contextlib.suppress(Exception):
            prepare()
    msg, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 20, 16)
    ctl.close()
    if not msg or len(fds) < 2:
        return 0  # discarded
    sync_w, go_r = fds[0], fds[1]
    try:
        spec, run_child = factory(json.loads(msg), fds[2:])
        mark("relay_start")
        if cgroup:
            set_memory_limit(cgroup, spec.memory_mib)
        if pids_cgroup:
            set_pids_limit(pids_cgroup, spec.max_tasks)
        layers = private_root_then_userns(spec, ro_paths(spec), sync_w, go_r)
        layers["pidns"] = pidns
        unshare_rest(
            spec,
            layers,
            sync_w,
            (("netns", CLONE_NEWNET), ("ipcns", CLONE_NEWIPC), ("utsns", CLONE_NEWUTS)),
        )
        mark("app_forked")
        run_app(spec, cgroup, pids_cgroup, sync_w, layers, run_child)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            os.write(sync_w, f"F spare: {describe_exc(exc)}\n".encode())
    return 127
