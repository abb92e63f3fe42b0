"""Worker apps over one store, in one process: each has its own descriptors (as separate
processes would), so the cross-process writer lock and the shared generation are the real ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kms.app import KmsApp
from kms.coherence import ConnectionShare, SharedGeneration

from .conftest import COHERENCE_ENV as ENV
from .helpers import app_call


async def call(app: KmsApp, operation: str, payload: dict[str, Any]) -> dict[str, Any]:
    status, answer = await app_call(app, ENV, operation, payload)
    if status != 200:
        raise AssertionError(answer)
    return answer


async def test_changes_reach_the_other_app_and_unchanged_keys_are_kept(apps: Any) -> None:
    a, b = apps
    k1 = (await call(a, "CreateKey", {}))["KeyMetadata"]["KeyId"]
    k2 = (await call(a, "CreateKey", {}))["KeyMetadata"]["KeyId"]
    assert (await call(b, "DescribeKey", {"KeyId": k1}))["KeyMetadata"]["KeyId"] == k1
    kept = b.service.resolve(k2)
    reloads = b.coherence.reloads
    await call(a, "DisableKey", {"KeyId": k1})
    meta = (await call(b, "DescribeKey", {"KeyId": k1}))["KeyMetadata"]
    assert meta["KeyState"] == "Disabled"
    assert b.coherence.reloads == reloads + 1
    assert b.service.resolve(k2) is kept  # its record did not change: not parsed again
    await call(b, "ListKeys", {})
    assert b.coherence.reloads == reloads + 1  # nothing changed since: no reload
    await call(a, "RotateKeyOnDemand", {"KeyId": k2})
    blob = (await call(b, "Encrypt", {"KeyId": k2, "Plaintext": "aGk="}))["CiphertextBlob"]
    assert (await call(a, "Decrypt", {"CiphertextBlob": blob}))["Plaintext"] == "aGk="
    assert b.service.resolve(k2).current_version == 2


async def test_a_write_section_excludes_the_other_process(apps: Any) -> None:
    a, b = apps
    order: list[str] = []

    async def b_enters() -> None:
        async with b.service.write_lock:
            order.append("b in")

    async with trio.open_nursery() as nursery, a.service.write_lock:
        order.append("a in")
        nursery.start_soon(b_enters)
        await trio.testing.wait_all_tasks_blocked()  # b waits for the flock in a thread
        order.append("a out")
    assert order == ["a in", "a out", "b in"]


async def test_deleting_a_key_elsewhere_makes_it_unknown_here(apps: Any) -> None:
    a, b = apps
    key = (await call(a, "CreateKey", {}))["KeyMetadata"]["KeyId"]
    await call(a, "CreateAlias", {"AliasName": "alias/gone-soon", "TargetKeyId": key})
    await call(b, "DescribeKey", {"KeyId": "alias/gone-soon"})
    await call(a, "DeleteAlias", {"AliasName": "alias/gone-soon"})
    with pytest.raises(AssertionError, match="NotFoundException"):
        await call(b, "DescribeKey", {"KeyId": "alias/gone-soon"})


def test_the_generation_is_shared_between_descriptors(tmp_path: Path) -> None:
    one, two = SharedGeneration(tmp_path), SharedGeneration(tmp_path)
    try:
        assert one.generation() == two.generation() == 0
        with one.locked():
            one.publish()
        assert two.generation() == 1
        assert (tmp_path / "kms.shared").stat().st_mode & 0o777 == 0o600
    finally:
        one.close()
        two.close()


def test_a_worker_over_its_share_defers_to_the_least_loaded_sibling(tmp_path: Path) -> None:
    shared = [SharedGeneration(tmp_path) for _ in range(3)]
    try:
        shares = [ConnectionShare(s, i, 3) for i, s in enumerate(shared)]
        shares[0].update(2)
        shares[1].update(1)
        shares[2].update(2)
        assert shares[0].over_share(2)  # worker 1 holds fewer
        assert not shares[1].over_share(1)
        shares[1].update(2)
        assert not any(share.over_share(2) for share in shares)  # even: nobody waits
    finally:
        for s in shared:
            s.close()
