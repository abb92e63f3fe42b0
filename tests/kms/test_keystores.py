"""External key stores, driven by boto3 and the AWS CLI against the daemon, with the real
``enclave kms xks-proxy`` process as the owner's proxy: the custom key store operations and
their connection states, CreateKey through GetKeyMetadata, double encryption (checked
independently with ``cryptography`` and the owner's key file), the request metadata the proxy
receives, and AWS's errors when the owner disables the key, the store is disconnected or the
proxy is gone."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from attest.ca import LocalCA
from kms.app import DB_FILE
from kms.ciphertext import encode_context
from kms.client import AttestedKmsClient, Credentials, KmsClient
from kms.config import KmsConfig
from kms.errors import KmsApiError
from kms.keystores import blob as xks_blob
from kms.xks.codec import gcm_aad

from .conftest import boto_client
from .helpers import (
    ADMIN,
    ALL_CREDS,
    ENCLAVE,
    DaemonThread,
    FakeEnclave,
    aws_cli,
    enclave_policy,
    root_pem_file,
)
from .xks_helpers import CRED, CRED2, URI_PATH, ProxyProcess, key_file, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

#: Proxy keys: one usable, one that may only encrypt, one disabled, one the tests toggle.
_KEYS = [
    {"id": "model-key", "backing": {"type": "file", "path": "model.bin"}},
    {"id": "encrypt-only", "operations": "encrypt", "backing": {"type": "file", "path": "e.bin"}},
    {"id": "off-key", "enabled": False, "backing": {"type": "file", "path": "off.bin"}},
    {"id": "toggled", "backing": {"type": "file", "path": "toggled.bin"}},
    {"id": "release-key", "backing": {"type": "file", "path": "release.bin"}},
]


class Bed:
    """A daemon, a proxy process, and what the tests need of both."""

    def __init__(
        self, daemon: DaemonThread, proxy: ProxyProcess, base: Path, ca: LocalCA | None = None
    ) -> None:
        self.daemon = daemon
        self.proxy = proxy
        self.base = base
        self.ca = ca
        self.kms = boto_client(daemon.endpoint, ADMIN)

    @property
    def config(self) -> Path:
        return self.base / "proxy.toml"

    def external_key(self, name: str) -> bytes:
        return (self.base / name).read_bytes()

    def set_enabled(self, key_id: str, enabled: bool) -> None:
        """The owner flips one key in its configuration and reloads the proxy."""
        text = self.config.read_text()
        marker = f'id = "{key_id}"'
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"#{key_id}:")]
        text = "\n".join(lines) + "\n"
        text = text.replace(f"{marker}\nenabled = false\n", f"{marker}\n")
        if not enabled:
            text = text.replace(f"{marker}\n", f"{marker}\nenabled = false\n")
        self.config.write_text(text)
        self.proxy.reload()

    @property
    def alias_endpoint(self) -> str:
        """The same proxy under another name (endpoint and path are unique per store)."""
        return self.proxy.endpoint.replace("127.0.0.1", "localhost")

    def new_store(self, name: str, *, alias: bool = False, **extra: Any) -> str:
        params: dict[str, Any] = {
            "CustomKeyStoreName": name,
            "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
            "XksProxyConnectivity": "PUBLIC_ENDPOINT",
            "XksProxyUriEndpoint": self.alias_endpoint if alias else self.proxy.endpoint,
            "XksProxyUriPath": URI_PATH,
            "XksProxyAuthenticationCredential": {
                "AccessKeyId": CRED.access_key_id,
                "RawSecretAccessKey": CRED.secret_access_key,
            },
        }
        params.update(extra)
        return str(self.kms.create_custom_key_store(**params)["CustomKeyStoreId"])

    def describe(self, store_id: str) -> dict[str, Any]:
        stores = self.kms.describe_custom_key_stores(CustomKeyStoreId=store_id)
        return dict(stores["CustomKeyStores"][0])


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    base = tmp_path_factory.mktemp("hyok")
    for name in ("model.bin", "e.bin", "off.bin", "toggled.bin", "release.bin"):
        key_file(base, name)
    config = write_config(base / "proxy.toml", _KEYS, credentials=(CRED, CRED2))
    ca = LocalCA.load_or_create(base / "ca")
    kms_config = KmsConfig(
        host="127.0.0.1",
        port=0,
        state_dir=base / "state",
        credentials=ALL_CREDS,
        trust_roots=(str(root_pem_file(ca, base)),),
        max_body_bytes=64 * 1024,
    )
    proxy = ProxyProcess(config)
    try:
        with DaemonThread(kms_config) as daemon:
            yield Bed(daemon, proxy, base, ca)
    finally:
        proxy.kill()


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


@pytest.fixture(scope="module")
def store(bed: Bed) -> str:
    """A connected store (shared by the tests that only need one)."""
    store_id = bed.new_store("shared-store")
    bed.kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    assert bed.describe(store_id)["ConnectionState"] == "CONNECTED"
    return store_id


@pytest.fixture(scope="module")
def xks_key(bed: Bed, store: str) -> str:
    meta = bed.kms.create_key(
        Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="model-key"
    )["KeyMetadata"]
    return str(meta["KeyId"])


# ------------------------------------------------------------------ the store's life


def test_store_lifecycle_and_states(bed: Bed) -> None:
    store_id = bed.new_store("lifecycle", alias=True)
    assert store_id.startswith("cks-")
    entry = bed.describe(store_id)
    assert entry["ConnectionState"] == "DISCONNECTED"
    assert entry["CustomKeyStoreType"] == "EXTERNAL_KEY_STORE"
    assert entry["XksProxyConfiguration"] == {
        "Connectivity": "PUBLIC_ENDPOINT",
        "AccessKeyId": CRED.access_key_id,
        "UriEndpoint": bed.alias_endpoint,
        "UriPath": URI_PATH,
    }
    # Nothing answers the secret.
    listing = json.dumps(bed.kms.describe_custom_key_stores()["CustomKeyStores"], default=str)
    assert CRED.secret_access_key not in listing
    # DISCONNECTED: no disconnect, no key.
    with pytest.raises(ClientError) as e:
        bed.kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    assert _code(e) == "CustomKeyStoreInvalidStateException"
    with pytest.raises(ClientError) as e:
        bed.kms.create_key(
            Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store_id, XksKeyId="model-key"
        )
    assert _code(e) == "CustomKeyStoreInvalidStateException"
    bed.kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    assert bed.describe(store_id)["ConnectionState"] == "CONNECTED"
    bed.kms.connect_custom_key_store(CustomKeyStoreId=store_id)  # CONNECTED: a no-op
    # CONNECTED: no delete, no endpoint change; the name may change.
    with pytest.raises(ClientError) as e:
        bed.kms.delete_custom_key_store(CustomKeyStoreId=store_id)
    assert _code(e) == "CustomKeyStoreInvalidStateException"
    with pytest.raises(ClientError) as e:
        bed.kms.update_custom_key_store(
            CustomKeyStoreId=store_id, XksProxyUriEndpoint="http://127.0.0.2:1"
        )
    assert _code(e) == "CustomKeyStoreInvalidStateException"
    bed.kms.update_custom_key_store(CustomKeyStoreId=store_id, NewCustomKeyStoreName="renamed")
    assert bed.describe(store_id)["CustomKeyStoreName"] == "renamed"
    by_name = bed.kms.describe_custom_key_stores(CustomKeyStoreName="renamed")
    assert [s["CustomKeyStoreId"] for s in by_name["CustomKeyStores"]] == [store_id]
    bed.kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    assert bed.describe(store_id)["ConnectionState"] == "DISCONNECTED"
    bed.kms.delete_custom_key_store(CustomKeyStoreId=store_id)
    with pytest.raises(ClientError) as e:
        bed.describe(store_id)
    assert _code(e) == "CustomKeyStoreNotFoundException"


def test_create_refusals(bed: Bed, store: str) -> None:
    with pytest.raises(ClientError) as e:
        bed.new_store("shared-store", XksProxyUriPath="/other/kms/xks/v1")
    assert _code(e) == "CustomKeyStoreNameInUseException"
    with pytest.raises(ClientError) as e:
        bed.new_store("same-proxy")
    assert _code(e) == "XksProxyUriInUseException"
    with pytest.raises(ClientError) as e:  # the proxy does not know this credential
        bed.new_store(
            "bad-cred",
            alias=True,
            XksProxyAuthenticationCredential={
                "AccessKeyId": "AKIAXKSUNKNOWNKEY2345",
                "RawSecretAccessKey": CRED.secret_access_key,
            },
        )
    assert _code(e) in (
        "XksProxyIncorrectAuthenticationCredentialException",
        "XksProxyInvalidConfigurationException",
    )
    with pytest.raises(ClientError) as e:  # nothing listens there
        bed.new_store("nobody", XksProxyUriEndpoint="http://127.0.0.1:9")
    assert _code(e) == "XksProxyUriUnreachableException"
    with pytest.raises(ClientError) as e:  # a proxy, but not at this path
        bed.new_store("wrong-path", alias=True, XksProxyUriPath="/elsewhere/kms/xks/v1")
    assert _code(e) == "XksProxyInvalidConfigurationException"
    with pytest.raises(ClientError) as e:  # plain HTTP only to loopback
        bed.new_store("public-http", XksProxyUriEndpoint="http://xks.example.com")
    assert _code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:
        bed.new_store("cloudhsm", CustomKeyStoreType="AWS_CLOUDHSM")
    assert _code(e) == "UnsupportedOperationException"
    with pytest.raises(ClientError) as e:
        bed.new_store("vpc", XksProxyConnectivity="VPC_ENDPOINT_SERVICE")
    assert _code(e) == "UnsupportedOperationException"


def test_connect_with_a_wrong_credential_fails_with_its_code(bed: Bed) -> None:
    store_id = bed.new_store("rotating", alias=True)
    # DISCONNECTED: any property may change, unchecked until the next connection.
    bed.kms.update_custom_key_store(
        CustomKeyStoreId=store_id,
        XksProxyAuthenticationCredential={
            "AccessKeyId": "AKIAXKSUNKNOWNKEY2345",
            "RawSecretAccessKey": CRED.secret_access_key,
        },
    )
    bed.kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    entry = bed.describe(store_id)
    assert entry["ConnectionState"] == "FAILED"
    assert entry["ConnectionErrorCode"] in (
        "XKS_PROXY_INVALID_CONFIGURATION",
        "INVALID_CREDENTIALS",
    )
    with pytest.raises(ClientError) as e:  # FAILED: disconnect first
        bed.kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    assert _code(e) == "CustomKeyStoreInvalidStateException"
    bed.kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    # The owner's rotated credential (the proxy knows both): connects.
    bed.kms.update_custom_key_store(
        CustomKeyStoreId=store_id,
        XksProxyAuthenticationCredential={
            "AccessKeyId": CRED2.access_key_id,
            "RawSecretAccessKey": CRED2.secret_access_key,
        },
    )
    bed.kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    entry = bed.describe(store_id)
    assert entry["ConnectionState"] == "CONNECTED"
    assert "ConnectionErrorCode" not in entry
    assert entry["XksProxyConfiguration"]["AccessKeyId"] == CRED2.access_key_id
    bed.kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    bed.kms.delete_custom_key_store(CustomKeyStoreId=store_id)


# ------------------------------------------------------------------ keys in the store


def test_create_key_checks_the_external_key(bed: Bed, store: str, xks_key: str) -> None:
    meta = bed.kms.describe_key(KeyId=xks_key)["KeyMetadata"]
    assert meta["Origin"] == "EXTERNAL_KEY_STORE"
    assert meta["CustomKeyStoreId"] == store
    assert meta["XksKeyConfiguration"] == {"Id": "model-key"}
    assert meta["KeyState"] == "Enabled"
    assert "CurrentKeyMaterialId" not in meta
    cases = {
        "no-such-key": "XksKeyNotFoundException",
        "encrypt-only": "XksKeyInvalidConfigurationException",
        "off-key": "XksKeyInvalidConfigurationException",
        "model-key": "XksKeyAlreadyInUseException",
    }
    for xks_key_id, code in cases.items():
        with pytest.raises(ClientError) as e:
            bed.kms.create_key(
                Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId=xks_key_id
            )
        assert _code(e) == code, xks_key_id
    with pytest.raises(ClientError) as e:
        bed.kms.create_key(
            Origin="EXTERNAL_KEY_STORE",
            CustomKeyStoreId=store,
            XksKeyId="toggled",
            KeySpec="HMAC_256",
            KeyUsage="GENERATE_VERIFY_MAC",
        )
    assert _code(e) == "UnsupportedOperationException"
    with pytest.raises(ClientError) as e:
        bed.kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId="cks-00000000000000000")
    assert _code(e) == "ValidationException"  # no XksKeyId
    with pytest.raises(ClientError) as e:
        bed.kms.create_key(
            Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId="cks-00000000000000000", XksKeyId="k"
        )
    assert _code(e) == "CustomKeyStoreNotFoundException"
    with pytest.raises(ClientError) as e:  # a store with a key cannot be deleted
        bed.kms.delete_custom_key_store(CustomKeyStoreId=store)
    assert _code(e) == "CustomKeyStoreInvalidStateException"


def _outer_open(bed: Bed, blob: bytes, context: dict[str, str]) -> tuple[xks_blob.XksBlob, bytes]:
    """Remove the outer layer with the owner's key file, independently of our code paths:
    AES-256-GCM, the proxy's IV, the AAD as the proxy frames it (spec: lengths included)."""
    parsed = xks_blob.parse(blob)
    aad = parsed.header + hashlib.sha256(encode_context(context)).digest()
    key = AESGCM(bed.external_key("model.bin"))
    inner = key.decrypt(
        parsed.iv, parsed.ciphertext + parsed.tag, gcm_aad(aad, parsed.ciphertext_metadata)
    )
    return parsed, inner


