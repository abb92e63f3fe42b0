"""HTTP/1.1 serving for the XKS proxy: the shared layer (:mod:`kms._http`: admission,
per-source caps, head/body limits, timeouts, keep-alive, TLS) with the proxy's profile.

The proxy differs from the KMS daemon only in data: its own error format (the app's
``protocol_error``), TLS with a peer check, ``xks_*`` log events, a bound on sending every
reply, and a slow request is closed without an answer (no 408).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Sequence

import trio

from .._http import (
    MAX_HEAD_BYTES,
    HttpApp,
    HttpLimits,
    HttpProfile,
    HttpReply,
    HttpRequest,
    PeerCheck,
)
from .._http import serve_http as _serve_http

__all__ = ["MAX_HEAD_BYTES", "HttpLimits", "HttpRequest", "HttpReply", "HttpApp", "serve_http"]

#: The proxy's profile. Every reply, not only an error, has 5 s to reach the client; after an
#: error reply at most 256 KiB are discarded (XKS requests are a few KiB).
PROFILE = HttpProfile(
    name="xks", answer_slow=False, reply_timeout_s=5.0, linger_max_bytes=256 * 1024
)


async def serve_http(
    app: HttpApp,
    listeners: Sequence[trio.SocketListener],
    limits: HttpLimits,
    *,
    ssl_context: ssl.SSLContext | None = None,
    peer_check: PeerCheck | None = None,
    shutdown: trio.Event | None = None,
    on_ready: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """:func:`kms._http.serve_http` with the proxy's :data:`PROFILE`."""
    await _serve_http(
        app,
        listeners,
        limits,
        PROFILE,
        ssl_context=ssl_context,
        peer_check=peer_check,
        shutdown=shutdown,
        on_ready=on_ready,
    )
