"""The project's error tree.

Every error raised on purpose by enclave-runtime derives from :class:`EnclaveError`, so a caller
can catch "anything this library reports" in one clause while still telling faults apart::

    EnclaveError                      root of the project (this module is the lowest layer)
    ├── ConfigurationError            a config file, flag or argument is invalid (caller's fault)
    │   ├── AddressError              a HOST:PORT or vsock address that does not parse
    │   └── AddressInUse              something already listens there (a busy port)
    ├── TransportError                transport/: addressing, fabric, channel, framing
    │   ├── VsockError
    │   │   └── VsockConnectionRefused    nobody listens there, or policy forbids it
    │   ├── ProtocolError
    │   │   ├── LocalProtocolError        *we* misused the protocol (a bug on this side)
    │   │   └── RemoteProtocolError       the *peer* sent something invalid
    │   │       └── AuthenticationFailed  opaque: the peer learns "failed" and nothing more
    │   ├── ChannelClosed                 the channel was closed (by us or cleanly by the peer)
    │   ├── PeerUnreachable               nothing answered (or a relay could not reach its target)
    │   └── PeerTimeout                   the peer stalled: no answer, or stopped mid-record/stream
    ├── attest.errors.AttestError     attest/ (NSM, documents, verification)
    ├── kms.errors.KmsError           kms/
    ├── models.errors.ModelError      models/
    └── runtime.errors.RuntimeErrorBase   runtime/ (carries nitro-cli's Exx code)

Whose fault it is follows h11: local errors are bugs or misuse on this side, remote errors are the
peer's. Authentication failures deliberately carry no detail in their message (the detail goes to
our log, never to the peer), like ``cryptography.exceptions.InvalidTag``.
"""

from __future__ import annotations

__all__ = [
    "EnclaveError",
    "ConfigurationError",
    "AddressError",
    "AddressInUse",
    "TransportError",
    "VsockError",
    "VsockConnectionRefused",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "AuthenticationFailed",
    "ChannelClosed",
    "PeerUnreachable",
    "PeerTimeout",
]


class EnclaveError(Exception):
    """Root of every error enclave-runtime raises on purpose."""


class ConfigurationError(EnclaveError, ValueError):
    """A configuration file, command-line flag or constructor argument is invalid.

    Raised at load time, before any work starts. It is also a :class:`ValueError` so generic
    argument-checking code treats it as such.
    """


class AddressError(ConfigurationError):
    """A ``HOST:PORT`` (or other address) given by the caller does not parse or is out of range."""


class AddressInUse(ConfigurationError, OSError):
    """The address to listen on is taken (``EADDRINUSE``): choose another port or stop the
    other listener. Also an :class:`OSError`, as the failed ``bind`` was."""


class TransportError(EnclaveError):
    """Base class for errors from the transport layer."""


class VsockError(TransportError):
    """A vsock address is invalid or a vsock operation failed."""


class VsockConnectionRefused(VsockError, ConnectionRefusedError):
    """Nobody listens at the address, or the fabric's policy does not allow this connection.

    Like a real ``AF_VSOCK`` connect, the two cases are not distinguished to the caller.
    """


class ProtocolError(TransportError):
    """A wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """This side misused the protocol API (for example sent after closing): a bug here."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol (malformed, oversized, out of order)."""


class AuthenticationFailed(RemoteProtocolError):
    """Authentication or integrity failed: a bad tag, a rejected attestation, a truncation.

    The one class for this idea in the project (the secure channel raises it too). ``str()`` is
    intentionally uninformative ("authentication failed"), so nothing about which check failed
    can reach the peer or a user-facing message by accident; :attr:`reason` says which check
    failed, for our own logs only (the code that detects a failure logs it).

    Attributes:
        reason: a short, secret-free description of the failed check ("" if not given).
    """

    def __init__(self, reason: str = "") -> None:
        super().__init__("authentication failed")
        self.reason = reason


class ChannelClosed(TransportError):
    """The channel or stream was closed; no more data can be sent or received on it."""


class PeerUnreachable(TransportError, ConnectionError):
    """The peer could not be reached: the connection was refused, or it closed (a relay such as
    the ingress could not reach its target) before the peer sent its first handshake byte.

    Nothing was authenticated and nothing was sent, so this is not an attestation failure: a
    client tells the user "enclave unreachable", not "authentication failed".
    """


class PeerTimeout(TransportError, TimeoutError):
    """The peer did not do its part in time: no answer to a call before its deadline, a record
    or frame left half-sent, a stream that stopped mid-way, or a peer that stopped reading.

    Also a :class:`TimeoutError`. The message says what was waited for and for how long.
    """
