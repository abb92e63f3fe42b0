"""The build side of images: :func:`build_eif` and :func:`sign_eif`."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from runtime.image import _content
from runtime.image._cose import (
    build_signature_section,
    load_certificate,
    load_private_key,
)
from runtime.image._errors import (
    EifArgumentError,
    EifBuildError,
    EifFileError,
    EifSigningError,
)
from runtime.image._format import (
    ARCH_FLAG_AARCH64,
    EifSection,
    SectionType,
    encode_eif,
    section_pcrs,
)
from runtime.image._measure import nitro_measurements, pcr8_from_certificate
from runtime.image._read import MAX_EIF_SIZE, MAX_INPUT_FILE_SIZE, read_eif, read_regular_file

__all__ = ["EifInfo", "build_eif", "sign_eif"]


@dataclass(frozen=True)
class EifInfo:
    """Result of :func:`build_eif` / :func:`sign_eif`.

    Attributes:
        path: the written EIF.
        pcrs: ``{0, 1, 2[, 8]} -> 48-byte value``.
        size: file size in bytes.
        name: ``ImageName`` written in the metadata.
        version: ``ImageVersion`` written in the metadata.
        is_signed: a signature section was written.
    """

    path: Path
    pcrs: dict[int, bytes] = field(repr=False)
    size: int
    name: str
    version: str
    is_signed: bool

    @property
    def measurements(self) -> dict[str, str]:
        """``{"PCR0": hex, "PCR1": hex, "PCR2": hex[, "PCR8": hex]}``."""
        return {f"PCR{i}": v.hex() for i, v in sorted(self.pcrs.items())}

    def build_output(self) -> dict[str, Any]:
        """What ``build-enclave`` prints: ``{"Measurements": {...}}``."""
        return {"Measurements": nitro_measurements(self.pcrs)}


def _read_input(path: Path, what: str) -> bytes:
    return read_regular_file(path, limit=MAX_INPUT_FILE_SIZE, what=what)


def _signing_material(
    signing_certificate: Path | None, private_key: Path | None
) -> tuple[bytes, ec.EllipticCurvePrivateKey] | None:
    if signing_certificate is None and private_key is None:
        return None
    if signing_certificate is None or private_key is None:
        raise EifSigningError("--signing-certificate and --private-key go together")
    cert_pem = _read_input(signing_certificate, "signing certificate")
    key = load_private_key(_read_input(private_key, "private key"))
    load_certificate(cert_pem)
    return cert_pem, key


def _check_output(output: Path) -> None:
    """Refuse an output whose directory does not exist, as nitro-cli does (it opens the file
    before building; nothing is created on the way)."""
    parent = Path(output).parent
    if not parent.is_dir():
        raise EifFileError(
            f"Could not create output file {output}: the directory {parent} does not exist",
            info=(str(output), "Open"),
        )


def _write_atomically(output: Path, data: bytes) -> None:
    output = Path(output)
    _check_output(output)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, output)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise EifFileError(
            f"Could not create output file {output}: {exc.strerror or exc}",
            info=(str(output), "Open"),
        ) from exc


def _arch_flags() -> int:
    import platform

    return ARCH_FLAG_AARCH64 if platform.machine() in ("aarch64", "arm64") else 0


def _build_tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("enclave-runtime")
    except PackageNotFoundError:
        return "0+unknown"


def _assemble(
    unsigned: Sequence[tuple[SectionType, bytes]],
    signing: tuple[bytes, ec.EllipticCurvePrivateKey] | None,
) -> tuple[bytes, dict[int, bytes]]:
    """Add the signature section if asked; return the EIF bytes and their PCRs."""
    pcrs = section_pcrs(
        [EifSection(t, 0, d) for t, d in unsigned]  # offsets do not matter for PCRs
    )
    sections = list(unsigned)
    if signing is not None:
        cert_pem, key = signing
        sections.append((SectionType.SIGNATURE, build_signature_section(pcrs[0], cert_pem, key)))
        pcrs[8] = pcr8_from_certificate(cert_pem)
    data = encode_eif(sections, flags=_arch_flags())
    if len(data) > MAX_EIF_SIZE:
        raise EifBuildError(f"the image would be {len(data)} bytes, over {MAX_EIF_SIZE}")
    return data, pcrs


def build_eif(
    *,
    app_dir: Path,
    cmd: Sequence[str] | str,
    env: Mapping[str, str],
    output: Path,
    name: str | None = None,
    version: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    signing_certificate: Path | None = None,
    private_key: Path | None = None,
) -> EifInfo:
    """Build an EIF v4 image of ``app_dir`` running ``cmd`` with ``env`` and write it to
    ``output`` (atomically: a temporary file in the same directory, then a rename).

    Args:
        app_dir: the application tree (regular files and directories; ``__pycache__`` and
            ``*.pyc`` skipped; symlinks and special files refused).
        cmd: argv list, or a string split with shell rules (``shlex``).
        env: the enclave's environment (names ``[A-Za-z_][A-Za-z0-9_]*``).
        output: the EIF path.
        name: ``ImageName`` (default: ``app_dir``'s base name).
        version: ``ImageVersion`` (default: SHA-256 of the app ramdisk, like a Docker image id).
        metadata: user JSON stored as ``CustomMetadata`` (not measured).
        signing_certificate, private_key: PEM files; both or neither. Adds the signature
            section and PCR8.

    Returns:
        The path, PCRs and size of the image.

    Raises:
        EifFileError (E19): an input cannot be read, or the output cannot be written (its
            directory must exist: nothing is created on the way).
        EifBuildError (E48): bad app tree (symlinks, special files, too big), or the command's
            entry point (``python3 main.py``, ``./run.sh``) is not in the app directory.
        EifArgumentError (E03): bad ``cmd``/``env``.
        EifSigningError (E60): unusable key/certificate, or they do not match.
    """
    app_dir = Path(app_dir)
    _check_output(Path(output))
    if not app_dir.is_dir():
        raise EifFileError(
            f"the app directory {app_dir} does not exist", info=(str(app_dir), "Open")
        )
    try:
        argv = _content.normalise_cmd(cmd)
        env_map = _content.normalise_env(env)
    except ValueError as exc:
        raise EifArgumentError(str(exc)) from None
    missing = _content.missing_entry_point(app_dir, argv)
    if missing is not None:
        raise EifBuildError(missing)
    signing = _signing_material(signing_certificate, private_key)
    try:
        app = _content.app_ramdisk(
            app_dir, argv, env_map, exclude=frozenset({Path(os.path.abspath(output))})
        )
        bootstrap = _content.bootstrap_ramdisk()
    except OSError as exc:
        raise EifFileError(
            f"cannot read the image inputs: {exc}", info=(str(exc.filename or app_dir), "Read")
        ) from exc
    if len(app) + len(bootstrap) > MAX_EIF_SIZE:
        raise EifBuildError(f"the image would be larger than {MAX_EIF_SIZE} bytes")

    image_name = name if name is not None else app_dir.resolve().name
    image_version = version if version is not None else hashlib.sha256(app).hexdigest()
    meta = _content.metadata_bytes(
        name=image_name,
        version=image_version,
        build_tool_version=_build_tool_version(),
        custom=metadata,
    )
    unsigned: list[tuple[SectionType, bytes]] = [
        (SectionType.KERNEL, _content.kernel_bytes()),
        (SectionType.CMDLINE, _content.cmdline_bytes()),
        (SectionType.METADATA, meta),
        (SectionType.RAMDISK, bootstrap),
        (SectionType.RAMDISK, app),
    ]
    data, pcrs = _assemble(unsigned, signing)
    _write_atomically(output, data)
    return EifInfo(
        path=Path(output),
        pcrs=pcrs,
        size=len(data),
        name=image_name,
        version=image_version,
        is_signed=signing is not None,
    )


def sign_eif(path: Path, *, signing_certificate: Path, private_key: Path) -> EifInfo:
    """(Re)sign an existing EIF in place (``sign-eif``): any old signature section is replaced.

    Raises:
        EifFormatError (E35): the file is not a valid EIF (CRC included).
        EifSigningError (E60): unusable key/certificate, or they do not match.
    """
    eif = read_eif(path)
    signing = _signing_material(signing_certificate, private_key)
    unsigned = [
        (s.section_type, s.data)
        for s in eif.sections
        if s.section_type is not SectionType.SIGNATURE
    ]
    data, pcrs = _assemble(unsigned, signing)
    _write_atomically(path, data)
    return EifInfo(
        path=Path(path),
        pcrs=pcrs,
        size=len(data),
        name=eif.image_name or "",
        version=eif.image_version or "",
        is_signed=True,
    )
