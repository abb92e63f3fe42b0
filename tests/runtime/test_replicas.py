"""Replicas through the embedding API (``Runtime.run_replicas``), their health as the ingress
sees it (``runtime.targets``), and the relay service's start (``Runtime.start_relay``)."""

from __future__ import annotations

import pytest
import trio

from runtime.api import Runtime
from runtime.errors import InvalidArgumentError
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
