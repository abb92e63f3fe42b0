"""Measured enclave images: the EIF v4 format of Nitro Enclaves, built from an app directory.

An image is an EIF file (``reference/nitro.md`` §2) whose sections hold what our enclaves boot
instead of a Linux kernel:

==========  ==================================================================================
Kernel      a JSON manifest: the in-enclave init module (``runtime.enclave_init``) and the
            interpreter (implementation, version, ABI, machine)
Cmdline     ``console=ttyS0 init=runtime.enclave_init``
Metadata    nitro-cli's ``EifIdentityInfo`` JSON (not measured)
Ramdisk[0]  bootstrap cpio: ``enclave-identity.json`` (interpreter + installed dependency set)
            and the project's enclave-side code: ``attest/ kms/ models/ transport/`` (``*.py``,
            ``py.typed``, ``*.pem`` trust anchors), ``runtime/__init__.py`` (a stub),
            ``runtime/enclave_init/``
Ramdisk[1]  app cpio: ``manifest.json`` (``cmd`` argv list and ``env``) and ``rootfs/`` (the
            app directory)
Signature   optional COSE_Sign1 over PCR0 (``--signing-certificate``/``--private-key``)
==========  ==================================================================================

So PCR1 (kernel + cmdline + bootstrap) measures the enclave-side code, the interpreter and the
dependency set; PCR2 measures the application (files, command, environment); PCR0 both; PCR8 the
signing certificate. Builds are deterministic: the same inputs give the same bytes.

Typical use (runtime side)::

    eif = read_eif(path)                 # structure + CRC checked, PCRs computed
    eif.check_signature()                # E59 if a signed image does not verify
    image = unpack_eif(eif, workdir)     # read-only tree
    verify_unpacked(eif, image)          # right before starting: refuse a tampered tree
    ... PYTHONPATH=image.bootstrap_dir, cwd=image.app_dir, argv=image.cmd, env=image.env
    remove_unpacked(image.root)          # the tree is read-only; this restores and deletes
"""

from __future__ import annotations

import datetime
import json
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from runtime.image import _content
from runtime.image._cose import (
    SignatureSection,
    build_signature_section,
    load_certificate,
    load_private_key,
    parse_signature_section,
)
from runtime.image._cpio import CpioEntry, read_newc
from runtime.image._errors import (
    EifBuildError,
    EifError,
    EifFormatError,
    EifSignatureError,
    EifSigningError,
    ImageTamperedError,
)
from runtime.image._format import (
    ARCH_FLAG_AARCH64,
    EIF_VERSION,
    EifSection,
    SectionType,
    encode_eif,
    parse_eif,
    pcr_extend,
    section_pcrs,
)
from runtime.image._format import pcr_from_bytes as _pcr_from_bytes
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
    # building and reading
    "build_eif",
    "sign_eif",
    "read_eif",
    "EifInfo",
    "EifFile",
    "EifSection",
    "SectionType",
    # unpacking
    "unpack_eif",
    "load_unpacked",
    "verify_unpacked",
    "verify_environment",
    "remove_unpacked",
    "UnpackedImage",
    # PCRs
    "pcr_from_bytes",
    "pcr_extend",
    "pcr3_role_arn",
    "pcr4_instance_id",
    "pcr8_from_certificate",
    "nitro_measurements",
    "HASH_ALGORITHM",
    # errors
    "EifError",
    "EifFormatError",
    "EifBuildError",
    "EifSignatureError",
    "EifSigningError",
    "ImageTamperedError",
    # limits / layout
    "MAX_EIF_SIZE",
    "EIF_VERSION",
    "read_regular_file",
    "MAX_INPUT_FILE_SIZE",
]

#: nitro-cli prints the Rust ``Debug`` of ``sha2::Sha384`` as the hash algorithm.
HASH_ALGORITHM: Final = "Sha384 { ... }"
#: Largest EIF we read or write (bytes). Our images hold code, a small app and maybe a model;
#: the cap bounds memory use on hostile input (the file is read whole).
MAX_EIF_SIZE: Final = 1 << 30
#: Size cap of the metadata JSON section we accept (bytes; nitro-cli's is a few KiB).
MAX_METADATA_SIZE: Final = 1 << 20
#: Size cap of small inputs: certificates, keys, metadata JSON files (bytes).
MAX_INPUT_FILE_SIZE: Final = 1 << 20


# ------------------------------------------------------------------------------------- PCRs


def pcr_from_bytes(data: bytes) -> bytes:
    """``SHA384(0^48 || SHA384(data))``: what ``enclave pcr --input`` prints (nitro.md §2.6)."""
    return _pcr_from_bytes(data)


