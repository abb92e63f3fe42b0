"""kms: a local KMS daemon speaking the AWS KMS JSON protocol that releases keys only to
attested enclaves, and the enclave-side client.

Layers: pure cores (``sigv4``, ``api``, ``policy``, ``ciphertext``, ``cms``, ``integrity``;
crypto recipes in ``_wrap``) → the service (``service``: operations by family over one declared
scaffold; ``storage``, ``audit``, ``recipient``) → the HTTP adapter (``app``, ``daemon``) and the
client (``client``). kms imports attest and transport only. This face only re-exports.
"""

from __future__ import annotations

from .client import AttestedKmsClient as AttestedKmsClient
from .client import Credentials as Credentials
from .client import KmsClient as KmsClient
from .cms import build_enveloped_data as build_enveloped_data
from .cms import open_enveloped_data as open_enveloped_data
from .config import KmsConfig as KmsConfig
from .config import KmsConfigChanges as KmsConfigChanges
from .daemon import serve_kms as serve_kms
from .errors import KmsApiError as KmsApiError
from .errors import KmsError as KmsError

__all__ = [
    "Credentials",
    "KmsClient",
    "AttestedKmsClient",
    "KmsConfig",
    "KmsConfigChanges",
    "KmsError",
    "KmsApiError",
    "build_enveloped_data",
    "open_enveloped_data",
    "serve_kms",
]
