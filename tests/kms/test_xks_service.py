"""The XKS service without sockets (requests signed by botocore, handled in memory) and the
configuration: a key manager that hangs (DependencyTimeoutException, health UNAVAILABLE), the
health cache, and every refusal of the configuration loader."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from kms.xks import XksProxyConfig
from kms.xks._http import HttpRequest
from kms.xks.backing import FileKeyManager
from kms.xks.config import FileBackingSpec, XksKeyConfig
from kms.xks.keyring import Keyring, LoadedKey
from kms.xks.service import XksProxyService
from transport.errors import ConfigurationError

from .xks_helpers import (
    CRED,
    URI_PATH,
    health_metadata,
    key_file,
    metadata,
    signed_request,
    write_config,
)


class _HangingManager:
    id = "hung-hsm"
    model = "never answers"
    calls = 0

    async def check_health(self) -> str:
        type(self).calls += 1
        await trio.sleep_forever()
        raise AssertionError

    async def aclose(self) -> None:
        return None


class _HangingBacking:
    manager = _HangingManager()
    description = "a key manager that never answers"

    async def encrypt(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
        await trio.sleep_forever()
        raise AssertionError

    async def decrypt(self, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes:
        await trio.sleep_forever()
        raise AssertionError


def _service(**overrides: Any) -> XksProxyService:
    key = XksKeyConfig("slow", FileBackingSpec(Path("/unused")))
    config = XksProxyConfig(credentials=(CRED,), keys=(key,), uri_path=URI_PATH, **overrides)
    keyring = Keyring({"slow": LoadedKey(key, _HangingBacking())}, [_HangingManager()])
    return XksProxyService(config, keyring)


def _request(path: str, body: dict[str, Any]) -> HttpRequest:
    url = f"http://xks.example:4600{path}"
    prepared = signed_request(url, json.dumps(body).encode()).prepare()
    headers = [(k, v) for k, v in prepared.headers.items()]
    headers.append(("Host", "xks.example:4600"))
    return HttpRequest("POST", path, headers, prepared.body, "test")


async def test_a_hanging_key_manager_is_a_dependency_timeout(autojump_clock: Any) -> None:
    service = _service(dependency_timeout_s=2.0)
    body = {"requestMetadata": metadata(), "plaintext": "SGk=", "encryptionAlgorithm": "AES_GCM"}
    reply = await service.handle(_request(f"{URI_PATH}/keys/slow/encrypt", body))
    assert reply.status == 503
    assert json.loads(reply.body)["errorName"] == "DependencyTimeoutException"
    assert reply.authenticated  # a proxy-side failure: the caller may keep its connection


async def test_health_of_a_hanging_manager_is_unavailable_and_cached(autojump_clock: Any) -> None:
    service = _service(dependency_timeout_s=2.0, health_cache_s=10.0)
    _HangingManager.calls = 0
    request = _request(f"{URI_PATH}/health", {"requestMetadata": health_metadata()})
    first = json.loads((await service.handle(request)).body)
    assert first["ekmFleetDetails"] == [
        {"id": "hung-hsm", "model": "never answers", "healthStatus": "UNAVAILABLE"}
    ]
    await service.handle(request)
    assert _HangingManager.calls == 1  # cached (the spec allows up to one minute)
    await trio.sleep(11)
    await service.handle(request)
    assert _HangingManager.calls == 2


# -- configuration ---------------------------------------------------------------------------


_FILE = {"type": "file", "path": "k.bin"}


def _write(tmp_path: Path, **top: Any) -> Path:
    key_file(tmp_path, "k.bin")
    keys = top.pop("keys", [{"id": "k", "backing": {"type": "file", "path": "k.bin"}}])
    return write_config(tmp_path / "proxy.toml", keys, **top)


def test_a_good_config(tmp_path: Path) -> None:
    config = XksProxyConfig.from_toml(_write(tmp_path, dependency_timeout_s=1))
    assert config.uri_path == URI_PATH
    assert config.keys[0].backing == FileBackingSpec(tmp_path / "k.bin")
    assert config.source == (tmp_path / "proxy.toml").resolve()
    assert CRED.secret_access_key not in repr(config)


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"colour": "blue"}, "unknown keys"),
        ({"uri_path": "/no/suffix"}, "URI path"),
        ({"uri_path": "/a.b/kms/xks/v1"}, "URI path"),
        ({"region": "mars"}, "region"),
        ({"health_cache_s": 61}, "health_cache_s"),
        ({"max_body_bytes": 1024}, "max_body_bytes"),
        ({"dependency_timeout_s": 0}, "dependency_timeout_s"),
        ({"keys": [{"id": "k", "backing": {"type": "file", "path": "k.bin"}, "extra": 1}]},
         r"unknown keys in keys\[0\]"),
        ({"keys": [{"id": "k", "operations": "sign", "backing": _FILE}]},
         "operations must be one of"),
        ({"keys": [{"id": "k/1", "backing": _FILE}]}, "external key id"),
        ({"keys": [{"id": "k", "backing": {"type": "file", "path": "k.bin"}}] * 2}, "twice"),
        ({"keys": [{"id": "k", "backing": {"type": "vault"}}]}, "type must be"),
        ({"keys": [{"id": "k"}]}, "backing must be a table"),
        ({"keys": [{"id": "k", "backing": {"type": "file", "path": "none.bin"}}]}, None),
    ],
)  # fmt: skip
def test_config_refusals(tmp_path: Path, top: dict[str, Any], message: str | None) -> None:
    path = _write(tmp_path, **top)
    with pytest.raises(ConfigurationError, match=message):
        Keyring.load(XksProxyConfig.from_toml(path))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (CRED.access_key_id, "akia-lowercase-is-bad", "20-30 characters"),
        (CRED.access_key_id, "AKIASHORT", "20-30 characters"),
        (CRED.secret_access_key, "short", "43-64 characters"),
        (CRED.secret_access_key, "a" * 43 + "!", "43-64 characters"),
    ],
)
def test_credentials_follow_the_spec(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = _write(tmp_path)
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(ConfigurationError, match=message):
        XksProxyConfig.from_toml(path)


def test_credentials_are_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="1 to 8"):
        XksProxyConfig.from_toml(_write(tmp_path, credentials=()))


def test_inline_secret_needs_an_owner_only_config(tmp_path: Path) -> None:
    path = _write(tmp_path)
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        XksProxyConfig.from_toml(path)
    secret = tmp_path / "sigv4.secret"
    secret.write_text(CRED.secret_access_key + "\n")
    secret.chmod(0o600)
    text = path.read_text().replace(
        f'secret_access_key = "{CRED.secret_access_key}"', 'secret_access_key_file = "sigv4.secret"'
    )
    path.write_text(text)
    assert XksProxyConfig.from_toml(path).credentials[0] == CRED  # 0644 is fine without secrets


@pytest.mark.parametrize("problem", ["mode", "size", "symlink", "directory"])
def test_key_file_refusals(tmp_path: Path, problem: str) -> None:
    path = _write(tmp_path)
    key = tmp_path / "k.bin"
    if problem == "mode":
        key.chmod(0o640)
        message = "chmod 600"
    elif problem == "size":
        key.write_bytes(os.urandom(31))
        message = "exactly 32 raw bytes"
    elif problem == "symlink":
        real = key_file(tmp_path, "real.bin")
        key.unlink()
        key.symlink_to(real)
        message = "symlink"
    else:
        key.unlink()
        key.mkdir()
        message = "not a regular file"
    with pytest.raises(ConfigurationError, match=message):
        Keyring.load(XksProxyConfig.from_toml(path))


def test_no_keys_still_reports_a_key_manager(tmp_path: Path) -> None:
    keyring = Keyring.load(XksProxyConfig.from_toml(_write(tmp_path, keys=[])))
    assert [type(m) for m in keyring.managers] == [FileKeyManager]
