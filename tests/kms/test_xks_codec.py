"""The XKS wire codec, pure: the spec's vectors, routing, strict parsing of hostile bodies
(Hypothesis), the AAD framing, and the KMS error table checked against botocore's model."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import botocore
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.xks import codec
from kms.xks.codec import EncryptResult, Operation, ResponseFormatError
from kms.xks.errors import (
    API_ERRORS,
    InvalidUriPathError,
    UnsupportedOperationError,
    ValidationError,
    XksApiError,
)
from kms.xks.failures import XksCallContext, XksFailure

# -- the spec's own example (Appendix C) -----------------------------------------------------


def test_cdiv_matches_the_spec_example() -> None:
    """Appendix C: 33 bytes of AAD, 13 of metadata, 12 of IV, 12 of ciphertext, 16 of tag."""
    aad = b"project=nile,department=marketing"
    result = EncryptResult(
        ciphertext=base64.b64decode("ghxkK1txeDNn3q8Y"),
        iv=base64.b64decode("HMrlRw85cAJUd5Ax"),
        tag=base64.b64decode("vBxN2ncH1oEkR8WVXpmyYQ=="),
        ciphertext_metadata=base64.b64decode("a2V5X3ZlcnNpb249MQ=="),
    )
    assert len(aad) == 33
    assert len(result.ciphertext_metadata) == 13
    assert codec.b64(codec.cdiv(aad, result)) == "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
    assert codec.cdiv(aad, result).hex() == (
        "a8703f2260bd8791ec2d15ea0b23e65a0631eedcf2a13a65cc82db3f47cf5ec7"
    )


def test_gcm_aad_frames_both_lengths() -> None:
    """2-byte big-endian AAD length, AAD, 1-byte metadata length, metadata (spec, Encrypt)."""
    assert codec.gcm_aad(b"", b"") == b"\x00\x00\x00"
    assert codec.gcm_aad(b"ab", b"xyz") == b"\x00\x02ab\x03xyz"
    assert codec.gcm_aad(b"A" * 300) == b"\x01\x2c" + b"A" * 300 + b"\x00"
    # The attack the spec's note describes: metadata passed off as AAD gives another AAD.
    assert codec.gcm_aad(b"", b"meta") != codec.gcm_aad(b"meta", b"")
    with pytest.raises(ValueError):
        codec.gcm_aad(b"", b"x" * 21)


# -- URIs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "operation", "key_id"),
    [
        ("/p/kms/xks/v1/health", Operation.GET_HEALTH_STATUS, None),
        ("/p/kms/xks/v1/keys/k-1.A_b/metadata", Operation.GET_KEY_METADATA, "k-1.A_b"),
        ("/p/kms/xks/v1/keys/k/encrypt", Operation.ENCRYPT, "k"),
        ("/p/kms/xks/v1/keys/" + "k" * 128 + "/decrypt", Operation.DECRYPT, "k" * 128),
    ],
)
def test_route(target: str, operation: Operation, key_id: str | None) -> None:
    got = codec.route(target, "/p/kms/xks/v1")
    assert (got.operation, got.key_id) == (operation, key_id)


@pytest.mark.parametrize(
    "target",
    [
        "/p/kms/xks/v1",
        "/p/kms/xks/v1/",
        "/p/kms/xks/v1/health/",
        "/p/kms/xks/v1/health?x=1",
        "/q/kms/xks/v1/health",
        "/p/invalid/kms/xks/v1/health",
        "/p/kms/xks/v1/keys/k/sign",
        "/p/kms/xks/v1/keys/k",
        "/p/kms/xks/v1/keys//encrypt",
        "/p/kms/xks/v1/keys/" + "k" * 129 + "/encrypt",
        "/p/kms/xks/v1/keys/a%2Fb/encrypt",
        "/p/kms/xks/v1/keys/a b/encrypt",
        "/p/kms/xks/v1/keys/../encrypt",
        "/p/kms/xks/v1/keys/k/encrypt/x",
    ],
)
def test_route_refuses(target: str) -> None:
    with pytest.raises(InvalidUriPathError):
        codec.route(target, "/p/kms/xks/v1")


@pytest.mark.parametrize(
    "path", ["/kms/xks/v1", "/a/kms/xks/v1", "/a-b_c/D/kms/xks/v1", "/" + "a" * 116 + "/kms/xks/v1"]
)
def test_uri_path_accepted(path: str) -> None:
    assert codec.validate_uri_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "kms/xks/v1",
        "/kms/xks/v2",
        "/a//kms/xks/v1",
        "/a.b/kms/xks/v1",
        "/" + "a" * 117 + "/kms/xks/v1",
        "",
    ],
)
def test_uri_path_refused(path: str) -> None:
    with pytest.raises(ValueError):
        codec.validate_uri_path(path)


# -- strict JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'"x"',
        b"\xff\xfe{}",
        b'{"a":1,"a":2}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b"[" * 100_000 + b"]" * 100_000,  # beyond the decoder's recursion limit
        b'{"a":' * 20 + b"1" + b"}" * 20,  # within it, beyond ours
    ],
)
def test_parse_json_refuses(body: bytes) -> None:
    with pytest.raises(ValueError):
        codec.parse_json(body)


# -- requests --------------------------------------------------------------------------------

_MD = {"awsPrincipalArn": "p", "kmsKeyArn": "k", "kmsOperation": "Encrypt", "kmsRequestId": "r"}


def _b64(n: int) -> str:
    return base64.b64encode(os.urandom(n)).decode()


def test_request_metadata_requirements() -> None:
    health = codec.parse_request_metadata(
        {"requestMetadata": {"kmsRequestId": "r", "kmsOperation": "KmsHealthCheck"}},
        Operation.GET_HEALTH_STATUS,
    )
    assert health.kms_operation == "KmsHealthCheck"
    # Fields AWS may add later, and unknown kmsOperation values, are accepted (spec).
    md = codec.parse_request_metadata(
        {"requestMetadata": {**_MD, "kmsOperation": "BulkEncrypt", "newField": "x"}},
        Operation.ENCRYPT,
    )
    assert md.kms_operation == "BulkEncrypt"
    for op in Operation:
        with pytest.raises(ValidationError):
            codec.parse_request_metadata({}, op)
        with pytest.raises(ValidationError):
            codec.parse_request_metadata({"requestMetadata": {}}, op)
    with pytest.raises(ValidationError):  # kmsKeyArn is required for Encrypt
        codec.parse_request_metadata(
            {"requestMetadata": {k: v for k, v in _MD.items() if k != "kmsKeyArn"}},
            Operation.ENCRYPT,
        )
    with pytest.raises(ValidationError):
        codec.parse_request_metadata(
            {"requestMetadata": {**_MD, "awsPrincipalArn": 5}}, Operation.ENCRYPT
        )
    with pytest.raises(ValidationError):  # ARNs up to 2048 characters, no more
        codec.parse_request_metadata(
            {"requestMetadata": {**_MD, "kmsKeyArn": "a" * 2049}}, Operation.ENCRYPT
        )


def test_encrypt_request_sizes() -> None:
    """The spec's minimums are accepted; past this proxy's maximum is UnsupportedOperation."""
    ok = codec.parse_encrypt_request(
        {"plaintext": _b64(4300), "encryptionAlgorithm": "AES_GCM",
         "additionalAuthenticatedData": _b64(8192)}
    )  # fmt: skip
    assert len(ok.plaintext) == 4300
    assert len(ok.aad) == 8192
    assert not ok.want_cdiv
    with pytest.raises(UnsupportedOperationError):
        codec.parse_encrypt_request(
            {"plaintext": _b64(codec.MAX_DATA_BYTES + 1), "encryptionAlgorithm": "AES_GCM"}
        )
    with pytest.raises(UnsupportedOperationError):
        codec.parse_encrypt_request(
            {"plaintext": _b64(1), "encryptionAlgorithm": "AES_GCM",
             "additionalAuthenticatedData": _b64(codec.MAX_AAD_BYTES + 1)}
        )  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        {"encryptionAlgorithm": "AES_GCM"},
        {"plaintext": "SGk=", "encryptionAlgorithm": "AES_CBC"},
        {"plaintext": "SGk="},
        {"plaintext": "not base64!", "encryptionAlgorithm": "AES_GCM"},
        {"plaintext": "SGk", "encryptionAlgorithm": "AES_GCM"},
        {"plaintext": 5, "encryptionAlgorithm": "AES_GCM"},
        {"plaintext": "SGk=", "encryptionAlgorithm": "AES_GCM",
         "ciphertextDataIntegrityValueAlgorithm": "MD5"},
    ],
)  # fmt: skip
def test_encrypt_request_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        codec.parse_encrypt_request(body)


def _decrypt_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ciphertext": _b64(12), "encryptionAlgorithm": "AES_GCM",
        "initializationVector": _b64(12), "authenticationTag": _b64(16),
    }  # fmt: skip
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def test_decrypt_request() -> None:
    req = codec.parse_decrypt_request(_decrypt_body(ciphertextMetadata=_b64(20)))
    assert len(req.ciphertext_metadata) == 20
    assert req.aad == b""
    assert len(codec.parse_decrypt_request(_decrypt_body(initializationVector=_b64(16))).iv) == 16
    for bad in (
        _decrypt_body(initializationVector=_b64(8)),
        _decrypt_body(authenticationTag=_b64(12)),
        _decrypt_body(authenticationTag=None),
        _decrypt_body(initializationVector=None),
        _decrypt_body(ciphertext=None),
    ):
        with pytest.raises(ValidationError):
            codec.parse_decrypt_request(bad)
    with pytest.raises(UnsupportedOperationError):  # metadata is at most 20 bytes
        codec.parse_decrypt_request(_decrypt_body(ciphertextMetadata=_b64(21)))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
_field_names = st.sampled_from(
    ["plaintext", "ciphertext", "encryptionAlgorithm", "additionalAuthenticatedData",
     "initializationVector", "authenticationTag", "ciphertextMetadata",
     "ciphertextDataIntegrityValueAlgorithm", "requestMetadata"]
)  # fmt: skip
_bodies = st.dictionaries(
    _field_names,
    _json_values | st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    max_size=9,
)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300) | _bodies.map(lambda b: json.dumps(b).encode()))
def test_request_parsing_only_raises_api_errors(raw: bytes) -> None:
    """Whatever the peer sends, the server's parsers answer with an XKS error or a value."""
    try:
        body = codec.parse_json(raw)
    except ValueError:
        return
    for op in Operation:
        try:
            codec.parse_request_metadata(body, op)
        except XksApiError:
            pass
    for parse in (codec.parse_encrypt_request, codec.parse_decrypt_request):
        try:
            parse(body)
        except XksApiError:
            pass


