"""Streaming RPC framing ``enclave-rpc/1``: msgpack messages on numbered streams over any
trio byte stream (normally the attested :class:`~transport.channel.SecureChannel`).

Layers: ``_core`` is the sans-IO protocol (frames, per-stream state machine, credit flow
control; bytes in, events out); ``_events`` its frozen event dataclasses; ``_trio`` the thin trio
adapter (:func:`open_rpc_client`, :func:`serve_rpc`). The wire format is in transport/RPC.md.

Client::

    async with open_rpc_client(stream) as rpc:
        result = await rpc.call("method", request)
        async with rpc.open_stream("method", {"key": "value"}) as st:
            await st.send(msg)
            await st.send_end()
            async for reply in st:
                ...

Server::

    await serve_rpc(stream, route({"echo": unary(echo), "catalog": unary_inline(catalog)}))
"""

from __future__ import annotations

from transport.rpc._core import (
    DEFAULT_CLOSED_STREAMS_REMEMBERED as DEFAULT_CLOSED_STREAMS_REMEMBERED,
)
from transport.rpc._core import DEFAULT_MAX_MESSAGE_SIZE as DEFAULT_MAX_MESSAGE_SIZE
from transport.rpc._core import DEFAULT_MAX_STREAMS as DEFAULT_MAX_STREAMS
from transport.rpc._core import FLAG_END as FLAG_END
from transport.rpc._core import HEADER as HEADER
from transport.rpc._core import HEADER_SIZE as HEADER_SIZE
from transport.rpc._core import INITIAL_WINDOW_BYTES as INITIAL_WINDOW_BYTES
from transport.rpc._core import INITIAL_WINDOW_MESSAGES as INITIAL_WINDOW_MESSAGES
from transport.rpc._core import MAX_CONTROL_PAYLOAD as MAX_CONTROL_PAYLOAD
from transport.rpc._core import MAX_METADATA_ENTRIES as MAX_METADATA_ENTRIES
from transport.rpc._core import MAX_METHOD_LENGTH as MAX_METHOD_LENGTH
from transport.rpc._core import MAX_STREAM_ID as MAX_STREAM_ID
from transport.rpc._core import PROTOCOL_NAME as PROTOCOL_NAME
from transport.rpc._core import CoreStatistics as CoreStatistics
from transport.rpc._core import FrameType as FrameType
from transport.rpc._core import Role as Role
from transport.rpc._core import RpcConnection as RpcConnection
from transport.rpc._core import StreamCredit as StreamCredit
from transport.rpc._core import StreamInput as StreamInput
from transport.rpc._core import StreamState as StreamState
from transport.rpc._errors import RpcError as RpcError
from transport.rpc._events import ConnectionEnded as ConnectionEnded
from transport.rpc._events import Event as Event
from transport.rpc._events import GoAwayReceived as GoAwayReceived
from transport.rpc._events import MessageReceived as MessageReceived
from transport.rpc._events import PongReceived as PongReceived
from transport.rpc._events import StreamCancelled as StreamCancelled
from transport.rpc._events import StreamEnded as StreamEnded
from transport.rpc._events import StreamErrored as StreamErrored
from transport.rpc._events import StreamOpened as StreamOpened
from transport.rpc._events import WindowUpdated as WindowUpdated
from transport.rpc._trio import CLOSE_TIMEOUT_S as CLOSE_TIMEOUT_S
from transport.rpc._trio import RECEIVE_SIZE as RECEIVE_SIZE
from transport.rpc._trio import EndOfStream as EndOfStream
from transport.rpc._trio import Handler as Handler
from transport.rpc._trio import InlineFunction as InlineFunction
from transport.rpc._trio import InlineUnary as InlineUnary
from transport.rpc._trio import Router as Router
from transport.rpc._trio import RpcClient as RpcClient
from transport.rpc._trio import RpcServerConnection as RpcServerConnection
from transport.rpc._trio import RpcStatistics as RpcStatistics
from transport.rpc._trio import RpcStream as RpcStream
from transport.rpc._trio import open_rpc_client as open_rpc_client
from transport.rpc._trio import route as route
from transport.rpc._trio import serve_rpc as serve_rpc
from transport.rpc._trio import unary as unary
from transport.rpc._trio import unary_inline as unary_inline

__all__ = [
    # trio API
    "open_rpc_client",
    "serve_rpc",
    "RpcClient",
    "RpcServerConnection",
    "RpcStream",
    "RpcStatistics",
    "EndOfStream",
    "Handler",
    "unary",
    "unary_inline",
    "route",
    "Router",
    "InlineUnary",
    "InlineFunction",
    "RpcError",
    # sans-IO core
    "RpcConnection",
    "Role",
    "StreamState",
    "StreamInput",
    "StreamCredit",
    "CoreStatistics",
    "FrameType",
    "Event",
    "StreamOpened",
    "MessageReceived",
    "StreamEnded",
    "StreamCancelled",
    "StreamErrored",
    "WindowUpdated",
    "GoAwayReceived",
    "PongReceived",
    "ConnectionEnded",
    # constants
    "PROTOCOL_NAME",
    "HEADER",
    "HEADER_SIZE",
    "FLAG_END",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_CLOSED_STREAMS_REMEMBERED",
    "INITIAL_WINDOW_MESSAGES",
    "INITIAL_WINDOW_BYTES",
    "MAX_CONTROL_PAYLOAD",
    "MAX_METADATA_ENTRIES",
    "MAX_METHOD_LENGTH",
    "MAX_STREAM_ID",
    "RECEIVE_SIZE",
    "CLOSE_TIMEOUT_S",
]


def _fixup_module_metadata() -> None:
    """Show public names as ``transport.rpc.X`` in reprs and tracebacks (trio does the same)."""
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("transport.rpc._"):
            try:
                obj.__module__ = __name__
            except (AttributeError, TypeError):  # e.g. type aliases
                pass


_fixup_module_metadata()
