"""The host-side model store and provisioning service, and its enclave-side client.

Like ``kmstool-instance`` hands AWS credentials to ``kmstool-enclave`` over vsock, the parent
instance runs a small service on ``(3, host_port)`` (default 7000) that the inference server
calls at start. It speaks ``enclave-rpc/1`` (transport.rpc) on a plain vsock stream: the host is
untrusted, so nothing it provides is trusted either:

``credentials`` (unary) -> ``{"access_key_id", "secret_access_key", "session_token", "region"}``
    KMS signing credentials for this instance. They only authenticate the caller to KMS; what
    KMS releases still depends on the enclave's attestation (Recipient) and the key policy, and
    the data key comes back encrypted to the enclave's own key. Kept out of the measured image,
    so rotating them does not change PCR0.
``fetch`` (streaming; metadata ``{"name": NAME}``) -> ``{"size": N}`` then ``{"chunk": bytes}``...
    The sealed file of a model. Its integrity is the sealed format's business (AEAD bound to the
    header, the digest, the model name in the KMS encryption context), not the host's.
``put`` (streaming; metadata ``{"name": NAME, "size": N}``) ``{"chunk": bytes}``...
-> ``{"stored": N}``
    An enclave's sealed output (``models.enclave_seal``: a checkpoint...), kept on the host
    under ``outputs_dir`` and fetched back by name with ``fetch``. Only with an ``outputs_dir``;
    names are plain (``[A-Za-z0-9._-]``, no leading dot) and never those of provisioned models;
    the size is bounded before anything is written. The host holds ciphertext only.
``ready`` (unary) ``{"port": P, "models": [{"name", "available", "digest", "reason"}],
"error": None | str}`` -> ``{}``
    The server reports that it is listening (or, with ``error`` set, that it cannot serve and
    is exiting), with its catalog summary, so the operator (and ``enclave demo``) sees which
    models loaded and why others did not. Only non-secret facts are reported.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from models.errors import ModelLoadError
from models.sealed import MAX_MODEL_SIZE
from transport.rpc import (
    Router,
    RpcClient,
    RpcError,
    RpcStream,
    open_rpc_client,
    route,
    serve_rpc,
    unary_inline,
)
from transport.vsock import VMADDR_CID_PARENT, VsockAddr, open_vsock_listener, open_vsock_stream

__all__ = [
    "HostCredentials",
    "ModelStore",
    "serve_model_store",
    "StoreClient",
    "FetchPieces",
    "open_store_client",
    "FETCH_CHUNK",
]

log = structlog.get_logger()

#: Names ``put`` accepts: plain file names (no path, no leading dot).
_OUTPUT_NAME: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
#: Bytes per ``fetch`` message (well under the RPC's 4 MiB message cap).
FETCH_CHUNK: Final = 1 << 20


@dataclass(frozen=True)
class HostCredentials:
    """What ``credentials`` returns (the secret is never logged or printed)."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    region: str = "us-east-1"

    def __repr__(self) -> str:
        return f"HostCredentials(access_key_id={self.access_key_id!r}, region={self.region!r})"


