"""``enclave kms xks-proxy`` as an owner runs it: a real process, botocore-signed requests, the
owner disables a key (SIGHUP) and the next request is refused, then stops the proxy (SIGTERM)
and the next connection is refused."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from .xks_helpers import (
    URI_PATH,
    WAIT_S,
    ProxyProcess,
    health_metadata,
    key_file,
    metadata,
    write_config,
)

pytestmark = pytest.mark.slow

@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[ProxyProcess, Path]]:
    key_file(tmp_path, "model.bin")
    config = write_config(
        tmp_path / "proxy.toml",
        [{"id": "model-key", "backing": {"type": "file", "path": "model.bin"}}],
    )
    p = ProxyProcess(config)
    try:
        yield p, config
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(timeout=WAIT_S)


def test_owner_disables_then_stops(proxy: tuple[ProxyProcess, Path]) -> None:
    p, config = proxy
    body = {
        "requestMetadata": metadata(),
        "plaintext": "SGVsbG8=",
        "encryptionAlgorithm": "AES_GCM",
    }
    status, enc = p.post(f"{URI_PATH}/keys/model-key/encrypt", body)
    assert status == 200
    config.write_text(
        config.read_text().replace('id = "model-key"', 'id = "model-key"\nenabled = false')
    )
    p.proc.send_signal(signal.SIGHUP)
    p.wait_for("xks_reloaded")
    sealed = {k: enc[k] for k in ("ciphertext", "initializationVector", "authenticationTag")}
    dec = {"requestMetadata": metadata("Decrypt"), "encryptionAlgorithm": "AES_GCM", **sealed}
    status, reply = p.post(f"{URI_PATH}/keys/model-key/decrypt", dec)
    assert (status, reply["errorName"]) == (400, "InvalidStateException")
    assert p.stop() == 0
    with pytest.raises(Exception, match=r"(?i)connect"):
        p.post(f"{URI_PATH}/health", {"requestMetadata": health_metadata()})


def test_broken_reload_fails_closed_and_says_why(proxy: tuple[ProxyProcess, Path]) -> None:
    p, config = proxy
    config.write_text(config.read_text() + "\n[[keys]]\nid = \n")
    p.proc.send_signal(signal.SIGHUP)
    line = p.wait_for("xks_reload_failed")
    assert "proxy.toml" in line
    status, reply = p.post(f"{URI_PATH}/health", {"requestMetadata": health_metadata()})
    assert (status, reply["errorName"]) == (400, "InvalidStateException")
    assert p.stop() == 0
