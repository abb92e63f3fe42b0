"""An NSM in this process: the one in-process attestation source for benchmarks and tests.

A real enclave reaches its NSM through ``/dev/nsm`` (or the runtime's socket that stands in for
it); a benchmark's load generator or a test needs documents without an enclave. They all use
:class:`InProcessNsm`: an :class:`~attest.nsm.client.NsmClient` whose transport calls an
:class:`~attest.nsm.device.NsmDevice` directly. Requests and responses still go through the
real CBOR codec and the device's checks (sizes, locked PCRs, error names), only the socket is
gone; documents are signed by a :class:`~attest.ca.LocalCA` exactly as the runtime's are.

It satisfies ``kms.client.AttestationSource`` and ``transport``'s ``Attester`` glue through
:meth:`~attest.nsm.client.NsmClient.attestation`, and adds :meth:`InProcessNsm.document` for
synchronous callers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import trio

from attest.errors import NsmError
from attest.nsm.client import NsmClient
from attest.nsm.device import EnclaveIdentity, NsmDevice
from attest.nsm.protocol import (
    Attestation,
    AttestationResponse,
    ErrorResponse,
    MessageError,
    decode_response,
    encode_request,
)

if TYPE_CHECKING:
    from attest.ca import LocalCA

__all__ = ["InProcessNsm", "DeviceTransport", "DEFAULT_MODULE_ID"]

#: A module id of the shape Nitro uses (``<instance id>-enc<16 hex>``).
DEFAULT_MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"


class DeviceTransport:
    """An :class:`~attest.nsm.client.NsmTransport` that hands each request to a device in
    this process (bytes in, bytes out: the wire format is exercised)."""

    def __init__(self, device: NsmDevice) -> None:
        self.device = device

    async def roundtrip(self, request: bytes) -> bytes:
        """The device's answer to ``request`` (a checkpoint, like a real round trip)."""
        await trio.lowlevel.checkpoint()
        return self.device.handle(request)

    async def aclose(self) -> None:
        """Nothing to release."""


class InProcessNsm(NsmClient):
    """An NSM client answered by a device in this process. See the module docstring."""

    def __init__(self, device: NsmDevice) -> None:
        super().__init__(DeviceTransport(device))
        self.device = device

    @classmethod
    def create(
        cls,
        ca: LocalCA,
        *,
        pcrs: Mapping[int, bytes],
        module_id: str = DEFAULT_MODULE_ID,
        debug: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> InProcessNsm:
        """An enclave identity (boot PCRs, debug flag) whose documents ``ca`` signs.

        Raises:
            ValueError: bad PCR indexes or sizes (from :class:`EnclaveIdentity`).
        """
        identity = EnclaveIdentity(module_id=module_id, pcrs=dict(pcrs), debug=debug)
        signer = ca.new_signer(module_id)
        if clock is None:
            return cls(NsmDevice(identity, signer))
        return cls(NsmDevice(identity, signer, clock=clock))

    @property
    def module_id(self) -> str:
        """The enclave's module id (its documents' ``module_id``)."""
        return self.device.identity.module_id

    def document(
        self,
        *,
        public_key: bytes | None = None,
        nonce: bytes | None = None,
        user_data: bytes | None = None,
    ) -> bytes:
        """An attestation document, synchronously (same path as :meth:`attestation`).

        Raises:
            NsmError: the device refused (e.g. ``InputTooLarge``).
        """
        raw = self.device.handle(
            encode_request(Attestation(user_data=user_data, nonce=nonce, public_key=public_key))
        )
        try:
            response = decode_response(raw)
        except MessageError as exc:
            raise NsmError(exc.code, str(exc)) from exc
        if isinstance(response, ErrorResponse):
            raise NsmError(response.code)
        if not isinstance(response, AttestationResponse):
            raise NsmError("InvalidResponse", f"unexpected {type(response).__name__}")
        return response.document