class ModelStore:
    """The host side: sealed files by model name, credentials, and a ``ready`` callback.

    Args:
        models: model name -> sealed file path.
        credentials: KMS credentials handed to the enclave (None: ``credentials`` is refused).
        on_ready: called with the server's ``ready`` report.
    """

    def __init__(
        self,
        models: Mapping[str, Path],
        *,
        credentials: HostCredentials | None,
        on_ready: Callable[[dict[str, Any]], None] | None = None,
        outputs_dir: Path | None = None,
        max_output_bytes: int = MAX_MODEL_SIZE,
    ) -> None:
        self.models = {name: Path(p) for name, p in models.items()}
        #: Where enclaves' ``put`` outputs go (None: ``put`` is refused).
        self.outputs_dir = Path(outputs_dir) if outputs_dir is not None else None
        self.max_output_bytes = max_output_bytes
        self._outputs: set[str] = set()
        self.credentials = credentials
        self.on_ready = on_ready
        self.ready_reports: list[dict[str, Any]] = []
        self._changed = trio.Event()
        #: The RPC handler (pass it to ``serve_rpc``).
        self.handle: Router = route(
            {
                "credentials": unary_inline(self._credentials),
                "fetch": self._fetch,
                "put": self._put,
                "ready": unary_inline(self._ready),
            }
        )

    def _credentials(self, _request: object, _stream: RpcStream) -> dict[str, str | None]:
        if self.credentials is None:
            raise RpcError("permission_denied", "this host provides no KMS credentials")
        c = self.credentials
        return {
            "access_key_id": c.access_key_id,
            "secret_access_key": c.secret_access_key,
            "session_token": c.session_token,
            "region": c.region,
        }

    async def _fetch(self, stream: RpcStream) -> None:
        name = stream.metadata.get("name")
        path = self.models.get(name) if isinstance(name, str) else None
        if path is None:
            raise RpcError("not_found", f"the host store has no model {str(name)[:128]!r}")
        await self._send_file(stream, path)

    async def _put(self, stream: RpcStream) -> None:
        name, size = stream.metadata.get("name"), stream.metadata.get("size")
        if self.outputs_dir is None:
            raise RpcError("permission_denied", "this host keeps no enclave outputs")
        if not isinstance(name, str) or not _OUTPUT_NAME.fullmatch(name):
            raise RpcError("invalid_argument", "an output name is 1-128 of [A-Za-z0-9._-]")
        if name in self.models and name not in self._outputs:
            raise RpcError("permission_denied", f"{name!r} is a provisioned model")
        if type(size) is not int or not 0 <= size <= self.max_output_bytes:
            raise RpcError("invalid_argument", f"an output is 0-{self.max_output_bytes} bytes")
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        final = self.outputs_dir / name
        tmp = self.outputs_dir / f".{name}.part"
        f = await trio.open_file(tmp, "wb")
        try:
            async with f:
                written = 0
                async for msg in stream:
                    piece = msg.get("chunk") if isinstance(msg, dict) else None
                    if not isinstance(piece, bytes) or written + len(piece) > size:
                        raise RpcError("invalid_argument", "malformed or oversized output")
                    await f.write(piece)
                    written += len(piece)
                if written != size:
                    raise RpcError("invalid_argument", f"{written} of {size} bytes arrived")
            await trio.Path(tmp).replace(final)
        except BaseException:
            await trio.Path(tmp).unlink(missing_ok=True)
            raise
        self._outputs.add(name)
        self.models[name] = final
        log.info("enclave_output_stored", name=name, size=size)
        await stream.send({"stored": size})

    def _ready(self, report: object, _stream: RpcStream) -> dict[str, object]:
        if not isinstance(report, dict):
            raise RpcError("invalid_argument", "ready report must be a map")
        self.ready_reports.append(report)
        if report.get("error"):
            log.warning(
                "enclave_server_failed", error=report.get("error"), models=report.get("models")
            )
        else:
            log.info(
                "enclave_server_ready",
                port=report.get("port"),
                detail=report.get("detail"),
                models=report.get("models"),
            )
        if self.on_ready is not None:
            self.on_ready(report)
        self._changed.set()
        self._changed = trio.Event()
        return {}

    async def wait_report(self, index: int) -> dict[str, Any]:
        """Wait for the ``index``-th (0-based) ``ready`` report and return it."""
        while len(self.ready_reports) <= index:
            await self._changed.wait()
        return self.ready_reports[index]

    @staticmethod
    async def _send_file(stream: RpcStream, path: Path) -> None:
        f = await trio.open_file(path, "rb")
        async with f:
            size = (await trio.Path(path).stat()).st_size
            await stream.send({"size": size})
            while piece := await f.read(FETCH_CHUNK):
                await stream.send({"chunk": piece})


