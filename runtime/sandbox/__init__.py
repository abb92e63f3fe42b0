"""Sandboxed enclave processes: namespaces, a minimal read-only root, Landlock, seccomp, limits.

Theory of operation. :func:`spawn` forks twice (NEWPID needs the extra fork)::

    parent (real root: the supervisor, or a zygote)
      └─ middle     prctl(PDEATHSIG) · unshare(NEWUSER) → parent maps ns-root to 65534 and
         │          puts it in the memory cgroup → setresuid(0) · unshare(NEWPID|NET|NS|IPC|UTS)
         │          · fork · relays the app's wait status through a pipe, then exits
         └─ app     PID 1 of the new pid ns · private mounts: a tmpfs root holding read-only
                    binds of the image, the interpreter and the venv, /usr, a few /dev nodes and
                    its own /proc and /tmp · pivot_root · hostname · loopback up · CPU affinity ·
                    RLIMIT_CORE 0 (RLIMIT_AS without a cgroup) · fds · Landlock · no_new_privs ·
                    seccomp · then ``run_child()`` (exec the interpreter, or run in-process)

Each layer is attempted and reported (:class:`~runtime.records.IsolationReport`); with
``strict=True`` the child refuses to go on when any layer failed, before any app code runs.
The bind sources are opened as ``O_PATH`` fds while still real root and mounted through
``/proc/self/fd/N``, because ns-root (uid 65534 outside) cannot traverse ``/root`` or the 0700
state directory. The parent only ever blocks for a few milliseconds (the handshake).
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
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from . import _sys, landlock, seccomp

__all__ = [
    "SandboxSpec",
    "Spawned",
    "spawn",
    "detect",
    "oom_killed",
    "remove_cgroup",
    "attach_cgroup",
    "Spare",
    "prefork_spare",
    "claim_spare",
    "discard_spare",
    "decode_status",
    "OUTSIDE_UID",
]

#: Outside uid/gid ns-root maps to ("nobody"): enclave files are owned by it, nothing else is.
OUTSIDE_UID = 65534
#: cgroup v1 memory hierarchy root for enclaves.
CGROUP_MEMORY_ROOT = Path("/sys/fs/cgroup/memory/enclave-runtime")
#: Size of the enclave's private /tmp (charged to its memory cgroup).
TMP_SIZE = "16m"

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_MNT_DETACH = 2
_ST_TO_MS = {
    1: _MS_RDONLY,
    2: _MS_NOSUID,
    4: _MS_NODEV,
    8: _MS_NOEXEC,
    1024: _MS_NOATIME,
    2048: _MS_NODIRATIME,
    4096: _MS_RELATIME,
}
_SIOCSIFFLAGS, _IFF_UP, _IFF_LOOPBACK, _IFF_RUNNING = 0x8914, 0x1, 0x8, 0x40
_SYS_PIVOT_ROOT = 155

ChildMain = Callable[[], NoReturn]


@dataclass(frozen=True)
class SandboxSpec:
    """What to build around one enclave."""

    enclave_id: str
    cpu_ids: tuple[int, ...]
    memory_mib: int
    image_root: str
    #: fd number in the child -> fd in the parent (dup'ed into place; everything else closed)
    fds: Mapping[int, int] = field(default_factory=dict)
    #: where stdout/stderr go (debug console pipe); None = /dev/null
    console_fd: int | None = None
    strict: bool = False
    #: extra read-only paths (default: the interpreter, the venv, /usr)
    extra_ro: tuple[str, ...] = ()
    #: the app's working directory inside the sandbox
    cwd: str = "/"


@dataclass
class Spawned:
    """A started enclave process tree."""

    middle_pid: int
    app_pid: int
    #: read end of a pipe: 4 bytes (the app's wait status) then EOF when the app has ended
    status_fd: int
    layers: dict[str, str]
    cgroup: str | None
    #: whether ``app_pid`` is already in ``cgroup`` (else the caller must attach it)
    attached: bool = True
    #: CLOCK_MONOTONIC time of each set-up phase (diagnostics)
    timing: dict[str, float] = field(default_factory=dict)


def _ro_paths(spec: SandboxSpec) -> list[str]:
    paths = [
        spec.image_root,
        sys.base_prefix,
        sys.prefix,
        "/usr",
        "/etc/ld.so.cache",
        *spec.extra_ro,
    ]
    out: list[str] = []
    for p in paths:
        rp = os.path.realpath(p)
        if os.path.exists(rp) and rp not in out:
            out.append(rp)
    return out


def _mem_layer() -> str:
    try:
        CGROUP_MEMORY_ROOT.mkdir(exist_ok=True)
        if os.access(CGROUP_MEMORY_ROOT, os.W_OK):
            return "cgroup"
    except OSError:
        pass
    return "rlimit"


def _make_cgroup(spec: SandboxSpec) -> str | None:
    if _mem_layer() != "cgroup":
        return None
    slot = spec.enclave_id.rpartition("-enc")[2] or spec.enclave_id
    cg = CGROUP_MEMORY_ROOT / slot
    try:
        # Exclusive: slots are unique within a state directory, cgroup names machine-wide. A
        # leftover of a dead supervisor is empty and goes; a live one (another state dir, the
        # same millisecond and 16 random bits) is never shared: this enclave falls back to
        # RLIMIT_AS, which the layer report says.
        try:
            cg.mkdir()
        except FileExistsError:
            cg.rmdir()  # OSError (EBUSY) while tasks remain: the fallback below
            cg.mkdir()
        limit = str(spec.memory_mib * 1024 * 1024)
        (cg / "memory.limit_in_bytes").write_text(limit)
        with contextlib.suppress(OSError):  # absent without swap accounting
            (cg / "memory.memsw.limit_in_bytes").write_text(limit)
        return str(cg)
    except FileExistsError:  # not ours: leave it alone
        return None
    except OSError:
        with contextlib.suppress(OSError):
            cg.rmdir()
        return None


def oom_killed(cgroup: str | None) -> bool:
    """Whether the kernel OOM-killed something in this enclave's cgroup."""
    if not cgroup:
        return False
    try:
        for line in Path(cgroup, "memory.oom_control").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill" and int(v) > 0:
                return True
    except (OSError, ValueError):
        pass
    return False


