"""Enclave cgroups (v1): memory (``--memory``) and pids (the task limit).

Each enclave gets a cgroup of its own in each hierarchy, named after its slot (unique within a
state directory) and created exclusively (names are machine-wide): a leftover of a dead
supervisor is empty and replaced, a live one is never shared (that enclave then falls back to
the rlimit, which the layer report says). Where a hierarchy is missing or not writable, the
sandbox uses RLIMIT_AS (memory) or RLIMIT_NPROC on the enclave's own uid (tasks) instead.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = [
    "CGROUP_MEMORY_ROOT",
    "CGROUP_PIDS_ROOT",
    "mem_layer",
    "pids_layer",
    "make_memory_cgroup",
    "make_pids_cgroup",
    "set_memory_limit",
    "set_pids_limit",
    "oom_killed",
    "remove_cgroup",
    "attach_cgroup",
    "join_cgroup",
]

#: cgroup v1 memory hierarchy root for enclaves.
CGROUP_MEMORY_ROOT = Path("/sys/fs/cgroup/memory/enclave-runtime")
#: cgroup v1 pids hierarchy root for enclaves.
CGROUP_PIDS_ROOT = Path("/sys/fs/cgroup/pids/enclave-runtime")


def _writable_root(root: Path) -> bool:
    try:
        root.mkdir(exist_ok=True)
        return os.access(root, os.W_OK)
    except OSError:
        return False


def mem_layer() -> str:
    """``"cgroup"`` when enclave memory cgroups can be made here, else ``"rlimit"``."""
    return "cgroup" if _writable_root(CGROUP_MEMORY_ROOT) else "rlimit"


def pids_layer() -> str:
    """``"cgroup"`` when enclave pids cgroups can be made here, else ``"rlimit"``."""
    return "cgroup" if _writable_root(CGROUP_PIDS_ROOT) else "rlimit"


def _make_exclusive(root: Path, name: str) -> str | None:
    cg = root / name
    try:
        try:
            cg.mkdir()
        except FileExistsError:
            cg.rmdir()  # OSError (EBUSY) while tasks remain: not ours, never shared
            cg.mkdir()
        return str(cg)
    except OSError:
        return None


def _slot(enclave_id: str) -> str:
    return enclave_id.rpartition("-enc")[2] or enclave_id


def set_memory_limit(cgroup: str, memory_mib: int) -> None:
    """Write the memory limit (and memory+swap, where swap accounting exists)."""
    limit = str(memory_mib * 1024 * 1024)
    Path(cgroup, "memory.limit_in_bytes").write_text(limit)
    with contextlib.suppress(OSError):  # absent without swap accounting
        Path(cgroup, "memory.memsw.limit_in_bytes").write_text(limit)


def set_pids_limit(cgroup: str, max_tasks: int) -> None:
    """Write the task limit. The relay process that joins the cgroup with the enclave counts
    too: one more than the enclave's own allowance."""
    Path(cgroup, "pids.max").write_text(str(max_tasks + 1))


def make_memory_cgroup(enclave_id: str, memory_mib: int) -> str | None:
    """The enclave's memory cgroup with its limit, or None (RLIMIT_AS fallback)."""
    if mem_layer() != "cgroup":
        return None
    cg = _make_exclusive(CGROUP_MEMORY_ROOT, _slot(enclave_id))
    if cg is None:
        return None
    try:
        set_memory_limit(cg, memory_mib)
    except OSError:
        remove_cgroup(cg)
        return None
    return cg


def make_pids_cgroup(enclave_id: str, max_tasks: int) -> str | None:
    """The enclave's pids cgroup with its limit, or None (RLIMIT_NPROC fallback)."""
    if pids_layer() != "cgroup":
        return None
    cg = _make_exclusive(CGROUP_PIDS_ROOT, _slot(enclave_id))
    if cg is None:
        return None
    try:
        set_pids_limit(cg, max_tasks)
    except OSError:
        remove_cgroup(cg)
        return None
    return cg


def oom_killed(cgroup: str | None) -> bool:
    """Whether the kernel OOM-killed something in this enclave's memory cgroup."""
    if not cgroup:
        return False
    try:
        for line in Path(cgroup, "memory.oom_control").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill" and int(v) > 0:
                return True
    except (OSError, ValueError):
        pass
    return False


def remove_cgroup(cgroup: str | None, *, wait_s: float = 0.0) -> bool:
    """Remove an enclave's cgroup; with ``wait_s`` retry while dying tasks keep it busy.
    Returns whether it is gone."""
    if not cgroup:
        return True
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.rmdir(cgroup)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def attach_cgroup(cgroup: str | None, pid: int) -> None:
    """Move ``pid`` into an enclave cgroup (cgroup v1 migration waits for an RCU grace period,
    ~10 ms: callers overlap it with the enclave's boot and gate the app on it)."""
    if pid <= 0:  # writing 0 would move the calling process itself
        raise ValueError(f"not a process id: {pid}")
    if cgroup:
        Path(cgroup, "cgroup.procs").write_text(str(pid))


def join_cgroup(cgroup: str | None) -> None:
    """Move the calling process into ``cgroup`` (its future children follow it)."""
    if cgroup:
        Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
