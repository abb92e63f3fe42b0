"""Enclave to enclave: the parent's relay, its allowlist, and the enclave-side peer API.

On Nitro an enclave reaches only its parent (CID 3), so enclaves talk to each other through a
relay on the parent that sees ciphertext only; the two enclaves attest to each other
(``enclave-channel/1`` mutual mode). Layers (``transport/RELAY.md`` specifies the wire format):

    _wire.py     ``enclave-relay/1`` request and reply (pure)
    _rules.py    the allowlist: ``FROM=TO:PORT`` rules, replica groups (pure)
    _errors.py   RelayRefused and its kinds (denied, not found, not listening, busy)
    _service.py  the parent side: serve_peer_relay
    _enclave.py  the enclave side: open_peer_channel, serve_peer_channels
"""

from __future__ import annotations

from transport._exports import fixup_module_metadata
from transport.peers._enclave import CONNECT_TIMEOUT_S as CONNECT_TIMEOUT_S
from transport.peers._enclave import DEFAULT_MAX_CHANNELS as DEFAULT_MAX_CHANNELS
from transport.peers._enclave import DEFAULT_MAX_HANDSHAKES as DEFAULT_MAX_HANDSHAKES
from transport.peers._enclave import PEER_SUITES as PEER_SUITES
from transport.peers._enclave import PeerHandler as PeerHandler
from transport.peers._enclave import open_peer_channel as open_peer_channel
from transport.peers._enclave import open_relayed_stream as open_relayed_stream
from transport.peers._enclave import serve_peer_channels as serve_peer_channels
from transport.peers._errors import PeerAccessDenied as PeerAccessDenied
from transport.peers._errors import PeerNotFound as PeerNotFound
from transport.peers._errors import PeerNotListening as PeerNotListening
from transport.peers._errors import RelayBusy as RelayBusy
from transport.peers._errors import RelayProtocolError as RelayProtocolError
from transport.peers._errors import RelayRefused as RelayRefused
from transport.peers._rules import MAX_RULES as MAX_RULES
from transport.peers._rules import EnclaveEntry as EnclaveEntry
from transport.peers._rules import EnclaveRef as EnclaveRef
from transport.peers._rules import RelayPolicy as RelayPolicy
from transport.peers._rules import RelayRule as RelayRule
from transport.peers._rules import in_group as in_group
from transport.peers._rules import parse_rule as parse_rule
from transport.peers._service import DEFAULT_MAX_CONNECTIONS as DEFAULT_MAX_CONNECTIONS
from transport.peers._service import DEFAULT_MAX_PER_SOURCE as DEFAULT_MAX_PER_SOURCE
from transport.peers._service import DEFAULT_RELAY_PORT as DEFAULT_RELAY_PORT
from transport.peers._service import EnclaveDirectory as EnclaveDirectory
from transport.peers._service import StaticDirectory as StaticDirectory
from transport.peers._service import serve_peer_relay as serve_peer_relay
from transport.peers._wire import MAX_NAME as MAX_NAME
from transport.peers._wire import RelayRequest as RelayRequest
from transport.peers._wire import RelayStatus as RelayStatus
from transport.peers._wire import RequestReader as RequestReader
from transport.peers._wire import TargetKind as TargetKind
from transport.peers._wire import decode_reply as decode_reply
from transport.peers._wire import encode_reply as encode_reply

__all__ = [
    # enclave side
    "open_peer_channel",
    "open_relayed_stream",
    "serve_peer_channels",
    "PeerHandler",
    "PEER_SUITES",
    "CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_HANDSHAKES",
    "DEFAULT_MAX_CHANNELS",
    # parent side
    "serve_peer_relay",
    "EnclaveDirectory",
    "StaticDirectory",
    "DEFAULT_RELAY_PORT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PER_SOURCE",
    # the allowlist
    "RelayPolicy",
    "RelayRule",
    "EnclaveRef",
    "EnclaveEntry",
    "parse_rule",
    "in_group",
    "MAX_RULES",
    # errors
    "RelayRefused",
    "PeerAccessDenied",
    "PeerNotFound",
    "PeerNotListening",
    "RelayBusy",
    "RelayProtocolError",
    # wire format
    "RelayRequest",
    "RelayStatus",
    "TargetKind",
    "RequestReader",
    "encode_reply",
    "decode_reply",
    "MAX_NAME",
]

fixup_module_metadata(__name__, globals())
