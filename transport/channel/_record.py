"""Cryptography of ``enclave-channel/1``: the record layer, the key schedule and the HPKE seal.

This is the only module of :mod:`transport.channel` that imports ``cryptography``'s hazmat
AEAD, HKDF and HPKE primitives; the state machine (``_connection.py``) calls these recipes.

Records (PROTOCOL.md §5) are AES-256-GCM with an implicit counter nonce, TLS 1.3 style:
``nonce = iv XOR (0^32 || seq_u64)``, ``seq`` starting at 0 for each direction and key, the
5-byte record header as associated data. The counter is never random and never reused:
:class:`RecordSealer` refuses to go past ``max_records`` (and so can never wrap), and
:class:`RecordOpener` computes the nonce it expects, so a replayed, reordered or reflected record
fails its tag check. One record slot per key is reserved for the authenticated close record so a
sender at its limit can still close cleanly.

Nothing here logs or performs I/O; errors are raised as plain exceptions for the caller to map.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from transport.channel._types import Suite
from transport.errors import LocalProtocolError

__all__ = [
    "FrameType",
    "HEADER",
    "HEADER_SIZE",
    "TAG_SIZE",
    "MAX_RECORD_PLAINTEXT",
    "DEFAULT_MAX_RECORDS",
    "InvalidTag",
    "RecordSealer",
    "RecordOpener",
    "TrafficKeys",
    "derive_traffic_keys",
    "EphemeralKey",
    "seal_channel_secret",
    "public_key_binding",
    "sealed_secret_size",
    "public_key_size",
]


class FrameType(enum.IntEnum):
    """Frame types of ``enclave-channel/1`` (first header byte; PROTOCOL.md §2)."""

    HELLO = 0x01  #: client → enclave, plaintext
    ATTESTATION = 0x02  #: enclave → client, plaintext
    KEY = 0x03  #: client → enclave, HPKE-sealed channel secret
    #: enclave → client, plaintext: ATTESTATION's body, and the client must attest too
    MUTUAL_ATTESTATION = 0x04
    CLIENT_ATTESTATION = 0x05  #: client → enclave, plaintext: the client's document
    #: enclave → client, encrypted, empty plaintext: the client's attestation was accepted
    ACCEPTED = 0x06
    CLOSE = 0x15  #: encrypted, empty plaintext: authenticated end of a direction
    DATA = 0x17  #: encrypted application data


#: Frame header: type (u8), body length (u32, big-endian). Also the AAD of an encrypted record.
HEADER: Final = struct.Struct("!BI")
HEADER_SIZE: Final = HEADER.size  # 5 bytes
_PACK_HEADER: Final = HEADER.pack
#: AES-GCM tag length in bytes.
TAG_SIZE: Final = 16
#: Largest plaintext one record may carry (bytes): 64 KiB, the size at which AES-GCM reaches its
#: single-core ceiling here (perf-baseline §2.1) while staying under glibc's 128 KiB mmap cliff.
MAX_RECORD_PLAINTEXT: Final = 1 << 16
#: Records per key and direction, the close record included. With ≤ 64 KiB records this caps a
#: key at 2^38 bytes (2^34 AES blocks), inside the AES-GCM usage limit TLS 1.3 adopts
#: (RFC 8446 §5.5: ~2^24.5 records of 2^14 bytes ≈ 2^38.5 bytes). A channel that reaches it
#: must be re-established; the counter itself (64 bits) can therefore never wrap.
DEFAULT_MAX_RECORDS: Final = 1 << 22
#: AES-256 key and GCM IV sizes (bytes).
_KEY_SIZE: Final = 32
_IV_SIZE: Final = 12
#: Channel secret sealed with HPKE (bytes): 256 bits of entropy.
CHANNEL_SECRET_SIZE: Final = 32

_LABEL_PREFIX: Final = b"enclave-channel/1 "
#: HKDF ``info`` labels of the key schedule (PROTOCOL.md §4).
LABELS: Final = {
    "c2s_key": _LABEL_PREFIX + b"c2s key",
    "c2s_iv": _LABEL_PREFIX + b"c2s iv",
    "s2c_key": _LABEL_PREFIX + b"s2c key",
    "s2c_iv": _LABEL_PREFIX + b"s2c iv",
}
#: Prefix of the HPKE ``info``; the transcript hash of hello and attestation follows it.
HPKE_INFO_PREFIX: Final = _LABEL_PREFIX + b"hpke"

_X25519_PUBLIC_SIZE: Final = 32
_MLKEM768_PUBLIC_SIZE: Final = 1184

_HPKE_SUITES: Final = {
    Suite.X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    Suite.MLKEM768_X25519: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
}
#: HPKE ``enc`` (encapsulated key) sizes per KEM (RFC 9180 Nenc; the hybrid's is 1088 + 32).
_ENC_SIZE: Final = {Suite.X25519: 32, Suite.MLKEM768_X25519: 1120}


def public_key_size(suite: Suite) -> int:
    """Size in bytes of the enclave's serialized ephemeral public key for ``suite``."""
    if suite is Suite.X25519:
        return _X25519_PUBLIC_SIZE
    return _MLKEM768_PUBLIC_SIZE + _X25519_PUBLIC_SIZE  # 1216


