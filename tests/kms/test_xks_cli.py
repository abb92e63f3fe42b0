"""``enclave kms xks-proxy`` as an owner runs it: a real process, botocore-signed requests, the
owner disables a key (SIGHUP) and the next request is refused, then stops the proxy (SIGTERM)
and the next connection is refused."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .xks_helpers import (
    URI_PATH,
    health_metadata,
    key_file,
    metadata,
    send,
    signed_request,
    write_config,
)

pytestmark = pytest.mark.slow

#: Bound on waiting for the process to say something (start-up is ~1 s; the machine is shared).
WAIT_S = 30.0


class ProxyProcess:
    """The CLI in a child process; stderr lines collected by a thread."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "ENCLAVE_LOG_LEVEL"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "kms", "xks-proxy", "--config", str(config),
             "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert self.proc.stderr is not None
        stderr = self.proc.stderr
        threading.Thread(target=lambda: [self.lines.put(x) for x in stderr], daemon=True).start()
        line = self.wait_for("xks-proxy listening on ")
        self.url = line.split("listening on ", 1)[1].strip()
        self.endpoint = self.url.removesuffix(URI_PATH)

    def wait_for(self, text: str) -> str:
        while True:
            try:
                line = self.lines.get(timeout=WAIT_S)
            except queue.Empty:
                raise AssertionError(f"{text!r} not seen in {WAIT_S} s: {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line

    def post(self, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
        reply = send(signed_request(self.endpoint + path, json.dumps(body).encode()))
        return reply.status, reply.body

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=WAIT_S)


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
