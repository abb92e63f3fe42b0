from __future__ import annotations

import pytest

from runtime.cli import build_parser, main


def test_every_subcommand_module_registers() -> None:
    parser = build_parser()
    help_text = parser.format_help()
    for cmd in ["bench", "demo"]:
        assert cmd in help_text


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("enclave ")
