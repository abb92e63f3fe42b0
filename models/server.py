"""The confidential inference server: runs inside the enclave (``python -m models.server``).

Start-up, in order (DESIGN.md §3):

1. read ``server.toml`` from the app directory (measured: part of PCR2);
2. open the NSM and start generating the enclave's RSA recipient key (in a thread, overlapped
   with the rest);
3. ask the host-side store on ``(3, host_port)`` for KMS credentials, and fetch the sealed files
   of ``source = "store"`` models (``source = "image"`` files are read from the app directory);
4. for each model: ``Decrypt`` its data key through the vsock-proxy at ``(3, kms_proxy_port)``
   with ``Recipient`` (attestation document + recipient key: the data key never exists in
   plaintext outside the enclave), unseal, check the digest and that the header names this
   model, create the onnxruntime session, warm it up. A model that fails (key denied, tampered
   file...) is logged and listed as unavailable; the others are served;
5. extend PCR16 with the SHA-384 of every loaded model, in configuration order, and lock it
   (documents carry locked PCRs), so a client can pin the exact models
   (:func:`expected_pcr16`);
6. listen on ``listen_port`` (default 5005): each connection is an attested channel
   (``accept_channel`` with the NSM as attester) carrying ``enclave-rpc/1``; report ``ready``
   to the host store.

The server exits non-zero if no model could be loaded (nothing to serve).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from models.config import ModelConfig, ServerConfig
from models.engine import ModelEngine, create_session
from models.errors import ModelError
from models.sealing import DataKeyDecrypter, unseal_model
from models.service import InferenceService, ModelEntry
from models.store import StoreClient, open_store_client
from transport.errors import EnclaveError

__all__ = [
    "MODEL_PCR",
    "expected_pcr16",
    "load_models",
    "serve_connection",
    "serve_inference",
    "main",
]

log = structlog.get_logger()

#: The PCR extended with each served model's SHA-384 (the first PCR the enclave may extend).
MODEL_PCR: Final = 16
_PCR_SIZE: Final = 48  # SHA-384


def expected_pcr16(digests: Sequence[bytes]) -> bytes:
    """PCR16 after extending a zero PCR with each model digest in order (Nitro's extend rule:
    ``PCR = SHA-384(PCR || data)``)."""
    pcr = bytes(_PCR_SIZE)
    for digest in digests:
        pcr = hashlib.sha384(pcr + digest).digest()
    return pcr


def _reason(exc: BaseException) -> str:
    name = str(getattr(exc, "type_name", None) or type(exc).__name__)
    text = str(exc) or name
    return text if text.startswith(name) else f"{name}: {text}"


async def _load_one(
    mc: ModelConfig,
    *,
    app_dir: Path,
    store: StoreClient | None,
    kms: DataKeyDecrypter,
) -> ModelEntry:
    t0 = time.perf_counter()
    if mc.source == "image":
        assert mc.path is not None
        data = await trio.Path(app_dir / mc.path).read_bytes()
    else:
        if store is None:
            raise ModelError("no host store connection to fetch the model from")
        data = await store.fetch(mc.name)
    header, plaintext = await unseal_model(data, kms=kms, expected_name=mc.name)
    session = await trio.to_thread.run_sync(
        lambda: create_session(plaintext, intra_op_threads=mc.engine.intra_op_threads)
    )
    engine = ModelEngine(mc.name, session, config=mc.engine)
    batch1 = engine.warm_up()
    log.info(
        "model_loaded",
        model=mc.name,
        digest=header.model_sha384.hex(),
        size=header.total_size,
        key_id=header.key_id,
        batch1_us=round(batch1 * 1e6, 1),
        load_ms=round((time.perf_counter() - t0) * 1e3, 1),
    )
    return ModelEntry(
        name=mc.name, digest=header.model_sha384, size=header.total_size, engine=engine
    )


async def load_models(
    config: ServerConfig,
    *,
    app_dir: Path,
    store: StoreClient | None,
    kms: DataKeyDecrypter,
) -> dict[str, ModelEntry]:
    """Load every configured model; failures become unavailable entries (never raise)."""
    entries: dict[str, ModelEntry] = {}
    for mc in config.models:
        try:
            entries[mc.name] = await _load_one(mc, app_dir=app_dir, store=store, kms=kms)
        except (EnclaveError, OSError) as exc:
            reason = _reason(exc)
            log.error("model_unavailable", model=mc.name, reason=reason)
            entries[mc.name] = ModelEntry(name=mc.name, reason=reason)
    return entries


async def serve_connection(
    stream: trio.abc.Stream,
    service: InferenceService,
    *,
    attester: Any,
    suites: Sequence[Any],
    handshake_timeout_s: float = 10.0,
    max_streams: int = 64,
) -> None:
    """One client connection: attested handshake, then RPC until the client leaves."""
    from transport.channel import accept_channel
    from transport.rpc import serve_rpc

    async with stream:
        with trio.move_on_after(handshake_timeout_s) as scope:
            try:
                channel = await accept_channel(stream, attester=attester, suites=suites)
            except (EnclaveError, trio.BrokenResourceError, OSError) as exc:
                log.info("channel_handshake_failed", error=str(exc))
                return
        if scope.cancelled_caught:
            log.info("channel_handshake_timeout", timeout_s=handshake_timeout_s)
            return
        async with channel:
            try:
                await serve_rpc(channel, service.handle, max_streams=max_streams)
            except (EnclaveError, trio.BrokenResourceError, OSError) as exc:
                # A tampered record, a truncation or a vanished client: this connection ends,
                # the server keeps serving the others.
                log.info("connection_ended", error=str(exc) or type(exc).__name__)


async def serve_inference(
    service: InferenceService,
    config: ServerConfig,
    *,
    attester: Any,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept attested connections on ``config.listen_port`` until cancelled."""
    from transport.channel import Suite
    from transport.vsock import open_vsock_listener

    suites = [Suite[name] for name in config.suites]
    limiter = trio.CapacityLimiter(config.max_connections)
    listener = await open_vsock_listener(config.listen_port)

    async def handler(stream: trio.SocketStream) -> None:
        async with limiter:
            try:
                await serve_connection(
                    stream,
                    service,
                    attester=attester,
                    suites=suites,
                    handshake_timeout_s=config.handshake_timeout_s,
                    max_streams=config.max_streams_per_connection,
                )
            except Exception as exc:  # a bug on one connection must not stop the server
                log.error("connection_failed", error_type=type(exc).__name__, exc_info=exc)

    async with listener:
        log.info("inference_server_listening", port=config.listen_port)
        task_status.started()
        await trio.serve_listeners(handler, [listener])


