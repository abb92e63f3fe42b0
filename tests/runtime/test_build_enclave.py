"""build_eif / ``enclave build-enclave``: determinism, what each PCR covers, the bootstrap and
app ramdisk contents, and the CLI's output, messages and exit codes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from runtime.cli import main
from runtime.eif import EifBuildError, EifError, build_eif, read_eif
from runtime.image import _content
from runtime.image._cpio import read_newc


def _make_app(root: Path, *, reverse: bool = False, mtime: int = 1_000_000) -> Path:
    """The same tree, created in either order and with given mtimes."""
    app = root / "app"
    files = {
        "main.py": b"print('hello')\n",
        "lib/util.py": b"X = 1\n",
        "lib/data.bin": bytes(range(256)),
        "run.sh": b"#!/bin/sh\necho hi\n",
    }
    for rel in sorted(files, reverse=reverse):
        path = app / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[rel])
    (app / "run.sh").chmod(0o755)
    (app / "empty").mkdir()
    for current, dirs, names in os.walk(app):
        for n in [*dirs, *names]:
            os.utime(Path(current, n), (mtime, mtime))
    return app


def _build(app: Path, out: Path, **kw: object) -> bytes:
    args: dict[str, object] = {"cmd": "python main.py --flag 'two words'", "env": {"A": "1"}}
    args.update(kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    build_eif(app_dir=app, output=out, **args)  # type: ignore[arg-type]
    return out.read_bytes()


def test_builds_are_byte_identical(tmp_path: Path) -> None:
    a = _make_app(tmp_path / "one", reverse=False, mtime=1_000_000)
    b = _make_app(tmp_path / "two", reverse=True, mtime=2_000_000)
    (b / "lib" / "__pycache__").mkdir()
    (b / "lib" / "__pycache__" / "util.cpython-311.pyc").write_bytes(b"junk")
    (b / "stale.pyc").write_bytes(b"junk")
    os.chmod(b / "main.py", 0o600)  # permission bits other than x are normalised
    first = _build(a, tmp_path / "x" / "first.eif")
    second = _build(b, tmp_path / "y" / "second.eif")
    assert first == second
    assert (
        read_eif(tmp_path / "x" / "first.eif").pcrs == read_eif(tmp_path / "y" / "second.eif").pcrs
    )


def test_pcr2_covers_app_pcr1_covers_bootstrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _make_app(tmp_path)
    _build(app, tmp_path / "base.eif")
    base = read_eif(tmp_path / "base.eif")

    def pcrs(file_name: str, **kw: object) -> dict[int, bytes]:
        _build(app, tmp_path / file_name, **kw)
        return read_eif(tmp_path / file_name).pcrs

    for variant in (
        pcrs("cmd.eif", cmd="python main.py"),
        pcrs("env.eif", env={"A": "2"}),
    ):
        assert variant[1] == base.pcrs[1]
        assert variant[2] != base.pcrs[2]
        assert variant[0] != base.pcrs[0]
    # metadata is not measured
    meta = pcrs("meta.eif", name="other", version="9", metadata={"k": "v"})
    assert meta == base.pcrs
    # the app's contents are measured
    (app / "lib" / "util.py").write_bytes(b"X = 2\n")
    changed = pcrs("file.eif")
    assert changed[1] == base.pcrs[1]
    assert changed[2] != base.pcrs[2]
    # another interpreter / dependency set changes PCR1, not PCR2
    (app / "lib" / "util.py").write_bytes(b"X = 1\n")
    _content._dependency_identity_cached.cache_clear()
    monkeypatch.setattr(
        _content, "interpreter_identity", lambda: {"implementation": "other", "version": "0"}
    )
    other = pcrs("interp.eif")
    assert other[1] != base.pcrs[1]
    assert other[2] == base.pcrs[2]


def test_bootstrap_ramdisk_layout(tmp_path: Path) -> None:
    app = _make_app(tmp_path)
    _build(app, tmp_path / "i.eif")
    eif = read_eif(tmp_path / "i.eif")
    entries = {e.name: e for e in read_newc(eif.ramdisks[0])}
    names = set(entries)
    assert "enclave-identity.json" in names
    for pkg in ("attest", "kms", "models", "transport"):
        assert f"{pkg}/__init__.py" in names
        assert f"{pkg}/py.typed" in names
    assert entries["runtime/__init__.py"].data == _content.RUNTIME_INIT_STUB
    runtime_files = {n for n in names if n.startswith("runtime/")}
    assert runtime_files <= {"runtime", "runtime/__init__.py"} | {
        n for n in names if n.startswith("runtime/enclave_init")
    }
    for name, entry in entries.items():
        assert "__pycache__" not in name
        if not entry.is_dir:
            assert name.endswith((".py", "py.typed", ".pem")) or name == "enclave-identity.json"
    assert not any(n.endswith((".onnx", ".npz", ".toml")) for n in names)
    assert [e.name for e in read_newc(eif.ramdisks[0])] == sorted(names, key=str.encode)
    identity = json.loads(entries["enclave-identity.json"].data)
    assert identity["python"]["version"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert identity["python"]["implementation"] == sys.implementation.name
    dists = [d["name"] for d in identity["distributions"]]
    assert dists == sorted(dists)
    for required in ("trio", "cryptography", "cbor2", "msgpack", "structlog", "h11", "numpy"):
        assert required in dists
    assert "cffi" in dists  # a dependency of a dependency
    text = entries["enclave-identity.json"].data.decode()
    assert str(Path.home()) not in text
    assert sys.prefix not in text
    kernel = eif.kernel_manifest()
    assert kernel["init"] == "runtime.enclave_init"
    assert kernel["interpreter"] == identity["python"]


def test_app_ramdisk_layout(tmp_path: Path) -> None:
    app = _make_app(tmp_path)
    _build(app, tmp_path / "i.eif", env={"B": "x=y", "A": "1"})
    entries = {e.name: e for e in read_newc(read_eif(tmp_path / "i.eif").ramdisks[1])}
    assert set(entries) == {
        "manifest.json",
        "rootfs",
        "rootfs/empty",
        "rootfs/lib",
        "rootfs/lib/data.bin",
        "rootfs/lib/util.py",
        "rootfs/main.py",
        "rootfs/run.sh",
    }
    manifest = json.loads(entries["manifest.json"].data)
    assert manifest["cmd"] == ["python", "main.py", "--flag", "two words"]
    assert manifest["env"] == {"A": "1", "B": "x=y"}
    assert entries["rootfs/run.sh"].mode == 0o100755
    assert entries["rootfs/main.py"].mode == 0o100644
    assert entries["rootfs/empty"].mode == 0o040755


def test_output_inside_app_dir_is_not_swallowed(tmp_path: Path) -> None:
    app = _make_app(tmp_path)
    first = _build(app, app / "image.eif")
    second = _build(app, app / "image.eif")
    assert first == second


def test_symlinks_and_special_files_refused(tmp_path: Path) -> None:
    app = _make_app(tmp_path)
    (app / "link").symlink_to("/etc/passwd")
    with pytest.raises(EifBuildError, match="symlink") as exc:
        _build(app, tmp_path / "i.eif")
    assert exc.value.code == "E48"
    (app / "link").unlink()
    os.mkfifo(app / "fifo")
    with pytest.raises(EifBuildError, match="special"):
        _build(app, tmp_path / "i.eif")


@pytest.mark.parametrize(
    ("cmd", "env"),
    [
        ("", {}),
        ("python 'unbalanced", {}),
        (["a\0b"], {}),
        ("x", {"1BAD": "v"}),
        ("x", {"A": "\0"}),
    ],
)
def test_bad_cmd_or_env(tmp_path: Path, cmd: object, env: dict[str, str]) -> None:
    app = _make_app(tmp_path)
    with pytest.raises(EifError) as exc:
        _build(app, tmp_path / "i.eif", cmd=cmd, env=env)
    assert exc.value.code == "E03"


def test_missing_app_dir(tmp_path: Path) -> None:
    with pytest.raises(EifError) as exc:
        build_eif(app_dir=tmp_path / "nope", cmd="x", env={}, output=tmp_path / "o.eif")
    assert exc.value.code == "E19"


# ------------------------------------------------------------------------------------ CLI


def test_cli_build_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = _make_app(tmp_path)
    meta = tmp_path / "meta.json"
    meta.write_text('{"Team": "ml", "Build": 7}')
    out = tmp_path / "cli.eif"
    argv = ["build-enclave", "--app-dir", str(app), "--cmd", "python main.py"]
    argv += ["--env", "A=1", "--env", "B=two=2", "--output-file", str(out)]
    argv += ["--name", "demo", "--version", "1.2", "--metadata", str(meta)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert (
        captured.err == "Start building the Enclave Image...\nEnclave Image successfully created.\n"
    )
    result = json.loads(captured.out)
    eif = read_eif(out)
    assert list(result) == ["Measurements"]
    assert list(result["Measurements"]) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
    assert result["Measurements"]["HashAlgorithm"] == "Sha384 { ... }"
    assert {k: v for k, v in result["Measurements"].items() if k != "HashAlgorithm"} == (
        eif.measurements
    )
    assert captured.out == json.dumps(result, indent=2) + "\n"  # serde_json pretty format

    assert main(["describe-eif", "--eif-path", str(out)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert list(described) == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "CheckCRC",
        "ImageName",
        "ImageVersion",
        "Metadata",
    ]
    assert described["EifVersion"] == 4
    assert described["IsSigned"] is False
    assert described["CheckCRC"] is True
    assert (described["ImageName"], described["ImageVersion"]) == ("demo", "1.2")
    assert list(described["Metadata"]) == [
        "BuildTime",
        "BuildTool",
        "BuildToolVersion",
        "OperatingSystem",
        "KernelVersion",
        "DockerInfo",
        "Team",
        "Build",
    ]
    assert described["Metadata"]["Team"] == "ml"
    assert read_eif(out).metadata["CustomMetadata"] == {"Team": "ml", "Build": 7}


def test_cli_refuses_docker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["build-enclave", "--docker-uri", "hello-world:latest", "--output-file", "x.eif"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.startswith("[ E03 ] Invalid argument provided.\n--docker-uri/--docker-dir are not")
    assert "--app-dir" in err
    assert main(["build-enclave", "--docker-dir", ".", "--output-file", "x.eif"]) == 3


@pytest.mark.parametrize(
    ("extra", "status", "prefix"),
    [
        (["--cmd", "x"], 2, "error: the following arguments"),  # no --app-dir
        (["--app-dir", "{app}"], 2, "error: the following arguments"),  # no --cmd
        # nitro-cli: a certificate without its key is E01 MissingArgument
        (["--app-dir", "{app}", "--cmd", "x", "--signing-certificate", "c.pem"], 1, "[ E01 ]"),
        (["--app-dir", "{app}", "--cmd", "x", "--env", "NOEQUALS"], 3, "[ E03 ]"),
        (["--app-dir", "{app}", "--cmd", "x", "--metadata", "{missing}"], 19, "[ E19 ]"),
        (["--app-dir", "{app}", "--cmd", "x", "--metadata", "{badjson}"], 17, "[ E17 ]"),
        (["--app-dir", "{missing}", "--cmd", "x"], 19, "[ E19 ]"),
    ],
)
def test_cli_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    status: int,
    prefix: str,
) -> None:
    app = _make_app(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    subst = {"app": str(app), "missing": str(tmp_path / "missing"), "badjson": str(bad)}
    argv = ["build-enclave", "--output-file", str(tmp_path / "o.eif")]
    argv += [a.format(**subst) for a in extra]
    assert main(argv) == status
    captured = capsys.readouterr()
    assert prefix in captured.err
    assert captured.out == ""
    assert not (tmp_path / "o.eif").exists()


def test_cli_missing_output_is_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["build-enclave", "--app-dir", ".", "--cmd", "x"])
    assert exc.value.code == 2


def test_source_date_epoch_sets_build_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = _make_app(tmp_path)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    _build(app, tmp_path / "t.eif")
    meta = read_eif(tmp_path / "t.eif").metadata
    assert meta["BuildMetadata"]["BuildTime"] == "2023-11-14T22:13:20+00:00"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    with pytest.raises(EifBuildError):
        _build(app, tmp_path / "t.eif")


def test_app_tree_size_is_bounded_before_reading(tmp_path: Path) -> None:
    app = _make_app(tmp_path)
    with open(app / "big.bin", "wb") as f:
        f.truncate(10 << 20)  # sparse: 10 MiB claimed, nothing to read
    with pytest.raises(EifBuildError, match="more than"):
        _content.app_ramdisk(app, ["x"], {}, max_bytes=1 << 20)


def test_fifo_inputs_do_not_hang(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(tmp_path / "fifo")
    assert main(["describe-eif", "--eif-path", str(tmp_path / "fifo")]) == 19
    assert main(["pcr", "--input", str(tmp_path / "fifo")]) == 19
    app = _make_app(tmp_path)
    argv = ["build-enclave", "--app-dir", str(app), "--cmd", "x", "--output-file"]
    argv += [str(tmp_path / "o.eif"), "--metadata", str(tmp_path / "fifo")]
    assert main(argv) == 19
    assert capsys.readouterr().err.count("not a regular file") == 3


def test_describe_garbage_is_e35(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.eif").write_bytes(b"\x7fELF" + bytes(1000))
    assert main(["describe-eif", "--eif-path", str(tmp_path / "junk.eif")]) == 35
    captured = capsys.readouterr()
    assert captured.out == ""
    # nitro-cli's layout: the code's description, the specific message, the help link
    head, message, _blank, link = captured.err.splitlines()[:4]
    assert head.startswith("[ E35 ] EIF file parsing error.")
    assert message.startswith("not an EIF file")
    assert link.endswith("cli-errors.html#E35")
