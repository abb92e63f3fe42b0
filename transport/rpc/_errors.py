"""Errors of the RPC layer (see :mod:`transport.rpc`)."""

from __future__ import annotations

import re
from typing import Final

from transport.errors import TransportError

__all__ = ["RpcError", "MAX_CODE_LENGTH", "MAX_ERROR_MESSAGE_LENGTH", "validate_code"]

#: Longest error code on the wire, in characters; codes are short identifiers like "not_found".
MAX_CODE_LENGTH: Final = 64
#: Longest error message on the wire, in characters; longer messages are truncated when sent.
#: A message is for a human reading a log, not a transport for data.
MAX_ERROR_MESSAGE_LENGTH: Final = 1024

_CODE_RE: Final = re.compile(r"[a-z][a-z0-9_.\-]{0,63}")


def validate_code(code: str) -> str:
    """Return ``code`` if it is a well-formed error code, else raise :class:`ValueError`."""
    if not isinstance(code, str) or _CODE_RE.fullmatch(code) is None:
        raise ValueError(f"RPC error code must match [a-z][a-z0-9_.-]{{0,63}}, got {code!r}")
    return code


class RpcError(TransportError):
    """A per-stream error: the stream failed, the connection is still usable.

    Raised on the client when the server's handler failed (``raise RpcError(code, message)`` in
    the handler, or ``"internal"`` for any other exception), when a stream was cancelled by
    either side (``"cancelled"``), or refused (``"resource_exhausted"``, ``"unavailable"``).
    Raise it in a server handler to send ``code`` and ``message`` to the client.

    It derives from :class:`~transport.errors.TransportError`, not from
    :class:`~transport.errors.RemoteProtocolError`: an error reported by the peer's
    *application* on one stream is not a violation of the wire protocol, and code that tears
    down a connection on ``RemoteProtocolError`` must not do so for it.

    Well-known codes: ``cancelled``, ``internal``, ``invalid_argument``, ``not_found``,
    ``unimplemented``, ``unavailable``, ``resource_exhausted``, ``deadline_exceeded``,
    ``permission_denied``, ``failed_precondition``.

    Attributes:
        code: a short machine-readable identifier, ``[a-z][a-z0-9_.-]{0,63}``.
        message: a human-readable explanation (at most 1024 characters on the wire).
    """

    def __init__(self, code: str, message: str) -> None:
        self.code: str = validate_code(code)
        self.message: str = str(message)
        super().__init__(f"[{self.code}] {self.message}")

    def __reduce__(self) -> tuple[type[RpcError], tuple[str, str]]:
        return (type(self), (self.code, self.message))
