"""Plain data of the lifecycle: what a launch asks for, what a running enclave looks like, and
how nitro-cli prints it (``reference/nitro.md`` §1.3, key order is struct-declaration order)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EnclaveInfo",
    "EnclaveState",
    "ExitKind",
    "ExitReason",
    "IsolationReport",
    "LaunchSpec",
    "HASH_ALGORITHM",
    "DEFAULT_MAX_TASKS",
]

#: ``describe-*`` print the Rust ``Debug`` of ``sha2::Sha384`` literally (nitro.md §1.3).
HASH_ALGORITHM = "Sha384 { ... }"
#: Tasks (processes + threads) an enclave may have at once by default (the sandbox's pids
#: limit): far more than an inference server uses, far less than the host's pid_max.
DEFAULT_MAX_TASKS = 512


class EnclaveState(enum.StrEnum):
    """An enclave record's state (``describe-enclaves`` ``State``; nitro-cli's
    ``EnclaveState`` plus our STARTING, which describe-enclaves never shows)."""

    STARTING = "STARTING"  #: reserved, booting
    RUNNING = "RUNNING"
    TERMINATING = "TERMINATING"


class ExitKind(enum.StrEnum):
    """How an enclave ended (a ``StrEnum``: ``ExitKind.OOM == "oom"``)."""

    EXITED = "exited"  #: the app returned an exit status
    SIGNALED = "signaled"  #: the app was killed by a signal
    OOM = "oom"  #: the memory limit was hit
    TERMINATED = "terminated"  #: terminate-enclave / rt.terminate()
    BOOT_FAILED = "boot_failed"  #: never became ready (heartbeat timeout, bad image, ...)


@dataclass(frozen=True)
class ExitReason:
    """Why an enclave is gone: the app's exit code or signal, OOM, or a terminate request."""

    kind: ExitKind
    code: int | None = None
    signal: int | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "code": self.code,
            "signal": self.signal,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, m: Mapping[str, Any]) -> ExitReason:
        return cls(ExitKind(m["kind"]), m.get("code"), m.get("signal"), str(m.get("detail", "")))


