"""Errors of the image layer, re-exported by :mod:`runtime.eif`.

Each is an :class:`EifError` (anything wrong with an image or its inputs) *and* the typed
nitro-cli failure of :mod:`runtime.errors` it reports as, so callers catch either view::

    EifError                                          anything wrong with an image or its inputs
    ├─ EifFormatError      (EifParsingError)   E35    not a valid EIF / ramdisk
    ├─ EifBuildError       (EifBuildingError)  E48    build-enclave could not build
    ├─ EifSignatureError   (SignatureCheckError) E59  signature does not verify
    ├─ EifSigningError     (SigningError)      E60    bad key/certificate, or a mismatch
    ├─ ImageTamperedError  (EnclaveBootError)  E36    unpacked tree differs from its image
    ├─ EifFileError        (FileOperationError) E19   unreadable input, unwritable output
    ├─ EifArgumentError    (InvalidArgumentError) E03 a bad ``cmd``/``env``
    └─ EifMetadataError    (SerdeError)        E17    a metadata file that is not a JSON object

Codes follow ``reference/nitro.md`` §1.6 (nitro-cli's ``document_errors.rs``).
"""

from __future__ import annotations

from runtime.errors import (
    EifBuildingError,
    EifParsingError,
    EnclaveBootError,
    FileOperationError,
    InvalidArgumentError,
    NitroCliError,
    SerdeError,
    SignatureCheckError,
    SigningError,
)

__all__ = [
    "EifError",
    "EifFormatError",
    "EifBuildError",
    "EifSignatureError",
    "EifSigningError",
    "ImageTamperedError",
    "EifFileError",
    "EifArgumentError",
    "EifMetadataError",
]


class EifError(NitroCliError):
    """Base of every image error (the code is the concrete class's)."""

    code = "E35"


class EifFormatError(EifParsingError, EifError):
    """The bytes are not a well-formed image (bad magic, sizes, offsets, CRC, ramdisk, ...)."""


class EifBuildError(EifBuildingError, EifError):
    """An image could not be built from the given inputs (e.g. its entry point is missing)."""


class EifSignatureError(SignatureCheckError, EifError):
    """A signed image's signature section does not verify against its PCR0."""


class EifSigningError(SigningError, EifError):
    """Signing failed: unreadable or unsupported key/certificate, or a key/cert mismatch."""


class ImageTamperedError(EnclaveBootError, EifError):
    """An unpacked image tree is not what its EIF measured; the enclave must not start."""


class EifFileError(FileOperationError, EifError):
    """An image input could not be read, or an output could not be written.
    ``info``: (path, operation), as nitro-cli's E19."""


class EifArgumentError(InvalidArgumentError, EifError):
    """A bad ``cmd`` or ``env`` for an image."""


class EifMetadataError(SerdeError, EifError):
    """A custom metadata file that is not valid JSON, or not a JSON object."""
