"""runtime: measured enclave images (EIF), sandboxed subprocess enclaves, lifecycle and
supervision, the nitro-cli-compatible ``enclave`` CLI and the embedding API.

The embedding API is imported lazily (``runtime.open_runtime`` loads ``runtime.api`` on first
use), so the CLI and the in-enclave init do not pay for importing the host-side runtime::

    async with runtime.open_runtime() as rt:
        info = await rt.run_enclave(Path("server.eif"), cpu_count=1, memory_mib=512)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.api import (
        AppStatusRecord as AppStatusRecord,
    )
    from runtime.api import (
        EnclaveDescribeInfo as EnclaveDescribeInfo,
    )
    from runtime.api import (
        EnclaveInfo as EnclaveInfo,
    )
    from runtime.api import (
        EnclaveRecord as EnclaveRecord,
    )
    from runtime.api import (
        EnclaveRunInfo as EnclaveRunInfo,
    )
    from runtime.api import (
        ExitKind as ExitKind,
    )
    from runtime.api import (
        ExitReason as ExitReason,
    )
    from runtime.api import (
        ExitReasonRecord as ExitReasonRecord,
    )
    from runtime.api import (
        IsolationReport as IsolationReport,
    )
    from runtime.api import (
        RecordError as RecordError,
    )
    from runtime.api import (
        Runtime as Runtime,
    )
    from runtime.api import (
        open_runtime as open_runtime,
    )

__all__ = [
    "open_runtime",
    "Runtime",
    "EnclaveInfo",
    "ExitReason",
    "ExitKind",
    "IsolationReport",
    "EnclaveRunInfo",
    "EnclaveDescribeInfo",
    "EnclaveRecord",
    "ExitReasonRecord",
    "AppStatusRecord",
    "RecordError",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("runtime.api"), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
