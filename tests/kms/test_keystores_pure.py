"""The pure parts of external key stores: the double-encrypted blob's format (Hypothesis: any
bytes parse or fail with CiphertextFormatError, bounded), the stored record, the endpoint rule,
and the request layer's checks of the proxy credential (the secret never echoed)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms import api
from kms.errors import CiphertextFormatError, KmsApiError
from kms.keystores import blob
from kms.keystores.record import (
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    FAILED,
    EndpointError,
    KeyStore,
    new_store_id,
    validate_endpoint,
)
from kms.storage import SCHEMA_VERSION, KeyStoreRow, SqliteStorage
from kms.xks.codec import EncryptResult

_KEY = "1234abcd-12ab-34cd-56ef-1234567890ab"


def _result(
    ciphertext: bytes, *, iv: bytes = b"\x01" * 12, metadata: bytes = b""
) -> EncryptResult:
    return EncryptResult(
        ciphertext=ciphertext, iv=iv, tag=b"\x02" * 16, ciphertext_metadata=metadata
    )


def test_blob_round_trip() -> None:
    head = blob.header(_KEY, 1)
    for iv, md in ((b"\x01" * 12, b""), (b"\x03" * 16, b"m" * 20)):
        raw = blob.assemble(head, _result(b"c" * 40, iv=iv, metadata=md))
        parsed = blob.parse(raw)
        assert (parsed.key_id, parsed.key_version, parsed.header) == (_KEY, 1, head)
        assert (parsed.iv, parsed.ciphertext_metadata) == (iv, md)
        assert parsed.tag == b"\x02" * 16
        assert parsed.ciphertext == b"c" * 40
        assert blob.is_external_blob(raw)


def test_aads_bind_the_context() -> None:
    head = blob.header(_KEY, 1)
    a = blob.outer_aad(head, {"a": "1"})
    assert a != blob.outer_aad(head, {"a": "2"})
    assert len(a) == len(head) + 32  # a digest: the same size whatever the context
    assert len(blob.outer_aad(head, {"k": "v" * 4000})) == len(a)
    assert blob.inner_aad(head, {"a": "1"}) != blob.inner_aad(head, {"a": "2"})
    assert blob.inner_aad(head, None) == blob.inner_aad(head, {})


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_parse_any_bytes(data: bytes) -> None:
    try:
        parsed = blob.parse(data)
    except CiphertextFormatError:
        return
    assert parsed.header == data[: len(parsed.header)]
    assert len(parsed.ciphertext) >= blob.INNER_OVERHEAD


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=28, max_size=200), st.integers(0, 200), st.integers(0, 255))
def test_parse_mutated_blob(body: bytes, at: int, value: int) -> None:
    raw = bytearray(blob.assemble(blob.header(_KEY, 1), _result(body)))
    raw[at % len(raw)] = value
    try:
        blob.parse(bytes(raw))
    except CiphertextFormatError:
        pass


def test_parse_refuses_oversized() -> None:
    with pytest.raises(CiphertextFormatError):
        blob.parse(b"\x02" + b"\x00" * 7000)


def test_record_round_trip_and_states() -> None:
    store = KeyStore(
        store_id=new_store_id(),
        name="s",
        created=1.5,
        endpoint="https://xks.example.com",
        uri_path="/kms/xks/v1",
        access_key_id="A" * 20,
    )
    assert store.store_id.startswith("cks-")
    assert len(store.store_id) == 21
    assert KeyStore.from_record(store.store_id, store.record()) == store
    failed = store.with_state(FAILED, error_code="NETWORK_ERRORS")
    assert failed.describe()["ConnectionErrorCode"] == "NETWORK_ERRORS"
    assert "ConnectionErrorCode" not in failed.with_state(DISCONNECTED).describe()
    assert store.with_state(CONNECTED, error_code="X").error_code is None
    connecting = store.with_state(CONNECTING)
    assert connecting.with_state(CONNECTED).attempt is None
    bad = json.loads(store.record())
    bad["ConnectionState"] = "SIDEWAYS"
    with pytest.raises(ValueError, match="connection state"):
        KeyStore.from_record(store.store_id, json.dumps(bad))
    assert "secret" not in store.record().lower()


@pytest.mark.parametrize(
    "endpoint",
    ["https://xks.example.com", "https://xks.example.com:8443", "http://127.0.0.1:9000",
     "http://localhost:1"],
)  # fmt: skip
def test_endpoints_accepted(endpoint: str) -> None:
    assert validate_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://xks.example.com",  # plain HTTP off loopback
        "https://xks.example.com/kms/xks/v1",  # a path: that is XksProxyUriPath
        "ftp://xks.example.com",
        "https://xks.example.com:99999",
        "https://user@xks.example.com",
        "https://xks.example.com\n",
    ],
)
def test_endpoints_refused(endpoint: str) -> None:
    with pytest.raises(EndpointError):
        validate_endpoint(endpoint)


def _create(credential: Any) -> dict[str, Any]:
    body = json.dumps(
        {
            "CustomKeyStoreName": "s",
            "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
            "XksProxyAuthenticationCredential": credential,
        }
    ).encode()
    return api.parse_request("TrentService.CreateCustomKeyStore", body)[1]


def test_credential_validation_never_echoes_the_secret() -> None:
    good = {"AccessKeyId": "A" * 20, "RawSecretAccessKey": "s" * 43}
    assert _create(good)["XksProxyAuthenticationCredential"] == good
    secret = "not/valid!" + "x" * 40
    cases = [
        {"AccessKeyId": "A" * 20},
        {"AccessKeyId": "a" * 20, "RawSecretAccessKey": "s" * 43},
        {"AccessKeyId": "A" * 20, "RawSecretAccessKey": secret},
        {"AccessKeyId": "A" * 20, "RawSecretAccessKey": "s" * 65},
        {"AccessKeyId": "A" * 20, "RawSecretAccessKey": 7},
        "AKIA/secret",
    ]
    for credential in cases:
        with pytest.raises(KmsApiError) as e:
            _create(credential)
        assert e.value.type_name in ("ValidationException", "SerializationException")
        assert secret not in e.value.message
        assert "s" * 43 not in e.value.message


def test_storage_keeps_key_stores_and_migrates_schema_3(tmp_path: Path) -> None:
    path = tmp_path / "kms.sqlite3"
    store = SqliteStorage(path)
    row = KeyStoreRow("cks-1", '{"x": 1}', b"wrapped", b"mac")
    store.put_key_store(row)
    store.put_key_store(KeyStoreRow("cks-2", "{}", b"w2", b"m2"))
    store.delete_key_store("cks-2")
    assert list(store.load().key_stores) == [row]
    store.close()
    # A schema-3 database (before custom key stores) gains the table, its rows untouched.
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE custom_key_stores")
        db.execute("PRAGMA user_version=3")
    db.close()
    store = SqliteStorage(path)
    try:
        assert list(store.load().key_stores) == []
        store.put_key_store(row)
        assert list(store.load().key_stores) == [row]
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.close()