def pcr3_role_arn(arn: str) -> bytes:
    """PCR3 of an enclave whose parent instance has IAM role ``arn``: ``SHA384(0^48 || arn)``.

    The raw UTF-8 string is extended (not its digest), as on Nitro (nitro.md §2.6).
    """
    return pcr_extend(b"\0" * 48, arn.encode("utf-8"))


def pcr4_instance_id(iid: str) -> bytes:
    """PCR4 of an enclave whose parent instance id is ``iid``: ``SHA384(0^48 || iid)``."""
    return pcr_extend(b"\0" * 48, iid.encode("utf-8"))


def pcr8_from_certificate(pem: bytes) -> bytes:
    """PCR8 for a PEM signing certificate: ``SHA384(0^48 || SHA384(cert DER))``.

    Raises:
        EifSigningError: not a PEM certificate with a supported EC key.
    """
    from cryptography.hazmat.primitives.serialization import Encoding

    return _pcr_from_bytes(load_certificate(pem).public_bytes(Encoding.DER))


def nitro_measurements(pcrs: Mapping[int, bytes]) -> dict[str, str]:
    """nitro-cli's ``Measurements`` map: ``HashAlgorithm`` then ``PCRn`` in BTreeMap order."""
    out = {"HashAlgorithm": HASH_ALGORITHM}
    for key in sorted(f"PCR{i}" for i in pcrs):
        out[key] = pcrs[int(key[3:])].hex()
    return out


# ------------------------------------------------------------------------------ read side


