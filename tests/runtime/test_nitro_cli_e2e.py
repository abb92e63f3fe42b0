"""The lifecycle CLI across separate processes: run-enclave returns while the enclave keeps
running in the state directory's host daemon; describe/console/terminate from other
invocations; warm starts, quick apps, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.runtime.test_lifecycle_support import _fresh_logging, assert_no_leftovers, pid_alive

pytestmark = pytest.mark.slow

ENCLAVE = [sys.executable, "-m", "runtime.cli"]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ENCLAVE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
        check=False,
    )


def test_cli_lifecycle_across_processes(enclave_state_dir, enclave_app, tmp_path):
    eif = enclave_app(
        "import time\nprint('hello console', flush=True)\ntime.sleep(120)\n", name="web"
    )
    r = _cli(
        "run-enclave",
        "--eif-path",
        str(eif),
        "--cpu-count",
        "1",
        "--memory",
        "128M",
        "--debug-mode",
        "--enclave-cid",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert "The enclave CID will be auto-generated as the provided CID is 0" in r.stderr
    assert "Start allocating memory..." in r.stderr
    run = json.loads(r.stdout)
    assert list(run) == [
        "EnclaveName",
        "EnclaveID",
        "ProcessID",
        "EnclaveCID",
        "NumberOfCPUs",
        "CPUIDs",
        "MemoryMiB",
    ]
    assert r.stdout.startswith('{\n  "EnclaveName": "web-1",')
    assert (
        f"Started enclave with enclave-cid: {run['EnclaveCID']}, memory: 128 MiB, "
        f"cpu-ids: {run['CPUIDs']}" in r.stderr
    )
    supervisor = run["ProcessID"]
    assert pid_alive(supervisor)  # the enclave outlives the CLI process
    cfg = tmp_path / "run.json"
    cfg.write_text(
        json.dumps(
            {
                "eif_path": str(eif),
                "memory_mib": 128,
                "cpu_ids": None,
                "cpu_count": 1,
                "enclave_name": "prod",
                "enclave_cid": 77,
            }
        )
    )
    r2 = _cli("run-enclave", "--config", str(cfg))
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["EnclaveCID"] == 77

    d = _cli("describe-enclaves")
    described = json.loads(d.stdout)
    assert [x["EnclaveName"] for x in described] == ["web-1", "prod"]
    assert [x["Flags"] for x in described] == ["DEBUG_MODE", "NONE"]
    assert all(x["State"] == "RUNNING" for x in described)
    dm = json.loads(_cli("describe-enclaves", "--metadata").stdout)
    assert list(dm[0])[-5:] == ["ImageName", "ImageVersion", "Metadata", "Isolation", "AppStatus"]

    c = _cli("console", "--enclave-name", "web-1", "--disconnect-timeout", "1")
    assert c.returncode == 0, c.stderr
    assert c.stdout.startswith(
        f"Connecting to the console for enclave {run['EnclaveCID']}...\n"
        "Successfully connected to the console.\n"
    )
    assert "hello console" in c.stdout
    e44 = _cli("console", "--enclave-name", "prod")
    assert e44.returncode == 44
    assert "[ E44 ]" in e44.stderr

    t = _cli("terminate-enclave", "--enclave-name", "web-1")
    assert t.returncode == 0, t.stderr
    assert json.loads(t.stdout) == {
        "EnclaveName": "web-1",
        "EnclaveID": run["EnclaveID"],
        "Terminated": True,
    }
    assert f"Successfully terminated enclave {run['EnclaveID']}." in t.stderr
    ta = _cli("terminate-enclave", "--all")
    assert ta.returncode == 0
    assert [x["EnclaveName"] for x in json.loads(ta.stdout)] == ["prod"]
    assert json.loads(_cli("describe-enclaves").stdout) == []
    deadline = time.monotonic() + 10  # the supervisor exits right after answering
    while pid_alive(supervisor) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_no_leftovers(enclave_state_dir, run["EnclaveID"], [supervisor])
    assert list((enclave_state_dir / "enclaves").iterdir()) == []


def test_run_enclave_attach_console_streams_until_exit(enclave_state_dir, enclave_app):
    eif = enclave_app("import time\nprint('attached output', flush=True)\ntime.sleep(0.5)\n")
    r = _cli(
        "run-enclave",
        "--eif-path",
        str(eif),
        "--cpu-count",
        "1",
        "--memory",
        "128",
        "--attach-console",
    )
    assert r.returncode == 0, r.stderr
    head, _, rest = r.stdout.partition("}\n")
    assert json.loads(head + "}")["EnclaveName"] == "app-1"
    assert "Successfully connected to the console." in rest
    assert "attached output" in rest
    assert json.loads(_cli("describe-enclaves").stdout) == []  # the app exited: enclave gone


def test_attach_console_keeps_the_output_of_a_quick_app(enclave_state_dir, enclave_app):
    """Issue 10 item 11: the console of an app that exits right away was lost (E44: the
    enclave was gone before the CLI connected). The host daemon streams it on the launch
    connection, from the first byte, whatever the timing."""
    eif = enclave_app("print('first and last words', flush=True)\n")
    for _ in range(3):
        r = _cli(
            "run-enclave", "--eif-path", str(eif), "--cpu-count", "1", "--memory", "128",
            "--attach-console",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "[ E44 ]" not in r.stderr
        assert "first and last words" in r.stdout
    assert json.loads(_cli("describe-enclaves").stdout) == []


def test_cli_starts_are_warm_and_share_one_host_process(enclave_state_dir, enclave_app):
    """One launch path: CLI-started enclaves are started by the host daemon's runtime, so the
    second start of an image forks the zygote the first one started (the warm path)."""
    eif = enclave_app("import time\ntime.sleep(120)\n")
    runs = []
    for _ in range(2):
        r = _cli("run-enclave", "--eif-path", str(eif), "--cpu-count", "1", "--memory", "128")
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout))
    assert runs[0]["ProcessID"] == runs[1]["ProcessID"]  # one host process owns both
    log = (enclave_state_dir / "logs" / "host.log").read_text().splitlines()
    spawned = [json.loads(line) for line in log if '"enclave_spawned"' in line]
    assert [e["path"] for e in spawned] == ["zygote", "zygote"]
    ta = _cli("terminate-enclave", "--all")
    assert ta.returncode == 0, ta.stderr
    deadline = time.monotonic() + 15  # the daemon leaves once idle (1 s in these tests)
    while pid_alive(runs[0]["ProcessID"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(runs[0]["ProcessID"])
    assert not (enclave_state_dir / "host.sock").exists()


def test_a_control_client_that_vanishes_does_not_kill_the_enclave(enclave_state_dir, enclave_app):
    """Ctrl-C right at "Connecting to the console" once killed the enclave: the supervisor's
    control handler crashed on a client that connected and left without a request. Now any
    such client costs nothing."""
    import socket as stdlib_socket
    import struct

    eif = enclave_app("import time\nprint('up', flush=True)\ntime.sleep(120)\n")
    r = _cli("run-enclave", "--eif-path", str(eif), "--cpu-count", "1", "--memory", "128",
             "--debug-mode")  # fmt: skip
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)
    sock_path = enclave_state_dir / "enclaves" / (run["EnclaveID"].rpartition("-enc")[2] + ".sock")
    for how in ("close", "reset", "half-request", "garbage"):
        s = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        s.connect(str(sock_path))
        if how == "reset":
            s.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "half-request":
            s.sendall(b'{"op": "cons')
        elif how == "garbage":
            s.sendall(b"\xff" * 5000 + b"\n")
        s.close()
    time.sleep(0.3)
    d = json.loads(_cli("describe-enclaves").stdout)
    assert [x["EnclaveID"] for x in d] == [run["EnclaveID"]]
    c = _cli("console", "--enclave-id", run["EnclaveID"], "--disconnect-timeout", "1")
    assert c.returncode == 0, c.stderr
    assert "up" in c.stdout
    assert _cli("terminate-enclave", "--all").returncode == 0


def test_ctrl_c_in_attach_console_leaves_the_enclave_running(enclave_state_dir, enclave_app):
    """Ctrl-C during ``run-enclave --attach-console`` detaches: no traceback, the enclave is
    still running, and the message says so with its id."""
    eif = enclave_app("import time\nprint('serving', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen(
        [*ENCLAVE, "run-enclave", "--eif-path", str(eif), "--cpu-count", "1", "--memory",
         "128", "--attach-console"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = ""
        deadline = time.monotonic() + 60
        while "serving" not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert "serving" in seen, seen
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = json.loads(seen.partition("}\n")[0] + "}")
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert f"The enclave {run['EnclaveID']} is still running" in err
    d = json.loads(_cli("describe-enclaves").stdout)
    assert [x["EnclaveID"] for x in d] == [run["EnclaveID"]]
    assert d[0]["State"] == "RUNNING"
    assert _cli("terminate-enclave", "--all").returncode == 0


__all__ = ["_fresh_logging"]  # autouse fixture (re-exported on purpose)
