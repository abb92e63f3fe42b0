"""NSM wire encoding: exact bytes of nitro.md §3.2, decoding rules, caps."""

from __future__ import annotations

import cbor2
import pytest

from attest.errors import NSM_ERROR_NAMES
from attest.nsm import protocol as p

# Example encodings from nitro.md §3.2 (nsm-api serde_cbor output).
REQUEST_VECTORS = [
    (p.DescribePCR(0), "a16b4465736372696265504352a165696e64657800"),
    (p.ExtendPCR(16, b"abc"), "a169457874656e64504352a265696e64657810646461746143616263"),
    (p.LockPCR(16), "a1674c6f636b504352a165696e64657810"),
    (p.LockPCRs(32), "a1684c6f636b50435273a16572616e67651820"),
    (p.DescribeNSM(), "6b44657363726962654e534d"),
    (
        p.Attestation(user_data=b"hi"),
        "a16b4174746573746174696f6ea369757365725f64617461426869656e6f6e6365f66a7075626c69635f6b6579f6",
    ),
    (p.GetRandom(), "6947657452616e646f6d"),
]


@pytest.mark.parametrize(("request_", "hex_"), REQUEST_VECTORS)
def test_request_encoding_matches_nsm_api(request_: p.Request, hex_: str) -> None:
    assert p.encode_request(request_).hex() == hex_
    assert p.decode_request(bytes.fromhex(hex_)) == request_


def test_lock_response_is_a_text_string() -> None:
    assert p.encode_response(p.LockPCRResponse()).hex() == "674c6f636b504352"
    assert p.encode_response(p.LockPCRsResponse()) == cbor2.dumps("LockPCRs")


@pytest.mark.parametrize("code", NSM_ERROR_NAMES[1:])
def test_error_response_shape(code: str) -> None:
    data = p.encode_response(p.ErrorResponse(code))
    assert cbor2.loads(data) == {"Error": code}
    assert data.startswith(bytes.fromhex("a1654572726f72"))
    assert p.decode_response(data) == p.ErrorResponse(code)


@pytest.mark.parametrize(
    "response",
    [
        p.DescribePCRResponse(True, bytes(48)),
        p.ExtendPCRResponse(b"\x01" * 48),
        p.LockPCRResponse(),
        p.LockPCRsResponse(),
        p.DescribeNSMResponse(1, 0, 0, "i-x-enc1", 32, tuple(range(16)), "SHA384"),
        p.AttestationResponse(b"doc"),
        p.GetRandomResponse(b"r" * 256),
    ],
)
def test_response_round_trip(response: p.Response) -> None:
    assert p.decode_response(p.encode_response(response)) == response


def test_describe_nsm_fields() -> None:
    data = p.encode_response(p.DescribeNSMResponse(1, 0, 0, "m", 32, (1, 0), "SHA384"))
    body = cbor2.loads(data)["DescribeNSM"]
    assert list(body) == [
        "version_major",
        "version_minor",
        "version_patch",
        "module_id",
        "max_pcrs",
        "locked_pcrs",
        "digest",
    ]
    assert body["locked_pcrs"] == [0, 1]


def test_decoder_accepts_any_field_order_and_text_for_bytes() -> None:
    data = cbor2.dumps({"ExtendPCR": {"data": "abc", "index": 17}})
    assert p.decode_request(data) == p.ExtendPCR(17, b"abc")
    att = cbor2.dumps({"Attestation": {"nonce": b"n"}})  # absent options read as None
    assert p.decode_request(att) == p.Attestation(nonce=b"n")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xff\xff", "InvalidOperation"),
        (cbor2.dumps("Reboot"), "InvalidOperation"),
        (cbor2.dumps({"DescribePCR": 1}), "InvalidOperation"),
        (cbor2.dumps({"DescribePCR": {}}), "InvalidArgument"),
        (cbor2.dumps({"DescribePCR": {"index": -1}}), "InvalidArgument"),
        (cbor2.dumps({"DescribePCR": {"index": 70000}}), "InvalidArgument"),
        (cbor2.dumps({"DescribePCR": {"index": True}}), "InvalidArgument"),
        (cbor2.dumps({"ExtendPCR": {"index": 16, "data": 5}}), "InvalidArgument"),
        (cbor2.dumps({"a": 1, "b": 2}), "InvalidOperation"),
        (cbor2.dumps([[[[[[1]]]]]]), "InvalidOperation"),
        (b"\xa2\x61a\x01\x61a\x02", "InvalidOperation"),  # duplicate key
        (b"\x00" * (p.NSM_REQUEST_MAX_SIZE + 1), "InputTooLarge"),
    ],
)
def test_bad_requests_map_to_nsm_error_names(data: bytes, code: str) -> None:
    with pytest.raises(p.MessageError) as info:
        p.decode_request(data)
    assert info.value.code == code


def test_oversized_or_garbage_response_is_internal_error() -> None:
    for data in (b"\x00" * (p.NSM_RESPONSE_MAX_SIZE + 1), b"\xff", cbor2.dumps({"Error": "Nope"})):
        with pytest.raises(p.MessageError) as info:
            p.decode_response(data)
        assert info.value.code == "InternalError"