@dataclass(frozen=True)
class EifFile:
    """A parsed, structurally valid EIF.

    Attributes:
        path: where it was read from (``None`` for :meth:`from_bytes` without a path).
        version: EIF version (4 for what we build).
        flags: header flags (bit 0: aarch64).
        sections: all sections, in file order.
        check_crc: the header CRC matches the contents (describe-eif ``CheckCRC``).
        metadata: the metadata section's JSON object (``{}`` for images before v4).
        pcrs: ``{0, 1, 2[, 8]} -> 48-byte value``, as the NSM reports them at boot.
        is_signed: there is a signature section.
        signature_ok: ``None`` when unsigned, else whether the COSE signature verifies under
            the embedded certificate and signs this image's PCR0.
        signature: the parsed signature section, if any.
        size: file size in bytes.
    """

    path: Path | None
    version: int
    flags: int
    sections: tuple[EifSection, ...] = field(repr=False)
    check_crc: bool
    metadata: dict[str, Any] = field(repr=False)
    pcrs: dict[int, bytes] = field(repr=False)
    is_signed: bool
    signature_ok: bool | None
    signature: SignatureSection | None = field(repr=False)
    size: int

    @classmethod
    def from_bytes(
        cls, data: bytes, *, path: Path | None = None, verify_crc: bool = True
    ) -> EifFile:
        """Parse EIF bytes (see :func:`read_eif`)."""
        if len(data) > MAX_EIF_SIZE:
            raise EifFormatError(f"EIF is larger than {MAX_EIF_SIZE} bytes")
        parsed = parse_eif(data)
        if verify_crc and not parsed.crc_ok:
            raise EifFormatError(
                f"EIF CRC mismatch (header 0x{parsed.crc32:08x}, "
                f"contents 0x{parsed.computed_crc32:08x}): the file is corrupt or was modified"
            )
        metadata: dict[str, Any] = {}
        signature: SignatureSection | None = None
        for section in parsed.sections:
            if section.section_type is SectionType.METADATA:
                metadata = _parse_metadata(section.data)
            elif section.section_type is SectionType.SIGNATURE:
                signature = parse_signature_section(section.data)
        pcrs = section_pcrs(parsed.sections)
        signature_ok: bool | None = None
        if signature is not None:
            pcrs[8] = signature.pcr8
            signature_ok = signature.verify(pcrs[0])
        return cls(
            path=path,
            version=parsed.version,
            flags=parsed.flags,
            sections=parsed.sections,
            check_crc=parsed.crc_ok,
            metadata=metadata,
            pcrs=pcrs,
            is_signed=signature is not None,
            signature_ok=signature_ok,
            signature=signature,
            size=len(data),
        )

    # -- views ------------------------------------------------------------------------------

    @cached_property
    def measurements(self) -> dict[str, str]:
        """``{"PCR0": hex, "PCR1": hex, "PCR2": hex[, "PCR8": hex]}``."""
        return {f"PCR{i}": v.hex() for i, v in sorted(self.pcrs.items())}

    @property
    def nitro_measurements(self) -> dict[str, str]:
        """The ``Measurements`` object of nitro-cli's JSON (with ``HashAlgorithm``)."""
        return nitro_measurements(self.pcrs)

    def _only(self, stype: SectionType) -> bytes:
        return next(s.data for s in self.sections if s.section_type is stype)

    @property
    def kernel(self) -> bytes:
        """The kernel section's data."""
        return self._only(SectionType.KERNEL)

    @property
    def cmdline(self) -> str:
        """The kernel command line."""
        return self._only(SectionType.CMDLINE).decode("utf-8", "replace")

    @property
    def ramdisks(self) -> tuple[bytes, ...]:
        """Ramdisk sections' data, in file order."""
        return tuple(s.data for s in self.sections if s.section_type is SectionType.RAMDISK)

    @property
    def image_name(self) -> str | None:
        """``ImageName`` from the metadata."""
        value = self.metadata.get("ImageName")
        return value if isinstance(value, str) else None

    @property
    def image_version(self) -> str | None:
        """``ImageVersion`` from the metadata."""
        value = self.metadata.get("ImageVersion")
        return value if isinstance(value, str) else None

    @property
    def signing_certificate(self) -> x509.Certificate | None:
        """The signing certificate of a signed image."""
        return None if self.signature is None else self.signature.certificate

    @property
    def is_aarch64(self) -> bool:
        """Built for aarch64 (header flag)."""
        return bool(self.flags & ARCH_FLAG_AARCH64)

    @cached_property
    def _parsed_ramdisks(self) -> Ramdisks:
        # parsed once per EifFile: unpack and every later verification reuse the entries
        self.kernel_manifest()  # raises unless this is one of our images
        ramdisks = self.ramdisks
        if len(ramdisks) != 2:
            raise EifFormatError(
                f"an enclave-runtime image has 2 ramdisks, this one {len(ramdisks)}"
            )
        return {BOOTSTRAP_DIR: read_newc(ramdisks[0]), APP_DIR: read_newc(ramdisks[1])}

    def kernel_manifest(self) -> dict[str, Any]:
        """Our kernel manifest (``init``, ``interpreter``).

        Raises:
            EifFormatError: this EIF was not built by enclave-runtime (e.g. a real bzImage).
        """
        return _content.parse_kernel(self.kernel)

    def metadata_info(self) -> dict[str, Any]:
        """nitro-cli's ``MetadataDescribeInfo``: build metadata, DockerInfo, custom keys."""
        build = self.metadata.get("BuildMetadata")
        out: dict[str, Any] = {}
        if isinstance(build, dict):
            for key in ("BuildTime", "BuildTool", "BuildToolVersion", "OperatingSystem",
                        "KernelVersion"):  # fmt: skip
                if key in build:
                    out[key] = build[key]
        if "DockerInfo" in self.metadata:
            out["DockerInfo"] = self.metadata["DockerInfo"]
        custom = self.metadata.get("CustomMetadata")
        if isinstance(custom, dict):
            out.update(custom)
        return out

    def describe(self) -> dict[str, Any]:
        """The JSON object ``enclave describe-eif`` prints (nitro-cli key order)."""
        out: dict[str, Any] = {
            "EifVersion": self.version,
            "Measurements": self.nitro_measurements,
            "IsSigned": self.is_signed,
        }
        if self.signature is not None:
            out["SigningCertificate"] = _certificate_info(self.signature.certificate)
        out["CheckCRC"] = self.check_crc
        if self.signature_ok is not None:
            out["SignatureCheck"] = self.signature_ok
        if self.image_name is not None:
            out["ImageName"] = self.image_name
        if self.image_version is not None:
            out["ImageVersion"] = self.image_version
        if self.metadata:
            out["Metadata"] = self.metadata_info()
        return out

    def check_signature(self, *, at: datetime.datetime | None = None) -> None:
        """What nitro-cli checks at launch for a signed image: the COSE signature over PCR0
        verifies, and the signing certificate is valid at ``at`` (default: now). No-op for an
        unsigned image.

        Raises:
            EifSignatureError (E59): bad signature, or certificate expired/not yet valid.
        """
        if self.signature is None:
            return
        if not self.signature_ok:
            raise EifSignatureError("the EIF signature does not verify against its PCR0")
        now = at or datetime.datetime.now(datetime.UTC)
        cert = self.signature.certificate
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise EifSignatureError(
                "the EIF signing certificate is not valid now (valid "
                f"{cert.not_valid_before_utc.isoformat()} .. "
                f"{cert.not_valid_after_utc.isoformat()})"
            )


