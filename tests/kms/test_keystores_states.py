"""The custom key store state machine under Hypothesis: random sequences of Connect, Disconnect,
Update (name, credential good or bad), Delete, CreateKey and Encrypt against a KMS app and a
real XKS proxy (both in-process, loopback), checked after every step against a model of AWS's
rules (kms.keystores.record): the state DescribeCustomKeyStores shows, which operations are
refused and with which error, and that the credential's secret is never answered."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.app import KmsApp, build_app
from kms.config import KmsConfig

from .helpers import app_call
from .xks_helpers import CRED, CRED2, URI_PATH, key_file, running_proxy, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

_ENV = {"ENCLAVE_KMS_ACCESS_KEY_ID": "AKIDSTATES", "ENCLAVE_KMS_SECRET_ACCESS_KEY": "states"}
_KEYS = ("k0", "k1", "k2")
#: A credential the proxy does not know (the spec's formats).
_BAD = {"AccessKeyId": "AKIAXKSNOTKNOWNBY2345", "RawSecretAccessKey": "Ym" * 22}
_GOOD = {"AccessKeyId": CRED.access_key_id, "RawSecretAccessKey": CRED.secret_access_key}
_ROTATED = {"AccessKeyId": CRED2.access_key_id, "RawSecretAccessKey": CRED2.secret_access_key}
_OPS = ("connect", "disconnect", "rename", "good_cred", "rotated_cred", "bad_cred", "delete",
        "create_key", "encrypt")  # fmt: skip


async def _call(app: KmsApp, operation: str, payload: dict[str, Any]) -> tuple[int, Any]:
    return await app_call(app, _ENV, operation, payload)


@dataclass
class _Model:
    """What AWS's rules say the store is."""

    state: str = "DISCONNECTED"
    good_cred: bool = True
    name: str = "s"
    keys: list[str] = field(default_factory=list)
    deleted: bool = False


def _expect_error(status: int, answer: Any, *types: str) -> None:
    assert status == 400, answer
    assert answer["__type"] in types, answer


async def _step(app: KmsApp, store: str, model: _Model, op: str, n: int) -> None:
    sid = {"CustomKeyStoreId": store}
    if model.deleted:
        if op in ("connect", "disconnect", "delete"):
            name = {"connect": "Connect", "disconnect": "Disconnect", "delete": "Delete"}[op]
            status, answer = await _call(app, f"{name}CustomKeyStore", sid)
            _expect_error(status, answer, "CustomKeyStoreNotFoundException")
        return
    state = model.state
    if op == "connect":
        status, answer = await _call(app, "ConnectCustomKeyStore", sid)
        if state == "FAILED":
            _expect_error(status, answer, "CustomKeyStoreInvalidStateException")
        else:
            assert status == 200, answer
            if state != "CONNECTED":
                model.state = "CONNECTED" if model.good_cred else "FAILED"
    elif op == "disconnect":
        status, answer = await _call(app, "DisconnectCustomKeyStore", sid)
        if state == "DISCONNECTED":
            _expect_error(status, answer, "CustomKeyStoreInvalidStateException")
        else:
            assert status == 200, answer
            model.state = "DISCONNECTED"
    elif op == "rename":
        new = f"s{n}"
        status, answer = await _call(
            app, "UpdateCustomKeyStore", {**sid, "NewCustomKeyStoreName": new}
        )
        if state in ("CONNECTED", "DISCONNECTED"):
            assert status == 200, answer
            model.name = new
        else:
            _expect_error(status, answer, "CustomKeyStoreInvalidStateException")
    elif op in ("good_cred", "rotated_cred", "bad_cred"):
        cred = {"good_cred": _GOOD, "rotated_cred": _ROTATED, "bad_cred": _BAD}[op]
        status, answer = await _call(
            app, "UpdateCustomKeyStore", {**sid, "XksProxyAuthenticationCredential": cred}
        )
        if state == "DISCONNECTED" or (state == "CONNECTED" and op != "bad_cred"):
            assert status == 200, answer
            model.good_cred = op != "bad_cred"
        elif state == "CONNECTED":  # checked with the proxy first: refused, nothing changed
            assert status == 400, answer
            assert answer["__type"].startswith("XksProxy"), answer
        else:
            _expect_error(status, answer, "CustomKeyStoreInvalidStateException")
    elif op == "delete":
        status, answer = await _call(app, "DeleteCustomKeyStore", sid)
        if state != "DISCONNECTED":
            _expect_error(status, answer, "CustomKeyStoreInvalidStateException")
        elif model.keys:
            _expect_error(status, answer, "CustomKeyStoreHasCMKsException")
        else:
            assert status == 200, answer
            model.deleted = True
    elif op == "create_key":
        if len(model.keys) == len(_KEYS):
            return
        xks_key = _KEYS[len(model.keys)]
        status, answer = await _call(
            app,
            "CreateKey",
            {"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": store, "XksKeyId": xks_key},
        )
        if state == "CONNECTED":
            assert status == 200, answer
            model.keys.append(answer["KeyMetadata"]["KeyId"])
        else:
            _expect_error(status, answer, "CustomKeyStoreInvalidStateException")
    elif op == "encrypt" and model.keys:
        status, answer = await _call(
            app, "Encrypt", {"KeyId": model.keys[-1], "Plaintext": base64.b64encode(b"x").decode()}
        )
        if state == "CONNECTED":
            assert status == 200, answer
        else:
            _expect_error(status, answer, "KMSInvalidStateException")


