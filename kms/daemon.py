"""The KMS daemon: HTTP/1.1 (h11) on trio around :class:`kms.app.KmsApp`.

Shape follows h11's ``examples/trio-server.py`` (``TrioHTTPWrapper``): one task per connection,
h11 state machine fed from ``receive_some``, keep-alive until the peer closes, the idle timeout
expires or the daemon shuts down. Limits: request head ≤ 16 KiB (h11's
``max_incomplete_event_size``), body ≤ ``max_body_bytes`` (413 and close beyond).

Graceful shutdown (hypercorn): when ``shutdown`` is set, listeners close, idle connections are
closed at once, requests in flight finish (answered with ``Connection: close``) within
``graceful_timeout_s``; then :func:`serve_kms` returns. Every audit line is written before the
reply is sent, so nothing is half-written.
"""

from __future__ import annotations

import errno
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial

import h11
import structlog
import trio

from transport.errors import ConfigurationError, EnclaveError

from .app import HttpReply, KmsApp, build_app
from .config import KmsConfig
from .service import RecipientVerifier

__all__ = ["serve_kms", "run_daemon", "MAX_HEAD_BYTES", "MAX_CONNECTIONS"]

log = structlog.get_logger()

#: Request line + headers limit. AWS SDK heads are ~1 KiB; 16 KiB is h11's own default order.
MAX_HEAD_BYTES = 16 * 1024
#: Bytes per receive (perf-baseline §3.2: ≤ 64 KiB).
_RECEIVE_SIZE = 65536
#: Connections served at once; further clients wait in the listen backlog. Bounds memory and
#: descriptors against connection floods (each idle connection is closed after the keep-alive
#: timeout anyway).
MAX_CONNECTIONS = 1024
#: Time allowed to push an error reply to a misbehaving client before dropping it.
_SEND_TIMEOUT_S = 5.0


class _Shutdown:
    """Shared shutdown state: which connections are idle (safe to close now)."""

    def __init__(self) -> None:
        self.requested = False
        self.idle_scopes: set[trio.CancelScope] = set()

    def trigger(self) -> None:
        self.requested = True
        for scope in list(self.idle_scopes):
            scope.cancel()


class _Connection:
    """One client connection (TrioHTTPWrapper)."""

    def __init__(self, stream: trio.abc.Stream, app: KmsApp, shutdown: _Shutdown) -> None:
        self.stream = stream
        self.app = app
        self.shutdown = shutdown
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
                self.conn.receive_data(bytes(data))
                continue
            return event

    async def _reply(self, reply: HttpReply, *, close: bool) -> None:
        """Head, body and end in ONE send_all: each send that wakes the peer costs a cross-CPU
        wake-up (measured 0.2-0.4 ms here), so a reply is never split (perf-baseline §3.3)."""
        headers = list(reply.headers)
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
                            [
                                ("Content-Type", "application/x-amz-json-1.1"),
                                ("Content-Length", str(len(body))),
                            ],
                            body,
                        ),
                        close=True,
                    )
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                pass

    async def serve(self) -> None:
        """Serve requests until the connection ends. A failure is confined to this connection:
        logged, connection closed, the daemon keeps serving others (if the audit log cannot be
        written the request fails here too, before any reply: no key leaves unaudited)."""
        try:
            await self._serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except Exception:
            log.exception("kms_connection_failed")
        finally:
            with trio.move_on_after(1.0) as scope:
                scope.shield = True
                await self.stream.aclose()

    async def _read_request(self) -> tuple[h11.Request, bytes] | None:
        """The next complete request, or None when the connection should end."""
        idle = trio.CancelScope(deadline=trio.current_time() + self.app.config.keep_alive_timeout_s)
        self.shutdown.idle_scopes.add(idle)
        try:
            if self.shutdown.requested:
                idle.cancel()
            with idle:
                event = await self._next_event()
        finally:
            self.shutdown.idle_scopes.discard(idle)
        if idle.cancelled_caught or isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
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
        with trio.fail_after(self.app.config.keep_alive_timeout_s):
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
                await self._error(408, "RequestTimeoutException", "Request body too slow.")
                return
            if got is None:
                return
            request, body = got
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
            reply = await self.app.handle(
                request.method.decode("ascii", "replace"),
                request.target.decode("latin-1"),
                headers,
                body,
            )
            close = self.shutdown.requested or self.conn.our_state is not h11.SEND_RESPONSE
            await self._reply(reply, close=close or self.shutdown.requested)
            if self.conn.our_state is h11.MUST_CLOSE or self.shutdown.requested:
                return
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
) -> None:
    """Run the KMS daemon until cancelled or until ``shutdown`` is set (then drain gracefully).

    Args:
        config: daemon configuration.
        shutdown: setting it starts a graceful shutdown; :func:`serve_kms` then returns.
        env: environment for credentials/master key (default ``os.environ``).
        clock: wall clock for SigV4 freshness, key dates and audit times (tests).
        recipient_verifier: overrides the verifier built from ``config.trust_roots``.
        task_status: receives the actual ``(host, port)`` once listening.

    Raises:
        ConfigurationError: no credentials, bad master key, unreadable roots or seed.
        OSError: the address cannot be bound.
    """
    app = await trio.to_thread.run_sync(
        partial(build_app, config, env=env, clock=clock, recipient_verifier=recipient_verifier)
    )
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        sockname = listeners[0].socket.getsockname()
        host, port = str(sockname[0]), int(sockname[1])
        log.info(
            "kms_listening",
            host=host,
            port=port,
            state_dir=str(config.resolved_state_dir),
            recipient=app.recipient_enabled,
        )
        if not app.recipient_enabled:
            log.warning("kms_recipient_disabled", reason="no trust_roots configured")
        state = _Shutdown()
        slots = trio.Semaphore(MAX_CONNECTIONS)

        async def serve_connection(stream: trio.SocketStream) -> None:
            try:
                await _Connection(stream, app, state).serve()
            finally:
                slots.release()

        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as handlers:

                async def accept(listener: trio.SocketListener) -> None:
                    async with listener:
                        while True:
                            await slots.acquire()
                            try:
                                stream = await listener.accept()
                            except OSError as exc:
                                slots.release()
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
                            except BaseException:
                                slots.release()
                                raise
                            handlers.start_soon(serve_connection, stream)

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

    Returns the exit status (0 after a graceful shutdown).
    """

    async def main() -> None:
        shutdown = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for _ in signals:
                        shutdown.set()
                        return

                nursery.start_soon(watch)
                host, port = await nursery.start(partial(serve_kms, config, shutdown=shutdown))
                shown = f"[{host}]" if ":" in host else host
                print(f"kms listening on http://{shown}:{port}", file=sys.stderr, flush=True)
                await shutdown.wait()
                # serve_kms drains and returns; the watcher has returned already.

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # Start-up failures (config, roots, address in use) surface inside nursery groups:
        # report the single underlying error plainly.
        leaves = list(_leaves(group))
        if len(leaves) == 1 and isinstance(leaves[0], EnclaveError):
            raise leaves[0] from None
        if len(leaves) == 1 and isinstance(leaves[0], OSError):
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
