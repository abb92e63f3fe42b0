"""models/ errors.

::

    transport.errors.EnclaveError
    └── ModelError                    models/: sealed files, the inference server and client
        ├── SealedFormatError         a sealed file is malformed (bad magic, oversized field...)
        │   └── SealedIntegrityError  authentication failed: tampered, truncated, wrong key
        ├── ModelLoadError            a model cannot be loaded by onnxruntime / its key was denied
        ├── ModelNotFoundError        no such model in the catalog            ("not_found")
        ├── ModelUnavailableError     the model is configured but not loaded  ("unavailable")
        ├── InvalidInputError         a request does not match the signature  ("invalid_argument")
        ├── InferenceTimeoutError     a deadline passed: the model run, an    ("deadline_exceeded")
        │                             unread answer or an idle stream on the server, or the
        │                             client's own wait for an answer
        ├── OverloadedError           a concurrency or memory limit is      ("resource_exhausted")
        │                             reached; retry later
        └── InferenceError            onnxruntime failed, or the server reported an error

Server-side errors carry a stable ``code`` that travels as the RPC per-stream error code; the
client maps codes back to these classes (:func:`error_from_code`).
"""

from __future__ import annotations

from typing import ClassVar

from transport.errors import EnclaveError

__all__ = [
    "ModelError",
    "SealedFormatError",
    "SealedIntegrityError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "InvalidInputError",
    "InferenceTimeoutError",
    "OverloadedError",
    "InferenceError",
    "error_from_code",
]


class ModelError(EnclaveError):
    """Root of models/' errors."""

    #: Wire code used when this error ends an RPC stream. A refinement of a base code (such
    #: as ``"invalid_argument.too_many_texts"``) names a subclass; a client that does not know
    #: it maps it to the base code's class.
    code: ClassVar[str] = "internal"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "." in cls.code:
            _REFINED.setdefault(cls.code, cls)


class SealedFormatError(ModelError):
    """A sealed model file is malformed: wrong magic or version, a field out of bounds."""

    code = "invalid_argument"


class SealedIntegrityError(SealedFormatError):
    """A sealed model failed authentication (tampered header or body, truncated, wrong key).

    Deliberately uninformative, like ``cryptography.exceptions.InvalidTag``.
    """

    def __init__(self, message: str = "sealed model failed authentication") -> None:
        super().__init__(message)


class ModelLoadError(ModelError):
    """A model could not be loaded (not a valid ONNX model, key release denied, digest mismatch)."""

    code = "unavailable"


class ModelNotFoundError(ModelError):
    """The requested model is not in the server's catalog."""

    code = "not_found"


class ModelUnavailableError(ModelError):
    """The model is configured but could not be loaded (for example its key was denied)."""

    code = "unavailable"


class InvalidInputError(ModelError, ValueError):
    """A request's tensors do not match the model's signature, or exceed a size cap."""

    code = "invalid_argument"


class InferenceTimeoutError(ModelError):
    """A deadline passed: on the server, a model run (terminated), answers the client did not
    read or a stream left without input; on the client, its wait for an answer."""

    code = "deadline_exceeded"


class OverloadedError(ModelError):
    """A concurrency limit or the server's buffers are full; retry later."""

    code = "resource_exhausted"


class InferenceError(ModelError):
    """onnxruntime failed on a request, or the server reported an error we have no class for."""

    code = "internal"


_BY_CODE: dict[str, type[ModelError]] = {
    "not_found": ModelNotFoundError,
    "unavailable": ModelUnavailableError,
    "invalid_argument": InvalidInputError,
    "deadline_exceeded": InferenceTimeoutError,
    "resource_exhausted": OverloadedError,
}


#: Refined codes -> their classes (filled as subclasses are defined, see ModelError).
_REFINED: dict[str, type[ModelError]] = {}


def error_from_code(code: str, message: str) -> ModelError:
    """The client-side error for a server's per-stream error ``code``: the class of a refined
    code when it is known here (``"invalid_argument.too_many_texts"``), else the class of its
    base (``"invalid_argument"``), else :class:`InferenceError`."""
    cls = _REFINED.get(code) or _BY_CODE.get(code.split(".", 1)[0], InferenceError)
    return cls(f"{message} [{code}]")
