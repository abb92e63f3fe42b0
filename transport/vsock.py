"""vsock for enclave-runtime: addresses, streams and listeners that work on the host and inside
an enclave, emulated on one machine or on real ``AF_VSOCK``.

Layers: pure addressing/policy/codec in :mod:`transport.fabric` (``addressing``, ``policy``,
``wire``); trio adapters for the host side, the enclave side, native AF_VSOCK and the
supervisor-side broker; this module is the public surface and only re-exports.

Typical use::

    stream = await open_vsock_stream(VsockAddr(VMADDR_CID_PARENT, 8000))  # inside an enclave
    listener = await open_vsock_listener(5005)                         # anywhere
    await trio.serve_listeners(handler, [listener])
"""

from __future__ import annotations

from transport.errors import VsockConnectionRefused as VsockConnectionRefused
from transport.errors import VsockError as VsockError
from transport.fabric.addressing import MAX_ENCLAVE_CID as MAX_ENCLAVE_CID
from transport.fabric.addressing import MIN_ENCLAVE_CID as MIN_ENCLAVE_CID
from transport.fabric.addressing import VMADDR_CID_ANY as VMADDR_CID_ANY
from transport.fabric.addressing import VMADDR_CID_HOST as VMADDR_CID_HOST
from transport.fabric.addressing import VMADDR_CID_HYPERVISOR as VMADDR_CID_HYPERVISOR
from transport.fabric.addressing import VMADDR_CID_LOCAL as VMADDR_CID_LOCAL
from transport.fabric.addressing import VMADDR_CID_PARENT as VMADDR_CID_PARENT
from transport.fabric.addressing import VMADDR_PORT_ANY as VMADDR_PORT_ANY
from transport.fabric.addressing import InvalidVsockAddress as InvalidVsockAddress
from transport.fabric.addressing import VsockAddr as VsockAddr
from transport.fabric.addressing import is_enclave_cid as is_enclave_cid
from transport.fabric.api import open_vsock_listener as open_vsock_listener
from transport.fabric.api import open_vsock_stream as open_vsock_stream
from transport.fabric.backend import Backend as Backend
from transport.fabric.backend import current_backend as current_backend
from transport.fabric.broker import FabricPolicy as FabricPolicy
from transport.fabric.broker import ParentHandler as ParentHandler
from transport.fabric.broker import enclave_fabric_env as enclave_fabric_env
from transport.fabric.broker import fabric_socketpair as fabric_socketpair
from transport.fabric.broker import serve_enclave_fabric as serve_enclave_fabric
from transport.fabric.host import VsockAddressInUse as VsockAddressInUse
from transport.fabric.host import default_fabric_dir as default_fabric_dir

__all__ = [
    "VMADDR_CID_ANY",
    "VMADDR_CID_HYPERVISOR",
    "VMADDR_CID_LOCAL",
    "VMADDR_CID_HOST",
    "VMADDR_CID_PARENT",
    "VMADDR_PORT_ANY",
    "MIN_ENCLAVE_CID",
    "MAX_ENCLAVE_CID",
    "VsockAddr",
    "is_enclave_cid",
    "open_vsock_stream",
    "open_vsock_listener",
    "FabricPolicy",
    "ParentHandler",
    "serve_enclave_fabric",
    "fabric_socketpair",
    "enclave_fabric_env",
    "Backend",
    "current_backend",
    "default_fabric_dir",
    "VsockError",
    "VsockConnectionRefused",
    "VsockAddressInUse",
    "InvalidVsockAddress",
]
