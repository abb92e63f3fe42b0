"""The HYOK promise end to end, with real processes: a model is sealed under a KMS key in an
external key store whose second layer is the owner's key in its own ``enclave kms xks-proxy``
process; a real attested server enclave (``runtime.stack``) unseals it. When the owner disables
its key in the proxy, disconnects the store or stops its proxy, the next key release fails at
once with AWS's error (the restarted enclave's start-up report carries it), and a restarted
enclave serves again once the owner allows it."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from runtime.stack import (
    INSTANCE_ARN,
    ServerHandle,
    Stack,
    build_server_image,
    create_xks_model_key,
    open_stack,
    open_xks_proxy,
    read_audit,
    seal_bundled_model,
    start_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def short_state_dir() -> Iterator[Path]:
    """A short path: Unix socket paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="er-hyok-"))
    try:
        yield path / "s"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _last_release(stack: Stack) -> dict[str, object]:
    lines = [line for line in read_audit(stack.kms_state_dir) if line["operation"] == "Decrypt"]
    return lines[-1]


async def _refused(stack: Stack, eif: Path) -> tuple[ServerHandle, str]:
    server = await start_server(stack, eif)
    assert not server.report.ok, server.report.raw
    reason = server.report.models[0].reason or ""
    await server.wait_exited()
    return server, reason


async def test_hyok_promise_with_a_real_enclave(short_state_dir: Path) -> None:
    sealed_path = short_state_dir / "m" / "digits.sealed"
    with trio.fail_after(220):
        async with (
            open_stack(short_state_dir, models={"digits": sealed_path}) as stack,
            open_xks_proxy(short_state_dir / "xks") as proxy,
        ):
            eif = short_state_dir / "server.eif"
            pcr0 = (await trio.to_thread.run_sync(build_server_image, eif)).pcrs[0].hex()
            key_arn, store_id = await create_xks_model_key(stack, pcr0, proxy)
            await seal_bundled_model(stack, key_arn, sealed_path)

            # (1, 2) the attested enclave unseals the model: one release, through the proxy.
            since = proxy.mark()
            server = await start_server(stack, eif)
            assert server.report.ok, server.report.raw
            release = _last_release(stack)
            assert (release["decision"], release["key_id"]) == ("allow", key_arn)
            assert isinstance(release["recipient"], dict)
            assert release["recipient"]["image_sha384"] == pcr0
            line = await proxy.wait_for(str(release["request_id"]), since=since)
            assert INSTANCE_ARN in line  # the proxy saw who asked, for which key
            assert "Decrypt" in line
            assert key_arn in line

            # (3, 4) the owner disables its key: the next release (the server restarted) is
            # refused with AWS's error.
            await proxy.set_key_enabled(False)
            await stack.runtime.terminate(server.enclave_id)
            _, reason = await _refused(stack, eif)
            assert "KMSInvalidStateException" in reason
            refusal = _last_release(stack)
            assert refusal["error"] == "KMSInvalidStateException"
            assert refusal["reason"] == "external key store proxy Decrypt: INVALID_STATE"

            # The owner allows it again: a restarted enclave serves (the refusal was the key's).
            await proxy.set_key_enabled(True)
            again = await start_server(stack, eif)
            assert again.report.ok, again.report.raw
            await stack.runtime.terminate(again.enclave_id)

            # (3', 4') the store is disconnected: refused before the proxy is even asked.
            async with stack.owner_kms() as kms:
                await kms.call("DisconnectCustomKeyStore", {"CustomKeyStoreId": store_id})
                described = await kms.call("DescribeKey", {"KeyId": key_arn})
                assert described["KeyMetadata"]["KeyState"] == "Unavailable"
            since = proxy.mark()
            _, reason = await _refused(stack, eif)
            assert "KMSInvalidStateException" in reason
            assert not [ln for ln in proxy.lines_since(since) if "xks_request" in ln]

            # (3'', 4'') connected again, then the owner stops its proxy: refused as well.
            async with stack.owner_kms() as kms:
                await kms.call("ConnectCustomKeyStore", {"CustomKeyStoreId": store_id})
            proxy.process.send_signal(signal.SIGTERM)
            assert await proxy.process.wait() == 0
            _, reason = await _refused(stack, eif)
            assert "KMSInvalidStateException" in reason
            assert _last_release(stack)["reason"] == "external key store proxy Decrypt: UNREACHABLE"
