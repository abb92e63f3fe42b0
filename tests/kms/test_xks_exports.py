"""kms.xks's face: it only re-exports, everything in ``__all__`` resolves, and its errors sit
under the project root (``tests/kms/test_exports_cli.py`` walks kms.xks's modules too)."""

from __future__ import annotations

import ast
from pathlib import Path

import kms.xks
from kms.xks import errors
from transport.errors import EnclaveError


def test_all_exports_resolve() -> None:
    for name in kms.xks.__all__:
        assert getattr(kms.xks, name) is not None, name


def test_face_only_reexports() -> None:
    tree = ast.parse(Path(kms.xks.__file__).read_text())
    imported: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.module != "__future__":
                imported |= {a.asname or a.name for a in node.names}
            continue
        assert isinstance(node, ast.Assign), ast.dump(node)[:80]
    assert set(kms.xks.__all__) == imported


def test_errors_derive_from_the_root() -> None:
    for name in errors.__all__:
        value = getattr(errors, name)
        if isinstance(value, type):
            assert issubclass(value, EnclaveError), name
