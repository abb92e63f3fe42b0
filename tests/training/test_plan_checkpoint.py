"""The plan (untrusted, from the host) and the checkpoint bytes: checked, bounded, typed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.training import CheckpointError, TrainingError
from models.training.checkpoint import decode_checkpoint, encode_checkpoint
from models.training.plan import Plan


def _plan(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "generation": 3,
        "rank": 1,
        "members": [{"cid": 16, "module_id": "a"}, {"cid": 17, "module_id": "b"}],
        "start_step": 10,
        "steps": 20,
        "protected": True,
        "stop": None,
    }
    raw.update(over)
    return raw


def test_a_good_plan_round_trips_and_its_digest_ignores_only_the_rank() -> None:
    plan = Plan.from_json(_plan(), shards=4)
    assert plan.world == 2
    assert Plan.from_json(plan.to_json(), shards=4) == plan
    assert Plan.from_json(_plan(rank=0), shards=4).digest() == plan.digest()
    assert Plan.from_json(_plan(steps=21), shards=4).digest() != plan.digest()
    assert Plan.from_json({"stop": "done"}, shards=4).stop == "done"


@pytest.mark.parametrize(
    "over",
    [
        {"rank": 2},
        {"rank": -1},
        {"start_step": 30},
        {"steps": True},
        {"protected": "yes"},
        {"members": []},
        {"members": [{"cid": 16, "module_id": "a"}] * 2},
        {"members": [{"cid": i, "module_id": str(i)} for i in range(5)]},  # more than shards
        {"members": [{"cid": "16", "module_id": "a"}]},
        {"members": [{"cid": 16, "module_id": "x" * 129}]},
    ],
)
def test_a_bad_plan_is_refused(over: dict[str, Any]) -> None:
    with pytest.raises(TrainingError):
        Plan.from_json(_plan(**over), shards=4)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
        max_leaves=20,
    )
)
def test_any_plan_bytes_parse_or_fail_typed(raw: object) -> None:
    try:
        Plan.from_json(raw, shards=4)
    except TrainingError:
        pass


def test_a_checkpoint_round_trips_and_is_checked() -> None:
    params = np.arange(10, dtype=np.float32)
    data = encode_checkpoint(7, params, {"sizes": [2, 3]})
    back = decode_checkpoint(data, fingerprint={"sizes": [2, 3]}, size=10)
    assert back.step == 7
    assert back.params.tobytes() == params.tobytes()
    with pytest.raises(CheckpointError, match="another model"):
        decode_checkpoint(data, fingerprint={"sizes": [2, 4]}, size=10)
    with pytest.raises(CheckpointError, match="do not fit"):
        decode_checkpoint(data, fingerprint={"sizes": [2, 3]}, size=11)
    with pytest.raises(CheckpointError, match="malformed"):
        decode_checkpoint(data[:-20], fingerprint={"sizes": [2, 3]}, size=10)
    nan = encode_checkpoint(7, np.full(10, np.nan, dtype=np.float32), {"sizes": [2, 3]})
    with pytest.raises(CheckpointError):
        decode_checkpoint(nan, fingerprint={"sizes": [2, 3]}, size=10)
