"""The PKCS#11 backing against SoftHSM2 (Debian's ``softhsm2``) through python-pkcs11: AES-GCM
done by the token with a key that cannot leave it, driven through the proxy with botocore-signed
requests. Skipped, saying why, where SoftHSM2 or python-pkcs11 is missing (``scripts/test``
installs SoftHSM2 when it runs as root on Debian)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from kms.xks import XksProxyConfig
from transport.errors import ConfigurationError

from .xks_helpers import (
    IO_TIMEOUT_S,
    URI_PATH,
    call,
    health_metadata,
    key_file,
    metadata,
    running_proxy,
    write_config,
)

pytestmark = pytest.mark.slow

_LIBRARY_PLACES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN = "xks-test"
PIN = "4321"


@dataclass
class SoftHsm:
    module: Path
    pkcs11: Any
    lib: Any

    @contextmanager
    def session(self) -> Iterator[Any]:
        """A session of the test's own. Login is per process and token, so this is only
        opened while no proxy of the test holds the token."""
        session = self.lib.get_token(token_label=TOKEN).open(user_pin=PIN, rw=True)
        try:
            yield session
        finally:
            session.close()

    def backing(self, label: str, /, **changes: Any) -> dict[str, Any]:
        base = {"type": "pkcs11", "module": str(self.module), "token_label": TOKEN,
                "key_label": label, "pin": PIN}  # fmt: skip
        return {**base, **changes}


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    module = next((Path(p) for p in _LIBRARY_PLACES if Path(p).is_file()), None)
    if module is None:
        pytest.skip("SoftHSM2 is not installed (Debian package softhsm2; scripts/test installs it)")
    util = shutil.which("softhsm2-util")
    if util is None:
        pytest.skip("softhsm2-util is not on PATH (Debian package softhsm2)")
    p11 = pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed (extra 'hsm')")
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n")
    # SoftHSM reads its configuration when the library is initialised (once per process).
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [util, "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", "8765"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    from kms.xks.pkcs11_backing import _library

    lib, _ = _library(module)  # the proxy's own handle: the library initialises once
    hsm = SoftHsm(module, p11, lib)
    attr, kt = p11.Attribute, p11.KeyType
    locked = {attr.SENSITIVE: True, attr.EXTRACTABLE: False}
    with hsm.session() as session:
        session.generate_key(kt.AES, 256, label="hsm-key", store=True, template=locked)
        session.generate_key(kt.AES, 256, label="second", store=True, template=locked)
        session.generate_key(kt.AES, 128, label="aes128", store=True, template=locked)
        session.generate_key(kt.AES, 256, label="exportable", store=True,
                             template={attr.SENSITIVE: False, attr.EXTRACTABLE: True})  # fmt: skip
    return hsm


def _config(tmp_path: Path, softhsm: SoftHsm, **top: Any) -> Path:
    key_file(tmp_path, "file.bin")
    return write_config(
        tmp_path / "proxy.toml",
        [
            {"id": "hsm", "backing": softhsm.backing("hsm-key")},
            {"id": "hsm2", "operations": "decrypt", "backing": softhsm.backing("second")},
            {"id": "file", "backing": {"type": "file", "path": "file.bin"}},
        ],
        **top,
    )


def _encrypt_body(plaintext: bytes, aad: bytes) -> dict[str, Any]:
    return {
        "requestMetadata": metadata("GenerateDataKey"),
        "plaintext": base64.b64encode(plaintext).decode(),
        "additionalAuthenticatedData": base64.b64encode(aad).decode(),
        "encryptionAlgorithm": "AES_GCM",
        "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
    }


def _decrypt_body(enc: dict[str, Any], aad: bytes) -> dict[str, Any]:
    return {
        "requestMetadata": metadata("Decrypt"),
        "ciphertext": enc["ciphertext"],
        "initializationVector": enc["initializationVector"],
        "authenticationTag": enc["authenticationTag"],
        "additionalAuthenticatedData": base64.b64encode(aad).decode(),
        "encryptionAlgorithm": "AES_GCM",
    }


async def test_token_does_aes_gcm_with_the_specs_aad(tmp_path: Path, softhsm: SoftHsm) -> None:
    plaintext, aad = os.urandom(32), b"kms ciphertext header and encryption context"
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(_config(tmp_path, softhsm)) as p:
            enc = await call(p, f"{URI_PATH}/keys/hsm/encrypt", _encrypt_body(plaintext, aad))
            assert enc.status == 200, enc.raw
            assert "ciphertextDataIntegrityValue" in enc.body
            dec = await call(p, f"{URI_PATH}/keys/hsm/decrypt", _decrypt_body(enc.body, aad))
            assert base64.b64decode(dec.body["plaintext"]) == plaintext
            wrong = await call(p, f"{URI_PATH}/keys/hsm/decrypt", _decrypt_body(enc.body, b"x"))
            assert (wrong.status, wrong.error) == (400, "InvalidCiphertextException")
            # The token's session survives a failed decrypt.
            again = await call(p, f"{URI_PATH}/keys/hsm/decrypt", _decrypt_body(enc.body, aad))
            assert again.status == 200
            # Another key of the same token cannot decrypt it.
            other = await call(p, f"{URI_PATH}/keys/hsm2/decrypt", _decrypt_body(enc.body, aad))
            assert (other.status, other.error) == (400, "InvalidCiphertextException")
    # Independently: the token itself opens the proxy's output as standard AES-GCM under the
    # spec's AAD framing (2-byte AAD length, AAD, 1-byte metadata length).
    p11 = softhsm.pkcs11
    ct, iv, tag = (base64.b64decode(enc.body[f]) for f in
                   ("ciphertext", "initializationVector", "authenticationTag"))  # fmt: skip
    framed = len(aad).to_bytes(2, "big") + aad + b"\x00"
    params = p11.mechanisms.GCMParams(iv, framed, 128)
    with softhsm.session() as session:  # the proxy has stopped and logged out
        key = session.get_key(label="hsm-key", key_type=p11.KeyType.AES)
        opened = key.decrypt(ct + tag, mechanism=p11.Mechanism.AES_GCM, mechanism_param=params)
        assert opened == plaintext
        # ...and the key material itself never leaves the token.
        with pytest.raises(p11.exceptions.AttributeSensitive):
            key[p11.Attribute.VALUE]


async def test_health_reports_the_token_and_the_key_files(tmp_path: Path, softhsm: SoftHsm) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(_config(tmp_path, softhsm)) as p:
            reply = await call(p, f"{URI_PATH}/health", {"requestMetadata": health_metadata()})
    fleet = reply.body["ekmFleetDetails"]
    assert [e["healthStatus"] for e in fleet] == ["ACTIVE", "ACTIVE"]
    token = next(e for e in fleet if e["id"].startswith(f"{TOKEN}:"))
    assert "SoftHSM" in token["model"]


async def test_sixteen_byte_iv_is_unsupported_by_the_token(
    tmp_path: Path, softhsm: SoftHsm
) -> None:
    enc = {"ciphertext": "AAAA", "initializationVector": base64.b64encode(b"i" * 16).decode(),
           "authenticationTag": base64.b64encode(b"t" * 16).decode()}  # fmt: skip
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(_config(tmp_path, softhsm)) as p:
            reply = await call(p, f"{URI_PATH}/keys/hsm/decrypt", _decrypt_body(enc, b""))
    assert (reply.status, reply.error) == (501, "UnsupportedOperationException")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"key_label": "exportable"}, "not extractable"),
        ({"key_label": "aes128"}, "AES-128"),
        ({"key_label": "missing"}, "no AES key labelled 'missing'"),
        ({"token_label": "no-such-token"}, "no PKCS#11 token labelled 'no-such-token'"),
        ({"pin": "0000"}, "wrong PIN"),
        ({"module": "/nonexistent/libpkcs11.so"}, "does not exist"),
    ],
)
def test_unusable_token_keys_are_refused_at_load(
    tmp_path: Path, softhsm: SoftHsm, change: dict[str, str], message: str
) -> None:
    from kms.xks.keyring import Keyring

    backing = softhsm.backing("hsm-key", **change)
    path = write_config(tmp_path / "bad.toml", [{"id": "k", "backing": backing}])
    with pytest.raises(ConfigurationError, match=message):
        Keyring.load(XksProxyConfig.from_toml(path))


def test_pin_from_an_owner_only_file(tmp_path: Path, softhsm: SoftHsm) -> None:
    from kms.xks.keyring import Keyring

    pin_file = tmp_path / "token.pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    backing = softhsm.backing("hsm-key")
    del backing["pin"]
    path = write_config(
        tmp_path / "p.toml", [{"id": "k", "backing": {**backing, "pin_file": "token.pin"}}]
    )
    keyring = Keyring.load(XksProxyConfig.from_toml(path))
    assert keyring.get("k") is not None
    trio.run(keyring.aclose)
    pin_file.chmod(0o640)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        XksProxyConfig.from_toml(path)


async def test_reload_reopens_token_keys_on_the_logged_in_session(
    tmp_path: Path, softhsm: SoftHsm
) -> None:
    """A login is per process and token: a reload must not log in a second time (it failed
    with CKR_USER_ALREADY_LOGGED_IN before sessions were shared)."""
    path = _config(tmp_path, softhsm)
    aad = b"ctx"
    with trio.fail_after(IO_TIMEOUT_S):
        async with running_proxy(path) as p:
            enc = await call(p, f"{URI_PATH}/keys/hsm/encrypt", _encrypt_body(b"k" * 32, aad))
            good = path.read_text()
            path.write_text(good.replace('id = "hsm"', 'id = "hsm"\nenabled = false', 1))
            assert await p.reload()
            off = await call(p, f"{URI_PATH}/keys/hsm/decrypt", _decrypt_body(enc.body, aad))
            assert (off.status, off.error) == (400, "InvalidStateException")
            path.write_text(good)
            assert await p.reload()
            on = await call(p, f"{URI_PATH}/keys/hsm/decrypt", _decrypt_body(enc.body, aad))
            assert base64.b64decode(on.body["plaintext"]) == b"k" * 32
            path.write_text(good.replace(f'pin = "{PIN}"', 'pin = "9999"'))
            assert not await p.reload()  # another PIN for a logged-in token: refused, closed
            refused = await call(p, f"{URI_PATH}/health", {"requestMetadata": health_metadata()})
            assert refused.error == "InvalidStateException"
