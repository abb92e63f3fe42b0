"""The server's readiness report (issue 10, item 3): READY with its port once listening, FAILED
with one actionable line when it cannot serve, on ``(3, 9001)`` (``transport.app_status``).

The server runs in this process (``run_server``) against a real host side: the KMS daemon, the
vsock-proxy and the host store of ``runtime.demo.open_stack``, an emulated NSM device (the
real ``NsmDevice`` behind an ``NsmClient``, signing with the stack's CA). The test plays the
parent's app status port. Before: a denied key or an unreachable KMS made the server log
``BrokenResourceError: connection reset`` into the store's stdout and exit, with nothing for
``run-enclave`` to wait for.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from models.config import ModelConfig, ServerConfig
from models.server import EXIT_CANNOT_SERVE, run_server
from runtime.demo import STORE_PORT, Stack
from transport.app_status import APP_STATUS_PORT, AppState, AppStatus, receive_app_status

pytestmark = pytest.mark.slow

#: The PCR0 of the "image" the in-process server claims (its NSM device's boot measurement).
PCR0 = hashlib.sha384(b"readiness-test-image").digest()
LISTEN_PORT = 5105


@dataclass
class Host:
    stack: Stack
    models_dir: Path
    nursery: trio.Nursery
    reports: list[AppStatus] = field(default_factory=list)


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    from runtime.demo import open_stack
    from transport.vsock import open_vsock_listener

    base = Path(tempfile.mkdtemp(prefix="er-rdy-"))
    models_dir = base / "s" / "models"
    try:
        async with (
            open_stack(
                base / "s",
                models={
                    "digits": models_dir / "digits.sealed",
                    "vault": models_dir / "vault.sealed",
                },
                zygote=False,
            ) as stack,
            trio.open_nursery() as nursery,
        ):
            result = Host(stack, models_dir, nursery)
            # The parent's side of the app status port (the runtime serves it for enclaves).
            listener = await open_vsock_listener(APP_STATUS_PORT)

            async def status(stream: trio.SocketStream) -> None:
                async with stream:
                    result.reports.append(await receive_app_status(stream))

            nursery.start_soon(trio.serve_listeners, status, [listener])
            yield result
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _seal(host: Host, name: str, *, pcr0: bytes = PCR0) -> Path:
    from runtime.demo import create_model_key, seal_bundled_model

    key = await create_model_key(host.stack, pcr0.hex(), alias=None)
    out = host.models_dir / f"{name}.sealed"
    await seal_bundled_model(host.stack, key, out, name=name)
    return out


async def _nsm(host: Host, nursery: trio.Nursery) -> object:
    """This "enclave's" NSM: the real device, served over a memory stream to a real client."""
    from attest.ca import LocalCA
    from attest.nsm import EnclaveIdentity, NsmClient, NsmDevice
    from attest.nsm.server import serve_nsm

    ca = await trio.to_thread.run_sync(LocalCA.load_or_create, host.stack.state_dir / "ca")
    module_id = "i-0123456789abcdef0-enc0123456789abcdef"
    device = NsmDevice(EnclaveIdentity(module_id, pcrs={0: PCR0}), ca.new_signer(module_id))
    client_end, device_end = trio.testing.memory_stream_pair()
    nursery.start_soon(serve_nsm, device_end, device)
    return NsmClient.from_stream(client_end)


async def _run(host: Host, config: ServerConfig) -> tuple[AppStatus, int | None]:
    """Start the server; its first report, and its exit status if it exited."""
    code: int | None = None
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nsm = await _nsm(host, nursery)

            async def server() -> None:
                nonlocal code
                code = await run_server(config, app_dir=host.models_dir, nsm=nsm)  # type: ignore[arg-type]

            nursery.start_soon(server)
            while not host.reports:
                await trio.sleep(0.01)
            if host.reports[0].state is AppState.FAILED:
                while code is None:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    return host.reports[0], code


def _config(*names: str, **overrides: object) -> ServerConfig:
    base: dict[str, object] = {
        "models": tuple(ModelConfig(name) for name in names),
        "listen_port": LISTEN_PORT,
        "host_port": STORE_PORT,
    }
    return ServerConfig(**{**base, **overrides})  # type: ignore[arg-type]


async def test_ready_with_its_port(host: Host) -> None:
    await _seal(host, "digits")
    status, code = await _run(host, _config("digits"))
    assert status.state is AppState.READY
    assert status.ports == (LISTEN_PORT,)
    assert status.detail == "serving 'digits'"
    assert code is None  # still serving when the test stopped it
    assert host.stack.store.ready_reports[-1]["port"] == LISTEN_PORT


async def test_ready_says_which_models_are_unavailable(host: Host) -> None:
    await _seal(host, "digits")
    await _seal(host, "vault", pcr0=hashlib.sha384(b"another image").digest())
    status, _ = await _run(host, _config("digits", "vault"))
    assert status.state is AppState.READY
    assert status.detail == (
        "serving 'digits'; unavailable: 'vault' (model key refused by KMS: AccessDeniedException)"
    )


async def test_key_refused(host: Host) -> None:
    await _seal(host, "digits", pcr0=hashlib.sha384(b"another image").digest())
    status, code = await _run(host, _config("digits"))
    assert status == AppStatus(AppState.FAILED, "model key refused by KMS: AccessDeniedException")
    assert code == EXIT_CANNOT_SERVE
    report = host.stack.store.ready_reports[-1]
    assert report["error"] == status.detail
    assert report["models"][0]["reason"] == status.detail


async def test_kms_unreachable(host: Host) -> None:
    """Nothing on the proxy port, and a proxy whose KMS is down: the same actionable line."""
    from transport.proxy import serve_vsock_proxy

    await _seal(host, "digits")
    status, code = await _run(host, _config("digits", kms_proxy_port=8001))
    assert status == AppStatus(AppState.FAILED, "KMS unreachable via (3, 8001)")
    assert code == EXIT_CANNOT_SERVE
    # A vsock-proxy that accepts, but whose KMS is not there (a closed TCP port).
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    proxy = partial(serve_vsock_proxy, allowlist=[("127.0.0.1", dead_port)])
    await host.nursery.start(proxy, 8002, "127.0.0.1", dead_port)
    host.reports.clear()
    status, _ = await _run(host, _config("digits", kms_proxy_port=8002))
    assert status == AppStatus(AppState.FAILED, "KMS unreachable via (3, 8002)")


async def test_sealed_model_tampered(host: Host) -> None:
    path = await _seal(host, "digits")
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x20  # one bit of the body
    path.write_bytes(bytes(blob))
    status, _ = await _run(host, _config("digits"))
    assert status == AppStatus(AppState.FAILED, "sealed model 'digits' failed its integrity check")


async def test_store_unreachable_or_without_the_model(host: Host) -> None:
    status, code = await _run(host, _config("digits", host_port=7999))
    assert status == AppStatus(AppState.FAILED, "model store unreachable via (3, 7999)")
    assert code == EXIT_CANNOT_SERVE
    host.reports.clear()
    status, _ = await _run(host, _config("missing"))
    assert status == AppStatus(
        AppState.FAILED, "the host store on (3, 7000) has no model 'missing'"
    )


async def test_several_models_failing_for_different_reasons(host: Host) -> None:
    await _seal(host, "vault", pcr0=hashlib.sha384(b"another image").digest())
    status, _ = await _run(host, _config("vault", "missing"))
    assert status.state is AppState.FAILED
    assert status.detail == (
        "no model could be loaded: 'vault': model key refused by KMS: AccessDeniedException; "
        "'missing': the host store on (3, 7000) has no model 'missing'"
    )


async def test_bad_config_is_reported(host: Host, tmp_path: Path) -> None:
    from models.server import EXIT_BAD_CONFIG, main

    bad = tmp_path / "server.toml"
    bad.write_text('listen_port = "x"\n[[models]]\nname = "a"\n')
    code = await trio.to_thread.run_sync(main, ["--config", str(bad)])
    assert code == EXIT_BAD_CONFIG
    assert host.reports[0] == AppStatus(
        AppState.FAILED, f"server config {bad}: listen_port must be a port number, got 'x'"
    )


@pytest.mark.parametrize(
    ("exc", "detail"),
    [
        (trio.TooSlowError(), "KMS did not answer via (3, 8000) within 30 s"),
        (trio.BrokenResourceError("connection reset"), "KMS unreachable via (3, 8000)"),
        (ConnectionRefusedError(111, "refused"), "KMS unreachable via (3, 8000)"),
    ],
)
def test_kms_failure_details(exc: BaseException, detail: str) -> None:
    from models._startup import kms_failure

    assert kms_failure(exc, kms_proxy_port=8000, timeout_s=30) == detail


def test_kms_failure_details_for_answers() -> None:
    from kms.errors import KmsApiError, KmsError
    from models._startup import kms_failure

    denied = KmsApiError("AccessDeniedException", "the attestation does not match")
    assert kms_failure(denied, kms_proxy_port=8000, timeout_s=30) == (
        "model key refused by KMS: AccessDeniedException"
    )
    odd = KmsError("KMS answered HTTP 502 with a non-JSON body\nand more")
    assert kms_failure(odd, kms_proxy_port=8000, timeout_s=30) == (
        "KMS answer via (3, 8000) unusable: KMS answered HTTP 502 with a non-JSON body and more"
    )
