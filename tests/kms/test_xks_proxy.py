"""The XKS proxy over HTTP on loopback, driven with requests signed by botocore's SigV4 signer
(``botocore.auth.SigV4Auth``) and sent by botocore's HTTP session: the spec's operations, its
error names and statuses, key operations and states, reload and disconnection, and the bounds
against hostile clients.

Rules: loopback only, port 0, an absolute ``trio.fail_after`` around every test's I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import pytest
import structlog
import trio
import trio.testing
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.xks import RunningProxy, XksProxyConfig

from .xks_helpers import (
    CRED,
    CRED2,
    IO_TIMEOUT_S,
    URI_PATH,
    call,
    health_metadata,
    key_file,
    metadata,
    running_proxy,
    signed_request,
    write_config,
)

pytestmark = pytest.mark.slow

KEY = b"K" * 32  # the file key's bytes, so tests can check ciphertexts independently


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    key_file(tmp_path, "both.bin", key=KEY)
    for name in ("enc.bin", "dec.bin", "none.bin", "off.bin"):
        key_file(tmp_path, name)
    return write_config(
        tmp_path / "proxy.toml",
        [
            {"id": "both", "backing": {"type": "file", "path": "both.bin"}},
            {"id": "enc", "operations": "encrypt", "backing": {"type": "file", "path": "enc.bin"}},
            {"id": "dec", "operations": "decrypt", "backing": {"type": "file", "path": "dec.bin"}},
            {"id": "none", "operations": "none", "backing": {"type": "file", "path": "none.bin"}},
            {"id": "off", "enabled": False, "backing": {"type": "file", "path": "off.bin"}},
        ],
        credentials=(CRED, CRED2),
    )


@pytest.fixture
async def proxy(config_path: Path) -> AsyncIterator[RunningProxy]:
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(config_path) as p:
            yield p


def _encrypt_body(plaintext: bytes, aad: bytes | None = None, cdiv: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "requestMetadata": metadata("Encrypt"),
        "plaintext": base64.b64encode(plaintext).decode(),
        "encryptionAlgorithm": "AES_GCM",
    }
    if aad is not None:
        body["additionalAuthenticatedData"] = base64.b64encode(aad).decode()
    if cdiv:
        body["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256"
    return body


def _decrypt_body(enc: dict[str, Any], aad: bytes | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "requestMetadata": metadata("Decrypt"),
        "ciphertext": enc["ciphertext"],
        "encryptionAlgorithm": "AES_GCM",
        "initializationVector": enc["initializationVector"],
        "authenticationTag": enc["authenticationTag"],
        **extra,
    }
    if aad is not None:
        body["additionalAuthenticatedData"] = base64.b64encode(aad).decode()
    return body


def _keys(key_id: str, op: str) -> str:
    return f"{URI_PATH}/keys/{key_id}/{op}"


# -- the operations --------------------------------------------------------------------------


async def test_health_status(proxy: RunningProxy) -> None:
    reply = await call(proxy, f"{URI_PATH}/health", {"requestMetadata": health_metadata()})
    assert reply.status == 200, reply.raw
    assert reply.headers["content-type"] == "application/json"
    body = reply.body
    assert body["xksProxyFleetSize"] == 1
    assert body["xksProxyVendor"]
    assert body["xksProxyModel"]
    assert body["ekmVendor"]
    assert [e["healthStatus"] for e in body["ekmFleetDetails"]] == ["ACTIVE"]


async def test_key_metadata_reports_usage_and_status(proxy: RunningProxy) -> None:
    expected = {
        "both": (["ENCRYPT", "DECRYPT"], "ENABLED"),
        "enc": (["ENCRYPT"], "ENABLED"),
        "dec": (["DECRYPT"], "ENABLED"),
        "none": ([], "ENABLED"),
        "off": (["ENCRYPT", "DECRYPT"], "DISABLED"),
    }
    for key_id, (usage, status) in expected.items():
        md = {k: v for k, v in metadata("CreateKey").items() if k != "kmsKeyArn"}
        reply = await call(proxy, _keys(key_id, "metadata"), {"requestMetadata": md})
        assert reply.status == 200, reply.raw
        assert reply.body == {"keySpec": "AES_256", "keyUsage": usage, "keyStatus": status}


async def test_encrypt_decrypt_round_trip_with_aad_and_cdiv(proxy: RunningProxy) -> None:
    plaintext, aad = os.urandom(4300), os.urandom(8192)  # the spec's minimum sizes
    enc = await call(proxy, _keys("both", "encrypt"), _encrypt_body(plaintext, aad, cdiv=True))
    assert enc.status == 200, enc.raw
    body = enc.body
    ct = base64.b64decode(body["ciphertext"])
    iv = base64.b64decode(body["initializationVector"])
    tag = base64.b64decode(body["authenticationTag"])
    assert len(ct) == len(plaintext)
    assert len(iv) == 12
    assert len(tag) == 16
    assert "ciphertextMetadata" not in body
    # CDIV computed independently (spec, Appendix C).
    cdiv = hashlib.sha256(aad + iv + ct + tag).digest()
    assert base64.b64decode(body["ciphertextDataIntegrityValue"]) == cdiv
    # AES-GCM with the spec's AAD framing, checked with cryptography directly.
    framed = len(aad).to_bytes(2, "big") + aad + b"\x00"
    assert AESGCM(KEY).decrypt(iv, ct + tag, framed) == plaintext
    dec = await call(proxy, _keys("both", "decrypt"), _decrypt_body(body, aad))
    assert dec.status == 200, dec.raw
    assert base64.b64decode(dec.body["plaintext"]) == plaintext


async def test_decrypt_of_an_independent_ciphertext_with_metadata(proxy: RunningProxy) -> None:
    """A ciphertext made outside the proxy with the spec's AAD rule (and ciphertextMetadata)
    decrypts; passing the metadata as AAD instead does not (the spec's note)."""
    aad, meta, iv = b"project=nile", b"key_version=1", os.urandom(12)
    framed = len(aad).to_bytes(2, "big") + aad + bytes([len(meta)]) + meta
    sealed = AESGCM(KEY).encrypt(iv, b"Hello World!", framed)
    enc = {
        "ciphertext": base64.b64encode(sealed[:-16]).decode(),
        "initializationVector": base64.b64encode(iv).decode(),
        "authenticationTag": base64.b64encode(sealed[-16:]).decode(),
    }
    meta_b64 = base64.b64encode(meta).decode()
    ok = await call(
        proxy, _keys("both", "decrypt"), _decrypt_body(enc, aad, ciphertextMetadata=meta_b64)
    )
    assert ok.status == 200
    assert base64.b64decode(ok.body["plaintext"]) == b"Hello World!"
    swapped = await call(proxy, _keys("both", "decrypt"), _decrypt_body(enc, aad + meta))
    assert (swapped.status, swapped.error) == (400, "InvalidCiphertextException")


@pytest.mark.parametrize(
    ("enc_aad", "dec_aad"), [(b"aad", None), (b"aad", b"other"), (None, b"aad"), (b"", b"\x00")]
)
async def test_wrong_aad_is_an_invalid_ciphertext(
    proxy: RunningProxy, enc_aad: bytes | None, dec_aad: bytes | None
) -> None:
    enc = await call(proxy, _keys("both", "encrypt"), _encrypt_body(b"plaintext", enc_aad))
    assert enc.status == 200
    dec = await call(proxy, _keys("both", "decrypt"), _decrypt_body(enc.body, dec_aad))
    assert (dec.status, dec.error) == (400, "InvalidCiphertextException")
    assert "plaintext" not in dec.body


async def test_tampered_ciphertext_iv_tag(proxy: RunningProxy) -> None:
    enc = (await call(proxy, _keys("both", "encrypt"), _encrypt_body(b"secret data"))).body

    def flip(field: str) -> dict[str, Any]:
        raw = bytearray(base64.b64decode(enc[field]))
        raw[0] ^= 1
        return {**enc, field: base64.b64encode(bytes(raw)).decode()}

    for field in ("ciphertext", "initializationVector", "authenticationTag"):
        dec = await call(proxy, _keys("both", "decrypt"), _decrypt_body(flip(field)))
        assert (dec.status, dec.error) == (400, "InvalidCiphertextException"), field


async def test_sixteen_byte_iv_is_unsupported(proxy: RunningProxy) -> None:
    enc = {"ciphertext": "AAAA", "initializationVector": base64.b64encode(os.urandom(16)).decode(),
           "authenticationTag": base64.b64encode(os.urandom(16)).decode()}  # fmt: skip
    dec = await call(proxy, _keys("both", "decrypt"), _decrypt_body(enc))
    assert (dec.status, dec.error) == (501, "UnsupportedOperationException")


# -- key operations and states ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_id", "encrypt_ok", "decrypt_ok"),
    [("enc", True, False), ("dec", False, True), ("none", False, False)],
)
async def test_allowed_operations(
    proxy: RunningProxy, key_id: str, encrypt_ok: bool, decrypt_ok: bool
) -> None:
    enc = await call(proxy, _keys(key_id, "encrypt"), _encrypt_body(b"x", b"aad", cdiv=True))
    if encrypt_ok:
        assert enc.status == 200
    else:
        assert (enc.status, enc.error) == (400, "InvalidKeyUsageException")
    fake = {"ciphertext": "AA==", "initializationVector": base64.b64encode(b"i" * 12).decode(),
            "authenticationTag": base64.b64encode(b"t" * 16).decode()}  # fmt: skip
    dec = await call(proxy, _keys(key_id, "decrypt"), _decrypt_body(fake))
    expected = (
        (400, "InvalidCiphertextException") if decrypt_ok else (400, "InvalidKeyUsageException")
    )
    assert (dec.status, dec.error) == expected


