"""The KMS daemon: HTTP/1.1 (h11) on trio around :class:`kms.app.KmsApp`.

Shape follows h11's ``examples/trio-server.py`` (``TrioHTTPWrapper``): one task per connection,
h11 state machine fed from ``receive_some``, keep-alive until the peer closes, the idle timeout
expires or the daemon shuts down.

Limits against slow and oversized clients (slowloris):

* the request head is at most :data:`MAX_HEAD_BYTES` (16 KiB): while the head is incomplete the
  daemon never reads past that (h11 alone would accept a complete head as large as one receive);
* a request, head and body, must arrive within ``request_timeout_s`` of its first byte, and a
  fresh connection must deliver its first request within ``request_timeout_s`` of being
  accepted (idle keep-alive time, ``keep_alive_timeout_s``, is only for connections that have
  already made an authenticated request);
* body ≤ ``max_body_bytes`` (413 and close beyond);
* admission (:class:`_Admission`): at most :data:`MAX_CONNECTIONS` connections, at most
  ``max_connections_per_source`` per peer address. A connection is *unproven* until it has sent
  a complete request; when a limit is reached the oldest unproven connection is closed to make
  room for the new one, so partial requests cannot hold the slots that callers need. A
  connection whose request fails authentication is closed after its reply; one that
  authenticated is never displaced by newcomers.

Graceful shutdown (hypercorn): when ``shutdown`` is set, listeners close, idle connections are
closed at once, requests in flight finish (answered with ``Connection: close``) within
``graceful_timeout_s``; then :func:`serve_kms` returns. Every audit line is written (and, with
``audit_fsync``, on disk) before the reply is sent, so nothing is half-written.

With worker processes (:mod:`kms.workers`) each worker runs :func:`serve_kms` on its parent's
listening socket, and :class:`kms.coherence.ConnectionShare` spreads the connections; the
parent handles signals and tells the workers to drain.
"""

from __future__ import annotations

import errno
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial

import h11
import structlog
import trio

from transport.errors import ConfigurationError, EnclaveError

from .app import HttpReply, KmsApp, build_app, log_audit_end, prepare_state
from .coherence import ConnectionShare
from .config import KmsConfig
from .service import RecipientVerifier

__all__ = ["serve_kms", "run_daemon", "MAX_HEAD_BYTES", "MAX_CONNECTIONS"]

log = structlog.get_logger()

#: Request line + headers limit. AWS SDK heads are ~1 KiB; 16 KiB is h11's own default order.
MAX_HEAD_BYTES = 16 * 1024
#: Bytes per receive once the head is in (perf-baseline §3.2: ≤ 64 KiB).
_RECEIVE_SIZE = 65536
#: Connections served at once. Bounds memory and descriptors against connection floods; past it
#: the oldest unproven connection makes room (see the module docstring).
MAX_CONNECTIONS = 1024
#: At most one eviction/refusal warning per this many seconds (a flood must not flood the log).
_ADMISSION_LOG_INTERVAL_S = 1.0
#: Time allowed to push an error reply to a misbehaving client before dropping it.
_SEND_TIMEOUT_S = 5.0
#: Lingering close after an error reply: at most this long and this many discarded bytes.
_LINGER_S = 1.0
_LINGER_MAX_BYTES = 1024 * 1024


class _Shutdown:
    """Shared shutdown state: which connections are idle (safe to close now)."""

    def __init__(self) -> None:
        self.requested = False
        self.idle_scopes: set[trio.CancelScope] = set()

    def trigger(self) -> None:
        self.requested = True
        for scope in list(self.idle_scopes):
            scope.cancel()


