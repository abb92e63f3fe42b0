"""The one launch path: what an enclave start asks for, checked once, reserved once.

Every start goes through here, whoever asks: :meth:`runtime.api.Runtime.run_enclave` (an
application) and ``enclave run-enclave`` (the CLI, through the host daemon of
:mod:`runtime.host`, which calls the same :meth:`~runtime.api.Runtime.launch`). So both get the
same argument rules (nitro-cli's E01/E02/E03), the same reservation (CID, CPUs, memory, the
enclave's own uid) and the same supervisor, zygote warm start included::

    LaunchRequest(...)          validated on construction (E01/E02/E03, ValueError subclasses)
    -> reserve_launch(state, request, ...)   STARTING record + LaunchSpec (E19/E26/E27/E29/...)
    -> EnclaveSupervisor(state, reservation, spec, spawner=..., image_cache=...)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from runtime.errors import (
    ConflictingArgumentError,
    InvalidArgumentError,
    MissingArgumentError,
)
from runtime.records import DEFAULT_MAX_TASKS, EnclaveInfo, LaunchSpec
from runtime.state import CID_MAX, CID_MIN, StateDir

__all__ = ["LaunchRequest", "reserve_launch", "MAX_BOOT_TIMEOUT_S"]

#: Longest boot timeout accepted (Nitro's own is 180 s and more for large images).
MAX_BOOT_TIMEOUT_S: Final = 3600.0
#: Most ports/CIDs a request may list (a policy, not a bulk list).
_MAX_LIST: Final = 1024


def _int(value: object, what: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(
            f"`{what}` must be an integer in {low}..{high}, got {value!r}",
            info=(what, repr(value)),
        )
    return value


@dataclass(frozen=True)
class LaunchRequest:
    """What to start (validated when constructed).

    Args:
        eif_path: the image.
        memory_mib: enclave memory (MiB).
        cpu_count, cpu_ids: exactly one of them.
        cid: None or 0 picks a free CID; else 4..4294967294.
        debug: debug mode (console; zero PCRs in attestation documents, as on Nitro).
        name: the enclave name (default: the EIF's base name, de-duplicated).
        strict_isolation: refuse to start when a sandbox layer is missing (None: the
            runtime's default).
        parent_ports, peer_cids: the fabric policy (None: every parent port).
        boot_timeout_s: heartbeat + app start deadline (None: the runtime's default).
        max_tasks: the enclave's task limit (processes + threads).

    Raises:
        MissingArgumentError: E01, neither ``cpu_count`` nor ``cpu_ids``.
        ConflictingArgumentError: E02, both.
        InvalidArgumentError: E03, a value of the wrong type or out of range.
    """

    eif_path: str
    memory_mib: int
    cpu_count: int | None = None
    cpu_ids: tuple[int, ...] | None = None
    cid: int | None = None
    debug: bool = False
    name: str | None = None
    strict_isolation: bool | None = None
    parent_ports: frozenset[int] | None = None
    peer_cids: frozenset[int] = frozenset()
    boot_timeout_s: float | None = None
    max_tasks: int = DEFAULT_MAX_TASKS

    def __post_init__(self) -> None:
        if not isinstance(self.eif_path, str) or not self.eif_path or "\0" in self.eif_path:
            raise InvalidArgumentError(f"`eif-path` is not a path: {self.eif_path!r}")
        if self.cpu_count is None and self.cpu_ids is None:
            raise MissingArgumentError(
                "Missing both `cpu-count` and `cpu-ids`", info=("cpu-count",)
            )
        if self.cpu_count is not None and self.cpu_ids is not None:
            raise ConflictingArgumentError(
                "`cpu-count` and `cpu-ids` cannot be used together",
                info=("cpu-count", "cpu-ids"),
            )
        _int(self.memory_mib, "memory", low=0, high=2**64 - 1)
        if self.cpu_count is not None:
            _int(self.cpu_count, "cpu-count", low=1, high=2**32 - 1)
        if self.cpu_ids is not None:
            if not isinstance(self.cpu_ids, tuple) or not self.cpu_ids:
                raise InvalidArgumentError(f"`cpu-ids` must list CPUs, got {self.cpu_ids!r}")
            for c in self.cpu_ids:
                _int(c, "cpu-ids", low=0, high=2**32 - 1)
        if self.cid is not None and self.cid != 0:
            _int(self.cid, "enclave-cid", low=CID_MIN, high=CID_MAX)
        if not isinstance(self.debug, bool):
            raise InvalidArgumentError(f"`debug-mode` must be a bool, got {self.debug!r}")
        if self.name is not None and (not isinstance(self.name, str) or "\0" in self.name):
            raise InvalidArgumentError(f"`enclave-name` is not a name: {self.name!r}")
        if self.strict_isolation is not None and not isinstance(self.strict_isolation, bool):
            raise InvalidArgumentError("`strict-isolation` must be a bool")
        for what, values in (("parent-ports", self.parent_ports), ("peer-cids", self.peer_cids)):
            if values is None:
                continue
            if not isinstance(values, frozenset) or len(values) > _MAX_LIST:
                raise InvalidArgumentError(f"`{what}` must be a frozenset of at most {_MAX_LIST}")
            for v in values:
                _int(v, what, low=0, high=2**32 - 1)
        if self.boot_timeout_s is not None and (
            isinstance(self.boot_timeout_s, bool)
            or not isinstance(self.boot_timeout_s, int | float)
            or not 0 < self.boot_timeout_s <= MAX_BOOT_TIMEOUT_S
            or math.isnan(self.boot_timeout_s)
        ):
            raise InvalidArgumentError(
                f"`boot-timeout` must be in (0, {MAX_BOOT_TIMEOUT_S:g}] seconds, "
                f"got {self.boot_timeout_s!r}"
            )
        _int(self.max_tasks, "max-tasks", low=1, high=1 << 22)

    def to_json(self) -> dict[str, Any]:
        """The request as JSON (the CLI sends it to the host daemon)."""
        return {
            "eif_path": self.eif_path,
            "memory_mib": self.memory_mib,
            "cpu_count": self.cpu_count,
            "cpu_ids": None if self.cpu_ids is None else list(self.cpu_ids),
            "cid": self.cid,
            "debug": self.debug,
            "name": self.name,
            "strict_isolation": self.strict_isolation,
            "parent_ports": None if self.parent_ports is None else sorted(self.parent_ports),
            "peer_cids": sorted(self.peer_cids),
            "boot_timeout_s": self.boot_timeout_s,
            "max_tasks": self.max_tasks,
        }

    @classmethod
    def from_json(cls, m: Mapping[str, Any]) -> LaunchRequest:
        """Rebuild a request from :meth:`to_json` (validated again).

        Raises:
            InvalidArgumentError: not a request object, unknown keys, or bad values.
        """
        if not isinstance(m, Mapping):
            raise InvalidArgumentError("a launch request must be a JSON object")
        unknown = set(m) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidArgumentError(f"unknown launch request keys {sorted(unknown)}")

        def ints(key: str) -> Sequence[Any] | None:
            v = m.get(key)
            if v is None:
                return None
            if not isinstance(v, list) or len(v) > _MAX_LIST:
                raise InvalidArgumentError(f"`{key}` must be a list")
            return v

        cpu_ids, pp, peers = ints("cpu_ids"), ints("parent_ports"), ints("peer_cids")
        try:
            return cls(
                eif_path=m.get("eif_path"),  # type: ignore[arg-type]  # checked in __post_init__
                memory_mib=m.get("memory_mib"),  # type: ignore[arg-type]
                cpu_count=m.get("cpu_count"),
                cpu_ids=None if cpu_ids is None else tuple(cpu_ids),
                cid=m.get("cid"),
                debug=m.get("debug", False),
                name=m.get("name"),
                strict_isolation=m.get("strict_isolation"),
                parent_ports=None if pp is None else frozenset(pp),
                peer_cids=frozenset(peers or ()),
                boot_timeout_s=m.get("boot_timeout_s"),
                max_tasks=m.get("max_tasks", DEFAULT_MAX_TASKS),
            )
        except TypeError as exc:  # unhashable list members and the like
            raise InvalidArgumentError(f"bad launch request: {exc}") from None


def reserve_launch(
    state: StateDir,
    request: LaunchRequest,
    *,
    owner_pid: int,
    strict_isolation: bool,
    boot_timeout_s: float,
    terminate_grace_s: float,
) -> tuple[EnclaveInfo, LaunchSpec]:
    """Reserve capacity for ``request`` (a STARTING record) and build the supervisor's spec.

    ``strict_isolation`` and ``boot_timeout_s`` are the runtime's defaults, used where the
    request leaves them unset.

    Raises:
        FileOperationError (E19), InsufficientMemoryRequestedError (E26),
        InsufficientMemoryAvailableError (E27), MemoryBelowMinimumError (E29), CPU errors
        (E20-E22), InvalidArgumentError (E03: CID in use): from :meth:`StateDir.reserve`.
    """
    res = state.reserve(
        eif_path=request.eif_path,
        memory_mib=request.memory_mib,
        cpu_count=request.cpu_count,
        cpu_ids=request.cpu_ids,
        cid=request.cid,
        name=request.name,
        debug=request.debug,
        owner_pid=owner_pid,
    )
    assert res.outside_uid is not None  # reserve always allocates one
    spec = LaunchSpec(
        eif_path=res.eif_path,
        enclave_id=res.enclave_id,
        enclave_name=res.enclave_name,
        cid=res.enclave_cid,
        cpu_ids=res.cpu_ids,
        memory_mib=res.memory_mib,
        debug=request.debug,
        strict_isolation=strict_isolation
        if request.strict_isolation is None
        else request.strict_isolation,
        parent_ports=request.parent_ports,
        peer_cids=request.peer_cids,
        boot_timeout_s=request.boot_timeout_s or boot_timeout_s,
        terminate_grace_s=terminate_grace_s,
        outside_uid=res.outside_uid,
        max_tasks=request.max_tasks,
    )
    return res, spec
