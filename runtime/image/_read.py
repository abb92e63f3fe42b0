"""The read side of images: :func:`read_eif` and :class:`EifFile` (structure, CRC, PCRs,
metadata, signature), and bounded reads of small input files."""

from __future__ import annotations

import datetime
import json
import os
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from runtime.image import _content
from runtime.image._cose import (
    SignatureSection,
    parse_signature_section,
)
from runtime.image._cpio import read_newc
from runtime.image._errors import (
    EifFileError,
    EifFormatError,
    EifSignatureError,
)
from runtime.image._format import (
    ARCH_FLAG_AARCH64,
    EifSection,
    SectionType,
    parse_eif,
    section_pcrs,
)
from runtime.image._measure import nitro_measurements
from runtime.image._unpack import (
    APP_DIR,
    BOOTSTRAP_DIR,
    Ramdisks,
)

__all__ = [
    "EifFile",
    "read_eif",
    "read_regular_file",
    "MAX_EIF_SIZE",
    "MAX_METADATA_SIZE",
    "MAX_INPUT_FILE_SIZE",
]

#: Largest EIF we read or write (bytes). Our images hold code, a small app and maybe a model;
#: the cap bounds memory use on hostile input (the file is read whole).
MAX_EIF_SIZE: Final = 1 << 30
#: Size cap of the metadata JSON section we accept (bytes; nitro-cli's is a few KiB).
MAX_METADATA_SIZE: Final = 1 << 20
#: Size cap of small inputs: certificates, keys, metadata JSON files (bytes).
MAX_INPUT_FILE_SIZE: Final = 1 << 20


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
        EifFileError (E19): missing, unreadable, not a regular file, or over ``limit``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise EifFileError(
            f"cannot read the {what} {path}: {exc.strerror or exc}", info=(str(path), "Open")
        ) from exc
    try:
        st = os.fstat(fd)
        # checked before fdopen: opening a directory succeeds, reading it does not
        if not stat.S_ISREG(st.st_mode):
            raise EifFileError(f"the {what} {path} is not a regular file", info=(str(path), "Open"))
        if st.st_size > limit:
            raise EifFileError(
                f"the {what} {path} is larger than {limit} bytes", info=(str(path), "Read")
            )
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise EifFileError(
                f"cannot read the {what} {path}: {exc}", info=(str(path), "Read")
            ) from exc
    if len(data) > limit:  # it grew while we read it
        raise EifFileError(
            f"the {what} {path} is larger than {limit} bytes", info=(str(path), "Read")
        )
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
        EifFileError (E19): the file cannot be read, is not a regular file, or is larger than
            :data:`MAX_EIF_SIZE`.
    """
    path = Path(path)
    data = read_regular_file(path, limit=MAX_EIF_SIZE, what="EIF")
    return EifFile.from_bytes(data, path=path, verify_crc=verify_crc)
