"""The ``enclave`` command: nitro-cli's subcommands plus this project's own.

Layout follows qtile's ``scripts/``: each subcommand lives in its own module of this package and
exposes ``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking the
parsed ``argparse.Namespace`` and returning the exit status). Modules are discovered at start, so
adding a subcommand is adding a file.

Output conventions (nitro-cli): machine-readable JSON on stdout, progress and logs on stderr.

Errors (the safety net in :func:`main`): whatever a subcommand raises ends as one line on
stderr starting ``error:`` and a non-zero exit status, never a traceback:

* an error that renders itself for the CLI (a ``cli_report()`` method, e.g. nitro-cli's
  ``[ Exx ]`` blocks) prints that, and its ``exit_code`` is the exit status;
* other project errors (:class:`transport.errors.EnclaveError`) print their message;
* ``OSError`` (a refused connection, a busy port, a missing file) prints what the system said,
  with the subcommand that met it;
* Ctrl-C prints ``error: interrupted`` and exits 130;
* anything else is a bug: ``error: internal error: ...`` asks for ``--debug``.

The global ``--debug`` flag (``enclave --debug COMMAND ...``) or ``ENCLAVE_LOG_LEVEL=debug``
adds the traceback. Usage errors print one ``error:`` line and exit 2 (argparse, like clap).
No parser accepts abbreviated options (``--debug`` never means ``--debug-mode``): scripts written
for nitro-cli must not silently mean something else.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn, Protocol, TypeAlias, cast

from transport.errors import EnclaveError
from transport.logs import configure_logging

__all__ = ["main", "build_parser", "Handler", "SubParsers", "EXIT_INTERRUPTED", "EXIT_USAGE"]

Handler = Callable[[argparse.Namespace], int]
#: The object ``register(subparsers)`` receives. (A real alias, not one under
#: ``TYPE_CHECKING``: ``__all__`` names it, so ``from runtime.cli import *`` must find it.)
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: Exit status after Ctrl-C (128 + SIGINT, the shell's convention).
EXIT_INTERRUPTED: Final = 130
#: Exit status of a usage error (argparse's and clap's).
EXIT_USAGE: Final = 2
#: Exit status when stdout was closed early (128 + SIGPIPE, as a shell pipeline reports it).
_EXIT_BROKEN_PIPE: Final = 141
#: The namespace attribute naming the parser that parsed the command (``enclave kms serve``).
_PROG_ATTR: Final = "_enclave_prog"


class _Registrar(Protocol):
    def __call__(self, subparsers: SubParsers) -> None: ...


class _Parser(argparse.ArgumentParser):
    """Every parser of the ``enclave`` command (subparsers inherit the class): abbreviations
    refused, usage errors on one ``error:`` line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False  # forced: a subcommand cannot turn them back on
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        if not hasattr(parsed, _PROG_ATTR):  # the innermost subparser finishes first
            setattr(parsed, _PROG_ATTR, self.prog)
        return parsed, rest

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # blamed on the subcommand that left them, not on the top level
            _usage_error(
                str(getattr(parsed, _PROG_ATTR, self.prog)),
                f"unrecognized arguments: {' '.join(extras)}",
            )
        return parsed

    def error(self, message: str) -> NoReturn:
        _usage_error(self.prog, message)


def _usage_error(prog: str, message: str) -> NoReturn:
    print(f"error: {prog}: {message} (see '{prog} --help')", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("enclave-runtime")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    """Build the full ``enclave`` parser from every subcommand module of this package."""
    parser = _Parser(
        prog="enclave",
        description="Nitro Enclaves on one Linux machine: nitro-cli compatible enclave "
        "lifecycle, attestation, a local KMS and confidential ONNX inference.",
    )
    parser.add_argument("--version", action="version", version=f"enclave {_version()}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an error (also: ENCLAVE_LOG_LEVEL=debug)",
    )
    # Typed as the subcommands see it (they add ArgumentParsers; the class here is _Parser).
    subparsers = cast("SubParsers", parser.add_subparsers(dest="command", metavar="COMMAND"))
    subparsers.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            cast("_Registrar", register)(subparsers)
    return parser


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _describe_os_error(exc: OSError) -> str:
    """What the system said, with the file or address it said it about."""
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (another process is listening there)"
    text = exc.strerror or str(exc) or type(exc).__name__
    # A file descriptor (an int) names nothing the user knows; paths do.
    names = [os.fsdecode(f) for f in (exc.filename, exc.filename2) if isinstance(f, str | bytes)]
    return f"{' -> '.join(names)}: {text}" if names else text


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _pick(exc: BaseException) -> BaseException:
    """The error to report from ``exc``: itself, or for a group (trio nurseries wrap what
    escapes them) its most telling leaf: ours first, then the system's, then anything."""
    leaves = _leaves(exc)
    for kind in (KeyboardInterrupt, EnclaveError, OSError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0] if leaves else exc


def _report(exc: BaseException, command: str, *, debug: bool) -> int:
    """Print ``exc`` as the CLI reports errors; return the exit status."""
    chosen = _pick(exc)
    if isinstance(chosen, SystemExit):  # sys.exit() inside a nursery
        code = chosen.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    if debug:
        traceback.print_exception(exc)
    if isinstance(chosen, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(chosen, EnclaveError):
        report = getattr(chosen, "cli_report", None)
        if callable(report):
            print(report(), file=sys.stderr)
        else:
            print(f"error: {_one_line(str(chosen)) or type(chosen).__name__}", file=sys.stderr)
        code = getattr(chosen, "exit_code", 1)
        return code if isinstance(code, int) and code != 0 else 1
    if isinstance(chosen, OSError):
        print(f"error: {command}: {_one_line(_describe_os_error(chosen))}", file=sys.stderr)
        return 1
    detail = _one_line(str(chosen))
    what = f"{type(chosen).__name__}: {detail}" if detail else type(chosen).__name__
    hint = "" if debug else " (run with --debug for the traceback)"
    print(f"error: internal error: {command}: {what}{hint}", file=sys.stderr)
    return 1


def _debug_from_env() -> bool:
    return os.environ.get("ENCLAVE_LOG_LEVEL", "").strip().lower() == "debug"


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush does
    not complain (the recipe of Python's ``signal`` documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``enclave`` console script. Returns the process exit status."""
    debug = _debug_from_env()
    command = "enclave"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = debug or bool(args.debug)
        command = str(getattr(args, _PROG_ATTR, "enclave")).removeprefix("enclave ")
        configure_logging()
        handler = cast("Handler", args.func)
        return handler(args)
    except SystemExit:
        raise  # argparse's own exits (usage errors, --help, --version)
    except BrokenPipeError:
        _silence_stdout()
        return _EXIT_BROKEN_PIPE
    except BaseException as exc:  # the safety net: every error ends as one line
        if isinstance(exc, GeneratorExit):
            raise
        return _report(exc, command, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
