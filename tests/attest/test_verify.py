"""Verifier: real AWS fixtures, chain tampering, signature, policy, cache, fail-closed."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from attest.ca import LocalCA
from attest.document import sign_document
from attest.errors import ChainError, PolicyViolation, SignatureError, VerificationError
from attest.policy import MeasurementSet, Policy
from attest.roots import AWS_NITRO_ROOT_G1
from attest.verify import Verifier
from transport.errors import ConfigurationError

from .helpers import (
    DEBUG_TIME,
    FIXTURE_DEBUG,
    FIXTURE_PROD,
    PROD_PCRS,
    PROD_TIME,
    T0,
    Chain,
    build_chain,
    load_fixture,
    make_doc,
    pcr,
)

PROD_POLICY = Policy(
    measurements=[MeasurementSet({i: bytes.fromhex(v) for i, v in PROD_PCRS.items()})],
    nonce=b"\x01" * 1024,
    max_age_s=60,
)
ANY = Policy(any_measurement=True)


def flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x01
    return bytes(b)


# --- real AWS documents ------------------------------------------------------------------


def test_prod_fixture_verifies_at_pinned_time(shared_dir: Path) -> None:
    doc = load_fixture(shared_dir, FIXTURE_PROD)
    result = Verifier([AWS_NITRO_ROOT_G1]).verify(doc, policy=PROD_POLICY, at=PROD_TIME)
    assert result.module_id == "i-0a22e5c5f24d22174-enc0191cceb4289903f"
    assert len(result.chain) == 5
    assert result.root == AWS_NITRO_ROOT_G1
    assert {c.name for c in result.checks} >= {"parse", "chain", "signature", "measurements"}
    assert all(c.ok for c in result.checks)


def test_debug_fixture(shared_dir: Path) -> None:
    doc = load_fixture(shared_dir, FIXTURE_DEBUG)
    v = Verifier([AWS_NITRO_ROOT_G1])
    pcr4 = MeasurementSet({4: PROD_PCRS[4]})  # type: ignore[dict-item]
    ok = v.verify(doc, policy=Policy([pcr4], allow_debug=True), at=DEBUG_TIME)
    assert ok.document.debug
    with pytest.raises(PolicyViolation, match="debug") as info:
        v.verify(doc, policy=Policy([pcr4]), at=DEBUG_TIME)
    assert info.value.step == "policy"
    # a policy pinning the production image rejects the debug document even with debug allowed
    with pytest.raises(PolicyViolation, match="PCR0"):
        v.verify(
            doc,
            policy=PROD_POLICY.__class__(PROD_POLICY.measurements, allow_debug=True),
            at=DEBUG_TIME,
        )


@pytest.mark.parametrize(
    ("delta", "message"),
    [(timedelta(seconds=-10), "not valid before"), (timedelta(hours=4), "expired")],
)
@pytest.mark.parametrize("cache", [True, False])
def test_fixtures_fail_outside_their_windows(
    shared_dir: Path, delta: timedelta, message: str, cache: bool
) -> None:
    v = Verifier([AWS_NITRO_ROOT_G1], cache_chains=cache)
    for name, at in ((FIXTURE_PROD, PROD_TIME), (FIXTURE_DEBUG, DEBUG_TIME)):
        doc = load_fixture(shared_dir, name)
        v.verify(doc, policy=Policy(any_measurement=True, allow_debug=True), at=at)  # fills cache
        with pytest.raises(ChainError, match=message):
            v.verify(doc, policy=ANY, at=at + delta)


def test_fixture_flipped_bytes(shared_dir: Path) -> None:
    doc = load_fixture(shared_dir, FIXTURE_PROD)
    v = Verifier([AWS_NITRO_ROOT_G1])
    v.verify(doc, policy=PROD_POLICY, at=PROD_TIME)  # chain cached: signature still checked
    nonce_byte = len(doc) - 96 - 2 - 10  # inside the 1024-byte nonce at the payload's end
    with pytest.raises(SignatureError):
        v.verify(flip(doc, nonce_byte), policy=ANY, at=PROD_TIME)
    with pytest.raises(SignatureError):
        v.verify(flip(doc, len(doc) - 1), policy=ANY, at=PROD_TIME)  # last signature byte
    pcr0_byte = doc.index(bytes.fromhex(PROD_PCRS[0]))
    with pytest.raises(SignatureError):
        v.verify(flip(doc, pcr0_byte), policy=ANY, at=PROD_TIME)


def test_fixture_against_another_root(shared_dir: Path, other_chain: Chain) -> None:
    doc = load_fixture(shared_dir, FIXTURE_PROD)
    with pytest.raises(ChainError, match="not a configured trust root") as info:
        Verifier([other_chain.root]).verify(doc, policy=ANY, at=PROD_TIME)
    assert info.value.step == "chain"


# --- local chains: tampering --------------------------------------------------------------


def test_local_chain_verifies(chain: Chain) -> None:
    data = sign_document(make_doc(chain, nonce=b"n"), chain.leaf_key)
    result = Verifier([chain.root]).verify(
        data, policy=Policy(any_measurement=True, nonce=b"n"), at=T0
    )
    assert [c.subject for c in result.chain] == [c.subject for c in reversed(chain.certs)]


def _with_bundle(chain: Chain, bundle: tuple[bytes, ...]) -> bytes:
    doc = make_doc(chain)
    from dataclasses import replace

    return sign_document(replace(doc, cabundle=bundle), chain.leaf_key)


def test_swapped_intermediate_same_name_other_key(chain: Chain) -> None:
    impostor = build_chain(tag="t")  # same subject names, different keys
    bundle = list(chain.bundle_der)
    bundle[2] = impostor.bundle_der[2]
    with pytest.raises(ChainError, match="path validation failed"):
        Verifier([chain.root]).verify(_with_bundle(chain, tuple(bundle)), policy=ANY, at=T0)


def test_swapped_intermediate_from_other_chain(chain: Chain, other_chain: Chain) -> None:
    bundle = list(chain.bundle_der)
    bundle[1] = other_chain.bundle_der[1]
    with pytest.raises(ChainError, match="issuing order"):
        Verifier([chain.root]).verify(_with_bundle(chain, tuple(bundle)), policy=ANY, at=T0)


def test_bundle_out_of_order(chain: Chain) -> None:
    b = chain.bundle_der
    with pytest.raises(ChainError, match="issuing order"):
        Verifier([chain.root]).verify(
            _with_bundle(chain, (b[0], b[2], b[1], b[3])), policy=ANY, at=T0
        )


def test_bundle_without_root_first(chain: Chain) -> None:
    with pytest.raises(ChainError, match="not a configured trust root"):
        Verifier([chain.root]).verify(_with_bundle(chain, chain.bundle_der[1:]), policy=ANY, at=T0)


@pytest.mark.parametrize("path_lengths", [(None, 2, 0, 0), (None, 1, 1, 0), (None, 0, 1, 0)])
def test_wrong_path_length(path_lengths: tuple[int | None, ...]) -> None:
    bad = build_chain(path_lengths=path_lengths)
    data = sign_document(make_doc(bad), bad.leaf_key)
    with pytest.raises(ChainError, match="path validation failed"):
        Verifier([bad.root]).verify(data, policy=ANY, at=T0)


def test_leaf_must_not_be_a_ca() -> None:
    bad = build_chain(leaf_ca=True)
    data = sign_document(make_doc(bad), bad.leaf_key)
    with pytest.raises(ChainError, match="CA:FALSE"):
        Verifier([bad.root]).verify(data, policy=ANY, at=T0)


@pytest.mark.parametrize(
    ("at", "message"),
    [
        (T0 + timedelta(hours=3, seconds=1), "expired"),
        (T0 - timedelta(hours=1, seconds=1), "not valid before"),
    ],
)
def test_expired_and_not_yet_valid(chain: Chain, at: object, message: str) -> None:
    data = sign_document(make_doc(chain), chain.leaf_key)
    with pytest.raises(ChainError, match=message):
        Verifier([chain.root]).verify(data, policy=ANY, at=at)  # type: ignore[arg-type]


def test_expired_leaf_under_valid_intermediates() -> None:
    c = build_chain(leaf_window=(T0 - timedelta(hours=3), T0 - timedelta(minutes=1)))
    data = sign_document(make_doc(c, timestamp=T0 - timedelta(hours=1)), c.leaf_key)
    with pytest.raises(ChainError, match=r"leaf .* expired"):
        Verifier([c.root]).verify(data, policy=ANY, at=T0)


def test_signature_by_another_key(chain: Chain, other_chain: Chain) -> None:
    data = sign_document(make_doc(chain), other_chain.leaf_key)
    with pytest.raises(SignatureError):
        Verifier([chain.root]).verify(data, policy=ANY, at=T0)


def test_wrong_root(chain: Chain, other_chain: Chain) -> None:
    data = sign_document(make_doc(chain), chain.leaf_key)
    with pytest.raises(ChainError):
        Verifier([other_chain.root, AWS_NITRO_ROOT_G1]).verify(data, policy=ANY, at=T0)


# --- policy -------------------------------------------------------------------------------


def _verify(chain: Chain, policy: Policy, *, at: object = T0, **fields: object) -> None:
    data = sign_document(make_doc(chain, **fields), chain.leaf_key)  # type: ignore[arg-type]
    Verifier([chain.root]).verify(data, policy=policy, at=at)  # type: ignore[arg-type]


def test_nonce(chain: Chain) -> None:
    _verify(chain, Policy(any_measurement=True, nonce=b"abc"), nonce=b"abc")
    with pytest.raises(PolicyViolation, match="nonce does not match"):
        _verify(chain, Policy(any_measurement=True, nonce=b"abc"), nonce=b"abd")
    with pytest.raises(PolicyViolation, match="no nonce"):
        _verify(chain, Policy(any_measurement=True, nonce=b"abc"))


def test_debug_denied_by_default(chain: Chain) -> None:
    debug_pcrs = {i: bytes(48) for i in range(16)}
    with pytest.raises(PolicyViolation, match="debug"):
        _verify(chain, Policy(any_measurement=True), pcrs=debug_pcrs)
    _verify(chain, Policy(any_measurement=True, allow_debug=True), pcrs=debug_pcrs)
    # PCR0 missing counts as debug too (fail closed)
    with pytest.raises(PolicyViolation, match="debug"):
        _verify(chain, Policy(any_measurement=True), pcrs={1: pcr(1), 2: pcr(2)})


def test_max_age(chain: Chain) -> None:
    later = T0 + timedelta(minutes=10)
    _verify(chain, Policy(any_measurement=True, max_age_s=900), at=later)
    with pytest.raises(PolicyViolation, match="old"):
        _verify(chain, Policy(any_measurement=True, max_age_s=300), at=later)
    with pytest.raises(PolicyViolation, match="future"):
        _verify(
            chain, Policy(any_measurement=True, max_age_s=300), timestamp=T0 + timedelta(hours=1)
        )


def test_measurement_sets_and_time_windows(chain: Chain) -> None:
    pcrs = {i: pcr(i + 1) for i in range(16)}
    right = {0: pcrs[0], 2: pcrs[2]}
    expired = MeasurementSet(right, not_after=T0 - timedelta(seconds=1))
    future = MeasurementSet(right, not_before=T0 + timedelta(days=1))
    wrong = MeasurementSet({0: pcr(0x99)})
    with pytest.raises(
        PolicyViolation, match=r"set 0: expired.*set 1: not valid before.*set 2: PCR0 differ"
    ):
        _verify(chain, Policy([expired, future, wrong]), pcrs=pcrs)
    current = MeasurementSet(
        right, not_before=T0 - timedelta(days=1), not_after=T0 + timedelta(days=1)
    )
    _verify(chain, Policy([expired, current]), pcrs=pcrs)
    with pytest.raises(PolicyViolation, match="PCR16 differ"):  # PCR absent from the document
        _verify(chain, Policy([MeasurementSet({16: bytes(48)})]), pcrs=pcrs)


def test_fail_closed(chain: Chain) -> None:
    with pytest.raises(PolicyViolation, match="fail closed"):
        _verify(chain, Policy())
    with pytest.raises(ConfigurationError):
        Verifier([])


# --- cache and report ---------------------------------------------------------------------


def test_chain_cache(local_ca: LocalCA) -> None:
    signer = local_ca.new_signer("i-1-enc1")
    docs = [
        signer.issue(
            module_id="i-1-enc1",
            timestamp_ms=int(T0.timestamp() * 1000) + i,
            pcrs={i: pcr(i + 1) for i in range(16)},
            nonce=bytes([i]),
        )
        for i in range(3)
    ]
    v = Verifier([local_ca.root_certificate])
    results = [v.verify(d, policy=ANY, at=T0) for d in docs]
    assert [r.chain_cached for r in results] == [False, True, True]
    with pytest.raises(SignatureError):
        v.verify(flip(docs[0], len(docs[0]) - 5), policy=ANY, at=T0)
    with pytest.raises(ChainError, match="expired"):
        v.verify(docs[0], policy=ANY, at=T0 + timedelta(days=2))
    uncached = Verifier([local_ca.root_certificate], cache_chains=False)
    assert not uncached.verify(docs[1], policy=ANY, at=T0).chain_cached
    assert not uncached.verify(docs[1], policy=ANY, at=T0).chain_cached


def test_report_names_the_failed_step(chain: Chain, other_chain: Chain) -> None:
    data = sign_document(make_doc(chain), chain.leaf_key)
    report = Verifier([other_chain.root]).report(data, policy=ANY, at=T0)
    assert not report.ok
    assert report.failed_step == "chain"
    assert [(c.step, c.ok) for c in report.checks] == [
        ("parse", True),
        ("chain", False),
        ("signature", False),
        ("policy", False),
    ]
    assert report.document is not None
    good = Verifier([chain.root]).report(data, policy=ANY, at=T0)
    assert good.ok
    assert good.failed_step is None
    assert good.chain is not None
    bad = Verifier([chain.root]).report(b"\x00", policy=ANY, at=T0)
    assert bad.failed_step == "parse"
    assert bad.document is None


def test_verification_error_carries_step_and_reason(chain: Chain) -> None:
    with pytest.raises(VerificationError) as info:
        Verifier([chain.root]).verify(b"\x84", policy=ANY, at=T0)
    assert info.value.step == "parse"
    assert "CBOR" in info.value.reason
    with pytest.raises(ValueError, match="timezone"):
        Verifier([chain.root]).verify(b"\x84", policy=ANY, at=T0.replace(tzinfo=None))


def test_certificate_that_is_not_der(chain: Chain) -> None:
    from dataclasses import replace

    from attest.errors import DocumentFormatError

    doc = replace(make_doc(chain), certificate=b"\x30\x03\x02\x01\x00")
    data = sign_document(doc, chain.leaf_key)
    with pytest.raises(DocumentFormatError, match="certificate: not a DER") as info:
        Verifier([chain.root]).verify(data, policy=ANY, at=T0)
    assert info.value.step == "parse"
    report = Verifier([chain.root]).report(data, policy=ANY, at=T0)
    assert [(c.step, c.ok) for c in report.checks] == [
        ("parse", False),
        ("chain", False),
        ("signature", False),
        ("policy", False),
    ]
