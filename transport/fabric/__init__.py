"""The vsock fabric (use the public API in :mod:`transport.vsock`).

Layers: ``addressing``, ``policy`` and ``wire`` are pure (no I/O); ``host``, ``enclave``,
``native`` and ``broker`` are the trio adapters (host socket files, the enclave's broker client,
real AF_VSOCK, the supervisor-side broker); ``backend`` chooses one per process and ``api``
dispatches to it.
"""

from __future__ import annotations

# Nothing is re-exported here: the fabric's public face is transport.vsock.
__all__: list[str] = []
