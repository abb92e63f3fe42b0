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
   model, create the onnxruntime session, warm it up. The sealed file is unsealed as it
   arrives (never held whole) into one plaintext buffer, which is given up before onnxruntime
   makes its own copies (see the README's "Where the memory goes"). The plaintext is an ONNX
   graph (a tensor model) or a text bundle (graph + tokenizer + config, digested as one: a text
   model, served with :mod:`models.text.engine`). A model that fails (key denied, tampered
   file...) is logged and listed as unavailable; the others are served;
5. extend PCR16 with the SHA-384 of every loaded model, in configuration order, and lock it
   (documents carry locked PCRs), so a client can pin the exact models
   (:func:`expected_pcr16`);
6. listen on ``listen_port`` (default 5005): each connection is an attested channel
   (``accept_channel`` with the NSM as attester) carrying ``enclave-rpc/1``;
7. report: READY with the port to the parent (``transport.app_status``, what ``run-enclave
   --wait-ready`` waits for) and to the host store, saying which models are unavailable and
   why.

When it cannot serve (no model loaded, the host store or the NSM unreachable, a bad
``server.toml``) it reports FAILED with one line saying where and what to check (``"KMS
unreachable via (3, 8000)"``, ``"model key refused by KMS: AccessDeniedException"``, ``"sealed
model 'digits' failed its integrity check"``: see :mod:`models._startup`) and exits with status
3 (1 for a bad configuration).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import structlog
import trio

from attest.errors import AttestError
from attest.pcrs import pcr_extend
from kms.errors import KmsError
from models._malloc import trim, tune_malloc
from models._slots import ConnectionSlots, Slot
from models._startup import (
    CONNECTION_ERRORS,
    StartupError,
    kms_failure,
    store_failure,
    unseal_failure,
)
from models.config import ModelConfig, ServerConfig
from models.engine import ModelEngine, create_session
from models.errors import ModelError, ModelLoadError, SealedFormatError
from models.sealed import DEFAULT_CHUNK_SIZE, SealedHeader
from models.sealing import DataKeyDecrypter, unseal_model
from models.service import InferenceService, ModelEntry
from models.store import StoreClient, open_store_client
from models.text.bundle import PREFIX as BUNDLE_PREFIX
from models.text.engine import TextEngine
from models.text.errors import BundleFormatError
from transport.app_status import AppState, AppStatus, report_app_status
from transport.errors import EnclaveError, TransportError
from transport.rpc import RpcError

if TYPE_CHECKING:
    from attest.nsm.client import NsmClient
    from transport.channel import Attester, Suite
    from transport.rpc import RpcServerConnection

__all__ = [
    "MODEL_PCR",
    "KMS_TIMEOUT_S",
    "STORE_TIMEOUT_S",
    "EXIT_CANNOT_SERVE",
    "expected_pcr16",
    "load_models",
    "serve_connection",
    "serve_inference",
    "run_server",
    "main",
]

log = structlog.get_logger()

#: The PCR extended with each served model's SHA-384 (the first PCR the enclave may extend).
MODEL_PCR: Final = 16
_PCR_SIZE: Final = 48  # SHA-384
#: Longest wait for KMS to release one model key (the real AWS KMS answers in ~76 ms; a
#: vsock-proxy that accepted but never answers must not hold the start-up forever).
KMS_TIMEOUT_S: Final = 30.0
#: Longest wait for one call to the host store (credentials, or one model's sealed file, which
#: may be hundreds of MB over vsock).
STORE_TIMEOUT_S: Final = 120.0
#: Exit status when the server cannot serve (it reported FAILED first).
EXIT_CANNOT_SERVE: Final = 3
#: Exit status for an unusable ``server.toml``.
EXIT_BAD_CONFIG: Final = 1


def expected_pcr16(digests: Sequence[bytes]) -> bytes:
    """PCR16 after extending a zero PCR with each model digest in order (Nitro's extend rule:
    ``PCR = SHA-384(PCR || data)``)."""
    pcr = bytes(_PCR_SIZE)
    for digest in digests:
        pcr = pcr_extend(pcr, digest)
    return pcr


class _KeyRelease:
    """The model keys' Decrypt, bounded in time, failing with the detail a user can act on."""

    def __init__(self, kms: DataKeyDecrypter, *, kms_proxy_port: int) -> None:
        self._kms = kms
        self._port = kms_proxy_port

    async def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> bytes:
        try:
            with trio.fail_after(KMS_TIMEOUT_S):
                return await self._kms.decrypt(
                    ciphertext_blob, key_id=key_id, encryption_context=encryption_context
                )
        except (KmsError, trio.TooSlowError, *CONNECTION_ERRORS) as exc:
            detail = kms_failure(exc, kms_proxy_port=self._port, timeout_s=KMS_TIMEOUT_S)
            log.info("model_key_not_released", detail=detail, error=str(exc)[:300])
            raise StartupError(detail) from exc


class _Pieces:
    """The sealed file of one model as it arrives, from the host store or the image; a failure
    of the source is raised as the StartupError that names it (so an unseal error and a
    transport error stay apart)."""

    def __init__(self, source: AsyncIterator[bytes], describe: Callable[[BaseException], str]):
        self._source = source
        self._describe = describe

    def __aiter__(self) -> _Pieces:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._source)
        except StopAsyncIteration:
            raise
        except (RpcError, ModelError, OSError, *CONNECTION_ERRORS) as exc:
            raise StartupError(self._describe(exc)) from exc


class _Readable(Protocol):
    async def read(self, size: int = -1, /) -> bytes: ...


class _FilePieces:
    """A file of the image in pieces of :data:`models.sealed.DEFAULT_CHUNK_SIZE`."""

    def __init__(self, f: _Readable) -> None:
        self._f = f

    def __aiter__(self) -> _FilePieces:
        return self

    async def __anext__(self) -> bytes:
        piece = await self._f.read(DEFAULT_CHUNK_SIZE)
        if not piece:
            raise StopAsyncIteration
        return piece


@asynccontextmanager
async def _open_sealed(
    mc: ModelConfig, *, app_dir: Path, store: StoreClient | None, port: int
) -> AsyncIterator[_Pieces]:
    """The sealed file of ``mc`` as pieces (never read whole: see models.sealing)."""
    if mc.source == "image":
        assert mc.path is not None
        path = mc.path

        def unreadable(exc: BaseException) -> str:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return f"sealed model file {path!r} of {mc.name!r} is unreadable in the image: {reason}"

        try:
            f = await trio.open_file(app_dir / path, "rb")
        except OSError as exc:
            raise StartupError(unreadable(exc)) from exc
        async with f:
            yield _Pieces(_FilePieces(f), unreadable)
        return
    if store is None:
        raise StartupError(f"no host store connection to fetch {mc.name!r} from")

    def failed(exc: BaseException) -> str:
        return store_failure(exc, host_port=port, what=f"model {mc.name!r}")

    opened = False
    try:
        async with store.open_fetch(mc.name) as pieces:
            opened = True
            yield _Pieces(pieces, failed)
    except (RpcError, ModelError, *CONNECTION_ERRORS) as exc:
        if opened or isinstance(exc, StartupError):
            raise  # the body's own error (an unseal failure...), or already described
        raise StartupError(failed(exc)) from exc


async def _unseal(
    mc: ModelConfig,
    *,
    config: ServerConfig,
    app_dir: Path,
    store: StoreClient | None,
    kms: DataKeyDecrypter,
) -> tuple[SealedHeader, bytearray]:
    """Fetch and unseal ``mc``'s sealed file, piece by piece: the plaintext is held once."""
    keys = _KeyRelease(kms, kms_proxy_port=config.kms_proxy_port)
    try:
        with trio.fail_after(STORE_TIMEOUT_S):
            async with _open_sealed(
                mc, app_dir=app_dir, store=store, port=config.host_port
            ) as pieces:
                return await unseal_model(pieces, kms=keys, expected_name=mc.name)
    except StartupError:
        raise
    except trio.TooSlowError as exc:
        raise StartupError(
            store_failure(exc, host_port=config.host_port, what=f"model {mc.name!r}")
        ) from exc
    except (SealedFormatError, ModelLoadError) as exc:
        raise StartupError(unseal_failure(exc, model=mc.name)) from exc


def _load_text(mc: ModelConfig, plaintext: bytearray) -> TextEngine:
    """A text bundle's engine (in a worker thread: tokenizer, session, one warm-up run)."""
    from models.text.embedder import Embedder

    options = mc.text
    embedder = Embedder.from_buffer(
        plaintext,  # consumed: emptied before onnxruntime copies the graph
        threads=options.threads,
        limits=options.limits,
        max_batch_texts=options.max_batch_texts,
        max_batch_tokens=options.max_batch_tokens,
    )
    engine = TextEngine(mc.name, embedder, config=options.engine)
    # The first run sizes onnxruntime's arena: now, not in a client's request; the second
    # measures what a token costs (where rounds run, models.text.engine).
    engine.warm_up()
    return engine


def _load_tensor(mc: ModelConfig, plaintext: bytearray) -> ModelEngine:
    model = bytes(plaintext)  # onnxruntime takes only bytes
    del plaintext[:]  # one plaintext copy at a time
    session = create_session(model, intra_op_threads=mc.engine.intra_op_threads)
    del model
    engine = ModelEngine(mc.name, session, config=mc.engine)
    engine.warm_up()
    return engine


async def _load_one(
    mc: ModelConfig,
    *,
    config: ServerConfig,
    app_dir: Path,
    store: StoreClient | None,
    kms: DataKeyDecrypter,
) -> ModelEntry:
    t0 = time.perf_counter()
    header, plaintext = await _unseal(mc, config=config, app_dir=app_dir, store=store, kms=kms)
    t_unsealed = time.perf_counter()
    kind = "text" if plaintext.startswith(BUNDLE_PREFIX) else "tensor"
    wrong = mc.keys_not_for(kind)
    if wrong:
        del plaintext[:]
        raise StartupError(
            f"model {mc.name!r} is a {kind} model; server.toml gives it keys it does not "
            f"take: {wrong}"
        )
    engine: ModelEngine | TextEngine
    try:
        if kind == "text":
            engine = await trio.to_thread.run_sync(_load_text, mc, plaintext)
        else:
            engine = await trio.to_thread.run_sync(_load_tensor, mc, plaintext)
    except BundleFormatError as exc:
        raise StartupError(f"model bundle {mc.name!r} is malformed: {exc}") from exc
    except ModelLoadError as exc:
        raise StartupError(f"model {mc.name!r} is not a loadable ONNX model") from exc
    finally:
        del plaintext
        trim()  # what unsealing and session creation freed goes back to the system now
    log.info(
        "model_loaded",
        model=mc.name,
        kind=kind,
        digest=header.model_sha384.hex(),
        size=header.total_size,
        key_id=header.key_id,
        unseal_ms=round((t_unsealed - t0) * 1e3, 1),
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
    """Load every configured model; a failure makes that model unavailable, with the reason a
    user can act on (never raises for one model's failure)."""
    entries: dict[str, ModelEntry] = {}
    for mc in config.models:
        try:
            entries[mc.name] = await _load_one(
                mc, config=config, app_dir=app_dir, store=store, kms=kms
            )
        except StartupError as exc:
            log.error("model_unavailable", model=mc.name, reason=str(exc))
            entries[mc.name] = ModelEntry(name=mc.name, reason=str(exc))
        except Exception as exc:  # a bug or an unforeseen failure: this model only
            reason = f"{type(exc).__name__} while loading {mc.name!r} (see the enclave's log)"
            log.error("model_unavailable", model=mc.name, reason=reason, exc_info=exc)
            entries[mc.name] = ModelEntry(name=mc.name, reason=reason)
    return entries


async def serve_connection(
    stream: trio.abc.Stream,
    service: InferenceService,
    *,
    attester: Attester,
    suites: Sequence[Suite],
    handshake_timeout_s: float = 10.0,
    max_streams: int = 64,
    slot: Slot | None = None,
) -> None:
    """One client connection: attested handshake, then RPC until the client leaves.

    ``slot`` (from :class:`models._slots.ConnectionSlots`) is told when the handshake is done,
    so that an idle connection can give its place to a newcomer.
    """
    from transport.channel import accept_channel
    from transport.rpc import serve_rpc

    started = _SlotServing(slot)

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
        try:
            async with channel:
                try:
                    await serve_rpc(
                        channel,
                        service.connection_handler(),
                        max_streams=max_streams,
                        task_status=started,
                    )
                except (EnclaveError, trio.BrokenResourceError, OSError) as exc:
                    # A tampered record, a truncation or a vanished client: this connection
                    # ends, the server keeps serving the others.
                    log.info("connection_ended", error=str(exc) or type(exc).__name__)
        finally:
            # What the connection's buffers freed goes back to the system now, not whenever
            # the heap's top happens to be free (see models._malloc).
            trim()


async def serve_inference(
    service: InferenceService,
    config: ServerConfig,
    *,
    attester: Attester,
    listener: trio.SocketListener | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept attested connections on ``config.listen_port`` (or on ``listener``, which this
    then owns) until cancelled."""
    from transport.channel import Suite
    from transport.vsock import open_vsock_listener

    suites = [Suite[name] for name in config.suites]
    # Not a CapacityLimiter: a full server would park newcomers behind connections that do
    # nothing (issue 10); the slots evict the idlest or refuse at once (see models._slots).
    slots = ConnectionSlots(config.max_connections, clock=trio.current_time)
    if listener is None:
        listener = await open_vsock_listener(config.listen_port)

    async def handler(stream: trio.SocketStream) -> None:
        slot = slots.admit()
        if slot is None:
            await stream.aclose()  # every connection is busy: refused, not parked
            return
        try:
            with trio.CancelScope() as scope:
                slot.scope = scope
                await serve_connection(
                    stream,
                    service,
                    attester=attester,
                    suites=suites,
                    handshake_timeout_s=config.handshake_timeout_s,
                    max_streams=config.max_streams_per_connection,
                    slot=slot,
                )
        except Exception as exc:  # a bug on one connection must not stop the server
            log.error("connection_failed", error_type=type(exc).__name__, exc_info=exc)
        finally:
            slots.release(slot)
            if slot.evicted:
                await trio.aclose_forcefully(stream)

    async def observe_slots() -> None:
        while True:
            await trio.sleep(slots.observe_interval_s)
            slots.observe()

    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(observe_slots)
        log.info("inference_server_listening", port=config.listen_port)
        task_status.started()
        await trio.serve_listeners(handler, [listener])


class _SlotServing:
    """The ``task_status`` given to ``serve_rpc``: hands its connection to the slot."""

    def __init__(self, slot: Slot | None) -> None:
        self._slot = slot

    def started(self, value: RpcServerConnection | None = None) -> None:
        if self._slot is not None and value is not None:
            self._slot.serving(value, trio.current_time())


class _Reporter:
    """Tells the parent (app status) and the host store how the start-up went."""

    def __init__(self, config: ServerConfig | None) -> None:
        self.config = config
        self.t0 = time.perf_counter()

    async def ready(self, entries: Mapping[str, ModelEntry], store: StoreClient | None) -> None:
        assert self.config is not None
        detail = _ready_detail(entries)
        log.info("inference_server_ready", port=self.config.listen_port, detail=detail)
        await report_app_status(
            AppStatus(AppState.READY, detail=detail, ports=(self.config.listen_port,))
        )
        await self._tell_store(store, entries, port=self.config.listen_port, detail=detail)

    async def failed(
        self,
        detail: str,
        entries: Mapping[str, ModelEntry] | None = None,
        store: StoreClient | None = None,
    ) -> int:
        """Report that the server cannot serve and why; returns the exit status."""
        log.error("inference_server_failed", detail=detail)
        await report_app_status(AppStatus(AppState.FAILED, detail=detail))
        await self._tell_store(store, entries or {}, port=None, detail=detail, error=detail)
        return EXIT_CANNOT_SERVE

    async def _tell_store(
        self,
        store: StoreClient | None,
        entries: Mapping[str, ModelEntry],
        *,
        port: int | None,
        detail: str,
        error: str | None = None,
    ) -> None:
        """Best effort, bounded: the host store may be what failed."""
        if self.config is None:
            return
        report = {
            "port": port,
            "error": error,
            "detail": detail,
            "startup_ms": round((time.perf_counter() - self.t0) * 1e3, 1),
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
        with trio.move_on_after(5):
            try:
                if store is not None:
                    await store.ready(report)
                    return
                async with open_store_client(self.config.host_port) as fresh:
                    await fresh.ready(report)
            except (RpcError, *CONNECTION_ERRORS) as exc:
                log.info("store_report_failed", error=str(exc) or type(exc).__name__)


def _ready_detail(entries: Mapping[str, ModelEntry]) -> str:
    served = [name for name, e in entries.items() if e.engine is not None]
    missing = [f"{name!r} ({e.reason})" for name, e in entries.items() if e.engine is None]
    text = "serving " + ", ".join(repr(n) for n in served)
    return text + ("; unavailable: " + "; ".join(missing) if missing else "")


def _failed_detail(entries: Mapping[str, ModelEntry]) -> str:
    reasons = [e.reason or "unavailable" for e in entries.values()]
    if len(set(reasons)) == 1:
        return reasons[0]
    return "no model could be loaded: " + "; ".join(
        f"{name!r}: {e.reason}" for name, e in entries.items()
    )


async def run_server(config: ServerConfig, *, app_dir: Path, nsm: NsmClient | None = None) -> int:
    """The enclave app's whole life (see the module docstring). Returns an exit status.

    Args:
        config: the server configuration.
        app_dir: where ``source = "image"`` paths are resolved.
        nsm: the NSM to use (default: this enclave's, :meth:`NsmClient.open`).
    """
    from attest.channel import nsm_attester
    from attest.nsm.client import NsmClient
    from kms.client import AttestedKmsClient, Credentials, KmsClient
    from transport.vsock import VMADDR_CID_PARENT, VsockAddr, open_vsock_listener

    reporter = _Reporter(config)
    try:
        nsm = nsm or await NsmClient.open()
    except AttestError as exc:
        return await reporter.failed(f"NSM unavailable: {exc}")
    needs_store = any(mc.source == "store" for mc in config.models)
    try:
        async with open_store_client(config.host_port) as store:
            try:
                with trio.fail_after(STORE_TIMEOUT_S):
                    creds = await store.credentials()
            except (RpcError, ModelError, trio.TooSlowError, *CONNECTION_ERRORS) as exc:
                detail = store_failure(exc, host_port=config.host_port, what="KMS credentials")
                return await reporter.failed(detail, store=store)
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
    except CONNECTION_ERRORS as exc:  # the store's connection itself
        detail = store_failure(exc, host_port=config.host_port, what="connection")
        return await reporter.failed(detail)
    loaded = [e for e in (entries[mc.name] for mc in config.models) if e.engine is not None]
    if not loaded:
        return await reporter.failed(_failed_detail(entries), entries)
    try:
        for entry in loaded:
            assert entry.digest is not None
            await nsm.extend_pcr(MODEL_PCR, entry.digest)
        # Lock it: attestation documents carry the locked PCRs, and nothing (not even this
        # app) can change the model measurement afterwards.
        await nsm.lock_pcr(MODEL_PCR)
    except AttestError as exc:
        return await reporter.failed(f"NSM refused to measure the models in PCR16: {exc}", entries)
    try:
        listener = await open_vsock_listener(config.listen_port)
    except (OSError, TransportError) as exc:
        detail = f"cannot listen on vsock port {config.listen_port}: {exc}"
        return await reporter.failed(detail, entries)
    service = InferenceService(entries, limits=config.service_limits())
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)  # the text models' engines
        await nursery.start(
            lambda task_status: serve_inference(
                service,
                config,
                attester=nsm_attester(nsm),
                listener=listener,
                task_status=task_status,
            )
        )
        await reporter.ready(entries, None)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point inside the enclave: ``python -m models [--config server.toml]``."""
    from transport.logs import configure_logging

    parser = argparse.ArgumentParser(
        prog="models.server", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--config", type=Path, default=Path("server.toml"))
    args = parser.parse_args(argv)
    configure_logging()
    tune_malloc()
    try:
        config = ServerConfig.from_file(args.config)
    except EnclaveError as exc:
        detail = f"server config {args.config}: {exc}"
        trio.run(_Reporter(None).failed, detail)
        return EXIT_BAD_CONFIG
    try:
        return trio.run(lambda: run_server(config, app_dir=args.config.resolve().parent))
    except Exception as exc:  # report why before the enclave ends (its console may be off)
        leaf = _leaf(exc)
        log.error("inference_server_crashed", exc_info=exc)
        detail = f"the server failed: {type(leaf).__name__}: {' '.join(str(leaf).split())[:300]}"
        trio.run(_Reporter(config).failed, detail)
        return EXIT_CANNOT_SERVE


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
