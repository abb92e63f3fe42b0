"""The XKS client the KMS daemon will use: against our proxy (operations, error mapping, kept
connections, a proxy that stops) and against misbehaving servers (silent, slow, garbage, HTTP
errors without the spec's body, oversized answers). Every failure must be the right
:class:`XksFailure`, hence the right AWS KMS error.

Loopback only; every test under an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from kms.xks import (
    RunningProxy,
    XksCallContext,
    XksCredential,
    XksFailure,
    XksProxyClient,
    XksProxyConfig,
    XksProxyError,
    serve_xks_proxy,
)

from .xks_helpers import CRED, IO_TIMEOUT_S, URI_PATH, key_file, request_metadata, write_config

pytestmark = pytest.mark.slow

MD = request_metadata("Encrypt")
HEALTH_MD = request_metadata("KmsHealthCheck")


@pytest.fixture
def config(tmp_path: Path) -> XksProxyConfig:
    key_file(tmp_path, "k.bin")
    key_file(tmp_path, "off.bin")
    path = write_config(
        tmp_path / "proxy.toml",
        [
            {"id": "k", "backing": {"type": "file", "path": "k.bin"}},
            {"id": "off", "enabled": False, "backing": {"type": "file", "path": "off.bin"}},
        ],
    )
    return XksProxyConfig.from_toml(path)


@asynccontextmanager
async def proxy_and_client(
    config: XksProxyConfig, **client_kwargs: object
) -> AsyncIterator[tuple[RunningProxy, XksProxyClient, trio.Event]]:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(partial(serve_xks_proxy, config, shutdown=shutdown))
        client = XksProxyClient(proxy.endpoint, URI_PATH, CRED, **client_kwargs)  # type: ignore[arg-type]
        try:
            yield proxy, client, shutdown
        finally:
            await client.aclose()
            shutdown.set()


# -- against our proxy -----------------------------------------------------------------------


async def test_operations(config: XksProxyConfig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with proxy_and_client(config) as (_, client, _):
            meta = await client.get_key_metadata("k", request_metadata("CreateKey"))
            assert (meta.key_spec, meta.key_usage, meta.key_status) == (
                "AES_256", ("ENCRYPT", "DECRYPT"), "ENABLED",
            )  # fmt: skip
            data_key, aad = os.urandom(32), b"kms header + encryption context"
            enc = await client.encrypt("k", data_key, metadata=MD, aad=aad)
            assert enc.cdiv is not None  # asked for and verified
            back = await client.decrypt(
                "k", enc.ciphertext, iv=enc.iv, tag=enc.tag, aad=aad, metadata=MD
            )
            assert back == data_key
            health = await client.test_connection(HEALTH_MD)
            assert health.ekm_fleet_details[0].health_status == "ACTIVE"


async def test_concurrent_calls(config: XksProxyConfig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with proxy_and_client(config) as (_, client, _):
            results: list[bytes] = []

            async def one(i: int) -> None:
                enc = await client.encrypt("k", bytes([i]) * 32, metadata=MD)
                results.append(
                    await client.decrypt("k", enc.ciphertext, iv=enc.iv, tag=enc.tag, metadata=MD)
                )

            async with trio.open_nursery() as n:
                for i in range(16):
                    n.start_soon(one, i)
            assert sorted(results) == sorted(bytes([i]) * 32 for i in range(16))


@pytest.mark.parametrize(
    ("key_id", "call", "failure", "context", "kms_type"),
    [
        ("nope", "metadata", XksFailure.KEY_NOT_FOUND, XksCallContext.CREATE_KEY,
         "XksKeyNotFoundException"),
        ("off", "encrypt", XksFailure.INVALID_STATE, XksCallContext.CRYPTO,
         "KMSInvalidStateException"),
        ("k", "decrypt", XksFailure.INVALID_CIPHERTEXT, XksCallContext.CRYPTO,
         "KMSInvalidStateException"),
    ],
)  # fmt: skip
async def test_proxy_errors_map_to_kms_errors(
    config: XksProxyConfig,
    key_id: str,
    call: str,
    failure: XksFailure,
    context: XksCallContext,
    kms_type: str,
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with proxy_and_client(config) as (_, client, _):
            calls = {
                "metadata": partial(client.get_key_metadata, key_id, MD),
                "encrypt": partial(client.encrypt, key_id, b"x", metadata=MD),
                "decrypt": partial(
                    client.decrypt, key_id, b"xx", iv=b"i" * 12, tag=b"t" * 16, metadata=MD
                ),
            }
            with pytest.raises(XksProxyError) as info:
                await calls[call]()
            assert info.value.failure is failure
            error = info.value.kms_error(context)
            assert error.type_name == kms_type
            assert error.message == failure.message
            assert info.value.error_message  # the proxy's own text, for the KMS log


async def test_wrong_credentials_and_path(config: XksProxyConfig) -> None:
    wrong = XksCredential(CRED.access_key_id, "d3Jvbmd3cm9uZ3dyb25nd3Jvbmd3cm9uZ3dyb25nMTI=")
    with trio.fail_after(IO_TIMEOUT_S):
        async with proxy_and_client(config) as (proxy, _, _):
            client = XksProxyClient(proxy.endpoint, URI_PATH, wrong)
            with pytest.raises(XksProxyError) as info:
                await client.get_health_status(HEALTH_MD)
            assert info.value.failure is XksFailure.AUTHENTICATION_FAILED
            assert info.value.connection_error_code == "INVALID_CREDENTIALS"
            assert info.value.kms_error(XksCallContext.KEY_STORE_MANAGEMENT).type_name == (
                "XksProxyIncorrectAuthenticationCredentialException"
            )
            other = XksProxyClient(proxy.endpoint, "/elsewhere/kms/xks/v1", CRED)
            with pytest.raises(XksProxyError) as info:
                await other.get_health_status(HEALTH_MD)
            assert info.value.failure is XksFailure.INVALID_URI_PATH
            assert info.value.kms_error(XksCallContext.KEY_STORE_MANAGEMENT).type_name == (
                "XksProxyInvalidConfigurationException"
            )
            await client.aclose()
            await other.aclose()


async def test_idle_connection_closed_by_the_proxy_is_replaced(config: XksProxyConfig) -> None:
    config = config.with_overrides(keep_alive_timeout_s=0.2)
    with trio.fail_after(IO_TIMEOUT_S):
        async with proxy_and_client(config) as (_, client, _):
            await client.get_health_status(HEALTH_MD)
            await trio.sleep(0.5)  # the proxy closes the kept connection meanwhile
            await client.get_health_status(HEALTH_MD)


async def test_a_stopped_proxy_fails_the_next_call_as_unreachable(config: XksProxyConfig) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with proxy_and_client(config, timeout_s=20.0) as (_, client, shutdown):
            await client.encrypt("k", b"x", metadata=MD)  # a kept connection now exists
            shutdown.set()
            await trio.testing.wait_all_tasks_blocked()  # listener and idle connection closed
            with pytest.raises(XksProxyError) as info:
                await client.encrypt("k", b"x", metadata=MD)
            # Refused at once, not a timeout: the owner's disconnection is visible immediately.
            assert info.value.failure is XksFailure.UNREACHABLE
            assert info.value.kms_error(XksCallContext.CRYPTO).type_name == (
                "KMSInvalidStateException"
            )


async def test_nothing_listening() -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        client = XksProxyClient(f"http://127.0.0.1:{port}", URI_PATH, CRED)
        with pytest.raises(XksProxyError) as info:
            await client.get_health_status(HEALTH_MD)
        assert info.value.failure is XksFailure.UNREACHABLE
        assert info.value.connection_error_code == "XKS_PROXY_NOT_REACHABLE"


def test_client_arguments_are_checked() -> None:
    for endpoint in ("ftp://x", "http://", "http://h/path", "h:1"):
        with pytest.raises(ValueError):
            XksProxyClient(endpoint, URI_PATH, CRED)
    with pytest.raises(ValueError):
        XksProxyClient("http://h", "/no/suffix", CRED)


# -- against misbehaving servers -------------------------------------------------------------

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def _read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )  # fmt: skip
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head


@asynccontextmanager
async def fake_proxy(handler: Handler) -> AsyncIterator[XksProxyClient]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        client = XksProxyClient(f"http://127.0.0.1:{port}", URI_PATH, CRED, timeout_s=0.5)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


def _answer(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _withhold(stream: trio.SocketStream) -> None:
    await _read_request(stream)
    await trio.sleep_forever()


async def _half_answer(stream: trio.SocketStream) -> None:
    await _read_request(stream)
    await stream.send_all(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"plain')
    await trio.sleep_forever()


async def _garbage(stream: trio.SocketStream) -> None:
    await _read_request(stream)
    await stream.send_all(b"\x16\x03\x01 this is not HTTP at all\r\n\r\n")
    await stream.aclose()


async def _cut_short(stream: trio.SocketStream) -> None:
    await _read_request(stream)
    await stream.send_all(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"plain')
    await stream.aclose()


async def _close_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


def _fixed(raw: bytes) -> Handler:
    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(raw)
        await stream.aclose()

    return handler


async def _huge(stream: trio.SocketStream) -> None:
    await _read_request(stream)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
    with trio.move_on_after(5):
        while True:
            await stream.send_all(b"x" * 65536)


def _health(status: str) -> bytes:
    return json.dumps({
        "xksProxyFleetSize": 1, "xksProxyVendor": "v", "xksProxyModel": "m", "ekmVendor": "e",
        "ekmFleetDetails": [{"id": "a", "model": "b", "healthStatus": status}],
    }).encode()  # fmt: skip


@pytest.mark.parametrize(
    ("handler", "failure"),
    [
        (_withhold, XksFailure.TIMED_OUT),
        (_half_answer, XksFailure.TIMED_OUT),
        (_garbage, XksFailure.MALFORMED_RESPONSE),
        (_cut_short, XksFailure.MALFORMED_RESPONSE),
        (_close_at_once, XksFailure.UNREACHABLE),
        (_huge, XksFailure.MALFORMED_RESPONSE),
        (_fixed(_answer(500, b"Internal Server Error", "text/plain")),
         XksFailure.MALFORMED_RESPONSE),
        (_fixed(_answer(200, b"{}")), XksFailure.MALFORMED_RESPONSE),
        (_fixed(_answer(200, b"not json")), XksFailure.MALFORMED_RESPONSE),
        (_fixed(_answer(200, _health("MAYBE"))), XksFailure.MALFORMED_RESPONSE),
        (_fixed(_answer(500, b'{"errorName":"InternalException","errorMessage":"hsm down"}')),
         XksFailure.INTERNAL),
        (_fixed(_answer(503, b'{"errorName":"DependencyTimeoutException"}')),
         XksFailure.DEPENDENCY_TIMEOUT),
        (_fixed(_answer(429, b'{"errorName":"ThrottlingException"}')), XksFailure.THROTTLING),
        (_fixed(_answer(400, b'{"errorName":"NoSuchThing"}')), XksFailure.MALFORMED_RESPONSE),
    ],
    ids=["withholds", "half-answer", "garbage", "cut-short", "closes", "huge", "500-text",
         "empty-200", "200-not-json", "bad-health-status", "internal", "dependency-timeout",
         "throttling", "unknown-error-name"],
)  # fmt: skip
async def test_misbehaving_proxies(handler: Handler, failure: XksFailure) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with fake_proxy(handler) as client:
            with pytest.raises(XksProxyError) as info:
                await client.get_health_status(HEALTH_MD)
    assert info.value.failure is failure, info.value
    assert info.value.kms_error(XksCallContext.CRYPTO).type_name == "KMSInvalidStateException"


async def test_wrong_sizes_in_crypto_answers() -> None:
    bad_encrypt = json.dumps(
        {
            "ciphertext": "AAAA",
            "initializationVector": "A" * 16,
            "authenticationTag": "A" * 22 + "==",
        }
    ).encode()
    with trio.fail_after(IO_TIMEOUT_S):
        async with fake_proxy(_fixed(_answer(200, bad_encrypt))) as client:
            with pytest.raises(XksProxyError) as info:  # 3 bytes of ciphertext for 5 of input
                await client.encrypt("k", b"12345", metadata=MD)
            assert info.value.failure is XksFailure.MALFORMED_RESPONSE
        async with fake_proxy(_fixed(_answer(200, b'{"plaintext":"AAAA"}'))) as client:
            with pytest.raises(XksProxyError) as info:  # 3 bytes of plaintext for 2 of input
                await client.decrypt("k", b"xx", iv=b"i" * 12, tag=b"t" * 16, metadata=MD)
            assert info.value.failure is XksFailure.MALFORMED_RESPONSE


async def test_all_key_managers_unavailable_fails_the_connection_test() -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with fake_proxy(_fixed(_answer(200, _health("UNAVAILABLE")))) as client:
            health = await client.get_health_status(HEALTH_MD)
            assert health.all_unavailable
            with pytest.raises(XksProxyError) as info:
                await client.test_connection(HEALTH_MD)
    assert info.value.failure is XksFailure.ALL_KEY_MANAGERS_UNAVAILABLE
    assert info.value.kms_error(XksCallContext.KEY_STORE_MANAGEMENT).type_name == (
        "XksProxyUriUnreachableException"
    )


async def test_kept_alive_connection_is_reused() -> None:
    accepted = 0
    body = _health("ACTIVE")

    async def keep_alive(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        while await _read_request(stream):
            await stream.send_all(_answer(200, body))

    with trio.fail_after(IO_TIMEOUT_S):
        async with fake_proxy(keep_alive) as client:
            for _ in range(5):
                await client.get_health_status(HEALTH_MD)
    assert accepted == 1