def remove_cgroup(cgroup: str | None, *, wait_s: float = 0.0) -> bool:
    """Remove an enclave's cgroup; with ``wait_s`` retry while dying tasks keep it busy.
    Returns whether it is gone."""
    if not cgroup:
        return True
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.rmdir(cgroup)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def decode_status(status: int) -> tuple[int | None, int | None]:
    """(exit code, signal) of a wait status."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None


# -- detection -----------------------------------------------------------------------------

_DETECTED: dict[str, str] | None = None


def detect() -> dict[str, str]:
    """Probe what this host offers (cached per process). Values as in IsolationReport."""
    global _DETECTED
    if _DETECTED is not None:
        return dict(_DETECTED)
    out: dict[str, str] = {}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            for bit, flag in enumerate(
                (
                    _CLONE_NEWUSER,
                    _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWUTS,
                )
            ):
                if _sys.libc.unshare(ctypes.c_int(flag)) == 0:
                    code |= 1 << bit
        finally:
            os._exit(code)
    os.close(w)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    bits = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 0
    out["userns"] = "available" if bits & 1 else "missing: unshare(CLONE_NEWUSER) refused"
    ns = "available" if bits & 2 else "missing: unshare of pid/net/mount/ipc/uts refused"
    for k in ("pidns", "netns", "mountns", "ipcns", "utsns"):
        out[k] = ns
    abi = landlock.abi_version()
    out["landlock"] = f"available (ABI {abi})" if abi else "missing: kernel has no Landlock"
    out["seccomp"] = "available" if seccomp.supported() else f"missing: no filter for {_sys.ARCH}"
    out["memory"] = (
        "available (cgroup v1 memory)" if _mem_layer() == "cgroup" else "available (RLIMIT_AS)"
    )
    _DETECTED = out
    return dict(out)


# -- spawn ---------------------------------------------------------------------------------


class _LineReader:
    """Lines from a pipe, read in chunks (the layer report is ~1 KiB: no byte-wise reads)."""

    def __init__(self, fd: int, limit: int = 65536) -> None:
        self.fd = fd
        self.limit = limit
        self.buf = b""

    def next(self) -> bytes:
        """The next line (with its newline), or b"" at EOF; bounded by ``limit``."""
        while b"\n" not in self.buf:
            if len(self.buf) > self.limit:
                raise OSError("sandbox set-up line too long")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"


def attach_cgroup(cgroup: str | None, pid: int) -> None:
    """Move ``pid`` into the enclave's memory cgroup (cgroup v1 migration waits for an RCU
    grace period, ~10 ms: callers overlap it with the enclave's boot and gate the app on it)."""
    if pid <= 0:  # writing 0 would move the calling process itself
        raise ValueError(f"not a process id: {pid}")
    if cgroup:
        Path(cgroup, "cgroup.procs").write_text(str(pid))


