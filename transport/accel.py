"""Compiled sans-IO cores: the channel's and the RPC's protocol cores, compiled with mypyc.

Why. A small RPC call's round trip is mostly interpreter time on both sides: parsing and
building frames, sealing and opening records. ``enclave bench channel`` measured the three core
modules compiled with mypyc (the compiler of mypy, black and mypy itself, which ships with the
``mypy`` the test extra already installs) at ``rpc_ratio`` 1.34-1.49 against 1.64-1.75
interpreted, interleaved in the same session (2-vCPU VM, shared). The modules are strictly typed
already, so the same source is both: nothing is written twice.

How it is kept safe:

* **Optional.** ``scripts/build_accel.py`` (run by ``scripts/test`` and ``scripts/demo``)
  compiles :data:`COMPILED_MODULES` into ``<venv>/enclave-accel/<interpreter tag>/`` with a
  stamp. Without a C compiler nothing is built and the interpreted cores run, the same code.
* **Never stale.** The stamp records a digest of every ``transport`` source file (the compiled
  modules and everything they could inline from) and of the interpreter. At
  ``import transport`` the digest is recomputed (~1 ms); any difference, and the interpreted
  modules are used. Editing the source can therefore never run old compiled code.
* **Host side only.** The stamp also records the source tree it was built from; a ``transport``
  imported from anywhere else runs interpreted. An enclave imports the *measured* copy of its
  bootstrap (``runtime/zygote.py``), so enclaves always run the measured Python source, never a
  shared object that no PCR covers.
* ``ENCLAVE_PURE_PYTHON=1`` turns it off (the suite runs the core tests that way too:
  tests/transport/test_accel.py).

:func:`status` says which cores this process runs (``enclave bench channel`` reports it).
"""

from __future__ import annotations

# Imports kept to what ``import transport`` loads anyway (no dataclasses, importlib.abc/util or
# sysconfig: ~15 ms more per process start).
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Final, NamedTuple

__all__ = [
    "COMPILED_MODULES",
    "DISABLE_ENV",
    "AccelStatus",
    "accel_directory",
    "check_build",
    "install",
    "source_digest",
    "status",
]

#: The modules compiled, as (module name, path relative to the source root).
COMPILED_MODULES: Final = (
    ("transport.channel._record", "transport/channel/_record.py"),
    ("transport.channel._connection", "transport/channel/_connection.py"),
    ("transport.rpc._events", "transport/rpc/_events.py"),
    ("transport.rpc._core", "transport/rpc/_core.py"),
)
#: Set to a non-empty value to run the interpreted cores.
DISABLE_ENV: Final = "ENCLAVE_PURE_PYTHON"
#: The stamp file in the accelerator directory (JSON, written last by the build).
STAMP_NAME: Final = "stamp.json"
_SOURCE_ROOT: Final = Path(__file__).resolve().parent.parent


class AccelStatus(NamedTuple):
    """Which cores this process runs.

    Attributes:
        compiled: True if the compiled cores are installed for this process.
        detail: why not, or where they come from.
    """

    compiled: bool
    detail: str


_status = AccelStatus(False, "not checked yet")


def accel_directory(prefix: str | None = None) -> Path:
    """Where the build puts the compiled cores for this interpreter (inside the venv)."""
    # The interpreter's extension tag ("cpython-311-x86_64-linux-gnu"): one build per ABI.
    tag = importlib.machinery.EXTENSION_SUFFIXES[0].strip(".").removesuffix(".so")
    return Path(prefix if prefix is not None else sys.prefix) / "enclave-accel" / tag


def source_digest(root: Path = _SOURCE_ROOT) -> str:
    """SHA-256 over every ``transport/**/*.py`` under ``root`` (path and bytes) and the
    interpreter's version: what the compiled cores were built from. (The compiler's version is
    the build's business: an older mypyc's output still matches its source.)"""
    # Imported here, not at the top: a process that has no build for this tree (every
    # enclave: its transport is the measured bootstrap copy) never loads OpenSSL's hashlib
    # for it, a few ms of each fresh start (``enclave bench runtime``: cold_start_ms).
    import hashlib

    h = hashlib.sha256()
    h.update(sys.version.encode() + b"\0")
    for path in sorted((root / "transport").rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


class _CompiledCores:
    """A meta path finder for exactly the compiled modules of one verified build."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        file = self._files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        spec = ModuleSpec(fullname, loader, origin=str(file))
        spec.has_location = True  # sets __file__
        return spec


def check_build(directory: Path) -> tuple[dict[str, Path] | None, str]:
    """The compiled module files if the build in ``directory`` matches this tree (its stamp
    names this source root and this tree's :func:`source_digest`, and every module file is
    there), else None; with what to tell the user either way."""
    import json  # only where a build may exist (see source_digest)

    stamp_path = directory / STAMP_NAME
    try:
        stamp = json.loads(stamp_path.read_text())
    except FileNotFoundError:
        return None, "not built (scripts/build_accel.py; needs a C compiler)"
    except (OSError, ValueError) as exc:
        return None, f"unreadable stamp {stamp_path}: {exc}"
    if not isinstance(stamp, dict) or not isinstance(stamp.get("modules"), dict):
        return None, f"malformed stamp {stamp_path}"
    if stamp.get("source_root") != str(_SOURCE_ROOT):
        return None, f"built for {stamp.get('source_root')}, not this tree ({_SOURCE_ROOT})"
    try:
        digest = source_digest()
    except OSError as exc:
        return None, f"sources unreadable: {exc}"
    if stamp.get("digest") != digest:
        return None, "stale: the sources changed since the build (run scripts/build_accel.py)"
    files: dict[str, Path] = {}
    for name, rel in stamp["modules"].items():
        file = directory / str(rel)
        if not file.is_file():
            return None, f"incomplete build: {file} is missing"
        files[str(name)] = file
    if {name for name, _ in COMPILED_MODULES} - set(files):
        return None, "incomplete build: a core module is missing"
    return files, f"compiled with mypyc ({directory})"


def install() -> AccelStatus:
    """Use the compiled cores in this process if a verified build matches this tree.

    Runs when this module is first imported (``transport/__init__.py`` imports it first, before
    any core module); later calls return the first answer. Never raises: any doubt means the
    interpreted cores.
    """
    global _status
    if _status.detail != "not checked yet":
        return _status
    if os.environ.get(DISABLE_ENV):
        _status = AccelStatus(False, f"disabled by {DISABLE_ENV}")
        return _status
    if any(name in sys.modules for name, _ in COMPILED_MODULES):
        _status = AccelStatus(False, "a core module was imported before transport")
        return _status
    try:
        files, detail = check_build(accel_directory())
    except Exception as exc:  # an accelerator must never break an import
        files, detail = None, f"check failed: {exc!r}"
    if files is None:
        _status = AccelStatus(False, detail)
        return _status
    sys.meta_path.insert(0, _CompiledCores(files))
    _status = AccelStatus(True, detail)
    return _status


def status() -> AccelStatus:
    """Which cores this process runs (see :func:`install`)."""
    return _status


# Importing this module is what installs the compiled cores (``transport/__init__.py`` imports it
# first, so this runs before any core module can be imported).
install()
