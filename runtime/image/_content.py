"""What goes into an image's sections: the kernel manifest, the cmdline, the bootstrap ramdisk
(the project's enclave-side code plus an identity of the interpreter and dependency set), the
application ramdisk (the app tree plus ``cmd``/``env``), and the metadata JSON.

Everything here is deterministic: paths are relative, entries sorted, no times, no host names,
no absolute paths, and JSON is written with sorted keys. Reading the project tree and the
installed distributions is the only I/O.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import stat
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from runtime.image._cpio import FileSpec, archive_from_files, validate_name
from runtime.image._errors import EifBuildError, EifFormatError

__all__ = [
    "INIT_MODULE",
    "KERNEL_FORMAT",
    "IDENTITY_FILE",
    "APP_MANIFEST_FILE",
    "APP_ROOTFS_DIR",
    "ENCLAVE_PACKAGES",
    "DEPENDENCY_ROOTS",
    "interpreter_identity",
    "dependency_identity",
    "identity_bytes",
    "kernel_bytes",
    "parse_kernel",
    "cmdline_bytes",
    "bootstrap_files",
    "missing_entry_point",
    "bootstrap_ramdisk",
    "app_ramdisk",
    "parse_app_manifest",
    "metadata_bytes",
    "normalise_cmd",
    "normalise_env",
    "canonical_json",
]

#: The module the runtime starts inside the enclave (written by the lifecycle engineer).
INIT_MODULE: Final = "runtime.enclave_init"
#: ``format`` tag of our kernel section (it is a manifest, not a Linux kernel).
KERNEL_FORMAT: Final = "enclave-runtime-kernel"
#: ``format`` tag of the app manifest.
APP_FORMAT: Final = "enclave-runtime-app"
#: ``format`` tag of the identity file.
IDENTITY_FORMAT: Final = "enclave-runtime-identity"
#: Version of all three formats above.
FORMAT_VERSION: Final = 1
#: Identity of the interpreter and dependencies, at the bootstrap ramdisk's root.
IDENTITY_FILE: Final = "enclave-identity.json"
#: The app ramdisk's manifest (``cmd``, ``env``), at its root.
APP_MANIFEST_FILE: Final = "manifest.json"
#: The app directory's contents live under this directory of the app ramdisk (nitro's rootfs/).
APP_ROOTFS_DIR: Final = "rootfs"
#: The kernel command line we write (documentary: our "kernel" is the manifest).
CMDLINE: Final = f"console=ttyS0 init={INIT_MODULE}"
#: Top-level packages shipped whole in the bootstrap ramdisk.
ENCLAVE_PACKAGES: Final = ("attest", "kms", "models", "transport")
#: Files of those packages that the bootstrap ships: code, plus PEM trust anchors that code
#: reads at import through importlib.resources (attest/roots/aws_nitro_root_g1.pem). Other
#: package data (the bundled digits model, sample configs) is host-side and stays out.
CODE_SUFFIXES: Final = (".py", ".pem")
#: runtime/ subpackage shipped in the bootstrap ramdisk (the in-enclave init).
RUNTIME_SUBPACKAGE: Final = "enclave_init"
#: Distributions whose installed version (and their dependencies') the identity pins.
DEPENDENCY_ROOTS: Final = (
    "trio", "cryptography", "cbor2", "msgpack", "structlog", "h11", "asn1crypto",
    "onnxruntime", "numpy", "PyYAML",
    # text models: the enclave tokenizes with `tokenizers` (models.text.tokenizer)
    "tokenizers",
)  # fmt: skip
#: The bootstrap's runtime/__init__.py: the host-side runtime package (supervisor, CLI) is not
#: shipped, so the enclave gets an empty package that only holds ``enclave_init``.
RUNTIME_INIT_STUB: Final = (
    b'"""runtime (enclave side): only runtime.enclave_init is shipped in an enclave image."""\n'
)
#: Largest tree we put in a ramdisk (bytes); equals the EIF size limit of runtime.eif.
MAX_TREE_BYTES: Final = 1 << 30
#: Size caps when reading an image's own JSON members (they are a few KiB).
MAX_MANIFEST_BYTES: Final = 1 << 20
#: Environment variable names accepted in an image (POSIX portable names).
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: A requirement's project name (PEP 508), at the start of a Requires-Dist value.
_REQ_NAME: Final = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical_json(value: object, *, pretty: bool = False) -> bytes:
    """Deterministic UTF-8 JSON: sorted keys, no NaN, compact or 2-space indented."""
    if pretty:
        text = json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
        return (text + "\n").encode()
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode()


def _normalise_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def interpreter_identity() -> dict[str, str]:
    """The interpreter the enclave runs: implementation, version, ABI, machine."""
    return {
        "implementation": sys.implementation.name,
        "version": platform.python_version(),
        "abi": str(sysconfig.get_config_var("SOABI") or ""),
        "cache_tag": str(sys.implementation.cache_tag or ""),
        "machine": platform.machine(),
    }


def _requirement_names(dist: importlib.metadata.Distribution) -> list[str]:
    """Names of a distribution's unconditional requirements (those needing an extra are not
    installed on its account; other markers are resolved by "is it installed")."""
    names = []
    for req in dist.requires or ():
        spec, _, marker = req.partition(";")
        if "extra" in marker:
            continue
        m = _REQ_NAME.match(spec)
        if m:
            names.append(m.group(1))
    return names


@lru_cache(maxsize=1)
def _dependency_identity_cached() -> tuple[tuple[str, str, str | None], ...]:
    found: dict[str, tuple[str, str, str | None]] = {}
    todo = list(DEPENDENCY_ROOTS)
    while todo:
        name = todo.pop()
        key = _normalise_dist(name)
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional/marker-excluded dependency that is not installed
        record = dist.read_text("RECORD")
        digest = None if record is None else hashlib.sha256(record.encode()).hexdigest()
        found[key] = (key, dist.version, digest)
        todo.extend(_requirement_names(dist))
    return tuple(sorted(found.values()))


def dependency_identity() -> list[dict[str, str | None]]:
    """Installed distributions of the project's dependency closure, sorted by normalised name:
    ``{"name", "version", "record_sha256"}`` (``None`` when a distribution has no RECORD)."""
    return [
        {"name": n, "version": v, "record_sha256": d} for n, v, d in _dependency_identity_cached()
    ]


def identity_bytes() -> bytes:
    """The identity file of the bootstrap ramdisk."""
    return canonical_json(
        {
            "format": IDENTITY_FORMAT,
            "version": FORMAT_VERSION,
            "python": interpreter_identity(),
            "distributions": dependency_identity(),
        },
        pretty=True,
    )


def kernel_bytes() -> bytes:
    """The kernel section: a manifest naming the enclave init and the interpreter."""
    return canonical_json(
        {
            "format": KERNEL_FORMAT,
            "version": FORMAT_VERSION,
            "init": INIT_MODULE,
            "interpreter": interpreter_identity(),
        }
    )


def parse_kernel(data: bytes) -> dict[str, Any]:
    """Decode and check a kernel manifest of ours.

    Raises:
        EifFormatError: not one of our kernel manifests (e.g. a real Linux bzImage).
    """
    value = _load_json(data, "kernel manifest")
    if value.get("format") != KERNEL_FORMAT or value.get("version") != FORMAT_VERSION:
        raise EifFormatError("kernel section is not an enclave-runtime kernel manifest")
    if not isinstance(value.get("init"), str) or not isinstance(value.get("interpreter"), dict):
        raise EifFormatError("kernel manifest lacks init/interpreter")
    return value


def cmdline_bytes() -> bytes:
    """The cmdline section (no NUL, like ``CString::into_bytes``)."""
    return CMDLINE.encode()


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST_BYTES:
        raise EifFormatError(f"{what} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EifFormatError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise EifFormatError(f"{what} is not a JSON object")
    return value


#: The source tree this runtime belongs to (runtime/image/_content.py -> the project root); the
#: image ships the packages next to the running runtime, never a same-named installed one.
_PROJECT_ROOT: Final = Path(__file__).resolve().parents[2]


def _package_dir(name: str) -> Path:
    path = _PROJECT_ROOT / name
    if not (path / "__init__.py").is_file():
        raise EifBuildError(f"cannot find the project package {name!r} in {_PROJECT_ROOT}")
    return path


def _collect_tree(
    root: Path,
    prefix: str,
    *,
    only_code: bool,
    files: dict[str, FileSpec],
    dirs: set[str],
    exclude: frozenset[Path] = frozenset(),
    max_bytes: int = MAX_TREE_BYTES,
) -> None:
    """Add ``root``'s tree under ``prefix``; skip __pycache__/*.pyc and ``exclude`` (absolute
    paths); refuse symlinks, special files, and trees over ``max_bytes`` (checked from the
    sizes before reading, so a huge directory is refused without being loaded)."""
    total = 0
    for current, subdirs, names in os.walk(root, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        rel_dir = Path(current).relative_to(root).as_posix()
        base = prefix if rel_dir == "." else f"{prefix}/{rel_dir}" if prefix else rel_dir
        for d in subdirs:
            path = Path(current, d)
            if path.is_symlink():
                raise EifBuildError(f"refusing symlink {path}: images hold files and dirs only")
            if not only_code:
                dirs.add(f"{base}/{d}" if base else d)
        for name in sorted(names):
            if name.endswith(".pyc"):
                continue
            if only_code and not (name.endswith(CODE_SUFFIXES) or name == "py.typed"):
                continue
            path = Path(current, name)
            if Path(os.path.abspath(path)) in exclude:
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise EifBuildError(f"refusing symlink {path}: images hold files and dirs only")
            if not stat.S_ISREG(st.st_mode):
                raise EifBuildError(f"refusing special file {path}")
            total += st.st_size
            if total > max_bytes:
                raise EifBuildError(f"{root} holds more than {max_bytes} bytes")
            rel = f"{base}/{name}" if base else name
            try:
                validate_name(rel)
            except EifFormatError as exc:
                raise EifBuildError(f"unusable file name {path}: {exc.message}") from None
            files[rel] = FileSpec(path.read_bytes(), bool(st.st_mode & 0o111))


def bootstrap_files() -> dict[str, FileSpec]:
    """The bootstrap ramdisk's files (see :func:`bootstrap_ramdisk`)."""
    files: dict[str, FileSpec] = {}
    unused: set[str] = set()
    for pkg in ENCLAVE_PACKAGES:
        _collect_tree(_package_dir(pkg), pkg, only_code=True, files=files, dirs=unused)
    files["runtime/__init__.py"] = FileSpec(RUNTIME_INIT_STUB)
    init_dir = _package_dir("runtime") / RUNTIME_SUBPACKAGE
    if init_dir.is_dir():
        _collect_tree(
            init_dir, f"runtime/{RUNTIME_SUBPACKAGE}", only_code=True, files=files, dirs=unused
        )
    files[IDENTITY_FILE] = FileSpec(identity_bytes())
    return files


