"""kms.service's typed request view (Params): each accessor returns the type it promises or
raises KmsError naming the member (the validator guarantees types: a mismatch is our bug, never a
silent conversion), and every request kms.api.validate accepts reads back unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.api import validate
from kms.app import build_app
from kms.config import KmsConfig
from kms.errors import KmsApiError, KmsError
from kms.service import Caller, Outcome
from kms.service._model import Params

from .helpers import ADMIN

_TEXT = {"KeyId": "alias/x", "Description": ""}
_ALL = {
    **_TEXT,
    "Plaintext": b"\x00secret",
    "Limit": 7,
    "DryRun": True,
    "EncryptionContext": {"a": "b"},
    "GrantTokens": ["t1", "t2"],
    "Tags": [{"TagKey": "k", "TagValue": "v"}],
    "ValidTo": 12.5,
    "Recipient": {"AttestationDocument": b"doc", "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
    "Constraints": {"EncryptionContextEquals": {"x": "y"}, "SourceArn": "arn:x"},
}


def test_each_accessor_returns_its_type() -> None:
    p = Params(_ALL)
    assert p.text("KeyId") == "alias/x"
    assert p.opt_text("Description") == ""  # an empty string is present, not the default
    assert p.opt_text("Description", "default") == ""
    assert p.opt_text("Policy") is None
    assert p.opt_text("Policy", "default") == "default"
    assert p.blob("Plaintext") == b"\x00secret"
    assert p.opt_blob("CiphertextBlob") is None
    assert p.integer("Limit") == 7
    assert p.opt_int("NumberOfBytes") is None
    assert p.opt_int("NumberOfBytes", 32) == 32
    assert p.opt_bool("DryRun") is True
    assert p.flag("DryRun") is True
    assert p.flag("MultiRegion") is False
    assert p.opt_bool("MultiRegion") is None
    assert p.opt_timestamp("ValidTo") == 12.5
    assert p.mapping("EncryptionContext") == {"a": "b"}
    assert p.opt_mapping("DestinationEncryptionContext") is None
    assert p.text_list("GrantTokens") == ["t1", "t2"]
    assert p.opt_text_list("DryRunModifiers", []) == []
    assert p.tags("Tags") == [{"TagKey": "k", "TagValue": "v"}]
    assert p.opt_tags("Missing", []) == []
    assert p.opt_record("Recipient") == _ALL["Recipient"]
    assert p.opt_constraints("Constraints") == {
        "EncryptionContextEquals": {"x": "y"},
        "SourceArn": "arn:x",
    }
    assert "KeyId" in p
    assert "Policy" not in p
    assert set(p) == set(_ALL)
    assert len(p) == len(_ALL)


def test_it_is_read_only_and_copies() -> None:
    members = {"EncryptionContext": {"a": "b"}, "GrantTokens": ["t"]}
    p = Params(members)
    with pytest.raises(AttributeError):
        p._members = {}  # type: ignore[misc]
    p.mapping("EncryptionContext")["a"] = "changed"
    p.text_list("GrantTokens").append("more")
    members["KeyId"] = "late"
    assert p.mapping("EncryptionContext") == {"a": "b"}
    assert p.text_list("GrantTokens") == ["t"]
    assert "KeyId" not in p


def test_repr_names_members_not_values() -> None:
    assert "secret" not in repr(Params({"Plaintext": b"secret"}))


_WRONG: list[tuple[str, object, Callable[[Params, str], object]]] = [
    ("KeyId", 5, Params.text),
    ("KeyId", b"bytes", Params.opt_text),
    ("Plaintext", "base64 text", Params.blob),
    ("Plaintext", bytearray(b"x"), Params.opt_blob),
    ("Limit", True, Params.integer),  # a bool is not an integer
    ("Limit", "7", Params.opt_int),
    ("Limit", 7.0, Params.integer),
    ("DryRun", 1, Params.opt_bool),
    ("DryRun", "true", Params.flag),
    ("ValidTo", 5, Params.opt_timestamp),
    ("EncryptionContext", {"a": 1}, Params.mapping),
    ("EncryptionContext", [("a", "b")], Params.opt_mapping),
    ("GrantTokens", ["a", 2], Params.text_list),
    ("GrantTokens", "a", Params.opt_text_list),
    ("Tags", [{"TagKey": 1}], Params.tags),
    ("Tags", {"TagKey": "k"}, Params.opt_tags),
    ("Recipient", [b"doc"], Params.opt_record),
    ("Constraints", {"EncryptionContextEquals": "x"}, Params.opt_constraints),
    ("Constraints", {"Other": {}}, Params.opt_constraints),
]


@pytest.mark.parametrize(("name", "value", "accessor"), _WRONG)
def test_a_wrong_type_is_a_kms_error_naming_the_member(
    name: str, value: object, accessor: Callable[[Params, str], object]
) -> None:
    with pytest.raises(KmsError, match=f"request member {name} is not") as info:
        accessor(Params({name: value}), name)
    assert not isinstance(info.value, KmsApiError)  # internal: not an answer to the caller


@pytest.mark.parametrize(
    "accessor",
    [Params.text, Params.blob, Params.integer, Params.mapping, Params.text_list, Params.tags],
)
def test_a_missing_required_member_is_a_kms_error(
    accessor: Callable[[Params, str], object],
) -> None:
    with pytest.raises(KmsError, match="request member KeyId is missing"):
        accessor(Params({}), "KeyId")


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
_ACCESSORS = [
    (Params.text, str),
    (Params.opt_text, str),
    (Params.blob, bytes),
    (Params.opt_blob, bytes),
    (Params.integer, int),
    (Params.opt_int, int),
    (Params.opt_bool, bool),
    (Params.flag, bool),
    (Params.opt_timestamp, float),
    (Params.mapping, dict),
    (Params.opt_mapping, dict),
    (Params.text_list, list),
    (Params.opt_text_list, list),
    (Params.tags, list),
    (Params.opt_tags, list),
    (Params.opt_record, dict),
    (Params.opt_constraints, dict),
]


@settings(max_examples=300, deadline=None)
@given(
    members=st.dictionaries(st.sampled_from(["A", "B", "C"]), _VALUES, max_size=3),
    name=st.sampled_from(["A", "B", "C"]),
    which=st.integers(0, len(_ACCESSORS) - 1),
)
def test_any_mapping_gives_the_promised_type_or_a_kms_error(
    members: dict[str, object], name: str, which: int
) -> None:
    accessor, kind = _ACCESSORS[which]
    p = Params(members)
    try:
        got = accessor(p, name)
    except KmsError as exc:
        failure: KmsError | None = exc
    else:
        failure = None
    if failure is not None:
        assert f"request member {name} " in str(failure)
        return
    assert got is None or isinstance(got, kind)
    if kind is int:
        assert not isinstance(got, bool)
    if got is not None and members.get(name) is not None and accessor is not Params.flag:
        assert got == members[name]  # never a conversion


async def test_the_service_reads_requests_through_the_accessors(tmp_path: Path) -> None:
    """A request that skipped kms.api.validate with a wrongly typed member is an internal
    KmsError naming it (not an AWS error, not a TypeError deep inside an operation), and the
    service keeps serving."""
    app = build_app(KmsConfig(state_dir=tmp_path / "kms", credentials=(ADMIN,)), env={})
    try:
        caller = Caller(ADMIN.principal_arn, ADMIN.access_key_id)
        made = await app.service.handle("CreateKey", {"Description": "d"}, caller, Outcome())
        meta = made["KeyMetadata"]
        assert isinstance(meta, dict)
        key_id = meta["KeyId"]
        with pytest.raises(KmsError, match="request member Plaintext is not bytes") as info:
            await app.service.handle(
                "Encrypt", {"KeyId": key_id, "Plaintext": "aGk="}, caller, Outcome()
            )
        assert not isinstance(info.value, KmsApiError)
        with pytest.raises(KmsError, match="request member KeyId is not a string"):
            await app.service.handle("DescribeKey", {"KeyId": [key_id]}, caller, Outcome())
        sealed = await app.service.handle(
            "Encrypt",
            validate("Encrypt", {"KeyId": key_id, "Plaintext": "aGk="}),
            caller,
            Outcome(),
        )
        opened = await app.service.handle(
            "Decrypt",
            validate("Decrypt", {"CiphertextBlob": sealed["CiphertextBlob"]}),
            caller,
            Outcome(),
        )
        assert opened["Plaintext"] == "aGk="
    finally:
        app.close()
