"""kms.xks: hold your own key. An XKS proxy (the owner's side of an AWS KMS external key store,
the public XKS Proxy API) and the client the KMS daemon uses to call one.

Layers: the wire codec (``codec``, sans-IO) and failure table (``failures``) → key backings
(``backing``: key files; ``pkcs11_backing``: PKCS#11 tokens) and their loading (``config``,
``keyring``) → the service (``service``, one request in, one reply out) → the HTTP adapter and
process (``_http``, ``server``); the client (``client``) uses the codec only. This face only
re-exports.
"""

from __future__ import annotations

from .client import XksProxyClient as XksProxyClient
from .codec import EkmDetailsJson as EkmDetailsJson
from .codec import EncryptResult as EncryptResult
from .codec import EncryptResultJson as EncryptResultJson
from .codec import HealthStatus as HealthStatus
from .codec import HealthStatusJson as HealthStatusJson
from .codec import KeyMetadata as KeyMetadata
from .codec import KeyMetadataJson as KeyMetadataJson
from .codec import RequestMetadata as RequestMetadata
from .config import KeyOperations as KeyOperations
from .config import XksCredential as XksCredential
from .config import XksProxyConfig as XksProxyConfig
from .config import XksProxyConfigChanges as XksProxyConfigChanges
from .errors import XksApiError as XksApiError
from .errors import XksError as XksError
from .errors import XksProxyError as XksProxyError
from .failures import XksCallContext as XksCallContext
from .failures import XksFailure as XksFailure
from .server import RunningProxy as RunningProxy
from .server import run_xks_proxy as run_xks_proxy
from .server import serve_xks_proxy as serve_xks_proxy

__all__ = [
    "XksProxyConfig",
    "XksProxyConfigChanges",
    "XksCredential",
    "KeyOperations",
    "serve_xks_proxy",
    "run_xks_proxy",
    "RunningProxy",
    "XksProxyClient",
    "RequestMetadata",
    "KeyMetadata",
    "EncryptResult",
    "HealthStatus",
    "KeyMetadataJson",
    "EncryptResultJson",
    "HealthStatusJson",
    "EkmDetailsJson",
    "XksCallContext",
    "XksFailure",
    "XksError",
    "XksApiError",
    "XksProxyError",
]
