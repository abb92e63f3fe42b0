"""Errors of the enclave-to-enclave relay, as the enclave that asked for a peer sees them.

``RelayRefused`` is the root: the parent's relay answered, and said no. Which no matters to the
caller: ``PeerAccessDenied`` (no allowlist rule lets this enclave reach that port of that
enclave: ask the operator), ``PeerNotFound`` and ``PeerNotListening`` (nothing to talk to: try
later; both are also :class:`~transport.errors.PeerUnreachable`), ``RelayBusy`` (the relay's
connection slots are full). A relay that breaks its own protocol is ``RelayProtocolError``.
"""

from __future__ import annotations

from typing import ClassVar

from transport.errors import PeerUnreachable, RemoteProtocolError, TransportError
from transport.peers._wire import RelayStatus

__all__ = [
    "RelayRefused",
    "PeerAccessDenied",
    "PeerNotFound",
    "PeerNotListening",
    "RelayBusy",
    "RelayProtocolError",
    "refusal_for",
]


class RelayRefused(TransportError):
    """The parent's relay refused to connect this enclave to the peer it asked for."""

    status: ClassVar[RelayStatus] = RelayStatus.MALFORMED


class PeerAccessDenied(RelayRefused):
    """No rule of the relay's allowlist lets this enclave reach that port of that enclave."""

    status = RelayStatus.DENIED


class PeerNotFound(RelayRefused, PeerUnreachable):
    """No running enclave has that name or CID."""

    status = RelayStatus.NOT_FOUND


class PeerNotListening(RelayRefused, PeerUnreachable):
    """The peer enclave runs, but nothing listens on that port (or it could not be reached)."""

    status = RelayStatus.UNREACHABLE


class RelayBusy(RelayRefused):
    """The relay has no free connection slot (overall, or for this enclave)."""

    status = RelayStatus.BUSY


class RelayProtocolError(RelayRefused, RemoteProtocolError):
    """The relay's answer (or, as the relay saw it, our request) broke ``enclave-relay/1``."""

    status = RelayStatus.MALFORMED


_BY_STATUS: dict[RelayStatus, type[RelayRefused]] = {
    cls.status: cls
    for cls in (PeerAccessDenied, PeerNotFound, PeerNotListening, RelayBusy, RelayProtocolError)
}


def refusal_for(status: RelayStatus, message: str) -> RelayRefused:
    """The typed error for a refusal ``status``."""
    return _BY_STATUS.get(status, RelayProtocolError)(message)