def test_double_encryption(bed: Bed, xks_key: str) -> None:
    context = {"purpose": "model", "tenant": "a"}
    plaintext = b"weights of a model " * 20
    enc = bed.kms.encrypt(KeyId=xks_key, Plaintext=plaintext, EncryptionContext=context)
    blob = enc["CiphertextBlob"]
    assert enc["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    assert "KeyMaterialId" not in enc
    parsed, inner = _outer_open(bed, blob, context)
    assert parsed.key_id == xks_key
    assert parsed.key_version == 1
    # The inner layer is KMS's own AES-GCM: nonce, ciphertext, tag; not the plaintext.
    assert len(inner) == 12 + len(plaintext) + 16
    assert plaintext not in inner
    assert plaintext[:16] not in blob
    # The external key alone does not open it; KMS (with the proxy) does.
    out = bed.kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)
    assert out["Plaintext"] == plaintext
    assert out["KeyId"].endswith(xks_key)
    # A wrong context fails, in the owner's key manager first (the outer AAD binds it).
    with pytest.raises(Exception):  # noqa: B017 - cryptography's InvalidTag
        _outer_open(bed, blob, {"purpose": "model", "tenant": "b"})
    with pytest.raises(ClientError) as e:
        bed.kms.decrypt(CiphertextBlob=blob, EncryptionContext={"purpose": "model"})
    assert _code(e) == "KMSInvalidStateException"
    # A flipped bit anywhere: refused (a key id no longer known answers as AWS does for one).
    refusals = ("InvalidCiphertextException", "KMSInvalidStateException", "AccessDeniedException")
    for at in (0, 3, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[at] ^= 1
        with pytest.raises(ClientError) as e:
            bed.kms.decrypt(CiphertextBlob=bytes(bad), EncryptionContext=context)
        assert _code(e) in refusals, at


def test_data_keys_and_reencrypt(bed: Bed, xks_key: str) -> None:
    ctx = {"k": "v"}
    dk = bed.kms.generate_data_key(KeyId=xks_key, KeySpec="AES_256", EncryptionContext=ctx)
    assert len(dk["Plaintext"]) == 32
    assert "KeyMaterialId" not in dk
    _, inner = _outer_open(bed, dk["CiphertextBlob"], ctx)
    assert len(inner) == 12 + 32 + 16
    back = bed.kms.decrypt(CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=ctx)
    assert back["Plaintext"] == dk["Plaintext"]
    wp = bed.kms.generate_data_key_without_plaintext(KeyId=xks_key, NumberOfBytes=16)
    assert len(bed.kms.decrypt(CiphertextBlob=wp["CiphertextBlob"])["Plaintext"]) == 16
    # ReEncrypt out of the store to a standard key and back in.
    standard = bed.kms.create_key()["KeyMetadata"]["KeyId"]
    moved = bed.kms.re_encrypt(
        CiphertextBlob=dk["CiphertextBlob"],
        SourceEncryptionContext=ctx,
        DestinationKeyId=standard,
    )
    assert bed.kms.decrypt(CiphertextBlob=moved["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
    home = bed.kms.re_encrypt(CiphertextBlob=moved["CiphertextBlob"], DestinationKeyId=xks_key)
    assert bed.kms.decrypt(CiphertextBlob=home["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
    # A standard blob claiming the external key (or the other way round) never opens.
    with pytest.raises(ClientError) as e:
        bed.kms.decrypt(CiphertextBlob=moved["CiphertextBlob"], KeyId=xks_key)
    assert _code(e) == "IncorrectKeyException"
    # Keys in a custom key store generate no data key pairs and do not rotate (AWS).
    for refused in (
        lambda: bed.kms.generate_data_key_pair(KeyId=xks_key, KeyPairSpec="ECC_NIST_P256"),
        lambda: bed.kms.rotate_key_on_demand(KeyId=xks_key),
        lambda: bed.kms.enable_key_rotation(KeyId=xks_key),
    ):
        with pytest.raises(ClientError) as e:
            refused()
        assert _code(e) == "UnsupportedOperationException"


def test_the_proxy_receives_the_request_metadata(bed: Bed, xks_key: str) -> None:
    enc = bed.kms.encrypt(KeyId=xks_key, Plaintext=b"x")
    request_id = enc["ResponseMetadata"]["RequestId"]
    deadline = time.monotonic() + 30
    while True:
        lines = [ln for ln in bed.proxy.output() if request_id in ln]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 1, bed.proxy.seen[-5:]
    line = lines[0]
    assert "Encrypt" in line
    assert ADMIN.principal_arn in line
    assert f"key/{xks_key}" in line


def test_owner_disables_the_key(bed: Bed, store: str) -> None:
    key_id = bed.kms.create_key(
        Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="toggled"
    )["KeyMetadata"]["KeyId"]
    blob = bed.kms.encrypt(KeyId=key_id, Plaintext=b"secret")["CiphertextBlob"]
    bed.set_enabled("toggled", False)
    try:
        for call in (
            lambda: bed.kms.decrypt(CiphertextBlob=blob),
            lambda: bed.kms.encrypt(KeyId=key_id, Plaintext=b"more"),
            lambda: bed.kms.generate_data_key(KeyId=key_id, NumberOfBytes=32),
        ):
            with pytest.raises(ClientError) as e:
                call()
            assert _code(e) == "KMSInvalidStateException"
            assert "not enabled in the external key manager" in e.value.response["Error"]["Message"]
    finally:
        bed.set_enabled("toggled", True)
    assert bed.kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"secret"
    bed.kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)


def test_disconnect_and_a_dead_proxy(bed: Bed) -> None:
    """DisconnectCustomKeyStore: the keys are Unavailable and refused at once, and come back
    with the connection. The proxy stopped: refused at once with AWS's error."""
    own = ProxyProcess(bed.config)  # a proxy of its own: this store outlives the test
    try:
        other = Bed(bed.daemon, own, bed.base)
        store_id = other.new_store("to-disconnect")
        bed.kms.connect_custom_key_store(CustomKeyStoreId=store_id)
        key_id = bed.kms.create_key(
            Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store_id, XksKeyId="toggled"
        )["KeyMetadata"]["KeyId"]
        blob = bed.kms.encrypt(KeyId=key_id, Plaintext=b"secret")["CiphertextBlob"]
        bed.kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
        assert bed.kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Unavailable"
        with pytest.raises(ClientError) as e:
            bed.kms.decrypt(CiphertextBlob=blob)
        assert _code(e) == "KMSInvalidStateException"
        with pytest.raises(ClientError) as e:
            bed.kms.delete_custom_key_store(CustomKeyStoreId=store_id)
        assert _code(e) == "CustomKeyStoreHasCMKsException"
        bed.kms.connect_custom_key_store(CustomKeyStoreId=store_id)
        assert bed.kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
        assert bed.kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"secret"
        assert own.stop() == 0
        with pytest.raises(ClientError) as e:
            bed.kms.decrypt(CiphertextBlob=blob)
        assert _code(e) == "KMSInvalidStateException"
        assert "proxy" in e.value.response["Error"]["Message"]
    finally:
        own.kill()


# ------------------------------------------------------------------ the AWS CLI, state at rest


def test_aws_cli_drives_every_store_operation(bed: Bed) -> None:
    def cli(*args: str) -> Any:
        code, out, err = aws_cli(bed.daemon.endpoint, ADMIN, *args)
        assert code == 0, err
        return out

    # As JSON input: the CLI would fetch an http:// URL given as a parameter's value.
    request = {
        "CustomKeyStoreName": "from-the-cli",
        "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
        "XksProxyConnectivity": "PUBLIC_ENDPOINT",
        "XksProxyUriEndpoint": bed.alias_endpoint,
        "XksProxyUriPath": URI_PATH,
        "XksProxyAuthenticationCredential": {
            "AccessKeyId": CRED.access_key_id,
            "RawSecretAccessKey": CRED.secret_access_key,
        },
    }
    created = cli("create-custom-key-store", "--cli-input-json", json.dumps(request))
    store_id = created["CustomKeyStoreId"]
    cli("connect-custom-key-store", "--custom-key-store-id", store_id)
    listed = cli("describe-custom-key-stores", "--custom-key-store-name", "from-the-cli")
    assert listed["CustomKeyStores"][0]["ConnectionState"] == "CONNECTED"
    cli(
        "update-custom-key-store",
        "--custom-key-store-id", store_id,
        "--new-custom-key-store-name", "cli-renamed",
    )  # fmt: skip
    cli("disconnect-custom-key-store", "--custom-key-store-id", store_id)
    cli("delete-custom-key-store", "--custom-key-store-id", store_id)
    code, _, err = aws_cli(
        bed.daemon.endpoint, ADMIN, "describe-custom-key-stores", "--custom-key-store-id", store_id
    )
    assert code != 0
    assert "CustomKeyStoreNotFoundException" in err


def test_secret_at_rest_restart_and_tamper(bed: Bed, tmp_path: Path) -> None:
    """The credential's secret is never in the database in clear; a restarted daemon uses the
    store; a tampered store row is refused at load (its keys become Unavailable)."""
    ca = LocalCA.load_or_create(tmp_path / "ca")
    config = KmsConfig(
        host="127.0.0.1",
        port=0,
        state_dir=tmp_path / "state",
        credentials=ALL_CREDS,
        trust_roots=(str(root_pem_file(ca, tmp_path)),),
    )
    with DaemonThread(config) as first:
        kms = boto_client(first.endpoint, ADMIN)
        other = Bed(first, bed.proxy, bed.base)
        store_id = other.new_store("persisted")
        kms.connect_custom_key_store(CustomKeyStoreId=store_id)
        key_id = kms.create_key(
            Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store_id, XksKeyId="model-key"
        )["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key_id, Plaintext=b"kept")["CiphertextBlob"]
    db = tmp_path / "state" / DB_FILE
    secret = CRED.secret_access_key.encode()
    for path in tmp_path.joinpath("state").iterdir():
        raw = path.read_bytes()
        assert secret not in raw, path
        assert base64.b64decode(secret) not in raw, path
    with DaemonThread(config) as second:
        kms = boto_client(second.endpoint, ADMIN)
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"kept"
    with sqlite3.connect(db) as conn:
        (record,) = conn.execute(
            "SELECT record FROM custom_key_stores WHERE store_id=?", (store_id,)
        ).fetchone()
        forged = record.replace(bed.proxy.endpoint, "http://127.0.0.1:9")
        assert forged != record
        conn.execute("UPDATE custom_key_stores SET record=? WHERE store_id=?", (forged, store_id))
    with DaemonThread(config) as third:
        kms = boto_client(third.endpoint, ADMIN)
        assert kms.describe_custom_key_stores()["CustomKeyStores"] == []
        assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Unavailable"
        with pytest.raises(ClientError) as e:
            kms.decrypt(CiphertextBlob=blob)
        assert _code(e) == "KMSInvalidStateException"


class _Relay:
    """A TCP relay in front of the proxy that can stall: bytes then go nowhere, so the proxy
    never answers (a slow proxy, as KMS sees one)."""

    def __init__(self, port: int) -> None:
        self._target = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.stalled = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._target, timeout=30)
            except OSError:
                return
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.stalled.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


def test_a_slow_proxy(bed: Bed) -> None:
    """The proxy stops answering: a cryptographic operation answers KMSInvalidStateException
    (AWS's socket-timeout message) once the call's bound has passed; a connection attempt
    leaves the store FAILED with XKS_PROXY_TIMED_OUT. Answering again: usable again."""
    port = int(bed.proxy.endpoint.rsplit(":", 1)[1])
    relay = _Relay(port)
    try:
        store_id = bed.new_store("slow", XksProxyUriEndpoint=f"http://127.0.0.1:{relay.port}")
        bed.kms.connect_custom_key_store(CustomKeyStoreId=store_id)
        key_id = bed.kms.create_key(
            Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store_id, XksKeyId="model-key"
        )["KeyMetadata"]["KeyId"]
        blob = bed.kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
        relay.stalled.set()
        with pytest.raises(ClientError) as e:
            bed.kms.decrypt(CiphertextBlob=blob)
        assert _code(e) == "KMSInvalidStateException"
        assert "did not respond in time" in e.value.response["Error"]["Message"]
        bed.kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
        bed.kms.connect_custom_key_store(CustomKeyStoreId=store_id)
        entry = bed.describe(store_id)
        assert (entry["ConnectionState"], entry["ConnectionErrorCode"]) == (
            "FAILED",
            "XKS_PROXY_TIMED_OUT",
        )
        relay.stalled.clear()
        bed.kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
        bed.kms.connect_custom_key_store(CustomKeyStoreId=store_id)
        assert bed.kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"
        bed.kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    finally:
        relay.close()


async def test_attested_release_of_a_data_key(bed: Bed, store: str) -> None:
    """GenerateDataKey with a Recipient on a key in an external key store: the attested
    enclave gets the data key (through the proxy), and the blob it keeps opens to it."""
    assert bed.ca is not None
    key_id = bed.kms.create_key(
        Origin="EXTERNAL_KEY_STORE",
        CustomKeyStoreId=store,
        XksKeyId="release-key",
        Policy=json.dumps(enclave_policy()),
    )["KeyMetadata"]["KeyId"]
    client = AttestedKmsClient(
        KmsClient(
            endpoint=bed.daemon.endpoint,
            credentials=Credentials(ENCLAVE.access_key_id, ENCLAVE.secret_access_key),
        ),
        FakeEnclave.create(bed.ca),
    )
    client.prepare()
    with trio.fail_after(30):
        try:
            plaintext, blob = await client.generate_data_key(
                key_id, encryption_context={"model": "m"}
            )
        finally:
            await client.aclose()
    assert len(plaintext) == 32
    assert xks_blob.parse(blob).key_id == key_id
    opened = await trio.to_thread.run_sync(
        lambda: bed.kms.decrypt(CiphertextBlob=blob, EncryptionContext={"model": "m"})
    )
    assert opened["Plaintext"] == plaintext
    # Another image is refused before the proxy is asked.
    other = AttestedKmsClient(
        KmsClient(
            endpoint=bed.daemon.endpoint,
            credentials=Credentials(ENCLAVE.access_key_id, ENCLAVE.secret_access_key),
        ),
        FakeEnclave.create(bed.ca, image="other-image"),
    )
    other.prepare()
    try:
        with trio.fail_after(30), pytest.raises(KmsApiError) as e:
            await other.generate_data_key(key_id, encryption_context={"model": "m"})
    finally:
        await other.aclose()
    assert e.value.type_name == "AccessDeniedException"
