"""The EIF v4 container (``reference/nitro.md`` §2): header, sections, CRC, PCRs. Pure.

Theory of operation: a 548-byte big-endian header (magic ``.eif``, version, flags, default
memory/CPUs, section count, 32 section offsets, 32 section sizes, CRC32) followed by sections,
each a 12-byte header (type, flags, size) and its data, contiguous and unpadded. The CRC is zlib's
CRC-32 over the header minus its last 4 bytes, then every section header and data in file order.

PCRs follow ``EifHasher``: ``PCRn = SHA384(0^48 || SHA384(concatenated section data))`` with
PCR0 = kernel, cmdline and every ramdisk in file order; PCR1 = kernel, cmdline and the first
ramdisk; PCR2 = the remaining ramdisks. Metadata and signature data are not measured; PCR8 comes
from the signature section's certificate (``_cose``).

The parser trusts nothing: the version must be known, the section count within bounds, the
offsets/sizes in the header must describe exactly the contiguous run of sections that fills the
file, each section header must agree with the header's size, types must be valid (one kernel,
one cmdline, ramdisks after the kernel, at most one metadata and one signature, metadata
mandatory from v4), and unused header slots and reserved fields must be zero. All work is linear
in the input size.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from attest.pcrs import pcr_extend, pcr_from_bytes
from runtime.image._errors import EifFormatError

__all__ = [
    "EIF_MAGIC",
    "EIF_VERSION",
    "HEADER_SIZE",
    "SECTION_HEADER_SIZE",
    "MAX_NUM_SECTIONS",
    "MAX_SIGNATURE_SIZE",
    "ARCH_FLAG_AARCH64",
    "SectionType",
    "EifSection",
    "ParsedEif",
    "encode_eif",
    "parse_eif",
    "pcr_extend",
    "pcr_from_bytes",
    "section_pcrs",
]

#: File magic: ".eif".
EIF_MAGIC: Final = b".eif"
#: The version we write (4 = metadata section mandatory; nitro.md §2.1).
EIF_VERSION: Final = 4
#: Versions we read: 2 (first public), 3 (adds signature), 4 (adds mandatory metadata).
SUPPORTED_VERSIONS: Final = frozenset({2, 3, 4})
#: Header layout: magic, version, flags, default_mem, default_cpus, reserved, num_sections,
#: section_offsets[32], section_sizes[32], unused, eif_crc32 (548 bytes, big-endian).
_HEADER: Final = struct.Struct(">4sHHQQHH32Q32QII")
HEADER_SIZE: Final = _HEADER.size
#: Section header: section_type u16, flags u16, section_size u64.
_SECTION_HEADER: Final = struct.Struct(">HHQ")
SECTION_HEADER_SIZE: Final = _SECTION_HEADER.size
#: ``MAX_NUM_SECTIONS`` in the EIF crate: the header has 32 offset/size slots.
MAX_NUM_SECTIONS: Final = 32
#: Kernel + cmdline at least.
MIN_NUM_SECTIONS: Final = 2
#: The EIF spec caps the signature section's data (nitro.md §2.2).
MAX_SIGNATURE_SIZE: Final = 32768
#: Header flag bit 0: aarch64 image (``EIF_HDR_ARCH_ARM64``); 0 = x86_64.
ARCH_FLAG_AARCH64: Final = 0x1
#: What nitro-cli writes in default_mem (1 GiB; unused by the stack) and default_cpus.
DEFAULT_MEM: Final = 1 << 30
DEFAULT_CPUS: Final = 2
#: SHA-384 digest size; PCRs are this long and start as zeros.
PCR_SIZE: Final = 48
#: Bytes of the header covered by the CRC (all but the trailing eif_crc32 field).
_CRC_COVERED: Final = HEADER_SIZE - 4

assert HEADER_SIZE == 548  # nitro.md §2.1
assert SECTION_HEADER_SIZE == 12  # nitro.md §2.2


class SectionType(enum.IntEnum):
    """EIF section types (``EifSectionType``)."""

    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5


@dataclass(frozen=True, slots=True)
class EifSection:
    """One section: its type, the file offset of its 12-byte header, and its data."""

    section_type: SectionType
    offset: int
    data: bytes = field(repr=False)
    flags: int = 0

    @property
    def size(self) -> int:
        """Size of the data (the 12-byte header excluded)."""
        return len(self.data)


@dataclass(frozen=True, slots=True)
class ParsedEif:
    """A structurally valid EIF: header fields, sections in file order, and CRC status."""

    version: int
    flags: int
    default_mem: int
    default_cpus: int
    sections: tuple[EifSection, ...]
    crc32: int
    computed_crc32: int

    @property
    def crc_ok(self) -> bool:
        """True when the header's CRC matches the file (describe-eif ``CheckCRC``)."""
        return self.crc32 == self.computed_crc32


