"""No ``typing.Any`` in public signatures (issue 11, "Typed faces").

For every package face (each package of the project whose ``__init__`` declares ``__all__``)
and every module users import by path (:data:`PATH_FACES`), every name in ``__all__`` that is a
function or a class is checked: a function's signature, and for a class its ``__init__`` and
every public method and property defined in the project (inherited ones included; what a class
inherits from trio or the standard library is not ours to type). A signature "mentions" ``Any``
if ``Any`` appears anywhere in its resolved hints, nested generics included (``dict[str, Any]``,
``Callable[..., Any]``, ``Annotated[Any, ...]``).

``Any`` stays only where it is the honest type, in :data:`HONEST_ANY`, one entry per signature
with its reason. Signatures that still use it where a precise type exists, in files outside this
change (their owners' to fix; several are being changed by other branches now), are listed in
:data:`KNOWN_DEBT` with the type each should have. Both lists are checked for staleness: an
entry whose signature no longer mentions ``Any`` fails, so fixing a signature removes its entry
(and a new ``Any`` fails unless a reviewer accepts a new entry).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import sys
import types
import typing
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from transport import accel

#: Compiled core modules (transport.accel) have no source and no annotations to read. In a
#: process that runs them, these checks run instead in a child process that imports the
#: interpreted source, the same code: tests/test_public_signatures_compiled.py.
pytestmark = pytest.mark.skipif(
    accel.status().compiled,
    reason="the cores are compiled here: test_public_signatures_compiled.py runs this file "
    "on the interpreted source",
)

#: The project's top-level packages.
ROOTS = ("transport", "attest", "kms", "models", "runtime")

#: Public modules whose package face does not re-export them but that users import by path (the
#: ``models`` face re-exports only its errors so that ``import models`` stays cheap).
PATH_FACES = ("models.tensors", "models.text.wire", "models.client")

#: A library's own aliases, taken as they are: what is inside them is the library's business.
#: (numpy spells "anything ``np.asarray`` takes" with ``dtype[Any]`` inside.)
LIBRARY_ALIASES: tuple[object, ...] = (npt.ArrayLike, npt.DTypeLike)

#: Signatures where ``Any`` is the honest type: ``"module.name[.member]"`` -> reason.
HONEST_ANY: dict[str, str] = {
    # An RPC message or metadata value is any msgpack-able value the application chooses; the
    # RPC layer only carries it. (A recursive msgpack alias would force every application to
    # cast its own typed messages.)
    "transport.rpc.MessageReceived.__init__": "an RPC message is any msgpack-able value",
    "transport.rpc.RequestReceived.__init__": "an RPC message is any msgpack-able value",
    "transport.rpc.StreamOpened.__init__": "RPC metadata values are any msgpack-able value",
    "transport.rpc.RpcClient.call": "an RPC message is any msgpack-able value",
    "transport.rpc.RpcClient.open_stream": "RPC metadata values are any msgpack-able value",
    "transport.rpc.RpcConnection.pack_message": "an RPC message is any msgpack-able value",
    "transport.rpc.RpcConnection.send_message": "an RPC message is any msgpack-able value",
    "transport.rpc.RpcConnection.send_open": "RPC metadata values are any msgpack-able value",
    "transport.rpc.RpcStream.__init__": "RPC metadata values are any msgpack-able value",
    "transport.rpc.RpcStream.deliver": "an RPC message is any msgpack-able value",
    "transport.rpc.RpcStream.receive": "an RPC message is any msgpack-able value",
    "transport.rpc.RpcStream.receive_nowait": "an RPC message is any msgpack-able value",
    "transport.rpc.RpcStream.send": "an RPC message is any msgpack-able value",
    # A handler takes and returns the application's messages (see above).
    "transport.rpc.unary": "a handler's request and answer are application messages",
    "transport.rpc.unary_inline": "a handler's request and answer are application messages",
    "transport.rpc.InlineUnary.__init__": "a handler's request and answer are application messages",
    "transport.rpc.InlineUnary.inline_handler": "a handler's answer is an application message",
    "transport.rpc.Router.inline_handler": "a handler's answer is an application message",
}

#: Signatures that still say ``Any`` where a precise type exists, in files other branches own
#: this round (not changed here so as not to collide): ``"module.name[.member]"`` -> where.
KNOWN_DEBT: dict[str, str] = {}


def _faces() -> list[str]:
    faces: list[str] = []
    for root in ROOTS:
        package = importlib.import_module(root)
        faces.append(root)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{root}."):
            if info.ispkg and not any(p.startswith("_") for p in info.name.split(".")):
                faces.append(info.name)
    faces.extend(PATH_FACES)
    return [f for f in faces if hasattr(importlib.import_module(f), "__all__")]


def _in_project(module: str | None) -> bool:
    return module is not None and module.partition(".")[0] in ROOTS


Signature = tuple[str, Callable[..., object], types.ModuleType]


def _signatures(face: str) -> Iterator[Signature]:
    """``(qualified name, function, defining module)`` for every checked signature of the
    face's names."""
    mod = importlib.import_module(face)
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.isfunction(obj):
            obj = inspect.unwrap(obj)  # through @asynccontextmanager and the like
            yield f"{face}.{name}", obj, _home_of_function(obj)
        elif inspect.isclass(obj):
            seen: set[str] = set()
            for klass in obj.__mro__:
                if not _in_project(klass.__module__):
                    continue
                home = _home_of_class(klass)
                for attr, value in vars(klass).items():
                    if attr in seen or (attr.startswith("_") and attr != "__init__"):
                        continue
                    seen.add(attr)
                    if isinstance(value, staticmethod | classmethod):
                        value = value.__func__
                    accessors = [value.fget, value.fset] if isinstance(value, property) else [value]
                    for fn in accessors:
                        if inspect.isfunction(fn):
                            yield f"{face}.{name}.{attr}", inspect.unwrap(fn), home


