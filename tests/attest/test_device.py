"""NsmDevice semantics (nitro.md §3.4): PCRs, locks, error names, caps, documents."""

from __future__ import annotations

import hashlib

import pytest

from attest.ca import LocalCA
from attest.document import parse_document
from attest.nsm import protocol as p
from attest.nsm.device import ZERO_PCR, EnclaveIdentity, NsmDevice

from .helpers import MODULE_ID, T0, pcr

BOOT = {0: pcr(0xA0), 1: pcr(0xA1), 2: pcr(0xA2), 3: pcr(0xA3), 4: pcr(0xA4), 8: pcr(0xA8)}


def make_device(local_ca: LocalCA, *, debug: bool = False) -> NsmDevice:
    identity = EnclaveIdentity(MODULE_ID, BOOT, debug=debug)
    return NsmDevice(
        identity,
        local_ca.new_signer(MODULE_ID),
        clock=lambda: T0.timestamp(),
        random=lambda n: b"\x42" * n,
    )


def call(device: NsmDevice, request: p.Request) -> p.Response:
    return p.decode_response(device.handle(p.encode_request(request)))


@pytest.fixture
def device(local_ca: LocalCA) -> NsmDevice:
    return make_device(local_ca)


def test_boot_state(device: NsmDevice) -> None:
    for i in range(32):
        r = call(device, p.DescribePCR(i))
        assert isinstance(r, p.DescribePCRResponse)
        assert r.lock == (i < 16)
        assert r.data == BOOT.get(i, ZERO_PCR)
    desc = call(device, p.DescribeNSM())
    assert desc == p.DescribeNSMResponse(1, 0, 0, MODULE_ID, 32, tuple(range(16)), "SHA384")


def test_extend_is_sha384_of_old_and_data(device: NsmDevice) -> None:
    r1 = call(device, p.ExtendPCR(16, b"abc"))
    expected = hashlib.sha384(ZERO_PCR + b"abc").digest()
    assert r1 == p.ExtendPCRResponse(expected)
    r2 = call(device, p.ExtendPCR(16, b"def"))
    assert r2 == p.ExtendPCRResponse(hashlib.sha384(expected + b"def").digest())
    assert call(device, p.DescribePCR(16)) == p.DescribePCRResponse(False, r2.data)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (p.ExtendPCR(0, b"x"), "ReadOnlyIndex"),
        (p.ExtendPCR(15, b"x"), "ReadOnlyIndex"),
        (p.ExtendPCR(32, b"x"), "InvalidIndex"),
        (p.DescribePCR(32), "InvalidIndex"),
        (p.DescribePCR(0xFFFF), "InvalidIndex"),
        (p.LockPCR(3), "ReadOnlyIndex"),
        (p.LockPCR(32), "InvalidIndex"),
        (p.LockPCRs(33), "InvalidIndex"),
        (p.Attestation(user_data=b"u" * 1025), "InputTooLarge"),
        (p.Attestation(nonce=b"n" * 1025), "InputTooLarge"),
        (p.Attestation(public_key=b"k" * 1025), "InputTooLarge"),
        (p.Attestation(public_key=b""), "InvalidArgument"),
    ],
)
def test_error_names(device: NsmDevice, request_: p.Request, code: str) -> None:
    assert call(device, request_) == p.ErrorResponse(code)


def test_lock_pcr_then_extend_is_read_only(device: NsmDevice) -> None:
    assert call(device, p.ExtendPCR(20, b"model")) == p.ExtendPCRResponse(
        hashlib.sha384(ZERO_PCR + b"model").digest()
    )
    assert call(device, p.LockPCR(20)) == p.LockPCRResponse()
    assert call(device, p.ExtendPCR(20, b"more")) == p.ErrorResponse("ReadOnlyIndex")
    assert call(device, p.LockPCR(20)) == p.ErrorResponse("ReadOnlyIndex")
    assert call(device, p.DescribePCR(20)).lock is True  # type: ignore[union-attr]


def test_lock_pcrs_range(device: NsmDevice) -> None:
    assert call(device, p.LockPCRs(18)) == p.LockPCRsResponse()
    assert device.locked_pcrs == frozenset(range(18))
    assert call(device, p.ExtendPCR(17, b"x")) == p.ErrorResponse("ReadOnlyIndex")
    assert call(device, p.ExtendPCR(18, b"x")).__class__ is p.ExtendPCRResponse
    assert call(device, p.LockPCRs(32)) == p.LockPCRsResponse()
    assert device.locked_pcrs == frozenset(range(32))


def test_get_random(device: NsmDevice) -> None:
    assert call(device, p.GetRandom()) == p.GetRandomResponse(b"\x42" * 256)


