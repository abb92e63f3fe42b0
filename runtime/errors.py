"""runtime's errors: one class per nitro-cli failure, each carrying its code (h2's ``error_code``
style), rendered the way nitro-cli renders them.

::

    EnclaveError (transport.errors)              the project's root
    └─ RuntimeErrorBase                          anything runtime/ raises
       ├─ UsageError                             a CLI usage error (exit status 2, as clap)
       └─ NitroCliError          E00             a nitro-cli failure; ``code`` is a class attribute
          ├─ MissingArgumentError      E01 (also ValueError: argument misuse from Python)
          ├─ ConflictingArgumentError  E02 (also ValueError)
          ├─ InvalidArgumentError      E03 (also ValueError)
          ├─ ProcessSpawnError         E05
          ├─ EnclaveSocketError        E11  no such enclave id / its socket is unusable
          ├─ InvalidCommandError       E14
          ├─ SerdeError                E17  malformed JSON input (--config, metadata)
          ├─ FileOperationError        E19
          ├─ InvalidCpuConfigurationError E20 (also ValueError)
          ├─ CpuUnavailableError       E21
          ├─ InsufficientCpusError     E22
          ├─ InsufficientMemoryRequestedError E26 (also ValueError)
          ├─ InsufficientMemoryAvailableError E27
          ├─ IoctlError                E29  what the Nitro driver refuses (memory < 64 MiB, CID)
          ├─ EifParsingError           E35
          ├─ EnclaveBootError          E36  (AppNotReadyError and its kinds: --wait-ready)
          ├─ CommandNotExecutedError   E38
          ├─ EnclaveProcessConnectionError E39
          ├─ ConsoleConnectionError    E44
          ├─ EifBuildingError          E48
          ├─ HasherError               E57
          ├─ EnclaveNamingError        E58
          ├─ SignatureCheckError       E59
          └─ SigningError              E60

The image layer's errors (:mod:`runtime.image.errors`) derive from these as well.

nitro-cli prints ``[ Exx ] <the code's fixed description>`` (``get_detailed_info`` in its
``document_errors.rs``), a blank line and the help link, and exits with the number of the code
(``reference/nitro.md`` §1.6). :meth:`NitroCliError.cli_report` prints that layout with the
specific message of this failure between the description and the link. Codes whose description
names the offending argument (E01, E02, E03, E19, E20-E22, E26, E27) take it as ``info``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Final

from transport.errors import EnclaveError

__all__ = [
    "RuntimeErrorBase",
    "UsageError",
    "NitroCliError",
    "MissingArgumentError",
    "ConflictingArgumentError",
    "InvalidArgumentError",
    "ProcessSpawnError",
    "EnclaveSocketError",
    "InvalidCommandError",
    "SerdeError",
    "FileOperationError",
    "InvalidCpuConfigurationError",
    "CpuUnavailableError",
    "InsufficientCpusError",
    "InsufficientMemoryRequestedError",
    "InsufficientMemoryAvailableError",
    "IoctlError",
    "MemoryBelowMinimumError",
    "EifParsingError",
    "EnclaveBootError",
    "AppNotReadyError",
    "AppFailedError",
    "AppExitedError",
    "AppReadyTimeoutError",
    "CommandNotExecutedError",
    "EnclaveProcessConnectionError",
    "ConsoleConnectionError",
    "EifBuildingError",
    "HasherError",
    "EnclaveNamingError",
    "SignatureCheckError",
    "SigningError",
    "error_for_code",
    "error_classes",
    "ERROR_NAMES",
    "HELP_URL",
]

#: Where nitro-cli points users for every code (kept verbatim for compatibility).
HELP_URL: Final = "https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html"

#: nitro-cli's error names by code (``ERROR_CODES`` in document_errors.rs, nitro.md §1.6).
ERROR_NAMES: Final[dict[str, str]] = {
    "E00": "UnspecifiedError",
    "E01": "MissingArgument",
    "E02": "ConflictingArgument",
    "E03": "InvalidArgument",
    "E04": "SocketPairCreationFailure",
    "E05": "ProcessSpawnFailure",
    "E06": "DaemonizeProcessFailure",
    "E07": "ReadFromDiskFailure",
    "E08": "UnusableConnectionError",
    "E09": "SocketCloseError",
    "E10": "SocketConnectTimeoutError",
    "E11": "SocketError",
    "E12": "EpollError",
    "E13": "InotifyError",
    "E14": "InvalidCommand",
    "E15": "LockAcquireFailure",
    "E16": "ThreadJoinFailure",
    "E17": "SerdeError",
    "E18": "FilePermissionsError",
    "E19": "FileOperationFailure",
    "E20": "InvalidCpuConfiguration",
    "E21": "NoSuchCpuAvailableInPool",
    "E22": "InsufficientCpus",
    "E23": "MalformedCpuId",
    "E24": "CpuError",
    "E25": "NoSuchHugepageFlag",
    "E26": "InsufficientMemoryRequested",
    "E27": "InsufficientMemoryAvailable",
    "E28": "InvalidEnclaveFd",
    "E29": "IoctlFailure",
    "E30": "IoctlImageLoadInfoFailure",
    "E31": "IoctlSetMemoryRegionFailure",
    "E32": "IoctlAddVcpuFailure",
    "E33": "IoctlEnclaveStartFailure",
    "E34": "MemoryOverflow",
    "E35": "EifParsingError",
    "E36": "EnclaveBootFailure",
    "E37": "EnclaveEventWaitError",
    "E38": "EnclaveProcessCommandNotExecuted",
    "E39": "EnclaveProcessConnectionFailure",
    "E40": "SocketPathNotFound",
    "E41": "EnclaveProcessSendReplyFailure",
    "E42": "EnclaveMmapError",
    "E43": "EnclaveMunmapError",
    "E44": "EnclaveConsoleConnectionFailure",
    "E45": "EnclaveConsoleReadError",
    "E46": "EnclaveConsoleWriteOutputError",
    "E47": "IntegerParsingError",
    "E48": "EifBuildingError",
    "E49": "DockerImageBuildError",
    "E50": "DockerImagePullError",
    "E51": "ArtifactsPathNotSet",
    "E52": "BlobsPathNotSet",
    "E53": "ClockSkewError",
    "E54": "SignalMaskingError",
    "E55": "SignalUnmaskingError",
    "E56": "LoggerError",
    "E57": "HasherError",
    "E58": "EnclaveNamingError",
    "E59": "EIFSignatureCheckerError",
    "E60": "EIFSigningError",
}


class RuntimeErrorBase(EnclaveError):
    """Base class of runtime/'s errors."""

    #: Process exit status when this error ends a CLI command.
    exit_code: int = 1


