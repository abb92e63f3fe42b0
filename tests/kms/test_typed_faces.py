"""kms's typed faces (issue 11, "Typed faces"): the TypedDicts of the configs' overrides, of the
XKS answers and of DescribeCustomKeyStores match what they describe, the wire bytes stay what
they were, and the documents typed ``Mapping[str, object]`` are checked value by value."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kms
import kms.keystores
import kms.xks
from kms.app import build_app
from kms.client import _base64_member
from kms.config import KmsConfig, KmsConfigChanges
from kms.errors import KmsApiError
from kms.keystores import CustomKeyStoresListEntry, KeyStore
from kms.service import Caller, Outcome, RecipientInfo
from kms.service._scaffold import Request
from kms.xks import (
    EncryptResult,
    HealthStatus,
    KeyMetadata,
    XksProxyConfig,
    XksProxyConfigChanges,
)
from kms.xks.codec import EkmDetails
from kms.xks.config import XksCredential
from transport.errors import ConfigurationError

from .helpers import ADMIN

_NOWHERE = Path("/nonexistent/typed-faces")


def _fields_of(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


@pytest.mark.parametrize(
    ("config", "changes"),
    [(KmsConfig, KmsConfigChanges), (XksProxyConfig, XksProxyConfigChanges)],
)
def test_the_changes_typeddict_names_every_field_with_its_type(
    config: type, changes: type
) -> None:
    fields = {f.name for f in dataclasses.fields(config)}
    hints = _fields_of(changes)
    assert set(hints) == fields
    assert hints == {name: _fields_of(config)[name] for name in fields}
    assert changes.__total__ is False  # type: ignore[attr-defined]


def test_kms_config_overrides_are_checked_as_at_construction() -> None:
    base = KmsConfig()
    changed = base.with_overrides(host="::1", port=0, workers=2)
    assert (changed.host, changed.port, changed.workers) == ("::1", 0, 2)
    assert base.port != 0  # a copy
    with pytest.raises(ConfigurationError, match="port"):
        base.with_overrides(port=70000)
    with pytest.raises(TypeError):
        base.with_overrides(**{"listne": "x"})  # type: ignore[arg-type]


def test_xks_config_overrides_are_checked_as_at_construction() -> None:
    cred = XksCredential("A" * 20, "s" * 43)
    base = XksProxyConfig(credentials=(cred,))
    assert base.with_overrides(request_timeout_s=0.5).request_timeout_s == 0.5
    with pytest.raises(ConfigurationError, match="health_cache_s"):
        base.with_overrides(health_cache_s=61.0)


def test_the_typed_names_are_on_the_faces() -> None:
    assert kms.KmsConfigChanges is KmsConfigChanges
    assert kms.xks.XksProxyConfigChanges is XksProxyConfigChanges
    for name in ("KeyMetadataJson", "EncryptResultJson", "HealthStatusJson", "EkmDetailsJson"):
        assert name in kms.xks.__all__
    for name in ("CustomKeyStoresListEntry", "XksProxyConfiguration"):
        assert name in kms.keystores.__all__


# ---------------------------------------------------------------- documents: Mapping[str, object]

_KMS_KEYS = (
    "listen",
    "host",
    "port",
    "state_dir",
    "credentials",
    "trust_roots",
    "max_document_age_s",
    "region",
    "account_id",
    "max_body_bytes",
    "audit_fsync",
    "clock_skew_s",
    "workers",
    "storage",
)
_XKS_KEYS = (
    "listen",
    "uri_path",
    "region",
    "disconnected",
    "credentials",
    "keys",
    "tls",
    "max_body_bytes",
    "request_timeout_s",
    "health_cache_s",
)
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
#: Any TOML/JSON-shaped value: scalars, lists and tables, a few levels deep.
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(
        st.sampled_from(
            (
                "access_key_id",
                "secret_access_key",
                "principal_arn",
                "session_token",
                "id",
                "backing",
                "type",
                "path",
                "certificate",
                "private_key",
                "x",
            )
        ),
        inner,
        max_size=4,
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KMS_KEYS), _VALUES, max_size=5))
def test_kms_config_from_any_document_is_a_config_or_a_configuration_error(
    document: dict[str, object],
) -> None:
    try:
        config = KmsConfig.from_mapping(document, base_dir=_NOWHERE)
    except ConfigurationError:
        return
    assert isinstance(config, KmsConfig)
    for entry in config.credentials:
        assert isinstance(entry.access_key_id, str)
        assert isinstance(entry.secret_access_key, str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_XKS_KEYS), _VALUES, max_size=5))
def test_xks_config_from_any_document_is_a_config_or_a_configuration_error(
    document: dict[str, object],
) -> None:
    try:
        config = XksProxyConfig.from_mapping(document, base_dir=_NOWHERE)
    except ConfigurationError:
        return
    assert isinstance(config, XksProxyConfig)


@pytest.mark.parametrize(
    "entry",
    [
        {"access_key_id": 12345678, "secret_access_key": "S"},
        {"access_key_id": "A", "secret_access_key": ["S"]},
        {"access_key_id": "A", "secret_access_key": "S", "session_token": 7},
    ],
)
def test_kms_config_credentials_must_be_strings(entry: dict[str, object]) -> None:
    """Regression: a number or a list was turned into its ``str()`` and accepted as a key."""
    with pytest.raises(ConfigurationError, match="must be strings"):
        KmsConfig.from_mapping({"credentials": [entry]})


@pytest.mark.parametrize("config", [KmsConfig, XksProxyConfig])
def test_a_document_that_is_not_a_table_is_refused(config: type) -> None:
    with pytest.raises(ConfigurationError):
        config.from_mapping(["listen", "127.0.0.1:0"])


# ---------------------------------------------------------------- wire bytes


def _wire(obj: object) -> bytes:
    # As kms.xks.service sends an answer.
    return json.dumps(obj, separators=(",", ":")).encode()


def test_xks_answers_are_byte_for_byte_the_same() -> None:
    assert _wire(KeyMetadata("AES_256", ("ENCRYPT", "DECRYPT"), "ENABLED").to_json()) == (
        b'{"keySpec":"AES_256","keyUsage":["ENCRYPT","DECRYPT"],"keyStatus":"ENABLED"}'
    )
    iv, tag = bytes(range(12)), bytes(range(16))
    assert _wire(EncryptResult(b"\x00\x01", iv, tag).to_json()) == (
        b'{"ciphertext":"AAE=","initializationVector":"AAECAwQFBgcICQoL",'
        b'"authenticationTag":"AAECAwQFBgcICQoLDA0ODw=="}'
    )
    full = EncryptResult(b"\x00\x01", iv, tag, b"md", b"\xff" * 32)
    assert _wire(full.to_json()) == (
        b'{"ciphertext":"AAE=","initializationVector":"AAECAwQFBgcICQoL",'
        b'"authenticationTag":"AAECAwQFBgcICQoLDA0ODw==","ciphertextMetadata":"bWQ=",'
        b'"ciphertextDataIntegrityValue":"//////////////////////////////////////////8="}'
    )
    health = HealthStatus(1, "vendor", "model", "ekm", (EkmDetails("k", "m", "ACTIVE"),))
    assert _wire(health.to_json()) == (
        b'{"xksProxyFleetSize":1,"xksProxyVendor":"vendor","xksProxyModel":"model",'
        b'"ekmVendor":"ekm","ekmFleetDetails":[{"id":"k","model":"m","healthStatus":"ACTIVE"}]}'
    )


def test_the_answer_typeddicts_name_exactly_the_wire_fields() -> None:
    assert set(typing.get_type_hints(kms.xks.EncryptResultJson)) == {
        "ciphertext",
        "initializationVector",
        "authenticationTag",
        "ciphertextMetadata",
        "ciphertextDataIntegrityValue",
    }
    assert kms.xks.EncryptResultJson.__required_keys__ == {
        "ciphertext",
        "initializationVector",
        "authenticationTag",
    }
    assert set(typing.get_type_hints(kms.xks.HealthStatusJson)) == set(
        HealthStatus(1, "v", "m", "e", ()).to_json()
    )
    assert set(typing.get_type_hints(kms.xks.KeyMetadataJson)) == set(
        KeyMetadata("AES_256", (), "ENABLED").to_json()
    )


def _store(state: str, error: str | None = None) -> KeyStore:
    store = KeyStore(
        store_id="cks-0123456789abcdef0",
        name="owner",
        created=1800000000.5,
        endpoint="https://xks.example.com",
        uri_path="/kms/xks/v1",
        access_key_id="A" * 20,
    )
    return store.with_state(state, error_code=error)


def test_describe_custom_key_store_is_byte_for_byte_the_same() -> None:
    entry: CustomKeyStoresListEntry = _store("FAILED", "NETWORK_ERRORS").describe()
    assert json.dumps(entry, sort_keys=True) == (
        '{"ConnectionErrorCode": "NETWORK_ERRORS", "ConnectionState": "FAILED", '
        '"CreationDate": 1800000000.5, "CustomKeyStoreId": "cks-0123456789abcdef0", '
        '"CustomKeyStoreName": "owner", "CustomKeyStoreType": "EXTERNAL_KEY_STORE", '
        '"XksProxyConfiguration": {"AccessKeyId": "AAAAAAAAAAAAAAAAAAAA", '
        '"Connectivity": "PUBLIC_ENDPOINT", "UriEndpoint": "https://xks.example.com", '
        '"UriPath": "/kms/xks/v1"}}'
    )
    hints = typing.get_type_hints(CustomKeyStoresListEntry)
    assert set(hints) == set(entry)
    assert set(_store("CONNECTED").describe()) == CustomKeyStoresListEntry.__required_keys__


# ---------------------------------------------------------------- peers' and callers' values


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ({}, "absent"),
        ({"CiphertextBlob": 5}, "not a string"),
        ({"CiphertextBlob": ["AAAA"]}, "not a string"),
        ({"CiphertextBlob": "not base64!"}, "base64"),
    ],
)
def test_a_binary_answer_member_is_checked(answer: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        _base64_member(answer, "CiphertextBlob")
    assert _base64_member({"CiphertextBlob": "AAE="}, "CiphertextBlob") == b"\x00\x01"


def test_a_recipient_without_document_bytes_is_a_validation_error(tmp_path: Path) -> None:
    """Regression: a Recipient whose document was not bytes reached the verifier (or raised
    KeyError when absent); it is refused as malformed before any verification."""
    seen: list[bytes] = []

    def verifier(document: bytes, outcome: Outcome) -> RecipientInfo:
        seen.append(document)
        raise AssertionError("a document that is not bytes must not reach the verifier")

    config = KmsConfig(state_dir=tmp_path / "kms", credentials=(ADMIN,), audit_fsync=False)
    app = build_app(config, env={}, recipient_verifier=verifier)
    try:
        for rec in ({}, {"AttestationDocument": "AAAA"}, {"AttestationDocument": None}):
            outcome = Outcome()
            request = Request({}, Caller(ADMIN.principal_arn, ADMIN.access_key_id), outcome)
            with pytest.raises(KmsApiError) as info:
                app.service.verify_recipient(rec, request, "Decrypt")
            assert info.value.type_name == "ValidationException"
            assert outcome.decision == "deny"
        assert seen == []
    finally:
        app.close()
