"""``runtime.demo`` as a package (issue 11: the demo had grown back to ~780 lines): the face only
re-exports (today's ``__all__``, plus the building blocks that moved to ``runtime.stack`` for
code written against ``runtime.demo``), each seam is a module of its own, and
``python -m runtime.demo`` still runs the demo's child process."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import runtime.demo
import runtime.stack

#: The face's public names before and after the split.
PUBLIC = {
    "main",
    "run_in_process",
    "run_demo",
    "DemoResults",
    "DemoFigures",
    "DemoFailure",
    "Console",
    "LATENCY_SAMPLES",
}
#: ``runtime.stack`` names the tree imports from ``runtime.demo`` (tests among it).
MOVED = {
    "SERVER_APP_DIR",
    "SERVER_CMD",
    "STORE_PORT",
    "Stack",
    "build_server_image",
    "create_model_key",
    "model_key_policy",
    "open_stack",
    "seal_bundled_model",
    "start_server",
}
#: Most lines in one module of the package (the point of the split).
MAX_LINES = 350


def test_the_face_only_reexports() -> None:
    tree = ast.parse(Path(runtime.demo.__file__).read_text())
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.ImportFrom):
            assert node.module is not None
            assert node.module == "runtime.stack" or node.module.startswith("runtime.demo.")
            continue
        assert isinstance(node, ast.Assign), ast.dump(node)
        assert [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__all__"]
    assert set(runtime.demo.__all__) == PUBLIC
    assert len(runtime.demo.__all__) == len(PUBLIC)


def test_public_names_come_from_the_package_and_moved_ones_from_the_stack() -> None:
    for name in PUBLIC - {"LATENCY_SAMPLES"}:
        value = getattr(runtime.demo, name)
        assert value.__module__.startswith("runtime.demo."), (name, value.__module__)
        assert getattr(importlib.import_module(value.__module__), name) is value
    assert (
        runtime.demo.LATENCY_SAMPLES
        is importlib.import_module("runtime.demo.digits").LATENCY_SAMPLES
    )
    for name in MOVED:
        assert getattr(runtime.demo, name) is getattr(runtime.stack, name), name


def test_every_module_is_small() -> None:
    for path in Path(runtime.demo.__file__).parent.glob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.name}: {lines} lines"


def test_python_m_runtime_demo_is_the_child_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runtime.demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m runtime.demo [-h] --state-dir STATE_DIR")
    # Without its required flag the child refuses to start (argparse's status 2).
    done = subprocess.run(
        [sys.executable, "-m", "runtime.demo"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "--state-dir" in done.stderr