async def test_disabled_key_refuses_crypto(proxy: RunningProxy) -> None:
    enc = await call(proxy, _keys("off", "encrypt"), _encrypt_body(b"x"))
    assert (enc.status, enc.error) == (400, "InvalidStateException")


async def test_unknown_key(proxy: RunningProxy) -> None:
    for op, body in (("metadata", {"requestMetadata": metadata("DescribeKey")}),
                     ("encrypt", _encrypt_body(b"x"))):  # fmt: skip
        reply = await call(proxy, _keys("non_existing_key", op), body)
        assert (reply.status, reply.error) == (404, "KeyNotFoundException")


# -- authentication --------------------------------------------------------------------------


async def test_both_credentials_work_during_rotation(proxy: RunningProxy) -> None:
    for cred in (CRED, CRED2):
        reply = await call(proxy, f"{URI_PATH}/health", {"requestMetadata": health_metadata()},
                           credential=cred)  # fmt: skip
        assert reply.status == 200


@pytest.mark.parametrize(
    "signing",
    [
        {"credential": type(CRED)("AKIAXKSUNKNOWNKEY2345", CRED.secret_access_key)},
        {
            "credential": type(CRED)(
                CRED.access_key_id, "d3Jvbmd3cm9uZ3dyb25nd3Jvbmd3cm9uZ3dyb25nMTI="
            )
        },
        {"service": "kms"},
        {"region": "eu-west-1"},
    ],
    ids=["unknown-access-key", "wrong-secret", "wrong-service", "wrong-region"],
)
async def test_bad_signatures_are_opaque(proxy: RunningProxy, signing: dict[str, Any]) -> None:
    with structlog.testing.capture_logs() as logs:
        reply = await call(proxy, _keys("both", "encrypt"), _encrypt_body(b"x"), **signing)
    assert reply.status == 401
    assert reply.body == {
        "errorName": "AuthenticationFailedException",
        "errorMessage": "The request was rejected due to an invalid AWS SigV4 signature.",
    }
    assert reply.headers.get("connection") == "close"  # no keep-alive for unauthenticated peers
    line = next(e for e in logs if e["event"] == "xks_request")
    assert line["error"] == "AuthenticationFailedException"
    assert line["reason"]


