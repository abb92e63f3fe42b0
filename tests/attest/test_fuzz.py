"""Hypothesis over the CBOR/COSE decoders: any bytes give a typed error or a value, with
memory in proportion to the input."""

from __future__ import annotations

import tracemalloc
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attest.ca import LocalCA
from attest.document import AttestationDocument, parse_document, sign_document
from attest.errors import DocumentFormatError, VerificationError
from attest.nsm import protocol as p
from attest.nsm.device import EnclaveIdentity, NsmDevice
from attest.policy import Policy
from attest.verify import Verifier

from .helpers import MODULE_ID, T0, build_chain, make_doc, pcr

CHAIN = build_chain(tag="fuzz")
VALID = sign_document(make_doc(CHAIN, nonce=b"n" * 40, user_data=b"u" * 40), CHAIN.leaf_key)
VERIFIER = Verifier([CHAIN.root])
ANY = Policy(any_measurement=True, allow_debug=True)
#: What a parse may allocate (traced by tracemalloc): a fixed slack (cbor2 reads a long string
#: in 64 KiB chunks, so a header claiming 2**40 bytes costs one chunk before the stream ends)
#: plus a multiple of the input (a 3.4 KB document peaks near 12 KB). A deterministic bound in
#: place of a wall-clock one: work that is not bounded by the input shows as allocation too.
ALLOC_SLACK = 128 << 10
ALLOC_PER_BYTE = 16

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.binary(max_size=64)
    | st.text(max_size=16)
    | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=8) | st.integers(-3, 40), children, max_size=6)
    ),
    max_leaves=30,
)


def _parse(data: bytes) -> AttestationDocument | None:
    tracemalloc.start()
    try:
        return parse_document(data)
    except DocumentFormatError:
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= ALLOC_SLACK + ALLOC_PER_BYTE * len(data), (peak, len(data))


@pytest.mark.parametrize(
    "claim",
    [
        b"\x5b" + (1 << 40).to_bytes(8, "big"),  # a byte string of 2**40 bytes
        b"\x9b" + (1 << 40).to_bytes(8, "big"),  # an array of 2**40 items
        b"\xbb" + (1 << 40).to_bytes(8, "big"),  # a map of 2**40 pairs
        b"\xd2\x84\x5a" + (1 << 30).to_bytes(4, "big") + b"x" * 100,  # inside COSE_Sign1
        b"\xd2\x84\x40\xa0\x5b" + (1 << 40).to_bytes(8, "big"),  # the payload's length
    ],
)
def test_lengths_a_document_claims_are_not_allocated(claim: bytes) -> None:
    """Every length is bounded before allocation: a header claiming terabytes is a typed
    error after reading what is there, not an allocation of what it claims."""
    tracemalloc.start()
    try:
        with pytest.raises(DocumentFormatError):
            parse_document(claim)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= ALLOC_SLACK, peak


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_parse_arbitrary_bytes(data: bytes) -> None:
    _parse(data)


@settings(max_examples=200, deadline=None)
@given(cbor_values, st.booleans())
def test_parse_arbitrary_cbor(value: Any, tagged: bool) -> None:
    _parse(cbor2.dumps(cbor2.CBORTag(18, value) if tagged else value))
    # the same value as a payload inside a well-formed envelope
    _parse(cbor2.dumps([bytes.fromhex("a1013822"), {}, cbor2.dumps(value), b"\x00" * 96]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=4
    ),
    st.integers(0, len(VALID)),
)
def test_mutated_valid_document(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(VALID)
    for index, mask in flips:
        data[index] ^= mask
    for candidate in (bytes(data), bytes(data[:cut])):
        _parse(candidate)
        try:
            VERIFIER.verify(candidate, policy=ANY, at=T0)
        except VerificationError:
            pass
        else:  # only possible if every flip landed in ignored bytes (the unprotected map)
            assert parse_document(candidate) == parse_document(VALID)


def test_certificate_with_an_invalid_version_is_a_typed_error() -> None:
    """One flipped bit in the leaf's version field (v3 -> "v4"): cryptography raises
    InvalidVersion, which is no ValueError; it must still be a typed verification error
    (test_mutated_valid_document hit this only when its random flips landed there)."""
    v3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2
    assert CHAIN.leaf_der.count(v3) == 1
    bad = VALID.replace(CHAIN.leaf_der, CHAIN.leaf_der.replace(v3, v3[:-1] + b"\x03"))
    assert bad != VALID
    with pytest.raises(DocumentFormatError, match=r"not a DER X\.509 certificate"):
        VERIFIER.verify(bad, policy=ANY, at=T0)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> NsmDevice:
    ca = LocalCA.load_or_create(tmp_path_factory.mktemp("fuzz") / "ca")
    return NsmDevice(EnclaveIdentity(MODULE_ID, {0: pcr(1)}), ca.new_signer(MODULE_ID))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=512),
        cbor_values.map(cbor2.dumps),
        st.dictionaries(
            st.sampled_from(
                ["DescribePCR", "ExtendPCR", "LockPCR", "LockPCRs", "Attestation", "Error"]
            ),
            cbor_values,
            min_size=1,
            max_size=1,
        ).map(cbor2.dumps),
    )
)
def test_device_answers_everything(device: NsmDevice, data: bytes) -> None:
    response = p.decode_response(device.handle(data))  # never raises, always a valid response
    assert isinstance(response, p.Response)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=512), cbor_values.map(cbor2.dumps)))
def test_response_decoder(data: bytes) -> None:
    code = None
    try:
        p.decode_response(data)
    except p.MessageError as exc:
        code = exc.code
    assert code in (None, "InternalError")
