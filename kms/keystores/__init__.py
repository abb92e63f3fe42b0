"""kms.keystores: custom key stores on the KMS side (hold your own key). This face only
re-exports.

* :mod:`.record`: an external key store as stored, its connection states and their rules;
* :mod:`.blob`: the double-encrypted CiphertextBlob of a KMS key in an external key store;
* :mod:`.proxies`: this process's clients of the stores' XKS proxies.

The operations (CreateCustomKeyStore ... DescribeCustomKeyStores, and the crypto of keys in a
store) are in :mod:`kms.service.keystores` and :mod:`kms.service.external`; the owner's side
(the proxy) is :mod:`kms.xks`.
"""

from __future__ import annotations

from .blob import XksBlob as XksBlob
from .proxies import ProxyClients as ProxyClients
from .proxies import ProxySettings as ProxySettings
from .record import CONNECTED as CONNECTED
from .record import CONNECTING as CONNECTING
from .record import DISCONNECTED as DISCONNECTED
from .record import DISCONNECTING as DISCONNECTING
from .record import EXTERNAL_KEY_STORE as EXTERNAL_KEY_STORE
from .record import EXTERNAL_KEY_STORE_ORIGIN as EXTERNAL_KEY_STORE_ORIGIN
from .record import FAILED as FAILED
from .record import CustomKeyStoresListEntry as CustomKeyStoresListEntry
from .record import KeyStore as KeyStore
from .record import XksProxyConfiguration as XksProxyConfiguration

__all__ = [
    "KeyStore",
    "CustomKeyStoresListEntry",
    "XksProxyConfiguration",
    "XksBlob",
    "ProxyClients",
    "ProxySettings",
    "EXTERNAL_KEY_STORE",
    "EXTERNAL_KEY_STORE_ORIGIN",
    "CONNECTED",
    "CONNECTING",
    "DISCONNECTED",
    "DISCONNECTING",
    "FAILED",
]