# -- responses (client side) -----------------------------------------------------------------


def _encrypt_answer(pt_len: int = 5, **changes: Any) -> bytes:
    body: dict[str, Any] = {
        "ciphertext": _b64(pt_len), "initializationVector": _b64(12), "authenticationTag": _b64(16),
    }  # fmt: skip
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_encrypt_answer_checks() -> None:
    ok = codec.parse_encrypt_result(_encrypt_answer(), plaintext_len=5, aad=b"", want_cdiv=False)
    assert len(ok.ciphertext) == 5
    bad = [
        _encrypt_answer(ciphertext=_b64(6)),  # not as long as the plaintext
        _encrypt_answer(initializationVector=_b64(8)),
        _encrypt_answer(authenticationTag=_b64(15)),
        _encrypt_answer(ciphertextMetadata=_b64(21)),
        _encrypt_answer(authenticationTag=None),
        b"not json",
        b"[]",
    ]
    for raw in bad:
        with pytest.raises(ResponseFormatError):
            codec.parse_encrypt_result(raw, plaintext_len=5, aad=b"", want_cdiv=False)
    with pytest.raises(ResponseFormatError):  # CDIV asked for, absent
        codec.parse_encrypt_result(_encrypt_answer(), plaintext_len=5, aad=b"", want_cdiv=True)