class UsageError(RuntimeErrorBase):
    """A command-line usage error (a missing or conflicting flag): exit status 2, as clap and
    argparse; the CLI prints it as one ``error:`` line."""

    exit_code = 2

    def cli_report(self) -> str:
        """One line on stderr."""
        return f"error: {self}"


class NitroCliError(RuntimeErrorBase):
    """A failure with a nitro-cli code; each subclass carries its own code.

    Args:
        message: what went wrong here (the specific message; logged and shown after the
            code's fixed description).
        info: the arguments nitro-cli's description of this code names (e.g. for E03 the
            parameter and its value: ``("cpu-count", "1z")``); optional.
    """

    #: The nitro-cli code (``"E36"``); the CLI exits with its number.
    code: ClassVar[str] = "E00"
    #: The code's fixed description: the first line nitro-cli prints after ``[ Exx ]``.
    #: ``{0}``, ``{1}``... are filled from ``info`` (see :attr:`generic` without it).
    description: ClassVar[str] = (
        "Unspecified error. This is used as a catch-all error and should not be used in the code."
    )
    #: The description when no ``info`` is given (for codes whose description has fields).
    generic: ClassVar[str | None] = None

    def __init__(self, message: str, *, info: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.info: tuple[str, ...] = tuple(str(i) for i in info)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if len(cls.code) != 3 or cls.code[0] != "E" or not cls.code[1:].isdigit():
            raise TypeError(f"{cls.__name__}: not a nitro-cli error code: {cls.code!r}")
        # nitro-cli exits with the number of the code (``exit(err.error_code as i32)``)
        cls.exit_code = int(cls.code[1:])

    @property
    def error_code(self) -> str:
        """Alias of :attr:`code` (h2's name)."""
        return self.code

    def detailed_info(self) -> str:
        """The code's fixed description, with this error's ``info`` filled in."""
        fields = self.description.count("{")
        if fields and len(self.info) >= fields:
            return self.description.format(*self.info)
        if fields:
            return self.generic or self.description.split(". ", 1)[0] + "."
        return self.description

    def cli_report(self) -> str:
        """The stderr block: ``[ Exx ] description``, the specific message, the help link."""
        head = f"[ {self.code} ] {self.detailed_info()}"
        body = f"\n{self.message}" if self.message and self.message not in head else ""
        return f"{head}{body}\n\nFor more details, please visit {HELP_URL}#{self.code}"

    def to_json(self) -> dict[str, object]:
        """How the error crosses a process boundary (host daemon, control sockets)."""
        return {"code": self.code, "message": self.message, "info": list(self.info)}

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (self.code, self.message, self.info))


def _rebuild(code: str, message: str, info: Sequence[str]) -> NitroCliError:
    return error_for_code(code, message, info=info)