def _project_modules() -> Iterator[types.ModuleType]:
    for module in list(sys.modules.values()):
        if _in_project(getattr(module, "__name__", None)) and getattr(module, "__file__", None):
            yield module


def _home_of_function(fn: Callable[..., object]) -> types.ModuleType:
    # A face may rewrite ``__module__`` for display: go by the code's file.
    for module in _project_modules():
        if module.__file__ == fn.__code__.co_filename:
            return module
    raise LookupError(f"no module defines {fn.__qualname__}")


def _home_of_class(klass: type) -> types.ModuleType:
    # A dataclass's generated ``__init__`` has no file: find the module whose top level defines
    # the class (``__module__`` may have been rewritten by a face).
    for module in _project_modules():
        if vars(module).get(klass.__name__) is klass and klass.__name__ in _top_classes(module):
            return module
    raise LookupError(f"no module defines {klass.__qualname__}")


@cache
def _top_classes(module: types.ModuleType) -> frozenset[str]:
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    return frozenset(node.name for node in tree.body if isinstance(node, ast.ClassDef))


@cache
def _namespace(module: types.ModuleType) -> dict[str, object]:
    """The module's globals plus what it imports under ``if TYPE_CHECKING:`` (annotations may
    name those; ``get_type_hints`` alone cannot resolve them)."""
    namespace = dict(vars(module))
    filename = inspect.getfile(module)
    for node in ast.parse(Path(filename).read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            block = ast.Module(body=node.body, type_ignores=[])
            exec(compile(block, filename, "exec"), namespace)
    return namespace


def _hints(fn: Callable[..., object], home: types.ModuleType) -> dict[str, object]:
    return typing.get_type_hints(fn, globalns=_namespace(home), include_extras=True)


def mentions_any(hint: object) -> bool:
    """True if ``hint`` is ``Any`` or has ``Any`` anywhere inside it."""
    if hint is typing.Any:
        return True
    if any(hint == alias for alias in LIBRARY_ALIASES):
        return False
    if isinstance(hint, list | tuple):  # Callable's parameter list
        return any(mentions_any(h) for h in hint)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        return mentions_any(args[0])  # the rest is metadata, not types
    if origin is np.ndarray:
        # numpy's own NDArray alias leaves the shape as tuple[Any, ...]: only the dtype is ours.
        return mentions_any(args[1])
    if isinstance(hint, typing.TypeVar):
        return mentions_any(hint.__bound__) or mentions_any(hint.__constraints__)
    if isinstance(hint, typing.NewType):
        return mentions_any(hint.__supertype__)
    return any(mentions_any(a) for a in args)


def _offenders() -> dict[str, list[str]]:
    """Every checked signature that mentions ``Any`` -> the parameters (or ``return``) that do."""
    found: dict[str, list[str]] = {}
    for face in FACES:
        for qualname, fn, home in _signatures(face):
            bad = [param for param, hint in _hints(fn, home).items() if mentions_any(hint)]
            if bad:
                found[qualname] = bad
    return found


FACES = _faces()


@pytest.fixture(scope="module")
def offenders() -> dict[str, list[str]]:
    return _offenders()


def test_the_faces_include_the_named_packages() -> None:
    for face in ("transport", "transport.rpc", "transport.channel", "attest", "kms", "models"):
        assert face in FACES
    assert "runtime" in FACES
    assert set(PATH_FACES) <= set(FACES)


@pytest.mark.parametrize("face", FACES)
def test_every_signature_resolves(face: str) -> None:
    """Every annotation of the face names something real (no stale forward reference)."""
    for _qualname, fn, home in _signatures(face):
        _hints(fn, home)


def test_no_any_in_public_signatures(offenders: dict[str, list[str]]) -> None:
    unexplained = {
        name: params
        for name, params in offenders.items()
        if name not in HONEST_ANY and name not in KNOWN_DEBT
    }
    assert not unexplained, f"Any in public signatures (give a precise type): {unexplained}"


def test_the_allowlists_are_not_stale(offenders: dict[str, list[str]]) -> None:
    stale = sorted((set(HONEST_ANY) | set(KNOWN_DEBT)) - set(offenders))
    assert not stale, f"no longer mention Any, remove from the lists: {stale}"
    assert not set(HONEST_ANY) & set(KNOWN_DEBT)


def _example_module() -> types.ModuleType:
    """A module with one signature of each shape the check must flag, and two it must not."""
    source = (
        "from __future__ import annotations\n"
        "from collections.abc import Callable\n"
        "from typing import Annotated, Any, TypeVar\n"
        "import numpy as np\nimport numpy.typing as npt\n"
        "T = TypeVar('T', bound=dict[str, Any])\n"
        "def nested(x: int) -> dict[str, list[Any]]: ...\n"
        "def callback(f: Callable[[Any], None]) -> None: ...\n"
        "def annotated(x: Annotated[Any, 'meta']) -> None: ...\n"
        "def bound(x: T) -> T: ...\n"
        "def array(x: npt.NDArray[Any]) -> None: ...\n"
        "def fine(x: npt.NDArray[np.float32], y: Annotated[int, Any]) -> object: ...\n"
        "def library(x: dict[str, npt.ArrayLike]) -> npt.DTypeLike: ...\n"
    )
    module = types.ModuleType("models._signature_example")
    exec(compile(source, "<example>", "exec"), module.__dict__)
    return module


def test_the_check_walks_nested_generics() -> None:
    module = _example_module()
    for name in ("nested", "callback", "annotated", "bound", "array"):
        hints = typing.get_type_hints(getattr(module, name), include_extras=True)
        assert any(mentions_any(h) for h in hints.values()), name
    for name in ("fine", "library"):
        hints = typing.get_type_hints(getattr(module, name), include_extras=True)
        assert not any(mentions_any(h) for h in hints.values()), name
