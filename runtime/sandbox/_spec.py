"""What to build around one enclave, and what a spawn returns. Plain data."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypedDict

__all__ = [
    "SandboxSpec",
    "Spawned",
    "ChildMain",
    "ForkRequest",
    "ForkSandbox",
    "NOBODY_UID",
    "DEFAULT_MAX_TASKS",
    "decode_status",
    "describe_missing",
]

#: The host's "nobody": what ns-root mapped to before each enclave had a uid of its own. Kept
#: only as the default of :class:`SandboxSpec` for callers that build specs by hand (tests);
#: the runtime always allocates a uid per enclave (``runtime.state``).
NOBODY_UID = 65534
#: Tasks (processes and threads) an enclave may have at once unless told otherwise: far more
#: than an inference server uses (tens), far less than the host's pid_max.
DEFAULT_MAX_TASKS = 512

#: The child entry: runs in the sandboxed process (exec an interpreter, or run in-process).
ChildMain = Callable[[], NoReturn]


class ForkSandbox(TypedDict):
    """A :class:`SandboxSpec`'s JSON-carried fields in a :class:`ForkRequest` (the fds travel
    as SCM_RIGHTS beside it)."""

    enclave_id: str
    cpu_ids: list[int]
    memory_mib: int
    image_root: str
    strict: bool
    cwd: str
    outside_uid: int
    max_tasks: int


class ForkRequest(TypedDict):
    """The runtime's request to its zygote for one enclave (JSON on the zygote's socket), what
    a spare's :data:`~._spare.SpareFactory` receives at its claim."""

    sandbox: ForkSandbox
    #: the enclave's environment
    env: dict[str, str]
    #: the enclave's own verified bootstrap tree
    bootstrap_dir: str
    #: whether a console fd follows the fabric, NSM and init fds
    console: bool
    #: whether the zygote attaches the cgroup (False: the supervisor does, while it boots)
    attach_cgroup: bool


@dataclass(frozen=True)
class SandboxSpec:
    """What to build around one enclave."""

    enclave_id: str
    cpu_ids: tuple[int, ...]
    memory_mib: int
    image_root: str
    #: fd number in the child -> fd in the parent (dup'ed into place; everything else closed)
    fds: Mapping[int, int] = field(default_factory=dict)
    #: where stdout/stderr go (debug console pipe); None = /dev/null
    console_fd: int | None = None
    strict: bool = False
    #: extra read-only paths (default: the interpreter, the venv, /usr)
    extra_ro: tuple[str, ...] = ()
    #: the app's working directory inside the sandbox
    cwd: str = "/"
    #: the host uid (and gid) the enclave's root maps to: one of its own, so that no other
    #: host process (``nobody`` included) can signal or ptrace it
    outside_uid: int = NOBODY_UID
    #: most tasks (processes + threads) at once: a pids cgroup, else RLIMIT_NPROC on the
    #: enclave's own uid
    max_tasks: int = DEFAULT_MAX_TASKS

    def __post_init__(self) -> None:
        if not 0 < self.outside_uid < 0xFFFFFFFF:  # never root; 2**32-1 is "no uid"
            raise ValueError(f"not a uid an enclave may run as: {self.outside_uid}")
        if self.max_tasks < 1:
            raise ValueError(f"max_tasks must be at least 1, got {self.max_tasks}")


@dataclass
class Spawned:
    """A started enclave process tree."""

    middle_pid: int
    app_pid: int
    #: read end of a pipe: 4 bytes (the app's wait status) then EOF when the app has ended
    status_fd: int
    layers: dict[str, str]
    #: the memory cgroup (None: RLIMIT_AS)
    cgroup: str | None
    #: whether ``app_pid`` is already in ``cgroup`` (else the caller must attach it)
    attached: bool = True
    #: CLOCK_MONOTONIC time of each set-up phase (diagnostics)
    timing: dict[str, float] = field(default_factory=dict)
    #: the pids cgroup (None: RLIMIT_NPROC), joined by the enclave before any app code runs
    pids_cgroup: str | None = None


def decode_status(status: int) -> tuple[int | None, int | None]:
    """(exit code, signal) of a wait status."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None


def describe_missing(layers: Mapping[str, str]) -> Sequence[str]:
    """The layers reported missing."""
    return [k for k, v in layers.items() if v.startswith("missing")]