def test_request_cap(device: NsmDevice) -> None:
    ok = p.encode_request(p.ExtendPCR(16, b"x" * 4000))
    assert len(ok) <= p.NSM_REQUEST_MAX_SIZE
    assert isinstance(p.decode_response(device.handle(ok)), p.ExtendPCRResponse)
    big = p.encode_request(p.ExtendPCR(16, b"x" * 4096))
    assert len(big) > p.NSM_REQUEST_MAX_SIZE
    assert p.decode_response(device.handle(big)) == p.ErrorResponse("InputTooLarge")


def test_response_cap_gives_buffer_too_small(local_ca: LocalCA) -> None:
    class HugeSigner:
        def issue(self, **_: object) -> bytes:
            return b"\x00" * p.NSM_RESPONSE_MAX_SIZE

    device = NsmDevice(EnclaveIdentity(MODULE_ID, BOOT), HugeSigner())  # type: ignore[arg-type]
    assert call(device, p.Attestation()) == p.ErrorResponse("BufferTooSmall")


def test_attestation_document(device: NsmDevice) -> None:
    call(device, p.ExtendPCR(16, b"model"))
    max_fields = {"user_data": b"u" * 1024, "nonce": b"n" * 1024, "public_key": b"k" * 1024}
    r = call(device, p.Attestation(**max_fields))
    assert isinstance(r, p.AttestationResponse)
    assert len(p.encode_response(r)) <= p.NSM_RESPONSE_MAX_SIZE
    doc = parse_document(r.document)
    assert doc.module_id == MODULE_ID
    assert doc.timestamp == int(T0.timestamp() * 1000)
    assert sorted(doc.pcrs) == list(range(16))  # only locked PCRs; PCR16 is not locked
    assert doc.pcrs[0] == BOOT[0]
    assert doc.pcrs[5] == ZERO_PCR
    assert (doc.user_data, doc.nonce, doc.public_key) == (
        max_fields["user_data"],
        max_fields["nonce"],
        max_fields["public_key"],
    )
    call(device, p.LockPCR(16))
    doc2 = parse_document(call(device, p.Attestation()).document)  # type: ignore[union-attr]
    assert doc2.pcrs[16] == hashlib.sha384(ZERO_PCR + b"model").digest()
    assert (doc2.user_data, doc2.nonce, doc2.public_key) == (None, None, None)


def test_debug_mode_zeroes_image_pcrs_but_keeps_3_and_4(local_ca: LocalCA) -> None:
    device = make_device(local_ca, debug=True)
    doc = parse_document(call(device, p.Attestation()).document)  # type: ignore[union-attr]
    for i in (0, 1, 2, 8):
        assert doc.pcrs[i] == ZERO_PCR
    assert doc.pcrs[3] == BOOT[3]
    assert doc.pcrs[4] == BOOT[4]
    assert doc.debug


@pytest.mark.parametrize(
    ("pcrs", "message"),
    [({16: pcr(1)}, "not in 0-15"), ({0: b"short"}, "48 bytes")],
)
def test_identity_validation(pcrs: dict[int, bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EnclaveIdentity(MODULE_ID, pcrs)
    with pytest.raises(ValueError):
        EnclaveIdentity("", {})


def test_expired_fixed_chain_is_an_internal_error(local_ca: LocalCA) -> None:
    from attest.signer import DocumentSigner

    key, leaf, bundle = local_ca.issue_leaf(MODULE_ID, T0)
    fixed = DocumentSigner(key, leaf, bundle)  # no renewal
    late = T0.timestamp() + 4 * 3600  # the 3-hour leaf has expired
    device = NsmDevice(EnclaveIdentity(MODULE_ID, BOOT), fixed, clock=lambda: late)
    assert call(device, p.Attestation()) == p.ErrorResponse("InternalError")
    device = NsmDevice(EnclaveIdentity(MODULE_ID, BOOT), fixed, clock=lambda: T0.timestamp())
    assert isinstance(call(device, p.Attestation()), p.AttestationResponse)


def test_signer_pcr_encoding_cache_follows_values(local_ca: LocalCA) -> None:
    signer = local_ca.new_signer(MODULE_ID)
    pcrs = {0: pcr(1), 1: pcr(2)}
    ts = int(T0.timestamp() * 1000)
    first = parse_document(signer.issue(module_id=MODULE_ID, timestamp_ms=ts, pcrs=pcrs))
    pcrs[1] = pcr(3)  # same dict object, new value: must not reuse the old encoding
    second = parse_document(signer.issue(module_id=MODULE_ID, timestamp_ms=ts, pcrs=pcrs))
    assert first.pcrs[1] == pcr(2)
    assert second.pcrs[1] == pcr(3)
