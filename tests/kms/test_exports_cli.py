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
    """Every public exception class defined in kms/ derives from the project root (issue 11:
    SigV4Failure did not)."""
    import importlib
    import pkgutil

    classes = []
    for info in pkgutil.walk_packages(kms.__path__, "kms."):
        if info.name == "kms.__main__":
            continue
        module = importlib.import_module(info.name)
        classes += [
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if c.__module__ == info.name
            and issubclass(c, BaseException)
            and not c.__name__.startswith("_")  # private control flow, never escapes
        ]
    names = {c.__name__ for c in classes}
    assert {"SigV4Failure", "KmsApiError", "RecipientRejected"} <= names
    for cls in classes:
        assert issubclass(cls, EnclaveError), cls


def test_package_face_only_reexports() -> None:
    """kms/__init__.py holds imports and __all__ only, and __all__ is exactly what it imports."""
    import ast

    tree = ast.parse(Path(kms.__file__).read_text())
    imported: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.ImportFrom):
            if node.module != "__future__":
                imported |= {a.asname or a.name for a in node.names}
            continue
        assert isinstance(node, ast.Assign), ast.dump(node)[:80]
        assert [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__all__"]
    assert set(kms.__all__) == imported


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:4599", ("::1", 4599))],
)
def test_config_listen_uses_the_one_parser(listen: str, expected: tuple[str, int]) -> None:
    cfg = KmsConfig.from_mapping({"listen": listen})
    assert (cfg.host, cfg.port) == expected


@pytest.mark.parametrize("listen", ["http://127.0.0.1:4599", "::1:4599", "host:", "h:70000"])
def test_config_listen_refuses_what_hostport_refuses(listen: str) -> None:
    from transport.errors import AddressError

    with pytest.raises(AddressError):
        KmsConfig.from_mapping({"listen": listen})


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


def test_every_api_operation_has_one_declaration() -> None:
    """The service dispatches through a declared table, in step with the wire layer's."""
    from kms.api import OPERATIONS as WIRE
    from kms.service import OPERATIONS, KmsService

    assert set(OPERATIONS) == set(WIRE)
    assert all(op.name == name for name, op in OPERATIONS.items())
    assert not [n for n in dir(KmsService) if n.startswith("_op_")]  # no getattr dispatch
