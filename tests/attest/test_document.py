"""Document codec and the syntactic rules of nitro.md §4.4 (one case per rule)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import cbor2
import pytest

from attest.cose import ES384_PROTECTED, sign_es384
from attest.document import (
    MAX_DOCUMENT_SIZE,
    PAYLOAD_KEYS,
    AttestationDocument,
    encode_payload,
    parse_document,
    sign_document,
)
from attest.errors import DocumentFormatError

from .helpers import (
    FIXTURE_DEBUG,
    FIXTURE_PROD,
    PROD_PCRS,
    Chain,
    load_fixture,
    make_doc,
    payload_map,
    sign_payload_map,
    sign_raw_payload,
)


def test_encoding_matches_the_nsm_layout(chain: Chain) -> None:
    doc = make_doc(chain, nonce=b"n")
    data = sign_document(doc, chain.leaf_key)
    # untagged COSE_Sign1, protected {1: -35}, empty unprotected map, then a 2-byte-length bstr
    assert data.startswith(bytes.fromhex("8444a1013822a059"))
    payload = encode_payload(doc)
    assert payload[0] == 0xA9  # definite map of 9 keys
    assert list(cbor2.loads(payload)) == list(PAYLOAD_KEYS)
    ts = b"\x69timestamp\x1b" + struct.pack(">Q", doc.timestamp)  # uint64 in 8-byte form
    assert ts in payload
    assert cbor2.loads(payload)["public_key"] is None  # absent optionals are null, not missing
    assert data.endswith(b"")
    back = parse_document(data)
    assert back == doc
    assert back.cose is not None
    assert len(back.cose.signature) == 96
    assert not back.cose.tagged


def test_real_fixtures_parse(shared_dir: Path) -> None:
    doc = parse_document(load_fixture(shared_dir, FIXTURE_PROD))
    assert doc.module_id == "i-0a22e5c5f24d22174-enc0191cceb4289903f"
    assert doc.timestamp == 1725719859545
    assert doc.digest == "SHA384"
    assert sorted(doc.pcrs) == list(range(16))
    for index, value in PROD_PCRS.items():
        assert doc.pcrs[index].hex() == value
    assert doc.pcrs[3] == bytes(48)
    assert doc.pcrs[8] == bytes(48)
    assert doc.public_key == doc.user_data == doc.nonce == b"\x01" * 1024
    assert len(doc.cabundle) == 4
    assert not doc.debug
    # re-encoding gives back the exact signed payload: our encoder is the NSM's
    assert doc.cose is not None
    assert encode_payload(doc) == doc.cose.payload
    debug = parse_document(load_fixture(shared_dir, FIXTURE_DEBUG))
    assert debug.debug
    assert debug.pcrs[4].hex() == PROD_PCRS[4]
    assert debug.cose is not None
    assert encode_payload(debug) == debug.cose.payload


def _cose(
    payload: Any = b"\xa0",
    protected: Any = ES384_PROTECTED,
    unprotected: Any = None,
    signature: Any = b"\x00" * 96,
) -> list[Any]:
    return [protected, {} if unprotected is None else unprotected, payload, signature]


ENVELOPE_CASES = {
    "empty": (b"", "empty"),
    "oversized": (b"\x84" + b"\x00" * MAX_DOCUMENT_SIZE, "limit"),
    "not cbor": (b"\xff\x00", "not valid CBOR"),
    "trailing bytes": (cbor2.dumps(_cose()) + b"\x00", "trailing"),
    "not an array": (cbor2.dumps({"a": 1}), "array of 4"),
    "array of 3": (cbor2.dumps(_cose()[:3]), "array of 4"),
    "wrong tag": (cbor2.dumps(cbor2.CBORTag(17, _cose())), "unexpected CBOR tag"),
    "protected not bstr": (
        cbor2.dumps(_cose(protected={1: -35})),
        "protected header must be a byte",
    ),
    "protected ES256": (cbor2.dumps(_cose(protected=bytes.fromhex("a10126"))), "ES384"),
    "protected extra": (cbor2.dumps(_cose(protected=cbor2.dumps({1: -35, 4: b"k"}))), "ES384"),
    "unprotected not map": (cbor2.dumps(_cose(unprotected=[1])), "unprotected"),
    "payload not bstr": (cbor2.dumps(_cose(payload="text")), "payload must be a byte"),
    "payload empty": (cbor2.dumps(_cose(payload=b"")), "payload length"),
    "signature not bstr": (cbor2.dumps(_cose(signature=[0] * 96)), "signature must be a byte"),
    "signature DER-sized": (cbor2.dumps(_cose(signature=b"\x00" * 103)), "96 bytes"),
    "semantic tag": (cbor2.dumps(_cose(payload=cbor2.CBORTag(2, b"\x01"))), "not valid CBOR"),
    "too deep": (b"\x84" + b"\x81" * 10 + b"\x00", "not valid CBOR"),
}


@pytest.mark.parametrize("case", list(ENVELOPE_CASES))
def test_envelope_rules(case: str) -> None:
    data, message = ENVELOPE_CASES[case]
    with pytest.raises(DocumentFormatError, match=message) as info:
        parse_document(data)
    assert info.value.step == "parse"


_DELETE = object()

# field -> (new value or _DELETE, message fragment). Each mutates exactly one field of a valid
# document and re-signs it, so only the syntactic rule under test can fail.
PAYLOAD_RULES: dict[str, tuple[str, Any, str]] = {
    "module_id missing": ("module_id", _DELETE, "module_id: mandatory"),
    "module_id null": ("module_id", None, "module_id: mandatory field is null"),
    "module_id empty": ("module_id", "", "module_id: must be a non-empty"),
    "module_id not text": ("module_id", b"i-1", "module_id: must be a non-empty"),
    "digest missing": ("digest", _DELETE, "digest: mandatory"),
    "digest not SHA384": ("digest", "SHA256", "digest: must be one of"),
    "digest not text": ("digest", 384, "digest: must be one of"),
    "timestamp missing": ("timestamp", _DELETE, "timestamp: mandatory"),
    "timestamp zero": ("timestamp", 0, "timestamp: must be"),
    "timestamp negative": ("timestamp", -5, "timestamp: must be"),
    "timestamp float": ("timestamp", 1.5e12, "timestamp: must be"),
    "timestamp text": ("timestamp", "1725719859545", "timestamp: must be"),
    "pcrs missing": ("pcrs", _DELETE, "pcrs: mandatory"),
    "pcrs not map": ("pcrs", [b"\x00" * 48], "pcrs: must be a map"),
    "pcrs empty": ("pcrs", {}, "pcrs: must hold 1..32"),
    "pcrs too many": ("pcrs", {i: bytes(48) for i in range(33)}, "pcrs: must hold 1..32"),
    "pcr index 32": ("pcrs", {32: bytes(48)}, "pcrs: index"),
    "pcr index negative": ("pcrs", {-1: bytes(48)}, "pcrs: index"),
    "pcr index text": ("pcrs", {"0": bytes(48)}, "pcrs: index"),
    "pcr value 47 bytes": ("pcrs", {0: bytes(47)}, "PCR0 must be a byte string"),
    "pcr value text": ("pcrs", {0: "0" * 48}, "PCR0 must be a byte string"),
    "certificate missing": ("certificate", _DELETE, "certificate: mandatory"),
    "certificate empty": ("certificate", b"", "certificate: must be"),
    "certificate too long": ("certificate", b"\x30" * 1025, "certificate: must be"),
    "certificate not bstr": ("certificate", "MII", "certificate: must be"),
    "cabundle missing": ("cabundle", _DELETE, "cabundle: mandatory"),
    "cabundle empty": ("cabundle", [], "cabundle: must be a non-empty"),
    "cabundle not array": ("cabundle", b"\x30", "cabundle: must be a non-empty"),
    "cabundle entry empty": ("cabundle", [b""], "cabundle: entry 0"),
    "cabundle entry too long": ("cabundle", [b"\x30" * 1025], "cabundle: entry 0"),
    "cabundle entry not bstr": ("cabundle", ["x"], "cabundle: entry 0"),
    "public_key empty": ("public_key", b"", "public_key: length"),
    "public_key too long": ("public_key", b"k" * 1025, "public_key: length"),
    "public_key not bstr": ("public_key", "key", "public_key: must be"),
    "user_data too long": ("user_data", b"u" * 1025, "user_data: length"),
    "user_data not bstr": ("user_data", 7, "user_data: must be"),
    "nonce too long": ("nonce", b"n" * 1025, "nonce: length"),
    "nonce not bstr": ("nonce", ["n"], "nonce: must be"),
}


@pytest.mark.parametrize("rule", list(PAYLOAD_RULES))
def test_payload_rules(rule: str, chain: Chain) -> None:
    field, value, message = PAYLOAD_RULES[rule]
    m = payload_map(make_doc(chain, nonce=b"n", public_key=b"k", user_data=b"u"))
    if value is _DELETE:
        del m[field]
    else:
        m[field] = value
    with pytest.raises(DocumentFormatError, match=message):
        parse_document(sign_payload_map(m, chain.leaf_key))


def test_payload_must_be_a_text_keyed_map(chain: Chain) -> None:
    with pytest.raises(DocumentFormatError, match="must be a CBOR map"):
        parse_document(sign_raw_payload(cbor2.dumps([1, 2]), chain.leaf_key))
    m: dict[Any, Any] = payload_map(make_doc(chain))
    m[1] = "x"
    with pytest.raises(DocumentFormatError, match="keys must be text"):
        parse_document(sign_payload_map(m, chain.leaf_key))
    dup = sign_raw_payload(encode_payload(make_doc(chain))[:-1] + b"\xf6", chain.leaf_key)
    parse_document(dup)  # sanity: still valid
    raw = encode_payload(make_doc(chain))
    dup_key = b"\xaa" + raw[1:] + cbor2.dumps("nonce") + b"\xf6"  # 10 entries, "nonce" twice
    with pytest.raises(DocumentFormatError, match="not valid CBOR"):
        parse_document(sign_raw_payload(dup_key, chain.leaf_key))


@pytest.mark.parametrize(
    ("field", "value"),
    [("user_data", b""), ("nonce", b""), ("public_key", None), ("user_data", b"u" * 1024)],
)
def test_accepted_edge_values(field: str, value: Any, chain: Chain) -> None:
    m = payload_map(make_doc(chain))
    m[field] = value
    assert getattr(parse_document(sign_payload_map(m, chain.leaf_key)), field) == value


def test_optional_fields_may_be_absent_and_unknown_keys_are_ignored(chain: Chain) -> None:
    m = payload_map(make_doc(chain))
    for key in ("public_key", "user_data", "nonce"):
        del m[key]
    m["future_field"] = 1
    doc = parse_document(sign_payload_map(m, chain.leaf_key))
    assert doc.public_key is None
    assert doc.nonce is None


def _indefinite_map(m: dict[str, Any]) -> bytes:
    return b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in m.items()) + b"\xff"


def test_indefinite_length_payload_map(chain: Chain) -> None:
    doc = make_doc(chain, nonce=b"abc")
    payload = _indefinite_map(payload_map(doc))
    parsed = parse_document(sign_raw_payload(payload, chain.leaf_key))
    assert parsed == doc
    assert parsed.cose is not None
    assert parsed.cose.payload == payload


def test_tagged_cose_and_indefinite_containers(chain: Chain) -> None:
    doc = make_doc(chain)
    tagged = sign_raw_payload(encode_payload(doc), chain.leaf_key, tagged=True)
    assert tagged[0] == 0xD2
    parsed = parse_document(tagged)
    assert parsed == doc
    assert parsed.cose is not None
    assert parsed.cose.tagged
    # an indefinite-length outer array and chunked byte strings are CBOR too
    cose = parsed.cose
    chunked = b"\x5f" + cbor2.dumps(cose.payload[:100]) + cbor2.dumps(cose.payload[100:]) + b"\xff"
    body = (
        b"\x9f"
        + cbor2.dumps(cose.protected)
        + b"\xa0"
        + chunked
        + cbor2.dumps(cose.signature)
        + b"\xff"
    )
    assert parse_document(body) == doc


def test_from_bytes_and_type_errors(chain: Chain) -> None:
    data = sign_document(make_doc(chain), chain.leaf_key)
    assert AttestationDocument.from_bytes(data) == parse_document(data)
    with pytest.raises(TypeError):
        parse_document("text")  # type: ignore[arg-type]


def test_signature_is_raw_r_s(chain: Chain) -> None:
    doc = make_doc(chain)
    payload = encode_payload(doc)
    sig = sign_es384(chain.leaf_key, ES384_PROTECTED, payload)
    assert len(sig) == 96
