"""Every user error of the runtime's subcommands is nitro-cli's ``[ Exx ]`` block or one
``error:`` line on stderr, never a Python traceback; no argparse abbreviations; build-time
checks a new user hits first (a typo in the entry point, an output directory that does not
exist)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cli import build_parser, main
from runtime.eif import EifBuildError, build_eif

#: What a user error may look like on stderr (first line).
_FIRST_LINE_OK = ("[ E", "error:", "usage:")
#: nitro-cli's progress lines, printed before the work that may fail.
_PROGRESS = ("Start building the Enclave Image", "Start allocating memory", "The enclave CID")


def _bad_inputs(tmp: Path) -> list[list[str]]:
    junk = tmp / "junk.eif"
    junk.write_bytes(b"\x00" * 100)
    notjson = tmp / "cfg.json"
    notjson.write_text("{nope")
    nodir = str(tmp / "nope")
    unknown = "i-0123456789abcdef0-enc0123456789abcdef"
    build = ["build-enclave", "--app-dir", str(tmp), "--output-file", str(tmp / "o.eif")]
    run = ["run-enclave", "--eif-path", str(junk)]
    j = str(junk)
    return [
        ["build-enclave", "--app-dir", nodir, "--cmd", "x", "--output-file", str(tmp / "o")],
        [*build, "--cmd", "python3 mian.py"],
        [*build, "--cmd", ""],
        [*build, "--cmd", "'unbalanced"],
        [*build[:3], "--cmd", "sh", "--output-file", str(tmp / "no-such-dir" / "x.eif")],
        [*build, "--cmd", "sh", "--env", "=x"],
        ["describe-eif", "--eif-path", nodir],
        ["describe-eif", "--eif-path", j],
        ["describe-eif", "--eif-path", str(tmp)],
        [*run, "--memory", "lots", "--cpu-count", "1"],
        [*run, "--memory", "128", "--cpu-count", "x"],
        [*run, "--memory", "128", "--cpu-ids", "0", "-"],
        [*run, "--memory", "128", "--cpu-count", "1", "--enclave-cid", "1"],
        [*run, "--memory", "128", "--cpu-count", "1", "--wait-ready", "never"],
        ["run-enclave", "--config", str(notjson)],
        ["run-enclave", "--config", nodir],
        ["run-enclave", "--memory", "128"],
        ["terminate-enclave", "--enclave-id", unknown],
        ["terminate-enclave", "--enclave-id", "garbage"],
        ["terminate-enclave", "--enclave-name", "nobody"],
        ["console", "--enclave-id", unknown],
        ["console", "--enclave-id", "../../etc/passwd"],
        ["console", "--enclave-name", "x", "--disconnect-timeout", "-1"],
        ["pcr", "--input", nodir],
        ["pcr", "--input", str(tmp)],
        ["pcr", "--signing-certificate", j],
        ["explain", "--error-code", "nothing"],
        ["sign-eif", "--eif-path", j],
        ["sign-eif", "--eif-path", j, "--signing-certificate", j, "--private-key", j],
        ["attest", "verify", nodir],
        ["attest", "verify", j, "--at", "yesterday"],
        ["attest", "verify", j, "--expect-pcr", "x"],
        ["attest", "root", "--state-dir", j],
    ]


def _check(argv: list[str], status: int, stderr: str) -> None:
    assert "Traceback" not in stderr, (argv, stderr)
    if argv[:1] == ["explain"]:
        assert status == 0, (argv, stderr)  # nitro-cli: an unknown code still exits 0
        return
    assert status != 0, (argv, stderr)
    lines = [ln for ln in stderr.splitlines() if not ln.startswith(_PROGRESS)]
    assert lines, (argv, stderr)
    assert lines[0].startswith(_FIRST_LINE_OK), (argv, stderr)


def test_no_user_error_prints_a_traceback(
    tmp_path: Path, enclave_state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each bad invocation: a non-zero exit with nitro-cli's block or one ``error:`` line,
    never a traceback (in-process: an exception escaping ``main`` would be the traceback)."""
    (tmp_path / "main.py").write_text("print('hi')\n")
    for argv in _bad_inputs(tmp_path):
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse usage errors: "usage:" + "error:" lines
            status = exc.code if isinstance(exc.code, int) else 2
        _check(argv, status, capsys.readouterr().err)
    assert not (tmp_path / "no-such-dir").exists()


def test_an_unusable_state_directory_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_dir = tmp_path / "state-file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("ENCLAVE_STATE_DIR", str(not_a_dir))
    for argv in (
        ["describe-enclaves"],
        ["terminate-enclave", "--all"],
        ["console", "--enclave-name", "x"],
        ["run-enclave", "--eif-path", "x.eif", "--memory", "128", "--cpu-count", "1"],
    ):
        _check(argv, main(argv), capsys.readouterr().err)


