"""An independent implementation of enclave-channel/1, written from transport/PROTOCOL.md with
``cryptography`` primitives only, talks to the reference core in both roles. If PROTOCOL.md and
the code disagree about a byte, these tests fail."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.transport.channel_helpers import sign_request
from transport.channel import (
    Attestation,
    AttestationRequest,
    ChannelEstablished,
    ClientConnection,
    Close,
    Data,
    Hello,
    ServerConnection,
    Suite,
)
from transport.channel.testing import TestAuthority

HPKE = {
    1: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    2: hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}


def frame(ftype: int, body: bytes) -> bytes:
    return struct.pack(">BI", ftype, len(body)) + body


def split(data: bytes) -> tuple[int, bytes, bytes]:
    ftype, length = struct.unpack(">BI", data[:5])
    return ftype, data[5 : 5 + length], data[5 + length :]


def keys(secret: bytes, th2: bytes) -> dict[str, bytes]:
    def derive(label: str, n: int) -> bytes:
        return HKDF(hashes.SHA256(), n, th2, b"enclave-channel/1 " + label.encode()).derive(secret)

    return {
        k: derive(k.replace("_", " "), 32 if k.endswith("key") else 12)
        for k in ("c2s_key", "c2s_iv", "s2c_key", "s2c_iv")
    }


def seal(key: bytes, iv: bytes, seq: int, ftype: int, plaintext: bytes) -> bytes:
    header = struct.pack(">BI", ftype, len(plaintext) + 16)
    nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
    return header + AESGCM(key).encrypt(nonce, plaintext, header)


def open_(key: bytes, iv: bytes, seq: int, record: bytes) -> tuple[int, bytes]:
    ftype, body, rest = split(record)
    assert not rest
    nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
    return ftype, AESGCM(key).decrypt(nonce, body, record[:5])


@pytest.mark.parametrize("suite_id", [1, 2])
def test_independent_client_against_reference_enclave(suite_id: int) -> None:
    authority = TestAuthority()
    attester = authority.attester()
    server = ServerConnection(suites=[Suite(suite_id)])
    # HELLO
    hello = frame(1, struct.pack(">H", 1) + os.urandom(32) + bytes([1, suite_id]))
    server.receive_data(hello)
    request = server.next_event()
    assert isinstance(request, AttestationRequest)
    attestation = server.send(Attestation(sign_request(attester, request)))
    # ATTESTATION
    ftype, body, _ = split(attestation)
    assert ftype == 2
    suite, key_len = struct.unpack(">BH", body[:3])
    pk = body[3 : 3 + key_len]
    (doc_len,) = struct.unpack(">I", body[3 + key_len : 7 + key_len])
    document = body[7 + key_len :]
    assert suite == suite_id
    assert len(document) == doc_len
    peer = authority.verifier()(document, nonce=hashlib.sha384(hello).digest())
    binding = pk if suite_id == 1 else hashlib.sha384(pk).digest()
    assert peer.public_key == binding
    assert peer.user_data == b"enclave-channel/1 suite " + bytes([suite_id])
    # KEY
    if suite_id == 1:
        public = x25519.X25519PublicKey.from_public_bytes(pk)
    else:
        public = hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(pk[:1184]),
            x25519.X25519PublicKey.from_public_bytes(pk[1184:]),
        )
    secret = os.urandom(32)
    th1 = hashlib.sha256(hello + attestation).digest()
    key_frame = frame(
        3, HPKE[suite_id].encrypt(secret, public, info=b"enclave-channel/1 hpke" + th1)
    )
    k = keys(secret, hashlib.sha256(hello + attestation + key_frame).digest())
    # KEY and the first records in one write.
    server.receive_data(
        key_frame
        + seal(k["c2s_key"], k["c2s_iv"], 0, 0x17, b"hello enclave")
        + seal(k["c2s_key"], k["c2s_iv"], 1, 0x15, b"")
    )
    assert isinstance(server.next_event(), ChannelEstablished)
    assert server.next_event() == Data(b"hello enclave")
    assert server.next_event() == Close()
    reply = server.send(Data(b"hello client")) + server.send(Close())
    first, second = reply[: 5 + 12 + 16], reply[5 + 12 + 16 :]
    assert open_(k["s2c_key"], k["s2c_iv"], 0, first) == (0x17, b"hello client")
    assert open_(k["s2c_key"], k["s2c_iv"], 1, second) == (0x15, b"")


def test_independent_enclave_against_reference_client() -> None:
    authority = TestAuthority()
    attester = authority.attester()
    client = ClientConnection(verifier=authority.verifier(), suites=[Suite.X25519])
    hello = client.send(Hello())
    ftype, body, _ = split(hello)
    assert ftype == 1
    assert body[:2] == b"\x00\x01"
    assert body[34:] == b"\x01\x01"
    sk = x25519.X25519PrivateKey.generate()
    pk = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    request = AttestationRequest(
        nonce=hashlib.sha384(hello).digest(),
        public_key=pk,
        user_data=b"enclave-channel/1 suite \x01",
    )
    document = sign_request(attester, request)
    attestation = frame(
        2, struct.pack(">BH", 1, 32) + pk + struct.pack(">I", len(document)) + document
    )
    client.receive_data(attestation)
    assert isinstance(client.next_event(), ChannelEstablished)
    key_frame = client.data_to_send()
    ftype, sealed, _ = split(key_frame)
    assert ftype == 3
    assert len(sealed) == 80
    th1 = hashlib.sha256(hello + attestation).digest()
    secret = HPKE[1].decrypt(sealed, sk, info=b"enclave-channel/1 hpke" + th1)
    k = keys(secret, hashlib.sha256(hello + attestation + key_frame).digest())
    assert open_(k["c2s_key"], k["c2s_iv"], 0, client.send(Data(b"ping"))) == (0x17, b"ping")
    client.receive_data(seal(k["s2c_key"], k["s2c_iv"], 0, 0x17, b"pong"))
    assert client.next_event() == Data(b"pong")


def test_independent_mutual_client_against_reference_enclave() -> None:
    """PROTOCOL.md §3.4 from the client's side: the binding of our document, ACCEPTED at s2c
    sequence 0, the traffic keys over the four frames."""
    authority = TestAuthority()
    server = ServerConnection(suites=[Suite.X25519], peer_verifier=authority.verifier())
    hello = frame(1, struct.pack(">H", 1) + os.urandom(32) + bytes([1, 1]))
    server.receive_data(hello)
    request = server.next_event()
    assert isinstance(request, AttestationRequest)
    attestation = server.send(Attestation(sign_request(authority.attester(), request)))
    ftype, body, _ = split(attestation)
    assert ftype == 4  # MUTUAL_ATTESTATION
    pk = body[3:35]
    secret = os.urandom(32)
    th1 = hashlib.sha256(hello + attestation).digest()
    public = x25519.X25519PublicKey.from_public_bytes(pk)
    key_frame = frame(3, HPKE[1].encrypt(secret, public, info=b"enclave-channel/1 hpke" + th1))
    ours = AttestationRequest(
        nonce=hashlib.sha384(hello + attestation + key_frame).digest(),
        public_key=pk,
        user_data=b"enclave-channel/1 client suite \x01",
    )
    client_attestation = frame(5, sign_request(authority.attester(module_id="i-me"), ours))
    k = keys(secret, hashlib.sha256(hello + attestation + key_frame + client_attestation).digest())
    server.receive_data(key_frame + client_attestation)
    established = server.next_event()
    assert isinstance(established, ChannelEstablished)
    assert established.peer is not None
    assert established.peer.module_id == "i-me"
    assert open_(k["s2c_key"], k["s2c_iv"], 0, server.data_to_send()) == (6, b"")  # ACCEPTED
    reply = server.send(Data(b"hello peer"))
    assert open_(k["s2c_key"], k["s2c_iv"], 1, reply) == (0x17, b"hello peer")
    server.receive_data(seal(k["c2s_key"], k["c2s_iv"], 0, 0x17, b"hi"))
    assert server.next_event() == Data(b"hi")


def test_independent_mutual_enclave_against_reference_client() -> None:
    authority = TestAuthority()
    client = ClientConnection(verifier=authority.verifier(), suites=[Suite.X25519])
    hello = client.send(Hello())
    sk = x25519.X25519PrivateKey.generate()
    pk = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    document = sign_request(
        authority.attester(),
        AttestationRequest(
            nonce=hashlib.sha384(hello).digest(),
            public_key=pk,
            user_data=b"enclave-channel/1 suite \x01",
        ),
    )
    attestation = frame(
        4, struct.pack(">BH", 1, 32) + pk + struct.pack(">I", len(document)) + document
    )
    client.receive_data(attestation)
    request = client.next_event()
    assert isinstance(request, AttestationRequest)  # the client must attest now
    out = client.send(Attestation(sign_request(authority.attester(module_id="i-cli"), request)))
    ftype, sealed, rest = split(out)
    assert ftype == 3
    key_frame = out[: 5 + len(sealed)]
    assert request.nonce == hashlib.sha384(hello + attestation + key_frame).digest()
    assert request.public_key == pk
    assert request.user_data == b"enclave-channel/1 client suite \x01"
    ftype, client_doc, tail = split(rest)
    assert ftype == 5
    assert not tail
    peer = authority.verifier()(client_doc, nonce=request.nonce)
    assert peer.module_id == "i-cli"
    th1 = hashlib.sha256(hello + attestation).digest()
    secret = HPKE[1].decrypt(sealed, sk, info=b"enclave-channel/1 hpke" + th1)
    k = keys(secret, hashlib.sha256(hello + attestation + out).digest())
    client.receive_data(
        seal(k["s2c_key"], k["s2c_iv"], 0, 6, b"") + seal(k["s2c_key"], k["s2c_iv"], 1, 0x17, b"ok")
    )
    assert isinstance(client.next_event(), ChannelEstablished)
    assert client.next_event() == Data(b"ok")
    assert open_(k["c2s_key"], k["c2s_iv"], 0, client.send(Data(b"go"))) == (0x17, b"go")