async def _check(app: KmsApp, store: str, model: _Model) -> None:
    status, answer = await _call(app, "DescribeCustomKeyStores", {})
    assert status == 200, answer
    assert CRED.secret_access_key not in json.dumps(answer)
    assert CRED2.secret_access_key not in json.dumps(answer)
    entries = answer["CustomKeyStores"]
    if model.deleted:
        assert entries == []
        return
    (entry,) = entries
    assert (entry["CustomKeyStoreId"], entry["CustomKeyStoreName"]) == (store, model.name)
    assert entry["ConnectionState"] == model.state
    assert ("ConnectionErrorCode" in entry) == (model.state == "FAILED")
    for key in model.keys:
        status, described = await _call(app, "DescribeKey", {"KeyId": key})
        want = "Enabled" if model.state == "CONNECTED" else "Unavailable"
        assert described["KeyMetadata"]["KeyState"] == want


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.sampled_from(_OPS), min_size=1, max_size=14))
def test_store_state_machine(tmp_path_factory: pytest.TempPathFactory, ops: list[str]) -> None:
    base = tmp_path_factory.mktemp("states")
    for name in _KEYS:
        key_file(base, f"{name}.bin")
    config = write_config(
        base / "proxy.toml",
        [{"id": k, "backing": {"type": "file", "path": f"{k}.bin"}} for k in _KEYS],
        credentials=(CRED, CRED2),
    )
    kms_config = KmsConfig(state_dir=base / "kms", audit_fsync=False)

    async def main() -> None:
        app = build_app(kms_config, env=_ENV)
        try:
            with trio.fail_after(120):
                async with running_proxy(config) as proxy:
                    status, created = await _call(
                        app,
                        "CreateCustomKeyStore",
                        {
                            "CustomKeyStoreName": "s",
                            "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
                            "XksProxyConnectivity": "PUBLIC_ENDPOINT",
                            "XksProxyUriEndpoint": proxy.endpoint,
                            "XksProxyUriPath": URI_PATH,
                            "XksProxyAuthenticationCredential": _GOOD,
                        },
                    )
                    assert status == 200, created
                    store, model = created["CustomKeyStoreId"], _Model()
                    for n, op in enumerate(ops):
                        await _step(app, store, model, op, n)
                        await _check(app, store, model)
                    await app.service.aclose_proxies()
        finally:
            app.close()

    trio.run(main)
