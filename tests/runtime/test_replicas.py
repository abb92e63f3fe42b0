"""Replicas through the embedding API (``Runtime.run_replicas``), their health as the ingress
sees it (``runtime.targets``), and the relay service's start (``Runtime.start_relay``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from runtime.api import Runtime
from runtime.errors import InvalidArgumentError, NitroCliError
from runtime.host import LINGER_ENV
from runtime.relay import StateDirectory
from runtime.replicas import group_members
from runtime.targets import RuntimeTargets
from transport.errors import ConfigurationError
from transport.vsock import VsockAddr

pytestmark = pytest.mark.slow

OP_TIMEOUT_S = 120
SLEEPER = "import time\ntime.sleep(600)\n"


async def test_replicas_are_one_image_under_distinct_identities(
    enclave_runtime: Runtime, enclave_app: object
) -> None:
    eif = enclave_app(SLEEPER, name="svc")  # type: ignore[operator]
    with trio.fail_after(OP_TIMEOUT_S):
        infos = await enclave_runtime.run_replicas(eif, 2, memory_mib=256, name="svc")
        assert sorted(i.enclave_name for i in infos) == ["svc", "svc_1"]  # started concurrently
        assert len({i.enclave_cid for i in infos}) == 2
        assert len({i.enclave_id for i in infos}) == 2
        assert infos[0].measurements["PCR0"] == infos[1].measurements["PCR0"]
        members = group_members(enclave_runtime.state, "svc")
        assert {m.enclave_id for m in members} == {i.enclave_id for i in infos}

        source = RuntimeTargets(enclave_runtime.state, name="svc", port=5005)
        assert set(await source.healthy()) == {VsockAddr(i.enclave_cid, 5005) for i in infos}
        by_cid = RuntimeTargets(
            enclave_runtime.state, addrs=[VsockAddr(infos[0].enclave_cid, 5005)]
        )
        assert await by_cid.healthy() == [VsockAddr(infos[0].enclave_cid, 5005)]
        directory = {(e.cid, e.name) for e in await StateDirectory(enclave_runtime.state).entries()}
        assert directory == {(i.enclave_cid, i.enclave_name) for i in infos}

        await enclave_runtime.terminate(infos[0].enclave_id)  # a replica ends: it leaves
        assert await source.healthy() == [VsockAddr(infos[1].enclave_cid, 5005)]
        assert await by_cid.healthy() == []


async def test_replica_counts_and_relay_rules_are_checked(enclave_runtime: Runtime) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await enclave_runtime.run_replicas("/nonexistent.eif", 0, memory_mib=256)
    assert info.value.code == "E03"
    with pytest.raises(ConfigurationError, match="FROM=TO:PORT"):
        await enclave_runtime.start_relay(["front"])


async def test_when_one_replica_cannot_start_none_is_left(
    enclave_state_dir: Path, enclave_runtime: Runtime, enclave_app: object
) -> None:
    (enclave_state_dir / "allocator.yaml").write_text("memory_mib: 1024\nmax_enclaves: 1\n")
    eif = enclave_app(SLEEPER)  # type: ignore[operator]
    with trio.fail_after(OP_TIMEOUT_S):
        with pytest.raises(NitroCliError) as info:
            await enclave_runtime.run_replicas(eif, 2, memory_mib=256)
        assert info.value.code == "E27"  # the pool holds one enclave
        assert enclave_runtime.describe() == []


def test_run_enclave_replicas_cli_leaves_nothing_when_one_fails(
    enclave_state_dir: Path, enclave_app: object
) -> None:
    (enclave_state_dir / "allocator.yaml").write_text("memory_mib: 1024\nmax_enclaves: 1\n")
    eif = enclave_app(SLEEPER)  # type: ignore[operator]
    env = {**os.environ, LINGER_ENV: "1"}
    run = [sys.executable, "-m", "runtime.cli"]
    proc = subprocess.run(
        [*run, "run-enclave", "--eif-path", str(eif), "--cpu-count", "1", "--memory", "256",
         "--replicas", "2"],
        env=env, capture_output=True, text=True, timeout=OP_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "[ E27 ]" in proc.stderr
    assert "Terminated the 1 replica(s) already started." in proc.stderr
    described = subprocess.run(
        [*run, "describe-enclaves"], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(described.stdout) == []
