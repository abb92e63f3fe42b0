"""Package faces (trio's ``test_exports`` style): every attest package's ``__init__`` only
re-exports, lists exactly what it re-exports in ``__all__``, and every listed name exists."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import attest

FACES = sorted(
    {"attest"} | {f"attest.{m.name}" for m in pkgutil.walk_packages(attest.__path__) if m.ispkg}
)


def test_every_attest_package_is_checked() -> None:
    assert FACES == ["attest", "attest.nsm", "attest.roots"]


@pytest.mark.parametrize("name", FACES)
def test_face_only_reexports(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    imported: set[str] = set()
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            for alias in node.names:
                # ``from x import Name as Name``: the explicit re-export form (pyright, trio)
                assert alias.asname == alias.name, f"{name}: {alias.name} not re-exported as-is"
                imported.add(alias.name)
            continue
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "__all__"
        ]:
            continue
        pytest.fail(f"{name}: a package face holds only imports and __all__ (line {node.lineno})")
    assert sorted(module.__all__) == sorted(imported), name
    for exported in module.__all__:
        assert hasattr(module, exported), (name, exported)
