"""Package faces of transport (in the spirit of trio's test_exports): each package ``__init__``
only re-exports, with ``__all__``; every public name resolves; every public exception derives
from the project's root, :class:`transport.errors.EnclaveError` (issue 11)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest

import transport
from transport.errors import EnclaveError

ROOT = Path(transport.__file__).parent


def _public_modules() -> list[str]:
    names = ["transport"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="transport."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue  # private modules: reached through the faces
        names.append(info.name)
    return sorted(names)


PUBLIC = _public_modules()
PACKAGES = sorted(
    name for name in PUBLIC if (ROOT.parent / name.replace(".", "/") / "__init__.py").exists()
)


def test_the_faces_are_found() -> None:
    assert {"transport", "transport.channel", "transport.rpc", "transport.fabric"} <= set(PACKAGES)
    assert {"transport.vsock", "transport.errors", "transport.sync", "transport.relay"} <= set(
        PUBLIC
    )


@pytest.mark.parametrize("name", PACKAGES)
def test_package_init_only_reexports(name: str) -> None:
    """Allowed: the docstring, imports, ``__all__``, and the metadata fix-up call."""
    source = (ROOT.parent / name.replace(".", "/") / "__init__.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            assert [getattr(t, "id", None) for t in targets] == ["__all__"], ast.dump(node)
            continue
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "fixup_module_metadata"
        ):
            continue
        raise AssertionError(f"{name}/__init__.py does more than re-export: {ast.dump(node)}")


@pytest.mark.parametrize("name", PUBLIC)
def test_all_is_declared_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list | tuple), f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names {attr!r}, which does not exist"


def _exceptions(module: ModuleType) -> list[type[BaseException]]:
    out = []
    for attr in getattr(module, "__all__", ()):
        obj = getattr(module, attr)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            out.append(obj)
    return out


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_exception_derives_from_the_root(name: str) -> None:
    for exc in _exceptions(importlib.import_module(name)):
        assert issubclass(exc, EnclaveError), f"{name}.{exc.__name__} is not an EnclaveError"


def test_one_name_per_idea() -> None:
    """Authentication failures have one name; the parent CID has one name (Nitro's)."""
    import transport.channel
    import transport.vsock

    assert not hasattr(transport.channel, "ChannelRejected")
    assert not hasattr(transport.channel, "ChannelAuthenticationFailed")
    assert transport.vsock.VMADDR_CID_PARENT == 3
