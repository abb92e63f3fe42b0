"""End to end with real processes: KMS daemon, runtime, sandboxed server enclave, ingress."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import trio

from models.client import open_inference_client
from models.digits import load_test_split
from models.errors import (
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from models.server import expected_pcr16
from runtime.demo import Console, run_demo
from runtime.errors import NitroCliError
from runtime.stack import (
    SERVER_APP_DIR,
    build_server_image,
    create_model_key,
    key_policy_for_image,
    open_stack,
    read_audit,
    seal_bundled_model,
    start_server,
)
from transport.errors import AuthenticationFailed, EnclaveError

from .conftest import Served

pytestmark = pytest.mark.slow


async def test_demo_path(short_state_dir: Path) -> None:
    """The whole ``enclave demo`` (its building blocks as the CLI runs them)."""
    import io

    log = io.StringIO()
    with trio.fail_after(60):
        results = await run_demo(short_state_dir, out=Console(log))
    assert results.accuracy > 0.95
    assert results.pcr16 == expected_pcr16([bytes.fromhex(d) for d in results.model_digests]).hex()
    assert "imagesha384" in results.debug_denial.lower()
    assert "debug" in log.getvalue().lower()


async def test_client_with_wrong_pcr0_policy_sends_nothing(served: Served) -> None:
    x, _ = load_test_split()
    with trio.fail_after(20):
        with pytest.raises(AuthenticationFailed):
            async with open_inference_client(
                served.endpoint, verifier=served.verifier(pcr0=hashlib.sha384(b"x").digest())
            ) as client:
                await client.infer("digits", {"pixels": x[:1]})
        # A policy pinning another model digest (PCR16) is refused too.
        with pytest.raises(AuthenticationFailed):
            async with open_inference_client(
                served.endpoint,
                verifier=served.verifier(model_digests=[hashlib.sha384(b"other").digest()]),
            ):
                pass
        # The right policy works on the same server.
        async with open_inference_client(served.endpoint, verifier=served.verifier()) as client:
            assert (await client.infer("digits", {"pixels": x[:2]}))["label"].shape == (2,)


async def test_key_pinned_to_another_image_is_denied(short_state_dir: Path) -> None:
    sealed_path = short_state_dir / "m" / "digits.sealed"
    with trio.fail_after(60):
        async with open_stack(short_state_dir, models={"digits": sealed_path}) as stack:
            eif = short_state_dir / "server.eif"
            build_server_image(eif)
            key = await create_model_key(stack, hashlib.sha384(b"another image").hexdigest())
            await seal_bundled_model(stack, key, sealed_path)
            server = await start_server(stack, eif)
            assert server.report.error == "model key refused by KMS: AccessDeniedException"
            assert "AccessDenied" in (server.report.models[0].reason or "")
            denied = [
                line
                for line in read_audit(stack.kms_state_dir)
                if line["operation"] == "Decrypt" and line["decision"] == "deny"
            ]
            assert denied
            assert "imagesha384" in denied[-1]["reason"].lower()
            assert denied[-1]["recipient"]["image_sha384"] != "0" * 96  # not debug: real PCR0
            reason = await server.wait_exited()
            assert reason.code == 3


async def test_tampered_sealed_model_refused(short_state_dir: Path) -> None:
    sealed_path = short_state_dir / "m" / "digits.sealed"
    tampered = short_state_dir / "m" / "tampered.sealed"
    with trio.fail_after(60):
        async with open_stack(short_state_dir, models={"digits": tampered}) as stack:
            eif = short_state_dir / "server.eif"
            pcr0 = build_server_image(eif).pcrs[0].hex()
            key = await create_model_key(stack, pcr0)
            await seal_bundled_model(stack, key, sealed_path)
            blob = bytearray(sealed_path.read_bytes())
            blob[-100] ^= 0x20  # one bit of the body
            tampered.write_bytes(bytes(blob))
            server = await start_server(stack, eif)
            assert server.report.error
            assert "failed its integrity check" in (server.report.models[0].reason or "")
            # A genuine sealed file of another model name is refused as well.
            await seal_bundled_model(stack, key, tampered, name="not-digits")
            server = await start_server(stack, eif)
            assert "holds model 'not-digits'" in (server.report.models[0].reason or "")


async def test_tampered_image_refused(short_state_dir: Path) -> None:
    sealed_path = short_state_dir / "m" / "digits.sealed"
    with trio.fail_after(60):
        async with open_stack(short_state_dir, models={"digits": sealed_path}) as stack:
            eif = short_state_dir / "server.eif"
            pcr0 = build_server_image(eif).pcrs[0].hex()
            key = await create_model_key(stack, pcr0)
            await seal_bundled_model(stack, key, sealed_path)
            # 1. Bytes of the image changed after the build: the runtime refuses to run it.
            broken = short_state_dir / "broken.eif"
            data = bytearray(eif.read_bytes())
            data[len(data) // 2] ^= 0x01
            broken.write_bytes(bytes(data))
            with pytest.raises(Exception) as info:
                await stack.runtime.run_enclave(broken, cpu_count=1, memory_mib=512)
            leaves = _leaves(info.value)
            assert any(isinstance(e, NitroCliError | EnclaveError) for e in leaves), leaves
            assert any("crc" in str(e).lower() or "corrupt" in str(e).lower() for e in leaves)
            assert not stack.runtime.describe()  # nothing started
            # 2. A modified app (rebuilt, so the image is well formed) has another PCR0: KMS
            #    does not release the model key to it.
            app = short_state_dir / "app"
            shutil.copytree(SERVER_APP_DIR, app)
            config = (app / "server.toml").read_text().replace("max_batch = 512", "max_batch = 8")
            (app / "server.toml").write_text(config)
            evil = short_state_dir / "evil.eif"
            assert build_server_image(evil, app_dir=app).pcrs[0].hex() != pcr0
            server = await start_server(stack, evil)
            assert server.report.error
            assert "AccessDenied" in (server.report.models[0].reason or "")


async def test_image_and_store_models_one_denied(short_state_dir: Path) -> None:
    """Models from the image and from the host store; a denied one is listed unavailable while
    the others are served; PCR16 binds the served ones in configuration order."""
    store_sealed = short_state_dir / "m" / "digits.sealed"
    denied_sealed = short_state_dir / "m" / "denied.sealed"
    with trio.fail_after(60):
        async with open_stack(
            short_state_dir, models={"digits": store_sealed, "denied": denied_sealed}
        ) as stack:
            # "vault" is sealed into the image under a key whose policy is set after the build.
            vault_key = await create_model_key(stack, "00" * 48, alias=None)
            app = short_state_dir / "app"
            shutil.copytree(SERVER_APP_DIR, app)
            vault = await seal_bundled_model(stack, vault_key, app / "sealed" / "vault.sealed",
                                             name="vault")  # fmt: skip
            with (app / "server.toml").open("a") as f:
                f.write('\n[[models]]\nname = "vault"\nsource = "image"\n')
                f.write('path = "sealed/vault.sealed"\n')
                f.write('\n[[models]]\nname = "denied"\nsource = "store"\n')
            eif = short_state_dir / "server.eif"
            pcr0 = build_server_image(eif, app_dir=app).pcrs[0].hex()
            async with stack.owner_kms() as kms:
                await kms.call(
                    "PutKeyPolicy",
                    {"KeyId": vault_key, "PolicyName": "default",
                     "Policy": json.dumps(key_policy_for_image(pcr0))},
                )  # fmt: skip
            good_key = await create_model_key(stack, pcr0, alias=None)
            digits = await seal_bundled_model(stack, good_key, store_sealed)
            bad_key = await create_model_key(stack, hashlib.sha384(b"x").hexdigest(), alias=None)
            await seal_bundled_model(stack, bad_key, denied_sealed, name="denied")
            server = await start_server(stack, eif)
            status = {m.name: m for m in server.report.models}
            assert status["digits"].available
            assert status["vault"].available
            assert not status["denied"].available
            port = await stack.start_ingress(server.cid)
            from models.client import make_verifier, policy_for

            digests = [digits.header.model_sha384, vault.header.model_sha384]
            verifier = make_verifier(stack.roots(), policy_for(pcr0=pcr0, model_digests=digests))
            x, y = load_test_split()
            async with open_inference_client(f"127.0.0.1:{port}", verifier=verifier) as client:
                catalog = {m.name: m for m in await client.list_models()}
                assert catalog["vault"].available
                assert not catalog["denied"].available
                assert "AccessDenied" in (catalog["denied"].reason or "")
                out = await client.infer("vault", {"pixels": x[:50]})
                assert (out["label"] == y[:50]).mean() > 0.9
                with pytest.raises(ModelUnavailableError):
                    await client.infer("denied", {"pixels": x[:1]})


async def test_bad_requests_answered_while_streams_continue(served: Served) -> None:
    x, y = load_test_split()
    with trio.fail_after(30):
        async with open_inference_client(served.endpoint, verifier=served.verifier()) as client:
            labels: list[np.ndarray] = []

            async def good_stream() -> None:
                chunks = ({"pixels": x[i : i + 10]} for i in range(0, len(x), 10))
                async for out in client.stream("digits", chunks):
                    labels.append(out["label"])
                    await trio.sleep(0)

            async def bad_requests() -> None:
                cases = [
                    ({"pixels": x[:2].astype(np.float64)}, InvalidInputError, "dtype"),
                    ({"pixels": x[:2, :10]}, InvalidInputError, "dimension 1"),
                    ({"pixels": x[0]}, InvalidInputError, "rank"),
                    ({"wrong": x[:1]}, InvalidInputError, "unknown input"),
                    # Over the server's 4,000,000-byte request cap (refused by the enclave) ...
                    ({"pixels": np.zeros((16000, 64), np.float32)}, InvalidInputError, "exceeds"),
                    # ... and over the RPC's 4 MiB message cap (refused before sending).
                    ({"pixels": np.zeros((20000, 64), np.float32)}, InvalidInputError, "limit"),
                ]
                for inputs, exc, msg in cases:
                    with pytest.raises(exc, match=msg):
                        await client.infer("digits", inputs)
                with pytest.raises(ModelNotFoundError):
                    await client.infer("nope", {"pixels": x[:1]})
                raw = {"dtype": "float32", "shape": [2, 64], "data": b"\x00" * 7}
                from transport.rpc import RpcError

                with pytest.raises(RpcError, match="needs 512"):
                    await client._rpc.call("infer", {"model": "digits", "inputs": {"pixels": raw}})
                with pytest.raises(InvalidInputError, match="stream message 1"):
                    async for _ in client.stream(
                        "digits", [{"pixels": x[:1]}, {"pixels": x[:1].astype(np.int32)}]
                    ):
                        pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(good_stream)
                nursery.start_soon(bad_requests)
            pred = np.concatenate(labels)
            assert (pred == y).mean() > 0.95


async def test_enclave_killed_mid_stream(served: Served) -> None:
    x, _ = load_test_split()
    received = 0

    def endless() -> object:
        while True:
            yield {"pixels": x[:8]}

    with trio.fail_after(30):
        async with open_inference_client(served.endpoint, verifier=served.verifier()) as client:

            async def consume() -> None:
                nonlocal received
                async for _ in client.stream("digits", endless()):  # type: ignore[arg-type]
                    received += 1
                    if received == 20:
                        os.kill(served.server.info.app_pid, signal.SIGKILL)

            with pytest.raises((EnclaveError, trio.BrokenResourceError)) as info:
                await consume()
    assert received >= 20
    text = str(info.value).lower()
    assert any(w in text for w in ("closed", "truncat", "authentication", "broken", "eof")), text


async def test_many_concurrent_clients(served: Served) -> None:
    x, y = load_test_split()
    correct: list[float] = []

    async def one_client(k: int) -> None:
        async with open_inference_client(served.endpoint, verifier=served.verifier()) as client:
            rows = slice(k * 20, k * 20 + 20)
            out = await client.infer("digits", {"pixels": x[rows]})
            chunks = [{"pixels": x[rows][i : i + 5]} for i in range(0, 20, 5)]
            streamed = np.concatenate([o["label"] async for o in client.stream("digits", chunks)])
            assert np.array_equal(streamed, out["label"])
            correct.append(float((out["label"] == y[rows]).mean()))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for k in range(20):
                nursery.start_soon(one_client, k)
    assert len(correct) == 20
    assert np.mean(correct) > 0.95


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def test_blocking_client(served: Served) -> None:
    """The blocking wrapper, as a plain script would use it (from a worker thread here)."""
    from models.client import BlockingInferenceClient

    x, y = load_test_split()
    verifier = served.verifier()

    def script() -> tuple[list[str], np.ndarray, np.ndarray, str]:
        with BlockingInferenceClient(served.endpoint, verifier=verifier) as client:
            names = [m.name for m in client.list_models()]
            unary = client.infer("digits", {"pixels": x[:30]})["label"]
            streamed = np.concatenate(
                [o["label"] for o in client.stream("digits", [{"pixels": x[30:60]}] * 2)]
            )
            return names, unary, streamed, client.attestation.module_id

    with trio.fail_after(30):
        names, unary, streamed, module_id = await trio.to_thread.run_sync(script)
    assert names == ["digits"]
    assert (unary == y[:30]).mean() > 0.9
    assert np.array_equal(streamed[:30], streamed[30:])
    assert module_id == served.server.enclave_id

    def bad_policy() -> None:
        with BlockingInferenceClient(
            served.endpoint, verifier=served.verifier(pcr0=b"\x01" * 48)
        ) as client:
            client.list_models()

    with trio.fail_after(30), pytest.raises(AuthenticationFailed):
        await trio.to_thread.run_sync(bad_policy)


async def test_client_over_vsock_address(served: Served) -> None:
    """Host code on the fabric can skip the ingress and dial (cid, 5005) directly."""
    from transport.vsock import VsockAddr

    x, y = load_test_split()
    with trio.fail_after(20):
        async with open_inference_client(
            VsockAddr(served.server.cid, 5005), verifier=served.verifier()
        ) as client:
            out = await client.infer("digits", {"pixels": x[:20]})
    assert (out["label"] == y[:20]).mean() > 0.9
