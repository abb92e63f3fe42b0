"""Lifecycle of real sandboxed subprocess enclaves through the embedding API (zygote path)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import NoReturn

import pytest
import trio

from runtime import sandbox
from runtime.api import ExitKind, open_runtime
from runtime.errors import (
    ConflictingArgumentError,
    InsufficientMemoryAvailableError,
    InsufficientMemoryRequestedError,
    MemoryBelowMinimumError,
    MissingArgumentError,
    NitroCliError,
)
from runtime.spawners import ChildLaunch, FreshSpawner, SpawnObserver
from tests.runtime.test_lifecycle_support import (
    OP_TIMEOUT_S,
    _fresh_logging,
    assert_no_leftovers,
    console_json,
    fabric_cids,
    pid_alive,
)

pytestmark = pytest.mark.slow

SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(120)\n"


async def test_run_describe_terminate_leaves_nothing(enclave_state_dir, enclave_app):
    eif = enclave_app(SLEEPER)
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=128, name="sleepy")
            assert info.state == "RUNNING"
            assert info.enclave_name == "sleepy"
            assert info.enclave_id.startswith(rt.state.instance_id() + "-enc")
            described = rt.describe()
            assert [d.enclave_id for d in described] == [info.enclave_id]
            d = described[0].describe_json()
            assert list(d) == [
                "EnclaveName",
                "EnclaveID",
                "ProcessID",
                "EnclaveCID",
                "NumberOfCPUs",
                "CPUIDs",
                "MemoryMiB",
                "State",
                "Flags",
                "Measurements",
            ]
            assert d["Flags"] == "NONE"
            assert list(d["Measurements"]) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
            assert str(info.enclave_cid) in fabric_cids(enclave_state_dir)
            assert info.app_pid is not None
            assert pid_alive(info.app_pid)
            reason = await rt.terminate(info.enclave_id)
            assert reason.kind is ExitKind.TERMINATED
            assert rt.describe() == []
            assert_no_leftovers(enclave_state_dir, info.enclave_id, [info.app_pid])
            assert str(info.enclave_cid) not in fabric_cids(enclave_state_dir)
    events = (enclave_state_dir / "events.jsonl").read_text()
    assert '"enclave_running"' in events
    assert '"terminated"' in events


async def test_exit_code_and_crash_are_reported(enclave_state_dir, enclave_app):
    exits = enclave_app("import sys\nsys.exit(7)\n")
    crash = enclave_app("import ctypes\nctypes.string_at(0)\n")
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            a = await rt.run_enclave(exits, cpu_count=1, memory_mib=128)
            b = await rt.run_enclave(crash, cpu_count=1, memory_mib=128)
            ra = await rt.wait_exited(a.enclave_id)
            rb = await rt.wait_exited(b.enclave_id)
            assert (ra.kind, ra.code) == (ExitKind.EXITED, 7)
            assert (rb.kind, rb.signal) == (ExitKind.SIGNALED, signal.SIGSEGV)
            assert rt.describe() == []
            for info in (a, b):
                assert info.app_pid is not None
                assert_no_leftovers(enclave_state_dir, info.enclave_id, [info.app_pid])


class _SilentSpawner(FreshSpawner):
    """A sandboxed child that never sends the heartbeat (a hung boot)."""

    async def spawn(self, launch: ChildLaunch, observer: SpawnObserver) -> sandbox.Spawned:
        def child() -> NoReturn:
            time.sleep(120)
            os._exit(0)

        return sandbox.spawn(launch.sandbox_spec, child)


async def test_heartbeat_timeout_is_e36_and_tears_down(enclave_state_dir, enclave_app):
    eif = enclave_app(SLEEPER)
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir, zygote=False) as rt:
            rt._spawner = _SilentSpawner()
            # The silent child sleeps 120 s, past OP_TIMEOUT_S: only the 1 s boot deadline
            # can end this wait, and the message says that it did.
            with pytest.raises(NitroCliError) as ei:
                await rt.run_enclave(eif, cpu_count=1, memory_mib=128, boot_timeout_s=1.0)
            assert ei.value.code == "E36"
            assert "no heartbeat within 1 s" in ei.value.message
            assert rt.describe() == []
            assert list((enclave_state_dir / "enclaves").iterdir()) == []
            assert fabric_cids(enclave_state_dir) == []


async def test_several_enclaves_then_capacity_errors(enclave_state_dir, enclave_app):
    eif = enclave_app(SLEEPER)
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            infos = []

            async def start() -> None:
                infos.append(await rt.run_enclave(eif, cpu_count=1, memory_mib=128))

            async with trio.open_nursery() as n:
                n.start_soon(start)
                n.start_soon(start)
            assert len({i.enclave_cid for i in infos}) == 2
            assert (
                sorted(c for i in infos for c in i.cpu_ids) == sorted(os.sched_getaffinity(0))[:2]
            )
            assert {i.enclave_name for i in infos} == {
                "app-1",
                "app-1_1",
            }  # EIF basename, `_N` de-dup
            with pytest.raises(NitroCliError) as ei:  # the 2-CPU pool is used up
                await rt.run_enclave(eif, cpu_count=1, memory_mib=128)
            assert ei.value.code == "E22"
            with pytest.raises(NitroCliError) as ei:
                await rt.run_enclave(eif, cpu_ids=[infos[0].cpu_ids[0]], memory_mib=128)
            assert ei.value.code == "E21"
            await rt.terminate(infos[1].enclave_id)  # a CPU is free again; the CID is taken
            with pytest.raises(NitroCliError) as ei:
                await rt.run_enclave(eif, cpu_count=1, memory_mib=128, cid=infos[0].enclave_cid)
            assert ei.value.code == "E03"
    assert list((enclave_state_dir / "enclaves").iterdir()) == []


async def test_terminate_under_load_kills_after_grace(enclave_state_dir, enclave_app):
    # ignores SIGTERM and keeps a CPU busy, with a child process of its own
    src = (
        "import os, signal, subprocess, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
        "print('RESULT {}', flush=True)\n"
        "while True:\n    pass\n"
    )
    eif = enclave_app(src)
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir, terminate_grace_s=0.5) as rt:
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=256, debug=True)
            await console_json(rt, info.enclave_id)
            # No timed assertion (a loaded machine stretches any figure): SIGKILL as the exit
            # signal is the proof that terminate gave up on SIGTERM and killed after the grace,
            # and OP_TIMEOUT_S bounds the whole test should it wait for the app instead.
            reason = await rt.terminate(info.enclave_id)
            assert reason.kind is ExitKind.TERMINATED
            assert reason.signal == signal.SIGKILL
            assert info.app_pid is not None
            assert_no_leftovers(enclave_state_dir, info.enclave_id, [info.app_pid])


async def test_cancellation_tears_everything_down(enclave_state_dir, enclave_app):
    eif = enclave_app(SLEEPER)
    pids: list[int] = []
    ids: list[str] = []
    with trio.fail_after(OP_TIMEOUT_S):
        with trio.CancelScope() as scope:
            async with open_runtime(enclave_state_dir) as rt:
                info = await rt.run_enclave(eif, cpu_count=1, memory_mib=128)
                assert info.app_pid is not None
                pids.append(info.app_pid)
                ids.append(info.enclave_id)
                scope.cancel()
                await trio.sleep_forever()
    assert scope.cancelled_caught
    assert_no_leftovers(enclave_state_dir, ids[0], pids)
    assert fabric_cids(enclave_state_dir) == []
    assert not (enclave_state_dir / "zygotes").exists() or not any(
        p.suffix == ".sock" for p in (enclave_state_dir / "zygotes").iterdir()
    )


async def test_tampered_eif_is_refused(enclave_state_dir, enclave_app, tmp_path):
    eif = enclave_app(SLEEPER)
    data = bytearray(eif.read_bytes())
    data[-100] ^= 0xFF  # inside the last section
    bad = tmp_path / "bad.eif"
    bad.write_bytes(bytes(data))
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            with pytest.raises(NitroCliError) as ei:
                await rt.run_enclave(bad, cpu_count=1, memory_mib=128)
            assert ei.value.code in ("E35", "E36")
            assert rt.describe() == []


async def test_console_only_in_debug_mode(enclave_state_dir, enclave_app):
    eif = enclave_app(
        "import sys, time\nprint('RESULT {\"hello\": 1}', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\ntime.sleep(120)\n"
    )
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            dbg = await rt.run_enclave(eif, cpu_count=1, memory_mib=128, debug=True)
            assert dbg.describe_json()["Flags"] == "DEBUG_MODE"
            assert await console_json(rt, dbg.enclave_id) == {"hello": 1}
            prod = await rt.run_enclave(eif, cpu_count=1, memory_mib=128)
            with pytest.raises(NitroCliError) as ei:
                await rt.console(prod.enclave_id)
            assert ei.value.code == "E44"


@pytest.mark.parametrize("zygote", [True, False])
async def test_console_ends_with_the_enclave(enclave_state_dir, enclave_app, zygote):
    """A console reader gets the app's last output and then the end of the stream when the
    enclave exits (it used to hang when the exit status won the race against the pipe's
    EOF), also when it subscribes after the exit."""
    eif = enclave_app(
        "import sys, time\nprint('first', flush=True)\ntime.sleep(0.3)\n"
        "sys.stdout.write('last words' * 1000)\nsys.exit(3)\n"
    )
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir, zygote=zygote) as rt:
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=128, debug=True)
            sup = rt.supervisor(info.enclave_id)
            assert sup is not None
            live = await rt.console(info.enclave_id)
            buf = b""
            with trio.fail_after(5):
                async with live:
                    async for chunk in live:
                        buf += chunk
            assert buf == b"first\n" + b"last words" * 1000
            late = await sup.console_stream()  # after the exit: history, then the end
            with trio.fail_after(5):
                assert b"".join([c async for c in late]) == buf
            assert (await rt.wait_exited(info.enclave_id)).code == 3


async def test_memory_minimum_rules(enclave_state_dir, enclave_app):
    eif = enclave_app(SLEEPER)
    async with open_runtime(enclave_state_dir) as rt:
        for mem, err in (
            (0, InsufficientMemoryRequestedError),
            (32, MemoryBelowMinimumError),
            (10_000_000, InsufficientMemoryAvailableError),
        ):
            with pytest.raises(err):
                await rt.run_enclave(eif, cpu_count=1, memory_mib=mem)
        # argument misuse from Python: typed, and ValueError subclasses
        with pytest.raises(MissingArgumentError) as ei:
            await rt.run_enclave(eif, memory_mib=128)
        assert ei.value.code == "E01"
        assert isinstance(ei.value, ValueError)
        with pytest.raises(ConflictingArgumentError) as ei2:
            await rt.run_enclave(eif, cpu_count=1, cpu_ids=[0], memory_mib=128)
        assert ei2.value.code == "E02"
        with pytest.raises(ValueError, match="cpu-count"):
            await rt.run_enclave(eif, cpu_count="1", memory_mib=128)  # type: ignore[arg-type]
    assert list((enclave_state_dir / "enclaves").iterdir()) == []


def test_memory_vs_eif_size(enclave_state_dir, tmp_path):
    from runtime.state import StateDir

    big = tmp_path / "big.eif"
    big.write_bytes(b"\0" * (40 * 1024 * 1024))  # 40 MiB -> at least 160 MiB
    st = StateDir(Path(enclave_state_dir))
    with pytest.raises(NitroCliError) as ei:
        st.reserve(
            eif_path=str(big),
            memory_mib=128,
            cpu_count=1,
            cpu_ids=None,
            cid=None,
            name=None,
            debug=False,
            owner_pid=os.getpid(),
        )
    assert ei.value.code == "E26"
    assert "minimum memory should be 160 MB" in ei.value.cli_report()


__all__ = ["_fresh_logging"]  # autouse fixture (re-exported on purpose)
