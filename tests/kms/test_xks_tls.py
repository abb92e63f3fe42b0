"""The XKS proxy over HTTPS, with and without mutual TLS (spec, "Authentication"): botocore's
signer and HTTP session on one side (trusting a throw-away CA), our client on the other."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio

from kms.xks import (
    XksCallContext,
    XksFailure,
    XksProxyClient,
    XksProxyConfig,
    XksProxyError,
    serve_xks_proxy,
)
from transport.errors import ConfigurationError

from .xks_helpers import (
    CRED,
    IO_TIMEOUT_S,
    URI_PATH,
    Issued,
    TestPki,
    call,
    health_metadata,
    key_file,
    request_metadata,
    running_proxy,
    write_config,
)

pytestmark = pytest.mark.slow

KMS_SUBJECT = "cks.kms.us-east-1.amazonaws.com"
HEALTH = {"requestMetadata": health_metadata()}


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path, "XKS Test CA")


def _config(tmp_path: Path, server: Issued, **tls: object) -> Path:
    key_file(tmp_path, "k.bin")
    return write_config(
        tmp_path / "proxy.toml",
        [{"id": "k", "backing": {"type": "file", "path": "k.bin"}}],
        tls={"certificate": server.cert, "private_key": server.key, **tls},
    )


def _client_context(pki: TestPki, client: Issued | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    return ctx


async def test_https(tmp_path: Path, pki: TestPki) -> None:
    server = pki.issue("server", "localhost", server=True)
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(_config(tmp_path, server)) as p:
            assert p.endpoint.startswith("https://")
            reply = await call(p, f"{URI_PATH}/health", HEALTH, verify=str(pki.ca_path))
            assert reply.status == 200
            client = XksProxyClient(p.endpoint, URI_PATH, CRED, ssl_context=_client_context(pki))
            try:
                meta = await client.get_key_metadata("k", request_metadata("DescribeKey"))
                assert meta.key_status == "ENABLED"
            finally:
                await client.aclose()


async def test_untrusted_server_certificate_is_a_tls_failure(tmp_path: Path, pki: TestPki) -> None:
    other = TestPki(tmp_path, "Other CA")
    server = other.issue("server", "localhost", server=True)
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(_config(tmp_path, server)) as p:
            client = XksProxyClient(p.endpoint, URI_PATH, CRED, ssl_context=_client_context(pki))
            with pytest.raises(XksProxyError) as info:
                await client.get_health_status(request_metadata("KmsHealthCheck"))
            assert info.value.failure is XksFailure.TLS_FAILED
            assert info.value.connection_error_code == "XKS_PROXY_INVALID_TLS_CONFIGURATION"
            assert info.value.kms_error(XksCallContext.KEY_STORE_MANAGEMENT).type_name == (
                "XksProxyUriUnreachableException"
            )


async def test_mutual_tls(tmp_path: Path, pki: TestPki) -> None:
    server = pki.issue("server", "localhost", server=True)
    kms = pki.issue("kms", KMS_SUBJECT, server=False)
    wrong_name = pki.issue("wrong-name", "cks.kms.eu-west-1.amazonaws.com", server=False)
    stranger = TestPki(tmp_path, "Stranger CA").issue("stranger", KMS_SUBJECT, server=False)
    config = _config(tmp_path, server, client_ca=pki.ca_path, client_subject=KMS_SUBJECT)
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(config) as p:
            ok = await call(p, f"{URI_PATH}/health", HEALTH, verify=str(pki.ca_path),
                            client_cert=(str(kms.cert), str(kms.key)))  # fmt: skip
            assert ok.status == 200
            for label, cert in (("none", None), ("wrong subject", wrong_name),
                                ("other CA", stranger)):  # fmt: skip
                client = XksProxyClient(
                    p.endpoint, URI_PATH, CRED, ssl_context=_client_context(pki, cert)
                )
                with pytest.raises(XksProxyError) as info:
                    await client.get_health_status(request_metadata("KmsHealthCheck"))
                # The proxy refuses during or right after the handshake and closes (TLS 1.3
                # clients learn it on their first read): "cannot establish a TLS connection" or
                # "cannot communicate", never an answer.
                assert info.value.failure in (XksFailure.TLS_FAILED, XksFailure.UNREACHABLE), label
            good = XksProxyClient(p.endpoint, URI_PATH, CRED, ssl_context=_client_context(pki, kms))
            try:
                health = await good.get_health_status(request_metadata("KmsHealthCheck"))
                assert health.ekm_fleet_details[0].health_status == "ACTIVE"
            finally:
                await good.aclose()


def test_private_key_readable_by_others_is_refused(tmp_path: Path, pki: TestPki) -> None:
    server = pki.issue("server", "localhost", server=True)
    server.key.chmod(0o644)
    config = XksProxyConfig.from_toml(_config(tmp_path, server))

    with pytest.raises(ConfigurationError, match="chmod 600"):
        trio.run(serve_xks_proxy, config)


def test_client_subject_needs_a_client_ca(tmp_path: Path, pki: TestPki) -> None:
    server = pki.issue("server", "localhost", server=True)
    with pytest.raises(ConfigurationError, match="client_ca"):
        XksProxyConfig.from_toml(_config(tmp_path, server, client_subject=KMS_SUBJECT))
