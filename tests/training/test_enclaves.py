"""Confidential training with real enclaves (issue 16), one set of enclaves for the module.

The module's stack (CA, KMS, host store, relay, coordinator) runs three workers of the
training image (``models/train_app``) and an intruder: the same app in another image (its
``train.toml`` differs by a comment: another PCR0). One trio run plays every scenario in
order against them (enclaves are costly on this 2-core machine) and keeps each outcome; each
test then checks one:

* a protected run learns; a run resumed from its step-10 checkpoint ends bit-identical;
* a shard or a checkpoint tampered on the host is refused;
* the intruder, put in the ring by the (untrusted) host, is kept out (and KMS refuses it the
  data key);
* the unprotected baseline is refused by the product's image;
* a worker killed mid-run: the run resumes from the last checkpoint with the remaining two;
  killed again with ``min_workers=2``: TooFewWorkers.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from models.training import (
    CheckpointError,
    TooFewWorkers,
    TrainingError,
    UnprotectedRefused,
)
from models.training.host import GROUP, TRAIN_APP_DIR, build_training_image, open_training
from runtime.stack import open_stack, read_audit, size_pool_for

pytestmark = pytest.mark.slow

#: Every scenario together (start, eight runs, a loaded 2-core machine).
MODULE_TIMEOUT_S = 600
STEPS = 20
LONG_STEPS = 400  # long enough to kill a worker mid-run


def _flip(path: Path, at: int) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    return original


async def _kill_at_checkpoint(training: Any, victim: Any, outputs: Path) -> None:
    """Terminate ``victim`` once the run's first checkpoint is on the host (mid-run)."""
    while not (outputs / "ckpt-00000010").exists():
        await trio.sleep(0.02)
    await training.stack.runtime.terminate(victim.enclave_id)


async def _scenarios(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    state = root / "s"
    state.mkdir(mode=0o700)
    size_pool_for(state, 4)
    intruder_app = root / "intruder_app"
    shutil.copytree(TRAIN_APP_DIR, intruder_app)
    with (intruder_app / "train.toml").open("a") as f:
        f.write("# another image: the same code, another measurement\n")
    intruder_eif = await trio.to_thread.run_sync(
        lambda: build_training_image(root / "intruder.eif", app_dir=intruder_app)
    )
    out["intruder_pcr0"] = intruder_eif.pcrs[0]

    async def attempt(name: str, coro: Any) -> None:
        try:
            out[name] = await coro
        except TrainingError as exc:
            out[name] = exc

    async with open_stack(state) as stack, open_training(stack, root / "w", workers=3) as t:
        out["pcr0"] = t.pcr0
        w0, w1, w2 = t.workers
        outputs = t.outputs_dir
        intruder = await stack.runtime.run_enclave(
            root / "intruder.eif", cpu_count=1, memory_mib=384, name=GROUP, wait_ready=True
        )
        out["intruder_id"] = intruder.enclave_id

        await attempt("first", t.run(STEPS, members=[w0, w1]))
        await attempt("resumed", t.run(STEPS, members=[w0, w1], start_step=10))

        shard = t.outputs_dir.parent / "data" / "shard-1"
        original = _flip(shard, shard.stat().st_size - 40)
        await attempt("tampered_shard", t.run(4, members=[w0, w1]))
        shard.write_bytes(original)

        ckpt = outputs / "ckpt-00000010"
        original = _flip(ckpt, ckpt.stat().st_size - 40)
        await attempt("tampered_checkpoint", t.run(12, members=[w0, w1], start_step=10))
        ckpt.write_bytes(original)

        await attempt("intruder", t.run(4, members=[w0, intruder]))
        await attempt("intruder_alone", t.run(4, members=[intruder]))
        out["audit"] = read_audit(stack.kms_state_dir)
        await attempt("unprotected", t.run(4, members=[w0, w1], protected=False))

        for p in outputs.iterdir():
            p.unlink()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_kill_at_checkpoint, t, w2, outputs)
            await attempt("killed", t.run(LONG_STEPS, members=[w0, w1, w2], min_workers=2))
        for p in outputs.iterdir():
            p.unlink()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_kill_at_checkpoint, t, w1, outputs)
            await attempt("too_few", t.run(LONG_STEPS, members=[w0, w1], min_workers=2))
    return out


