"""``enclave model seal|inspect`` and ``enclave infer`` as a user runs them."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import trio

from models.digits import MODEL_PATH, load_test_split
from runtime.cli import main as enclave

from .conftest import Served

pytestmark = pytest.mark.slow


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = enclave(argv)
    return code, out.getvalue(), err.getvalue()


async def test_model_seal_and_inspect(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = served.stack.owner
    monkeypatch.setenv("ENCLAVE_KMS_ACCESS_KEY_ID", owner.access_key_id)
    monkeypatch.setenv("ENCLAVE_KMS_SECRET_ACCESS_KEY", owner.secret_access_key)
    out = tmp_path / "digits.sealed"
    argv = ["model", "seal", str(MODEL_PATH), "--key-id", "alias/confidential-models",
            "--kms-endpoint", served.stack.kms_endpoint, "--out", str(out),
            "--context", "team=ml"]  # fmt: skip
    with trio.fail_after(30):
        code, stdout, stderr = await trio.to_thread.run_sync(_run, argv)
    assert code == 0, stderr
    view = json.loads(stdout)
    assert view["model_name"] == "digits"
    assert view["encryption_context"] == {"enclave-runtime:model": "digits", "team": "ml"}
    assert view["key_id"] == served.key_arn
    assert owner.secret_access_key not in stdout + stderr

    with trio.fail_after(30):
        code, stdout, _ = await trio.to_thread.run_sync(_run, ["model", "inspect", str(out)])
    assert code == 0
    inspected = json.loads(stdout)
    assert inspected["model_sha384"] == served.digest  # same model, same digest
    assert inspected["file_size"] == out.stat().st_size

    # Not an ONNX model: refused before any key is requested.
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"definitely not onnx")
    argv[2] = str(bogus)
    with trio.fail_after(30):
        code, _, stderr = await trio.to_thread.run_sync(_run, argv)
    assert code != 0
    assert "not a loadable ONNX model" in stderr
    # A tampered file is not a sealed model any more (inspect needs no key, but checks form).
    blob = bytearray(out.read_bytes())
    blob[20] ^= 0xFF
    bad = tmp_path / "bad.sealed"
    bad.write_bytes(bytes(blob))
    with trio.fail_after(30):
        code, _, stderr = await trio.to_thread.run_sync(_run, ["model", "inspect", str(bad)])
    assert code != 0


async def test_model_seal_without_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("ENCLAVE_KMS_ACCESS_KEY_ID", "ENCLAVE_KMS_SECRET_ACCESS_KEY",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    with trio.fail_after(30):
        code, _, stderr = await trio.to_thread.run_sync(
            _run,
            [
                "model",
                "seal",
                str(MODEL_PATH),
                "--key-id",
                "k",
                "--kms-endpoint",
                "http://127.0.0.1:9",
                "--out",
                str(tmp_path / "x.sealed"),
            ],
        )
    assert code != 0
    assert "no KMS credentials" in stderr


async def test_infer_cli(served: Served, tmp_path: Path) -> None:
    x, y = load_test_split()
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=x[:40])
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"measurements": [{"pcrs": {"0": served.pcr0}}]}))
    outputs = tmp_path / "out.npz"
    base = ["infer", "--endpoint", served.endpoint, "--root", str(served.stack.ca_root_pem),
            "--policy", str(policy), "--model", "digits", "--input", str(inputs)]  # fmt: skip
    with trio.fail_after(30):
        code, stdout, stderr = await trio.to_thread.run_sync(
            _run, [*base, "--output", str(outputs)]
        )
        assert code == 0, stderr
        result = json.loads(stdout)
        assert result["attestation"]["pcr0"] == served.pcr0
        assert result["attestation"]["model_digest"] == served.digest
        assert result["attestation"]["pcr16_matches_catalog"] is True
        with np.load(outputs) as saved:
            assert (saved["label"] == y[:40]).mean() > 0.9
        code, stdout, stderr = await trio.to_thread.run_sync(
            _run, [*base, "--stream", "--chunk", "7"]
        )
        assert code == 0, stderr
        assert json.loads(stdout)["outputs"]["label"]["shape"] == [40]
        # A policy for another image: the client refuses the enclave and sends nothing.
        policy.write_text(json.dumps({"measurements": [{"pcrs": {"0": "ab" * 48}}]}))
        code, stdout, stderr = await trio.to_thread.run_sync(_run, base)
        assert code != 0
        assert "error: attestation failed" in stderr.lower()
