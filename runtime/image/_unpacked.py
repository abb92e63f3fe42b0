"""Unpacked images: extraction of an image's ramdisks into a read-only tree, and the checks
that the tree (and this process's interpreter and dependencies) are what the image measured."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.image import _content
from runtime.image._cpio import CpioEntry
from runtime.image._errors import (
    EifFormatError,
    ImageTamperedError,
)
from runtime.image._read import EifFile
from runtime.image._unpack import (
    APP_DIR,
    BOOTSTRAP_DIR,
    Ramdisks,
    extract,
    read_member,
    remove_tree,
    verify_tree,
)

__all__ = [
    "UnpackedImage",
    "our_ramdisks",
    "load_unpacked",
    "unpack_eif",
    "verify_environment",
    "verify_unpacked",
    "remove_unpacked",
]


@dataclass(frozen=True)
class UnpackedImage:
    """An image extracted by :func:`unpack_eif` (read-only files and directories).

    Attributes:
        root: the unpacked tree (``bootstrap/`` and ``app/``).
        bootstrap_dir: the project's enclave-side packages; put it on ``PYTHONPATH``.
        app_dir: the application directory (the enclave's working directory).
        cmd: the argv to run.
        env: the image's environment.
        identity: the bootstrap's interpreter/dependency identity (parsed JSON).
    """

    root: Path
    bootstrap_dir: Path
    app_dir: Path
    cmd: list[str]
    env: dict[str, str]
    identity: dict[str, Any] = field(repr=False, default_factory=dict)


def our_ramdisks(eif: EifFile) -> Ramdisks:
    """Both ramdisks of one of our images, parsed and validated (cached on the EifFile)."""
    return eif._parsed_ramdisks


def _app_manifest(app_entries: Sequence[CpioEntry]) -> tuple[list[str], dict[str, str]]:
    for entry in app_entries:
        if entry.name == _content.APP_MANIFEST_FILE and not entry.is_dir:
            return _content.parse_app_manifest(entry.data)
    raise EifFormatError("the app ramdisk has no manifest.json")


def load_unpacked(root: Path) -> UnpackedImage:
    """Describe a tree previously written by :func:`unpack_eif` (e.g. an image cache entry).

    This only reads its manifests; call :func:`verify_unpacked` before running anything.

    Raises:
        ImageTamperedError (E36): the manifests are missing, not regular files, or too big.
        EifFormatError (E35): the manifests are malformed.
    """
    return _describe_tree(Path(root))


def _describe_tree(root: Path) -> UnpackedImage:
    app_root = root / APP_DIR
    limit = _content.MAX_MANIFEST_BYTES
    manifest = read_member(app_root / _content.APP_MANIFEST_FILE, limit=limit)
    identity_raw = read_member(root / BOOTSTRAP_DIR / _content.IDENTITY_FILE, limit=limit)
    cmd, env = _content.parse_app_manifest(manifest)
    try:
        identity = json.loads(identity_raw)
    except ValueError:
        raise EifFormatError("enclave-identity.json is not valid JSON") from None
    return UnpackedImage(
        root=root,
        bootstrap_dir=root / BOOTSTRAP_DIR,
        app_dir=app_root / _content.APP_ROOTFS_DIR,
        cmd=cmd,
        env=env,
        identity=identity if isinstance(identity, dict) else {},
    )


def unpack_eif(eif: EifFile, dest: Path) -> UnpackedImage:
    """Extract an image's bootstrap and app ramdisks under ``dest`` (created; must be empty).

    Both archives are fully parsed and validated before anything is written: regular files and
    directories only, no path traversal, no symlinks, no devices, bounded sizes. Files are
    0444 (0555 when executable), directories 0555; use :func:`remove_unpacked` to delete.

    Raises:
        EifFormatError (E35): not an enclave-runtime image, or a malformed ramdisk/manifest.
        EifFileError (E19): ``dest`` is not usable.
    """
    ramdisks = our_ramdisks(eif)
    _app_manifest(ramdisks[APP_DIR])  # a bad manifest fails before anything is written
    dest = Path(dest)
    extract(ramdisks, dest)
    return _describe_tree(dest)


def verify_environment(eif: EifFile) -> None:
    """Check that this process's interpreter and dependency set are the ones the image
    measured (its kernel manifest and ``enclave-identity.json``, both under PCR1).

    Raises:
        ImageTamperedError (E36): built for another interpreter or dependency set; rebuild it.
        EifFormatError (E35): ``eif`` is not an enclave-runtime image.
    """
    manifest = eif.kernel_manifest()
    measured: bytes | None = None
    for entry in our_ramdisks(eif)[BOOTSTRAP_DIR]:
        if entry.name == _content.IDENTITY_FILE:
            measured = entry.data
    if measured is None:
        raise EifFormatError("the bootstrap ramdisk has no enclave-identity.json")
    if eif.kernel == _content.kernel_bytes() and measured == _content.identity_bytes():
        return
    here = _content.interpreter_identity()
    detail = f"image: {manifest.get('interpreter')}, here: {here}"
    if manifest.get("interpreter") == here:
        try:
            theirs = {str(d["name"]): d for d in json.loads(measured)["distributions"]}
        except (ValueError, KeyError, TypeError):
            theirs = {}
        ours = {str(d["name"]): d for d in _content.dependency_identity()}
        changed = sorted(n for n in theirs.keys() | ours.keys() if theirs.get(n) != ours.get(n))
        detail = f"distributions differ: {', '.join(changed) or '(identity format)'}"
    raise ImageTamperedError(
        "the image was built for another interpreter or dependency set than this runtime's "
        f"({detail}); rebuild it"
    )


def verify_unpacked(
    eif: EifFile, image: UnpackedImage | Path, *, check_environment: bool = True
) -> None:
    """Check that an unpacked tree is exactly what ``eif`` measured; run it right before
    starting the enclave ("what the enclave is about to run is what the image measured").

    Compares every entry (names, types, modes, bytes) with the EIF's ramdisks, refuses extra
    files (e.g. an injected ``__pycache__``), symlinks and missing files. With
    ``check_environment`` (the default) it also runs :func:`verify_environment`: the
    interpreter and installed dependencies that will run the enclave must be the measured ones.

    Raises:
        ImageTamperedError (E36): any difference.
        EifFormatError (E35): ``eif`` is not an enclave-runtime image.
    """
    root = image.root if isinstance(image, UnpackedImage) else Path(image)
    ramdisks = our_ramdisks(eif)
    if check_environment:
        verify_environment(eif)
    verify_tree(ramdisks, root)
    if isinstance(image, UnpackedImage):
        described = _describe_tree(root)
        if (described.cmd, described.env) != (image.cmd, image.env) or (
            image.bootstrap_dir,
            image.app_dir,
        ) != (described.bootstrap_dir, described.app_dir):
            raise ImageTamperedError("UnpackedImage does not describe its tree")


def remove_unpacked(root: Path) -> None:
    """Delete a tree written by :func:`unpack_eif` (its directories are read-only)."""
    remove_tree(Path(root))
