"""External key stores across worker processes (two worker apps over one store, each with its
own descriptors, as in test_coherence): a store created and connected through one worker is
usable through the other at once, and a disconnection through one refuses the other's very next
request and closes its connections to the proxy. And an owner's HTTPS proxy, trusted through
``SSL_CERT_FILE``."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

from .test_coherence import call
from .xks_helpers import (
    CRED,
    IO_TIMEOUT_S,
    URI_PATH,
    TestPki,
    key_file,
    running_proxy,
    write_config,
)

pytestmark = pytest.mark.timeout(60)


async def _refused(app: Any, operation: str, payload: dict[str, Any]) -> str:
    with pytest.raises(AssertionError) as e:
        await call(app, operation, payload)
    answer = e.value.args[0]
    assert isinstance(answer, dict)
    return str(answer["__type"])


async def test_store_changes_reach_the_other_worker(apps: Any, tmp_path: Path) -> None:
    a, b = apps
    key_file(tmp_path, "k.bin")
    config = write_config(
        tmp_path / "proxy.toml", [{"id": "k", "backing": {"type": "file", "path": "k.bin"}}]
    )
    with trio.fail_after(IO_TIMEOUT_S), structlog.testing.capture_logs() as logs:
        async with running_proxy(config) as proxy:
            store = (
                await call(
                    a,
                    "CreateCustomKeyStore",
                    {
                        "CustomKeyStoreName": "shared",
                        "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
                        "XksProxyConnectivity": "PUBLIC_ENDPOINT",
                        "XksProxyUriEndpoint": proxy.endpoint,
                        "XksProxyUriPath": URI_PATH,
                        "XksProxyAuthenticationCredential": {
                            "AccessKeyId": CRED.access_key_id,
                            "RawSecretAccessKey": CRED.secret_access_key,
                        },
                    },
                )
            )["CustomKeyStoreId"]
            await call(a, "ConnectCustomKeyStore", {"CustomKeyStoreId": store})
            key = (
                await call(
                    a,
                    "CreateKey",
                    {"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": store, "XksKeyId": "k"},
                )
            )["KeyMetadata"]["KeyId"]
            plaintext = base64.b64encode(b"through b").decode()
            blob = (await call(b, "Encrypt", {"KeyId": key, "Plaintext": plaintext}))[
                "CiphertextBlob"
            ]
            assert len(b.service.proxies) == 1  # b keeps connections to the proxy
            assert (await call(a, "Decrypt", {"CiphertextBlob": blob}))["Plaintext"] == plaintext

            await call(a, "DisconnectCustomKeyStore", {"CustomKeyStoreId": store})
            assert await _refused(b, "Decrypt", {"CiphertextBlob": blob}) == (
                "KMSInvalidStateException"
            )
            assert len(b.service.proxies) == 0  # and b let go of them
            listed = (await call(b, "DescribeCustomKeyStores", {}))["CustomKeyStores"]
            assert [s["ConnectionState"] for s in listed] == ["DISCONNECTED"]

            await call(b, "ConnectCustomKeyStore", {"CustomKeyStoreId": store})
            assert (await call(a, "Decrypt", {"CiphertextBlob": blob}))["Plaintext"] == plaintext
            # The secret never leaves either worker: not answered, not logged.
            for app in (a, b):
                described = await call(app, "DescribeCustomKeyStores", {})
                assert CRED.secret_access_key not in str(described)
    assert any(e["event"] == "kms_custom_key_store_created" for e in logs)
    assert CRED.secret_access_key not in repr(logs)


async def test_an_https_proxy_trusted_through_ssl_cert_file(
    apps: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner's HTTPS proxy with a private CA: the KMS verifies it against the system's trust
    store, which ``SSL_CERT_FILE`` replaces (README); an unknown CA fails the connection with
    XKS_PROXY_INVALID_TLS_CONFIGURATION."""
    a, _ = apps
    pki = TestPki(tmp_path, "Owner CA")
    server = pki.issue("server", "localhost", server=True)
    key_file(tmp_path, "k.bin")
    config = write_config(
        tmp_path / "proxy.toml",
        [{"id": "k", "backing": {"type": "file", "path": "k.bin"}}],
        tls={"certificate": server.cert, "private_key": server.key},
    )
    request = {
        "CustomKeyStoreName": "tls",
        "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
        "XksProxyConnectivity": "PUBLIC_ENDPOINT",
        "XksProxyUriPath": URI_PATH,
        "XksProxyAuthenticationCredential": {
            "AccessKeyId": CRED.access_key_id,
            "RawSecretAccessKey": CRED.secret_access_key,
        },
    }
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(config) as proxy:
            endpoint = f"https://localhost:{proxy.port}"
            request["XksProxyUriEndpoint"] = endpoint
            # Not trusted: the system store does not know the owner's CA.
            assert await _refused(a, "CreateCustomKeyStore", request) == (
                "XksProxyUriUnreachableException"
            )
            monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_path))
            store = (await call(a, "CreateCustomKeyStore", request))["CustomKeyStoreId"]
            await call(a, "ConnectCustomKeyStore", {"CustomKeyStoreId": store})
            key = (
                await call(
                    a,
                    "CreateKey",
                    {"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": store, "XksKeyId": "k"},
                )
            )["KeyMetadata"]["KeyId"]
            blob = (await call(a, "Encrypt", {"KeyId": key, "Plaintext": "aGk="}))[
                "CiphertextBlob"
            ]
            assert (await call(a, "Decrypt", {"CiphertextBlob": blob}))["Plaintext"] == "aGk="
            await call(a, "DisconnectCustomKeyStore", {"CustomKeyStoreId": store})
            monkeypatch.delenv("SSL_CERT_FILE")
            await call(a, "ConnectCustomKeyStore", {"CustomKeyStoreId": store})
            listed = (await call(a, "DescribeCustomKeyStores", {}))["CustomKeyStores"]
            assert (listed[0]["ConnectionState"], listed[0]["ConnectionErrorCode"]) == (
                "FAILED",
                "XKS_PROXY_INVALID_TLS_CONFIGURATION",
            )
