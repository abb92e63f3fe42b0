"""runtime's errors, reported the way nitro-cli reports them.

nitro-cli prints ``[ Exx ] <message>`` followed by a help link on stderr and exits with the
numeric part of the code (``reference/nitro.md`` §1.6). :class:`NitroCliError` carries the code
and renders that block through ``cli_report()``, which the ``enclave`` entry point uses.
"""

from __future__ import annotations

from transport.errors import EnclaveError

__all__ = ["RuntimeErrorBase", "NitroCliError", "ERROR_NAMES", "HELP_URL"]

#: Where nitro-cli points users for every code (kept verbatim for compatibility).
HELP_URL = "https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html"

#: nitro-cli's error names by code (``ERROR_CODES`` in document_errors.rs, nitro.md §1.6).
ERROR_NAMES: dict[str, str] = {
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


class NitroCliError(RuntimeErrorBase):
    """An error with a nitro-cli code (``"E26"``); the CLI exits with its number (26)."""

    def __init__(self, code: str, message: str) -> None:
        if len(code) != 3 or code[0] != "E" or not code[1:].isdigit():
            raise ValueError(f"not a nitro-cli error code: {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = int(code[1:])

    def cli_report(self) -> str:
        """The stderr block nitro-cli prints for this error."""
        return (
            f"[ {self.code} ] {self.message}\n\n"
            f"For more details, please visit {HELP_URL}#{self.code}"
        )
