"""The lifecycle CLI across separate processes: run-enclave returns while the enclave keeps
running under its detached supervisor; describe/console/terminate from other invocations."""

from __future__ import annotations

import json
import os
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


__all__ = ["_fresh_logging"]  # autouse fixture (re-exported on purpose)
