"""Plain data of the lifecycle: what a launch asks for, what a running enclave looks like, and
how nitro-cli prints it (``reference/nitro.md`` §1.3, key order is struct-declaration order)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from transport.errors import EnclaveError

__all__ = [
    "AppStatusRecord",
    "EnclaveDescribeInfo",
    "EnclaveRecord",
    "EnclaveRunInfo",
    "ExitReasonRecord",
    "RecordError",
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


class RecordError(EnclaveError, ValueError):
    """A record (a state file, a peer's reply) does not have the shape of its ``TypedDict``."""


def _field(m: Mapping[str, object], key: str, kind: type, what: str) -> Any:
    """``m[key]`` if it is a ``kind`` (a ``bool`` is never taken for an ``int``)."""
    if key not in m:
        raise RecordError(f"{what}: missing {key!r}")
    value = m[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RecordError(f"{what}: {key!r} has the wrong type")
    return value


def _optional(m: Mapping[str, object], key: str, kind: type, what: str, default: object) -> Any:
    """``m[key]`` if present and not None (then a ``kind``), else ``default``."""
    if m.get(key) is None:
        return default
    return _field(m, key, kind, what)


def _int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise RecordError(f"{what}: not a list of integers")
    return list(value)


def _str_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise RecordError(f"{what}: not a map of strings")
    return dict(value)


class ExitReasonRecord(TypedDict):
    """:class:`ExitReason` as JSON (state records, control replies, ``enclave_gone`` events)."""

    kind: str
    code: int | None
    signal: int | None
    detail: str


class AppStatusRecord(TypedDict):
    """The app's first status report as recorded (``describe-enclaves --metadata``'s
    ``AppStatus``): its state upper-cased, its own words, the vsock ports it serves."""

    State: str
    Detail: str
    Ports: list[int]


class EnclaveRunInfo(TypedDict):
    """nitro-cli's ``EnclaveRunInfo``: what ``run-enclave`` prints (nitro.md §1.3 key order)."""

    EnclaveName: str
    EnclaveID: str
    ProcessID: int
    EnclaveCID: int
    NumberOfCPUs: int
    CPUIDs: list[int]
    MemoryMiB: int


class _EnclaveDescribeKeys(EnclaveRunInfo):
    State: str
    Flags: str
    #: ``HashAlgorithm`` then PCR0, PCR1, PCR2 (and PCR8 for a signed image): hex
    Measurements: dict[str, str]


# total=False rather than NotRequired[]: under ``from __future__ import annotations`` Python
# 3.11 cannot see NotRequired in a string annotation (``__required_keys__`` would be wrong).
class EnclaveDescribeInfo(_EnclaveDescribeKeys, total=False):
    """nitro-cli's ``EnclaveDescribeInfo`` (``describe-enclaves``); the keys after
    ``Measurements`` come only with ``--metadata``."""

    ImageName: str | None
    ImageVersion: str | None
    #: the image's build metadata, DockerInfo and custom keys, flattened (any JSON values)
    Metadata: dict[str, object]
    Isolation: dict[str, str]
    AppStatus: AppStatusRecord | None


class _EnclaveRecordKeys(TypedDict):
    enclave_name: str
    enclave_id: str
    process_id: int
    enclave_cid: int
    cpu_ids: list[int]
    memory_mib: int
    state: str
    debug: bool
    measurements: dict[str, str]
    image_name: str | None
    image_version: str | None
    metadata: dict[str, object] | None
    isolation: dict[str, str]
    app_pid: int | None
    eif_path: str
    exit_reason: ExitReasonRecord | None
    outside_uid: int | None
    app_status: AppStatusRecord | None


class EnclaveRecord(_EnclaveRecordKeys, total=False):
    """One enclave's state record (``<state dir>/enclaves/<id>.json``, the host daemon's
    reply): :meth:`EnclaveInfo.to_record`'s fields, plus ``owner_pid`` in the state file."""

    #: the supervising process that owns the record (written by ``StateDir.write_record``)
    owner_pid: int


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

    def to_json(self) -> ExitReasonRecord:
        """The JSON form (:class:`ExitReasonRecord`)."""
        return {
            "kind": self.kind.value,
            "code": self.code,
            "signal": self.signal,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, m: Mapping[str, object]) -> ExitReason:
        """Parse the JSON form (from a file or a peer). Raises :class:`RecordError`."""
        what = "exit reason"
        try:
            kind = ExitKind(_field(m, "kind", str, what))
        except ValueError as exc:
            raise RecordError(f"{what}: unknown kind {m.get('kind')!r}") from exc
        return cls(
            kind,
            _optional(m, "code", int, what, None),
            _optional(m, "signal", int, what, None),
            _optional(m, "detail", str, what, ""),
        )


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
    #: the image's metadata as ``describe-enclaves --metadata`` shows it (any JSON values)
    metadata: Mapping[str, object] | None = None
    isolation: IsolationReport = field(default_factory=IsolationReport)
    app_pid: int | None = None
    eif_path: str = ""
    exit_reason: ExitReason | None = None
    #: the host uid the enclave's root maps to (None in records of older runtimes)
    outside_uid: int | None = None
    #: the app's first status report (``transport.app_status``), None until it reports
    app_status: AppStatusRecord | None = None

    @property
    def number_of_cpus(self) -> int:
        return len(self.cpu_ids)

    @property
    def flags(self) -> str:
        return "DEBUG_MODE" if self.debug else "NONE"

    def run_json(self) -> EnclaveRunInfo:
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

    def describe_json(self, *, metadata: bool = False) -> EnclaveDescribeInfo:
        """``EnclaveDescribeInfo``. Our additions come only with ``--metadata``, after nitro-cli's
        keys (``Isolation``: the sandbox layers; ``AppStatus``: the app's report, None until it
        reports), so the default shape stays byte-compatible with nitro-cli."""
        meas: dict[str, str] = {"HashAlgorithm": HASH_ALGORITHM}
        for k in sorted(self.measurements):
            if k in ("PCR0", "PCR1", "PCR2", "PCR8"):
                meas[k] = self.measurements[k]
        out: EnclaveDescribeInfo = {  # run_json's keys, then describe's (nitro-cli order)
            "EnclaveName": self.enclave_name,
            "EnclaveID": self.enclave_id,
            "ProcessID": self.process_id,
            "EnclaveCID": self.enclave_cid,
            "NumberOfCPUs": self.number_of_cpus,
            "CPUIDs": list(self.cpu_ids),
            "MemoryMiB": self.memory_mib,
            "State": self.state,
            "Flags": self.flags,
            "Measurements": meas,
        }
        if metadata:
            out["ImageName"] = self.image_name
            out["ImageVersion"] = self.image_version
            out["Metadata"] = dict(self.metadata or {})
            out["Isolation"] = self.isolation.to_json()
            out["AppStatus"] = None if self.app_status is None else _copy_status(self.app_status)
        return out

    def to_record(self) -> EnclaveRecord:
        """The state record (:class:`EnclaveRecord`, without ``owner_pid``)."""
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
            "app_status": None if self.app_status is None else _copy_status(self.app_status),
        }

    @classmethod
    def from_record(cls, m: Mapping[str, object]) -> EnclaveInfo:
        """Parse a state record (from a file or the host daemon). Raises :class:`RecordError`
        when a field is missing or of the wrong type."""
        what = "enclave record"
        er = m.get("exit_reason")
        if er is not None and not isinstance(er, Mapping):
            raise RecordError(f"{what}: 'exit_reason' has the wrong type")
        metadata = _optional(m, "metadata", Mapping, what, None)
        if metadata is not None and not all(isinstance(k, str) for k in metadata):
            raise RecordError(f"{what}: 'metadata' keys must be strings")
        raw_status = m.get("app_status")
        return cls(
            enclave_name=_field(m, "enclave_name", str, what),
            enclave_id=_field(m, "enclave_id", str, what),
            process_id=_field(m, "process_id", int, what),
            enclave_cid=_field(m, "enclave_cid", int, what),
            cpu_ids=tuple(_int_list(_field(m, "cpu_ids", list, what), f"{what}: cpu_ids")),
            memory_mib=_field(m, "memory_mib", int, what),
            state=_optional(m, "state", str, what, "RUNNING"),
            debug=_optional(m, "debug", bool, what, False),
            measurements=_str_map(m.get("measurements") or {}, f"{what}: measurements"),
            image_name=_optional(m, "image_name", str, what, None),
            image_version=_optional(m, "image_version", str, what, None),
            metadata=None if metadata is None else dict(metadata),
            isolation=IsolationReport(_str_map(m.get("isolation") or {}, f"{what}: isolation")),
            app_pid=_optional(m, "app_pid", int, what, None),
            eif_path=_optional(m, "eif_path", str, what, ""),
            exit_reason=None if er is None else ExitReason.from_json(er),
            outside_uid=_optional(m, "outside_uid", int, what, None),
            # a record of a runtime before app status reports holds something else (or none)
            app_status=_app_status(raw_status) if isinstance(raw_status, dict) else None,
        )


def _copy_status(status: AppStatusRecord) -> AppStatusRecord:
    return {"State": status["State"], "Detail": status["Detail"], "Ports": list(status["Ports"])}


def _app_status(m: Mapping[str, object]) -> AppStatusRecord:
    what = "app status"
    return {
        "State": _field(m, "State", str, what),
        "Detail": _field(m, "Detail", str, what),
        "Ports": _int_list(_field(m, "Ports", list, what), f"{what}: Ports"),
    }
