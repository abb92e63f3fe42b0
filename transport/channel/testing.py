"""Throwaway attester/verifier pair for tests and benchmarks of the channel. NOT Nitro documents.

``transport`` may not import ``attest`` (layering), yet its tests and ``runtime/bench/channel.py``
need an enclave side that attests and a client side that verifies. This module provides a
deliberately simple stand-in with real cryptography and real checks:

* a *test document* is the CBOR array ``[payload, signature]`` where ``payload`` is the CBOR map
  ``{module_id, digest, timestamp, pcrs, nonce, public_key, user_data, debug}`` and
  ``signature`` is Ed25519 over ``payload`` by a :class:`TestAuthority`'s key;
* :class:`TestVerifier` pins that authority's public key and enforces expected PCRs, the debug
  rule (debug documents are refused unless allowed, and carry zero PCR0/1/2 as on Nitro), an
  optional maximum age, and the nonce; parsing is bounded (size, depth, no duplicate keys).

Production code uses ``attest.channel.nsm_attester`` / ``attest.channel.channel_verifier``.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from transport.channel._connection import MAX_DOCUMENT_SIZE
from transport.channel._types import PeerAttestation
from transport.errors import TransportError

__all__ = ["TestAuthority", "TestAttester", "TestDocumentRejected", "TestVerifier"]

#: PCR value size (bytes): SHA-384, as on Nitro.
PCR_SIZE: Final = 48
#: CBOR nesting needed by a test document is 3 (array > map > pcrs map); allow a little more.
_MAX_DEPTH: Final = 6


class TestDocumentRejected(TransportError):
    """A test document failed verification; ``step`` names the failed check."""

    __test__ = False  # not a pytest test class

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


def default_pcrs(seed: bytes = b"test-enclave") -> dict[int, bytes]:
    """Deterministic non-zero PCR0/1/2/8 values for a test image."""
    import hashlib

    return {i: hashlib.sha384(seed + bytes([i])).digest() for i in (0, 1, 2, 8)}


class TestAuthority:
    """Holds the Ed25519 key that signs test documents (stands in for the NSM + CA)."""

    __test__ = False

    def __init__(self, signing_key: Ed25519PrivateKey | None = None) -> None:
        self._key = signing_key or Ed25519PrivateKey.generate()
        self.public_key: Ed25519PublicKey = self._key.public_key()

    def sign(self, payload: Mapping[str, Any]) -> bytes:
        """Encode ``payload`` and sign it: the document bytes."""
        body = cbor2.dumps(dict(payload))
        return cbor2.dumps([body, self._key.sign(body)])

    def attester(
        self,
        *,
        module_id: str = "i-test-enc0000000000000",
        pcrs: Mapping[int, bytes] | None = None,
        debug: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> TestAttester:
        """An :class:`~transport.channel.Attester` for an enclave with these measurements."""
        return TestAttester(
            self, module_id=module_id, pcrs=dict(pcrs or default_pcrs()), debug=debug, clock=clock
        )

    def verifier(
        self,
        *,
        expected_pcrs: Mapping[int, bytes] | None = None,
        allow_debug: bool = False,
        max_age_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> TestVerifier:
        """A :class:`~transport.channel.DocumentVerifier` trusting only this authority."""
        return TestVerifier(
            self.public_key,
            expected_pcrs=dict(expected_pcrs if expected_pcrs is not None else default_pcrs()),
            allow_debug=allow_debug,
            max_age_s=max_age_s,
            clock=clock,
        )


@dataclass
class TestAttester:
    """Signs a test document binding exactly what it is asked to bind. ``calls`` records the
    requests (tests inspect them)."""

    __test__ = False

    authority: TestAuthority
    module_id: str
    pcrs: dict[int, bytes]
    debug: bool = False
    clock: Callable[[], float] = time.time
    calls: list[dict[str, bytes | None]] = field(default_factory=list)

    def payload(
        self, *, nonce: bytes, public_key: bytes, user_data: bytes | None
    ) -> dict[str, Any]:
        """The document payload (tests mutate it to forge variants)."""
        pcrs = dict(self.pcrs)
        if self.debug:  # Nitro zeroes the image PCRs of debug-mode enclaves
            for i in (0, 1, 2, 8):
                pcrs[i] = bytes(PCR_SIZE)
        return {
            "module_id": self.module_id,
            "digest": "SHA384",
            "timestamp": int(self.clock() * 1000),
            "pcrs": pcrs,
            "nonce": nonce,
            "public_key": public_key,
            "user_data": user_data,
            "debug": self.debug,
        }

    async def __call__(
        self, *, nonce: bytes, public_key: bytes, user_data: bytes | None = None
    ) -> bytes:
        self.calls.append({"nonce": nonce, "public_key": public_key, "user_data": user_data})
        payload = self.payload(nonce=nonce, public_key=public_key, user_data=user_data)
        return self.authority.sign(payload)


def _field(payload: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = payload.get(name)
    if not isinstance(value, kind):
        raise TestDocumentRejected("parse", f"field {name!r} is missing or has the wrong type")
    return value


@dataclass
class TestVerifier:
    """Verifies test documents: signature by the pinned key, PCRs, debug rule, age, nonce."""

    __test__ = False

    trusted_key: Ed25519PublicKey
    expected_pcrs: dict[int, bytes]
    allow_debug: bool = False
    max_age_s: float | None = None
    clock: Callable[[], float] = time.time

    def __call__(self, document: bytes, *, nonce: bytes) -> PeerAttestation:
        if len(document) > MAX_DOCUMENT_SIZE:
            raise TestDocumentRejected("parse", "document too large")
        try:
            outer = cbor2.loads(document, max_depth=_MAX_DEPTH, allow_duplicate_keys=False)
        except (cbor2.CBORDecodeError, ValueError) as exc:
            raise TestDocumentRejected("parse", f"not CBOR: {exc}") from None
        if (
            not isinstance(outer, list)
            or len(outer) != 2
            or not all(isinstance(x, bytes) for x in outer)
        ):
            raise TestDocumentRejected("parse", "not [payload, signature]")
        body, signature = outer
        try:
            self.trusted_key.verify(signature, body)
        except InvalidSignature:
            raise TestDocumentRejected("signature", "bad signature") from None
        try:
            payload = cbor2.loads(body, max_depth=_MAX_DEPTH, allow_duplicate_keys=False)
        except (cbor2.CBORDecodeError, ValueError) as exc:
            raise TestDocumentRejected("parse", f"payload not CBOR: {exc}") from None
        if not isinstance(payload, dict):
            raise TestDocumentRejected("parse", "payload is not a map")
        pcrs = _field(payload, "pcrs", dict)
        debug = _field(payload, "debug", bool)
        doc_nonce = _field(payload, "nonce", bytes)
        timestamp = _field(payload, "timestamp", int)
        if debug and not self.allow_debug:
            raise TestDocumentRejected("policy", "debug-mode enclave")
        for index, expected in self.expected_pcrs.items():
            got = pcrs.get(index)
            if not isinstance(got, bytes) or not hmac.compare_digest(got, expected):
                raise TestDocumentRejected("policy", f"PCR{index} does not match")
        if self.max_age_s is not None and self.clock() * 1000 - timestamp > self.max_age_s * 1e3:
            raise TestDocumentRejected("policy", "document too old")
        if not hmac.compare_digest(doc_nonce, nonce):
            raise TestDocumentRejected("policy", "nonce mismatch")
        public_key = payload.get("public_key")
        user_data = payload.get("user_data")
        if not isinstance(public_key, bytes | None) or not isinstance(user_data, bytes | None):
            raise TestDocumentRejected("parse", "public_key/user_data must be bytes or null")
        return PeerAttestation(
            module_id=_field(payload, "module_id", str),
            digest=_field(payload, "digest", str),
            timestamp_ms=timestamp,
            pcrs={int(k): v for k, v in pcrs.items()},
            public_key=public_key,
            user_data=user_data,
            nonce=doc_nonce,
            document=document,
        )