class MissingArgumentError(NitroCliError, ValueError):
    """A mandatory argument is missing (from the CLI, a --config file, or Python)."""

    code = "E01"
    description = "Missing mandatory argument. User did not provide the `{0}` argument."
    generic = "Missing mandatory argument."


class ConflictingArgumentError(NitroCliError, ValueError):
    """Two arguments that exclude each other were both given."""

    code = "E02"
    description = "Conflicting arguments. User provided both `{0}` and `{1}`."
    generic = "Conflicting arguments."


class InvalidArgumentError(NitroCliError, ValueError):
    """An argument has the wrong type or an invalid value (``--cpu-count 1z``, a reserved CID)."""

    code = "E03"
    description = "Invalid argument provided. The parameter `{0}` is not a valid integer (`{1}`)"
    generic = "Invalid argument provided."


class ProcessSpawnError(NitroCliError):
    """The process that owns enclaves (the host daemon) could not be started."""

    code = "E05"
    description = (
        "Process spawn failure. Such error appears when the main Nitro CLI process fails to "
        "spawn the enclave process, in order to complete a `run-enclave` command."
    )


class EnclaveSocketError(NitroCliError):
    """No enclave has this id (its process socket does not exist), or the socket failed."""

    code = "E11"
    description = (
        "Socket error. This is used as an error for catching any other socket operation "
        "errors not covered by previous custom errors."
    )


class InvalidCommandError(NitroCliError):
    """A request sent to an enclave process was not understood."""

    code = "E14"
    description = (
        "Invalid command. Such error appears when an unknown command and / or unknown "
        "arguments are sent through a socket."
    )


class SerdeError(NitroCliError):
    """A JSON input (a --config file, a metadata file) could not be parsed."""

    code = "E17"
    description = (
        "Serde error. Such error appears when serializing / deserializing a command or "
        "response fails."
    )


class FileOperationError(NitroCliError):
    """A file could not be opened, read, written or created. ``info``: (path, operation)."""

    code = "E19"
    description = (
        "File operation failure. Such error appears when the system fails to perform the "
        "requested file operations, such as opening the EIF file when launching an enclave, or "
        "seeking to a specific offset in the EIF file, or writing to the log file.\n"
        "File: '{0}', failing operation: '{1}'."
    )
    generic = (
        "File operation failure. Such error appears when the system fails to perform the "
        "requested file operations, such as opening the EIF file when launching an enclave, or "
        "seeking to a specific offset in the EIF file, or writing to the log file."
    )


class InvalidCpuConfigurationError(NitroCliError, ValueError):
    """The same CPU id was given more than once. ``info``: (argument, CPUs)."""

    code = "E20"
    description = (
        "Invalid CPU configuration. User provided `{0}` contains same CPU(s) (CPU(s) {1}) "
        "multiple times."
    )
    generic = "Invalid CPU configuration."


class CpuUnavailableError(NitroCliError):
    """A requested CPU is not in the enclave CPU pool, or is in use. ``info``: (argument, CPU)."""

    code = "E21"
    description = (
        "No such CPU available in the pool. User provided `{0}` contains CPU {1}, which is not "
        "available in the pool."
    )
    generic = "No such CPU available in the pool."


class InsufficientCpusError(NitroCliError):
    """More CPUs requested than the pool has free. ``info``: (argument, count)."""

    code = "E22"
    description = (
        "Insufficient CPUs available in the pool. User provided `{0}` is {1}, which is more "
        "than the configured CPU pool size."
    )
    generic = "Insufficient CPUs available in the pool."


class InsufficientMemoryRequestedError(NitroCliError, ValueError):
    """Less memory than the image needs (4x the EIF size), or none. ``info``:
    (argument, MiB requested, MiB needed)."""

    code = "E26"
    description = (
        "Insufficient memory requested. User provided `{0}` is {1} MB, but based on the EIF "
        "file size, the minimum memory should be {2} MB"
    )
    generic = "Insufficient memory requested."


class InsufficientMemoryAvailableError(NitroCliError):
    """The pool cannot fit the request (or the enclave count limit is reached).
    ``info``: (argument, MiB requested)."""

    code = "E27"
    description = (
        "Insufficient memory available. User provided `{0}` is {1} MB, which is more than the "
        "available hugepage memory."
    )
    generic = "Insufficient memory available."


class IoctlError(NitroCliError):
    """What the Nitro driver refuses (``NE_ERR_*``): an invalid CID from --config, memory
    under the 64 MiB minimum."""

    code = "E29"
    description = (
        "Ioctl failure. Such error is used as a general ioctl error and appears whenever an "
        "ioctl fails. In this case, the error backtrace provides detailed information on what "
        "specifically failed during the ioctl."
    )


