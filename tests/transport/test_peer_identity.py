"""``attest.peer.enclave_peer_identity``: an enclave's attester and "same image" peer verifier,
with Nitro-format documents from in-process NSMs under a local CA."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from attest.ca import LocalCA
from attest.errors import VerificationError
from attest.nsm.local import InProcessNsm
from attest.peer import enclave_peer_identity
from attest.policy import MeasurementSet, Policy

IMAGE = {i: hashlib.sha384(b"ring image" + bytes([i])).digest() for i in (0, 1, 2)}


def _doc(nsm: InProcessNsm, nonce: bytes) -> bytes:
    return nsm.document(nonce=nonce, public_key=b"k" * 32, user_data=b"u")


async def test_same_image_peers_pass_others_do_not(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path / "ca")
    me = InProcessNsm.create(ca, pcrs=IMAGE, module_id="i-0000000000000000a-enc1")
    identity = await enclave_peer_identity(me)
    assert identity.pcr0 == IMAGE[0]
    assert identity.module_id == "i-0000000000000000a-enc1"
    assert identity.roots[0].subject == ca.root_certificate.subject  # the root my NSM chains to
    nonce = os.urandom(48)
    twin = InProcessNsm.create(ca, pcrs=IMAGE, module_id="i-0000000000000000a-enc2")
    assert identity.verifier(_doc(twin, nonce), nonce=nonce).module_id.endswith("enc2")
    other = InProcessNsm.create(ca, pcrs={**IMAGE, 0: hashlib.sha384(b"x").digest()})
    with pytest.raises(VerificationError):
        identity.verifier(_doc(other, nonce), nonce=nonce)
    debug_twin = InProcessNsm.create(ca, pcrs=IMAGE, debug=True)
    with pytest.raises(VerificationError):
        identity.verifier(_doc(debug_twin, nonce), nonce=nonce)
    with pytest.raises(VerificationError):  # a document for another handshake
        identity.verifier(_doc(twin, os.urandom(48)), nonce=nonce)
    foreign = InProcessNsm.create(LocalCA.load_or_create(tmp_path / "other-ca"), pcrs=IMAGE)
    with pytest.raises(VerificationError):  # same PCRs, another root
        identity.verifier(_doc(foreign, nonce), nonce=nonce)


async def test_an_explicit_policy_and_roots(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path / "ca")
    me = InProcessNsm.create(ca, pcrs=IMAGE)
    model_image = hashlib.sha384(b"model image").digest()
    identity = await enclave_peer_identity(
        me, policy=Policy([MeasurementSet({0: model_image})]), roots=[ca.root_certificate]
    )
    nonce = os.urandom(48)
    model = InProcessNsm.create(ca, pcrs={**IMAGE, 0: model_image})
    assert identity.verifier(_doc(model, nonce), nonce=nonce).pcrs[0] == model_image
    other_ca = LocalCA.load_or_create(tmp_path / "other")
    with pytest.raises(VerificationError):  # our own NSM does not chain to the roots given
        await enclave_peer_identity(me, roots=[other_ca.root_certificate])