def _source_of(stream: trio.abc.Stream) -> str:
    """The peer's address (the unit of the per-source cap); "local" for non-socket streams."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "local"
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError):
        return "unknown"


class _Admission:
    """Connection slots: a global cap, a per-source cap, and eviction of unproven connections.

    Every structure is an insertion-ordered dict, so admitting and evicting are O(1).
    """

    def __init__(
        self, max_total: int, max_per_source: int, share: ConnectionShare | None = None
    ) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.share = share
        self._total = 0
        self._per_source: dict[str, int] = {}
        self._unproven: dict[_Connection, None] = {}  # oldest first
        self._unproven_by_source: dict[str, dict[_Connection, None]] = {}
        self._admitted: set[_Connection] = set()
        self.evicted = 0
        self.refused = 0
        self._last_log = -float("inf")

    def admit(self, conn: _Connection) -> bool:
        """Take a slot for ``conn``, evicting the oldest unproven connection if a cap is hit.
        False: every slot is held by a proven connection (refuse ``conn``)."""
        src = conn.source
        if self._per_source.get(src, 0) >= self.max_per_source:
            victims = self._unproven_by_source.get(src)
            if not victims:
                return self._refuse(src)
            self._evict(next(iter(victims)))
        if self._total >= self.max_total:
            if not self._unproven:
                return self._refuse(src)
            self._evict(next(iter(self._unproven)))
        self._total += 1
        if self.share is not None:
            self.share.update(self._total)
        self._per_source[src] = self._per_source.get(src, 0) + 1
        self._admitted.add(conn)
        self._unproven[conn] = None
        self._unproven_by_source.setdefault(src, {})[conn] = None
        return True

    @property
    def total(self) -> int:
        """Connections admitted now."""
        return self._total

    def busy(self, conn: _Connection) -> None:
        """``conn`` delivered a complete request: no longer evictable."""
        self._unproven.pop(conn, None)
        by_source = self._unproven_by_source.get(conn.source)
        if by_source is not None:
            by_source.pop(conn, None)
            if not by_source:
                del self._unproven_by_source[conn.source]

    def leave(self, conn: _Connection) -> None:
        """Free ``conn``'s slot (idempotent)."""
        if conn not in self._admitted:
            return
        self._admitted.discard(conn)
        self.busy(conn)
        self._total -= 1
        if self.share is not None:
            self.share.update(self._total)
        left = self._per_source[conn.source] - 1
        if left:
            self._per_source[conn.source] = left
        else:
            del self._per_source[conn.source]

    def _evict(self, victim: _Connection) -> None:
        self.leave(victim)
        victim.scope.cancel()
        self.evicted += 1
        self._log("kms_connection_evicted", victim.source)

    def _refuse(self, source: str) -> bool:
        self.refused += 1
        self._log("kms_connection_refused", source)
        return False

    def _log(self, event: str, source: str) -> None:
        now = trio.current_time()
        if now - self._last_log >= _ADMISSION_LOG_INTERVAL_S:
            self._last_log = now
            log.warning(
                event,
                source=source,
                evicted_total=self.evicted,
                refused_total=self.refused,
                connections=self._total,
                reason="connection limits reached (slow or partial requests are displaced)",
            )


