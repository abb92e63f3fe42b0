"""``enclave-channel/1``: the attested secure channel between a client and an enclave (or,
attested both ways, between two enclaves).

Layers (wire format in ``transport/PROTOCOL.md``):
    _types.py       value types: Suite, PeerAttestation, Attester and DocumentVerifier protocols
    _record.py      the only hazmat user: AES-256-GCM records, HKDF key schedule, HPKE seal/open
    _connection.py  sans-IO core (h11 style): framing, handshake state machine, events
    _trio.py        thin trio adapter: SecureChannel, connect_channel, accept_channel
"""

from __future__ import annotations

from transport._exports import fixup_module_metadata
from transport.channel._connection import CLIENT_USER_DATA_PREFIX as CLIENT_USER_DATA_PREFIX
from transport.channel._connection import MAX_DOCUMENT_SIZE as MAX_DOCUMENT_SIZE
from transport.channel._connection import MAX_FRAME_SIZE as MAX_FRAME_SIZE
from transport.channel._connection import NEED_DATA as NEED_DATA
from transport.channel._connection import NONCE_SIZE as NONCE_SIZE
from transport.channel._connection import PROTOCOL_NAME as PROTOCOL_NAME
from transport.channel._connection import PROTOCOL_VERSION as PROTOCOL_VERSION
from transport.channel._connection import USER_DATA_PREFIX as USER_DATA_PREFIX
from transport.channel._connection import Attestation as Attestation
from transport.channel._connection import AttestationRequest as AttestationRequest
from transport.channel._connection import ChannelConnection as ChannelConnection
from transport.channel._connection import ChannelEstablished as ChannelEstablished
from transport.channel._connection import ClientConnection as ClientConnection
from transport.channel._connection import Close as Close
from transport.channel._connection import Data as Data
from transport.channel._connection import Event as Event
from transport.channel._connection import Hello as Hello
from transport.channel._connection import Role as Role
from transport.channel._connection import ServerConnection as ServerConnection
from transport.channel._connection import State as State
from transport.channel._record import DEFAULT_MAX_RECORDS as DEFAULT_MAX_RECORDS
from transport.channel._record import MAX_RECORD_PLAINTEXT as MAX_RECORD_PLAINTEXT
from transport.channel._trio import HANDSHAKE_TIMEOUT_S as HANDSHAKE_TIMEOUT_S
from transport.channel._trio import SOCKET_BUFFER_SIZE as SOCKET_BUFFER_SIZE
from transport.channel._trio import ChannelStatistics as ChannelStatistics
from transport.channel._trio import SecureChannel as SecureChannel
from transport.channel._trio import accept_channel as accept_channel
from transport.channel._trio import connect_channel as connect_channel
from transport.channel._types import Attester as Attester
from transport.channel._types import DocumentVerifier as DocumentVerifier
from transport.channel._types import PeerAttestation as PeerAttestation
from transport.channel._types import Suite as Suite

__all__ = [
    # trio API
    "connect_channel",
    "accept_channel",
    "SecureChannel",
    "ChannelStatistics",
    "HANDSHAKE_TIMEOUT_S",
    "SOCKET_BUFFER_SIZE",
    # injected callables and value types
    "Attester",
    "DocumentVerifier",
    "PeerAttestation",
    "Suite",
    # sans-IO core
    "ChannelConnection",
    "ClientConnection",
    "ServerConnection",
    "Role",
    "State",
    "Event",
    "Hello",
    "AttestationRequest",
    "Attestation",
    "ChannelEstablished",
    "Data",
    "Close",
    "NEED_DATA",
    # protocol constants
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "NONCE_SIZE",
    "MAX_DOCUMENT_SIZE",
    "MAX_FRAME_SIZE",
    "MAX_RECORD_PLAINTEXT",
    "DEFAULT_MAX_RECORDS",
    "USER_DATA_PREFIX",
    "CLIENT_USER_DATA_PREFIX",
]

fixup_module_metadata(__name__, globals())