def _digest_pcr(chunks: Sequence[bytes]) -> bytes:
    h = hashlib.sha384()
    for chunk in chunks:
        h.update(chunk)
    return pcr_extend(b"\0" * PCR_SIZE, h.digest())


def section_pcrs(sections: Sequence[EifSection]) -> dict[int, bytes]:
    """PCR0, PCR1 and PCR2 of the sections, exactly as ``EifHasher`` computes them."""
    image: list[bytes] = []
    bootstrap: list[bytes] = []
    app: list[bytes] = []
    ramdisks = 0
    for s in sections:
        if s.section_type in (SectionType.KERNEL, SectionType.CMDLINE):
            image.append(s.data)
            bootstrap.append(s.data)
        elif s.section_type is SectionType.RAMDISK:
            image.append(s.data)
            (bootstrap if ramdisks == 0 else app).append(s.data)
            ramdisks += 1
    return {0: _digest_pcr(image), 1: _digest_pcr(bootstrap), 2: _digest_pcr(app)}


def encode_eif(
    sections: Sequence[tuple[SectionType, bytes]],
    *,
    flags: int = 0,
    version: int = EIF_VERSION,
    default_mem: int = DEFAULT_MEM,
    default_cpus: int = DEFAULT_CPUS,
) -> bytes:
    """Serialise sections (in the given order) into an EIF with a correct CRC.

    Raises:
        ValueError: a section list the parser would reject (checked by parsing the result).
    """
    if not MIN_NUM_SECTIONS <= len(sections) <= MAX_NUM_SECTIONS:
        raise ValueError(f"an EIF has {MIN_NUM_SECTIONS}..{MAX_NUM_SECTIONS} sections")
    offsets = [0] * MAX_NUM_SECTIONS
    sizes = [0] * MAX_NUM_SECTIONS
    body = bytearray()
    pos = HEADER_SIZE
    for i, (stype, data) in enumerate(sections):
        offsets[i] = pos
        sizes[i] = len(data)
        body += _SECTION_HEADER.pack(int(stype), 0, len(data))
        body += data
        pos += SECTION_HEADER_SIZE + len(data)
    header = _HEADER.pack(
        EIF_MAGIC, version, flags, default_mem, default_cpus, 0, len(sections),
        *offsets, *sizes, 0, 0,
    )  # fmt: skip
    crc = zlib.crc32(body, zlib.crc32(header[:_CRC_COVERED]))
    out = header[:_CRC_COVERED] + struct.pack(">I", crc) + bytes(body)
    try:
        parse_eif(out)
    except EifFormatError as exc:
        raise ValueError(f"invalid section list: {exc.message}") from exc
    return out