def bootstrap_ramdisk() -> bytes:
    """Ramdisk[0]: ``enclave-identity.json``, ``{attest,kms,models,transport}/**/*.py`` (+
    ``py.typed`` and ``*.pem``), ``runtime/__init__.py`` (a stub) and
    ``runtime/enclave_init/**``."""
    return archive_from_files(bootstrap_files())


def normalise_cmd(cmd: Sequence[str] | str) -> list[str]:
    """``cmd`` as an argv list (a string is split with shell rules, like a Dockerfile CMD).

    Raises:
        ValueError: empty, unbalanced quotes, or NUL bytes.
    """
    import shlex

    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    if not argv:
        raise ValueError("the enclave command is empty")
    for arg in argv:
        if not isinstance(arg, str) or "\0" in arg:
            raise ValueError(f"invalid command argument {arg!r}")
    return argv


def normalise_env(env: Mapping[str, str]) -> dict[str, str]:
    """Validated environment: portable names, string values without NUL.

    Raises:
        ValueError: a bad name or value.
    """
    out: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ValueError(f"invalid environment variable name {key!r}")
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"invalid value for environment variable {key}")
        out[key] = value
    return out


#: argv[0] names that enclave init runs in-process as Python (``runtime.enclave_init``).
_PYTHON_RE: Final = re.compile(r"^python(3(\.\d+)?)?$")