def spawn(spec: SandboxSpec, run_child: ChildMain, *, attach: bool = True) -> Spawned:
    """Fork the sandboxed enclave process; returns once it is about to run ``run_child``.

    With ``attach=False`` the caller must :func:`attach_cgroup` the returned ``app_pid``
    before letting the app run (the supervisor does it while the enclave boots, and only
    echoes the heartbeat afterwards).

    Raises:
        OSError: the fork or the handshake failed, or (strict) a layer is missing; nothing is
            left running in that case.
    """
    bind_sources = _ro_paths(spec)
    os.makedirs(_mount_point(spec), mode=0o700, exist_ok=True)
    cgroup = _make_cgroup(spec)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(sync_r)
            os.close(go_w)
            os.close(status_r)
            _middle(spec, bind_sources, cgroup, sync_w, go_r, status_w, run_child)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                os.write(sync_w, f"F middle: {_describe_exc(exc)}\n".encode())
        os._exit(127)
    os.close(sync_w)
    os.close(go_r)
    os.close(status_w)
    return _handshake(spec, pid, sync_r, go_w, status_r, cgroup, attach=attach, attached=attach)


def _handshake(
    spec: SandboxSpec,
    pid: int,
    sync_r: int,
    go_w: int,
    status_r: int,
    cgroup: str | None,
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
    lines = _LineReader(sync_r)
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
                    _write_id_maps(userns_pid or pid)
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
        _kill_quietly(pid)
        if app_pid:
            _kill_quietly(app_pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(status_r)
        remove_cgroup(cgroup, wait_s=2.0)
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
    )


# -- pre-forked spares (zygote fast path) --------------------------------------------------

#: Builds the enclave's sandbox spec and child entry from a claim request and its fds.
SpareFactory = Callable[[dict[str, Any], list[int]], tuple[SandboxSpec, ChildMain]]


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


def prefork_spare(
    name: str, factory: SpareFactory, *, prepare: Callable[[], None] | None = None
) -> Spare:
    """Fork a spare (from a single-threaded loop such as the zygote's). Raises OSError.

    ``prepare`` (optional) runs in the future app while it waits for its claim (errors
    ignored): work such as pre-faulting the copy-on-write pages its child entry will write,
    taken off the start-up path. It must not depend on the enclave (not yet known)."""
    cgroup: str | None = None
    if _mem_layer() == "cgroup":
        cg = CGROUP_MEMORY_ROOT / name
        try:
            cg.mkdir(exist_ok=True)
            cgroup = str(cg)
        except OSError:
            cgroup = None
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the spare relay
        code = 127
        try:
            parent_end.close()
            code = _spare_relay(child_end, cgroup, factory, prepare)
        finally:
            os._exit(code)
    child_end.close()
    try:
        if cgroup:
            attach_cgroup(cgroup, pid)
        parent_end.send(b"A")  # attached: the relay may fork the app (which inherits it)
        msg, fds, _flags, _addr = socket.recv_fds(parent_end, 4096, 1)
        if not msg or len(fds) != 1:
            raise OSError("spare failed to start")
        report = json.loads(msg)
    except BaseException:
        parent_end.close()
        _kill_quietly(pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        remove_cgroup(cgroup, wait_s=2.0)
        raise
    return Spare(
        pid=pid,
        app_pid=int(report["app_pid"]),
        ctl=parent_end,
        status_r=fds[0],
        cgroup=cgroup,
        pidns=str(report["pidns"]),
    )


def claim_spare(spare: Spare, spec: SandboxSpec, request: bytes, fds: list[int]) -> Spawned:
    """Hand an enclave to a spare; returns like :func:`spawn` (cgroup already joined).

    ``request`` and ``fds`` are what the spare's factory receives. Raises OSError; the spare
    is consumed either way."""
    os.makedirs(_mount_point(spec), mode=0o700, exist_ok=True)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        socket.send_fds(spare.ctl, [request], [sync_w, go_r, *fds])
    except OSError:
        for fd in (sync_r, go_w, spare.status_r):
            os.close(fd)
        _kill_quietly(spare.pid)
        _kill_quietly(spare.app_pid)
        raise
    finally:
        for fd in (sync_w, go_r):
            os.close(fd)
        spare.ctl.close()
    return _handshake(
        spec,
        spare.pid,
        sync_r,
        go_w,
        spare.status_r,
        spare.cgroup,
        attach=False,
        attached=True,
        userns_pid=spare.app_pid,
        app_pid=spare.app_pid,
    )


def discard_spare(spare: Spare) -> None:
    """Kill an unclaimed spare and remove its cgroup (reaps the relay)."""
    spare.ctl.close()
    os.close(spare.status_r)
    _kill_quietly(spare.app_pid)
    _kill_quietly(spare.pid)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(spare.pid, 0)
    remove_cgroup(spare.cgroup, wait_s=2.0)


def _spare_relay(
    ctl: socket.socket,
    cgroup: str | None,
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
    if _sys.libc.unshare(ctypes.c_int(_CLONE_NEWPID)) == 0:
        pidns = "enforced"
    else:
        pidns = f"missing: unshare: {os.strerror(ctypes.get_errno())}"
    app = os.fork()
    if app == 0:
        code = 127
        try:
            os.close(status_r)
            os.close(status_w)
            code = _spare_app(ctl, cgroup, factory, pidns, prepare)
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
        _mark("relay_start")
        if cgroup:
            limit = str(spec.memory_mib * 1024 * 1024)
            Path(cgroup, "memory.limit_in_bytes").write_text(limit)
            with contextlib.suppress(OSError):
                Path(cgroup, "memory.memsw.limit_in_bytes").write_text(limit)
        layers = _private_root_then_userns(spec, _ro_paths(spec), sync_w, go_r)
        layers["pidns"] = pidns
        _unshare_rest(
            spec,
            layers,
            sync_w,
            (("netns", _CLONE_NEWNET), ("ipcns", _CLONE_NEWIPC), ("utsns", _CLONE_NEWUTS)),
        )
        _mark("app_forked")
        _app(spec, cgroup, sync_w, layers, run_child)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            os.write(sync_w, f"F spare: {_describe_exc(exc)}\n".encode())
    return 127


#: CLOCK_MONOTONIC marks of the set-up phases, taken in the child and reported with ``T``
#: (the clock is system-wide, so the supervisor can place them on its own timeline).
_TIMING: dict[str, float] = {}


def _mark(name: str) -> None:
    _TIMING[name] = time.monotonic()


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _write_id_maps(pid: int) -> None:
    Path(f"/proc/{pid}/uid_map").write_text(f"0 {OUTSIDE_UID} 1\n")
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/setgroups").write_text("deny")
    Path(f"/proc/{pid}/gid_map").write_text(f"0 {OUTSIDE_UID} 1\n")


def _private_root_then_userns(
    spec: SandboxSpec, bind_sources: list[str], sync_w: int, go_r: int
) -> dict[str, str]:  # pragma: no cover - runs in the child
    """Mount namespace + minimal root (as real root), /dev/null, then the user namespace
    (the parent writes the id maps between ``U`` and ``G``)."""
    layers: dict[str, str] = {}
    # The private mount tree is built while still real root (before NEWUSER): the binds can
    # reach /root and the 0700 state dir, and the resulting mounts belong to a mount ns that
    # the enclave's user ns has no power over (it cannot unmount or remount them).
    if _sys.libc.unshare(ctypes.c_int(_CLONE_NEWNS)) == 0:
        try:
            _build_root(spec, bind_sources)
            layers["mountns"] = "enforced (tmpfs root, read-only binds, no /proc)"
        except OSError as exc:
            layers["mountns"] = f"missing: minimal root failed: {exc}"
    else:
        layers["mountns"] = f"missing: unshare: {os.strerror(ctypes.get_errno())}"
    _mark("mounts_done")
    _DEV_NULL[:] = [os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)]
    userns = _sys.libc.unshare(ctypes.c_int(_CLONE_NEWUSER)) == 0
    os.write(sync_w, b"U ok\n" if userns else b"U no\n")
    if os.read(go_r, 1) != b"G":
        os._exit(126)
    os.close(go_r)
    _mark("id_maps_done")
    if userns:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        layers["userns"] = f"enforced (root inside = uid {OUTSIDE_UID} outside)"
    else:
        layers["userns"] = "missing: unshare(CLONE_NEWUSER) refused"
    return layers


def _unshare_rest(
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
    _mark("relay_start")
    layers = _private_root_then_userns(spec, bind_sources, sync_w, go_r)
    _unshare_rest(
        spec,
        layers,
        sync_w,
        (
            ("pidns", _CLONE_NEWPID),
            ("netns", _CLONE_NEWNET),
            ("ipcns", _CLONE_NEWIPC),
            ("utsns", _CLONE_NEWUTS),
        ),
    )
    _mark("app_fork")
    gpid = os.fork()
    if gpid == 0:
        try:
            os.close(status_w)
            _app(spec, cgroup, sync_w, layers, run_child)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                os.write(sync_w, f"F app: {_describe_exc(exc)}\n".encode())
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


def _mount(
    src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    ret = _sys.libc.mount(
        None if src is None else src.encode(),
        target.encode(),
        None if fstype is None else fstype.encode(),
        ctypes.c_ulong(flags),
        None if data is None else data.encode(),
    )
    _sys.check(ret, f"mount({src}, {target})")


def _mount_point(spec: SandboxSpec) -> str:
    """An empty directory beside the image where the new root is assembled (private ns)."""
    return os.path.realpath(spec.image_root).rstrip("/") + ".root"


def _build_root(spec: SandboxSpec, sources: list[str]) -> None:
    """Private mount tree: tmpfs root with read-only binds, then pivot_root into it."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    root = _mount_point(spec)
    _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    # /tmp first: binds of paths beneath /tmp (an image unpacked there) go on top of it.
    os.makedirs(root + "/tmp", exist_ok=True)
    _mount("tmpfs", root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={TMP_SIZE}")
    for path in sources:
        target = root + path
        src = path
        if os.path.isdir(src):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w"):
                pass
        flags = os.statvfs(src).f_flag
        _mount(src, target, None, _MS_BIND | _MS_REC)
        locked = 0
        for st, ms in _ST_TO_MS.items():
            if flags & st:
                locked |= ms
        _mount(
            None,
            target,
            None,
            _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | locked,
        )
    for link, dest in (("lib", "usr/lib"), ("lib64", "usr/lib64"), ("bin", "usr/bin")):
        if not os.path.exists(root + "/" + link):
            os.symlink(dest, root + "/" + link)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in ("null", "zero", "urandom", "random"):
        with open(root + "/dev/" + dev, "w"):
            pass
        _mount("/dev/" + dev, root + "/dev/" + dev, None, _MS_BIND)
    os.makedirs(root + "/.oldroot", exist_ok=True)
    os.chdir(root)
    _sys.check(
        _sys.syscall(_SYS_PIVOT_ROOT, ctypes.c_char_p(b"."), ctypes.c_char_p(b".oldroot")),
        "pivot_root",
    )
    _sys.check(_sys.libc.umount2(b"/.oldroot", _MNT_DETACH), "umount2(oldroot)")
    os.rmdir("/.oldroot")
    _mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir("/")


def _lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH22x", b"lo", _IFF_UP | _IFF_LOOPBACK | _IFF_RUNNING)
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, ifr)


def _describe_exc(exc: BaseException) -> str:
    """``repr(exc)`` plus where it happened (set-up failures must be diagnosable)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].name}:{frames[-1].lineno}" if frames else ""
    return f"{exc!r}{where}"


#: /dev/null opened by the relay while still real root (before the user namespace), so the
#: enclave never depends on opening a device node itself.
_DEV_NULL: list[int] = []


def _place_fds(spec: SandboxSpec, keep: int) -> int:
    """dup the wanted fds into place, close the rest; returns the new number of ``keep``."""
    null = _DEV_NULL[0] if _DEV_NULL else os.open("/dev/null", os.O_RDWR)
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


def _app(
    spec: SandboxSpec,
    cgroup: str | None,
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
    try:
        os.sched_setaffinity(0, spec.cpu_ids)
        layers["cpus"] = f"enforced (affinity {list(spec.cpu_ids)})"
    except OSError as exc:
        layers["cpus"] = f"missing: sched_setaffinity: {exc.strerror}"
    _mark("app_forked")
    sync_w = _place_fds(spec, sync_w)
    with contextlib.suppress(OSError):
        os.chdir(spec.cwd)
    try:
        abi = landlock.restrict(
            read_only=[*_ro_paths(spec), "/dev/urandom", "/dev/random", "/dev/zero"],
            writable=(["/tmp"] if layers["mountns"].startswith("enforced") else []) + ["/dev/null"],
        )
        layers["landlock"] = f"enforced (ABI {abi})"
    except OSError as exc:
        layers["landlock"] = f"missing: {exc.strerror or exc}"
    _sys.prctl(_sys.PR_SET_DUMPABLE, 0)
    layers["nodump"] = "enforced (not dumpable, RLIMIT_CORE 0)"
    try:
        seccomp.install_filter()
        layers["seccomp"] = f"enforced ({len(seccomp.DENIED)} syscalls denied)"
    except OSError as exc:
        layers["seccomp"] = f"missing: {exc.strerror or exc}"
    if spec.strict and any(v.startswith("missing") for v in layers.values()):
        os.write(sync_w, f"F strict isolation: {json.dumps(layers)}\n".encode())
        os._exit(125)
    _mark("sandboxed")
    os.write(sync_w, f"T {json.dumps(_TIMING)}\n".encode())
    os.write(sync_w, f"L {json.dumps(layers)}\n".encode())
    os.write(sync_w, b"X\n")
    os.close(sync_w)
    run_child()


def describe_missing(layers: Mapping[str, str]) -> Sequence[str]:
    return [k for k, v in layers.items() if v.startswith("missing")]
