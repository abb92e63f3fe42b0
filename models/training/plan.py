"""What the host asks of a worker for one run: the plan (untrusted input, checked here).

The host decides who trains (which enclaves, in which ring order), how many steps, and where to
resume. A lying host can only break the run: the ring admits only enclaves whose attestation
passes the peer policy (same PCR0, not debug), each worker checks that its neighbours are the
members the plan names, every member checks that the others hold the same plan (its digest
travels in the ring hello), and a resumed checkpoint must carry the step the plan names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Final

from models.training.errors import TrainingError

__all__ = ["Member", "Plan", "MAX_WORKERS", "MAX_STEPS"]

#: Workers in one ring (the shard count bounds it further; Nitro runs at most 4 enclaves per
#: parent, the emulation a few more).
MAX_WORKERS: Final = 16
#: Steps of one run.
MAX_STEPS: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class Member:
    cid: int
    module_id: str


@dataclass(frozen=True, slots=True)
class Plan:
    """One run of the ring, as one worker sees it."""

    generation: int
    rank: int
    members: tuple[Member, ...]
    start_step: int
    steps: int
    protected: bool
    #: Set when there is nothing to run: the worker exits (the reason is logged).
    stop: str | None = None

    @property
    def world(self) -> int:
        return len(self.members)

    def digest(self) -> bytes:
        """SHA-256 of what every member must agree on (all but the rank)."""
        body = {
            "generation": self.generation,
            "members": [[m.cid, m.module_id] for m in self.members],
            "start_step": self.start_step,
            "steps": self.steps,
            "protected": self.protected,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "rank": self.rank,
            "members": [{"cid": m.cid, "module_id": m.module_id} for m in self.members],
            "start_step": self.start_step,
            "steps": self.steps,
            "protected": self.protected,
            "stop": self.stop,
        }

    @classmethod
    def from_json(cls, raw: object, *, shards: int) -> Plan:
        """Check a plan from the host.

        Raises:
            TrainingError: malformed, out of bounds, or more workers than shards.
        """
        if not isinstance(raw, dict):
            raise TrainingError("the plan is not a map")
        stop = raw.get("stop")
        if stop is not None:
            return cls(0, 0, (), 0, 0, True, str(stop)[:200])
        ints = {k: raw.get(k) for k in ("generation", "rank", "start_step", "steps")}
        if not all(type(v) is int and v >= 0 for v in ints.values()):
            raise TrainingError("plan fields generation, rank, start_step, steps: integers >= 0")
        members_raw = raw.get("members")
        if not isinstance(members_raw, list) or not 1 <= len(members_raw) <= MAX_WORKERS:
            raise TrainingError(f"a plan names 1-{MAX_WORKERS} members")
        members = []
        for m in members_raw:
            if (
                not isinstance(m, dict)
                or type(m.get("cid")) is not int
                or not isinstance(m.get("module_id"), str)
                or not 0 < len(m["module_id"]) <= 128
            ):
                raise TrainingError("a plan member is {cid: int, module_id: str}")
            members.append(Member(m["cid"], m["module_id"]))
        if len({m.module_id for m in members}) != len(members):
            raise TrainingError("a plan names a member twice")
        if len(members) > shards:
            raise TrainingError(f"{len(members)} workers for {shards} shards")
        protected = raw.get("protected")
        if type(protected) is not bool:
            raise TrainingError("plan field protected: a boolean")
        rank, start, steps = ints["rank"], ints["start_step"], ints["steps"]
        if not isinstance(rank, int) or not isinstance(start, int) or not isinstance(steps, int):
            raise TrainingError("plan rank or steps out of range")
        if rank >= len(members) or not start <= steps <= MAX_STEPS:
            raise TrainingError("plan rank or steps out of range")
        return cls(int(ints["generation"] or 0), rank, tuple(members), start, steps, protected)
