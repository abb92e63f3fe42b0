"""Ingress: a host TCP listener forwarding each connection to an enclave's vsock port.

Clients outside the machine (or on it, without access to the fabric directory) reach an enclave
service through ingress: TCP ``listen_host:listen_port`` → vsock ``target``. It is
:func:`transport.relay.serve_forwarding` with a vsock target: bytes are piped unchanged both
ways (with the attested channel on top, ingress only ever relays ciphertext), a client is
served or refused at once (never left waiting in the backlog), one source address holds at most
``max_per_source`` connections, and a target that cannot be reached closes the client's
connection without a byte, with the reason logged (the client then reports "enclave
unreachable", not an authentication failure). The default listen address is loopback: exposing
an enclave beyond the machine is an explicit choice.
"""

from __future__ import annotations

import errno
from functools import partial
from pathlib import Path
from typing import Final, NoReturn

import structlog
import trio

from transport.errors import AddressInUse, ConfigurationError
from transport.fabric.addressing import VsockAddr
from transport.fabric.api import open_vsock_stream
from transport.hostport import format_host_port
from transport.relay import serve_forwarding

__all__ = [
    "DEFAULT_LISTEN_HOST",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PER_SOURCE",
    "CONNECT_TIMEOUT_S",
    "serve_ingress",
]

log = structlog.get_logger()

#: Loopback by default: reaching an enclave from other machines must be asked for.
DEFAULT_LISTEN_HOST: Final = "127.0.0.1"
#: Connections forwarded at once; further clients are refused at once. Each costs two sockets
#: and two small tasks, so this bounds fds well below common RLIMIT_NOFILE (1024).
DEFAULT_MAX_CONNECTIONS: Final = 256
#: Connections forwarded at once from one source address: half the inference server's 64
#: connection slots, so one source cannot take them all, while leaving room for many local
#: clients (every local client is 127.0.0.1).
DEFAULT_MAX_PER_SOURCE: Final = 32
#: Bound on reaching the enclave's vsock port, per connection (seconds): the fabric answers
#: at once, so this only bounds a stuck enclave broker.
CONNECT_TIMEOUT_S: Final = 10.0


async def _open_target(target: VsockAddr, fabric_dir: Path | None) -> trio.SocketStream:
    with trio.fail_after(CONNECT_TIMEOUT_S):
        return await open_vsock_stream(target, fabric_dir=fabric_dir)


async def open_tcp_listeners_or_explain(host: str, port: int) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` with failures turned into one clear error.

    Raises:
        AddressInUse: something already listens on ``host:port``.
        ConfigurationError: the address cannot be listened on (unknown host, not ours...).
    """
    where = format_host_port(host, port)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"cannot listen on {where}: address already in use") from exc
        reason = exc.strerror or str(exc)
        raise ConfigurationError(f"cannot listen on {where}: {reason}") from exc


async def serve_ingress(
    listen_host: str,
    listen_port: int,
    target: VsockAddr,
    *,
    fabric_dir: Path | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_per_source: int | None = DEFAULT_MAX_PER_SOURCE,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Forward TCP connections on ``listen_host:listen_port`` to ``target``. Never returns.

    Args:
        listen_host: address to bind (default in the CLI: loopback).
        listen_port: TCP port, 0 for any free port.
        target: the enclave's vsock address.
        fabric_dir: reach ``target`` through this fabric directory (default: the backend of
            this process).
        max_connections: connections forwarded at once; more are refused at once.
        max_per_source: connections forwarded at once from one source IP; None: no cap.
        task_status: ``started(bound_port)`` once listening.

    Raises:
        AddressInUse / ConfigurationError: the listen address cannot be used (before
            anything is accepted), or a limit is below 1.

    A client whose target cannot be reached is disconnected without a byte (and the reason
    logged); ingress keeps serving the others.
    """
    if max_connections < 1:
        raise ConfigurationError("max_connections must be at least 1")
    if max_per_source is not None and max_per_source < 1:
        raise ConfigurationError("max_per_source must be at least 1")
    listeners = await open_tcp_listeners_or_explain(listen_host, listen_port)
    bound_port = int(listeners[0].socket.getsockname()[1])
    log.info(
        "ingress_listening",
        listen=format_host_port(listen_host, bound_port),
        target=str(target),
        max_connections=max_connections,
        max_per_source=max_per_source,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_forwarding,
                listeners,
                partial(_open_target, target, fabric_dir),
                name="ingress",
                target=str(target),
                max_connections=max_connections,
                max_per_source=max_per_source,
                when_full="refuse",
            )
        )
        task_status.started(bound_port)
    raise AssertionError("unreachable")  # pragma: no cover
