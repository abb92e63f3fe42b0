"""transport: vsock addressing and fabric, the attested secure channel, streaming RPC framing,
and the vsock-proxy / ingress proxies.

This is the lowest layer of enclave-runtime: it imports no other package of the project. The
project's root error (:class:`transport.errors.EnclaveError`) and the once-per-process logging
set-up (:func:`transport.logs.configure_logging`) live here so every package can use them.

Public faces (each only re-exports): ``transport.vsock`` (addresses, streams, listeners, the
fabric), ``transport.channel`` (the attested secure channel), ``transport.rpc`` (streaming RPC),
``transport.errors``; modules ``hostport``, ``relay``, ``ingress``, ``proxy``, ``app_status``,
``sync`` (scheduling primitives), ``sansio`` (the sans-IO contract), ``logs``, ``paths``,
``accel`` (the optional compiled sans-IO cores).
"""

from __future__ import annotations

# First, before any core module is imported: importing accel installs the compiled cores if a
# verified build matches this tree (transport/accel.py), else the interpreted ones run.
from transport import accel as accel
from transport.errors import EnclaveError as EnclaveError

__all__ = ["EnclaveError"]
