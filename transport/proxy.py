"""vsock-proxy: Nitro's enclave egress proxy (reference/nitro.md §7.1), on the fabric.

The proxy listens on the parent's vsock port ``(3, local_port)`` and pipes every accepted
connection to the TCP endpoint ``remote_host:remote_port``. As in Nitro:

* the endpoint must be on the allowlist (YAML, ``allowlist: [{address: ..., port: ...}]``),
  checked once at start: an entry matches when its port is equal and its address either equals
  ``remote_host`` as a string or resolves to one of ``remote_host``'s addresses; otherwise the
  proxy refuses to start (:class:`ProxyNotAllowed`, "The given address and port are not allowed");
* at most ``num_workers`` connections are served at once (the others wait in the backlog);
* the remote name is resolved again for every connection; ``-4``/``-6`` restrict the family.

Connections are forwarded by :func:`transport.relay.serve_forwarding`, the accept loop ingress
uses too (64 KiB chunks, half-close propagated; TLS stays end to end between the enclave and the
endpoint, so the proxy only ever sees ciphertext), waiting for a worker when all are busy as
Nitro's does. The allowlist parser and matcher are pure; the rest is the trio adapter.
"""

from __future__ import annotations

import enum
import ipaddress
import socket as _stdlib_socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, NoReturn

import structlog
import trio
import yaml

from transport.errors import ConfigurationError
from transport.fabric.addressing import VsockAddr
from transport.fabric.api import open_vsock_listener
from transport.hostport import format_host_port
from transport.relay import PIPE_CHUNK_SIZE, PipeStats, pipe_streams, serve_forwarding

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_PROXY_PORT",
    "DEFAULT_NUM_WORKERS",
    "PIPE_CHUNK_SIZE",
    "IpVersion",
    "AllowlistEntry",
    "Allowlist",
    "ProxyNotAllowed",
    "allowlist_matches",
    "check_allowlist",
    "serve_vsock_proxy",
    "pipe_streams",
    "PipeStats",
]

# pipe_streams, PipeStats and PIPE_CHUNK_SIZE live in transport.relay (shared with ingress);
# they stay importable from here.

log = structlog.get_logger()

#: Nitro's default configuration file.
DEFAULT_CONFIG_PATH: Final = Path("/etc/nitro_enclaves/vsock-proxy.yaml")
#: Nitro's conventional proxy port (VSOCK_PROXY_PORT, the KMS proxy of the parent).
DEFAULT_PROXY_PORT: Final = 8000
#: Nitro's default --num_workers.
DEFAULT_NUM_WORKERS: Final = 4
#: Largest allowlist file we read (bytes); Nitro's shipped file is ~5 KiB.
MAX_CONFIG_SIZE: Final = 1 << 20
#: Largest number of allowlist entries (the shipped file has ~60).
MAX_ENTRIES: Final = 4096
#: Bound on one TCP connect to the remote endpoint (seconds).
CONNECT_TIMEOUT_S: Final = 10.0
#: Bound on resolving names during the allowlist check (seconds).
RESOLVE_TIMEOUT_S: Final = 10.0


class IpVersion(enum.Enum):
    """Which address families the proxy may use for the remote endpoint (``-4``, ``-6``)."""

    ANY = "any"
    IPV4 = "ipv4"
    IPV6 = "ipv6"

    @property
    def family(self) -> int:
        """The ``getaddrinfo`` family for this setting."""
        if self is IpVersion.IPV4:
            return _stdlib_socket.AF_INET
        if self is IpVersion.IPV6:
            return _stdlib_socket.AF_INET6
        return _stdlib_socket.AF_UNSPEC


class ProxyNotAllowed(ConfigurationError):
    """The remote endpoint is not on the allowlist; the proxy refuses to start."""


@dataclass(frozen=True, slots=True)
class AllowlistEntry:
    """One ``{address, port}`` item of the allowlist."""

    address: str
    port: int


