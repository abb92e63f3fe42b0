"""Ramdisks (cpio newc) and unpacking: round trips, hostile archives (path traversal, links,
devices, duplicates), read-only extraction, and tamper detection of an unpacked tree."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.eif import (
    EifError,
    EifFile,
    EifFormatError,
    ImageTamperedError,
    SectionType,
    UnpackedImage,
    build_eif,
    load_unpacked,
    read_eif,
    remove_unpacked,
    unpack_eif,
    verify_environment,
    verify_unpacked,
)
from runtime.image._cpio import TRAILER, FileSpec, archive_from_files, read_newc
from runtime.image._format import encode_eif


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An independent, permissive newc writer: lets tests build archives our writer refuses."""
    out = b""
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        head = b"070701" + b"".join(f"{f:08x}".encode() for f in fields) + raw
        out += head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)
    return out


DIR, REG = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> EifFile:
    root = tmp_path_factory.mktemp("unpack")
    app = root / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "main.py").write_text("import pkg\n")
    (app / "pkg" / "__init__.py").write_text("")
    (app / "tool").write_bytes(b"#!/bin/sh\n")
    (app / "tool").chmod(0o755)
    build_eif(
        app_dir=app,
        cmd=["python", "main.py"],
        env={"LOG": "debug"},
        output=root / "i.eif",
    )
    return read_eif(root / "i.eif")


def _with_app_ramdisk(eif: EifFile, ramdisk: bytes) -> EifFile:
    sections = [(s.section_type, s.data) for s in eif.sections]
    last_ramdisk = max(i for i, (t, _) in enumerate(sections) if t is SectionType.RAMDISK)
    sections[last_ramdisk] = (SectionType.RAMDISK, ramdisk)
    return EifFile.from_bytes(encode_eif(sections))