async def test_unsigned_and_stale_requests(config_path: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        # The proxy's clock is an hour ahead: botocore's X-Amz-Date is stale for it.
        async with running_proxy(config_path, clock=lambda: time.time() + 3600) as p:
            stale = await call(p, f"{URI_PATH}/health", {"requestMetadata": health_metadata()})
            assert (stale.status, stale.error) == (401, "AuthenticationFailedException")

            def unsigned() -> tuple[int, bytes]:
                from botocore.awsrequest import AWSRequest
                from botocore.httpsession import URLLib3Session

                req = AWSRequest("POST", p.endpoint + f"{URI_PATH}/health", data=b"{}")
                resp = URLLib3Session().send(req.prepare())
                return resp.status_code, resp.content

            status, raw = await trio.to_thread.run_sync(unsigned)
            assert (status, json.loads(raw)["errorName"]) == (401, "AuthenticationFailedException")


async def test_body_is_covered_by_the_signature(proxy: RunningProxy) -> None:
    req = signed_request(proxy.endpoint + f"{URI_PATH}/health",
                         json.dumps({"requestMetadata": health_metadata()}).encode())  # fmt: skip
    req.data = json.dumps({"requestMetadata": {**health_metadata(), "kmsRequestId": "forged"}})
    from .xks_helpers import send

    reply = await trio.to_thread.run_sync(send, req)
    assert (reply.status, reply.error) == (401, "AuthenticationFailedException")


# -- URIs, methods, validation ---------------------------------------------------------------


async def test_invalid_uri_prefix_and_paths(proxy: RunningProxy) -> None:
    for path in ("/owner-a/invalid/kms/xks/v1/health", "/kms/xks/v1/health",
                 f"{URI_PATH}/keys/both/sign", f"{URI_PATH}/"):  # fmt: skip
        reply = await call(proxy, path, {"requestMetadata": health_metadata()})
        assert (reply.status, reply.error) == (404, "InvalidUriPathException"), path


async def test_get_on_an_api_uri_is_405(proxy: RunningProxy) -> None:
    for path in (f"{URI_PATH}/health", _keys("both", "encrypt")):
        reply = await call(proxy, path, b"", method="GET")
        assert reply.status == 405, path
    other = await call(proxy, "/elsewhere", b"", method="GET")
    assert (other.status, other.error) == (404, "InvalidUriPathException")


@pytest.mark.parametrize(
    "body",
    [b"{}", b'{"requestMetadata": {}}', b"not json", b"[1]", b'{"requestMetadata": []}'],
)
async def test_validation(proxy: RunningProxy, body: bytes) -> None:
    for path in (f"{URI_PATH}/health", _keys("both", "metadata"), _keys("both", "encrypt")):
        reply = await call(proxy, path, body)
        assert (reply.status, reply.error) == (400, "ValidationException"), (path, body)


async def test_encrypt_with_missing_plaintext(proxy: RunningProxy) -> None:
    body = _encrypt_body(b"x")
    del body["plaintext"]
    reply = await call(proxy, _keys("both", "encrypt"), body)
    assert (reply.status, reply.error) == (400, "ValidationException")


async def test_oversized_requests(proxy: RunningProxy) -> None:
    big = await call(proxy, _keys("both", "encrypt"), _encrypt_body(os.urandom(8601)))
    assert (big.status, big.error) == (501, "UnsupportedOperationException")
    huge = await call(proxy, _keys("both", "encrypt"), b"{" + b" " * (70 * 1024) + b"}")
    assert (huge.status, huge.error) == (501, "UnsupportedOperationException")


# -- logs ------------------------------------------------------------------------------------


async def test_one_log_line_per_request_without_secrets(proxy: RunningProxy) -> None:
    plaintext = b"do-not-log-this-plaintext-" + os.urandom(8).hex().encode()
    with structlog.testing.capture_logs() as logs:
        enc = await call(proxy, _keys("both", "encrypt"), _encrypt_body(plaintext))
        await call(proxy, _keys("both", "decrypt"), _decrypt_body(enc.body))
    lines = [e for e in logs if e["event"] == "xks_request"]
    assert len(lines) == 2
    assert lines[0]["kms_request_id"] == "req-1"
    assert lines[0]["operation"] == "ENCRYPT"
    assert lines[0]["aws_principal_arn"]
    assert lines[0]["key_id"] == "both"
    text = repr(logs)
    for secret in (plaintext.decode(), base64.b64encode(plaintext).decode(),
                   CRED.secret_access_key, CRED2.secret_access_key):  # fmt: skip
        assert secret not in text


# -- the owner's controls --------------------------------------------------------------------


def _rewrite(config_path: Path, old: str, new: str) -> None:
    text = config_path.read_text()
    assert old in text
    config_path.write_text(text.replace(old, new, 1))


async def test_disabling_a_key_by_reload_takes_effect_at_once(
    proxy: RunningProxy, config_path: Path
) -> None:
    enc = await call(proxy, _keys("both", "encrypt"), _encrypt_body(b"data key"))
    assert enc.status == 200
    text = config_path.read_text()
    config_path.write_text(text.replace('id = "both"', 'id = "both"\nenabled = false', 1))
    assert await proxy.reload()
    dec = await call(proxy, _keys("both", "decrypt"), _decrypt_body(enc.body))
    assert (dec.status, dec.error) == (400, "InvalidStateException")
    md = await call(proxy, _keys("both", "metadata"), {"requestMetadata": metadata("DescribeKey")})
    assert md.body["keyStatus"] == "DISABLED"
    config_path.write_text(text)  # re-enabled: the same ciphertext decrypts again
    assert await proxy.reload()
    dec = await call(proxy, _keys("both", "decrypt"), _decrypt_body(enc.body))
    assert dec.status == 200


async def test_disconnected_refuses_everything(proxy: RunningProxy, config_path: Path) -> None:
    _rewrite(config_path, 'region = "us-east-1"', 'region = "us-east-1"\ndisconnected = true')
    assert await proxy.reload()
    for path, body in ((f"{URI_PATH}/health", {"requestMetadata": health_metadata()}),
                       (_keys("both", "encrypt"), _encrypt_body(b"x")),
                       (_keys("both", "metadata"), {"requestMetadata": metadata()})):  # fmt: skip
        reply = await call(proxy, path, body)
        assert (reply.status, reply.error) == (400, "InvalidStateException"), path


async def test_a_failed_reload_fails_closed(proxy: RunningProxy, config_path: Path) -> None:
    good = config_path.read_text()
    config_path.write_text(good + "\nthis is not toml\n")
    with structlog.testing.capture_logs() as logs:
        assert not await proxy.reload()
    assert any(e["event"] == "xks_reload_failed" for e in logs)
    reply = await call(proxy, _keys("both", "encrypt"), _encrypt_body(b"x"))
    assert (reply.status, reply.error) == (400, "InvalidStateException")
    config_path.write_text(good)
    assert await proxy.reload()
    assert (await call(proxy, _keys("both", "encrypt"), _encrypt_body(b"x"))).status == 200


async def test_reload_refuses_a_key_file_made_readable(
    proxy: RunningProxy, config_path: Path
) -> None:
    (config_path.parent / "both.bin").chmod(0o644)
    assert not await proxy.reload()
    reply = await call(proxy, f"{URI_PATH}/health", {"requestMetadata": health_metadata()})
    assert reply.error == "InvalidStateException"


async def _raw_exchange(stream: trio.abc.Stream, conn: h11.Connection, url: str) -> int:
    """One botocore-signed health request on an open stream (keep-alive)."""
    body = json.dumps({"requestMetadata": health_metadata()}).encode()
    prepared = signed_request(url, body).prepare()
    parts = urlsplit(url)
    headers = [(k, v) for k, v in prepared.headers.items() if k.lower() != "content-length"]
    if not any(k.lower() == "host" for k, _ in headers):
        headers.append(("Host", parts.netloc))
    headers.append(("Content-Length", str(len(body))))
    data = conn.send(h11.Request(method="POST", target=parts.path, headers=headers))
    data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    await stream.send_all(data)
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return status


async def test_stopping_closes_kept_connections_and_refuses_new_ones(config_path: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        config = XksProxyConfig.from_toml(config_path)
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            from functools import partial

            from kms.xks import serve_xks_proxy

            p: RunningProxy = await nursery.start(
                partial(serve_xks_proxy, config, shutdown=shutdown)
            )
            stream = await trio.open_tcp_stream(p.host, p.port)
            conn = h11.Connection(h11.CLIENT)
            url = f"{p.endpoint}{URI_PATH}/health"
            assert await _raw_exchange(stream, conn, url) == 200  # authenticated: kept alive
            shutdown.set()
            assert await stream.receive_some(1024) == b""  # the idle connection is closed
            await stream.aclose()
        with pytest.raises(OSError):
            await trio.open_tcp_stream(p.host, p.port)


# -- hostile clients -------------------------------------------------------------------------


async def test_slow_request_head_is_cut_off(tmp_path: Path, config_path: Path) -> None:
    config = XksProxyConfig.from_toml(config_path).with_overrides(request_timeout_s=0.5)
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(config) as p:
            stream = await trio.open_tcp_stream(p.host, p.port)
            await stream.send_all(b"POST /owner-a/kms/xks/v1/health HTTP/1.1\r\nHost: x\r\n")
            assert await stream.receive_some(1024) == b""  # closed, no answer for the slowpoke
            await stream.aclose()
            # The proxy still serves others.
            ok = await call(p, f"{URI_PATH}/health", {"requestMetadata": health_metadata()})
            assert ok.status == 200


async def test_silent_connection_is_closed(config_path: Path) -> None:
    config = XksProxyConfig.from_toml(config_path).with_overrides(request_timeout_s=0.5)
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(config) as p:
            stream = await trio.open_tcp_stream(p.host, p.port)
            assert await stream.receive_some(1024) == b""
            await stream.aclose()


async def test_huge_head_is_refused(proxy: RunningProxy) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        stream = await trio.open_tcp_stream(proxy.host, proxy.port)
        await stream.send_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 20000 + b"\r\n\r\n"
        )
        reply = b""
        while chunk := await stream.receive_some(65536):
            reply += chunk
        await stream.aclose()
    # The spec pairs ValidationException with 400 (not 431).
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"ValidationException" in reply


async def test_unproven_connections_make_room_for_callers(config_path: Path) -> None:
    config = XksProxyConfig.from_toml(config_path).with_overrides(
        max_connections_per_source=2, max_connections=2
    )
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(config) as p:
            idle = [await trio.open_tcp_stream(p.host, p.port) for _ in range(2)]
            await trio.testing.wait_all_tasks_blocked()  # both accepted and admitted
            ok = await call(p, f"{URI_PATH}/health", {"requestMetadata": health_metadata()})
            assert ok.status == 200
            assert await idle[0].receive_some(16) == b""  # the oldest unproven was displaced
            for s in idle:
                await s.aclose()