def parse_eif(data: bytes) -> ParsedEif:
    """Validate and split an EIF file's bytes (the CRC is computed, not enforced: see
    :attr:`ParsedEif.crc_ok`).

    Raises:
        EifFormatError: anything structurally wrong (see the module docstring).
    """
    if len(data) < HEADER_SIZE:
        raise EifFormatError(f"file too short for an EIF header ({len(data)} bytes)")
    fields = _HEADER.unpack_from(data, 0)
    magic, version, flags, default_mem, default_cpus, reserved, num_sections = fields[:7]
    offsets = fields[7 : 7 + MAX_NUM_SECTIONS]
    sizes = fields[7 + MAX_NUM_SECTIONS : 7 + 2 * MAX_NUM_SECTIONS]
    unused, crc32 = fields[-2:]
    if magic != EIF_MAGIC:
        raise EifFormatError("not an EIF file (bad magic)")
    if version not in SUPPORTED_VERSIONS:
        raise EifFormatError(f"unsupported EIF version {version}")
    if flags & ~ARCH_FLAG_AARCH64:
        raise EifFormatError(f"unknown EIF header flags 0x{flags:04x}")
    if reserved or unused:
        raise EifFormatError("EIF header reserved fields are not zero")
    if not MIN_NUM_SECTIONS <= num_sections <= MAX_NUM_SECTIONS:
        raise EifFormatError(f"EIF section count {num_sections} out of range")
    if any(offsets[num_sections:]) or any(sizes[num_sections:]):
        raise EifFormatError("EIF header has entries beyond its section count")

    view = memoryview(data)
    sections: list[EifSection] = []
    pos = HEADER_SIZE
    for i in range(num_sections):
        if offsets[i] != pos:
            raise EifFormatError(f"EIF section {i} offset {offsets[i]} is not {pos}")
        if pos + SECTION_HEADER_SIZE > len(data):
            raise EifFormatError(f"EIF truncated in the header of section {i}")
        stype, sflags, ssize = _SECTION_HEADER.unpack_from(data, pos)
        if ssize != sizes[i]:
            raise EifFormatError(f"EIF section {i} size disagrees with the file header")
        end = pos + SECTION_HEADER_SIZE + ssize
        if end > len(data):
            raise EifFormatError(f"EIF truncated in the data of section {i}")
        try:
            section_type = SectionType(stype)
        except ValueError:
            raise EifFormatError(f"EIF section {i} has unknown type {stype}") from None
        if section_type is SectionType.INVALID:
            raise EifFormatError(f"EIF section {i} has the invalid type 0")
        if sflags:
            raise EifFormatError(f"EIF section {i} has reserved flags set")
        sections.append(
            EifSection(section_type, pos, bytes(view[pos + SECTION_HEADER_SIZE : end]), sflags)
        )
        pos = end
    if pos != len(data):
        raise EifFormatError(f"EIF has {len(data) - pos} bytes after its last section")
    _check_section_rules(sections, version)
    computed = zlib.crc32(view[HEADER_SIZE:], zlib.crc32(view[:_CRC_COVERED]))
    return ParsedEif(version, flags, default_mem, default_cpus, tuple(sections), crc32, computed)


def _check_section_rules(sections: Sequence[EifSection], version: int) -> None:
    counts = {t: 0 for t in SectionType}
    for s in sections:
        if s.section_type is SectionType.RAMDISK and counts[SectionType.KERNEL] == 0:
            raise EifFormatError("EIF ramdisk section before the kernel section")
        counts[s.section_type] += 1
    if counts[SectionType.KERNEL] != 1 or counts[SectionType.CMDLINE] != 1:
        raise EifFormatError("EIF must have exactly one kernel and one cmdline section")
    if counts[SectionType.METADATA] > 1 or counts[SectionType.SIGNATURE] > 1:
        raise EifFormatError("EIF has more than one metadata or signature section")
    if version >= 4 and counts[SectionType.METADATA] == 0:
        raise EifFormatError("EIF v4 image without its mandatory metadata section")
    if version < 3 and counts[SectionType.SIGNATURE]:
        raise EifFormatError(f"EIF v{version} cannot carry a signature section")
    for s in sections:
        if s.section_type is SectionType.SIGNATURE and s.size > MAX_SIGNATURE_SIZE:
            raise EifFormatError(f"EIF signature section exceeds {MAX_SIGNATURE_SIZE} bytes")
