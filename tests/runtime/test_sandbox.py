"""Sandbox escape attempts from INSIDE real enclaves: network, files, other enclaves, ptrace and
/proc/PID/mem of a sibling, namespaces, memory and CPU limits."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from runtime import sandbox
from runtime.api import ExitKind, open_runtime
from runtime.errors import NitroCliError
from runtime.sandbox import _cgroups, _spawn, seccomp
from tests.runtime.test_lifecycle_support import OP_TIMEOUT_S, _fresh_logging, console_json
from transport.vsock import VsockAddr, open_vsock_stream

pytestmark = pytest.mark.slow

SIBLING = textwrap.dedent("""
    import trio
    from transport.vsock import open_vsock_listener

    async def main():
        listener = await open_vsock_listener(5005)
        async def handle(stream):
            async with stream:
                await stream.send_all(b"sibling")
        print("RESULT {}", flush=True)  # listening now
        await trio.serve_listeners(handle, [listener])

    trio.run(main)
""")

PROBE = textwrap.dedent("""
    import ctypes, errno, json, os, socket, trio
    from transport.vsock import VsockAddr, open_vsock_stream

    libc = ctypes.CDLL(None, use_errno=True)
    env = os.environ
    res = {}

    def attempt(name, fn):
        try:
            res[name] = ["ok", repr(fn())[:80]]
        except BaseException as exc:  # report every failure, typed
            res[name] = [type(exc).__name__, getattr(exc, "errno", None)]

    def tcp():
        with socket.create_connection(("127.0.0.1", int(env["HOST_PORT"])), timeout=2) as s:
            return s.recv(16)
    attempt("tcp_host_loopback", tcp)

    def interfaces():  # SIOCGIFCONF on an inet socket (if_nameindex needs netlink: refused)
        import array, fcntl, struct
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            buf = array.array("B", bytes(40 * 32))
            addr, size = buf.buffer_info()
            req = struct.pack("iL", size, addr)
            n = struct.unpack("iL", fcntl.ioctl(s.fileno(), 0x8912, req))[0]  # SIOCGIFCONF
            raw = buf.tobytes()
            return [raw[i:i + 16].split(b"\\0", 1)[0].decode() for i in range(0, n, 40)]
    res["interfaces"] = interfaces()
    # address families the enclave has no use for (AF_VSOCK: the host's own port space)
    attempt("vsock_socket", lambda: socket.socket(40, socket.SOCK_STREAM).close())
    attempt("vsock_dgram", lambda: socket.socket(40, socket.SOCK_DGRAM).close())
    attempt("netlink_socket", lambda: socket.socket(16, socket.SOCK_RAW, 0).close())
    attempt("packet_socket", lambda: socket.socket(17, socket.SOCK_RAW, 0).close())
    attempt("unix_socketpair", lambda: [s.close() for s in socket.socketpair()])
    r = libc.syscall(425, 8, ctypes.create_string_buffer(120))  # io_uring_setup
    res["io_uring_setup"] = [r, ctypes.get_errno()]
    attempt("read_secret", lambda: open(env["SECRET_PATH"]).read())
    attempt("read_etc_passwd", lambda: open("/etc/passwd").read())
    attempt("list_state_dir", lambda: os.listdir(env["STATE_DIR"]))
    attempt("list_ca_dir", lambda: os.listdir(env["STATE_DIR"] + "/ca"))
    attempt("write_app_dir", lambda: open("pwned.txt", "w").write("x"))
    attempt("write_tmp", lambda: open("/tmp/scratch", "w").write("x"))

    async def peer():
        s = await open_vsock_stream(VsockAddr(int(env["PEER_CID"]), 5005))
        async with s:
            return await s.receive_some(16)
    attempt("peer_vsock", lambda: trio.run(peer))
    async def parent_other_port():
        s = await open_vsock_stream(VsockAddr(3, 22))
        await s.aclose()
    attempt("parent_unlisted_port", lambda: trio.run(parent_other_port))

    peer_pid = int(env["PEER_PID"])
    r = libc.ptrace(16, peer_pid, 0, 0)  # PTRACE_ATTACH
    res["ptrace_attach"] = [r, ctypes.get_errno()]
    r = libc.ptrace(0, 0, 0, 0)  # PTRACE_TRACEME
    res["ptrace_traceme"] = [r, ctypes.get_errno()]
    attempt("proc_mem", lambda: open(f"/proc/{peer_pid}/mem", "rb").read(1))
    attempt("kill_peer", lambda: os.kill(peer_pid, 9))
    r = libc.unshare(0x10000000)  # CLONE_NEWUSER
    res["unshare_userns"] = [r, ctypes.get_errno()]
    r = libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None)
    res["mount"] = [r, ctypes.get_errno()]
    res["dumpable"] = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
    res["affinity"] = sorted(os.sched_getaffinity(0))
    attempt("widen_affinity", lambda: os.sched_setaffinity(0, range(os.cpu_count() or 1)))
    res["uid"] = os.getuid()
    res["pid"] = os.getpid()
    res["hostname"] = socket.gethostname()
    res["env"] = sorted(env)
    res["cwd"] = os.getcwd()
    import resource
    res["rlimit_core"] = list(resource.getrlimit(resource.RLIMIT_CORE))
    print("RESULT " + json.dumps(res), flush=True)
    import time; time.sleep(120)
