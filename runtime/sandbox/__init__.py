"""Sandboxed enclave processes: namespaces, a minimal read-only root, an own uid, Landlock,
seccomp, limits.

Each enclave is a process tree in new user/pid/net/mount/ipc/uts namespaces whose root is a
host uid of its own (allocated per enclave, like its CID), with a tmpfs root holding read-only
binds of its image, the interpreter and the venv; only loopback; Landlock; a seccomp filter
against cross-process access, kernel attack surface and every socket family but the ones it
uses; not dumpable, no core dumps; memory, task and CPU limits. Each layer is attempted and
reported (:class:`~runtime.records.IsolationReport`); with ``strict=True`` the child refuses
to go on when any layer failed, before any app code runs.

Modules: ``_spec`` (what to build, what a spawn returns), ``_spawn`` (the fork and set-up
protocol, the last steps in the app), ``_mounts`` (mount namespace, minimal root, user
namespace), ``_cgroups`` (memory and pids cgroups), ``_spare`` (pre-forked spares for the
zygote), ``_detect`` (what the host offers), ``landlock`` and ``seccomp`` (the filters). This
package face only re-exports. Everything here uses the standard library alone and imports its
siblings relatively: the zygote loads the package by path under a private name.
"""

from __future__ import annotations

from ._cgroups import CGROUP_MEMORY_ROOT as CGROUP_MEMORY_ROOT
from ._cgroups import CGROUP_PIDS_ROOT as CGROUP_PIDS_ROOT
from ._cgroups import attach_cgroup as attach_cgroup
from ._cgroups import mem_layer as mem_layer
from ._cgroups import oom_killed as oom_killed
from ._cgroups import pids_layer as pids_layer
from ._cgroups import remove_cgroup as remove_cgroup
from ._detect import detect as detect
from ._mounts import TMP_SIZE as TMP_SIZE
from ._spare import Spare as Spare
from ._spare import SpareFactory as SpareFactory
from ._spare import claim_spare as claim_spare
from ._spare import discard_spare as discard_spare
from ._spare import prefork_spare as prefork_spare
from ._spawn import spawn as spawn
from ._spec import DEFAULT_MAX_TASKS as DEFAULT_MAX_TASKS
from ._spec import NOBODY_UID as NOBODY_UID
from ._spec import ChildMain as ChildMain
from ._spec import ForkRequest as ForkRequest
from ._spec import ForkSandbox as ForkSandbox
from ._spec import SandboxSpec as SandboxSpec
from ._spec import Spawned as Spawned
from ._spec import decode_status as decode_status
from ._spec import describe_missing as describe_missing

__all__ = [
    "SandboxSpec",
    "Spawned",
    "ChildMain",
    "ForkRequest",
    "ForkSandbox",
    "spawn",
    "detect",
    "oom_killed",
    "remove_cgroup",
    "attach_cgroup",
    "mem_layer",
    "pids_layer",
    "Spare",
    "SpareFactory",
    "prefork_spare",
    "claim_spare",
    "discard_spare",
    "decode_status",
    "describe_missing",
    "CGROUP_MEMORY_ROOT",
    "CGROUP_PIDS_ROOT",
    "TMP_SIZE",
    "NOBODY_UID",
    "DEFAULT_MAX_TASKS",
]