def test_encrypt_answer_cdiv_is_verified() -> None:
    parts = {"ciphertext": os.urandom(5), "iv": os.urandom(12), "tag": os.urandom(16)}
    result = EncryptResult(**parts)
    good = codec.cdiv(b"aad", result)
    answer = {
        "ciphertext": codec.b64(parts["ciphertext"]),
        "initializationVector": codec.b64(parts["iv"]),
        "authenticationTag": codec.b64(parts["tag"]),
    }
    raw = json.dumps({**answer, "ciphertextDataIntegrityValue": codec.b64(good)}).encode()
    got = codec.parse_encrypt_result(raw, plaintext_len=5, aad=b"aad", want_cdiv=True)
    assert (
        got.cdiv
        == good
        == hashlib.sha256(b"aad" + parts["iv"] + parts["ciphertext"] + parts["tag"]).digest()
    )
    flipped = bytes([good[0] ^ 1]) + good[1:]
    raw = json.dumps({**answer, "ciphertextDataIntegrityValue": codec.b64(flipped)}).encode()
    with pytest.raises(ResponseFormatError):
        codec.parse_encrypt_result(raw, plaintext_len=5, aad=b"aad", want_cdiv=True)


def _health(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "xksProxyFleetSize": 2, "xksProxyVendor": "v", "xksProxyModel": "m", "ekmVendor": "e",
        "ekmFleetDetails": [{"id": "a", "model": "b", "healthStatus": "DEGRADED"}],
    }  # fmt: skip
    body.update(changes)
    return json.dumps(body).encode()


