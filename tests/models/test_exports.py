"""The models package's faces (issue 11): ``models/__init__.py`` only re-exports, every public
name of every models module resolves, and every exception models raises on purpose derives
from the project root (through ``models.errors.ModelError``)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import models
from models.errors import ModelError
from transport.errors import EnclaveError

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(models.__path__, prefix="models.")
    if info.name not in {"models.__main__"}
)


def test_face_only_reexports() -> None:
    tree = ast.parse(Path(models.__file__).read_text())
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        assert isinstance(node, ast.ImportFrom | ast.Assign), ast.dump(node)
        if isinstance(node, ast.Assign):
            assert [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__all__"]
    assert sorted(models.__all__) == sorted(
        name
        for name in vars(models)
        if not name.startswith("_")
        and name != "annotations"
        and not inspect.ismodule(getattr(models, name))
    )


@pytest.mark.parametrize("module", MODULES)
def test_all_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    if module.rpartition(".")[2].startswith("_") and names is None:
        return  # a private module need not declare a face
    assert names is not None, f"{module} has no __all__"
    for name in names:
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which is missing"


@pytest.mark.parametrize("module", MODULES)
def test_exceptions_derive_from_the_root(module: str) -> None:
    mod = importlib.import_module(module)
    for name, obj in vars(mod).items():
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            if obj.__module__ != module or name.startswith("_"):
                continue  # imported (checked where it is defined), or private control flow
            assert issubclass(obj, ModelError), f"{module}.{name} is not a ModelError"
    assert issubclass(ModelError, EnclaveError)
