"""This process's clients of the external key stores' proxies (one per store, trio).

A client keeps a few HTTP connections to its proxy alive between calls (a TCP and TLS handshake
per call would not fit AWS's 250 ms budget); it caches nothing else. Every cryptographic call
and every key release goes to the proxy: what the proxy refuses now, KMS refuses now.

A client is rebuilt when its store's ``revision`` moves (a new endpoint, path or credential,
here or in another worker process) and dropped when its store is no longer CONNECTED or no
longer exists, so a disconnection also closes the kept connections.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from ..xks.client import DEFAULT_TIMEOUT_S, XksProxyClient
from ..xks.config import XksCredential
from .record import CONNECTED, KeyStore

__all__ = ["ProxyClients", "ProxySettings"]


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """How this KMS talks to XKS proxies.

    Attributes:
        timeout_s: bound on each call, connection set-up included. AWS KMS allows 250 ms; a
            local stack on a loaded 2-core machine needs more headroom.
        ssl_context: trust (and a client certificate, for mutual TLS) for ``https`` endpoints;
            None: the system's trust store.
        max_idle_connections: connections kept open per proxy between calls.
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    ssl_context: ssl.SSLContext | None = None
    max_idle_connections: int = 8


class ProxyClients:
    """One :class:`XksProxyClient` per connected external key store of this process.

    Args:
        region: the SigV4 region the proxies expect (this KMS's region).
        settings: timeouts and TLS.
    """

    def __init__(self, region: str, settings: ProxySettings | None = None) -> None:
        self._region = region
        self.settings = settings or ProxySettings()
        self._clients: dict[str, tuple[int, XksProxyClient]] = {}

    def make(self, store: KeyStore, secret: str) -> XksProxyClient:
        """A new client of ``store``'s proxy (a connection test owns and closes it)."""
        return XksProxyClient(
            store.endpoint,
            store.uri_path,
            XksCredential(store.access_key_id, secret),
            region=self._region,
            ssl_context=self.settings.ssl_context,
            timeout_s=self.settings.timeout_s,
            max_idle_connections=self.settings.max_idle_connections,
        )

    async def client(self, store: KeyStore, secret: str) -> XksProxyClient:
        """The client of a CONNECTED store's proxy (rebuilt if the store's settings moved)."""
        kept = self._clients.get(store.store_id)
        if kept is not None and kept[0] == store.revision:
            return kept[1]
        # Replace before awaiting the old one's close: a concurrent call then finds the new
        # client instead of making (and leaking) one of its own.
        client = self.make(store, secret)
        self._clients[store.store_id] = (store.revision, client)
        if kept is not None:
            await kept[1].aclose()
        return client

    async def prune(self, stores: Mapping[str, KeyStore]) -> None:
        """Drop the clients of stores gone, no longer CONNECTED, or changed."""
        for store_id, (revision, client) in list(self._clients.items()):
            store = stores.get(store_id)
            if store is None or store.state != CONNECTED or store.revision != revision:
                del self._clients[store_id]
                await client.aclose()

    async def discard(self, store_id: str) -> None:
        """Drop one store's client (disconnection, deletion)."""
        kept = self._clients.pop(store_id, None)
        if kept is not None:
            await kept[1].aclose()

    def __len__(self) -> int:
        return len(self._clients)

    async def aclose(self) -> None:
        """Close every client's kept connections."""
        clients, self._clients = self._clients, {}
        for _, client in clients.values():
            await client.aclose()
