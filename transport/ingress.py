"""Ingress: a host TCP listener forwarding each connection to an enclave's vsock port.

Clients outside the machine (or on it, without access to the fabric directory) reach an enclave
service through ingress: TCP ``listen_host:listen_port`` → vsock ``target``. Bytes are piped
unchanged both ways (:func:`transport.proxy.pipe_streams`: 64 KiB chunks, half-close
propagated); with the attested channel on top, ingress only ever relays ciphertext. The default
listen address is loopback: exposing an enclave beyond the machine is an explicit choice.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Final, NoReturn

import structlog
import trio

from transport.errors import ConfigurationError, VsockError
from transport.fabric.addressing import VsockAddr
from transport.fabric.api import open_vsock_stream
from transport.proxy import pipe_streams

__all__ = ["DEFAULT_LISTEN_HOST", "DEFAULT_MAX_CONNECTIONS", "serve_ingress", "parse_listen"]

log = structlog.get_logger()

#: Loopback by default: reaching an enclave from other machines must be asked for.
DEFAULT_LISTEN_HOST: Final = "127.0.0.1"
#: Connections forwarded at once; further clients wait in the TCP backlog. Each costs two
#: sockets and two small tasks, so this bounds fds well below common RLIMIT_NOFILE (1024).
DEFAULT_MAX_CONNECTIONS: Final = 256


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (loopback when no host)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    host = host.strip("[]") or DEFAULT_LISTEN_HOST
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"--listen {value!r}: expected HOST:PORT with PORT 0 … 65535")
    return host, int(port)


async def _forward(
    conn: trio.SocketStream,
    target: VsockAddr,
    fabric_dir: Path | None,
    conn_id: int,
    slots: trio.Semaphore,
) -> None:
    started = trio.current_time()
    try:
        async with conn:
            try:
                enclave = await open_vsock_stream(target, fabric_dir=fabric_dir)
            except VsockError as exc:
                log.warning(
                    "ingress_target_unreachable", conn=conn_id, target=str(target), error=str(exc)
                )
                return
            async with enclave:
                stats = await pipe_streams(conn, enclave)
            log.info(
                "ingress_connection_closed",
                conn=conn_id,
                target=str(target),
                bytes_in=stats.a_to_b,
                bytes_out=stats.b_to_a,
                duration_s=round(trio.current_time() - started, 6),
            )
    finally:
        slots.release()


async def serve_ingress(
    listen_host: str,
    listen_port: int,
    target: VsockAddr,
    *,
    fabric_dir: Path | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Forward TCP connections on ``listen_host:listen_port`` to ``target``. Never returns.

    Args:
        listen_host: address to bind (default in the CLI: loopback).
        listen_port: TCP port, 0 for any free port.
        target: the enclave's vsock address.
        fabric_dir: reach ``target`` through this fabric directory (default: the backend of
            this process).
        max_connections: connections forwarded at once.
        task_status: ``started(bound_port)`` once listening.

    A client whose target refuses is disconnected (and the refusal logged); ingress keeps
    serving the others.
    """
    if max_connections < 1:
        raise ConfigurationError("max_connections must be at least 1")
    listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
    bound_port = int(listeners[0].socket.getsockname()[1])
    slots = trio.Semaphore(max_connections)
    ids = itertools.count(1)
    log.info("ingress_listening", listen=f"{listen_host}:{bound_port}", target=str(target))

    async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                await slots.acquire()
                try:
                    conn = await listener.accept()
                except BaseException:
                    slots.release()
                    raise
                conn_id = next(ids)
                log.debug("ingress_connection_opened", conn=conn_id)
                nursery.start_soon(_forward, conn, target, fabric_dir, conn_id, slots)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)
        task_status.started(bound_port)
    raise AssertionError("unreachable")  # pragma: no cover