class MemoryBelowMinimumError(IoctlError, ValueError):
    """Less than the driver's 64 MiB minimum (``NE_ERR_ENCLAVE_MEM_MIN_SIZE``)."""


class EifParsingError(NitroCliError):
    """Not a valid EIF (or not one of ours)."""

    code = "E35"
    description = (
        "EIF file parsing error. Such errors appear when attempting to fill a memory region "
        "with a section of the EIF file, but reading the entire section fails. This might "
        "indicate that the required hugepages are not available."
    )


class EnclaveBootError(NitroCliError):
    """The enclave did not boot: no heartbeat in time, it exited during boot, its image was
    tampered with, or strict isolation refused it. Everything was torn down."""

    code = "E36"
    description = (
        "Enclave boot failure. Such error appears when attempting to receive the `ready` "
        "signal from a freshly booted enclave. It arises in several contexts, for instance, "
        "when the enclave is booted from an invalid EIF file and the enclave process "
        "immediately exits, failing to submit the `ready` signal. In this case, the error "
        "backtrace provides detailed information on what specifically failed during the "
        "enclave boot process."
    )


class AppNotReadyError(EnclaveBootError):
    """``wait_ready``: the enclave booted, but its app did not report READY (our extension,
    ``transport.app_status``). The enclave was terminated. ``detail`` is the app's own words
    (FAILED), or what happened instead."""

    def __init__(self, message: str, *, detail: str = "", info: Sequence[str] = ()) -> None:
        super().__init__(message, info=info)
        self.detail = detail


class AppFailedError(AppNotReadyError):
    """The app reported FAILED; ``detail`` says why (e.g. ``KMS unreachable via (3, 8000)``)."""


class AppExitedError(AppNotReadyError):
    """The app exited (or was killed) before reporting; ``detail`` is the exit reason."""


class AppReadyTimeoutError(AppNotReadyError):
    """The app did not report within the ready timeout."""


class CommandNotExecutedError(NitroCliError):
    """An enclave process could not carry out a request."""

    code = "E38"
    description = (
        "Enclave process command not executed error. Such error appears when at least one "
        "enclave fails to provide the description information."
    )


class EnclaveProcessConnectionError(NitroCliError):
    """The process owning an enclave could not be reached, or gave no usable answer."""

    code = "E39"
    description = (
        "Enclave process connection failure. Such error appears when the enclave manager "
        "fails to connect to at least one enclave process for retrieving the description "
        "information."
    )


class ConsoleConnectionError(NitroCliError):
    """No console: the enclave is not in debug mode, or its console could not be reached."""

    code = "E44"
    description = (
        "Enclave console connection failure. Such error appears when the Nitro CLI process "
        "fails to establish a connection to a running enclave's console."
    )


class EifBuildingError(NitroCliError):
    """An image could not be built."""

    code = "E48"
    description = (
        "EIF building error. Such error appears when trying to build an EIF file. In this "
        "case, the error backtrace provides detailed information on the failure reason."
    )


class HasherError(NitroCliError):
    """A PCR could not be computed (an unusable certificate for ``pcr``)."""

    code = "E57"
    description = (
        "Hasher error. Such error appears when trying to initialize a hasher or write bytes to "
        "it, resulting in a IO error."
    )


class EnclaveNamingError(NitroCliError):
    """No enclave has the given name, or several do."""

    code = "E58"
    description = (
        "Naming error. Such error appears when trying to perform an enclave operation using "
        "the enclave name and the name is invalid."
    )


class SignatureCheckError(NitroCliError):
    """A signed image's signature does not verify."""

    code = "E59"
    description = (
        "EIF signature checker error. Such error appears when the signature of a signed EIF "
        "file cannot be verified against its signing certificate."
    )


class SigningError(NitroCliError):
    """An image could not be signed (unusable key or certificate, or a mismatch)."""

    code = "E60"
    description = (
        "EIF signing error. Such error appears when signing an EIF file fails: the private key "
        "or the signing certificate cannot be used, or they do not belong together."
    )


def error_classes() -> dict[str, type[NitroCliError]]:
    """The class of each code (the first declared, which :func:`error_for_code` rebuilds)."""
    out: dict[str, type[NitroCliError]] = {"E00": NitroCliError}
    todo: list[type[NitroCliError]] = list(NitroCliError.__subclasses__())
    while todo:
        cls = todo.pop(0)
        out.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return out


def error_for_code(code: str, message: str, *, info: Sequence[str] = ()) -> NitroCliError:
    """The typed error for a code received from another process (a daemon's reply).

    Unknown or malformed codes give the base class with code E00 (never raises itself).
    """
    cls = error_classes().get(code)
    if cls is None:
        return NitroCliError(f"{message} (unknown error code {code!r})", info=info)
    return cls(message, info=info)