def test_unpack_layout_and_modes(image: EifFile, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    img = unpack_eif(image, dest)
    assert img.root == dest
    assert img.bootstrap_dir == dest / "bootstrap"
    assert img.app_dir == dest / "app" / "rootfs"
    assert img.cmd == ["python", "main.py"]
    assert img.env == {"LOG": "debug"}
    assert img.identity["python"]["implementation"]
    assert (img.bootstrap_dir / "transport" / "__init__.py").is_file()
    assert (img.bootstrap_dir / "enclave-identity.json").is_file()
    assert (img.app_dir / "pkg" / "__init__.py").is_file()
    assert stat.S_IMODE((img.app_dir / "main.py").stat().st_mode) == 0o444
    assert stat.S_IMODE((img.app_dir / "tool").stat().st_mode) == 0o555
    assert stat.S_IMODE((img.app_dir / "pkg").stat().st_mode) == 0o555
    assert stat.S_IMODE(dest.stat().st_mode) == 0o555
    verify_unpacked(image, img)
    verify_unpacked(image, dest)
    assert load_unpacked(dest) == img
    remove_unpacked(dest)
    assert not dest.exists()


def test_unpack_into_non_empty_dir_refused(image: EifFile, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(EifError) as exc:
        unpack_eif(image, tmp_path / "busy")
    assert exc.value.code == "E19"


def _tamper_cases() -> dict[str, object]:
    def modify(img: UnpackedImage) -> None:
        p = img.bootstrap_dir / "transport" / "__init__.py"
        p.chmod(0o644)
        p.write_bytes(p.read_bytes() + b"\nimport os; os.system('evil')\n")
        p.chmod(0o444)

    def same_size(img: UnpackedImage) -> None:
        p = img.app_dir / "main.py"
        p.chmod(0o644)
        p.write_bytes(b"import evl\n")  # same length, different bytes
        p.chmod(0o444)

    def add_pycache(img: UnpackedImage) -> None:
        d = img.app_dir / "pkg"
        d.chmod(0o755)
        (d / "__pycache__").mkdir()
        (d / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"bytecode")

    def remove(img: UnpackedImage) -> None:
        (img.app_dir / "pkg").chmod(0o755)
        (img.app_dir / "pkg" / "__init__.py").unlink()

    def symlink(img: UnpackedImage) -> None:
        img.app_dir.chmod(0o755)
        (img.app_dir / "main.py").unlink()
        (img.app_dir / "main.py").symlink_to("/etc/passwd")

    def chmod(img: UnpackedImage) -> None:
        (img.app_dir / "main.py").chmod(0o666)

    def manifest(img: UnpackedImage) -> None:
        p = img.root / "app" / "manifest.json"
        p.chmod(0o644)
        p.write_text(p.read_text().replace('"debug"', '"DEBUG"'))
        p.chmod(0o444)

    def extra_root(img: UnpackedImage) -> None:
        img.root.chmod(0o755)
        (img.root / "sitecustomize.py").write_text("")

    def file_to_dir(img: UnpackedImage) -> None:
        img.app_dir.chmod(0o755)
        (img.app_dir / "main.py").unlink()
        (img.app_dir / "main.py").mkdir(0o555)

    def dir_to_file(img: UnpackedImage) -> None:
        img.app_dir.chmod(0o755)
        (img.app_dir / "pkg").chmod(0o755)
        shutil.rmtree(img.app_dir / "pkg")
        (img.app_dir / "pkg").write_bytes(b"")

    def dir_symlink(img: UnpackedImage) -> None:
        img.app_dir.chmod(0o755)
        (img.app_dir / "pkg").chmod(0o755)
        shutil.rmtree(img.app_dir / "pkg")
        (img.app_dir / "pkg").symlink_to("/tmp")

    def fifo(img: UnpackedImage) -> None:
        img.app_dir.chmod(0o755)
        (img.app_dir / "main.py").unlink()
        os.mkfifo(img.app_dir / "main.py", 0o444)

    def dir_mode(img: UnpackedImage) -> None:
        (img.app_dir / "pkg").chmod(0o755)

    def top_dir_mode(img: UnpackedImage) -> None:
        (img.root / "bootstrap").chmod(0o755)

    def top_dir_gone(img: UnpackedImage) -> None:
        img.root.chmod(0o755)
        for current, dirs, _files in os.walk(img.root / "bootstrap"):
            for d in dirs:
                os.chmod(os.path.join(current, d), 0o755)
        (img.root / "bootstrap").chmod(0o755)
        shutil.rmtree(img.root / "bootstrap")

    def nested_extra(img: UnpackedImage) -> None:
        d = img.bootstrap_dir / "transport"
        d.chmod(0o755)
        (d / "evil.py").write_text("")

    return {
        f.__name__: f
        for f in (
            modify,
            same_size,
            add_pycache,
            remove,
            symlink,
            chmod,
            manifest,
            extra_root,
            file_to_dir,
            dir_to_file,
            dir_symlink,
            fifo,
            dir_mode,
            top_dir_mode,
            top_dir_gone,
            nested_extra,
        )
    }


@pytest.mark.parametrize("case", sorted(_tamper_cases()))
def test_tampered_tree_refused(image: EifFile, tmp_path: Path, case: str) -> None:
    img = unpack_eif(image, tmp_path / "root")
    _tamper_cases()[case](img)  # type: ignore[operator]
    with pytest.raises(ImageTamperedError) as exc:
        verify_unpacked(image, img)
    assert exc.value.code == "E36"
    remove_unpacked(tmp_path / "root")


def test_unpacked_image_must_describe_its_tree(image: EifFile, tmp_path: Path) -> None:
    img = unpack_eif(image, tmp_path / "root")
    lying = UnpackedImage(img.root, img.bootstrap_dir, img.app_dir, ["sh"], img.env)
    with pytest.raises(ImageTamperedError):
        verify_unpacked(image, lying)


def test_other_image_does_not_verify(image: EifFile, tmp_path: Path) -> None:
    img = unpack_eif(image, tmp_path / "root")
    entries = read_newc(image.ramdisks[1])
    files = {e.name: FileSpec(e.data, e.is_executable) for e in entries if not e.is_dir}
    files["rootfs/main.py"] = FileSpec(b"import pkh\n")
    other = _with_app_ramdisk(image, archive_from_files(files))
    with pytest.raises(ImageTamperedError):
        verify_unpacked(other, img)


HOSTILE = {
    "dotdot": [("..", DIR, b"")],
    "traversal": [("a", DIR, b""), ("a/../../evil", REG, b"x")],
    "absolute": [("/tmp/evil", REG, b"x")],
    "dot": [(".", DIR, b"")],
    "empty component": [("a", DIR, b""), ("a//b", REG, b"x")],
    "trailing slash": [("a/", DIR, b"")],
    "symlink": [("link", stat.S_IFLNK | 0o777, b"/etc/passwd")],
    "char device": [("tty", stat.S_IFCHR | 0o666, b"")],
    "block device": [("sda", stat.S_IFBLK | 0o666, b"")],
    "fifo": [("fifo", stat.S_IFIFO | 0o666, b"")],
    "socket": [("sock", stat.S_IFSOCK | 0o666, b"")],
    "setuid": [("su", stat.S_IFREG | 0o4755, b"x")],
    "duplicate": [("a", REG, b"1"), ("a", REG, b"2")],
    "child before parent": [("d/f", REG, b"x"), ("d", DIR, b"")],
    "file as parent": [("f", REG, b"x"), ("f/g", REG, b"y")],
    "dir with data": [("d", DIR, b"data")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_rejected(image: EifFile, tmp_path: Path, case: str) -> None:
    archive = _newc(HOSTILE[case])
    with pytest.raises(EifFormatError):
        read_newc(archive)
    eif = _with_app_ramdisk(image, archive)
    dest = tmp_path / "box" / "root"
    with pytest.raises(EifFormatError):
        unpack_eif(eif, dest)
    assert not dest.exists()  # both archives are parsed before anything is written
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_malformed_archives_rejected() -> None:
    good = _newc([("a", REG, b"hello")])
    cases = {
        "truncated": good[:-20],
        "no trailer": good[: good.index(b"TRAILER") - 110],
        "bad magic": b"070702" + good[6:],
        "non-hex": good[:6] + b"zzzzzzzz" + good[14:],
        "junk after trailer": good + b"junk",
        "crc variant check": good[:102] + b"00000001" + good[110:],
        "huge filesize": good[:54] + b"ffffffff" + good[62:],
        "huge namesize": good[:94] + b"ffffffff" + good[102:],
        "zero namesize": good[:94] + b"00000000" + good[102:],
    }
    for name, data in cases.items():
        try:
            read_newc(data)
        except EifFormatError:
            continue
        pytest.fail(f"accepted: {name}")
    assert read_newc(good + b"\0" * 512)[0].data == b"hello"  # zero padding is fine
    with pytest.raises(EifFormatError, match="more than 3"):
        read_newc(_newc([(f"f{i}", REG, b"") for i in range(5)]), max_entries=3)


def test_not_our_image_cannot_be_unpacked(tmp_path: Path) -> None:
    foreign = encode_eif(
        [
            (SectionType.KERNEL, b"MZ\x00bzImage"),
            (SectionType.CMDLINE, b"console=ttyS0"),
            (SectionType.METADATA, b"{}"),
            (SectionType.RAMDISK, _newc([])),
            (SectionType.RAMDISK, _newc([])),
        ]
    )
    with pytest.raises(EifFormatError, match="kernel"):
        unpack_eif(EifFile.from_bytes(foreign), tmp_path / "x")


_names = st.text(
    alphabet=st.characters(exclude_characters="/\0", exclude_categories=["Cs"]),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.lists(_names, min_size=1, max_size=3).map("/".join), st.binary(max_size=64), max_size=8
    )
)
def test_archive_round_trip(files: dict[str, bytes]) -> None:
    # the end marker's name cannot be a member (test_trailer_name_is_reserved)
    files = {k: v for k, v in files.items() if k.split("/")[0] != TRAILER}
    # drop paths that are also parents of other paths (a path cannot be both)
    parents = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
    files = {k: v for k, v in files.items() if k not in parents}
    archive = archive_from_files(
        {k: FileSpec(v, executable=len(v) % 2 == 1) for k, v in files.items()}
    )
    entries = read_newc(archive)
    assert {e.name: e.data for e in entries if not e.is_dir} == files
    assert {e.name for e in entries if e.is_dir} == parents - set(files) | parents
    assert archive == archive_from_files(
        {k: FileSpec(v, executable=len(v) % 2 == 1) for k, v in reversed(list(files.items()))}
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1024))
def test_any_bytes_give_typed_error_or_entries(data: bytes) -> None:
    try:
        read_newc(data)
    except EifFormatError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_mutated_archive_never_escapes(data: st.DataObject) -> None:
    blob = bytearray(_newc([("d", DIR, b""), ("d/f", REG, b"content"), ("g", REG, b"x" * 9)]))
    for _ in range(data.draw(st.integers(1, 3))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        entries = read_newc(bytes(blob))
    except EifFormatError:
        return
    for e in entries:
        assert not e.name.startswith("/")
        assert ".." not in e.name.split("/")
        assert stat.S_ISDIR(e.mode) or stat.S_ISREG(e.mode)


def test_remove_unpacked_missing_is_noop(tmp_path: Path) -> None:
    remove_unpacked(tmp_path / "never")
    assert os.listdir(tmp_path) == []


def test_other_interpreter_or_dependencies_refused(
    image: EifFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.image import _content

    img = unpack_eif(image, tmp_path / "root")
    verify_environment(image)
    real = _content.dependency_identity()
    bumped = [dict(d, version="0.0.1") if d["name"] == "numpy" else d for d in real]
    monkeypatch.setattr(_content, "dependency_identity", lambda: bumped)
    with pytest.raises(ImageTamperedError, match="numpy"):
        verify_unpacked(image, img)
    verify_unpacked(image, img, check_environment=False)
    monkeypatch.setattr(
        _content, "interpreter_identity", lambda: {"implementation": "pypy", "version": "3.11"}
    )
    with pytest.raises(ImageTamperedError, match="pypy"):
        verify_environment(image)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_interoperates(image: EifFile, tmp_path: Path) -> None:
    """Cross-check the newc writer and reader against GNU cpio, both directions."""
    out = tmp_path / "gnu"
    out.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        input=image.ramdisks[1],
        cwd=out,
        check=True,
        timeout=30,
    )
    for entry in read_newc(image.ramdisks[1]):
        path = out / entry.name
        if entry.is_dir:
            assert path.is_dir()
        else:
            assert path.read_bytes() == entry.data
            assert bool(path.stat().st_mode & 0o111) == entry.is_executable
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    listing = "\n".join(names) + "\n"
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        input=listing.encode(),
        cwd=out,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    ours = {e.name: e.data for e in read_newc(image.ramdisks[1])}
    theirs = {e.name: e.data for e in read_newc(archive)}
    assert theirs == ours


@pytest.mark.parametrize("swap", ["fifo", "symlink", "missing"])
def test_load_unpacked_refuses_swapped_manifest(image: EifFile, tmp_path: Path, swap: str) -> None:
    img = unpack_eif(image, tmp_path / "root")
    manifest = img.root / "app" / "manifest.json"
    (img.root / "app").chmod(0o755)
    manifest.unlink()
    if swap == "fifo":
        os.mkfifo(manifest)
    elif swap == "symlink":
        (tmp_path / "fake.json").write_text('{"cmd": ["sh"], "env": {}}')
        manifest.symlink_to(tmp_path / "fake.json")
    with pytest.raises(ImageTamperedError):
        load_unpacked(img.root)
    with pytest.raises(ImageTamperedError):
        verify_unpacked(image, img.root)
    remove_unpacked(img.root)


@pytest.mark.parametrize("name", [TRAILER, f"{TRAILER}/inside"])
def test_trailer_name_is_reserved(name: str) -> None:
    """A member named like the end marker would silently end the archive early: refused."""
    with pytest.raises(EifFormatError, match="reserved"):
        archive_from_files({name: FileSpec(b"x")})
