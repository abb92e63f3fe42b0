"""Streaming RPC framing ``enclave-rpc/1``: msgpack messages on numbered streams over any
trio byte stream (normally the attested :class:`~transport.channel.SecureChannel`).

Layers (wire format in transport/RPC.md):
    _core.py        sans-IO protocol: frames, per-stream state machine, credit flow control,
                    the connection's buffer budget (bytes in, events out; transport.sansio)
    _events.py      its immutable event classes;   _errors.py  RpcError and error codes
    _stream.py      RpcStream (what applications use) and the endpoint interface it implements
    _connection.py  what client and server share: the coalescing outbox, failure, dispatch
    _client.py      open_rpc_client / RpcClient (leader/follower reading, deadlines)
    _server.py      serve_rpc (reader task, handler task pool, idle/stall watchdog)
    _routing.py     handler shapes: unary, unary_inline, route

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

from transport._exports import fixup_module_metadata
from transport.rpc._client import DEFAULT_CALL_TIMEOUT_S as DEFAULT_CALL_TIMEOUT_S
from transport.rpc._client import DEFAULT_CLIENT_MAX_STREAMS as DEFAULT_CLIENT_MAX_STREAMS
from transport.rpc._client import RpcClient as RpcClient
from transport.rpc._client import open_rpc_client as open_rpc_client
from transport.rpc._connection import CLOSE_TIMEOUT_S as CLOSE_TIMEOUT_S
from transport.rpc._connection import RECEIVE_SIZE as RECEIVE_SIZE
from transport.rpc._connection import RpcStatistics as RpcStatistics
from transport.rpc._core import (
    DEFAULT_CLOSED_STREAMS_REMEMBERED as DEFAULT_CLOSED_STREAMS_REMEMBERED,
)
from transport.rpc._core import DEFAULT_MAX_BUFFERED_BYTES as DEFAULT_MAX_BUFFERED_BYTES
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
from transport.rpc._events import RequestReceived as RequestReceived
from transport.rpc._events import StreamCancelled as StreamCancelled
from transport.rpc._events import StreamEnded as StreamEnded
from transport.rpc._events import StreamErrored as StreamErrored
from transport.rpc._events import StreamOpened as StreamOpened
from transport.rpc._events import WindowUpdated as WindowUpdated
from transport.rpc._routing import DEFER as DEFER
from transport.rpc._routing import Handler as Handler
from transport.rpc._routing import InlineFunction as InlineFunction
from transport.rpc._routing import InlineUnary as InlineUnary
from transport.rpc._routing import Router as Router
from transport.rpc._routing import route as route
from transport.rpc._routing import unary as unary
from transport.rpc._routing import unary_inline as unary_inline
from transport.rpc._server import DEFAULT_IDLE_TIMEOUT_S as DEFAULT_IDLE_TIMEOUT_S
from transport.rpc._server import DEFAULT_STALL_TIMEOUT_S as DEFAULT_STALL_TIMEOUT_S
from transport.rpc._server import RpcServerConnection as RpcServerConnection
from transport.rpc._server import serve_rpc as serve_rpc
from transport.rpc._stream import EndOfStream as EndOfStream
from transport.rpc._stream import RpcStream as RpcStream
from transport.sansio import NEED_DATA as NEED_DATA

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
    "DEFER",
    "route",
    "Router",
    "InlineUnary",
    "InlineFunction",
    "RpcError",
    # sans-IO core
    "RpcConnection",
    "NEED_DATA",
    "Role",
    "StreamState",
    "StreamInput",
    "StreamCredit",
    "CoreStatistics",
    "FrameType",
    "Event",
    "StreamOpened",
    "MessageReceived",
    "RequestReceived",
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
    "DEFAULT_MAX_BUFFERED_BYTES",
    "DEFAULT_CLIENT_MAX_STREAMS",
    "DEFAULT_CLOSED_STREAMS_REMEMBERED",
    "DEFAULT_CALL_TIMEOUT_S",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_STALL_TIMEOUT_S",
    "INITIAL_WINDOW_MESSAGES",
    "INITIAL_WINDOW_BYTES",
    "MAX_CONTROL_PAYLOAD",
    "MAX_METADATA_ENTRIES",
    "MAX_METHOD_LENGTH",
    "MAX_STREAM_ID",
    "RECEIVE_SIZE",
    "CLOSE_TIMEOUT_S",
]

fixup_module_metadata(__name__, globals())
