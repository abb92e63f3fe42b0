"""A custom key store as the KMS keeps it (pure): its record, its connection states and AWS's
rules on which state allows which operation.

Only external key stores (``EXTERNAL_KEY_STORE``, public endpoint connectivity) exist here;
CloudHSM key stores and VPC endpoint service connectivity need AWS and answer
UnsupportedOperationException.

Connection states (botocore's ``ConnectionStateType``) and what each allows (the model's
``CustomKeyStoreInvalidStateException`` and the operations' documentation)::

    state          Connect   Disconnect  Update                        Delete  CreateKey/crypto
    DISCONNECTED   attempt   refused     every property                yes     refused
    CONNECTING     attempt   yes         refused                       no      refused
    CONNECTED      no-op     yes         name, credential, URI path    no      yes
    FAILED         refused   yes         refused                       no      refused
    DISCONNECTING  refused   refused     refused                       no      refused

A connection attempt (ConnectCustomKeyStore) writes CONNECTING with a fresh attempt id, asks the
proxy for its health (GetHealthStatus) and then writes CONNECTED, or FAILED with the
``ConnectionErrorCode`` of the failure, only if the record still shows that attempt: a
DisconnectCustomKeyStore (or a newer attempt) in the meantime wins. DisconnectCustomKeyStore
passes through DISCONNECTING while this process lets go of its connections to the proxy.

The record never holds the proxy credential's secret: that is wrapped under the master key in
the row beside it (:mod:`kms.integrity`) and never returned by any operation.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
from dataclasses import dataclass, replace
from typing import Final, TypedDict
from urllib.parse import urlsplit

from ..errors import KmsError

__all__ = [
    "EXTERNAL_KEY_STORE",
    "EXTERNAL_KEY_STORE_ORIGIN",
    "PUBLIC_ENDPOINT",
    "CONNECTED",
    "CONNECTING",
    "DISCONNECTED",
    "DISCONNECTING",
    "FAILED",
    "CONNECTION_STATES",
    "MAX_KEY_STORES",
    "STORE_ID_PREFIX",
    "KeyStore",
    "CustomKeyStoresListEntry",
    "XksProxyConfiguration",
    "EndpointError",
    "new_store_id",
    "validate_endpoint",
]

#: ``CustomKeyStoreType`` of an external key store.
EXTERNAL_KEY_STORE: Final = "EXTERNAL_KEY_STORE"
#: ``Origin`` of a KMS key in an external key store.
EXTERNAL_KEY_STORE_ORIGIN: Final = "EXTERNAL_KEY_STORE"
#: ``XksProxyConnectivity`` this KMS supports (VPC endpoint services exist only in AWS).
PUBLIC_ENDPOINT: Final = "PUBLIC_ENDPOINT"

CONNECTED: Final = "CONNECTED"
CONNECTING: Final = "CONNECTING"
DISCONNECTED: Final = "DISCONNECTED"
DISCONNECTING: Final = "DISCONNECTING"
FAILED: Final = "FAILED"
CONNECTION_STATES: Final = frozenset({CONNECTED, CONNECTING, DISCONNECTED, DISCONNECTING, FAILED})
#: AWS's quota: custom key stores per account and Region.
MAX_KEY_STORES: Final = 10

#: ``cks-`` and 17 hex digits, the shape of AWS's custom key store ids.
STORE_ID_PREFIX: Final = "cks-"
_STORE_ID_HEX = 17
_ENDPOINT_RE = re.compile(r"^(https?)://([a-zA-Z0-9.-]+)(?::([0-9]{1,5}))?$")


class EndpointError(KmsError, ValueError):
    """An XksProxyUriEndpoint this KMS cannot use (the message says why)."""


def new_store_id() -> str:
    """A fresh custom key store id (``cks-`` + 17 random hex digits, as AWS's)."""
    return STORE_ID_PREFIX + secrets.token_hex(9)[:_STORE_ID_HEX]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_endpoint(endpoint: str) -> str:
    """Check an XksProxyUriEndpoint and return it.

    AWS requires ``https://<host>`` on port 443. This KMS also accepts a port (an owner's proxy
    on one machine listens on a port of its choosing) and plain ``http://`` for loopback hosts
    only (the local test bed; the proxy's own HTTPS and mutual TLS are for real networks).

    Raises:
        EndpointError: malformed, or plain HTTP to a host that is not loopback.
    """
    m = _ENDPOINT_RE.fullmatch(endpoint)
    if m is None:
        raise EndpointError(
            "XksProxyUriEndpoint must be https://<host>[:<port>] (no path: that is XksProxyUriPath)"
        )
    scheme, host, port = m.group(1), m.group(2), m.group(3)
    if port is not None and not 0 < int(port) < 65536:
        raise EndpointError(f"XksProxyUriEndpoint port {port} is not a TCP port")
    if scheme == "http" and not _loopback(host):
        raise EndpointError(
            "XksProxyUriEndpoint must begin with https:// (plain http:// only to a loopback host)"
        )
    return endpoint


class XksProxyConfiguration(TypedDict):
    """The ``XksProxyConfiguration`` of a store as DescribeCustomKeyStores shows it (botocore's
    ``XksProxyConfigurationType``; never the credential's secret)."""

    Connectivity: str
    AccessKeyId: str
    UriEndpoint: str
    UriPath: str


class _ListEntryRequired(TypedDict):
    CustomKeyStoreId: str
    CustomKeyStoreName: str
    ConnectionState: str
    CreationDate: float
    CustomKeyStoreType: str
    XksProxyConfiguration: XksProxyConfiguration


# The optional field by inheritance, not NotRequired[]: under ``from __future__ import
# annotations`` Python 3.11 counts NotRequired fields among ``__required_keys__``.
class CustomKeyStoresListEntry(_ListEntryRequired, total=False):
    """One entry of DescribeCustomKeyStores's ``CustomKeyStores`` (botocore's
    ``CustomKeyStoresListEntry``, the fields an external key store has here)."""

    #: Only in the FAILED state.
    ConnectionErrorCode: str


@dataclass(frozen=True, slots=True)
class KeyStore:
    """One external key store (the stored record; see the module docstring).

    Attributes:
        revision: bumped by every change of the proxy's address or credential, so each worker
            process knows when to drop its client of the proxy.
        attempt: the id of the connection attempt in progress (CONNECTING only).
    """

    store_id: str
    name: str
    created: float
    endpoint: str
    uri_path: str
    access_key_id: str
    state: str = DISCONNECTED
    error_code: str | None = None
    connectivity: str = PUBLIC_ENDPOINT
    revision: int = 1
    attempt: str | None = None

    def record(self) -> str:
        """The stored form (canonical JSON: the tagged bytes are reproducible)."""
        return json.dumps(
            {
                "Name": self.name,
                "CreationDate": self.created,
                "Connectivity": self.connectivity,
                "UriEndpoint": self.endpoint,
                "UriPath": self.uri_path,
                "AccessKeyId": self.access_key_id,
                "ConnectionState": self.state,
                "ConnectionErrorCode": self.error_code,
                "Revision": self.revision,
                "Attempt": self.attempt,
            },
            sort_keys=True,
        )

    @classmethod
    def from_record(cls, store_id: str, text: str) -> KeyStore:
        """Inverse of :meth:`record` (ValueError/KeyError/TypeError if it does not parse)."""
        d = json.loads(text)
        state = str(d["ConnectionState"])
        if state not in CONNECTION_STATES:
            raise ValueError(f"unknown connection state {state!r}")
        error = d.get("ConnectionErrorCode")
        attempt = d.get("Attempt")
        return cls(
            store_id=store_id,
            name=str(d["Name"]),
            created=float(d["CreationDate"]),
            endpoint=str(d["UriEndpoint"]),
            uri_path=str(d["UriPath"]),
            access_key_id=str(d["AccessKeyId"]),
            state=state,
            error_code=str(error) if error is not None else None,
            connectivity=str(d["Connectivity"]),
            revision=int(d["Revision"]),
            attempt=str(attempt) if attempt is not None else None,
        )

    def with_state(self, state: str, *, error_code: str | None = None) -> KeyStore:
        """This store in ``state`` (the error code only with FAILED; no attempt unless
        CONNECTING)."""
        return replace(
            self,
            state=state,
            error_code=error_code if state == FAILED else None,
            attempt=self.attempt if state == CONNECTING else None,
        )

    @property
    def endpoint_and_path(self) -> str:
        """What must be unique among the external key stores of a Region."""
        return self.endpoint + self.uri_path

    @property
    def host(self) -> str:
        """The proxy's host name (for messages)."""
        return urlsplit(self.endpoint).hostname or self.endpoint

    def describe(self) -> CustomKeyStoresListEntry:
        """The ``CustomKeyStoresListEntry`` of DescribeCustomKeyStores (no secret)."""
        out: CustomKeyStoresListEntry = {
            "CustomKeyStoreId": self.store_id,
            "CustomKeyStoreName": self.name,
            "ConnectionState": self.state,
            "CreationDate": self.created,
            "CustomKeyStoreType": EXTERNAL_KEY_STORE,
            "XksProxyConfiguration": {
                "Connectivity": self.connectivity,
                "AccessKeyId": self.access_key_id,
                "UriEndpoint": self.endpoint,
                "UriPath": self.uri_path,
            },
        }
        if self.state == FAILED and self.error_code is not None:
            out["ConnectionErrorCode"] = self.error_code
        return out