""")


async def test_escape_attempts_from_inside(enclave_state_dir, enclave_app, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)  # even world-readable host files are out of reach
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    host_port = listener.getsockname()[1]
    sibling_eif = enclave_app(SIBLING)
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            sib = await rt.run_enclave(sibling_eif, cpu_count=1, memory_mib=256, debug=True)
            await console_json(rt, sib.enclave_id)
            # positive control: the host (parent) does reach the sibling's port
            s = await open_vsock_stream(
                VsockAddr(sib.enclave_cid, 5005), fabric_dir=enclave_state_dir / "vsock"
            )
            async with s:
                assert await s.receive_some(16) == b"sibling"
            probe_eif = enclave_app(
                PROBE,
                env={
                    "HOST_PORT": str(host_port),
                    "SECRET_PATH": str(secret),
                    "STATE_DIR": str(enclave_state_dir),
                    "PEER_CID": str(sib.enclave_cid),
                    "PEER_PID": str(sib.app_pid),
                },
            )
            probe = await rt.run_enclave(probe_eif, cpu_count=1, memory_mib=256, debug=True)
            res = await console_json(rt, probe.enclave_id)
            meta = rt.describe()[-1].describe_json(metadata=True)
    listener.close()
    print(json.dumps(res, indent=1))
    # network: no interface but loopback, the host's loopback is unreachable
    assert res["interfaces"] == ["lo"]
    assert res["tcp_host_loopback"][0] != "ok"
    # socket families: AF_VSOCK, netlink and packet sockets are refused by seccomp (97 =
    # EAFNOSUPPORT), io_uring (which could create sockets past that check) with EPERM; the
    # families the enclave uses still work
    for name in ("vsock_socket", "vsock_dgram", "netlink_socket", "packet_socket"):
        assert res[name] == ["OSError", errno.EAFNOSUPPORT], (name, res[name])
    assert res["io_uring_setup"] == [-1, errno.EPERM]
    assert res["unix_socketpair"][0] == "ok"
    # files outside the image: invisible; the image itself read-only; private tmpfs only
    assert (
        res["read_secret"][0] == "FileNotFoundError" or res["read_secret"][0] == "PermissionError"
    )
    assert res["read_etc_passwd"][0] != "ok"
    # the state dir only exists as the skeleton leading to the image mount: no CA, no records
    assert res["list_state_dir"][0] != "ok" or res["list_state_dir"][1] == "['images']"
    assert res["list_ca_dir"][0] == "FileNotFoundError"
    assert res["write_app_dir"][0] in ("OSError", "PermissionError")
    assert res["write_tmp"][0] == "ok"
    # other enclaves and unlisted parent ports are refused by the fabric
    assert res["peer_vsock"][0] == "VsockConnectionRefused"
    assert res["parent_unlisted_port"][0] == "VsockConnectionRefused"
    # the sibling is invisible and untouchable
    assert res["ptrace_attach"][0] == -1
    assert res["ptrace_traceme"][0] == -1
    assert res["ptrace_traceme"][1] == 1  # EPERM from the seccomp filter
    assert res["proc_mem"][0] in ("FileNotFoundError", "PermissionError")
    assert res["kill_peer"][0] in ("ProcessLookupError", "PermissionError")
    assert res["unshare_userns"] == [-1, 1]
    assert res["mount"] == [-1, 1]
    assert res["dumpable"] == 0
    assert res["rlimit_core"] == [0, 0]
    assert res["affinity"] == list(probe.cpu_ids)
    assert res["widen_affinity"][0] == "PermissionError"
    assert res["pid"] == 1
    assert res["hostname"] == "enclave"
    assert (
        res["env"]
        == [
            "ENCLAVE_CID",
            "ENCLAVE_FABRIC_FD",
            "ENCLAVE_NSM_FD",
            "HOST_PORT",
            "LC_CTYPE",
            "PATH",
            "PEER_CID",
            "PEER_PID",
            "PYTHONPATH",
            "SECRET_PATH",
            "STATE_DIR",
        ]
        or "LC_CTYPE" not in res["env"]
    )
    assert res["cwd"].endswith("/app/rootfs")
    iso = meta["Isolation"]
    assert list(meta)[-2:] == ["Isolation", "AppStatus"]
    assert all(v.startswith("enforced") for v in iso.values()), iso
    assert iso["pids"].startswith("enforced"), iso
    assert "AF_UNIX, AF_INET, AF_INET6 only" in iso["seccomp"], iso


async def test_memory_limit_is_enforced_and_reported(enclave_state_dir, enclave_app):
    hog = enclave_app("chunks = []\nwhile True:\n    chunks.append(b'x' * (8 << 20))\n")
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            info = await rt.run_enclave(hog, cpu_count=1, memory_mib=96)
            reason = await rt.wait_exited(info.enclave_id)
    assert reason.kind is ExitKind.OOM, reason


async def test_missing_layer_named_and_strict_refuses(enclave_state_dir, enclave_app):
    # CPU 63 is in the pool but not on this host: pinning fails -> the "cpus" layer is missing
    (enclave_state_dir / "allocator.yaml").write_text('memory_mib: 1024\ncpu_pool: "63"\n')
    eif = enclave_app("import time\ntime.sleep(120)\n")
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=128)
            iso = info.isolation.layers
            assert iso["cpus"].startswith("missing"), iso
            assert rt.describe()[0].describe_json(metadata=True)["Isolation"]["cpus"] == iso["cpus"]
            assert "Isolation" not in rt.describe()[0].describe_json()  # nitro-cli shape kept
            await rt.terminate(info.enclave_id)
        async with open_runtime(enclave_state_dir, strict_isolation=True) as rt:
            with pytest.raises(NitroCliError) as ei:
                await rt.run_enclave(eif, cpu_count=1, memory_mib=128)
            assert ei.value.code == "E36"
            assert "strict isolation" in ei.value.message
            assert rt.describe() == []


TASKS = textwrap.dedent("""
    import json, os, threading, time
    threads, forks, err = [], 0, None
    stop = threading.Event()
    try:
        for _ in range(400):  # threads until refused (the limit is far below 400)
            t = threading.Thread(target=stop.wait, daemon=True)
            t.start()
            threads.append(t)
    except RuntimeError as exc:
        err = str(exc)
    n_threads = len(threads)
    stop.set()
    for t in threads:
        t.join()
    children, fork_err = [], None
    try:
        for _ in range(400):  # then processes until refused
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
    except OSError as exc:
        fork_err = exc.errno
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    print("RESULT " + json.dumps({"threads": n_threads, "thread_error": err,
                                  "forks": len(children), "fork_errno": fork_err}), flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "fresh"])
