"""The ``enclave`` command: nitro-cli's subcommands plus this project's own.

Layout follows qtile's ``scripts/``: each subcommand lives in its own module of this package and
exposes ``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking the
parsed ``argparse.Namespace`` and returning the exit status). Modules are discovered at start, so
adding a subcommand is adding a file.

Output conventions (nitro-cli): machine-readable JSON on stdout, progress and logs on stderr.
Usage errors exit with status 2 (argparse, like clap). Errors derived from
:class:`transport.errors.EnclaveError` are reported on stderr; an error that knows how to render
itself for the CLI (a ``cli_report()`` method, e.g. nitro-cli's ``[ Exx ]`` blocks) does so, and
its ``exit_code`` attribute becomes the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeAlias, cast

from transport.errors import EnclaveError
from transport.logs import configure_logging

__all__ = ["main", "build_parser", "Handler", "SubParsers"]

Handler = Callable[[argparse.Namespace], int]
if TYPE_CHECKING:
    #: The object ``register(subparsers)`` receives; import it under ``TYPE_CHECKING`` only.
    SubParsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


class _Registrar(Protocol):
    def __call__(self, subparsers: SubParsers) -> None: ...


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("enclave-runtime")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    """Build the full ``enclave`` parser from every subcommand module of this package."""
    parser = argparse.ArgumentParser(
        prog="enclave",
        description="Nitro Enclaves on one Linux machine: nitro-cli compatible enclave "
        "lifecycle, attestation, a local KMS and confidential ONNX inference.",
    )
    parser.add_argument("--version", action="version", version=f"enclave {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            cast("_Registrar", register)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``enclave`` console script. Returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    handler = cast("Handler", args.func)
    try:
        return handler(args)
    except EnclaveError as exc:
        report = getattr(exc, "cli_report", None)
        print(report() if callable(report) else f"error: {exc}", file=sys.stderr)
        code = getattr(exc, "exit_code", 1)
        return code if isinstance(code, int) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
