"""Every exception class the runtime and attest packages define derives from the project's one
root, ``transport.errors.EnclaveError`` (issue 11: ``MessageError`` and ``UsageError`` did
not); nitro-cli failures carry their code as a class attribute."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import attest
import runtime
from runtime.errors import ERROR_NAMES, NitroCliError, error_classes
from transport.errors import EnclaveError

#: Modules that need what the test process has not set up (an enclave, the zygote's argv).
_SKIP = {
    "runtime.enclave_init.__main__",
    "runtime.cli.__main__",
    "runtime._zygote_main",
}


def _modules() -> list[str]:
    out = []
    for pkg in (runtime, attest):
        for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            if m.name not in _SKIP:
                out.append(m.name)
    return out


@pytest.mark.parametrize("name", _modules())
def test_exceptions_derive_from_the_root(name: str) -> None:
    module = importlib.import_module(name)
    for attr, value in vars(module).items():
        if (
            isinstance(value, type)
            and issubclass(value, BaseException)
            and value.__module__ == name
        ):
            assert issubclass(value, EnclaveError), f"{name}.{attr}"


def test_every_runtime_code_class_is_typed() -> None:
    classes = error_classes()
    assert classes["E00"] is NitroCliError
    for code, cls in classes.items():
        assert cls.code == code
        assert code in ERROR_NAMES
        assert cls.exit_code == (1 if code == "E00" else int(code[1:]))
