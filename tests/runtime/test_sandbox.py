"""Sandbox escape attempts from INSIDE real enclaves: network, files, other enclaves, ptrace and
/proc/PID/mem of a sibling, namespaces, memory and CPU limits."""

from __future__ import annotations

import json
import os
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
from runtime.sandbox import seccomp
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
    res["interfaces"] = [n for _, n in socket.if_nameindex()]
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
    assert list(meta)[-1] == "Isolation"
    assert all(v.startswith("enforced") for v in iso.values()), iso


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
        spec = cast("Any", SimpleNamespace(memory_mib=128))
        sp = sandbox._handshake(
            spec, os.getpid(), sync_r, go_w, status_r, None, attach=False, attached=False
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


@pytest.mark.skipif(sandbox._mem_layer() != "cgroup", reason="needs a writable memory cgroup")
def test_enclave_cgroups_are_never_shared() -> None:
    """Cgroup names are machine-wide: a stale one (empty) is replaced, a live one is left to
    its owner and this enclave falls back to RLIMIT_AS."""
    slot = f"{os.getpid():08x}{os.urandom(4).hex()}"
    spec = cast("Any", SimpleNamespace(enclave_id=f"i-test-enc{slot}", memory_mib=64))
    path = sandbox.CGROUP_MEMORY_ROOT / slot
    path.mkdir()  # a leftover of a dead supervisor
    proc = None
    try:
        assert sandbox._make_cgroup(spec) == str(path)
        proc = subprocess.Popen(["sleep", "30"])
        sandbox.attach_cgroup(str(path), proc.pid)  # now somebody else's live enclave
        assert sandbox._make_cgroup(spec) is None
        assert str(proc.pid) in (path / "cgroup.procs").read_text().split()
        assert (path / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        assert sandbox.remove_cgroup(str(path), wait_s=3.0)