@dataclass(frozen=True)
class IsolationReport:
    """Which sandbox layers are in force for one enclave.

    ``layers`` maps a layer name (``userns``, ``pidns``, ``netns``, ``mountns``, ``ipcns``,
    ``utsns``, ``landlock``, ``seccomp``, ``nodump``, ``memory``, ``cpus``) to a short status:
    ``"enforced"`` or ``"enforced (<how>)"``, else ``"missing: <reason>"``.
    """

    layers: Mapping[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return [k for k, v in self.layers.items() if v.startswith("missing")]

    def to_json(self) -> dict[str, str]:
        return dict(self.layers)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a supervisor needs to start one enclave (validated by the caller)."""

    eif_path: str
    enclave_id: str
    enclave_name: str
    cid: int
    cpu_ids: tuple[int, ...]
    memory_mib: int
    debug: bool = False
    strict_isolation: bool = False
    parent_ports: frozenset[int] | None = None
    peer_cids: frozenset[int] = frozenset()
    boot_timeout_s: float = 30.0
    terminate_grace_s: float = 5.0
    #: the host uid the enclave's root maps to (allocated per enclave by ``StateDir.reserve``)
    outside_uid: int = 65534
    #: the task limit (pids cgroup, or RLIMIT_NPROC on ``outside_uid``)
    max_tasks: int = DEFAULT_MAX_TASKS

    def to_json(self) -> dict[str, Any]:
        return {
            "eif_path": self.eif_path,
            "enclave_id": self.enclave_id,
            "enclave_name": self.enclave_name,
            "cid": self.cid,
            "cpu_ids": list(self.cpu_ids),
            "memory_mib": self.memory_mib,
            "debug": self.debug,
            "strict_isolation": self.strict_isolation,
            "parent_ports": None if self.parent_ports is None else sorted(self.parent_ports),
            "peer_cids": sorted(self.peer_cids),
            "boot_timeout_s": self.boot_timeout_s,
            "terminate_grace_s": self.terminate_grace_s,
            "outside_uid": self.outside_uid,
            "max_tasks": self.max_tasks,
        }

    @classmethod
    def from_json(cls, m: Mapping[str, Any]) -> LaunchSpec:
        pp = m.get("parent_ports")
        return cls(
            eif_path=str(m["eif_path"]),
            enclave_id=str(m["enclave_id"]),
            enclave_name=str(m["enclave_name"]),
            cid=int(m["cid"]),
            cpu_ids=tuple(int(c) for c in m["cpu_ids"]),
            memory_mib=int(m["memory_mib"]),
            debug=bool(m.get("debug", False)),
            strict_isolation=bool(m.get("strict_isolation", False)),
            parent_ports=None if pp is None else frozenset(int(p) for p in pp),
            peer_cids=frozenset(int(c) for c in m.get("peer_cids", ())),
            boot_timeout_s=float(m.get("boot_timeout_s", 30.0)),
            terminate_grace_s=float(m.get("terminate_grace_s", 5.0)),
            outside_uid=int(m.get("outside_uid", 65534)),
            max_tasks=int(m.get("max_tasks", DEFAULT_MAX_TASKS)),
        )


@dataclass(frozen=True)
class EnclaveInfo:
    """One enclave as ``describe-enclaves`` reports it (plus our own extras).

    ``process_id`` is the PID of the supervising process (nitro-cli's "enclave process").
    """

    enclave_name: str
    enclave_id: str
    process_id: int
    enclave_cid: int
    cpu_ids: tuple[int, ...]
    memory_mib: int
    state: str = "RUNNING"
    debug: bool = False
    measurements: Mapping[str, str] = field(default_factory=dict)
    image_name: str | None = None
    image_version: str | None = None
    metadata: Mapping[str, Any] | None = None
    isolation: IsolationReport = field(default_factory=IsolationReport)
    app_pid: int | None = None
    eif_path: str = ""
    exit_reason: ExitReason | None = None
    #: the host uid the enclave's root maps to (None in records of older runtimes)
    outside_uid: int | None = None
    #: the app's first status report (``transport.app_status``): ``{"state", "detail",
    #: "ports"}``, None until it reports
    app_status: Mapping[str, Any] | None = None

    @property
    def number_of_cpus(self) -> int:
        return len(self.cpu_ids)

    @property
    def flags(self) -> str:
        return "DEBUG_MODE" if self.debug else "NONE"

    def run_json(self) -> dict[str, Any]:
        """``EnclaveRunInfo``: what ``run-enclave`` prints."""
        return {
            "EnclaveName": self.enclave_name,
            "EnclaveID": self.enclave_id,
            "ProcessID": self.process_id,
            "EnclaveCID": self.enclave_cid,
            "NumberOfCPUs": self.number_of_cpus,
            "CPUIDs": list(self.cpu_ids),
            "MemoryMiB": self.memory_mib,
        }

    def describe_json(self, *, metadata: bool = False) -> dict[str, Any]:
        """``EnclaveDescribeInfo``. Our additions come only with ``--metadata``, after nitro-cli's
        keys (``Isolation``: the sandbox layers; ``AppStatus``: the app's report, None until it
        reports), so the default shape stays byte-compatible with nitro-cli."""
        out = self.run_json()
        out["State"] = self.state
        out["Flags"] = self.flags
        meas: dict[str, str] = {"HashAlgorithm": HASH_ALGORITHM}
        for k in sorted(self.measurements):
            if k in ("PCR0", "PCR1", "PCR2", "PCR8"):
                meas[k] = self.measurements[k]
        out["Measurements"] = meas
        if metadata:
            out["ImageName"] = self.image_name
            out["ImageVersion"] = self.image_version
            out["Metadata"] = dict(self.metadata or {})
            out["Isolation"] = self.isolation.to_json()
            out["AppStatus"] = None if self.app_status is None else dict(self.app_status)
        return out

    def to_record(self) -> dict[str, Any]:
        return {
            "enclave_name": self.enclave_name,
            "enclave_id": self.enclave_id,
            "process_id": self.process_id,
            "enclave_cid": self.enclave_cid,
            "cpu_ids": list(self.cpu_ids),
            "memory_mib": self.memory_mib,
            "state": self.state,
            "debug": self.debug,
            "measurements": dict(self.measurements),
            "image_name": self.image_name,
            "image_version": self.image_version,
            "metadata": None if self.metadata is None else dict(self.metadata),
            "isolation": self.isolation.to_json(),
            "app_pid": self.app_pid,
            "eif_path": self.eif_path,
            "exit_reason": None if self.exit_reason is None else self.exit_reason.to_json(),
            "outside_uid": self.outside_uid,
            "app_status": None if self.app_status is None else dict(self.app_status),
        }

    @classmethod
    def from_record(cls, m: Mapping[str, Any]) -> EnclaveInfo:
        er = m.get("exit_reason")
        return cls(
            enclave_name=str(m["enclave_name"]),
            enclave_id=str(m["enclave_id"]),
            process_id=int(m["process_id"]),
            enclave_cid=int(m["enclave_cid"]),
            cpu_ids=tuple(int(c) for c in m["cpu_ids"]),
            memory_mib=int(m["memory_mib"]),
            state=str(m.get("state", "RUNNING")),
            debug=bool(m.get("debug", False)),
            measurements=dict(m.get("measurements") or {}),
            image_name=m.get("image_name"),
            image_version=m.get("image_version"),
            metadata=m.get("metadata"),
            isolation=IsolationReport(dict(m.get("isolation") or {})),
            app_pid=m.get("app_pid"),
            eif_path=str(m.get("eif_path", "")),
            exit_reason=None if er is None else ExitReason.from_json(er),
            outside_uid=None if m.get("outside_uid") is None else int(m["outside_uid"]),
            app_status=m.get("app_status") if isinstance(m.get("app_status"), dict) else None,
        )
