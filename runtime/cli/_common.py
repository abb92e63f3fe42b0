"""Shared pieces of the lifecycle subcommands: nitro-cli's argument rules (``reference/nitro.md``
§1.1-§1.2), kept free of I/O so they are tested directly.

Values nitro-cli parses itself (``--memory``, ``--enclave-cid``, ``--cpu-count``,
``--cpu-ids``, ``--disconnect-timeout``) reach us as strings and fail with its E03
(``InvalidArgumentError``, naming the parameter and the value) rather than argparse's usage
error: scripts written for nitro-cli see the same exit status.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from runtime.errors import (
    FileOperationError,
    InvalidArgumentError,
    IoctlError,
    SerdeError,
    UsageError,
)
from runtime.launch import LaunchRequest
from runtime.state import StateDir

__all__ = [
    "RunRequest",
    "parse_memory",
    "parse_cid",
    "parse_u32",
    "parse_u64",
    "load_config",
    "print_json",
    "open_state_dir",
    "UsageError",
    "MAX_CONFIG_BYTES",
]

_MEMORY_RE: Final = re.compile(r"^([0-9]+)([MmGgTt]?)$")
_UNIT_MIB: Final = {"": 1, "m": 1, "g": 1024, "t": 1024 * 1024}
_U32_MAX: Final = 0xFFFFFFFF
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF
#: A --config file is a few hundred bytes; anything this large is not one.
MAX_CONFIG_BYTES: Final = 1 << 20


def open_state_dir() -> StateDir:
    """The state directory of this invocation (``ENCLAVE_STATE_DIR`` or the per-user one).

    Raises:
        FileOperationError: E19, it cannot be created or used (not a directory, another
            user's, unreadable), with the path.
    """
    from transport.paths import default_state_dir

    path = default_state_dir()
    try:
        return StateDir(path)
    except OSError as exc:
        raise FileOperationError(
            f"cannot use the state directory {path}: {exc.strerror or exc}",
            info=(str(path), "Open"),
        ) from exc


def print_json(obj: Any) -> None:
    """serde_json::to_string_pretty: 2-space indent, keys in insertion order."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def parse_u64(text: str, what: str) -> int:
    """An unsigned decimal (Rust's ``u64::from_str``: digits only); E03 otherwise."""
    if not text.isascii() or not text.isdigit() or int(text) > _U64_MAX:
        raise InvalidArgumentError(f"`{what}` is not a number: {text!r}", info=(what, text))
    return int(text)


def parse_u32(text: str, what: str) -> int:
    """An unsigned 32-bit decimal (``u32::from_str``); E03 otherwise."""
    value = parse_u64(text, what)
    if value > _U32_MAX:
        raise InvalidArgumentError(f"`{what}` is not a number: {text!r}", info=(what, text))
    return value


def parse_memory(text: str) -> int:
    """``parse_memory``: ``<digits>[M|m|G|g|T|t]`` (no suffix = MiB) → MiB. E03 otherwise."""
    m = _MEMORY_RE.match(text.strip())
    if not m:
        raise InvalidArgumentError(
            "`memory` argument does not contain a number with a valid size indicator",
            info=("memory", text),
        )
    value = int(m.group(1)) * _UNIT_MIB[m.group(2).lower()]
    if value > _U64_MAX:
        raise InvalidArgumentError("`memory` is too large", info=("memory", text))
    return value


def parse_cid(text: str) -> int | None:
    """``parse_enclave_cid``: None means auto-assign (the value was 0, with the stderr note)."""
    cid = parse_u64(text, "enclave-cid")
    if cid == 0:
        print("The enclave CID will be auto-generated as the provided CID is 0", file=sys.stderr)
        return None
    if cid in (1, 2) or cid == _U32_MAX:
        raise InvalidArgumentError(
            f"CID {cid} is a well-known CID, not to be used for enclaves",
            info=("enclave-cid", text),
        )
    if cid == 3:
        raise InvalidArgumentError(
            "CID 3 is the CID of the parent VM, not to be used for enclaves",
            info=("enclave-cid", text),
        )
    if cid > _U32_MAX:
        raise InvalidArgumentError(
            f"CID {cid} is higher than the maximum supported (u32 max) for a vsock device",
            info=("enclave-cid", text),
        )
    return cid


@dataclass(frozen=True)
class RunRequest:
    """A validated ``run-enclave`` request, from flags or ``--config``: what to launch, and
    what the command does around it."""

    launch: LaunchRequest
    attach_console: bool = False
    #: seconds to wait for the app's READY report (None: do not wait)
    wait_ready_s: float | None = None


def _u32(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32_MAX:
        raise SerdeError(f"Malformed config: `{what}` must be a u32, got {value!r}")
    return value


def load_config(path: str) -> RunRequest:
    """``--config`` JSON (serde of RunEnclavesArgs).

    ``attach_console`` comes from the JSON only (nitro-cli ignores the flag with
    ``--config``). Unknown keys are ignored, as serde does without ``deny_unknown_fields``;
    ``strict_isolation`` (bool) is our extension.

    Raises:
        FileOperationError: E19, unreadable (or not a regular file, or too large).
        SerdeError: E17, not the JSON of a RunEnclavesArgs.
        MissingArgumentError, ConflictingArgumentError: E01/E02, the CPU pair.
        IoctlError: E29, a CID the driver refuses (NE_ERR_INVALID_ENCLAVE_CID).
    """
    from runtime.eif import EifFileError, read_regular_file

    try:
        raw = read_regular_file(Path(path), limit=MAX_CONFIG_BYTES, what="config file")
        text = raw.decode("utf-8")
    except EifFileError as exc:
        raise FileOperationError(
            f"Failed to open the config file {path}: {exc.message}", info=(path, "Open")
        ) from exc
    except UnicodeDecodeError as exc:
        raise SerdeError(f"Invalid JSON format for the config file: {exc}") from exc
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SerdeError(f"Invalid JSON format for the config file: {exc}") from exc
    if not isinstance(cfg, dict):
        raise SerdeError("Invalid JSON format for the config file: not an object")
    for key in ("eif_path", "memory_mib"):
        if key not in cfg:
            raise SerdeError(f"Invalid JSON format for the config file: missing field `{key}`")
    if not isinstance(cfg["eif_path"], str):
        raise SerdeError("Malformed config: `eif_path` must be a string")
    mem = cfg["memory_mib"]
    if isinstance(mem, bool) or not isinstance(mem, int) or mem < 0 or mem > _U64_MAX:
        raise SerdeError("Malformed config: `memory_mib` must be an integer (MiB)")
    count, ids = cfg.get("cpu_count"), cfg.get("cpu_ids")
    cpu_ids: tuple[int, ...] | None = None
    if ids is not None:
        if not isinstance(ids, list):
            raise SerdeError("Malformed config: `cpu_ids` must be an array")
        cpu_ids = tuple(_u32(i, "cpu_ids") for i in ids)
    cid = cfg.get("enclave_cid")
    if cid is not None and (isinstance(cid, bool) or not isinstance(cid, int) or cid < 0):
        raise SerdeError("Malformed config: `enclave_cid` must be a u64 or null")
    if cid is not None and cid != 0 and not 4 <= cid <= _U32_MAX - 1:
        # not range-checked by nitro-cli here; the driver refuses it (NE_ERR_INVALID_ENCLAVE_CID)
        raise IoctlError(f"Invalid enclave CID {cid} (NE_ERR_INVALID_ENCLAVE_CID)")
    for key in ("debug_mode", "attach_console", "strict_isolation"):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise SerdeError(f"Malformed config: `{key}` must be a bool")
    name = cfg.get("enclave_name")
    if name is not None and not isinstance(name, str):
        raise SerdeError("Malformed config: `enclave_name` must be a string")
    attach = bool(cfg.get("attach_console"))
    launch = LaunchRequest(
        eif_path=cfg["eif_path"],
        memory_mib=mem,
        cpu_count=None if count is None else _u32(count, "cpu_count"),
        cpu_ids=cpu_ids,
        cid=cid if cid else None,
        debug=bool(cfg.get("debug_mode")) or attach,
        name=name,
        strict_isolation=bool(cfg.get("strict_isolation")),
    )
    return RunRequest(launch, attach_console=attach)
