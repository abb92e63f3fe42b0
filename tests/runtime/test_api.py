"""The embedding API: the block owns everything; errors and cancellation leak nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.api import ExitKind, open_runtime
from runtime.errors import NitroCliError
from tests.runtime.test_lifecycle_support import (
    OP_TIMEOUT_S,
    _fresh_logging,
    assert_no_leftovers,
    fabric_cids,
)

pytestmark = pytest.mark.slow


class _Boom(Exception):
    pass


async def test_error_in_block_terminates_enclaves(enclave_state_dir, enclave_app):
    eif = enclave_app("import time\ntime.sleep(120)\n")
    seen = []
    with (
        trio.fail_after(OP_TIMEOUT_S),
        pytest.RaisesGroup(_Boom, allow_unwrapped=True, flatten_subgroups=True),
    ):
        async with open_runtime() as rt:  # ENCLAVE_STATE_DIR from the fixture
            assert rt.state_dir == enclave_state_dir
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=128)
            seen.append(info)
            raise _Boom
    info = seen[0]
    assert info.app_pid is not None
    assert_no_leftovers(enclave_state_dir, info.enclave_id, [info.app_pid])
    assert fabric_cids(enclave_state_dir) == []


async def test_plugin_fixture_runtime(enclave_runtime, enclave_app):
    eif = enclave_app("print('bye')\n")
    with trio.fail_after(OP_TIMEOUT_S):
        info = await enclave_runtime.run_enclave(eif, cpu_count=1, memory_mib=128)
        reason = await enclave_runtime.wait_exited(info.enclave_id)
    assert (reason.kind, reason.code) == (ExitKind.EXITED, 0)
    with pytest.raises(NitroCliError) as ei:
        await enclave_runtime.wait_exited("i-0000000000000000-enc0000000000000000")
    assert ei.value.code == "E11"  # no such enclave


def _corrupt(eif: Path, tmp_path: Path) -> Path:
    data = bytearray(eif.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a section: the CRC no longer matches
    bad = tmp_path / "corrupt.eif"
    bad.write_bytes(bytes(data))
    return bad


def _not_an_eif(eif: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "garbage.eif"
    bad.write_bytes(b"\x00" * 4096)
    return bad


# (case, zygote, pool (allocator.yaml), how to break the EIF, run_enclave kwargs, code)
FAILURES = [
    ("corrupt-eif", True, None, _corrupt, {}, "E35"),
    ("corrupt-eif", False, None, _corrupt, {}, "E35"),
    ("not-an-eif", False, None, _not_an_eif, {}, "E35"),
    ("boot-timeout", True, None, None, {"boot_timeout_s": 0.001}, "E36"),
    ("boot-timeout", False, None, None, {"boot_timeout_s": 0.001}, "E36"),
    ("cpus", False, 'memory_mib: 1024\ncpu_pool: "0,1"\n', None, {"cpu_count": 3}, "E22"),
    ("memory", False, 'memory_mib: 1024\ncpu_pool: "0,1"\n', None, {"memory_mib": 2048}, "E27"),
    # CPU 63 is in the pool but not on this host: the "cpus" layer is missing
    ("strict", False, 'memory_mib: 1024\ncpu_pool: "63"\n', None, {"strict": True}, "E36"),
]


@pytest.mark.parametrize(
    ("zygote", "pool", "breaker", "kwargs", "code"),
    [f[1:] for f in FAILURES],
    ids=[f"{f[0]}-{'zygote' if f[1] else 'fresh'}" for f in FAILURES],
)
async def test_run_enclave_failures_raise_the_typed_error(
    enclave_state_dir, enclave_app, tmp_path, zygote, pool, breaker, kwargs, code
):
    """Every failure of run_enclave is the single NitroCliError, caught inside the block or
    escaping it (not an ExceptionGroup around it), and leaves nothing behind."""
    if pool is not None:
        (enclave_state_dir / "allocator.yaml").write_text(pool)
    eif = enclave_app("import time\ntime.sleep(120)\n")
    if breaker is not None:
        eif = breaker(eif, tmp_path)
    kw: dict[str, Any] = {"cpu_count": 1, "memory_mib": 128, **kwargs}
    strict = kw.pop("strict", False)
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(zygote=zygote, strict_isolation=strict) as rt:
            with pytest.raises(NitroCliError) as inside:
                await rt.run_enclave(eif, **kw)
            assert rt.describe() == []
        with pytest.raises(NitroCliError) as escaped:  # raises an ExceptionGroup: fails
            async with open_runtime(zygote=zygote, strict_isolation=strict) as rt:
                await rt.run_enclave(eif, **kw)
    for ei in (inside, escaped):
        assert ei.value.code == code, ei.value
        assert ei.value.exit_code == int(code[1:])
    if code == "E36" and strict:
        assert "strict isolation" in escaped.value.message
    assert list((enclave_state_dir / "enclaves").glob("*.json")) == []
    assert fabric_cids(enclave_state_dir) == []


async def test_several_errors_stay_grouped(enclave_state_dir):
    """Only a lone error is unwrapped: concurrent ones keep their group."""
    with trio.fail_after(OP_TIMEOUT_S), pytest.RaisesGroup(_Boom, _Boom):
        async with open_runtime(zygote=False) as rt, trio.open_nursery() as n:
            assert rt.describe() == []

            async def boom() -> None:
                raise _Boom

            n.start_soon(boom)
            n.start_soon(boom)


__all__ = ["_fresh_logging"]  # autouse fixture (re-exported on purpose)


_EMBEDDED = """
import sys, trio
import json
import os
from pathlib import Path
from runtime.api import open_runtime

async def main():
    async with open_runtime(Path(sys.argv[1])) as rt:
        info = await rt.run_enclave(Path(sys.argv[2]), cpu_count=1, memory_mib=128)
        await rt.terminate(info.enclave_id)
    print("service output only")

trio.run(main)
"""


@pytest.mark.parametrize("level", [None, "warning"])
def test_embedded_runtime_never_logs_to_stdout(enclave_state_dir, enclave_app, level):
    """A service that embeds the runtime and never configures logging: its stdout is its own
    (structlog's unconfigured default prints to stdout); runtime logs go to stderr, at the
    level of ENCLAVE_LOG_LEVEL."""
    import subprocess
    import sys

    eif = enclave_app("import time\ntime.sleep(60)\n")
    env = dict(os.environ)
    env.pop("ENCLAVE_LOG_LEVEL", None)
    if level is not None:
        env["ENCLAVE_LOG_LEVEL"] = level
    r = subprocess.run(
        [sys.executable, "-c", _EMBEDDED, str(enclave_state_dir), str(eif)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "service output only\n"
    if level is None:
        assert '"event": "enclave_running"' in r.stderr
    else:
        assert "enclave_running" not in r.stderr


def test_string_enums_compare_equal_to_their_strings():
    from runtime.records import EnclaveState
    from runtime.spawners import SpawnPath

    assert ExitKind.OOM == "oom"
    assert ExitKind("terminated") is ExitKind.TERMINATED
    assert f"{ExitKind.EXITED}" == "exited"
    assert EnclaveState.RUNNING == "RUNNING"
    assert SpawnPath.ZYGOTE == "zygote"
    assert json.dumps({"k": ExitKind.SIGNALED}) == '{"k": "signaled"}'
