"""Enclave records in the state directory, shared by every CLI invocation and runtime.

Layout under the state directory (``ENCLAVE_STATE_DIR``, mode 0700)::

    instance-id              this "parent instance"'s id (i-<17 hex>), created once
    allocator.yaml           the capacity pool (nitro-cli's /etc/nitro_enclaves/allocator.yaml)
    enclaves.lock            flock(2) serialising allocation across processes
    enclaves/<slot>.json     one record per enclave (slot = the 16 hex after "-enc")
    enclaves/<slot>.sock     the supervisor's control socket (terminate, console)
    enclaves/<slot>/         per-enclave work dir (the unpacked, verified image)

A record names its ``owner_pid`` (the supervising process). A record whose owner is gone is
stale: readers remove it (and its socket and work dir), so a crashed supervisor never leaks
capacity. Allocation (name de-dup, CID, CPUs, memory) happens under the lock and writes a
``STARTING`` record before the supervisor is launched, so two concurrent ``run-enclave`` calls
never get the same CID or CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from runtime.errors import (
    CpuUnavailableError,
    EnclaveNamingError,
    EnclaveSocketError,
    FileOperationError,
    InsufficientCpusError,
    InsufficientMemoryAvailableError,
    InsufficientMemoryRequestedError,
    InvalidArgumentError,
    InvalidCpuConfigurationError,
    MemoryBelowMinimumError,
)
from runtime.records import EnclaveInfo, EnclaveState
from transport.paths import ensure_private_dir

__all__ = [
    "Allocator",
    "StateDir",
    "MIN_MEMORY_MIB",
    "MAX_ENCLAVES",
    "EIF_MEMORY_RATIO",
    "parse_cpu_pool",
]

#: NE_MIN_ENCLAVE_MEM_SIZE (nitro.md §1.5).
MIN_MEMORY_MIB = 64
#: ENCLAVE_MEMORY_EIF_SIZE_RATIO: memory must be at least 4x the EIF file size (E26).
EIF_MEMORY_RATIO = 4
#: "up to 4 enclaves per parent" (UG, nitro.md §1.5).
MAX_ENCLAVES = 4
#: Hex digits of an EC2 instance id after ``i-`` (nitro.md §1.4: "i-1234567890abcdef0").
INSTANCE_ID_HEX_DIGITS = 17
_INSTANCE_ID_RE = re.compile(rf"i-[0-9a-f]{{{INSTANCE_ID_HEX_DIGITS}}}")
#: Enclave memory is made of 2 MiB hugepages at least; requests are rounded up to this.
MEMORY_GRANULE_MIB = 2
#: Default pool: sized for this 2-core development machine.
DEFAULT_POOL_MIB = 4096
#: Valid enclave CIDs (nitro.md §1.1 / §8).
CID_MIN, CID_MAX = 4, 0xFFFFFFFE
#: Auto-assigned CIDs are drawn from a readable range (Nitro says "random").
AUTO_CID_RANGE = (16, 0xFFFF)
#: The subordinate uid range enclaves run as (first uid, count): each enclave's root maps to
#: one uid of its own, allocated like its CID. 0x70000000.. is a block no distribution or
#: systemd assigns (systemd's container ranges end below it, its "unused" block begins
#: there); override with ``enclave_uids: FIRST-LAST`` in allocator.yaml.
ENCLAVE_UID_RANGE = (0x7000_0000, 0x1_0000)


def _parse_uid_range(text: str) -> tuple[int, int]:
    """``"FIRST-LAST"`` -> (first, count); at least 16 uids, never root or 2**32-1."""
    lo_text, sep, hi_text = text.partition("-")
    if not sep:
        raise ValueError(f"enclave_uids must be FIRST-LAST, got {text!r}")
    lo, hi = int(lo_text), int(hi_text)
    if not 0 < lo <= hi < 0xFFFF_FFFF or hi - lo + 1 < 16:
        raise ValueError(f"enclave_uids {text!r}: need 16+ uids within 1..4294967294")
    return lo, hi - lo + 1


def _uids_in_use() -> set[int]:
    """Real uids of the processes running now (/proc), so that an enclave never gets a uid
    some other process (another state directory's enclave, a user) already runs as."""
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    out.add(entry.stat(follow_symlinks=False).st_uid)
    return out


def _allocate_uid(uid_range: tuple[int, int], taken: set[int | None]) -> int:
    """A uid of the range that no record of this state directory and no live process has,
    drawn at random like an automatic CID (E27 when the range is exhausted)."""
    first, count = uid_range
    busy = {u for u in taken if u is not None} | _uids_in_use()
    for _ in range(64):  # random probes first: the range is normally nearly empty
        cand = first + secrets.randbelow(count)
        if cand not in busy:
            return cand
    for cand in range(first, first + count):
        if cand not in busy:
            return cand
    raise InsufficientMemoryAvailableError(f"no free enclave uid in {first}..{first + count - 1}")


def parse_cpu_pool(text: str) -> tuple[int, ...]:
    """Parse nitro's ``cpu_pool`` syntax ``"2,3,6-9"`` into sorted CPU ids."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            a, b = int(lo), int(hi)
            if a > b or b - a > 4096:
                raise ValueError(f"bad cpu range {part!r}")
            out.update(range(a, b + 1))
        else:
            out.add(int(part))
    if not out:
        raise ValueError("empty cpu_pool")
    return tuple(sorted(out))


@dataclass(frozen=True)
class Allocator:
    """The capacity pool all enclaves of one state directory share."""

    memory_mib: int
    cpu_pool: tuple[int, ...]
    max_enclaves: int = MAX_ENCLAVES
    #: (first uid, count) of the enclaves' subordinate uid range
    uid_range: tuple[int, int] = ENCLAVE_UID_RANGE

    @classmethod
    def default(cls) -> Allocator:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        return cls(memory_mib=DEFAULT_POOL_MIB, cpu_pool=cpus)

    @classmethod
    def from_mapping(cls, m: Any) -> Allocator:
        if not isinstance(m, dict):
            raise FileOperationError("allocator.yaml must be a mapping")
        unknown = set(m) - {"memory_mib", "cpu_count", "cpu_pool", "max_enclaves", "enclave_uids"}
        if unknown:
            raise FileOperationError(f"allocator.yaml: unknown keys {sorted(unknown)}")
        if "cpu_count" in m and "cpu_pool" in m:
            raise FileOperationError("allocator.yaml: cpu_count and cpu_pool are exclusive")
        host = sorted(os.sched_getaffinity(0))
        try:
            if "cpu_pool" in m:
                pool = parse_cpu_pool(str(m["cpu_pool"]))
            else:
                n = int(m.get("cpu_count", len(host)))
                if n < 1 or n > len(host):
                    raise ValueError(f"cpu_count {n} outside 1..{len(host)}")
                pool = tuple(host[:n])
            mem = int(m.get("memory_mib", DEFAULT_POOL_MIB))
            maxe = int(m.get("max_enclaves", MAX_ENCLAVES))
            uids = _parse_uid_range(str(m["enclave_uids"])) if "enclave_uids" in m else None
        except (TypeError, ValueError) as exc:
            raise FileOperationError(f"allocator.yaml: {exc}") from exc
        if mem < MIN_MEMORY_MIB or maxe < 1:
            raise FileOperationError("allocator.yaml: memory_mib/max_enclaves too small")
        return cls(
            memory_mib=mem,
            cpu_pool=pool,
            max_enclaves=maxe,
            uid_range=uids or ENCLAVE_UID_RANGE,
        )

    def to_yaml(self) -> str:
        return (
            "---\n# How much memory to allocate for enclaves (in MiB).\n"
            f"memory_mib: {self.memory_mib}\n"
            "# CPUs reserved for enclaves (alternatively cpu_count: N).\n"
            f'cpu_pool: "{",".join(str(c) for c in self.cpu_pool)}"\n'
            "# At most this many enclaves at once (Nitro: 4 per parent).\n"
            f"max_enclaves: {self.max_enclaves}\n"
        )


class StateDir:
    """One state directory: records, allocation, ids."""

    def __init__(self, path: Path) -> None:
        self.path = ensure_private_dir(Path(path))
        self.enclaves_dir = ensure_private_dir(self.path / "enclaves")

    # -- identity -----------------------------------------------------------------------
    def instance_id(self) -> str:
        """A stable per-state-dir stand-in for the EC2 instance id: ``i-`` + 17 hex digits,
        the shape of real instance ids (``i-1234567890abcdef0``). Created once; a file of
        another shape (an older state directory) is replaced."""
        f = self.path / "instance-id"
        try:
            value = f.read_text().strip()
            if _INSTANCE_ID_RE.fullmatch(value):
                return value
        except FileNotFoundError:
            pass
        value = "i-" + secrets.token_hex(9)[:INSTANCE_ID_HEX_DIGITS]
        tmp = f.with_suffix(".tmp")
        tmp.write_text(value + "\n")
        os.replace(tmp, f)
        return value

    def new_enclave_id(self) -> str:
        """``<instance>-enc<16 hex>``: 48-bit ms timestamp + 16 random bits (as observed)."""
        ms = int(time.time() * 1000) & 0xFFFF_FFFF_FFFF
        slot = (ms << 16) | secrets.randbits(16)
        return f"{self.instance_id()}-enc{slot:016x}"

    @staticmethod
    def slot_of(enclave_id: str) -> str:
        slot = enclave_id.rpartition("-enc")[2]
        if len(slot) != 16 or any(c not in "0123456789abcdef" for c in slot):
            raise InvalidArgumentError(f"invalid enclave id {enclave_id!r}")
        return slot

    def record_path(self, enclave_id: str) -> Path:
        return self.enclaves_dir / f"{self.slot_of(enclave_id)}.json"

    def socket_path(self, enclave_id: str) -> Path:
        return self.enclaves_dir / f"{self.slot_of(enclave_id)}.sock"

    def work_dir(self, enclave_id: str) -> Path:
        return self.enclaves_dir / self.slot_of(enclave_id)

    # -- allocator ----------------------------------------------------------------------
    def allocator(self) -> Allocator:
        f = self.path / "allocator.yaml"
        if not f.exists():
            alloc = Allocator.default()
            f.write_text(alloc.to_yaml())
            return alloc
        try:
            data = yaml.safe_load(f.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise FileOperationError(f"cannot read {f}: {exc}") from exc
        return Allocator.from_mapping(data)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        fd = os.open(self.path / "enclaves.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- records ------------------------------------------------------------------------
    def write_record(self, info: EnclaveInfo, *, owner_pid: int) -> None:
        rec = info.to_record()
        rec["owner_pid"] = owner_pid
        path = self.record_path(info.enclave_id)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(rec, fh)
        os.replace(tmp, path)

    def remove_record(self, enclave_id: str) -> None:
        """Remove the record, control socket and work dir of one enclave (idempotent)."""
        for p in (self.record_path(enclave_id), self.socket_path(enclave_id)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        shutil.rmtree(self.work_dir(enclave_id), ignore_errors=True)

    def _load(self, path: Path) -> tuple[EnclaveInfo, int] | None:
        try:
            rec = json.loads(path.read_text())
            return EnclaveInfo.from_record(rec), int(rec["owner_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def records(self) -> list[EnclaveInfo]:
        """Live records, oldest first; stale ones (owner gone) are removed on the way."""
        out: list[tuple[str, EnclaveInfo]] = []
        for path in sorted(self.enclaves_dir.glob("*.json")):
            loaded = self._load(path)
            if loaded is None:
                continue
            info, owner = loaded
            if not _alive(owner):
                self.remove_record(info.enclave_id)
                continue
            out.append((info.enclave_id.rpartition("-enc")[2], info))
        return [info for _, info in sorted(out)]

    def find(self, *, enclave_id: str | None = None, name: str | None = None) -> EnclaveInfo:
        """Look an enclave up by id or name.

        Raises:
            EnclaveSocketError: E11, no enclave has this id (nitro-cli cannot connect to the
                socket of an enclave process that does not exist).
            EnclaveNamingError: E58, no enclave (or several) has this name.
        """
        recs = self.records()
        if enclave_id is not None:
            for r in recs:
                if r.enclave_id == enclave_id:
                    return r
            raise EnclaveSocketError(
                f"Failed to connect to the enclave process of {enclave_id}: no such enclave"
            )
        matches = [r for r in recs if r.enclave_name == name]
        if not matches:
            raise EnclaveNamingError("No enclave matched the given name.")
        if len(matches) > 1:
            raise EnclaveNamingError("Conflicting enclave names have been found.")
        return matches[0]

    # -- allocation ---------------------------------------------------------------------
    def reserve(
        self,
        *,
        eif_path: str,
        memory_mib: int,
        cpu_count: int | None,
        cpu_ids: Sequence[int] | None,
        cid: int | None,
        name: str | None,
        debug: bool,
        owner_pid: int,
    ) -> EnclaveInfo:
        """Check the request against the pool and running enclaves; write a STARTING record.

        Raises:
            FileOperationError: E19, the EIF cannot be read.
            InsufficientMemoryRequestedError: E26, no memory, or less than 4x the EIF size.
            MemoryBelowMinimumError: E29, less than the driver's 64 MiB minimum.
            InsufficientMemoryAvailableError: E27, the pool (or the enclave count) is full.
            InvalidCpuConfigurationError, CpuUnavailableError, InsufficientCpusError: E20-E22.
            InvalidArgumentError: E03, a CID out of range or in use, ``cpu_count`` < 1.
        """
        try:
            eif_size = os.stat(eif_path).st_size
        except OSError as exc:
            raise FileOperationError(
                f"Failed to open the EIF file {eif_path}: {exc.strerror or exc}",
                info=(eif_path, "Open"),
            ) from exc
        if memory_mib <= 0:
            raise InsufficientMemoryRequestedError(
                "Cannot start an enclave with no memory", info=("memory", "0", str(MIN_MEMORY_MIB))
            )
        need = -(-EIF_MEMORY_RATIO * eif_size // (1024 * 1024))
        if memory_mib < need:
            raise InsufficientMemoryRequestedError(
                f"At least {need} MB must be allocated (which is {EIF_MEMORY_RATIO} times the "
                "EIF file size)",
                info=("memory", str(memory_mib), str(need)),
            )
        if memory_mib < MIN_MEMORY_MIB:
            # the driver's NE_ERR_ENCLAVE_MEM_MIN_SIZE (268), an ioctl failure on Nitro
            raise MemoryBelowMinimumError(
                f"Enclave memory must be at least {MIN_MEMORY_MIB} MiB, {memory_mib} MiB was "
                "requested (NE_ERR_ENCLAVE_MEM_MIN_SIZE)"
            )
        memory_mib = -(-memory_mib // MEMORY_GRANULE_MIB) * MEMORY_GRANULE_MIB
        with self.lock():
            alloc = self.allocator()
            running = self.records()
            if len(running) >= alloc.max_enclaves:
                raise InsufficientMemoryAvailableError(
                    f"At most {alloc.max_enclaves} enclaves may run at once",
                    info=("memory", str(memory_mib)),
                )
            used_mem = sum(r.memory_mib for r in running)
            if used_mem + memory_mib > alloc.memory_mib:
                raise InsufficientMemoryAvailableError(
                    f"Insufficient memory available: requested {memory_mib} MiB, "
                    f"{alloc.memory_mib - used_mem} MiB left in the pool",
                    info=("memory", str(memory_mib)),
                )
            used_cpus = {c for r in running for c in r.cpu_ids}
            free = [c for c in alloc.cpu_pool if c not in used_cpus]
            if cpu_ids is not None:
                ids = tuple(cpu_ids)
                if len(set(ids)) != len(ids):
                    dups = sorted({c for c in ids if ids.count(c) > 1})
                    raise InvalidCpuConfigurationError(
                        f"Duplicate CPU ids in {list(ids)}",
                        info=("cpu-ids", ", ".join(map(str, dups))),
                    )
                for c in ids:
                    if c not in alloc.cpu_pool or c in used_cpus:
                        raise CpuUnavailableError(
                            f"The CPU {c} is not available in the enclave CPU pool",
                            info=("cpu-ids", str(c)),
                        )
                chosen = ids
            else:
                n = int(cpu_count or 0)
                if n < 1:
                    raise InvalidArgumentError("`cpu-count` must be at least 1")
                if n > len(free):
                    raise InsufficientCpusError(
                        f"Insufficient CPUs available: requested {n}, {len(free)} free in the pool",
                        info=("cpu-count", str(n)),
                    )
                chosen = tuple(free[:n])
            used_cids = {r.enclave_cid for r in running}
            if cid is None or cid == 0:
                lo, hi = AUTO_CID_RANGE
                while True:
                    cand = lo + secrets.randbelow(hi - lo)
                    if cand not in used_cids:
                        cid = cand
                        break
            elif not CID_MIN <= cid <= CID_MAX:
                raise InvalidArgumentError(f"CID {cid} is not a valid enclave CID (4..4294967294)")
            elif cid in used_cids:
                raise InvalidArgumentError(f"CID {cid} is already used by another enclave")
            base = name if name else _default_name(eif_path)
            names = {r.enclave_name for r in running}
            final, i = base, 0
            while final in names:
                i += 1
                final = f"{base}_{i}"
            info = EnclaveInfo(
                enclave_name=final,
                enclave_id=self.new_enclave_id(),
                process_id=owner_pid,
                enclave_cid=cid,
                cpu_ids=chosen,
                memory_mib=memory_mib,
                state=EnclaveState.STARTING,
                debug=debug,
                eif_path=str(Path(eif_path).resolve()),
                outside_uid=_allocate_uid(alloc.uid_range, {r.outside_uid for r in running}),
            )
            self.write_record(info, owner_pid=owner_pid)
            return info


def _default_name(eif_path: str) -> str:
    base = os.path.basename(eif_path)
    return base[: -len(".eif")] if base.endswith(".eif") else base


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists"; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False
