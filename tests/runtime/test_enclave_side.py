"""The enclave-side rule: ``runtime/enclave_init`` (measured into every image, the first code of
every enclave) imports only the standard library and the public modules of the enclave-side
packages, and never trio (the boot handshake is blocking: importing trio would cost every
fresh-interpreter start ~90 ms). Checked by parsing every import, including the ones inside
functions, and by running the imports."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import runtime.enclave_init

INIT_DIR = Path(runtime.enclave_init.__file__).parent
#: The enclave-side packages (what the bootstrap ramdisk holds besides init itself).
ENCLAVE_SIDE = {"transport", "attest", "kms", "models"}
#: Third-party modules init may use: none. (trio would cost every fresh start ~90 ms; the boot
#: handshake uses transport.blocking.)
THIRD_PARTY: set[str] = set()


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside runtime.enclave_init itself
                continue
            assert node.module is not None
            out.append((node.module, node.lineno))
            # ``from transport import fabric`` imports a module too (a name is not one)
            out += [
                (f"{node.module}.{a.name}", node.lineno)
                for a in node.names
                if _is_module(f"{node.module}.{a.name}")
            ]
    return out


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _violation(module: str) -> str | None:
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names or top == "__future__":
        return None
    if top in THIRD_PARTY:
        return None
    if module == "runtime.enclave_init" or module.startswith("runtime.enclave_init."):
        return None
    if top in ENCLAVE_SIDE:
        parts = module.split(".")
        if any(p.startswith("_") for p in parts[1:]):
            return "a private module of an enclave-side package"
        if parts[:2] == ["transport", "fabric"]:
            return "transport's fabric internals (use the transport.vsock face)"
        return None
    return "neither the standard library nor an enclave-side package"


def test_enclave_init_imports_only_stdlib_and_enclave_side_faces() -> None:
    files = sorted(INIT_DIR.rglob("*.py"))
    assert files
    bad = []
    for path in files:
        for module, line in _imports(path):
            why = _violation(module)
            if why is not None:
                bad.append(f"{path.name}:{line}: {module}: {why}")
    assert bad == []


def test_the_rule_catches_what_it_forbids() -> None:
    """The check itself can fail: the host runtime, fabric internals, private modules."""
    assert _violation("runtime.api") is not None
    assert _violation("runtime.sandbox") is not None
    assert _violation("transport.fabric.wire") is not None
    assert _violation("transport.channel._record") is not None
    assert _violation("numpy") is not None
    assert _violation("transport.vsock") is None
    assert _violation("os") is None
    assert _violation("transport.blocking") is None
    assert _violation("trio") is not None


def test_the_boot_handshake_imports_no_event_loop() -> None:
    """What init imports for the heartbeat leaves trio unloaded (a fresh interpreter)."""
    code = (
        "import sys, runtime.enclave_init\n"
        "from transport.blocking import VMADDR_CID_PARENT, VsockAddr, connect_vsock_blocking\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'cryptography')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
