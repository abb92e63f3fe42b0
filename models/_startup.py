"""Why the inference server cannot serve, in one line a user can act on.

The server's start-up touches four outside parties (the host store on ``(3, host_port)``, KMS
through the vsock-proxy on ``(3, kms_proxy_port)``, the sealed files, onnxruntime); each can
fail in its own vocabulary (``BrokenResourceError``, ``KmsApiError``, ``InvalidTag``...). This
module turns those into the sentences the operator sees in the app status report
(``transport.app_status``), the host store's log and ``describe-enclaves``: where it failed and
what to check, such as ``"KMS unreachable via (3, 8000)"`` or ``"model key refused by KMS:
AccessDeniedException"``. Only non-secret facts: the host reads these.

Pure (no I/O): :class:`StartupError` carries the detail; :func:`kms_failure`, :func:`store_failure`
and :func:`unseal_failure` classify an exception caught at that step.
"""

from __future__ import annotations

from typing import Final

import trio

from kms.errors import KmsApiError, KmsError
from models.errors import ModelError, ModelLoadError, SealedFormatError, SealedIntegrityError
from transport.errors import RemoteProtocolError, TransportError
from transport.rpc import RpcError

__all__ = [
    "StartupError",
    "CONNECTION_ERRORS",
    "kms_failure",
    "store_failure",
    "unseal_failure",
    "vsock",
]

#: Exceptions that mean "the peer could not be reached or went away" at any step.
CONNECTION_ERRORS: Final = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    TransportError,
)
#: Longest text of a peer's message kept in a detail (one line, not a log dump).
_MAX_QUOTE: Final = 200


class StartupError(ModelLoadError):
    """The server cannot serve a model, or at all; the message is the user-facing detail."""


def vsock(port: int) -> str:
    """``(3, port)``: how details name a parent port."""
    return f"(3, {port})"


def _quote(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_QUOTE else line[: _MAX_QUOTE - 1] + "…"


def kms_failure(exc: BaseException, *, kms_proxy_port: int, timeout_s: float) -> str:
    """The detail for a failed KMS call (the model key's Decrypt)."""
    if isinstance(exc, KmsApiError):
        return f"model key refused by KMS: {exc.type_name}"
    if isinstance(exc, trio.TooSlowError):
        return f"KMS did not answer via {vsock(kms_proxy_port)} within {timeout_s:g} s"
    if isinstance(exc, CONNECTION_ERRORS) and not isinstance(exc, RemoteProtocolError):
        return f"KMS unreachable via {vsock(kms_proxy_port)}"
    if isinstance(exc, KmsError | RemoteProtocolError):
        return f"KMS answer via {vsock(kms_proxy_port)} unusable: {_quote(str(exc))}"
    return f"KMS call via {vsock(kms_proxy_port)} failed: {type(exc).__name__}"


def store_failure(exc: BaseException, *, host_port: int, what: str) -> str:
    """The detail for a failed call to the host store (``what``: "credentials", a model...)."""
    if isinstance(exc, RpcError):
        if exc.code == "not_found":
            return f"the host store on {vsock(host_port)} has no {what}"
        return f"the host store on {vsock(host_port)} refused the {what}: {_quote(exc.message)}"
    if isinstance(exc, trio.TooSlowError):
        return f"model store via {vsock(host_port)} did not answer in time ({what})"
    if isinstance(exc, ModelError):  # a malformed answer
        return f"model store via {vsock(host_port)}: {_quote(str(exc))}"
    return f"model store unreachable via {vsock(host_port)}"


def unseal_failure(exc: BaseException, *, model: str) -> str:
    """The detail for a sealed file that did not open (after its key was released)."""
    if isinstance(exc, SealedIntegrityError):
        return f"sealed model {model!r} failed its integrity check"
    if isinstance(exc, SealedFormatError):
        return f"sealed model {model!r} is malformed: {_quote(str(exc))}"
    return f"sealed model {model!r}: {_quote(str(exc))}"
