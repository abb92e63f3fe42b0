"""``enclave infer`` and ``enclave model seal|inspect`` with bad input: one ``error:`` line on
stderr naming what failed and where, a non-zero status, never a traceback (issue 10: "No
tracebacks for user errors", "enclave unreachable" vs "attestation failed", no hangs).

The attested cases run a real attested server in this process (the channel's ``accept_channel``
with an emulated NSM device signing under a local CA, the inference service over RPC) on a TCP
port, so the CLI's whole client path runs, without an enclave.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
from collections.abc import AsyncIterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from models.digits import MODEL_PATH, load_test_split
from runtime.cli import main as enclave

PCR0 = hashlib.sha384(b"cli-test-image").digest()


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = enclave(argv)
    return code, out.getvalue(), err.getvalue()


def error_line(argv: list[str]) -> str:
    """Run the CLI; assert it failed with one ``error:`` line and no traceback; return it."""
    code, _stdout, stderr = run_cli(argv)
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    x, _ = load_test_split()
    good = tmp_path / "in.npz"
    np.savez(good, pixels=x[:5])
    garbage = tmp_path / "bad.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip archive")
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"measurements": [{"pcrs": {"0": PCR0.hex()}}]}))
    onnx_garbage = tmp_path / "model.onnx"
    onnx_garbage.write_bytes(b"\x08\x07 not a model")
    sealed_garbage = tmp_path / "model.sealed"
    sealed_garbage.write_bytes(b"\x00" * 64)
    return {
        "good": good,
        "garbage": garbage,
        "pickled": pickled,
        "policy": policy,
        "onnx_garbage": onnx_garbage,
        "sealed_garbage": sealed_garbage,
        "dir": tmp_path,
    }


def _infer(endpoint: str, files: dict[str, Path], *extra: str, root: str = "aws") -> list[str]:
    return ["infer", "--endpoint", endpoint, "--root", root, "--policy", str(files["policy"]),
            "--model", "digits", "--input", str(files["good"]), *extra]  # fmt: skip


def test_infer_nothing_listening_says_unreachable(files: dict[str, Path]) -> None:
    """Regression: printed ``error: authentication failed`` (and a refused connection was a
    traceback)."""
    endpoint = f"127.0.0.1:{_free_port()}"
    line = error_line(_infer(endpoint, files))
    assert line == (
        f"error: enclave unreachable at {endpoint}: connection refused (nothing listens there)"
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"--endpoint": "localhost"}, "error: --endpoint 'localhost': expected HOST:PORT"),
        ({"--endpoint": "http://127.0.0.1:1"}, "without a scheme"),
        ({"--input": "garbage"}, "error: cannot read --input"),
        ({"--input": "pickled"}, "error: cannot read --input"),
        ({"--input": "missing"}, "No such file"),
        ({"--policy": "missing"}, "cannot read policy file"),
        ({"--root": "missing"}, "cannot read root certificate file"),
        ({"--timeout": "0"}, "error: --timeout must be in (0, 3600] seconds"),
        ({"--chunk": "0"}, "error: --chunk must be a positive number of rows"),
    ],
)
def test_infer_user_errors(files: dict[str, Path], change: dict[str, str], expected: str) -> None:
    argv = _infer(f"127.0.0.1:{_free_port()}", files, "--chunk", "4", "--timeout", "5")
    for flag, value in change.items():
        index = len(argv) - 1 - argv[::-1].index(flag)  # the last occurrence wins
        argv[index + 1] = str(files[value]) if value in files else value
        if value == "missing":
            argv[index + 1] = str(files["dir"] / "missing.file")
    assert expected in error_line(argv)


def test_model_seal_user_errors(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVE_KMS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("ENCLAVE_KMS_SECRET_ACCESS_KEY", "secret")
    dead = _free_port()
    out = str(files["dir"] / "out.sealed")

    def seal(model: Path, endpoint: str, out: str = out) -> str:
        return error_line(["model", "seal", str(model), "--key-id", "alias/models",
                           "--kms-endpoint", endpoint, "--out", out])  # fmt: skip

    # Regressions: the KMS down and a scheme-less endpoint were tracebacks.
    assert seal(MODEL_PATH, f"http://127.0.0.1:{dead}") == (
        f"error: KMS unreachable at http://127.0.0.1:{dead}: connection refused"
    )
    assert seal(MODEL_PATH, "127.0.0.1:4599") == (
        "error: --kms-endpoint '127.0.0.1:4599': expected http://HOST:PORT "
        "(did you mean http://127.0.0.1:4599?)"
    )
    assert "only http://" in seal(MODEL_PATH, "https://127.0.0.1:4599")
    assert "expected HOST:PORT" in seal(MODEL_PATH, "http://127.0.0.1")
    assert "no such model file" in seal(files["dir"] / "nope.onnx", f"http://127.0.0.1:{dead}")
    assert "not a loadable ONNX model" in seal(files["onnx_garbage"], f"http://127.0.0.1:{dead}")
    no_dir = str(files["dir"] / "no-such-dir" / "x.sealed")
    assert "no such directory" in seal(MODEL_PATH, f"http://127.0.0.1:{dead}", no_dir)
    monkeypatch.delenv("ENCLAVE_KMS_ACCESS_KEY_ID")
    assert "no KMS credentials" in seal(MODEL_PATH, f"http://127.0.0.1:{dead}")


def test_model_inspect_user_errors(files: dict[str, Path]) -> None:
    missing = files["dir"] / "missing.sealed"
    line = error_line(["model", "inspect", str(missing)])
    assert line.startswith(f"error: cannot read {missing}")
    line = error_line(["model", "inspect", str(files["sealed_garbage"])])
    assert line.startswith(f"error: {files['sealed_garbage']} is not a sealed model")
    assert "is not a sealed model" in error_line(["model", "inspect", str(MODEL_PATH)])


# --- against a real attested server in this process --------------------------------------------


@dataclass
class AttestedServer:
    endpoint: str
    root_pem: Path


@pytest.fixture
async def attested_server(tmp_path: Path) -> AsyncIterator[AttestedServer]:
    from attest.ca import LocalCA
    from attest.channel import nsm_attester
    from attest.nsm import EnclaveIdentity, NsmClient, NsmDevice
    from attest.nsm.server import serve_nsm
    from models.engine import ModelEngine, create_session
    from models.server import serve_connection
    from models.service import InferenceService, ModelEntry
    from transport.channel import Suite

    ca = await trio.to_thread.run_sync(LocalCA.load_or_create, tmp_path / "ca")
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(ca.root_pem)
    module_id = "i-0123456789abcdef0-enc0123456789abcdef"
    pcrs = {0: PCR0, 1: hashlib.sha384(b"kernel").digest(), 2: hashlib.sha384(b"app").digest()}
    device = NsmDevice(EnclaveIdentity(module_id, pcrs=pcrs), ca.new_signer(module_id))
    data = MODEL_PATH.read_bytes()
    engine = ModelEngine("digits", create_session(data))
    digest = hashlib.sha384(data).digest()
    service = InferenceService({"digits": ModelEntry("digits", digest=digest, engine=engine)})
    async with trio.open_nursery() as nursery:
        client_end, device_end = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_nsm, device_end, device)
        attester = nsm_attester(NsmClient.from_stream(client_end))

        async def handler(stream: trio.SocketStream) -> None:
            await serve_connection(stream, service, attester=attester, suites=[Suite.X25519])

        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield AttestedServer(f"127.0.0.1:{port}", root_pem)
        nursery.cancel_scope.cancel()


async def test_infer_against_an_attested_server(
    attested_server: AttestedServer, files: dict[str, Path]
) -> None:
    argv = _infer(attested_server.endpoint, files, root=str(attested_server.root_pem))
    code, stdout, stderr = await trio.to_thread.run_sync(run_cli, argv)
    assert code == 0, stderr
    assert json.loads(stdout)["outputs"]["label"]["shape"] == [5]


async def test_infer_attestation_failed_is_not_unreachable(
    attested_server: AttestedServer, files: dict[str, Path]
) -> None:
    """Regression: a policy the enclave does not satisfy and an endpoint with nothing behind
    it both printed ``error: authentication failed``."""
    files["policy"].write_text(json.dumps({"measurements": [{"pcrs": {"0": "ab" * 48}}]}))
    argv = _infer(attested_server.endpoint, files, root=str(attested_server.root_pem))
    line = await trio.to_thread.run_sync(error_line, argv)
    assert line.startswith(
        f"error: attestation failed: the enclave at {attested_server.endpoint} did not prove "
        f"what {files['policy']} requires"
    )


async def test_infer_server_refusals_are_one_line(
    attested_server: AttestedServer, files: dict[str, Path]
) -> None:
    root = str(attested_server.root_pem)
    argv = _infer(attested_server.endpoint, files, root=root)
    argv[argv.index("--model") + 1] = "nope"
    line = await trio.to_thread.run_sync(error_line, argv)
    assert line == "error: the server has no model 'nope' (it has 'digits')"
    x, _ = load_test_split()
    np.savez(files["good"], pixels=x[:5].astype(np.float64))
    argv = _infer(attested_server.endpoint, files, root=root)
    line = await trio.to_thread.run_sync(error_line, argv)
    assert "dtype float64, the model expects float32" in line
    np.savez(files["good"], a=x[:5], b=x[:5])
    line = await trio.to_thread.run_sync(error_line, argv)
    assert line.endswith("takes ['pixels']: give an .npz with those names")
