"""The emulated Nitro Security Module.

protocol (pure CBOR messages) → device (sans-IO PCR bank + signing, host side)
→ server (trio: serves a device to one enclave) / client (trio: used inside the enclave);
local: :class:`InProcessNsm`, a client answered by a device in this process (benchmarks, tests).
"""

from __future__ import annotations

from attest.nsm.client import NsmClient as NsmClient
from attest.nsm.client import NsmDescription as NsmDescription
from attest.nsm.device import EnclaveIdentity as EnclaveIdentity
from attest.nsm.device import NsmDevice as NsmDevice
from attest.nsm.local import InProcessNsm as InProcessNsm
from attest.nsm.server import serve_nsm as serve_nsm

__all__ = [
    "NsmClient",
    "NsmDescription",
    "EnclaveIdentity",
    "NsmDevice",
    "InProcessNsm",
    "serve_nsm",
]
