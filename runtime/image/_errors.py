"""Errors of the image layer, re-exported by :mod:`runtime.eif`.

::

    NitroCliError (runtime.errors)   renders "[ Exx ] message", exit status = xx
    └─ EifError                      anything wrong with an image or its inputs
       ├─ EifFormatError      E35    not a valid EIF / ramdisk (EifParsingError)
       ├─ EifBuildError       E48    build-enclave could not build (EifBuildingError)
       ├─ EifSignatureError   E59    signature does not verify (EIFSignatureCheckerError)
       ├─ EifSigningError     E60    signing failed: bad key/certificate (EIFSigningError)
       └─ ImageTamperedError  E36    unpacked tree differs from its image (EnclaveBootFailure)

Some operations raise a plain :class:`EifError` with another code: E19 (FileOperationFailure)
for unreadable inputs / unwritable outputs, E03 (InvalidArgument) for a bad ``cmd``/``env``.

Codes follow ``reference/nitro.md`` §1.6 (nitro-cli's ``document_errors.rs``).
"""

from __future__ import annotations

from typing import ClassVar

from runtime.errors import NitroCliError

__all__ = [
    "EifError",
    "EifFormatError",
    "EifBuildError",
    "EifSignatureError",
    "EifSigningError",
    "ImageTamperedError",
]


class EifError(NitroCliError):
    """Base of every image error; ``code`` defaults to the class's nitro-cli code."""

    default_code: ClassVar[str] = "E35"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(code or self.default_code, message)


class EifFormatError(EifError):
    """The bytes are not a well-formed image (bad magic, sizes, offsets, CRC, ramdisk, ...)."""

    default_code = "E35"  # EifParsingError


class EifBuildError(EifError):
    """An image could not be built from the given inputs."""

    default_code = "E48"  # EifBuildingError


class EifSignatureError(EifError):
    """A signed image's signature section does not verify against its PCR0."""

    default_code = "E59"  # EIFSignatureCheckerError


class EifSigningError(EifError):
    """Signing failed: unreadable or unsupported key/certificate, or a key/cert mismatch."""

    default_code = "E60"  # EIFSigningError


class ImageTamperedError(EifError):
    """An unpacked image tree is not what its EIF measured; the enclave must not start."""

    default_code = "E36"  # EnclaveBootFailure