async def test_task_limit_refuses_runaway_threads_and_processes(
    enclave_state_dir, enclave_app, zygote
):
    """Issue 10 item 8: an enclave may not create tasks without bound (it once made 3,000
    threads and 1,325 processes). The pids cgroup refuses the 33rd task of a 32-task enclave
    (EAGAIN), the enclave keeps running, and the layer is reported."""
    eif = enclave_app(TASKS)
    with trio.fail_after(OP_TIMEOUT_S * 2):
        async with open_runtime(enclave_state_dir, zygote=zygote) as rt:
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=256, debug=True, max_tasks=32)
            res = await console_json(rt, info.enclave_id, timeout=40)
            assert info.isolation.layers["pids"] == "enforced (pids cgroup, 32 tasks)"
            assert rt.describe()[0].describe_json(metadata=True)["Isolation"]["pids"] == (
                "enforced (pids cgroup, 32 tasks)"
            )
            await rt.terminate(info.enclave_id)
    # the main thread plus the app's own (the interpreter's) count too: < 32 extra threads
    assert 0 < res["threads"] < 32, res
    assert res["thread_error"] == "can't start new thread", res
    assert 0 < res["forks"] < 32, res
    assert res["fork_errno"] == errno.EAGAIN, res


async def test_task_limit_falls_back_to_rlimit_nproc(enclave_state_dir, enclave_app, monkeypatch):
    """Without a writable pids hierarchy, RLIMIT_NPROC on the enclave's own uid bounds its
    tasks, and the layer says so."""
    monkeypatch.setattr(_cgroups, "CGROUP_PIDS_ROOT", Path("/proc/no-pids-cgroup-here"))
    eif = enclave_app(TASKS)
    with trio.fail_after(OP_TIMEOUT_S * 2):
        async with open_runtime(enclave_state_dir, zygote=False) as rt:
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=256, debug=True, max_tasks=32)
            res = await console_json(rt, info.enclave_id, timeout=40)
            await rt.terminate(info.enclave_id)
    assert info.isolation.layers["pids"] == (
        f"enforced (RLIMIT_NPROC on uid {info.outside_uid}, 32 tasks)"
    )
    assert 0 < res["threads"] < 32, res
    assert 0 < res["forks"] < 32, res
    assert res["fork_errno"] == errno.EAGAIN, res


