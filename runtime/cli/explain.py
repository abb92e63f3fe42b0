"""``enclave explain --error-code Exx``: the long description of a nitro-cli error (on stderr)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from runtime.errors import ERROR_NAMES, HELP_URL, NitroCliError

if TYPE_CHECKING:
    from runtime.cli import SubParsers

#: Descriptions, after nitro-cli's document_errors.rs, for the codes this runtime raises.
DESCRIPTIONS: dict[str, str] = {
    "E00": "Unspecified error. This is used as a catch-all error and should not be used in the "
    "code.",
    "E01": "Missing mandatory argument. Such error appears when the Nitro CLI is requested to "
    "perform an operation, but not all of the mandatory arguments were supplied or could "
    "be inferred (e.g. neither `cpu-count` nor `cpu-ids` in a --config file).",
    "E02": "Conflicting arguments. Such error appears when the Nitro CLI is supplied two "
    "contradicting arguments at the same time, such as `cpu-count` and `cpu-ids`.",
    "E03": "Invalid argument provided. Such error appears when the type of at least one of the "
    "arguments provided to the Nitro CLI does not match the expected type (e.g. a "
    "non-numeric `memory`), or an enclave CID is reserved or out of range.",
    "E05": "Process spawn failure. The enclave process (the per-enclave supervisor) could not "
    "be started.",
    "E14": "Invalid command. A request sent to an enclave process was not understood.",
    "E17": "Serde error. A JSON input (such as a --config file) could not be parsed or lacks a "
    "required field.",
    "E19": "File operation failure. A file (EIF, --config, allocator.yaml) could not be opened "
    "or read.",
    "E20": "Invalid CPU configuration. The same CPU id was given more than once.",
    "E21": "No such CPU available in the pool. A requested CPU is not in the enclave CPU pool "
    "(allocator.yaml in the state directory) or is used by another enclave.",
    "E22": "Insufficient CPUs available in the pool for the requested `cpu-count`.",
    "E26": "Insufficient memory requested. The memory must be at least 64 MiB and at least 4 "
    "times the EIF file size.",
    "E27": "Insufficient memory available. The enclave memory pool (allocator.yaml) cannot "
    "fit the request, or the maximum number of enclaves is running.",
    "E29": "Ioctl failure. The (emulated) driver refused the request, e.g. an invalid enclave "
    "CID given in a --config file.",
    "E35": "EIF file parsing error. The EIF is malformed, its CRC does not match, or it is not "
    "an enclave-runtime image.",
    "E36": "Enclave boot failure. The enclave did not send its heartbeat or start its app in "
    "time, exited during boot, its unpacked image did not match its measurements, or "
    "strict isolation refused to start it. Everything was torn down.",
    "E38": "Enclave process command not executed.",
    "E39": "Enclave process connection failure. The enclave process of the given enclave could "
    "not be reached (no such enclave, or it is gone).",
    "E44": "Enclave console connection failure. The console is only available for enclaves "
    "started in debug mode (--debug-mode or --attach-console).",
    "E58": "Enclave naming error: no enclave matched the given name, or several did.",
    "E59": "EIF signature checker error: the EIF's signature does not verify.",
}


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("explain", help="explain a nitro-cli error code")
    p.add_argument("--error-code", metavar="Exx", required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    code = str(args.error_code).strip().upper()
    text = DESCRIPTIONS.get(code)
    if text is None:
        name = ERROR_NAMES.get(code)
        if name is None:
            raise NitroCliError("E03", f"Invalid argument provided: unknown error code {code}")
        text = f"{name}."
    print(f"{code}: {text}\n\nFor more details, please visit {HELP_URL}#{code}", file=sys.stderr)
    return 0