def test_health_answer_checks() -> None:
    assert codec.parse_health_status(_health()).ekm_fleet_details[0].health_status == "DEGRADED"
    entry = {"id": "a", "model": "b", "healthStatus": "ACTIVE"}
    for raw in (
        _health(xksProxyFleetSize=0),
        _health(xksProxyFleetSize=True),
        _health(ekmFleetDetails=[]),
        _health(ekmFleetDetails=[entry] * 11),
        _health(ekmFleetDetails=[{**entry, "healthStatus": "FINE"}]),
        _health(ekmVendor=""),
    ):
        with pytest.raises(ResponseFormatError):
            codec.parse_health_status(raw)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200) | _bodies.map(lambda b: json.dumps(b).encode()))
def test_response_parsing_only_raises_format_errors(raw: bytes) -> None:
    for parse in (
        codec.parse_key_metadata,
        codec.parse_health_status,
        lambda r: codec.parse_plaintext(r, ciphertext_len=3),
        lambda r: codec.parse_encrypt_result(r, plaintext_len=3, aad=b"", want_cdiv=True),
    ):
        try:
            parse(raw)
        except ResponseFormatError:
            pass
    codec.parse_error(raw)  # never raises


# -- the KMS error table against botocore's model --------------------------------------------


def _kms_model() -> dict[str, Any]:
    data = Path(botocore.__file__).parent / "data" / "kms"
    path = next(data.glob("*/service-2.json*"))
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(raw)


def test_failure_table_uses_the_kms_models_names() -> None:
    model = _kms_model()
    exceptions = {n for n, s in model["shapes"].items() if s.get("exception")}
    codes = set(model["shapes"]["ConnectionErrorCodeType"]["enum"])
    for failure in XksFailure:
        for context in XksCallContext:
            assert failure.exception_name(context) in exceptions, (failure, context)
        assert failure.connection_error_code in codes, failure
        error = failure.kms_error(XksCallContext.CRYPTO)
        assert error.type_name == "KMSInvalidStateException"  # every crypto failure (AWS docs)
        assert error.message == failure.message


def test_every_spec_error_name_has_a_failure_row() -> None:
    for name in API_ERRORS:
        assert XksFailure.for_error_name(name) is not XksFailure.MALFORMED_RESPONSE, name
    assert XksFailure.for_error_name("SomethingElse") is XksFailure.MALFORMED_RESPONSE
    # The rows the spec names explicitly.
    assert (
        XksFailure.AUTHENTICATION_FAILED.exception_name(XksCallContext.KEY_STORE_MANAGEMENT)
        == "XksProxyIncorrectAuthenticationCredentialException"
    )
    assert XksFailure.KEY_NOT_FOUND.exception_name(XksCallContext.CREATE_KEY) == (
        "XksKeyNotFoundException"
    )
    assert XksFailure.UNREACHABLE.exception_name(XksCallContext.KEY_STORE_MANAGEMENT) == (
        "XksProxyUriUnreachableException"
    )
    assert XksFailure.UNREACHABLE.exception_name(XksCallContext.CREATE_KEY) == (
        "CustomKeyStoreInvalidStateException"
    )
    assert XksFailure.TLS_FAILED.connection_error_code == "XKS_PROXY_INVALID_TLS_CONFIGURATION"
    assert XksFailure.TIMED_OUT.connection_error_code == "XKS_PROXY_TIMED_OUT"


def test_api_error_messages_are_printable_ascii_and_bounded() -> None:
    err = ValidationError("bad \x00 input é" + "x" * 600)
    assert len(err.message) < 512
    assert all(" " <= c <= "~" for c in err.message)
    for cls in API_ERRORS.values():
        assert 400 <= cls.status <= 503
        assert cls.default_message.isascii()
