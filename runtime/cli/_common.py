"""Shared pieces of the lifecycle subcommands (nitro-cli's argument rules, ``reference/nitro.md``
§1.1-§1.2), kept free of I/O so they are tested directly."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import NitroCliError

__all__ = [
    "RunRequest",
    "parse_memory",
    "parse_cid",
    "load_config",
    "print_json",
    "UsageError",
]

_MEMORY_RE = re.compile(r"^([0-9]+)([MmGgTt]?)$")
_UNIT_MIB = {"": 1, "m": 1, "g": 1024, "t": 1024 * 1024}
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF


class UsageError(Exception):
    """A clap-style usage error (exit status 2), e.g. conflicting flags."""


def print_json(obj: Any) -> None:
    """serde_json::to_string_pretty: 2-space indent, keys in insertion order."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def parse_memory(text: str) -> int:
    """``parse_memory``: ``<digits>[M|m|G|g|T|t]`` (no suffix = MiB) → MiB. E03 otherwise."""
    m = _MEMORY_RE.match(text.strip())
    if not m:
        raise NitroCliError("E03", f"Invalid argument provided: `memory` is not valid: {text!r}")
    value = int(m.group(1)) * _UNIT_MIB[m.group(2).lower()]
    if value > _U64_MAX:
        raise NitroCliError("E03", "Invalid argument provided: `memory` is too large")
    return value


def parse_cid(text: str) -> int | None:
    """``parse_enclave_cid``: None means auto-assign (the value was 0, with the stderr note)."""
    try:
        cid = int(text, 10)
        if cid < 0 or cid > _U64_MAX:
            raise ValueError
    except ValueError:
        raise NitroCliError(
            "E03", "Invalid argument provided: `enclave-cid` is not a number"
        ) from None
    if cid == 0:
        print("The enclave CID will be auto-generated as the provided CID is 0", file=sys.stderr)
        return None
    if cid in (1, 2) or cid == _U32_MAX:
        raise NitroCliError(
            "E03",
            f"Invalid argument provided: CID {cid} is a well-known CID, not to be used "
            "for enclaves",
        )
    if cid == 3:
        raise NitroCliError(
            "E03",
            "Invalid argument provided: CID 3 is the CID of the parent VM, not to be used "
            "for enclaves",
        )
    if cid > _U32_MAX:
        raise NitroCliError(
            "E03",
            f"Invalid argument provided: CID {cid} is higher than the maximum supported "
            "(u32 max) for a vsock device",
        )
    return cid


@dataclass(frozen=True)
class RunRequest:
    """A validated ``run-enclave`` request, from flags or ``--config``."""

    eif_path: str
    memory_mib: int
    cpu_count: int | None
    cpu_ids: tuple[int, ...] | None
    cid: int | None
    debug: bool
    attach_console: bool
    name: str | None
    strict_isolation: bool = False


def _u32(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32_MAX:
        raise NitroCliError("E17", f"Malformed config: `{what}` must be a u32, got {value!r}")
    return value


def load_config(path: str, *, attach_console: bool = False) -> RunRequest:
    """``--config`` JSON (serde of RunEnclavesArgs): E19 unreadable, E17 malformed, E01/E02 for
    the CPU pair. Unknown keys are ignored, as serde does without ``deny_unknown_fields``;
    ``strict_isolation`` (bool) is our extension."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise NitroCliError("E19", f"Failed to open the config file {path}: {exc}") from exc
    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise NitroCliError("E17", f"Invalid JSON format for the config file: {exc}") from exc
    if not isinstance(cfg, dict):
        raise NitroCliError("E17", "Invalid JSON format for the config file: not an object")
    for key in ("eif_path", "memory_mib"):
        if key not in cfg:
            raise NitroCliError(
                "E17", f"Invalid JSON format for the config file: missing field `{key}`"
            )
    if not isinstance(cfg["eif_path"], str):
        raise NitroCliError("E17", "Malformed config: `eif_path` must be a string")
    mem = cfg["memory_mib"]
    if isinstance(mem, bool) or not isinstance(mem, int) or mem < 0 or mem > _U64_MAX:
        raise NitroCliError("E17", "Malformed config: `memory_mib` must be an integer (MiB)")
    count, ids = cfg.get("cpu_count"), cfg.get("cpu_ids")
    if count is None and ids is None:
        raise NitroCliError("E01", "Missing both `cpu-count` and `cpu-ids`")
    if count is not None and ids is not None:
        raise NitroCliError("E02", "`cpu-count` and `cpu-ids` cannot be used together")
    cpu_ids: tuple[int, ...] | None = None
    if ids is not None:
        if not isinstance(ids, list):
            raise NitroCliError("E17", "Malformed config: `cpu_ids` must be an array")
        cpu_ids = tuple(_u32(i, "cpu_ids") for i in ids)
    cid = cfg.get("enclave_cid")
    if cid is not None and (isinstance(cid, bool) or not isinstance(cid, int) or cid < 0):
        raise NitroCliError("E17", "Malformed config: `enclave_cid` must be a u64 or null")
    if cid is not None and cid != 0 and not 4 <= cid <= _U32_MAX - 1:
        # not range-checked by nitro-cli here; the driver refuses it (NE_ERR_INVALID_ENCLAVE_CID)
        raise NitroCliError("E29", f"Invalid enclave CID {cid} (NE_ERR_INVALID_ENCLAVE_CID)")
    for key in ("debug_mode", "attach_console", "strict_isolation"):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise NitroCliError("E17", f"Malformed config: `{key}` must be a bool")
    name = cfg.get("enclave_name")
    if name is not None and not isinstance(name, str):
        raise NitroCliError("E17", "Malformed config: `enclave_name` must be a string")
    attach = bool(cfg.get("attach_console")) or attach_console
    return RunRequest(
        eif_path=cfg["eif_path"],
        memory_mib=mem,
        cpu_count=None if count is None else _u32(count, "cpu_count"),
        cpu_ids=cpu_ids,
        cid=cid if cid else None,
        debug=bool(cfg.get("debug_mode")) or attach,
        attach_console=attach,
        name=name,
        strict_isolation=bool(cfg.get("strict_isolation")),
    )