async def test_each_enclave_has_its_own_uid_that_others_cannot_signal(
    enclave_state_dir, enclave_app
):
    """Issue 10 item 9: enclaves ran as host uid 65534, so any process running as ``nobody``
    could SIGSTOP or SIGKILL them. Each enclave's root now maps to a uid of its own, from the
    runtime's range; a process of another uid (nobody, or another enclave's) cannot signal it."""
    from runtime.state import ENCLAVE_UID_RANGE

    eif = enclave_app("import time\ntime.sleep(120)\n")
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            a = await rt.run_enclave(eif, cpu_count=1, memory_mib=128)
            b = await rt.run_enclave(eif, cpu_count=1, memory_mib=128)
            uids = []
            for info in (a, b):
                assert info.app_pid is not None
                st = Path(f"/proc/{info.app_pid}/status").read_text().splitlines()
                real_uid = int(next(ln for ln in st if ln.startswith("Uid:")).split()[1])
                uids.append(real_uid)
                assert real_uid == info.outside_uid
                first, count = ENCLAVE_UID_RANGE
                assert first <= real_uid < first + count
            assert uids[0] != uids[1]
            assert sandbox.NOBODY_UID not in uids
            for signaller in (sandbox.NOBODY_UID, uids[1]):  # nobody; the other enclave's uid
                for sig in (0, signal.SIGSTOP, signal.SIGKILL):
                    assert _signal_as(signaller, a.app_pid, sig) == errno.EPERM
            assert rt.describe()[0].outside_uid == uids[0]
            await rt.terminate(a.enclave_id)
            await rt.terminate(b.enclave_id)