def sealed_secret_size(suite: Suite) -> int:
    """Exact size of the client's key-message body: HPKE ``enc`` ‖ sealed secret ‖ tag."""
    return _ENC_SIZE[suite] + CHANNEL_SECRET_SIZE + TAG_SIZE


def public_key_binding(suite: Suite, public_key: bytes) -> bytes:
    """The value the attestation document's ``public_key`` must hold for ``public_key``.

    X25519: the raw 32-byte key. Hybrid: SHA-384 of the 1216-byte key (the NSM caps
    ``public_key`` at 1024 bytes).
    """
    if suite is Suite.X25519:
        return public_key
    return hashlib.sha384(public_key).digest()


class EphemeralKey:
    """The enclave's fresh HPKE key pair for one handshake (never reused, never serialized)."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        x_priv = x25519.X25519PrivateKey.generate()
        x_pub = x_priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._private: x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey
        if suite is Suite.X25519:
            self._private = x_priv
            self.public_bytes = x_pub
        else:
            m_priv = mlkem.MLKEM768PrivateKey.generate()
            m_pub = m_priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            self._private = hpke.MLKEM768X25519PrivateKey(m_priv, x_priv)
            # Serialization: ML-KEM-768 encapsulation key ‖ X25519 key (PROTOCOL.md §3.2).
            self.public_bytes = m_pub + x_pub

    def open_channel_secret(self, sealed: bytes, *, info: bytes) -> bytes:
        """HPKE base-mode open of the client's sealed secret; :class:`InvalidTag` on failure."""
        try:
            secret = _HPKE_SUITES[self.suite].decrypt(sealed, self._private, info=info)
        except InvalidTag:
            raise
        except ValueError as exc:  # malformed enc (e.g. a low-order X25519 point)
            raise InvalidTag from exc
        if len(secret) != CHANNEL_SECRET_SIZE:
            raise InvalidTag
        return secret


def seal_channel_secret(suite: Suite, public_key: bytes, secret: bytes, *, info: bytes) -> bytes:
    """HPKE base-mode seal of ``secret`` to the serialized ``public_key``: ``enc ‖ ct ‖ tag``.

    Raises:
        ValueError: ``public_key`` is not a valid key of ``suite``.
    """
    if len(public_key) != public_key_size(suite):
        raise ValueError("public key has the wrong size for the suite")
    pk: x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
    if suite is Suite.X25519:
        pk = x25519.X25519PublicKey.from_public_bytes(public_key)
    else:
        m_pub = mlkem.MLKEM768PublicKey.from_public_bytes(public_key[:_MLKEM768_PUBLIC_SIZE])
        x_pub = x25519.X25519PublicKey.from_public_bytes(public_key[_MLKEM768_PUBLIC_SIZE:])
        pk = hpke.MLKEM768X25519PublicKey(m_pub, x_pub)
    return _HPKE_SUITES[suite].encrypt(secret, pk, info=info)


@dataclass(frozen=True, slots=True, repr=False)
class TrafficKeys:
    """Per-direction AES-256-GCM keys and IVs (``repr`` hides them)."""

    c2s_key: bytes
    c2s_iv: bytes
    s2c_key: bytes
    s2c_iv: bytes


def _hkdf(secret: bytes, *, salt: bytes, label: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=label).derive(secret)


