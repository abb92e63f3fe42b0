"""The stored key record (kms.service KeyRecord): records written by main's code before the
TypedDict parse and re-serialize to the same bytes; a state directory loads, and saving each key
unchanged writes byte-identical rows; an authentic record of the wrong shape quarantines its key
at load with a message naming the member (not a crash in a later request)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Required, get_origin, get_type_hints

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.app import DB_FILE
from kms.service import _record
from kms.service._record import KeyRecord, parse_key_record

from .key_record_scenario import KEYS, Clock, call, make_app, populate, rows

#: Key records as main's code (before KeyRecord, at 44bd8ad) stored them, one per kind of
#: key and state; made by :func:`populate` (see the file's ``made_by``).
_MAIN_RECORDS = Path(__file__).parent / "data" / "key_records_main.json"


def test_records_written_by_main_read_back_to_the_same_bytes() -> None:
    made = json.loads(_MAIN_RECORDS.read_text())
    records: dict[str, str] = made["records"]
    assert len(records) == KEYS
    members: set[str] = set()
    for text in records.values():
        record = parse_key_record(text)
        assert json.dumps(record, sort_keys=True) == text  # what Key.meta_text writes
        members |= set(record)
    # the fixture exercises every member but those of keys in an external key store
    assert members == set(KeyRecord.__annotations__) - {"CustomKeyStoreId", "XksKeyId"}


async def test_a_state_directory_loads_and_saves_byte_identical_rows(tmp_path: Path) -> None:
    state, clock = tmp_path / "kms", Clock()
    app = make_app(state, clock)
    try:
        await populate(app.service, clock)
    finally:
        app.close()
    before = rows(state)
    assert len(before) == KEYS
    app = make_app(state, clock)  # a restart: every record goes through parse_key_record
    try:
        svc = app.service
        assert not svc.quarantined
        for key in svc.all_keys():
            await svc.save(key, key.meta.copy())
        for key_id in before:
            await call(svc, "DescribeKey", KeyId=key_id)
    finally:
        app.close()
    assert rows(state) == before


def _tamper_authentically(state: Path, edit: dict[str, object]) -> str:
    """Rewrite one key's record and re-tag it with the master key: an authentic record of the
    wrong shape (what a bug would store)."""
    app = make_app(state, Clock())
    try:
        svc = app.service
        key = next(k for k in svc.all_keys() if k.meta["Description"] == "rotated")
        meta: dict[str, object] = {**key.meta, **edit}
        for name, value in edit.items():
            if value is _DROP:
                del meta[name]
        text = json.dumps(meta, sort_keys=True)
        tag = svc.master.key_record_tag(key.key_id, text, key.policy.text)
        key_id = key.key_id
    finally:
        app.close()
    db = sqlite3.connect(state / DB_FILE)
    with db:
        db.execute("UPDATE keys SET meta=?, mac=? WHERE key_id=?", (text, tag, key_id))
    db.close()
    return key_id


_DROP = object()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"Tags": "a,b"}, "key record member Tags is not a list"),
        ({"CurrentVersion": "1"}, "key record member CurrentVersion is not an integer"),
        ({"Enabled": 1}, "key record member Enabled is not a boolean"),
        ({"KeyState": _DROP}, "key record member KeyState is missing"),
        ({"Materials": {"1": {"Id": 5, "State": "CURRENT"}}}, "member Materials.1.Id is not"),
    ],
)
async def test_an_authentic_record_of_the_wrong_shape_is_quarantined_at_load(
    tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    state, clock = tmp_path / "kms", Clock()
    app = make_app(state, clock)
    try:
        await populate(app.service, clock)
    finally:
        app.close()
    key_id = _tamper_authentically(state, edit)
    app = make_app(state, clock)
    try:
        assert message in app.service.quarantined[key_id]
        assert len(app.service.all_keys()) == KEYS - 1  # the others serve on
    finally:
        app.close()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    base=st.just(
        {
            "CreationDate": 1.0,
            "Description": "",
            "Enabled": True,
            "KeyState": "Enabled",
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeySpec": "SYMMETRIC_DEFAULT",
            "Origin": "AWS_KMS",
            "CurrentVersion": 1,
        }
    ),
    name=st.sampled_from([*sorted(KeyRecord.__annotations__), "Unknown"]),
    value=_JSON,
)
def test_any_member_value_parses_or_is_a_value_error_naming_it(
    base: dict[str, object], name: str, value: object
) -> None:
    text = json.dumps({**base, name: value})
    try:
        record = parse_key_record(text)
    except ValueError as exc:
        failure: ValueError | None = exc
    else:
        failure = None
    if failure is not None:
        assert f"key record member {name}" in str(failure)
        return
    assert record[name] == value  # type: ignore[literal-required]


@pytest.mark.parametrize("text", ["[]", "5", '"x"', "null"])
def test_a_record_that_is_not_a_json_object_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="key record is not a JSON object"):
        parse_key_record(text)


@pytest.mark.parametrize("text", ["{", "", "{} x"])
def test_a_record_that_is_not_json_is_a_value_error(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):  # a ValueError: the load quarantines the key
        parse_key_record(text)


@pytest.mark.parametrize(
    ("record", "checks", "required"),
    [
        (KeyRecord, _record._KEY, _record.KEY_REQUIRED),
        (_record.MaterialRecord, _record._MATERIAL, _record._MATERIAL_REQUIRED),
    ],
)
def test_the_load_checks_match_the_typeddicts(
    record: type, checks: dict[str, object], required: tuple[str, ...]
) -> None:
    hints = get_type_hints(record, include_extras=True)
    assert set(checks) == set(hints)
    assert set(required) == {n for n, h in hints.items() if get_origin(h) is Required}
