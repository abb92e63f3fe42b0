"""The runtime's view of which replicas are healthy, for the ingress (``TargetSource``).

The supervisor of every enclave keeps its record in the state directory: RUNNING once the boot
heartbeat arrived and the app started, removed the moment the enclave process ends (crash,
kill, terminate) or its supervisor dies; and the app's own status report (READY, FAILED) as
soon as it sends one. :class:`RuntimeTargets` reads those records (``describe-enclaves``, in a
thread) and calls a replica healthy when it is RUNNING, and its app did not report a failure:

* by name: every enclave of the group (``runtime.replicas``), so replicas started later, or
  restarted under the same name, are added, and ended ones removed;
* by CID: the given enclaves while their records say so; a CID with no record in this state
  directory (an enclave of another runtime) counts as healthy while its vsock listener
  answers a probe.

The ingress also takes a target out the moment a connect to it fails, so the records only need
to be as fresh as its polling interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio

from runtime.records import EnclaveInfo, EnclaveState
from runtime.state import StateDir
from transport.fabric.addressing import socket_path
from transport.fabric.host import default_fabric_dir, probe_listener
from transport.peers import in_group
from transport.vsock import VsockAddr

__all__ = ["RuntimeTargets", "healthy"]


def healthy(info: EnclaveInfo) -> bool:
    """RUNNING, and its app did not report FAILED."""
    if info.state != EnclaveState.RUNNING:
        return False
    status = info.app_status  # None until the app reports
    return status is None or status["State"].upper() != "FAILED"


class RuntimeTargets:
    """A ``transport.ingress.TargetSource`` over a state directory's records.

    Args:
        state: the state directory whose enclaves to follow.
        name: follow the group of this name, on vsock port ``port`` of each; or
        addrs: follow these ``(cid, port)`` targets.
        fabric_dir: where to probe CIDs that have no record (default: the process's).
    """

    def __init__(
        self,
        state: StateDir,
        *,
        name: str | None = None,
        port: int | None = None,
        addrs: Sequence[VsockAddr] = (),
        fabric_dir: Path | None = None,
    ) -> None:
        if (name is None) == (not addrs):
            raise ValueError("follow exactly one of a group name or a list of targets")
        if name is not None and port is None:
            raise ValueError("a group needs the port of its service")
        self.state = state
        self.port = 0 if port is None else VsockAddr(4, port).port
        self.name = name
        self.addrs = tuple(addrs)
        self.fabric_dir = fabric_dir

    async def healthy(self) -> Sequence[VsockAddr]:
        """The healthy targets now (see the module docstring)."""
        return await trio.to_thread.run_sync(self._healthy_now)

    def _healthy_now(self) -> list[VsockAddr]:
        records = self.state.records()
        if self.name is not None:
            name = self.name
            return [
                VsockAddr(r.enclave_cid, self.port)
                for r in records
                if in_group(name, r.enclave_name) and healthy(r)
            ]
        by_cid = {r.enclave_cid: r for r in records}
        out = []
        fabric = self.fabric_dir or default_fabric_dir()
        for addr in self.addrs:
            record = by_cid.get(addr.cid)
            if record is not None:
                if healthy(record):
                    out.append(addr)
            elif probe_listener(socket_path(fabric, addr)):
                out.append(addr)
        return out
