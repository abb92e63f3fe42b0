"""Sealing with a KMS (faked at its API boundary) and unsealing through a decrypter."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from models._progress import ProgressBar
from models.digits import MODEL_PATH
from models.errors import ModelLoadError, SealedIntegrityError
from models.sealing import MODEL_CONTEXT_KEY, inspect_sealed, seal_model_file, unseal_model


class FakeKms:
    """GenerateDataKey / Decrypt with a real wrapping key (AES-GCM) bound to the context."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(os.urandom(32))
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _aad(self, ctx: Mapping[str, str]) -> bytes:
        return repr(sorted(ctx.items())).encode()

    async def call(self, operation: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append((operation, dict(payload)))
        assert operation == "GenerateDataKey"
        key = os.urandom(32)
        nonce = os.urandom(12)
        blob = nonce + self._aead.encrypt(nonce, key, self._aad(payload["EncryptionContext"]))
        return {
            "Plaintext": base64.b64encode(key).decode(),
            "CiphertextBlob": base64.b64encode(blob).decode(),
            "KeyId": "arn:aws:kms:us-east-1:111122223333:key/test",
        }

    async def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> bytes:
        nonce, body = ciphertext_blob[:12], ciphertext_blob[12:]
        return self._aead.decrypt(nonce, body, self._aad(encryption_context or {}))


async def test_seal_and_unseal(tmp_path: Path) -> None:
    kms = FakeKms()
    out = tmp_path / "digits.sealed"
    result = await seal_model_file(MODEL_PATH, out, kms=kms, key_id="alias/m", name="digits")
    assert result.header.encryption_context == {MODEL_CONTEXT_KEY: "digits"}
    assert result.header.key_id.endswith("key/test")
    assert inspect_sealed(out) == result.header
    header, plain = await unseal_model(out.read_bytes(), kms=kms, expected_name="digits")
    assert header == result.header
    assert plain == MODEL_PATH.read_bytes()
    assert not list(tmp_path.glob(".digits.sealed.*"))  # no temporary file left
    with pytest.raises(ModelLoadError, match="expected 'other'"):
        await unseal_model(out.read_bytes(), kms=kms, expected_name="other")
    blob = bytearray(out.read_bytes())
    blob[-5] ^= 1
    with pytest.raises(SealedIntegrityError):
        await unseal_model(bytes(blob), kms=kms, expected_name="digits")


async def test_not_onnx_refused_before_kms(tmp_path: Path) -> None:
    kms = FakeKms()
    bogus = tmp_path / "x.onnx"
    bogus.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        await seal_model_file(bogus, tmp_path / "x.sealed", kms=kms, key_id="k")
    assert kms.calls == []
    assert not (tmp_path / "x.sealed").exists()


def test_progress_bar_only_on_terminals() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet = io.StringIO()
    ProgressBar("x", 100 << 20, stream=quiet)(50 << 20, 100 << 20)
    assert quiet.getvalue() == ""
    tty = Tty()
    bar = ProgressBar("sealing m.onnx", 100 << 20, stream=tty)
    bar(100 << 20, 100 << 20)
    assert "100%" in tty.getvalue()
    small = Tty()
    ProgressBar("x", 1000, stream=small)(1000, 1000)
    assert small.getvalue() == ""