def read_regular_file(path: Path, *, limit: int, what: str) -> bytes:
    """Read a regular file of at most ``limit`` bytes (opened non-blocking, so a FIFO cannot
    hang the caller; devices and directories are refused).

    Raises:
        EifError (E19): missing, unreadable, not a regular file, or over ``limit``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise EifError(f"cannot read the {what} {path}: {exc.strerror or exc}", code="E19") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EifError(f"the {what} {path} is not a regular file", code="E19")
        if st.st_size > limit:
            raise EifError(f"the {what} {path} is larger than {limit} bytes", code="E19")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise EifError(f"cannot read the {what} {path}: {exc}", code="E19") from exc
    if len(data) > limit:  # it grew while we read it
        raise EifError(f"the {what} {path} is larger than {limit} bytes", code="E19")
    return data


def _parse_metadata(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_METADATA_SIZE:
        raise EifFormatError(f"EIF metadata section exceeds {MAX_METADATA_SIZE} bytes")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EifFormatError("EIF metadata section is not valid JSON") from None
    if not isinstance(value, dict):
        raise EifFormatError("EIF metadata section is not a JSON object")
    return value


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    # OpenSSL's long name ("commonName", "ecdsa-with-SHA384"), as nitro-cli prints them
    name = oid._name
    return oid.dotted_string if name == "Unknown OID" else name


def _openssl_time(when: datetime.datetime) -> str:
    # ASN1_TIME_print: "Mar  8 17:34:26 2023 GMT" (day space-padded)
    return f"{when:%b} {when.day:>2} {when:%H:%M:%S} {when.year} GMT"


def _certificate_info(cert: x509.Certificate) -> dict[str, Any]:
    """describe-eif's ``SigningCertificate`` (eif_reader's ``SignCertificateInfo``)."""
    issuer: dict[str, str] = {}
    for attr in cert.issuer:
        value = attr.value
        issuer[_oid_name(attr.oid)] = value if isinstance(value, str) else value.hex()
    return {
        "IssuerName": dict(sorted(issuer.items())),
        "Algorithm": _oid_name(cert.signature_algorithm_oid),
        "NotBefore": _openssl_time(cert.not_valid_before_utc),
        "NotAfter": _openssl_time(cert.not_valid_after_utc),
        "Signature": ":".join(f"{b:02X}" for b in cert.signature),
    }


def read_eif(path: Path, *, verify_crc: bool = True) -> EifFile:
    """Read and validate an EIF file.

    Everything is checked before anything is trusted: size cap, magic, version, section count,
    offsets and sizes (contiguous, inside the file, nothing trailing), section types and
    order, CRC (unless ``verify_crc=False``, which describe-eif uses to *report* ``CheckCRC``),
    metadata JSON, signature section structure. A bad signature does not raise here; see
    :attr:`EifFile.signature_ok` and :meth:`EifFile.check_signature`.

    Raises:
        EifFormatError (E35): corrupt, truncated, tampered (CRC) or not an EIF.
        EifError (E19): the file cannot be read, is not a regular file, or is larger than
            :data:`MAX_EIF_SIZE`.
    """
    path = Path(path)
    data = read_regular_file(path, limit=MAX_EIF_SIZE, what="EIF")
    return EifFile.from_bytes(data, path=path, verify_crc=verify_crc)


# ----------------------------------------------------------------------------- build side


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


def _write_atomically(output: Path, data: bytes) -> None:
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
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
        raise EifError(f"cannot write {output}: {exc.strerror or exc}", code="E19") from exc


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
        EifError (E19): an input cannot be read or the output cannot be written.
        EifBuildError (E48): bad app tree (symlinks, special files, too big).
        EifError (E03): bad ``cmd``/``env``.
        EifSigningError (E60): unusable key/certificate, or they do not match.
    """
    app_dir = Path(app_dir)
    if not app_dir.is_dir():
        raise EifError(f"the app directory {app_dir} does not exist", code="E19")
    try:
        argv = _content.normalise_cmd(cmd)
        env_map = _content.normalise_env(env)
    except ValueError as exc:
        raise EifError(str(exc), code="E03") from None
    signing = _signing_material(signing_certificate, private_key)
    try:
        app = _content.app_ramdisk(
            app_dir, argv, env_map, exclude=frozenset({Path(os.path.abspath(output))})
        )
        bootstrap = _content.bootstrap_ramdisk()
    except OSError as exc:
        raise EifError(f"cannot read the image inputs: {exc}", code="E19") from exc
    if len(app) + len(bootstrap) > MAX_EIF_SIZE:
        raise EifBuildError(f"the image would be larger than {MAX_EIF_SIZE} bytes")
    import hashlib

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


# ------------------------------------------------------------------------------- unpacking


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


def _our_ramdisks(eif: EifFile) -> Ramdisks:
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
        EifError (E19): ``dest`` is not usable.
    """
    ramdisks = _our_ramdisks(eif)
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
    for entry in _our_ramdisks(eif)[BOOTSTRAP_DIR]:
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
    ramdisks = _our_ramdisks(eif)
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
