"""The runtime package's faces (issue 11): ``runtime/__init__.py`` is a lazy face over
``runtime.api`` (the CLI and the in-enclave init must not pay for importing the host-side
runtime) whose names are exactly the API's, and every public runtime module declares an
``__all__`` whose names all resolve."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import runtime

#: Entry points that need what the test process has not set up (an enclave, the zygote's argv).
_ENTRY_POINTS = {"runtime.__main__", "runtime.cli.__main__", "runtime.enclave_init.__main__"}

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(runtime.__path__, prefix="runtime.")
    if info.name not in _ENTRY_POINTS and info.name != "runtime._zygote_main"
)


def test_the_face_is_lazy_and_only_reexports_the_api() -> None:
    tree = ast.parse(Path(runtime.__file__).read_text())
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.ImportFrom | ast.Import | ast.If):
            continue  # imports, and the TYPE_CHECKING block for type checkers
        if isinstance(node, ast.Assign):
            assert [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__all__"]
            continue
        assert isinstance(node, ast.FunctionDef), ast.dump(node)
        assert node.name == "__getattr__"
    api = importlib.import_module("runtime.api")
    for name in runtime.__all__:
        assert getattr(runtime, name) is getattr(api, name)
    with pytest.raises(AttributeError):
        _ = runtime.no_such_name  # type: ignore[attr-defined]


def test_importing_the_face_does_not_import_the_api() -> None:
    import subprocess

    code = "import runtime, sys; print('runtime.api' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("module", MODULES)
def test_all_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    if module.rpartition(".")[2].startswith("_") and names is None:
        return  # a private module need not declare a face
    assert names is not None, f"{module} has no __all__"
    for name in names:
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which is missing"
