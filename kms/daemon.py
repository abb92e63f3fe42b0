"""The KMS daemon: HTTP/1.1 (h11) on trio around :class:`kms.app.KmsApp`.

The HTTP layer is :mod:`kms._http` (shared with the XKS proxy), which documents the limits
against slow and oversized clients (slowloris): head ≤ :data:`MAX_HEAD_BYTES`, a request within
``request_timeout_s`` of its first byte (a fresh connection's first request within
``request_timeout_s`` of being accepted; idle keep-alive time only after an authenticated
request), body ≤ ``max_body_bytes`` (413 and close beyond), admission of at most
:data:`MAX_CONNECTIONS` connections and ``max_connections_per_source`` per peer address, the
oldest unproven connection making room. The daemon's own part is :data:`PROFILE` and
:class:`_KmsHttp`: KMS-format error answers (a slow request gets 408
``RequestTimeoutException``) and ``kms_*`` log events.

Graceful shutdown (hypercorn): when ``shutdown`` is set, listeners close, idle connections are
closed at once, requests in flight finish (answered with ``Connection: close``) within
``graceful_timeout_s``; then :func:`serve_kms` returns. Every audit line is written (and, with
``audit_fsync``, on disk) before the reply is sent, so nothing is half-written.

With worker processes (:mod:`kms.workers`) each worker runs :func:`serve_kms` on its parent's
listening socket, and :class:`kms.coherence.ConnectionShare` spreads the connections; the
parent handles signals and tells the workers to drain.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial

import structlog
import trio

from transport.errors import ConfigurationError, EnclaveError

from ._http import (
    MAX_HEAD_BYTES,
    Admission,
    Connection,
    HttpLimits,
    HttpProfile,
    HttpReply,
    HttpRequest,
    Shutdown,
    serve_http,
)
from .app import CONTENT_TYPE, KmsApp, build_app, log_audit_end, prepare_state
from .config import KmsConfig
from .service import RecipientVerifier

__all__ = ["serve_kms", "run_daemon", "MAX_HEAD_BYTES", "MAX_CONNECTIONS"]

log = structlog.get_logger()

#: Connections served at once. Bounds memory and descriptors against connection floods; past it
#: the oldest unproven connection makes room (see :mod:`kms._http`).
MAX_CONNECTIONS = 1024
#: The daemon's profile: a slow request is answered 408 (RequestTimeoutException); after an
#: error reply at most 1 MiB is discarded (an SDK may be mid-way through a big body). Its
#: ``reply_timeout_s`` is each daemon's ``request_timeout_s`` (:func:`_profile`).
PROFILE = HttpProfile(name="kms", answer_slow=True, reply_timeout_s=None, linger_max_bytes=1 << 20)


def _profile(config: KmsConfig) -> HttpProfile:
    """:data:`PROFILE` for ``config``: a reply the client leaves unread for
    ``request_timeout_s`` closes the connection (``kms_reply_timeout``), as a request that does
    not arrive in that time does, so a client that never reads holds no task or slot."""
    return dataclasses.replace(PROFILE, reply_timeout_s=config.request_timeout_s)


#: The names the in-process tests serve one stream with: ``_Connection(stream, app, _Shutdown())``.
_Shutdown = Shutdown


def _limits(config: KmsConfig) -> HttpLimits:
    return HttpLimits(
        max_body_bytes=config.max_body_bytes,
        request_timeout_s=config.request_timeout_s,
        keep_alive_timeout_s=config.keep_alive_timeout_s,
        max_connections=MAX_CONNECTIONS,
        max_connections_per_source=config.max_connections_per_source,
        graceful_timeout_s=config.graceful_timeout_s,
    )


class _KmsHttp:
    """:class:`kms.app.KmsApp` as an :class:`kms._http.HttpApp`: KMS-format error replies."""

    def __init__(self, app: KmsApp) -> None:
        self.app = app

    async def handle(self, request: HttpRequest) -> HttpReply:
        return await self.app.handle(
            request.method, request.target, request.headers, request.body
        )

    def protocol_error(self, status: int, reason: str) -> HttpReply:
        if status == 413:
            limit = self.app.config.max_body_bytes
            type_name = "RequestEntityTooLargeException"
            message = f"Request body exceeds {limit} bytes."
        elif status == 408:
            type_name, message = "RequestTimeoutException", "Request too slow."
        else:  # the detail (``reason``) is for nobody: malformed is all the peer learns
            type_name, message = "SerializationException", "Malformed HTTP request."
        body = json.dumps({"__type": type_name, "message": message}).encode()
        return HttpReply(status, [("Content-Type", CONTENT_TYPE)], body)


class _Connection(Connection):
    """One client connection of ``app``, outside :func:`serve_kms` (no admission unless given)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        app: KmsApp,
        shutdown: Shutdown,
        admission: Admission | None = None,
    ) -> None:
        super().__init__(
            stream, _KmsHttp(app), _limits(app.config), _profile(app.config), shutdown, admission
        )