class _Connection:
    """One client connection (TrioHTTPWrapper)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        app: KmsApp,
        shutdown: _Shutdown,
        admission: _Admission | None = None,
    ) -> None:
        self.stream = stream
        self.app = app
        self.shutdown = shutdown
        self.admission = admission
        self.source = _source_of(stream)
        self.scope = trio.CancelScope()
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._served = 0  # authenticated requests answered on this connection
        self._head_room = MAX_HEAD_BYTES + 1
        self._in_head = True
        self._started = False
        self._request_scope: trio.CancelScope | None = None

    def _on_first_bytes(self) -> None:
        """The first bytes of a request: from now on it has ``request_timeout_s`` to finish,
        and shutdown no longer counts the connection as idle."""
        self._started = True
        scope = self._request_scope
        if scope is not None:
            self.shutdown.idle_scopes.discard(scope)
            scope.deadline = min(
                scope.deadline, trio.current_time() + self.app.config.request_timeout_s
            )

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                size = _RECEIVE_SIZE
                if self._in_head:
                    # Never buffer more than the head limit (+1, so h11 sees the overflow).
                    size = self._head_room
                    if size <= 0:
                        raise h11.RemoteProtocolError(
                            "request head too large", error_status_hint=431
                        )
                data = await self.stream.receive_some(size)
                if data and not self._started:
                    self._on_first_bytes()
                if self._in_head:
                    self._head_room -= len(data)
                self.conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Request):
                self._in_head = False
            return event

    async def _reply(self, reply: HttpReply, *, close: bool) -> None:
        """Head, body and end in ONE send_all: each send that wakes the peer costs a cross-CPU
        wake-up (measured 0.2-0.4 ms here), so a reply is never split (perf-baseline §3.3)."""
        headers = [*reply.headers, ("Content-Length", str(len(reply.body)))]
        if close:
            headers.append(("Connection", "close"))
        data = self.conn.send(h11.Response(status_code=reply.status, headers=headers))
        data += self.conn.send(h11.Data(data=reply.body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def _error(self, status: int, type_name: str, message: str) -> None:
        body = json.dumps({"__type": type_name, "message": message}).encode()
        with trio.move_on_after(_SEND_TIMEOUT_S):
            try:
                if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._reply(
                        HttpReply(
                            status,
                            [("Content-Type", "application/x-amz-json-1.1")],
                            body,
                        ),
                        close=True,
                    )
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                return
        await self._lingering_close()

    async def _lingering_close(self) -> None:
        """After an error reply the peer may still be sending (an oversized head or body):
        closing with unread bytes makes the kernel send a reset, which can destroy our reply
        before the peer reads it. Half-close, then discard what arrives, bounded in time and
        bytes (the connection's slot is held for at most _LINGER_S)."""
        send_eof = getattr(self.stream, "send_eof", None)
        if send_eof is None:
            return
        with trio.move_on_after(_LINGER_S):
            try:
                await send_eof()
                drained = 0
                while drained < _LINGER_MAX_BYTES:
                    chunk = await self.stream.receive_some(_RECEIVE_SIZE)
                    if not chunk:
                        return
                    drained += len(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

    async def serve(self) -> None:
        """Serve requests until the connection ends. A failure is confined to this connection:
        logged, connection closed, the daemon keeps serving others (if the audit log cannot be
        written the request fails here too, before any reply: no key leaves unaudited)."""
        try:
            with self.scope:
                await self._serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except Exception:
            log.exception("kms_connection_failed")
        finally:
            if self.admission is not None:
                self.admission.leave(self)
            with trio.move_on_after(1.0) as scope:
                scope.shield = True
                await self.stream.aclose()

    async def _read_request(self) -> tuple[h11.Request, bytes] | None:
        """The next complete request, or None when the connection should end.

        Raises:
            trio.TooSlowError: the request started but did not arrive in time.
        """
        config = self.app.config
        # Until a caller has authenticated, its whole first request must arrive in
        # request_timeout_s; afterwards the connection may idle for the keep-alive time.
        wait = config.keep_alive_timeout_s if self._served else config.request_timeout_s
        scope = trio.CancelScope(deadline=trio.current_time() + wait)
        leftover = len(self.conn.trailing_data[0])  # pipelined bytes already buffered
        self._head_room = MAX_HEAD_BYTES + 1 - leftover
        self._in_head, self._started = True, leftover > 0
        self._request_scope = scope
        if not self._started:
            self.shutdown.idle_scopes.add(scope)
        else:
            scope.deadline = min(scope.deadline, trio.current_time() + config.request_timeout_s)
        try:
            if self.shutdown.requested and not self._started:
                scope.cancel()
            with scope:
                got = await self._read_request_within_scope()
        finally:
            self.shutdown.idle_scopes.discard(scope)
            self._request_scope = None
        if scope.cancelled_caught:
            if self._started and not self.shutdown.requested:
                raise trio.TooSlowError
            return None
        return got

    async def _read_request_within_scope(self) -> tuple[h11.Request, bytes] | None:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Request):
            return None
        limit = self.app.config.max_body_bytes
        length = next((v for k, v in event.headers if k == b"content-length"), None)
        if length is not None and int(length) > limit:
            await self._error(
                413, "RequestEntityTooLargeException", f"Request body exceeds {limit} bytes."
            )
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            ev = await self._next_event()
            if isinstance(ev, h11.Data):
                size += len(ev.data)
                if size > limit:
                    await self._error(
                        413,
                        "RequestEntityTooLargeException",
                        f"Request body exceeds {limit} bytes.",
                    )
                    return None
                chunks.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                return event, b"".join(chunks)
            else:
                return None

    async def _serve(self) -> None:
        while True:
            try:
                got = await self._read_request()
            except h11.RemoteProtocolError as exc:
                await self._error(
                    exc.error_status_hint, "SerializationException", "Malformed HTTP request."
                )
                return
            except trio.TooSlowError:
                await self._error(408, "RequestTimeoutException", "Request too slow.")
                return
            if got is None:
                return
            if self.admission is not None:
                self.admission.busy(self)
            request, body = got
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
            reply = await self.app.handle(
                request.method.decode("ascii", "replace"),
                request.target.decode("latin-1"),
                headers,
                body,
            )
            # A caller that did not authenticate gets its answer and the connection closes:
            # only authenticated callers keep connections (and their slots) alive.
            close = (
                self.shutdown.requested
                or not reply.authenticated
                or self.conn.our_state is not h11.SEND_RESPONSE
            )
            await self._reply(reply, close=close)
            if close or self.conn.our_state is h11.MUST_CLOSE:
                return
            self._served += 1
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return


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
        state = _Shutdown()
        admission = _Admission(
            MAX_CONNECTIONS, config.max_connections_per_source, app.connection_share
        )

        async def serve_connection(conn: _Connection) -> None:
            await conn.serve()

        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as handlers:

                share = app.connection_share

                async def accept(listener: trio.SocketListener) -> None:
                    async with listener:
                        while True:
                            if share is not None:  # a less loaded sibling takes the next one
                                await share.wait_turn(lambda: admission.total)
                            try:
                                stream = await listener.accept()
                            except OSError as exc:
                                if exc.errno in (
                                    errno.EMFILE,
                                    errno.ENFILE,
                                    errno.ENOMEM,
                                    errno.ENOBUFS,
                                ):
                                    log.error("kms_accept_failed", errno=exc.errno)
                                    await trio.sleep(0.1)  # back off while out of descriptors
                                    continue
                                raise
                            conn = _Connection(stream, app, state, admission)
                            if not admission.admit(conn):
                                stream.socket.close()  # every slot is an authenticated caller's
                                continue
                            handlers.start_soon(serve_connection, conn)

                accept_scope = trio.CancelScope()

                async def accept_all() -> None:
                    with accept_scope:
                        async with trio.open_nursery() as n:
                            for listener in listeners:
                                n.start_soon(accept, listener)

                handlers.start_soon(accept_all)
                task_status.started((host, port))
                if shutdown is not None:

                    async def drain() -> None:
                        await shutdown.wait()
                        log.info("kms_shutting_down")
                        accept_scope.cancel()
                        state.trigger()
                        handlers.cancel_scope.deadline = (
                            trio.current_time() + config.graceful_timeout_s
                        )

                    outer.start_soon(drain)
            outer.cancel_scope.cancel()
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