def test_user_errors_as_separate_processes(tmp_path: Path, enclave_state_dir: Path) -> None:
    """The same through the console script's process (``python -m runtime.cli``)."""
    inputs = _bad_inputs(tmp_path)
    for argv in (inputs[1], inputs[-1], inputs[10]):
        r = subprocess.run(
            [sys.executable, "-m", "runtime.cli", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ),
            check=False,
        )
        _check(argv, r.returncode, r.stderr)


@pytest.mark.parametrize(
    "argv",
    [
        ["run-enclave", "--eif-path", "x.eif", "--memory", "128", "--cpu-count", "1", "--debug"],
        ["run-enclave", "--eif-p", "x.eif", "--memory", "128", "--cpu-count", "1"],
        ["console", "--enclave-n", "x"],
        ["terminate-enclave", "--enclave-i", "x"],
        ["describe-enclaves", "--meta"],
        ["build-enclave", "--app", ".", "--cmd", "x", "--output-file", "o.eif"],
        ["describe-eif", "--eif", "x.eif"],
        ["pcr", "--inp", "x"],
        ["explain", "--error", "E01"],
        ["sign-eif", "--eif", "x.eif"],
        ["attest", "root", "--state", "x"],
    ],
)
def test_no_abbreviations(argv: list[str]) -> None:
    """A script written for nitro-cli must not silently mean something else: ``--debug`` is
    not ``--debug-mode``; every prefix of a flag is refused by every subcommand parser."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2


def test_every_runtime_subparser_refuses_abbreviations() -> None:
    import argparse

    parser = build_parser()
    subactions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    ours = {
        "build-enclave",
        "describe-eif",
        "run-enclave",
        "describe-enclaves",
        "terminate-enclave",
        "console",
        "pcr",
        "explain",
        "sign-eif",
        "attest",
    }
    todo = [(name, p) for a in subactions for name, p in a.choices.items() if name in ours]
    assert {name for name, _ in todo} == ours
    while todo:
        name, p = todo.pop()
        assert p.allow_abbrev is False, name
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [(f"{name} {n}", sp) for n, sp in a.choices.items()]


def _app(tmp: Path) -> Path:
    app = tmp / "app"
    app.mkdir()
    (app / "main.py").write_text("print('hi')\n")
    (app / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (app / "pkg").mkdir()
    (app / "pkg" / "__main__.py").write_text("print('pkg')\n")
    return app


@pytest.mark.parametrize(
    ("cmd", "missing"),
    [
        ("python3 mian.py", "mian.py"),
        ("python -u mian.py --flag", "mian.py"),
        ("python3 -m notamodule_xyz", "notamodule_xyz"),
        ("./start.sh", "./start.sh"),
        ("python3", None),
    ],
)
def test_a_missing_entry_point_is_a_build_error(
    tmp_path: Path, cmd: str, missing: str | None
) -> None:
    """Issue 10: ``--cmd "python3 mian.py"`` (a typo) built, and run-enclave returned 0."""
    app = _app(tmp_path)
    with pytest.raises(EifBuildError) as ei:
        build_eif(app_dir=app, cmd=cmd, env={}, output=tmp_path / "o.eif")
    assert ei.value.code == "E48"
    if missing is not None:
        assert repr(missing) in ei.value.message
    assert not (tmp_path / "o.eif").exists()


@pytest.mark.parametrize(
    "cmd",
    [
        "python3 main.py",
        "python3 -u main.py",
        "python3 -m pkg",
        "python3 -m models.server",  # installed / bootstrap packages
        "python3 -c 'print(1)'",
        "./run.sh",
        "sh -c 'echo hi'",  # programs on PATH are not checked
        "/bin/true",
    ],
)
def test_commands_that_can_start_still_build(tmp_path: Path, cmd: str) -> None:
    build_eif(app_dir=_app(tmp_path), cmd=cmd, env={}, output=tmp_path / "o.eif")
    assert (tmp_path / "o.eif").is_file()


def test_output_in_a_missing_directory_is_refused_like_nitro_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``build-enclave --output-file /nonexistent/x.eif`` created ``/nonexistent/``; nitro-cli
    fails to open the output file: E19, with the path and the failing operation."""
    app = _app(tmp_path)
    out = tmp_path / "nonexistent" / "deeper" / "x.eif"
    argv = ["build-enclave", "--app-dir", str(app), "--cmd", "python3 main.py"]
    assert main([*argv, "--output-file", str(out)]) == 19
    err = capsys.readouterr().err
    assert err.startswith("Start building the Enclave Image...\n[ E19 ] File operation failure.")
    assert f"File: '{out}', failing operation: 'Open'." in err
    assert not (tmp_path / "nonexistent").exists()