async def run_server(config: ServerConfig, *, app_dir: Path) -> int:
    """The enclave app's whole life (see the module docstring). Returns an exit status."""
    from attest.channel import nsm_attester
    from attest.nsm.client import NsmClient
    from kms.client import AttestedKmsClient, Credentials, KmsClient
    from transport.vsock import VMADDR_CID_PARENT, VsockAddr

    t0 = time.perf_counter()
    nsm = await NsmClient.open()
    needs_store = any(mc.source == "store" for mc in config.models)
    async with open_store_client(config.host_port) as store:
        try:
            creds = await store.credentials()
        except EnclaveError as exc:
            reason = f"no KMS credentials from the host: {_reason(exc)}"
            log.error("kms_credentials_unavailable", reason=reason)
            entries = {mc.name: ModelEntry(name=mc.name, reason=reason) for mc in config.models}
            await store.ready(_report(config, entries, t0, error=reason))
            return 3
        kms = AttestedKmsClient(
            KmsClient(
                vsock=VsockAddr(VMADDR_CID_PARENT, config.kms_proxy_port),
                credentials=Credentials(
                    creds.access_key_id, creds.secret_access_key, creds.session_token
                ),
                region=creds.region or config.kms_region,
            ),
            nsm,
        )
        kms.prepare()  # RSA key generation overlaps the fetches
        try:
            entries = await load_models(
                config, app_dir=app_dir, store=store if needs_store else None, kms=kms
            )
        finally:
            await kms.aclose()
    loaded = [e for e in (entries[mc.name] for mc in config.models) if e.engine is not None]
    for entry in loaded:
        assert entry.digest is not None
        await nsm.extend_pcr(MODEL_PCR, entry.digest)
    if loaded:
        # Lock it: attestation documents carry the locked PCRs, and nothing (not even this
        # app) can change the model measurement afterwards.
        await nsm.lock_pcr(MODEL_PCR)
    if not loaded:
        log.error("no_model_loaded", models=[mc.name for mc in config.models])
        async with open_store_client(config.host_port) as store:
            await store.ready(_report(config, entries, t0, error="no model could be loaded"))
        return 3
    service = InferenceService(
        entries,
        max_request_bytes=config.max_request_bytes,
        max_concurrent_requests=config.max_concurrent_requests,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_inference(
                service, config, attester=nsm_attester(nsm), task_status=task_status
            )
        )
        async with open_store_client(config.host_port) as store:
            await store.ready(_report(config, entries, t0))
    return 0


def _report(
    config: ServerConfig,
    entries: dict[str, ModelEntry],
    t0: float,
    *,
    error: str | None = None,
) -> dict[str, Any]:
    """The non-secret start-up summary sent to the host store."""
    return {
        "port": None if error else config.listen_port,
        "error": error,
        "startup_ms": round((time.perf_counter() - t0) * 1e3, 1),
        "models": [
            {
                "name": e.name,
                "available": e.engine is not None,
                "digest": e.digest.hex() if e.digest else None,
                "reason": e.reason,
            }
            for e in entries.values()
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point inside the enclave: ``python -m models.server [--config server.toml]``."""
    from transport.logs import configure_logging

    parser = argparse.ArgumentParser(prog="models.server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("server.toml"))
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = ServerConfig.from_file(args.config)
    except EnclaveError as exc:
        log.error("inference_server_failed", error=_reason(exc))
        return 1
    try:
        return trio.run(lambda: run_server(config, app_dir=args.config.resolve().parent))
    except Exception as exc:  # report why before the enclave ends (its console may be off)
        reason = _reason(_leaf(exc))
        log.error("inference_server_failed", error=reason)
        trio.run(_report_failure, config, reason)
        return 1


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _report_failure(config: ServerConfig, reason: str) -> None:
    """Best effort: tell the host store the server is exiting and why (non-secret text)."""
    with trio.move_on_after(5):
        try:
            async with open_store_client(config.host_port) as store:
                await store.ready({"port": None, "error": reason[:1000], "models": []})
        except Exception as exc:  # the host store may be what failed
            log.warning("failure_report_failed", error=str(exc))


if __name__ == "__main__":
    sys.exit(main())
