"""The emulated NSM device: PCR state and request handling, sans-IO.

:class:`NsmDevice` turns one CBOR request into one CBOR response (:meth:`NsmDevice.handle`),
exactly as the Nitro Secure Module behind ``/dev/nsm`` does (nitro.md §3): 32 SHA-384 PCRs,
0-15 locked at boot with the enclave's measurements, ExtendPCR = SHA-384(old ‖ data), the lock
rules and error names of §3.4, DescribeNSM, GetRandom and Attestation. It never does I/O; the
supervisor feeds it bytes with :func:`attest.nsm.server.serve_nsm`. It holds the enclave's
:class:`~attest.signer.DocumentSigner`, so it lives on the host side only.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from attest.document import DEBUG_PCRS
from attest.nsm.protocol import (
    ATTESTATION_FIELD_MAX,
    BOOT_LOCKED_PCRS,
    MAX_PCRS,
    NSM_RESPONSE_MAX_SIZE,
    NSM_VERSION,
    PCR_LENGTH,
    RANDOM_LENGTH,
    Attestation,
    AttestationResponse,
    DescribeNSM,
    DescribeNSMResponse,
    DescribePCR,
    DescribePCRResponse,
    ErrorResponse,
    ExtendPCR,
    ExtendPCRResponse,
    GetRandom,
    GetRandomResponse,
    LockPCR,
    LockPCRResponse,
    LockPCRs,
    LockPCRsResponse,
    MessageError,
    Request,
    Response,
    decode_request,
    encode_response,
)
from attest.pcrs import pcr_extend
from attest.signer import DocumentSigner

__all__ = ["EnclaveIdentity", "NsmDevice", "DocumentSigner", "ZERO_PCR"]

#: Value of a PCR that was never extended.
ZERO_PCR: Final = bytes(PCR_LENGTH)


@dataclass(frozen=True)
class EnclaveIdentity:
    """What the runtime knows about an enclave when it boots it.

    Attributes:
        module_id: the EnclaveID (``i-<instance>-enc<16 hex>``); becomes the document module_id.
        pcrs: boot values of locked PCRs (normally 0, 1, 2, 3, 4 and 8); missing ones are zero.
            Indices must be in 0-15 and values 48 bytes.
        debug: debug-mode enclave: PCR0/1/2/8 read as zero (PCR3/4 keep their values), as Nitro.
    """

    module_id: str
    pcrs: Mapping[int, bytes] = field(default_factory=dict)
    debug: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.module_id, str) or not self.module_id:
            raise ValueError("module_id must be a non-empty string")
        for index, value in self.pcrs.items():
            if index not in BOOT_LOCKED_PCRS:
                raise ValueError(f"boot PCR index {index} is not in 0-15")
            if len(value) != PCR_LENGTH:
                raise ValueError(f"PCR{index} must be {PCR_LENGTH} bytes")
        object.__setattr__(self, "pcrs", MappingProxyType(dict(self.pcrs)))

    def boot_pcrs(self) -> dict[int, bytes]:
        """The 16 locked PCR values the NSM exposes at boot (debug rule applied)."""
        values = {i: bytes(self.pcrs.get(i, ZERO_PCR)) for i in BOOT_LOCKED_PCRS}
        if self.debug:
            for i in DEBUG_PCRS:
                values[i] = ZERO_PCR
        return values


class NsmDevice:
    """One enclave's NSM: PCR bank plus document signing, driven by :meth:`handle`.

    Args:
        identity: module id, boot PCRs and debug flag from the runtime.
        signer: signs documents (from :meth:`attest.ca.LocalCA.new_signer`).
        clock: wall clock in seconds, for document timestamps (injectable for tests).
        random: source of GetRandom bytes (injectable for tests).

    Thread-safe: a lock serialises requests, as the single virtio queue of the real device does.
    """

    def __init__(
        self,
        identity: EnclaveIdentity,
        signer: DocumentSigner,
        *,
        clock: Callable[[], float] = time.time,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.identity = identity
        self._signer = signer
        self._clock = clock
        self._random = random
        self._pcrs: list[bytes] = [ZERO_PCR] * MAX_PCRS
        for index, value in identity.boot_pcrs().items():
            self._pcrs[index] = value
        self._locked: set[int] = set(BOOT_LOCKED_PCRS)
        self._snapshot: Mapping[int, bytes] | None = None
        self._lock = threading.Lock()

    # --- introspection (host side) ---------------------------------------------------------

    def pcr(self, index: int) -> bytes:
        """Current value of a PCR (for the host; the enclave asks with DescribePCR)."""
        return self._pcrs[index]

    @property
    def locked_pcrs(self) -> frozenset[int]:
        """Indices currently locked."""
        return frozenset(self._locked)

    def _locked_values(self) -> Mapping[int, bytes]:
        # Locked PCRs cannot change, so one snapshot serves until the locked set grows.
        if self._snapshot is None:
            self._snapshot = MappingProxyType({i: self._pcrs[i] for i in sorted(self._locked)})
        return self._snapshot

    # --- the device ------------------------------------------------------------------------

    def handle(self, request: bytes) -> bytes:
        """Process one CBOR request and return the CBOR response (never raises on bad input).

        Oversized requests get ``{"Error": "InputTooLarge"}``; undecodable or unknown ones
        ``InvalidOperation``; a response that would not fit the driver's 12288-byte buffer
        ``BufferTooSmall``.
        """
        try:
            decoded = decode_request(request)
        except MessageError as exc:
            return encode_response(ErrorResponse(exc.code))
        with self._lock:
            response = self.execute(decoded)
        data = encode_response(response)
        if len(data) > NSM_RESPONSE_MAX_SIZE:
            return encode_response(ErrorResponse("BufferTooSmall"))
        return data

    def execute(self, request: Request) -> Response:
        """Apply a decoded request to the device state.

        Not thread-safe by itself: :meth:`handle` serialises calls with the device lock.
        """
        match request:
            case DescribePCR(index=index):
                if index >= MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                return DescribePCRResponse(index in self._locked, self._pcrs[index])
            case ExtendPCR(index=index, data=data):
                if index >= MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                if index in self._locked:
                    return ErrorResponse("ReadOnlyIndex")
                self._pcrs[index] = pcr_extend(self._pcrs[index], data)
                return ExtendPCRResponse(self._pcrs[index])
            case LockPCR(index=index):
                if index >= MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                if index in self._locked:
                    return ErrorResponse("ReadOnlyIndex")
                self._locked.add(index)
                self._snapshot = None
                return LockPCRResponse()
            case LockPCRs(range=range_):
                if range_ > MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                self._locked.update(range(range_))
                self._snapshot = None
                return LockPCRsResponse()
            case DescribeNSM():
                major, minor, patch = NSM_VERSION
                return DescribeNSMResponse(
                    version_major=major,
                    version_minor=minor,
                    version_patch=patch,
                    module_id=self.identity.module_id,
                    max_pcrs=MAX_PCRS,
                    locked_pcrs=tuple(sorted(self._locked)),
                    digest="SHA384",
                )
            case GetRandom():
                return GetRandomResponse(self._random(RANDOM_LENGTH))
            case Attestation(user_data=user_data, nonce=nonce, public_key=public_key):
                for value in (user_data, nonce, public_key):
                    if value is not None and len(value) > ATTESTATION_FIELD_MAX:
                        return ErrorResponse("InputTooLarge")
                if public_key is not None and not public_key:
                    # a document's public_key must be 1..1024 bytes when present (§4.4)
                    return ErrorResponse("InvalidArgument")
                timestamp_ms = int(self._clock() * 1000)
                try:
                    document = self._signer.issue(
                        module_id=self.identity.module_id,
                        timestamp_ms=timestamp_ms,
                        pcrs=self._locked_values(),
                        public_key=public_key,
                        user_data=user_data,
                        nonce=nonce,
                    )
                except ValueError:
                    # no valid signing chain at this time (e.g. a fixed chain that expired): the
                    # device reports a fault instead of taking its server down
                    return ErrorResponse("InternalError")
                return AttestationResponse(document)
        return ErrorResponse("InvalidOperation")  # pragma: no cover - exhaustive over Request