@pytest.fixture(scope="module")
def outcome() -> Iterator[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="er-train-"))
    try:

        async def bounded() -> dict[str, Any]:
            with trio.fail_after(MODULE_TIMEOUT_S):
                return await _scenarios(root)

        yield trio.run(bounded)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _result(outcome: dict[str, Any], name: str) -> Any:
    value = outcome[name]
    assert not isinstance(value, Exception), f"{name}: {value!r}"
    return value


def test_a_protected_run_learns_over_the_attested_ring(outcome: dict[str, Any]) -> None:
    first = _result(outcome, "first")
    assert first.world == 2
    assert first.accuracy > 0.8  # 20 steps of a 10-class problem (chance: 0.1)
    assert first.resumes == ()
    for report in first.reports:
        assert report["phases"]["exchange_s"] > 0
        assert report["phases"]["exchanged_bytes"] > 0
    assert first.reports[0]["phases"]["checkpoint_s"] > 0
    # Every data key went to an enclave of the training image, through Recipient.
    released = [r for r in outcome["audit"] if r.get("decision") == "allow" and r.get("recipient")]
    assert released
    assert {r["recipient"]["image_sha384"] for r in released} == {outcome["pcr0"].hex()}


def test_a_resumed_run_ends_bit_identical(outcome: dict[str, Any]) -> None:
    first, resumed = _result(outcome, "first"), _result(outcome, "resumed")
    assert resumed.final_sha384 == first.final_sha384
    assert resumed.accuracy == first.accuracy


def test_a_tampered_shard_is_refused(outcome: dict[str, Any]) -> None:
    error = outcome["tampered_shard"]
    assert isinstance(error, TrainingError)
    assert "SealedIntegrityError" in str(error)


def test_a_tampered_checkpoint_is_refused(outcome: dict[str, Any]) -> None:
    error = outcome["tampered_checkpoint"]
    assert isinstance(error, TrainingError)
    assert "SealedIntegrityError" in str(error)
    assert not isinstance(error, CheckpointError) or "integrity" in str(error).lower()


def test_a_worker_with_another_pcr0_is_kept_out(outcome: dict[str, Any]) -> None:
    assert outcome["intruder_pcr0"] != outcome["pcr0"]
    error = outcome["intruder"]
    assert isinstance(error, TrainingError)
    # The ring's handshakes refuse it on both sides (the first failure is one of them; the
    # other side may have been aborted first), before anyone asks KMS for the data.
    assert "AuthenticationFailed" in str(error)
    assert "KmsApiError" not in str(error)


def test_and_kms_refuses_it_the_data_key(outcome: dict[str, Any]) -> None:
    error = outcome["intruder_alone"]
    assert isinstance(error, TrainingError)
    assert "AccessDenied" in str(error)
    asked = [
        r
        for r in outcome["audit"]
        if (r.get("recipient") or {}).get("module_id") == outcome["intruder_id"]
    ]
    assert asked
    assert all(r["decision"] != "allow" for r in asked)


def test_the_unprotected_baseline_is_refused_by_the_product_image(
    outcome: dict[str, Any],
) -> None:
    error = outcome["unprotected"]
    assert isinstance(error, UnprotectedRefused)
    assert "enclave bench training" in str(error)


def test_a_killed_worker_resumes_from_the_checkpoint_with_the_rest(
    outcome: dict[str, Any],
) -> None:
    killed = _result(outcome, "killed")
    assert killed.world == 2
    assert len(killed.resumes) == 1
    resume = killed.resumes[0]
    kinds = [f["error"] for f in resume["failures"]]
    # The killed worker ended; the survivors failed the step typed: the link was lost, or the
    # host aborted the run first (it saw the enclave end).
    assert kinds.count("exited") == 1
    assert set(kinds) - {"exited"} <= {"MemberLost", "RunAborted"}
    assert len(kinds) == 3
    assert resume["members"] == 2
    assert resume["resumed_from"] >= 10
    assert resume["resumed_from"] % 10 == 0
    assert killed.accuracy > 0.8


def test_too_few_remaining_workers_is_a_clear_error(outcome: dict[str, Any]) -> None:
    error = outcome["too_few"]
    assert isinstance(error, TooFewWorkers)
    assert "1 training worker(s) remain, the run needs 2" in str(error)