def derive_traffic_keys(channel_secret: bytes, transcript_hash: bytes) -> TrafficKeys:
    """HKDF-SHA256(ikm=channel_secret, salt=transcript_hash, info=label) for each label."""
    return TrafficKeys(
        c2s_key=_hkdf(channel_secret, salt=transcript_hash, label=LABELS["c2s_key"], length=32),
        c2s_iv=_hkdf(channel_secret, salt=transcript_hash, label=LABELS["c2s_iv"], length=12),
        s2c_key=_hkdf(channel_secret, salt=transcript_hash, label=LABELS["s2c_key"], length=32),
        s2c_iv=_hkdf(channel_secret, salt=transcript_hash, label=LABELS["s2c_iv"], length=12),
    )


class _Direction:
    __slots__ = ("_aead", "_iv", "max_records", "seq")

    def __init__(self, key: bytes, iv: bytes, max_records: int) -> None:
        if len(key) != _KEY_SIZE or len(iv) != _IV_SIZE:
            raise ValueError("record key must be 32 bytes and IV 12 bytes")
        if not 2 <= max_records <= DEFAULT_MAX_RECORDS:
            raise ValueError(f"max_records must be in [2, {DEFAULT_MAX_RECORDS}]")
        self._aead = AESGCM(key)  # reused for every record (perf-baseline §3.1)
        self._iv = int.from_bytes(iv, "big")
        self.max_records = max_records
        self.seq = 0

    def _nonce(self) -> bytes:
        return (self._iv ^ self.seq).to_bytes(_IV_SIZE, "big")


class RecordSealer(_Direction):
    """Encrypts this side's records. Refuses (``LocalProtocolError``) to exceed its record limit."""

    __slots__ = ()

    @property
    def data_records_left(self) -> int:
        """Data records still allowed under this key (one more slot is kept for the close)."""
        return self.max_records - 1 - self.seq

    def seal(self, rtype: int, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Return header ‖ ciphertext ‖ tag for one record as new bytes."""
        seq = self.seq
        if seq >= self.max_records - 1 and (rtype != FrameType.CLOSE or seq >= self.max_records):
            raise LocalProtocolError("record limit for this key reached; open a new channel")
        header = _PACK_HEADER(rtype, len(plaintext) + TAG_SIZE)
        self.seq = seq + 1
        nonce = (self._iv ^ seq).to_bytes(_IV_SIZE, "big")
        return header + self._aead.encrypt(nonce, plaintext, header)

    def seal_into(
        self, rtype: int, plaintext: bytes | bytearray | memoryview, out: memoryview
    ) -> int:
        """Write header ‖ ciphertext ‖ tag for one record at the start of ``out``; return its size.

        ``out`` must hold at least ``HEADER_SIZE + len(plaintext) + TAG_SIZE`` bytes.
        """
        limit = self.max_records if rtype == FrameType.CLOSE else self.max_records - 1
        if self.seq >= limit:
            raise LocalProtocolError("record limit for this key reached; open a new channel")
        n = len(plaintext)
        body = n + TAG_SIZE
        header = HEADER.pack(rtype, body)
        out[:HEADER_SIZE] = header
        self._aead.encrypt_into(
            self._nonce(), plaintext, header, out[HEADER_SIZE : HEADER_SIZE + body]
        )
        self.seq += 1
        return HEADER_SIZE + body


class RecordOpener(_Direction):
    """Decrypts the peer's records in order; any mismatch raises :class:`InvalidTag`."""

    __slots__ = ()

    def _check_limit(self) -> None:
        if self.seq >= self.max_records:
            raise InvalidTag  # the peer went past the per-key limit: it cannot be authentic

    def open_into(self, header: memoryview, body: memoryview, out: memoryview) -> int:
        """Decrypt ``body`` (ciphertext ‖ tag) into ``out[: len(body) - TAG_SIZE]``."""
        self._check_limit()
        n = self._aead.decrypt_into(self._nonce(), body, header, out[: len(body) - TAG_SIZE])
        self.seq += 1
        return n

    def open(
        self, header: bytes | bytearray | memoryview, body: bytes | bytearray | memoryview
    ) -> bytes:
        """Decrypt ``body`` and return the plaintext as new bytes."""
        self._check_limit()
        plaintext = self._aead.decrypt(self._nonce(), body, header)
        self.seq += 1
        return plaintext
