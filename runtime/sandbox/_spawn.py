"""Spawning a sandboxed enclave: the fork/handshake protocol and the sandbox's last steps.

Theory of operation. :func:`spawn` forks twice (NEWPID needs the extra fork)::

    parent (real root: the supervisor, or a zygote)
      └─ middle     prctl(PDEATHSIG) · joins the pids cgroup · mounts (_mounts) ·
         │          unshare(NEWUSER) → parent maps ns-root to the enclave's own uid ·
         │          setresuid(0) · unshare(NEWPID|NET|IPC|UTS) · fork · relays the app's wait
         │          status through a pipe, then exits
         └─ app     PID 1 of the new pid ns · hostname · loopback up · CPU affinity ·
                    RLIMIT_CORE 0 (RLIMIT_AS / RLIMIT_NPROC without cgroups) · fds · Landlock ·
                    no_new_privs · seccomp · then ``run_child()``

The set-up protocol is one line per message on a pipe from the child: ``U`` (write the id
maps, then answer ``G``), ``P <pid>`` (the app's pid), ``T``/``L`` (timeline, layer report),
``X`` (about to run the app) or ``F <why>`` (failed). The parent only ever blocks for a few
milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import resource
import signal
import socket
import struct
from collections.abc import Sequence
from typing import NoReturn

from . import _sys, landlock, seccomp
from ._cgroups import (
    attach_cgroup,
    join_cgroup,
    make_memory_cgroup,
    make_pids_cgroup,
    remove_cgroup,
)
from ._mounts import mount_point, private_root_then_userns, ro_paths, write_id_maps
from ._spec import ChildMain, SandboxSpec, Spawned
from ._util import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    DEV_NULL,
    TIMING,
    LineReader,
    describe_exc,
    kill_quietly,
    mark,
)

__all__ = ["spawn", "handshake", "unshare_rest", "run_app"]

_SIOCSIFFLAGS, _IFF_UP, _IFF_LOOPBACK, _IFF_RUNNING = 0x8914, 0x1, 0x8, 0x40


def spawn(spec: SandboxSpec, run_child: ChildMain, *, attach: bool = True) -> Spawned:
    """Fork the sandboxed enclave process; returns once it is about to run ``run_child``.

    With ``attach=False`` the caller must :func:`attach_cgroup` the returned ``app_pid``
    before letting the app run (the supervisor does it while the enclave boots, and only
    echoes the heartbeat afterwards).

    Raises:
        OSError: the fork or the handshake failed, or (strict) a layer is missing; nothing is
            left running in that case.
    """
    bind_sources = ro_paths(spec)
    os.makedirs(mount_point(spec), mode=0o700, exist_ok=True)
    cgroup = make_memory_cgroup(spec.enclave_id, spec.memory_mib)
    pids_cgroup = make_pids_cgroup(spec.enclave_id, spec.max_tasks)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(sync_r)
            os.close(go_w)
            os.close(status_r)
            _middle(spec, bind_sources, cgroup, pids_cgroup, sync_w, go_r, status_w, run_child)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                os.write(sync_w, f"F middle: {describe_exc(exc)}\n".encode())
        os._exit(127)
    os.close(sync_w)
    os.close(go_r)
    os.close(status_w)
    return handshake(
        spec,
        pid,
        sync_r,
        go_w,
        status_r,
        cgroup,
        pids_cgroup,
        attach=attach,
        attached=attach,
    )


def handshake(
    spec: SandboxSpec,
    pid: int,
    sync_r: int,
    go_w: int,
    status_r: int,
    cgroup: str | None,
    pids_cgroup: str | None,
    *,
    attach: bool,
    attached: bool,
    userns_pid: int | None = None,
    app_pid: int = 0,
) -> Spawned:
    """Parent side of the set-up protocol (lines on ``sync_r``): write the id maps on ``U``
    (for ``userns_pid``, default ``pid``), collect the app pid (``P``, unless given) and the
    layer report (``L``), stop once ``X`` and the app pid are in; fail on ``F``/EOF."""
    layers: dict[str, str] = {}
    timing: dict[str, float] = {}
    lines = LineReader(sync_r)
    # ``X`` (from the app) and ``P`` (from the middle process, right after its fork) race: a
    # middle descheduled after the fork writes ``P`` after the app's ``X``. Stop only once
    # both arrived: an app pid of 0 would make the caller's attach_cgroup move *itself*.
    done = False
    try:
        while True:
            line = lines.next()
            if not line:
                raise OSError("enclave process died during sandbox setup")
            tag, _, rest = line.decode(errors="replace").rstrip("\n").partition(" ")
            if tag == "U":
                if rest == "ok":
                    write_id_maps(userns_pid or pid, spec.outside_uid)
                if cgroup and attach:
                    attach_cgroup(cgroup, pid)
                os.write(go_w, b"G")
            elif tag == "P":
                app_pid = int(rest)
                if app_pid <= 0:
                    raise OSError(f"sandbox setup reported app pid {rest!r}")
                if done:
                    break
            elif tag == "L":
                layers = json.loads(rest)
            elif tag == "T":
                timing = {str(k): float(v) for k, v in json.loads(rest).items()}
            elif tag == "X":
                done = True
                if app_pid:
                    break
            elif tag == "F":
                raise OSError(f"sandbox setup failed: {rest}")
    except BaseException:
        kill_quietly(pid)
        if app_pid:
            kill_quietly(app_pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(status_r)
        remove_cgroup(cgroup, wait_s=2.0)
        remove_cgroup(pids_cgroup, wait_s=2.0)
        raise
    finally:
        os.close(sync_r)
        os.close(go_w)
    layers["memory"] = (
        f"enforced (cgroup v1 memory, {spec.memory_mib} MiB)"
        if cgroup
        else f"enforced (RLIMIT_AS, {spec.memory_mib} MiB)"
    )
    return Spawned(
        middle_pid=pid,
        app_pid=app_pid,
        status_fd=status_r,
        layers=layers,
        cgroup=cgroup,
        attached=attached or cgroup is None,
        timing=timing,
        pids_cgroup=pids_cgroup,
    )


def unshare_rest(
    spec: SandboxSpec,
    layers: dict[str, str],
    sync_w: int,
    which: Sequence[tuple[str, int]],
) -> None:  # pragma: no cover - runs in the child
    """The remaining namespaces; with ``strict`` stop here if any layer is missing."""
    for name, flag in which:
        if _sys.libc.unshare(ctypes.c_int(flag)) == 0:
            layers[name] = "enforced"
        else:
            layers[name] = f"missing: unshare: {os.strerror(ctypes.get_errno())}"
    if spec.strict and any(v.startswith("missing") for v in layers.values()):
        os.write(sync_w, f"F strict isolation: {json.dumps(layers)}\n".encode())
        os._exit(125)


def _middle(
    spec: SandboxSpec,
    bind_sources: list[str],
    cgroup: str | None,
    pids_cgroup: str | None,
    sync_w: int,
    go_r: int,
    status_w: int,
    run_child: ChildMain,
) -> NoReturn:  # pragma: no cover - runs in the child
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    os.setsid()
    _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
    mark("relay_start")
    # Still real root: join the pids cgroup, so the app and everything it starts count.
    join_cgroup(pids_cgroup)
    layers = private_root_then_userns(spec, bind_sources, sync_w, go_r)
    unshare_rest(
        spec,
        layers,
        sync_w,
        (
            ("pidns", CLONE_NEWPID),
            ("netns", CLONE_NEWNET),
            ("ipcns", CLONE_NEWIPC),
            ("utsns", CLONE_NEWUTS),
        ),
    )
    mark("app_fork")
    gpid = os.fork()
    if gpid == 0:
        try:
            os.close(status_w)
            run_app(spec, cgroup, pids_cgroup, sync_w, layers, run_child)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                os.write(sync_w, f"F app: {describe_exc(exc)}\n".encode())
        os._exit(127)
    os.write(sync_w, f"P {gpid}\n".encode())
    os.close(sync_w)
    # Relay: the app's wait status, then exit. SIGKILL of this process kills the app too
    # (its PDEATHSIG), and the app being PID 1 takes every other enclave process with it.
    while True:
        try:
            _, status = os.waitpid(gpid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            status = 0
            break
    with contextlib.suppress(OSError):
        os.write(status_w, struct.pack("<i", status))
    os._exit(0)


def _lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH22x", b"lo", _IFF_UP | _IFF_LOOPBACK | _IFF_RUNNING)
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, ifr)


def _place_fds(spec: SandboxSpec, keep: int) -> int:
    """dup the wanted fds into place, close the rest; returns the new number of ``keep``."""
    null = DEV_NULL[0] if DEV_NULL else os.open("/dev/null", os.O_RDWR)
    out = spec.console_fd if spec.console_fd is not None else null
    wanted = {0: null, 1: out, 2: out, **dict(spec.fds)}
    # Move sources out of the way first, so placing one cannot clobber another.
    staged = {tgt: os.dup(src) for tgt, src in wanted.items()}
    keep2 = os.dup(keep)
    for tgt, src in staged.items():
        os.dup2(src, tgt, inheritable=True)
    high = max(wanted) + 1
    keep_final = os.dup2(keep2, high + 1, inheritable=False)
    os.closerange(high, keep_final)
    os.closerange(keep_final + 1, 65536)
    return keep_final


def run_app(
    spec: SandboxSpec,
    cgroup: str | None,
    pids_cgroup: str | None,
    sync_w: int,
    layers: dict[str, str],
    run_child: ChildMain,
) -> NoReturn:  # pragma: no cover - runs in the child
    _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
    if layers.get("utsns") == "enforced":
        with contextlib.suppress(OSError):
            socket.sethostname("enclave")
    if layers.get("netns") == "enforced":
        try:
            _lo_up()
            layers["netns"] = "enforced (loopback only)"
        except OSError as exc:
            layers["netns"] = f"enforced (loopback down: {exc.strerror})"
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not cgroup:
        lim = spec.memory_mib * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    if pids_cgroup:
        layers["pids"] = f"enforced (pids cgroup, {spec.max_tasks} tasks)"
    else:
        # Counted per real uid: the enclave's own (its relay included, hence + 1).
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (spec.max_tasks + 1, spec.max_tasks + 1))
            layers["pids"] = (
                f"enforced (RLIMIT_NPROC on uid {spec.outside_uid}, {spec.max_tasks} tasks)"
            )
        except (OSError, ValueError) as exc:
            layers["pids"] = f"missing: RLIMIT_NPROC: {exc}"
    try:
        os.sched_setaffinity(0, spec.cpu_ids)
        layers["cpus"] = f"enforced (affinity {list(spec.cpu_ids)})"
    except OSError as exc:
        layers["cpus"] = f"missing: sched_setaffinity: {exc.strerror}"
    mark("app_forked")
    sync_w = _place_fds(spec, sync_w)
    with contextlib.suppress(OSError):
        os.chdir(spec.cwd)
    try:
        abi = landlock.restrict(
            read_only=[*ro_paths(spec), "/dev/urandom", "/dev/random", "/dev/zero"],
            writable=(["/tmp"] if layers["mountns"].startswith("enforced") else []) + ["/dev/null"],
        )
        layers["landlock"] = f"enforced (ABI {abi})"
    except OSError as exc:
        layers["landlock"] = f"missing: {exc.strerror or exc}"
    _sys.prctl(_sys.PR_SET_DUMPABLE, 0)
    layers["nodump"] = "enforced (not dumpable, RLIMIT_CORE 0)"
    try:
        seccomp.install_filter()
        layers["seccomp"] = (
            f"enforced ({len(seccomp.DENIED)} syscalls denied; sockets: "
            f"{', '.join(seccomp.ALLOWED_FAMILIES)} only)"
        )
    except OSError as exc:
        layers["seccomp"] = f"missing: {exc.strerror or exc}"
    if spec.strict and any(v.startswith("missing") for v in layers.values()):
        os.write(sync_w, f"F strict isolation: {json.dumps(layers)}\n".encode())
        os._exit(125)
    mark("sandboxed")
    os.write(sync_w, f"T {json.dumps(TIMING)}\n".encode())
    os.write(sync_w, f"L {json.dumps(layers)}\n".encode())
    os.write(sync_w, b"X\n")
    os.close(sync_w)
    run_child()
