"""What this host offers, probed once per process (``describe-enclaves`` and strict mode name
the layers a host cannot provide)."""

from __future__ import annotations

import ctypes
import os

from . import _sys, landlock, seccomp
from ._cgroups import mem_layer, pids_layer
from ._util import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
)

__all__ = ["detect"]

_DETECTED: dict[str, str] | None = None


def detect() -> dict[str, str]:
    """Probe what this host offers (cached per process). Values as in IsolationReport."""
    global _DETECTED
    if _DETECTED is not None:
        return dict(_DETECTED)
    out: dict[str, str] = {}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            for bit, flag in enumerate(
                (
                    CLONE_NEWUSER,
                    CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS,
                )
            ):
                if _sys.libc.unshare(ctypes.c_int(flag)) == 0:
                    code |= 1 << bit
        finally:
            os._exit(code)
    os.close(w)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    bits = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 0
    out["userns"] = "available" if bits & 1 else "missing: unshare(CLONE_NEWUSER) refused"
    ns = "available" if bits & 2 else "missing: unshare of pid/net/mount/ipc/uts refused"
    for k in ("pidns", "netns", "mountns", "ipcns", "utsns"):
        out[k] = ns
    abi = landlock.abi_version()
    out["landlock"] = f"available (ABI {abi})" if abi else "missing: kernel has no Landlock"
    out["seccomp"] = "available" if seccomp.supported() else f"missing: no filter for {_sys.ARCH}"
    out["memory"] = (
        "available (cgroup v1 memory)" if mem_layer() == "cgroup" else "available (RLIMIT_AS)"
    )
    out["pids"] = (
        "available (cgroup v1 pids)" if pids_layer() == "cgroup" else "available (RLIMIT_NPROC)"
    )
    _DETECTED = out
    return dict(out)