def _module_exists(app_dir: Path, module: str) -> bool:
    """Whether ``python -m module`` can find ``module`` in the enclave: the app directory
    (its working directory), the bootstrap packages, or the installed distributions."""
    import importlib.util

    parts = module.split(".")
    if not all(p.isidentifier() for p in parts):
        return False
    base = app_dir.joinpath(*parts)
    if base.with_suffix(".py").is_file() or (base / "__main__.py").is_file():
        return True
    if app_dir.joinpath(parts[0]).is_dir() or app_dir.joinpath(parts[0] + ".py").is_file():
        return True  # a package of the app: let the interpreter say what is wrong inside it
    try:
        # the top-level name only: finding ``a.b`` would import (run) package ``a`` here
        return importlib.util.find_spec(parts[0]) is not None
    except (ImportError, ValueError):
        return False


def missing_entry_point(app_dir: Path, cmd: Sequence[str]) -> str | None:
    """Why ``cmd`` cannot start in an enclave of ``app_dir``, or None when it can (as far as a
    build can tell: a typo such as ``python3 mian.py`` is caught here, not at run time).

    Checked: a Python command's script (``python3 FILE``, relative to the app directory, the
    enclave's working directory) and module (``-m MOD``); a relative program path
    (``./run.sh``). Programs found on ``PATH`` (``sh``) and absolute paths are not checked.
    """
    app_dir = Path(os.path.abspath(app_dir))
    prog = cmd[0]
    if _PYTHON_RE.match(os.path.basename(prog)) or os.path.basename(prog) == os.path.basename(
        sys.executable
    ):
        args = list(cmd[1:])
        while args and args[0].startswith("-") and args[0] not in ("-m", "-c", "-"):
            args.pop(0)  # interpreter flags, as init skips them
        if not args:
            return f"the command {' '.join(cmd)!r} names no Python script or module to run"
        if args[0] == "-m":
            if len(args) < 2 or not _module_exists(app_dir, args[1]):
                name = args[1] if len(args) > 1 else ""
                return (
                    f"the entry point module {name!r} of the command {' '.join(cmd)!r} is "
                    f"neither in the app directory {app_dir} nor installed"
                )
            return None
        if args[0] in ("-c", "-"):
            return None
        script = args[0]
    elif "/" in prog and not os.path.isabs(prog):
        script = prog
    else:
        return None
    if os.path.isabs(script):
        return None
    if not (app_dir / script).is_file():
        return (
            f"the entry point {script!r} of the command {' '.join(cmd)!r} does not exist in "
            f"the app directory {app_dir}"
        )
    return None


