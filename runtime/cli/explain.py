"""``enclave explain --error-code Exx``: the long description of a nitro-cli error (on stderr).

As nitro-cli's ``explain_error``: only the description is printed; an unknown code prints
``No such error code X`` and still exits 0.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from runtime.errors import ERROR_NAMES, error_classes

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run", "explanation", "DESCRIPTIONS"]

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
    "arguments provided to the Nitro CLI does not match the expected type of that parameter.\n"
    "\tExample: `enclave run-enclave --cpu-count 1z --memory 80 --eif-path /path/to/my/eif`. In "
    "this case, `cpu-count` is not a valid integer value. Also: an enclave CID that is reserved "
    "or out of range.",
    "E05": "Process spawn failure. The enclave process (the host daemon that owns the CLI's "
    "enclaves) could not be started.",
    "E11": "Socket error. No enclave process has the given enclave id (its socket does not "
    "exist), or the socket failed. Check `enclave describe-enclaves` for the running enclaves.",
    "E14": "Invalid command. A request sent to an enclave process was not understood.",
    "E17": "Serde error. A JSON input (such as a --config file) could not be parsed or lacks a "
    "required field.",
    "E19": "File operation failure. A file (EIF, --config, allocator.yaml) could not be opened "
    "or read.",
    "E20": "Invalid CPU configuration. The same CPU id was given more than once.",
    "E21": "No such CPU available in the pool. A requested CPU is not in the enclave CPU pool "
    "(allocator.yaml in the state directory) or is used by another enclave.",
    "E22": "Insufficient CPUs available in the pool for the requested `cpu-count`.",
    "E26": "Insufficient memory requested. The enclave memory must be at least 4 times the EIF "
    "file size (and more than 0).",
    "E27": "Insufficient memory available. The enclave memory pool (allocator.yaml) cannot "
    "fit the request, or the maximum number of enclaves is running.",
    "E29": "Ioctl failure. The (emulated) driver refused the request: enclave memory under its "
    "64 MiB minimum, or an invalid enclave CID given in a --config file.",
    "E35": "EIF file parsing error. The EIF is malformed, its CRC does not match, or it is not "
    "an enclave-runtime image.",
    "E36": "Enclave boot failure. The enclave did not send its heartbeat or start its app in "
    "time, exited during boot, its unpacked image did not match its measurements, or "
    "strict isolation refused to start it; or, with --wait-ready, its app reported a failure, "
    "exited, or did not report ready in time (the app's own reason is in the message). "
    "Everything was torn down.",
    "E38": "Enclave process command not executed.",
    "E39": "Enclave process connection failure. The process owning the enclave (the host "
    "daemon) could not be reached, or gave no usable answer.",
    "E44": "Enclave console connection failure. The console is only available for enclaves "
    "started in debug mode (--debug-mode or --attach-console).",
    "E48": "EIF building error. The image could not be built from the given app directory and "
    "command: e.g. the command's entry point (`python3 main.py`) is not in the app directory, "
    "or the app tree holds symlinks or special files.",
    "E57": "Hasher error. A PCR could not be computed, e.g. from an unusable signing certificate.",
    "E58": "Enclave naming error: no enclave matched the given name, or several did.",
    "E59": "EIF signature checker error: the EIF's signature does not verify.",
    "E60": "EIF signing error. The image could not be signed: the private key or the signing "
    "certificate is unusable (EC P-256/P-384/P-521 keys only), or they do not belong together, "
    "or `sign-eif` was run without one of --eif-path, --signing-certificate, --private-key.",
}


def register(subparsers: SubParsers) -> None:
    """Add ``explain``."""
    p = subparsers.add_parser("explain", help="explain a nitro-cli error code", allow_abbrev=False)
    p.add_argument("--error-code", metavar="Exx", required=True)
    p.set_defaults(func=run)


def explanation(code: str) -> str | None:
    """The description ``explain`` prints for ``code`` (None for an unknown code)."""
    text = DESCRIPTIONS.get(code)
    if text is not None:
        return text
    cls = error_classes().get(code)
    if cls is not None and cls.code == code:
        return cls.generic or cls.description
    name = ERROR_NAMES.get(code)
    return None if name is None else f"{name}."


def run(args: argparse.Namespace) -> int:
    """Print the description of the code (nitro-cli's exact form: just the text)."""
    code = str(args.error_code)
    text = explanation(code)
    print(text if text is not None else f"No such error code {code}", file=sys.stderr)
    return 0