async def serve_model_store(
    store: ModelStore,
    port: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``store`` on the host's vsock ``(3, port)`` until cancelled."""
    listener = await open_vsock_listener(port)

    async def connection(stream: trio.SocketStream) -> None:
        try:
            await serve_rpc(stream, store.handle)
        except Exception as exc:  # one bad peer must not stop the store
            log.warning("model_store_connection_failed", error=str(exc))

    async with listener:
        task_status.started()
        await trio.serve_listeners(connection, [listener])


class StoreClient:
    """The enclave side of the store (an open RPC client on a vsock stream)."""

    def __init__(self, rpc: RpcClient) -> None:
        self._rpc = rpc

    async def credentials(self) -> HostCredentials:
        """This instance's KMS credentials, from the host."""
        answer = await self._rpc.call("credentials", {})
        try:
            return HostCredentials(
                access_key_id=str(answer["access_key_id"]),
                secret_access_key=str(answer["secret_access_key"]),
                session_token=answer.get("session_token"),
                region=str(answer.get("region") or "us-east-1"),
            )
        except (KeyError, TypeError) as exc:
            raise ModelLoadError("host store sent malformed credentials") from exc

    async def fetch(self, name: str, *, max_size: int = MAX_MODEL_SIZE) -> bytes:
        """The sealed file of model ``name`` (size bounded before any allocation).

        Holds the whole file; :meth:`open_fetch` hands it over piece by piece instead.
        """
        async with self.open_fetch(name, max_size=max_size) as pieces:
            buf = bytearray(pieces.size)  # announced and bounded: one allocation, no growth
            at = 0
            async for piece in pieces:
                buf[at : at + len(piece)] = piece
                at += len(piece)
        return bytes(buf)

    @asynccontextmanager
    async def open_fetch(
        self, name: str, *, max_size: int = MAX_MODEL_SIZE
    ) -> AsyncIterator[FetchPieces]:
        """``async with store.open_fetch(name) as pieces: async for piece in pieces: ...``:
        the sealed file of model ``name`` as it arrives (pieces of at most
        :data:`FETCH_CHUNK` bytes), never held whole.

        The size the store announces is bounded by ``max_size`` before anything else is read;
        pieces beyond it, a piece that is not bytes, or fewer bytes than announced are a
        :class:`~models.errors.ModelLoadError` (raised by the iteration).
        """
        async with self._rpc.open_stream("fetch", {"name": name}) as st:
            await st.send_end()
            first = await st.receive()
            size = first.get("size") if isinstance(first, dict) else None
            if type(size) is not int or not 0 <= size <= max_size:
                raise ModelLoadError(f"host store announced a bad size for {name!r}")
            yield FetchPieces(st, name, size)

    async def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Keep ``data`` (an enclave's sealed output) on the host under ``name``; fetch it
        back with :meth:`fetch` / :meth:`open_fetch`.

        Raises:
            RpcError: the host refused (no outputs kept, a bad or provisioned name, too big).
        """
        view = memoryview(data)
        async with self._rpc.open_stream("put", {"name": name, "size": len(view)}) as st:
            for at in range(0, len(view), FETCH_CHUNK):
                await st.send({"chunk": bytes(view[at : at + FETCH_CHUNK])})
            await st.send_end()
            answer = await st.receive()
        if not isinstance(answer, dict) or answer.get("stored") != len(view):
            raise ModelLoadError(f"host store did not confirm output {name!r}")

    async def ready(self, report: Mapping[str, Any]) -> None:
        """Tell the host how the start-up went (non-secret facts only)."""
        await self._rpc.call("ready", dict(report))


class FetchPieces:
    """The pieces of one sealed file as the host store sends them (see
    :meth:`StoreClient.open_fetch`); ``size`` is the announced, bounded size."""

    def __init__(self, stream: RpcStream, name: str, size: int) -> None:
        self._stream = stream
        self._name = name
        self.size = size
        self.received = 0

    def __aiter__(self) -> FetchPieces:
        return self

    async def __anext__(self) -> bytes:
        try:
            msg = await self._stream.receive()
        except trio.EndOfChannel:
            if self.received != self.size:
                raise ModelLoadError(
                    f"host store sent {self.received} of {self.size} bytes for {self._name!r}"
                ) from None
            raise StopAsyncIteration from None
        piece = msg.get("chunk") if isinstance(msg, dict) else None
        if not isinstance(piece, bytes) or self.received + len(piece) > self.size:
            raise ModelLoadError(f"host store sent a malformed file for {self._name!r}")
        self.received += len(piece)
        return piece


class _StoreConnection:
    def __init__(self, port: int) -> None:
        self._port = port
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> StoreClient:
        async with AsyncExitStack() as stack:
            stream = await open_vsock_stream(VsockAddr(VMADDR_CID_PARENT, self._port))
            await stack.enter_async_context(stream)
            rpc = await stack.enter_async_context(open_rpc_client(stream))
            self._stack = stack.pop_all()
        return StoreClient(rpc)

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


def open_store_client(port: int) -> AbstractAsyncContextManager[StoreClient]:
    """``async with open_store_client(port) as store:`` from inside the enclave."""
    return _StoreConnection(port)