def app_ramdisk(
    app_dir: Path,
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    exclude: frozenset[Path] = frozenset(),
    max_bytes: int = MAX_TREE_BYTES,
) -> bytes:
    """Ramdisk[1]: ``manifest.json`` (cmd, env) and the app tree under ``rootfs/``.

    ``exclude`` holds absolute paths to leave out (the EIF being written, when it is inside the
    app directory, so that rebuilding does not swallow the previous image).
    """
    files: dict[str, FileSpec] = {}
    dirs: set[str] = {APP_ROOTFS_DIR}
    _collect_tree(
        Path(os.path.abspath(app_dir)),
        APP_ROOTFS_DIR,
        only_code=False,
        files=files,
        dirs=dirs,
        exclude=exclude,
        max_bytes=max_bytes,
    )
    manifest = {"format": APP_FORMAT, "version": FORMAT_VERSION, "cmd": list(cmd), "env": dict(env)}
    files[APP_MANIFEST_FILE] = FileSpec(canonical_json(manifest, pretty=True))
    return archive_from_files(files, dirs=dirs)


def parse_app_manifest(data: bytes) -> tuple[list[str], dict[str, str]]:
    """Decode and validate an app manifest; return ``(cmd, env)``.

    Raises:
        EifFormatError: malformed manifest.
    """
    value = _load_json(data, "app manifest")
    if value.get("format") != APP_FORMAT or value.get("version") != FORMAT_VERSION:
        raise EifFormatError("app manifest has an unknown format")
    cmd, env = value.get("cmd"), value.get("env")
    if not isinstance(cmd, list) or not isinstance(env, dict):
        raise EifFormatError("app manifest lacks cmd/env")
    try:
        return normalise_cmd(cmd), normalise_env(env)
    except ValueError as exc:
        raise EifFormatError(f"app manifest: {exc}") from None


def metadata_bytes(
    *,
    name: str,
    version: str,
    build_tool_version: str,
    custom: Mapping[str, Any] | None,
) -> bytes:
    """The metadata section (``EifIdentityInfo``), compact JSON in nitro-cli's key order.

    ``BuildTime`` comes from ``SOURCE_DATE_EPOCH`` (reproducible-builds convention), else the
    epoch, so builds stay byte-identical. We have no Docker image, so ``DockerInfo`` is ``{}``.
    """
    import datetime

    epoch = os.environ.get("SOURCE_DATE_EPOCH", "0")
    try:
        seconds = int(epoch)
        when = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    except (ValueError, OverflowError, OSError):
        raise EifBuildError(f"SOURCE_DATE_EPOCH is not a valid timestamp: {epoch!r}") from None
    ident = interpreter_identity()
    info = {
        "ImageName": name,
        "ImageVersion": version,
        "BuildMetadata": {
            "BuildTime": when.isoformat(),
            "BuildTool": "enclave-runtime",
            "BuildToolVersion": build_tool_version,
            "OperatingSystem": sys.platform,
            "KernelVersion": f"{INIT_MODULE} on {ident['implementation']} {ident['version']}",
        },
        "DockerInfo": {},
        "CustomMetadata": dict(custom) if custom is not None else None,
    }
    try:
        text = json.dumps(info, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EifBuildError(f"metadata is not JSON-serialisable: {exc}") from None
    return text.encode()