def _entry(item: object, index: int) -> AllowlistEntry:
    if not isinstance(item, Mapping):
        raise ConfigurationError(f"allowlist[{index}] must be a mapping with address and port")
    unknown = set(item) - {"address", "port"}
    if unknown:
        raise ConfigurationError(
            f"allowlist[{index}] has unknown keys: {sorted(map(str, unknown))}"
        )
    address, port = item.get("address"), item.get("port")
    if not isinstance(address, str) or not address.strip() or len(address) > 253:
        # 253: the longest DNS name; IP literals are shorter.
        raise ConfigurationError(f"allowlist[{index}].address must be a host name or IP")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigurationError(f"allowlist[{index}].port must be an integer 1 … 65535")
    return AllowlistEntry(address.strip(), port)


@dataclass(frozen=True, slots=True)
class Allowlist:
    """The vsock-proxy allowlist (Nitro's YAML format). Empty means nothing is allowed."""

    entries: tuple[AllowlistEntry, ...] = ()

    @classmethod
    def from_mapping(cls, document: object) -> Allowlist:
        """Validate a parsed YAML document. Unknown keys are errors (fail closed)."""
        if document is None:
            return cls()
        if not isinstance(document, Mapping):
            raise ConfigurationError("the vsock-proxy config must be a mapping with 'allowlist'")
        unknown = set(document) - {"allowlist"}
        if unknown:
            raise ConfigurationError(
                f"unknown vsock-proxy config keys: {sorted(map(str, unknown))}"
            )
        items = document.get("allowlist")
        if items is None:
            return cls()
        if not isinstance(items, list):
            raise ConfigurationError("'allowlist' must be a list of {address, port} entries")
        if len(items) > MAX_ENTRIES:
            raise ConfigurationError(f"'allowlist' has more than {MAX_ENTRIES} entries")
        return cls(tuple(_entry(item, i) for i, item in enumerate(items)))

    @classmethod
    def from_yaml(cls, text: str | bytes) -> Allowlist:
        """Parse Nitro's YAML allowlist text."""
        if len(text) > MAX_CONFIG_SIZE:
            raise ConfigurationError(f"vsock-proxy config is larger than {MAX_CONFIG_SIZE} bytes")
        try:
            document: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigurationError(
                f"vsock-proxy config is not valid YAML: {_one_line(exc)}"
            ) from exc
        except RecursionError:  # PyYAML composes nested nodes recursively
            raise ConfigurationError("vsock-proxy config is nested too deeply") from None
        return cls.from_mapping(document)

    @classmethod
    def from_file(cls, path: Path) -> Allowlist:
        """Read the allowlist file at ``path``."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_CONFIG_SIZE + 1)
        except FileNotFoundError as exc:
            raise ConfigurationError(f"vsock-proxy config {path} does not exist") from exc
        except OSError as exc:
            raise ConfigurationError(f"cannot read vsock-proxy config {path}: {exc}") from exc
        return cls.from_yaml(data)

    @classmethod
    def of(cls, endpoints: Iterable[tuple[str, int]]) -> Allowlist:
        """An allowlist of ``(address, port)`` pairs (for embedding and tests)."""
        return cls.from_mapping({"allowlist": [{"address": a, "port": p} for a, p in endpoints]})


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's error as one line: what is wrong, and where (its str() spans several)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "syntax error"
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(problem).replace("\n", " ")


def _normalize_ip(text: str) -> str:
    return str(ipaddress.ip_address(text.split("%", 1)[0]))


def allowlist_matches(
    allowlist: Allowlist,
    remote_host: str,
    remote_port: int,
    *,
    remote_ips: Iterable[str],
    entry_ips: Mapping[str, Iterable[str]],
) -> bool:
    """Nitro's ``check_allowlist`` on pre-resolved addresses (pure).

    Args:
        remote_ips: the addresses ``remote_host`` resolves to.
        entry_ips: for each entry address, what it resolves to (missing: unresolvable).
    """
    wanted = {_normalize_ip(ip) for ip in remote_ips}
    for entry in allowlist.entries:
        if entry.port != remote_port:
            continue
        if entry.address == remote_host:
            return True
        if wanted & {_normalize_ip(ip) for ip in entry_ips.get(entry.address, ())}:
            return True
    return False


async def _resolve(host: str, family: int) -> list[str]:
    try:
        infos = await trio.socket.getaddrinfo(host, None, family, _stdlib_socket.SOCK_STREAM)
    except OSError:  # socket.gaierror: unresolvable
        return []
    return [str(info[4][0]) for info in infos]


async def check_allowlist(
    allowlist: Allowlist,
    remote_host: str,
    remote_port: int,
    *,
    ip_version: IpVersion = IpVersion.ANY,
) -> bool:
    """Resolve what is needed and apply :func:`allowlist_matches` (at most one lookup per name)."""
    family = ip_version.family
    with trio.fail_after(RESOLVE_TIMEOUT_S):
        remote_ips = await _resolve(remote_host, family)
        entry_ips: dict[str, list[str]] = {}
        for entry in allowlist.entries:
            if (
                entry.port == remote_port
                and entry.address != remote_host
                and remote_ips
                and entry.address not in entry_ips
            ):
                entry_ips[entry.address] = await _resolve(entry.address, family)
    return allowlist_matches(
        allowlist, remote_host, remote_port, remote_ips=remote_ips, entry_ips=entry_ips
    )


async def _open_tcp(host: str, port: int, ip_version: IpVersion) -> trio.SocketStream:
    if ip_version is IpVersion.ANY:
        return await trio.open_tcp_stream(host, port)
    infos = await trio.socket.getaddrinfo(host, port, ip_version.family, _stdlib_socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} has no {ip_version.value} address")
    error: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            await sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    assert error is not None
    raise error


async def serve_vsock_proxy(
    local_port: int,
    remote_host: str,
    remote_port: int,
    *,
    allowlist: Allowlist | Iterable[tuple[str, int]],
    num_workers: int = DEFAULT_NUM_WORKERS,
    fabric_dir: Path | None = None,
    ip_version: IpVersion = IpVersion.ANY,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run a vsock-proxy from ``(3, local_port)`` to ``remote_host:remote_port``. Never returns.

    Args:
        local_port: vsock port on the parent (CID 3) to listen on (``VMADDR_PORT_ANY``: any).
        remote_host, remote_port: the TCP endpoint; must be allowed by ``allowlist``.
        allowlist: the parsed allowlist (:meth:`Allowlist.from_file`), or ``(address, port)``
            pairs.
        num_workers: connections served at once (Nitro's ``--num_workers``).
        fabric_dir: listen in this fabric directory (default: this process's fabric backend).
        ip_version: restrict the remote address family (``-4`` / ``-6``).
        task_status: ``started(bound_port)`` once listening.

    Raises:
        ProxyNotAllowed: the endpoint is not allowed (checked before listening; logged).
        ConfigurationError: invalid ports or worker count.
    """
    VsockAddr(0, local_port)
    if isinstance(remote_port, bool) or not 1 <= remote_port <= 65535:
        raise ConfigurationError(f"remote port {remote_port} is not 1 … 65535")
    if num_workers < 1:
        raise ConfigurationError("num_workers must be at least 1")
    if not isinstance(allowlist, Allowlist):
        allowlist = Allowlist.of(allowlist)
    if not await check_allowlist(allowlist, remote_host, remote_port, ip_version=ip_version):
        log.warning("vsock_proxy_denied", remote=f"{remote_host}:{remote_port}")
        raise ProxyNotAllowed(
            f"The given address and port are not allowed: {remote_host}:{remote_port}"
        )
    listener = await open_vsock_listener(local_port, fabric_dir=fabric_dir)
    bound_port = int(listener.socket.getsockname()[1])
    remote = format_host_port(remote_host, remote_port)
    log.info(
        "vsock_proxy_listening",
        local=str(VsockAddr(3, bound_port)),
        remote=remote,
        num_workers=num_workers,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_forwarding,
                [listener],
                partial(_connect_remote, remote_host, remote_port, ip_version),
                name="vsock_proxy",
                target=remote,
                max_connections=num_workers,
                when_full="wait",  # Nitro: the others wait in the backlog for a worker
            )
        )
        task_status.started(bound_port)
    raise AssertionError("unreachable")  # pragma: no cover


async def _connect_remote(host: str, port: int, ip_version: IpVersion) -> trio.SocketStream:
    with trio.fail_after(CONNECT_TIMEOUT_S):
        return await _open_tcp(host, port, ip_version)