def _signal_as(uid: int, pid: int, sig: int) -> int:
    """kill(pid, sig) from a child running as ``uid``; returns the errno (0: delivered)."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            try:
                os.kill(pid, sig)
            except OSError as exc:
                code = exc.errno or 255
            os.write(w, bytes([code]))
        finally:
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 1)
    finally:
        os.close(r)
        os.waitpid(child, 0)
    return got[0] if got else -1


def test_host_detection_reports_every_layer():
    layers = sandbox.detect()
    assert set(layers) >= {
        "userns",
        "pidns",
        "netns",
        "mountns",
        "ipcns",
        "utsns",
        "landlock",
        "seccomp",
        "memory",
        "pids",
    }


def test_seccomp_program_shape():
    prog = seccomp.build_program()
    assert all(len(ins) == 8 for ins in prog)
    assert len(prog) < 4096  # BPF_MAXINSNS
    assert "ptrace" in seccomp.DENIED
    assert "process_vm_readv" in seccomp.DENIED


def test_loopback_only_probe_is_not_trivial():
    # guard: the host really has a reachable TCP loopback (so the in-enclave refusal means it)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with socket.create_connection(srv.getsockname(), timeout=2):
            pass
    assert Path("/etc/passwd").exists()
    assert os.access("/etc/passwd", os.R_OK)


__all__ = ["_fresh_logging"]  # autouse fixture (re-exported on purpose)


@pytest.mark.parametrize(
    "lines",
    [
        b"L {}\nP 4242\nX\n",
        # the middle process descheduled right after its fork: the app's X comes first
        b"L {}\nX\nP 4242\n",
    ],
    ids=["pid-first", "pid-after-ready"],
)
def test_handshake_waits_for_the_app_pid(lines: bytes) -> None:
    """The set-up ends only once the app pid is known, whatever order the lines come in
    (a 0 pid once made the supervisor move itself into the enclave's memory cgroup)."""
    sync_r, sync_w = os.pipe()
    go_r, go_w = os.pipe()
    status_r, status_w = os.pipe()
    try:
        os.write(sync_w, lines)
        spec = cast("Any", SimpleNamespace(memory_mib=128, outside_uid=0x70000001))
        sp = _spawn.handshake(
            spec, os.getpid(), sync_r, go_w, status_r, None, None, attach=False, attached=False
        )
        assert sp.app_pid == 4242
        assert sp.status_fd == status_r
    finally:
        for fd in (sync_w, go_r, status_r, status_w):
            os.close(fd)


def test_attach_cgroup_refuses_non_pids(tmp_path: Path) -> None:
    """Writing 0 to cgroup.procs moves the writer: never done on the caller's behalf."""
    (tmp_path / "cgroup.procs").write_text("")
    for pid in (0, -1):
        with pytest.raises(ValueError, match="not a process id"):
            sandbox.attach_cgroup(str(tmp_path), pid)
    assert (tmp_path / "cgroup.procs").read_text() == ""


@pytest.mark.skipif(sandbox.mem_layer() != "cgroup", reason="needs a writable memory cgroup")
def test_enclave_cgroups_are_never_shared() -> None:
    """Cgroup names are machine-wide: a stale one (empty) is replaced, a live one is left to
    its owner and this enclave falls back to RLIMIT_AS."""
    slot = f"{os.getpid():08x}{os.urandom(4).hex()}"
    enclave_id = f"i-test-enc{slot}"
    path = sandbox.CGROUP_MEMORY_ROOT / slot
    path.mkdir()  # a leftover of a dead supervisor
    proc = None
    try:
        assert _cgroups.make_memory_cgroup(enclave_id, 64) == str(path)
        proc = subprocess.Popen(["sleep", "30"])
        sandbox.attach_cgroup(str(path), proc.pid)  # now somebody else's live enclave
        assert _cgroups.make_memory_cgroup(enclave_id, 64) is None
        assert str(proc.pid) in (path / "cgroup.procs").read_text().split()
        assert (path / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        assert sandbox.remove_cgroup(str(path), wait_s=3.0)
