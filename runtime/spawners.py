"""How an enclave's process tree is started: a fresh interpreter, or a fork of a warm zygote.

A supervisor hands a :class:`Spawner` one :class:`ChildLaunch` (what to build and run) and a
:class:`SpawnObserver` (what the spawner tells the supervisor while it works: today only that
the fork request is on its way, so the supervisor can overlap its late image check with the
fork). The two spawners:

* :class:`FreshSpawner` (here): fork, sandbox, exec ``python -P -m runtime.enclave_init``;
* :class:`runtime.zygote.ZygotePool`: a pre-imported zygote per bootstrap digest forks the
  sandboxed enclave and runs init in-process (see that module).
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol

from runtime import sandbox

if TYPE_CHECKING:
    from runtime.eif import EifFile

__all__ = [
    "SpawnPath",
    "ChildLaunch",
    "SpawnObserver",
    "Spawner",
    "FreshSpawner",
    "NullObserver",
    "site_packages",
]


class SpawnPath(enum.StrEnum):
    """Which way an enclave was started (logged, and in the start figures)."""

    FRESH = "fresh"  #: a new interpreter imports everything
    ZYGOTE = "zygote"  #: a fork of a pre-imported zygote


@dataclass(frozen=True)
class ChildLaunch:
    """Everything a spawner needs: the sandbox spec and what init must run.

    Attributes:
        sandbox_spec: namespaces, mounts, limits and the fds the enclave inherits.
        env: the enclave's environment (init's launch parameters travel on an fd).
        bootstrap_dir: the enclave's own verified bootstrap tree.
        pcr1: the image's PCR1 (the bootstrap digest a zygote is keyed by).
        eif_path: the image file.
        eif: the parsed image (CRC and measurements checked); a zygote pool extracts its own
            bootstrap copy from it, never from the enclave's tree.
    """

    sandbox_spec: sandbox.SandboxSpec
    env: dict[str, str]
    bootstrap_dir: str
    pcr1: str
    eif_path: str
    eif: EifFile | None = None


class SpawnObserver(Protocol):
    """What a spawner reports to its supervisor while it starts an enclave."""

    def request_sent(self) -> None:
        """The fork request left (zygote path); called at most once, before the reply."""


class NullObserver:
    """An observer that ignores every report."""

    def request_sent(self) -> None:
        """Ignored."""


class Spawner(Protocol):
    """Starts the sandboxed enclave process tree."""

    #: the path this spawner takes
    kind: SpawnPath

    async def spawn(self, launch: ChildLaunch, observer: SpawnObserver) -> sandbox.Spawned:
        """Start the enclave's process tree; returns once it is about to run init.

        Raises:
            OSError: the fork or the sandbox set-up failed; nothing is left running.
        """
        ...

    def reap(self, spawned: sandbox.Spawned) -> None:
        """Collect the exit of what :meth:`spawn` forked (blocking; called from a thread)."""
        ...


class FreshSpawner:
    """Fork here, sandbox, then exec a fresh interpreter running ``runtime.enclave_init``."""

    kind = SpawnPath.FRESH

    async def spawn(self, launch: ChildLaunch, observer: SpawnObserver) -> sandbox.Spawned:
        """See :meth:`Spawner.spawn` (the observer has nothing to hear on this path)."""
        argv = [sys.executable, "-P", "-m", "runtime.enclave_init"]
        env = dict(launch.env)

        def child() -> NoReturn:
            try:
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)

        # The handshake blocks for a few ms; forking must happen on this (the main) thread.
        # The supervisor attaches the memory cgroup while the enclave boots (see its gate).
        return sandbox.spawn(launch.sandbox_spec, child, attach=False)

    def reap(self, spawned: sandbox.Spawned) -> None:
        """Wait for the relay process."""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(spawned.middle_pid, 0)


def site_packages() -> list[str]:
    """This interpreter's site-packages directories (what enclaves import third-party code
    from: the image pins their identity, the sandbox mounts them read-only)."""
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return sorted(p for p in paths if os.path.isdir(p))
