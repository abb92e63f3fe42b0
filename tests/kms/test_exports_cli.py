"""Public surface: exports resolve, errors derive from the project root, CLI flag handling."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

import kms
import kms.errors
from kms.config import KmsConfig
from transport.errors import EnclaveError


def test_all_exports_resolve() -> None:
    for name in kms.__all__:
        assert getattr(kms, name) is not None, name


def test_errors_derive_from_root() -> None:
    classes = [
        c
        for _, c in inspect.getmembers(kms.errors, inspect.isclass)
        if c.__module__ == "kms.errors"
    ]
    assert classes
    for cls in classes:
        assert issubclass(cls, EnclaveError), cls


def test_serve_main_builds_config_from_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m kms`` flags override the config file only when given (hypercorn style)."""
    from kms import cli

    seen: dict[str, Any] = {}

    def fake_run(config: KmsConfig) -> int:
        seen["config"] = config
        return 0

    monkeypatch.setattr("kms.daemon.run_daemon", fake_run)
    monkeypatch.setattr(cli, "configure_logging", lambda *a, **k: None)
    monkeypatch.setenv("ENCLAVE_KMS_ACCESS_KEY_ID", "A")
    monkeypatch.setenv("ENCLAVE_KMS_SECRET_ACCESS_KEY", "S")
    conf = tmp_path / "kms.toml"
    conf.write_text('listen = "127.0.0.1:7000"\nmax_document_age_s = 60\ntrust_roots = ["aws"]\n')
    assert cli.serve_main(["--config", str(conf)]) == 0
    cfg = seen["config"]
    assert (cfg.host, cfg.port, cfg.max_document_age_s) == ("127.0.0.1", 7000, 60.0)
    assert cfg.trust_roots == ("aws",)
    assert (
        cli.serve_main(
            [
                "--config",
                str(conf),
                "--listen",
                "0.0.0.0:0",
                "--trust-root",
                "local",
                "--state-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    cfg = seen["config"]
    assert (cfg.host, cfg.port, cfg.max_document_age_s) == ("0.0.0.0", 0, 60.0)
    assert cfg.trust_roots == ("local",)
    assert cfg.state_dir == tmp_path.resolve()
    assert cli.serve_main(["--config", str(tmp_path / "missing.toml")]) == 1
