"""EIF v4 container: byte layout (checked with an independent struct reader), CRC, structural
validation of hostile files, and a Hypothesis property over arbitrary bytes."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.cli import main
from runtime.eif import (
    EifError,
    EifFile,
    EifFormatError,
    SectionType,
    build_eif,
    read_eif,
)
from runtime.image._format import encode_eif

# nitro.md §2.1: the header is 548 bytes; offsets of its fields.
HEADER_SIZE = 548
OFF_VERSION, OFF_FLAGS, OFF_MEM, OFF_CPUS, OFF_NUM = 0x4, 0x6, 0x8, 0x10, 0x1A
OFF_OFFSETS, OFF_SIZES, OFF_CRC = 0x1C, 0x11C, 0x220


def _independent_sections(data: bytes) -> list[tuple[int, int, bytes]]:
    """Walk the file the way nitro's EifReader does: sequential section headers after 548."""
    out = []
    pos = HEADER_SIZE
    while pos < len(data):
        stype, _flags, size = struct.unpack(">HHQ", data[pos : pos + 12])
        out.append((stype, pos, data[pos + 12 : pos + 12 + size]))
        pos += 12 + size
    return out


def _pcr(chunks: list[bytes]) -> str:
    return hashlib.sha384(b"\0" * 48 + hashlib.sha384(b"".join(chunks)).digest()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    root = tmp_path_factory.mktemp("fmt")
    app = root / "app"
    app.mkdir()
    (app / "main.py").write_text("print('hello')\n")
    out = root / "image.eif"
    build_eif(app_dir=app, cmd=["python", "main.py"], env={"MODE": "test"}, output=out)
    return out, out.read_bytes()


def test_header_byte_layout(built: tuple[Path, bytes]) -> None:
    _, data = built
    assert data[:4] == b".eif"
    assert struct.unpack_from(">H", data, OFF_VERSION)[0] == 4
    assert struct.unpack_from(">H", data, OFF_FLAGS)[0] in (0, 1)
    assert struct.unpack_from(">Q", data, OFF_MEM)[0] == 1 << 30
    assert struct.unpack_from(">Q", data, OFF_CPUS)[0] == 2
    num = struct.unpack_from(">H", data, OFF_NUM)[0]
    assert num == 5  # kernel, cmdline, metadata, 2 ramdisks (unsigned)
    offsets = struct.unpack_from(">32Q", data, OFF_OFFSETS)
    sizes = struct.unpack_from(">32Q", data, OFF_SIZES)
    sections = _independent_sections(data)
    assert [s[0] for s in sections] == [1, 2, 5, 3, 3]  # nitro-cli's section order
    assert list(offsets[:num]) == [s[1] for s in sections]
    assert list(sizes[:num]) == [len(s[2]) for s in sections]
    assert not any(offsets[num:])
    assert not any(sizes[num:])
    assert offsets[0] == HEADER_SIZE
    # CRC-32/ISO-HDLC over header[0:544] + every section header and data (nitro.md §2.4)
    crc = zlib.crc32(data[:OFF_CRC] + data[HEADER_SIZE:])
    assert struct.unpack_from(">I", data, OFF_CRC)[0] == crc


def test_measurements_match_independent_computation(built: tuple[Path, bytes]) -> None:
    path, data = built
    sections = _independent_sections(data)
    kernel, cmdline, _meta, rd0, rd1 = (s[2] for s in sections)
    eif = read_eif(path)
    assert eif.measurements == {
        "PCR0": _pcr([kernel, cmdline, rd0, rd1]),
        "PCR1": _pcr([kernel, cmdline, rd0]),
        "PCR2": _pcr([rd1]),
    }
    assert cmdline == b"console=ttyS0 init=runtime.enclave_init"  # no NUL
    assert eif.cmdline == cmdline.decode()
    assert eif.check_crc
    assert not eif.is_signed
    assert eif.signature_ok is None
    assert eif.size == len(data)
    assert eif.ramdisks == (rd0, rd1)


def test_section_round_trip() -> None:
    sections = [
        (SectionType.KERNEL, b"kernel"),
        (SectionType.CMDLINE, b"cmd"),
        (SectionType.METADATA, b'{"ImageName":"x"}'),
        (SectionType.RAMDISK, b"a" * 7),
        (SectionType.RAMDISK, b""),
        (SectionType.RAMDISK, b"c"),
    ]
    data = encode_eif(sections)
    eif = EifFile.from_bytes(data)
    assert [(s.section_type, s.data) for s in eif.sections] == sections
    assert eif.image_name == "x"
    assert eif.pcrs[1].hex() == _pcr([b"kernel", b"cmd", b"a" * 7])
    assert eif.pcrs[2].hex() == _pcr([b"", b"c"])  # every ramdisk after the first


@pytest.mark.parametrize("where", ["kernel", "ramdisk", "metadata", "crc_field", "header_mem"])
def test_crc_detects_corruption(built: tuple[Path, bytes], tmp_path: Path, where: str) -> None:
    _, data = built
    sections = _independent_sections(data)
    pos = {
        "kernel": sections[0][1] + 12,
        "ramdisk": sections[4][1] + 100,
        "metadata": sections[2][1] + 14,
        "crc_field": OFF_CRC,
        "header_mem": OFF_MEM + 7,
    }[where]
    bad = bytearray(data)
    bad[pos] ^= 0x01
    path = tmp_path / "bad.eif"
    path.write_bytes(bytes(bad))
    with pytest.raises(EifFormatError, match="CRC") as exc:
        read_eif(path)
    assert exc.value.code == "E35"
    eif = read_eif(path, verify_crc=False)  # describe-eif reports rather than refuses
    assert eif.check_crc is False


def test_describe_eif_reports_crc_failure(
    built: tuple[Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    _, data = built
    bad = bytearray(data)
    bad[-5] ^= 0xFF
    path = tmp_path / "bad.eif"
    path.write_bytes(bytes(bad))
    assert main(["describe-eif", "--eif-path", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["CheckCRC"] is False


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _small() -> bytes:
    return encode_eif(
        [
            (SectionType.KERNEL, b"k"),
            (SectionType.CMDLINE, b"c"),
            (SectionType.METADATA, b"{}"),
            (SectionType.RAMDISK, b"r0"),
            (SectionType.RAMDISK, b"r1"),
        ]
    )


def _section_offset(data: bytes, index: int) -> int:
    offset: int = struct.unpack_from(">Q", data, OFF_OFFSETS + 8 * index)[0]
    return offset


SMALL = _small()
BAD_FILES = {
    "empty": b"",
    "short header": SMALL[:547],
    "bad magic": b"EIF." + SMALL[4:],
    "version 1": _patch(SMALL, OFF_VERSION, ">H", 1),
    "version 5": _patch(SMALL, OFF_VERSION, ">H", 5),
    "unknown flag": _patch(SMALL, OFF_FLAGS, ">H", 2),
    "zero sections": _patch(SMALL, OFF_NUM, ">H", 0),
    "33 sections": _patch(SMALL, OFF_NUM, ">H", 33),
    "fewer sections than data": _patch(SMALL, OFF_NUM, ">H", 4),
    "offset out of file": _patch(SMALL, OFF_OFFSETS + 8, ">Q", 1 << 40),
    "huge size claim": _patch(SMALL, OFF_SIZES, ">Q", (1 << 64) - 1),
    "size disagrees": _patch(SMALL, OFF_SIZES + 8, ">Q", 2),
    "truncated": SMALL[:-1],
    "trailing bytes": SMALL + b"\0",
    "invalid type 0": _patch(SMALL, _section_offset(SMALL, 0), ">H", 0),
    "unknown type 6": _patch(SMALL, _section_offset(SMALL, 0), ">H", 6),
    "two kernels": _patch(SMALL, _section_offset(SMALL, 1), ">H", 1),
    "section flags": _patch(SMALL, _section_offset(SMALL, 0) + 2, ">H", 1),
    "reserved header": _patch(SMALL, 0x18, ">H", 1),
    "v4 without metadata": _patch(SMALL, _section_offset(SMALL, 2), ">H", 3),
    "stray offset slot": _patch(SMALL, OFF_OFFSETS + 8 * 31, ">Q", 7),
}


def _ramdisk_first() -> bytes:
    # build a layout the encoder refuses by swapping the first two section types by hand
    data = bytearray(SMALL)
    k_off = _section_offset(SMALL, 0)
    struct.pack_into(">H", data, k_off, 3)
    r_off = _section_offset(SMALL, 3)
    struct.pack_into(">H", data, r_off, 1)
    return bytes(data)


BAD_FILES["ramdisk before kernel"] = _ramdisk_first()


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_structurally_bad_files_are_rejected(name: str) -> None:
    with pytest.raises(EifFormatError) as exc:
        EifFile.from_bytes(BAD_FILES[name], verify_crc=False)
    assert exc.value.exit_code == 35
    assert exc.value.cli_report().startswith("[ E35 ] ")


def test_encoder_refuses_invalid_layouts() -> None:
    with pytest.raises(ValueError):
        encode_eif([(SectionType.RAMDISK, b"r"), (SectionType.KERNEL, b"k")])
    with pytest.raises(ValueError):
        encode_eif([(SectionType.KERNEL, b"k"), (SectionType.CMDLINE, b"c")])  # v4: no metadata


def test_missing_file_is_e19(tmp_path: Path) -> None:
    with pytest.raises(EifError) as exc:
        read_eif(tmp_path / "nope.eif")
    assert exc.value.code == "E19"


def test_bad_metadata_json_rejected() -> None:
    data = encode_eif(
        [(SectionType.KERNEL, b"k"), (SectionType.CMDLINE, b"c"), (SectionType.METADATA, b"[[[")]
    )
    with pytest.raises(EifFormatError, match="metadata"):
        EifFile.from_bytes(data)
    deep = b"[" * 100_000 + b"]" * 100_000
    data = encode_eif(
        [(SectionType.KERNEL, b"k"), (SectionType.CMDLINE, b"c"), (SectionType.METADATA, deep)]
    )
    with pytest.raises(EifFormatError, match="metadata"):
        EifFile.from_bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_any_bytes_give_typed_error_or_eif(data: bytes) -> None:
    try:
        EifFile.from_bytes(data)
    except EifFormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_file_gives_typed_error_or_eif(data: st.DataObject) -> None:
    blob = bytearray(SMALL)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    candidate = bytes(blob[:cut])
    for verify in (True, False):
        try:
            eif = EifFile.from_bytes(candidate, verify_crc=verify)
        except EifFormatError:
            continue
        # whatever parses must be self-consistent
        assert len(eif.measurements) == 3
        assert eif.size == len(candidate)


def test_foreign_nitro_style_image_is_described(tmp_path: Path) -> None:
    """An EIF as nitro-cli lays it out (bzImage-like kernel, gzip ramdisks, Docker metadata)
    parses and describes; only unpacking needs one of our images."""
    import gzip
    import json

    meta = {
        "ImageName": "hello-world",
        "ImageVersion": "0a1b2c",
        "BuildMetadata": {
            "BuildTime": "2024-01-01T00:00:00.000000000+00:00",
            "BuildTool": "nitro-cli",
            "BuildToolVersion": "1.3.0",
            "OperatingSystem": "linux",
            "KernelVersion": "4.14",
        },
        "DockerInfo": {"Id": "sha256:0a1b2c"},
        "CustomMetadata": None,
    }
    ramdisks = [gzip.compress(b"bootstrap", mtime=0), gzip.compress(b"app", mtime=0)]
    data = encode_eif(
        [
            (SectionType.KERNEL, b"MZ" + bytes(64)),
            (SectionType.CMDLINE, b"reboot=k panic=30 pci=off nomodules console=ttyS0"),
            (SectionType.METADATA, json.dumps(meta).encode()),
            *((SectionType.RAMDISK, r) for r in ramdisks),
        ]
    )
    path = tmp_path / "hello.eif"
    path.write_bytes(data)
    described = read_eif(path).describe()
    assert described["ImageName"] == "hello-world"
    assert described["Metadata"]["DockerInfo"] == {"Id": "sha256:0a1b2c"}
    assert described["Metadata"]["BuildTool"] == "nitro-cli"
    assert described["Measurements"]["PCR2"] == _pcr(ramdisks[1:])