async def serve_kms(
    config: KmsConfig,
    *,
    shutdown: trio.Event | None = None,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    recipient_verifier: RecipientVerifier | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    listeners: Sequence[trio.SocketListener] | None = None,
    build: Callable[[], KmsApp] | None = None,
) -> None:
    """Run the KMS daemon until cancelled or until ``shutdown`` is set (then drain gracefully).

    Args:
        config: daemon configuration.
        shutdown: setting it starts a graceful shutdown; :func:`serve_kms` then returns.
        env: environment for credentials/master key (default ``os.environ``).
        clock: wall clock for SigV4 freshness, key dates and audit times (tests).
        recipient_verifier: overrides the verifier built from ``config.trust_roots``.
        task_status: receives the actual ``(host, port)`` once listening.
        listeners: already-bound listeners (a worker process serves its parent's socket);
            default: bind ``config.host``/``config.port``.
        build: makes the app (a worker's :func:`kms.app.build_worker_app`); default
            :func:`kms.app.build_app` (this process owns the state directory).

    Raises:
        ConfigurationError: no credentials, bad master key, unreadable roots or seed.
        OSError: the address cannot be bound.
    """
    if build is None:
        build = partial(
            build_app, config, env=env, clock=clock, recipient_verifier=recipient_verifier
        )
    app = await trio.to_thread.run_sync(build)
    try:
        if listeners is None:
            listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        sockname = listeners[0].socket.getsockname()
        host, port = str(sockname[0]), int(sockname[1])
        log.info(
            "kms_listening",
            host=host,
            port=port,
            state_dir=str(config.resolved_state_dir),
            storage=config.storage_shown,  # never the password
            recipient=app.recipient_enabled,
        )
        if not app.recipient_enabled and app.lock is not None:  # once per daemon
            log.warning("kms_recipient_disabled", reason="no trust_roots configured")

        async def ready() -> None:
            task_status.started((host, port))

        await serve_http(
            _KmsHttp(app),
            listeners,
            _limits(config),
            _profile(config),
            share=app.connection_share,
            shutdown=shutdown,
            on_ready=ready,
        )
    finally:
        app.close()


def run_daemon(config: KmsConfig) -> int:
    """Blocking entry: serve until SIGTERM/SIGINT, printing the address on stderr when ready.
    With ``config.resolved_workers`` > 1 the requests are served by worker processes
    (:mod:`kms.workers`); with 1, by this process.

    Returns the exit status (0 after a graceful shutdown).
    """

    def announce(host: str, port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        print(f"kms listening on http://{shown}:{port}", file=sys.stderr, flush=True)

    async def main() -> None:
        shutdown = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for _ in signals:
                        shutdown.set()
                        return

                nursery.start_soon(watch)
                announce(*await nursery.start(partial(serve_kms, config, shutdown=shutdown)))
                await shutdown.wait()
                # serve_kms drains and returns; the watcher has returned already.

    workers = config.resolved_workers
    try:
        if workers == 1:
            trio.run(main)
        else:
            from .workers import run_workers

            lock = prepare_state(config)
            try:
                trio.run(partial(run_workers, config, workers, on_ready=announce))
            finally:
                log_audit_end(config)
                lock.release()
    except BaseExceptionGroup as group:
        # Start-up failures (config, roots, address in use) surface inside nursery groups:
        # report the single underlying error plainly.
        leaves = list(_leaves(group))
        if len(leaves) == 1 and isinstance(leaves[0], EnclaveError):
            raise leaves[0] from None
        if len(leaves) == 1 and isinstance(leaves[0], OSError) and workers == 1:
            raise ConfigurationError(
                f"cannot listen on {config.host}:{config.port}: {leaves[0].strerror}"
            ) from None
        raise
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
