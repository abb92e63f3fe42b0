"""The records' typed shapes (issue 11, "Typed faces"): ``EnclaveInfo``'s JSON forms are
TypedDicts whose keys are exactly what is printed or stored, their bytes stay those of before
(pinned), and the parsers take ``Mapping[str, object]`` documents, refusing any value of the
wrong type with a :class:`RecordError` (a ``ValueError``: what ``StateDir`` and the host
client already catch)."""

from __future__ import annotations

import hashlib
import json
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import runtime
from runtime.records import (
    AppStatusRecord,
    EnclaveDescribeInfo,
    EnclaveInfo,
    EnclaveRecord,
    EnclaveRunInfo,
    ExitKind,
    ExitReason,
    ExitReasonRecord,
    IsolationReport,
    RecordError,
)
from transport.errors import EnclaveError

INFO = EnclaveInfo(
    enclave_name="web",
    enclave_id="i-0123456789abcdef0-enc0123456789abcdef",
    process_id=4242,
    enclave_cid=17,
    cpu_ids=(1, 3),
    memory_mib=512,
    state="RUNNING",
    debug=True,
    measurements={"PCR0": "aa" * 48, "PCR1": "bb" * 48, "PCR2": "cc" * 48, "PCR3": "dd" * 48},
    image_name="web",
    image_version="1.0",
    metadata={"BuildTool": "enclave", "Custom": [1, {"x": None}]},
    isolation=IsolationReport({"pidns": "enforced", "seccomp": "missing: no"}),
    app_pid=4243,
    eif_path="/tmp/web.eif",
    exit_reason=ExitReason(ExitKind.SIGNALED, None, 9, "killed"),
    outside_uid=100017,
    app_status={"State": "READY", "Detail": "", "Ports": [5000, 5001]},
)

#: sha256 of ``json.dumps`` of each form of INFO, as produced before the forms were typed.
PINNED = {
    "record": "15f73985a27ec57133f78824540c4de5813a5f43926d7dc12bd89fe7941cdea8",
    "describe_metadata": "17eb51ebdd332102be1e895e5313a728fe6924649d7eb64ead88b4e726539765",
    "describe": "acf1f6f52724e19c8f668a5c0c1f3d7877665959a2867b904c08ca5a04d1b06f",
    "run": "7cb168f01f604f69cca5612f186b59ea0c4f52d4f722e0ce5eaf646ded0951a8",
}


def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def _keys(td: type) -> list[str]:
    return list(typing.get_type_hints(td))


def test_the_json_forms_are_pinned() -> None:
    assert _sha(INFO.to_record()) == PINNED["record"]
    assert _sha(INFO.describe_json(metadata=True)) == PINNED["describe_metadata"]
    assert _sha(INFO.describe_json()) == PINNED["describe"]
    assert _sha(INFO.run_json()) == PINNED["run"]


def test_the_typed_dicts_name_exactly_the_keys_in_their_order() -> None:
    assert list(INFO.run_json()) == _keys(EnclaveRunInfo)
    assert list(INFO.describe_json(metadata=True)) == _keys(EnclaveDescribeInfo)
    assert list(INFO.describe_json()) == sorted(
        EnclaveDescribeInfo.__required_keys__, key=_keys(EnclaveDescribeInfo).index
    )
    assert list(INFO.to_record()) == [k for k in _keys(EnclaveRecord) if k != "owner_pid"]
    assert EnclaveRecord.__optional_keys__ == frozenset({"owner_pid"})
    reason = INFO.exit_reason
    assert reason is not None
    assert list(reason.to_json()) == _keys(ExitReasonRecord)
    assert INFO.app_status is not None
    assert list(INFO.app_status) == _keys(AppStatusRecord)


def test_the_shapes_are_on_the_runtime_face() -> None:
    for name in (
        "EnclaveRunInfo",
        "EnclaveDescribeInfo",
        "EnclaveRecord",
        "ExitReasonRecord",
        "AppStatusRecord",
        "RecordError",
    ):
        assert name in runtime.__all__
        assert getattr(runtime, name) is not None


def test_records_round_trip_through_json() -> None:
    assert EnclaveInfo.from_record(json.loads(json.dumps(INFO.to_record()))) == INFO
    reason = ExitReason(ExitKind.EXITED, 3, None, "")
    assert ExitReason.from_json(json.loads(json.dumps(reason.to_json()))) == reason
    bare = {k: v for k, v in INFO.to_record().items() if k in EnclaveRecord.__required_keys__}
    for optional in ("state", "debug", "measurements", "isolation", "eif_path", "app_status"):
        bare.pop(optional)
    minimal = EnclaveInfo.from_record(bare)
    assert minimal.state == "RUNNING"
    assert minimal.app_status is None
    assert minimal.eif_path == ""


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("process_id", "4242"),
        ("process_id", True),
        ("enclave_name", 7),
        ("cpu_ids", [1, "3"]),
        ("cpu_ids", "1,3"),
        ("debug", "yes"),
        ("measurements", {"PCR0": 1}),
        ("metadata", ["not", "a", "map"]),
        ("isolation", {"pidns": None}),
        ("image_name", 1.5),
        ("exit_reason", "oom"),
        ("exit_reason", {"kind": "exploded"}),
        ("exit_reason", {"kind": "exited", "code": "0"}),
        ("app_status", {"State": "READY", "Detail": "", "Ports": ["5000"]}),
        ("app_status", {"State": "READY"}),
    ],
)
def test_a_field_of_the_wrong_type_is_a_record_error(key: str, value: object) -> None:
    record = dict(INFO.to_record())
    record[key] = value
    with pytest.raises(RecordError):
        EnclaveInfo.from_record(record)


def test_a_missing_field_is_a_record_error() -> None:
    record = dict(INFO.to_record())
    del record["enclave_cid"]
    with pytest.raises(RecordError, match="enclave_cid"):
        EnclaveInfo.from_record(record)
    assert issubclass(RecordError, ValueError)
    assert issubclass(RecordError, EnclaveError)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from([*_keys(EnclaveRecord), "other"]) | st.text(max_size=8), _JSON),
    st.dictionaries(st.sampled_from(_keys(EnclaveRecord)), _JSON),
)
def test_any_json_object_parses_or_is_a_record_error(
    noise: dict[str, object], changes: dict[str, object]
) -> None:
    for record in (noise, {**INFO.to_record(), **changes}):
        try:
            info = EnclaveInfo.from_record(record)
        except RecordError:
            continue
        assert EnclaveInfo.from_record(json.loads(json.dumps(info.to_record()))) == info
    try:
        ExitReason.from_json(noise)
    except RecordError:
        pass
