"""Failures show where they happen: the app's status report on (3, 9001), recorded by the
supervisor, shown by describe-enclaves, awaited by ``run_enclave(wait_ready=True)`` and
``run-enclave --wait-ready`` (real enclaves, real fabric)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import trio

from runtime.api import open_runtime
from runtime.errors import AppExitedError, AppFailedError, AppReadyTimeoutError
from tests.runtime.test_lifecycle_support import OP_TIMEOUT_S, _fresh_logging, console_json

pytestmark = pytest.mark.slow


def _reporter(state: str, detail: str = "", *, then: str = "import time; time.sleep(120)") -> str:
    return textwrap.dedent(f"""
        import trio
        from transport.app_status import AppState, AppStatus, report_app_status

        async def main():
            status = AppStatus(AppState({state!r}), {detail!r}, (5005,))
            ok = await report_app_status(status)
            second = await report_app_status(AppStatus(AppState.FAILED, "too late"))
            print("RESULT", '{{"acked": %s, "second": %s}}' % (str(ok).lower(),
                  str(second).lower()), flush=True)

        trio.run(main)
        {then}
    """)


async def test_wait_ready_returns_once_the_app_reports_ready(enclave_state_dir, enclave_app):
    eif = enclave_app(_reporter("ready"))
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            info = await rt.run_enclave(
                eif, cpu_count=1, memory_mib=256, debug=True, wait_ready=True
            )
            assert info.app_status == {"State": "READY", "Detail": "", "Ports": [5005]}
            res = await console_json(rt, info.enclave_id)
            assert res == {"acked": True, "second": True}  # acknowledged, the first one kept
            described = rt.describe()[0].describe_json(metadata=True)
            assert described["AppStatus"] == {"State": "READY", "Detail": "", "Ports": [5005]}
            assert "AppStatus" not in rt.describe()[0].describe_json()  # nitro-cli's shape
            await rt.terminate(info.enclave_id)


async def test_wait_ready_raises_the_apps_own_reason(enclave_state_dir, enclave_app):
    detail = "KMS unreachable via (3, 8000)"
    eif = enclave_app(_reporter("failed", detail, then="raise SystemExit(1)"))
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            with pytest.raises(AppFailedError) as ei:
                await rt.run_enclave(eif, cpu_count=1, memory_mib=256, wait_ready=True)
            assert rt.describe() == []  # nothing left running
    assert ei.value.detail == detail
    assert detail in ei.value.message
    assert ei.value.code == "E36"


async def test_wait_ready_exit_before_report_names_the_exit(enclave_state_dir, enclave_app):
    eif = enclave_app("import sys\nsys.exit(3)\n")
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            with pytest.raises(AppExitedError) as ei:
                await rt.run_enclave(eif, cpu_count=1, memory_mib=256, wait_ready=True)
    assert ei.value.detail == "exited, exit code 3"


async def test_wait_ready_times_out_and_tears_down(enclave_state_dir, enclave_app):
    eif = enclave_app("import time\ntime.sleep(120)\n")
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            with pytest.raises(AppReadyTimeoutError):
                await rt.run_enclave(
                    eif, cpu_count=1, memory_mib=256, wait_ready=True, ready_timeout_s=1.5
                )
            assert rt.describe() == []


async def test_a_malformed_report_is_ignored_and_the_enclave_keeps_running(
    enclave_state_dir, enclave_app
):
    junk = textwrap.dedent("""
        import trio
        from transport.vsock import VsockAddr, open_vsock_stream

        async def main():
            for payload in (b"\\xff\\xff\\xff\\xff", b"\\x00\\x00\\x00\\x05{oops"):
                s = await open_vsock_stream(VsockAddr(3, 9001))
                async with s:
                    await s.send_all(payload)
        trio.run(main)
        print("RESULT {}", flush=True)
        import time; time.sleep(120)
    """)
    eif = enclave_app(junk)
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=256, debug=True)
            await console_json(rt, info.enclave_id)
            await trio.sleep(0.2)
            [running] = rt.describe()
            assert running.app_status is None
            assert running.state == "RUNNING"
            await rt.terminate(info.enclave_id)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=dict(os.environ),
        check=False,
    )


def test_cli_wait_ready_fails_with_the_apps_reason(enclave_state_dir, enclave_app):
    detail = "KMS unreachable via (3, 8000)"
    bad = enclave_app(_reporter("failed", detail, then="raise SystemExit(1)"))
    r = _cli("run-enclave", "--eif-path", str(bad), "--cpu-count", "1", "--memory", "256",
             "--wait-ready", "20")  # fmt: skip
    assert r.returncode == 36, r.stderr
    assert detail in r.stderr
    assert r.stderr.count("[ E36 ]") == 1
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    good = enclave_app(_reporter("ready"))
    r = _cli("run-enclave", "--eif-path", str(good), "--cpu-count", "1", "--memory", "256",
             "--wait-ready")  # fmt: skip
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)
    d = json.loads(_cli("describe-enclaves", "--metadata").stdout)
    assert [x["AppStatus"] for x in d] == [{"State": "READY", "Detail": "", "Ports": [5005]}]
    assert _cli("terminate-enclave", "--enclave-id", run["EnclaveID"]).returncode == 0


__all__ = ["_fresh_logging"]  # autouse fixture (re-exported on purpose)
