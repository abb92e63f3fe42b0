"""The confidential-inference stack on one machine, as building blocks.

``enclave demo`` (:mod:`runtime.demo`), ``enclave bench inference``
(:mod:`runtime.bench.inference`) and the pytest plugin (:mod:`runtime.testing`) all assemble the
same stack from these pieces, so a change to how the stack starts is made once::

    open_stack(state_dir)             the host side, owned by an ``async with`` block: the local
        -> Stack                      CA, the KMS daemon (SQLite; two principals, the model owner
                                      and the enclave instance), vsock-proxy (3, 8000) -> KMS,
                                      the model store (3, 7000) and the runtime (zygote path)
    build_server_image(out)           ``models/server_app`` as a measured EIF (PCR0/1/2)
    create_model_key(stack, pcr0)     a KMS key only an enclave running that image may Decrypt
                                      with (the policy comes from :func:`key_policy_for_image`)
    seal_bundled_model(stack, key, out)   the bundled digits model sealed under it (owner)
    seal_text_model(stack, key, out)  the MiniLM bundle (graph + tokenizer + config) sealed
    start_server(stack, eif)          run the image; return once it reported its models
    stack.start_ingress(cid)          host TCP 127.0.0.1:<free port> -> vsock (cid, 5005)
    start_replicas(stack, eif, n)     n server enclaves of one image (the group "server")
    stack.start_group_ingress(name)   host TCP -> the least busy healthy replica of the group
    open_inference_stack(state_dir)   all of the above: a sealed model served from a real
        -> InferenceStack             enclave (or ``replicas`` of them), through an ingress
                                      (``text=True``: ``models/text_app``, serving digits and
                                      MiniLM)

Every service, enclave and ingress started here belongs to the ``async with`` block that opened
the stack: leaving it (normally, by an error or by cancellation) stops them all.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import trio

from transport.errors import EnclaveError

if TYPE_CHECKING:
    from cryptography import x509

    from kms.client import Credentials, KmsClient
    from models.sealing import SealResult
    from models.store import HostCredentials, ModelStore
    from runtime.api import EnclaveInfo, ExitReason, Runtime
    from runtime.eif import EifInfo
    from transport.channel import DocumentVerifier

__all__ = [
    "StackError",
    "ServerStartError",
    "Stack",
    "open_stack",
    "build_server_image",
    "model_key_policy",
    "key_policy_for_image",
    "create_model_key",
    "seal_bundled_model",
    "seal_text_model",
    "ModelStatus",
    "ServerReport",
    "ServerHandle",
    "EnclaveWatch",
    "start_server",
    "start_replicas",
    "size_pool_for",
    "InferenceStack",
    "open_inference_stack",
    "describe_exit",
    "format_exit_reason",
    "console_tail",
    "read_audit",
    "SERVER_APP_DIR",
    "TEXT_APP_DIR",
    "TEXT_MODEL",
    "SERVER_CMD",
    "KMS_PROXY_PORT",
    "STORE_PORT",
    "SERVER_PORT",
    "ENCLAVE_MEMORY_MIB",
    "READY_TIMEOUT_S",
    "ACCOUNT",
    "OWNER_ARN",
    "INSTANCE_ARN",
    "MODEL_KEY_ALIAS",
    "XksProxyProcess",
    "open_xks_proxy",
    "create_xks_model_key",
    "XKS_URI_PATH",
    "XKS_KEY_ID",
]

#: The inference server's enclave app directory, shipped inside the ``models`` package.
SERVER_APP_DIR: Final = Path(__file__).resolve().parents[1] / "models" / "server_app"
#: The same server configured for the digits model and the MiniLM text model.
TEXT_APP_DIR: Final = SERVER_APP_DIR.parent / "text_app"
#: The text model's name in ``text_app/server.toml`` (and in the store and its sealed header).
TEXT_MODEL: Final = "minilm"
#: The image's command (python runs in-process under the enclave init).
SERVER_CMD: Final = ("python", "-m", "models", "--config", "server.toml")
#: Ports on the parent (CID 3) the server image dials, as its ``server.toml`` names them.
KMS_PROXY_PORT: Final = 8000
STORE_PORT: Final = 7000
#: The vsock port the server listens on inside its enclave.
SERVER_PORT: Final = 5005
#: Enclave size for the server: python + onnxruntime + the model fit well in 512 MiB.
ENCLAVE_MEMORY_MIB: Final = 512
#: Time allowed for the server to load its models and report (seconds); a cold start on a busy
#: 2-core machine takes a few seconds, the margin is for load.
READY_TIMEOUT_S: Final = 45.0
#: After the enclave exited, how long a start-up report already sent may take to arrive.
_REPORT_GRACE_S: Final = 0.5
#: Bound on setting up a whole inference stack (images, key, seal, enclave, ingress).
STACK_START_TIMEOUT_S: Final = 90.0
#: The stack's AWS account and its two principals: the model owner (administers the key and
#: seals models) and the instance (the credentials the host hands to the enclave; the key policy
#: lets them Decrypt only with a matching attestation).
ACCOUNT: Final = "111122223333"
OWNER_ARN: Final = f"arn:aws:iam::{ACCOUNT}:user/model-owner"
INSTANCE_ARN: Final = f"arn:aws:iam::{ACCOUNT}:role/enclave-instance"
#: Alias :func:`create_model_key` gives the model key by default.
MODEL_KEY_ALIAS: Final = "alias/confidential-models"

#: A JSON object as ``json.loads`` returns it.
JsonObject = dict[str, object]


class StackError(EnclaveError):
    """A step of setting up or running the stack failed (the message says which and why)."""


class ServerStartError(StackError):
    """The server enclave exited or went silent before reporting its models."""


# --- the host side ----------------------------------------------------------------------------


@dataclass
class Stack:
    """The host side of a confidential-inference deployment (see :func:`open_stack`)."""

    #: The stack's private state directory (CA, KMS database and audit log, fabric sockets).
    state_dir: Path
    #: PEM of the local attestation root CA (the trust root clients verify against).
    ca_root_pem: Path
    #: ``http://127.0.0.1:<port>`` of the KMS daemon.
    kms_endpoint: str
    #: The model owner's KMS credentials (principal :data:`OWNER_ARN`).
    owner: Credentials
    #: The instance credentials the model store hands to server enclaves (:data:`INSTANCE_ARN`).
    instance: HostCredentials
    #: The model store on (3, :data:`STORE_PORT`): sealed files and start-up reports.
    store: ModelStore
    #: The runtime that starts enclaves in ``state_dir``.
    runtime: Runtime
    _nursery: trio.Nursery = field(repr=False)

    @property
    def kms_state_dir(self) -> Path:
        """The KMS daemon's state directory (``kms.sqlite3``, ``audit.jsonl``)."""
        return self.state_dir / "kms"

    def owner_kms(self) -> KmsClient:
        """A KMS client with the owner's credentials (use as ``async with``)."""
        from kms.client import KmsClient

        return KmsClient(endpoint=self.kms_endpoint, credentials=self.owner)

    def roots(self) -> list[x509.Certificate]:
        """The trust roots a client of this stack verifies attestation documents against."""
        from attest.roots import load_pem_roots

        return load_pem_roots(self.ca_root_pem)

    async def start_ingress(self, cid: int, port: int = SERVER_PORT) -> int:
        """Forward ``127.0.0.1:<free port>`` to vsock ``(cid, port)``; returns the TCP port.

        The ingress runs in this process (on a 2-core host a third busy process costs more in
        wake-ups than it saves) and stops with the stack.
        """
        from transport.ingress import serve_ingress
        from transport.vsock import VsockAddr

        tcp_port: int = await self._nursery.start(
            serve_ingress, "127.0.0.1", 0, VsockAddr(cid, port)
        )
        return tcp_port

    async def start_group_ingress(self, name: str, port: int = SERVER_PORT) -> int:
        """Forward ``127.0.0.1:<free port>`` to the replicas of group ``name`` (least
        connections; replicas that end are removed and new ones added, from the runtime's
        records: ``runtime.targets``); returns the TCP port."""
        from runtime.targets import RuntimeTargets
        from transport.ingress import TargetPool, serve_ingress

        source = RuntimeTargets(self.runtime.state, name=name, port=port)
        pool = TargetPool(await source.healthy(), source=source)
        tcp_port: int = await self._nursery.start(serve_ingress, "127.0.0.1", 0, pool)
        return tcp_port


@contextmanager
def _scoped_env(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block; restore what was there after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _random_secret() -> str:
    # 30 random bytes: 40 base64 characters, the length of an AWS secret access key.
    return base64.b64encode(os.urandom(30)).decode()


@asynccontextmanager
async def open_stack(
    state_dir: Path,
    *,
    models: Mapping[str, Path] | None = None,
    zygote: bool = True,
) -> AsyncIterator[Stack]:
    """Start the host side in ``state_dir`` (created private if needed).

    The local CA is created (or loaded) in ``state_dir/ca``, the KMS daemon listens on a port
    the OS picks and keeps its database in ``state_dir/kms`` under a fresh master key, the
    vsock-proxy forwards (3, 8000) to it, the model store serves ``models`` (name -> sealed file,
    which may be written later) on (3, 7000), and a runtime starts enclaves in ``state_dir``.
    ``ENCLAVE_STATE_DIR`` and ``ENCLAVE_VSOCK_DIR`` point at ``state_dir`` while the block runs
    and are restored after it.

    Args:
        zygote: start enclaves from a pre-imported zygote (False: a fresh interpreter each).

    Resource handling: everything belongs to the ``async with`` block; leaving it stops every
    service and enclave.
    """
    from attest.ca import LocalCA
    from kms.client import Credentials
    from kms.config import CredentialEntry, KmsConfig
    from kms.daemon import serve_kms
    from models.store import HostCredentials, ModelStore, serve_model_store
    from runtime.api import open_runtime
    from transport.paths import ensure_private_dir
    from transport.proxy import serve_vsock_proxy

    state_dir = Path(state_dir)
    ensure_private_dir(state_dir)
    with _scoped_env({"ENCLAVE_STATE_DIR": str(state_dir),
                      "ENCLAVE_VSOCK_DIR": str(state_dir / "vsock")}):  # fmt: skip
        ca = await trio.to_thread.run_sync(LocalCA.load_or_create, state_dir / "ca")
        root_pem = state_dir / "ca" / "root.pem"
        if not root_pem.exists():
            root_pem.write_bytes(ca.root_pem)
        owner = Credentials("AKIDMODELOWNER000001", _random_secret())
        instance = HostCredentials("AKIDENCLAVEINSTANCE1", _random_secret(), region="us-east-1")
        config = KmsConfig(
            host="127.0.0.1",
            port=0,
            state_dir=state_dir / "kms",
            credentials=(
                CredentialEntry(owner.access_key_id, owner.secret_access_key, OWNER_ARN),
                CredentialEntry(instance.access_key_id, instance.secret_access_key, INSTANCE_ARN),
            ),
            trust_roots=(str(root_pem),),
            account_id=ACCOUNT,
        )
        # A fresh master key for a throw-away state directory: nothing to keep on disk.
        master_key = base64.b64encode(os.urandom(32)).decode()
        kms_env = {**os.environ, "ENCLAVE_KMS_MASTER_KEY": master_key}
        async with trio.open_nursery() as nursery:

            async def kms(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                await serve_kms(config, env=kms_env, task_status=task_status)

            host, port = await nursery.start(kms)

            async def proxy(task_status: trio.TaskStatus[int]) -> None:
                await serve_vsock_proxy(
                    KMS_PROXY_PORT, host, port, allowlist=[(host, port)], task_status=task_status
                )

            await nursery.start(proxy)
            store = ModelStore(models or {}, credentials=instance)
            await nursery.start(serve_model_store, store, STORE_PORT)
            async with open_runtime(state_dir, zygote=zygote) as rt:
                yield Stack(
                    state_dir=state_dir,
                    ca_root_pem=root_pem,
                    kms_endpoint=f"http://{host}:{port}",
                    owner=owner,
                    instance=instance,
                    store=store,
                    runtime=rt,
                    _nursery=nursery,
                )
            nursery.cancel_scope.cancel()


# --- the image, the key, the sealed model -----------------------------------------------------


def build_server_image(
    output: Path,
    *,
    app_dir: Path = SERVER_APP_DIR,
    env: Mapping[str, str] | None = None,
) -> EifInfo:
    """Build the inference server's EIF at ``output``; its ``pcrs[0]`` is PCR0 (blocking)."""
    from runtime.eif import build_eif

    return build_eif(
        app_dir=app_dir,
        cmd=list(SERVER_CMD),
        env=dict(env or {}),
        output=output,
        name="confidential-inference",
        version="1.0",
    )


#: What the model owner may do with the model key: administer it and create data keys to seal
#: with; never Decrypt (only the attested server image may).
OWNER_ACTIONS: Final = (
    "kms:CreateAlias",
    "kms:DescribeKey",
    "kms:GenerateDataKey",
    "kms:GetKeyPolicy",
    "kms:PutKeyPolicy",
    "kms:EnableKey",
    "kms:DisableKey",
)


def model_key_policy(
    pcr0_hex: str, *, owner_arn: str = OWNER_ARN, instance_arn: str = INSTANCE_ARN
) -> JsonObject:
    """Owner administers and creates data keys; the instance may Decrypt only from an enclave
    running the image whose PCR0 is ``pcr0_hex`` (the AWS Nitro pattern). Built by the one
    builder of attested key policies, :func:`kms.policy.enclave_key_policy`, which refuses an
    owner that is also the instance."""
    from kms.policy import enclave_key_policy

    return enclave_key_policy(
        admin_principal=owner_arn,
        enclave_principal=instance_arn,
        pcrs={0: pcr0_hex},
        actions=("kms:Decrypt",),
        admin_actions=OWNER_ACTIONS,
        admin_sid="ModelOwnerAdministersAndSeals",
        enclave_sid="OnlyTheAttestedServerImageMayDecrypt",
    )


def key_policy_for_image(pcr0_hex: str) -> JsonObject:
    """The policy of a model key for the server image whose PCR0 is ``pcr0_hex``.

    The one place the stack builds a key policy: switching the stack to
    ``kms.policy.enclave_key_policy`` is a change of this function's single line.
    """
    return model_key_policy(pcr0_hex)


async def create_model_key(
    stack: Stack, pcr0_hex: str, *, alias: str | None = MODEL_KEY_ALIAS
) -> str:
    """Create a model key (policy: :func:`key_policy_for_image`) as the owner; returns its ARN.

    Raises:
        kms.errors.KmsError: the KMS refused (e.g. the alias exists).
    """
    async with stack.owner_kms() as kms:
        return await _create_key(
            kms,
            {
                "Description": "sealed ONNX models for the confidential inference server",
                "KeySpec": "SYMMETRIC_DEFAULT",
                "KeyUsage": "ENCRYPT_DECRYPT",
                "Policy": json.dumps(key_policy_for_image(pcr0_hex)),
            },
            alias,
        )


async def _create_key(kms: KmsClient, params: JsonObject, alias: str | None) -> str:
    """CreateKey with ``params``, then CreateAlias ``alias`` (if any) for it; its ARN."""
    answer = await kms.call("CreateKey", params)
    metadata = answer["KeyMetadata"]
    if not isinstance(metadata, Mapping):
        raise StackError(f"CreateKey answered without KeyMetadata: {answer!r}")
    arn = str(metadata["Arn"])
    if alias:
        await kms.call("CreateAlias", {"AliasName": alias, "TargetKeyId": arn})
    return arn


async def seal_bundled_model(
    stack: Stack, key_id: str, out: Path, *, name: str = "digits"
) -> SealResult:
    """Seal the bundled ``models/digits/digits.onnx`` under ``key_id`` (owner credentials)."""
    from models.digits import MODEL_PATH
    from models.sealing import seal_model_file

    async with stack.owner_kms() as kms:
        return await seal_model_file(MODEL_PATH, out, kms=kms, key_id=key_id, name=name)


async def seal_text_model(
    stack: Stack, key_id: str, out: Path, *, name: str = TEXT_MODEL, bundle: Path | None = None
) -> SealResult:
    """Seal a text model bundle (default: all-MiniLM-L6-v2, built once into the model cache by
    ``models.text.minilm``) under ``key_id`` with the owner's credentials: graph, tokenizer and
    config as one sealed, digested unit."""
    from models.sealing import seal_model_file

    if bundle is None:
        from models.text.minilm import ensure_minilm_bundle

        bundle = await trio.to_thread.run_sync(ensure_minilm_bundle)
    async with stack.owner_kms() as kms:
        return await seal_model_file(bundle, out, kms=kms, key_id=key_id, name=name)


# --- the server enclave -----------------------------------------------------------------------


class EnclaveWatch(Protocol):
    """What the stack needs of an enclave's supervisor: its end and its console."""

    @property
    def exit_reason(self) -> ExitReason | None:
        """Why the enclave ended (None while it runs)."""

    async def wait_exited(self) -> ExitReason:
        """Wait until the enclave is gone."""

    async def console_stream(self) -> trio.MemoryReceiveChannel[bytes]:
        """Console history then live bytes (debug enclaves only)."""


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One model of a server's start-up report."""

    name: str
    available: bool
    #: Why the model is unavailable (the KMS error, an integrity failure...); None when served.
    reason: str | None


@dataclass(frozen=True)
class ServerReport:
    """The start-up report a server enclave sends the model store (``models.server``)."""

    #: Set when the server could not serve at all (e.g. ``"no model could be loaded"``).
    error: str | None
    models: tuple[ModelStatus, ...]
    #: The report as the server sent it (``port``, ``startup_ms``...).
    raw: Mapping[str, object]

    @classmethod
    def from_json(cls, report: Mapping[str, object]) -> ServerReport:
        """Read a report; fields of the wrong type read as absent."""
        models = []
        entries = report.get("models")
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, Mapping):
                reason = entry.get("reason")
                models.append(
                    ModelStatus(
                        name=str(entry.get("name", "")),
                        available=entry.get("available") is True,
                        reason=str(reason) if reason is not None else None,
                    )
                )
        error = report.get("error")
        return cls(str(error) if error else None, tuple(models), dict(report))

    @property
    def ok(self) -> bool:
        """Whether the server serves every model it was configured with."""
        return self.error is None and all(m.available for m in self.models)

    def model(self, name: str) -> ModelStatus | None:
        """The status of model ``name`` (None if the report does not name it)."""
        return next((m for m in self.models if m.name == name), None)


@dataclass(frozen=True)
class ServerHandle:
    """A started server enclave and the start-up report it sent."""

    info: EnclaveInfo
    report: ServerReport
    supervisor: EnclaveWatch = field(repr=False)

    @property
    def cid(self) -> int:
        return int(self.info.enclave_cid)

    @property
    def enclave_id(self) -> str:
        return str(self.info.enclave_id)

    @property
    def exit_reason(self) -> ExitReason | None:
        """Why the enclave ended (None while it runs)."""
        return self.supervisor.exit_reason

    async def wait_exited(self) -> ExitReason:
        """The enclave's exit reason once it is gone."""
        return await self.supervisor.wait_exited()


async def start_server(
    stack: Stack,
    eif: Path,
    *,
    debug: bool = False,
    memory_mib: int = ENCLAVE_MEMORY_MIB,
    timeout_s: float = READY_TIMEOUT_S,
    cpu_ids: Sequence[int] | None = None,
) -> ServerHandle:
    """Run the server image and wait for its start-up report (served models or failure).

    A report of unavailable models is returned, not raised: the caller decides whether that is
    the expected outcome (a debug enclave must be refused its key). The enclave gets one CPU
    of the runtime's pool, or exactly ``cpu_ids``.

    Raises:
        runtime.errors.NitroCliError: the runtime refused or failed to start the image.
        ServerStartError: the enclave exited or went silent before reporting (the message has
            its exit reason and, for a debug enclave, the console tail).
    """
    index = len(stack.store.ready_reports)
    info = await stack.runtime.run_enclave(
        eif,
        cpu_count=None if cpu_ids else 1,
        cpu_ids=cpu_ids or None,
        memory_mib=memory_mib,
        debug=debug,
        parent_ports=frozenset({KMS_PROXY_PORT, STORE_PORT}),
    )
    sup = stack.runtime.supervisor(info.enclave_id)
    if sup is None:  # run_enclave returned, so the runtime supervises it
        raise ServerStartError(f"the runtime lost enclave {info.enclave_id}")
    report: Mapping[str, object] | None = None
    with trio.move_on_after(timeout_s):
        async with trio.open_nursery() as nursery:

            async def stop_when_exited() -> None:
                await sup.wait_exited()
                await trio.sleep(_REPORT_GRACE_S)  # a final report may still be in flight
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_when_exited)
            report = await stack.store.wait_report(index)
            nursery.cancel_scope.cancel()
    handle = ServerHandle(info, ServerReport.from_json(report or {}), sup)
    if report is None:
        detail = await describe_exit(handle)
        raise ServerStartError(
            f"the server enclave did not report within {timeout_s:g} s; {detail}"
        )
    return handle


async def start_replicas(
    stack: Stack,
    eif: Path,
    count: int,
    *,
    timeout_s: float = READY_TIMEOUT_S,
    memory_mib: int = ENCLAVE_MEMORY_MIB,
) -> list[ServerHandle]:
    """Run ``count`` replicas of the server image, one after the other (each reports to the
    model store in turn); they form the group named after the EIF (``server``, ``server_1``...).

    Raises:
        ServerStartError: a replica did not serve its model (the others keep running; they
            belong to the stack).
    """
    servers = []
    for _ in range(count):
        server = await start_server(stack, eif, timeout_s=timeout_s, memory_mib=memory_mib)
        if not server.report.ok:
            raise ServerStartError(
                f"replica {server.info.enclave_name} could not load its models: "
                f"{server.report.raw}; {await describe_exit(server)}"
            )
        servers.append(server)
    return servers


def size_pool_for(state_dir: Path, enclaves: int) -> None:
    """Let ``state_dir``'s runtime run ``enclaves`` one-CPU enclaves at once on this host.

    The default pool is the host's CPUs and at most 4 enclaves (Nitro's limit); a stack with
    more replicas than CPUs writes an ``allocator.yaml`` with one (virtual) CPU id per enclave:
    ids beyond the host's make the CPU affinity layer ``missing`` (it is reported, the enclaves
    share the real CPUs). Nothing is written when the default pool suffices.
    """
    from runtime.state import DEFAULT_POOL_MIB, MAX_ENCLAVES

    cpus = len(os.sched_getaffinity(0))
    if enclaves <= min(cpus, MAX_ENCLAVES):
        return
    pool = f"0-{max(cpus, enclaves) - 1}"
    memory = max(DEFAULT_POOL_MIB, enclaves * ENCLAVE_MEMORY_MIB)
    (Path(state_dir) / "allocator.yaml").write_text(
        f'---\nmemory_mib: {memory}\ncpu_pool: "{pool}"\n'
        f"max_enclaves: {max(MAX_ENCLAVES, enclaves)}\n"
    )


def format_exit_reason(reason: ExitReason | None) -> str:
    """``kind=exited, code=3`` (or ``still running``)."""
    if reason is None:
        return "still running"
    return ", ".join(f"{k}={v}" for k, v in reason.to_json().items() if v not in (None, ""))


async def console_tail(handle: ServerHandle, limit: int = 4000) -> str:
    """The last ``limit`` bytes of a debug enclave's console so far ("" for other enclaves)."""
    if not handle.info.debug:
        return ""
    chunks: list[bytes] = []
    channel = await handle.supervisor.console_stream()
    with channel:
        while True:
            try:
                chunks.append(channel.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
    return b"".join(chunks)[-limit:].decode(errors="replace")


async def describe_exit(handle: ServerHandle) -> str:
    """The enclave's exit reason (and a debug enclave's console tail), for failure messages."""
    parts = [f"exit reason: {format_exit_reason(handle.exit_reason)}"]
    tail = await console_tail(handle)
    if tail:
        parts.append("console tail:\n" + tail)
    return "; ".join(parts)


def read_audit(kms_state_dir: Path) -> list[JsonObject]:
    """The KMS audit log's records (oldest first; empty if there is no log yet)."""
    path = Path(kms_state_dir) / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- a ready stack ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceStack:
    """A stack serving the sealed bundled model from a real (not debug) enclave."""

    stack: Stack
    server: ServerHandle
    #: The server image and its PCR0 (hex).
    eif: Path
    pcr0: str
    #: SHA-384 (hex) of the served model: PCR16 of the server is extended with it.
    digest: str
    #: ARN of the model key (its policy: :func:`key_policy_for_image`).
    key_arn: str
    #: ``127.0.0.1:<port>`` of the ingress to the server.
    endpoint: str
    #: The served model's name.
    model: str = "digits"
    #: Every replica (``server`` is the first); the ingress spreads connections over them.
    servers: tuple[ServerHandle, ...] = ()
    #: SHA-384s (hex) of every served model, in the server's configuration order (PCR16 is
    #: their extend chain); empty: ``digest`` alone.
    model_digests: tuple[str, ...] = ()
    #: The text model's name when the stack serves one (``text=True``).
    text_model: str | None = None

    def verifier(
        self,
        *,
        pcr0: bytes | str | None = None,
        model_digests: Sequence[bytes | str] | None = None,
        allow_debug: bool = False,
        max_age_s: float | None = 300.0,
    ) -> DocumentVerifier:
        """A channel verifier for this server: the stack's root, this image's PCR0 and this
        model's PCR16 unless overridden (pass other values to check that they are refused)."""
        from models.client import make_verifier, policy_for

        served = list(self.model_digests) or [self.digest]
        policy = policy_for(
            pcr0=self.pcr0 if pcr0 is None else pcr0,
            model_digests=served if model_digests is None else model_digests,
            allow_debug=allow_debug,
            max_age_s=max_age_s,
        )
        verifier: DocumentVerifier = make_verifier(self.stack.roots(), policy)
        return verifier


@asynccontextmanager
async def open_inference_stack(
    state_dir: Path,
    *,
    timeout_s: float = STACK_START_TIMEOUT_S,
    replicas: int = 1,
    spare_enclaves: int = 0,
    text: bool = False,
    memory_mib: int = ENCLAVE_MEMORY_MIB,
) -> AsyncIterator[InferenceStack]:
    """Open a stack in ``state_dir`` serving the bundled digits model: build the server image,
    create its model key, seal the model, start the enclave (or ``replicas`` of it, the group
    ``server`` behind a least-connections ingress), open an ingress to it.

    Args:
        replicas: server enclaves of the one image.
        spare_enclaves: room for this many more one-CPU enclaves (the pool is sized for
            ``replicas + spare_enclaves``, see :func:`size_pool_for`).
        text: serve the MiniLM text model too (``models/text_app``: both models sealed under
            the one key, PCR16 binding both).
        memory_mib: the enclave's memory.

    Raises:
        ServerStartError: the server did not serve its models (its report says why).
        trio.TooSlowError: the set-up took longer than ``timeout_s``.
    """
    state_dir = Path(state_dir)
    sealed_path = state_dir / "models" / "digits.sealed"
    text_path = state_dir / "models" / f"{TEXT_MODEL}.sealed"
    models = {"digits": sealed_path, **({TEXT_MODEL: text_path} if text else {})}
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    state_dir.mkdir(parents=True, exist_ok=True)
    size_pool_for(state_dir, replicas + spare_enclaves)
    async with open_stack(state_dir, models=models) as stack:
        with trio.fail_after(timeout_s * replicas):
            eif = state_dir / "server.eif"
            app_dir = TEXT_APP_DIR if text else SERVER_APP_DIR
            image = await trio.to_thread.run_sync(lambda: build_server_image(eif, app_dir=app_dir))
            pcr0 = image.pcrs[0].hex()
            key = await create_model_key(stack, pcr0)
            sealed = await seal_bundled_model(stack, key, sealed_path)
            digests = [sealed.header.model_sha384.hex()]
            if text:
                digests.append(
                    (await seal_text_model(stack, key, text_path)).header.model_sha384.hex()
                )
            servers = await start_replicas(stack, eif, replicas, memory_mib=memory_mib)
            server = servers[0]
            if replicas == 1:
                port = await stack.start_ingress(server.cid)
            else:
                port = await stack.start_group_ingress(server.info.enclave_name)
        yield InferenceStack(
            stack=stack,
            server=server,
            eif=eif,
            pcr0=pcr0,
            digest=digests[0],
            key_arn=key,
            endpoint=f"127.0.0.1:{port}",
            servers=tuple(servers),
            model_digests=tuple(digests),
            text_model=TEXT_MODEL if text else None,
        )


# --- hold your own key: the owner's external key store ----------------------------------------

#: The owner's XKS proxy: its URI path, the external key's id, and how long it may take to
#: start or to reload its configuration.
XKS_URI_PATH: Final = "/model-owner/kms/xks/v1"
XKS_KEY_ID: Final = "model-key"
XKS_PROXY_TIMEOUT_S: Final = 30.0
#: The proxy's stderr lines kept for :meth:`XksProxyProcess.wait_for` (it logs every request).
_XKS_LINES_KEPT: Final = 500


def _xks_credential() -> tuple[str, str]:
    """A fresh SigV4 credential in the XKS spec's formats: an access key id of 24 characters of
    A-Z2-7 (base32 of 15 random bytes), a secret of 44 base64 characters (32 random bytes)."""
    access_key_id = base64.b32encode(os.urandom(15)).decode()
    return access_key_id, base64.b64encode(os.urandom(32)).decode()


class XksProxyProcess:
    """The model owner's ``enclave kms xks-proxy``: a real child process serving one external
    key (a 32-byte key file, mode 0600) over plain HTTP on loopback. Started by
    :func:`open_xks_proxy`; the owner disables its key with :meth:`set_key_enabled` (rewrite
    the configuration, SIGHUP, wait until the proxy says it reloaded)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config_path = directory / "xks-proxy.toml"
        self.access_key_id, self.secret = _xks_credential()
        #: ``http://127.0.0.1:<port>``: the XksProxyUriEndpoint (set once the proxy listens).
        self.endpoint = ""
        self._process: trio.Process | None = None
        self._lines: list[str] = []
        self._count = 0
        self._new = trio.Event()

    @property
    def uri_path(self) -> str:
        return XKS_URI_PATH

    @property
    def process(self) -> trio.Process:
        """The child process (set by :func:`open_xks_proxy`)."""
        assert self._process is not None
        return self._process

    def write_config(self, *, enabled: bool = True) -> None:
        """(Re)write the proxy's configuration (mode 0600: it holds the SigV4 secret)."""
        text = "\n".join(
            [
                'listen = "127.0.0.1:0"',
                f'uri_path = "{XKS_URI_PATH}"',
                'region = "us-east-1"',
                "[[credentials]]",
                f'access_key_id = "{self.access_key_id}"',
                f'secret_access_key = "{self.secret}"',
                "[[keys]]",
                f'id = "{XKS_KEY_ID}"',
                f"enabled = {'true' if enabled else 'false'}",
                'backing = { type = "file", path = "model-key.bin" }',
                "",
            ]
        )
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    async def _read_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                self._lines.append(raw.decode(errors="replace"))
                self._count += 1
            del self._lines[:-_XKS_LINES_KEPT]
            self._new.set()
            self._new = trio.Event()
        self._new.set()

    def mark(self) -> int:
        """How many stderr lines the proxy has written so far (for ``since``)."""
        return self._count

    def lines_since(self, mark: int) -> list[str]:
        """The stderr lines written after :meth:`mark` returned ``mark`` (those still kept)."""
        first = self._count - len(self._lines)
        return self._lines[max(0, mark - first) :]

    async def wait_for(self, text: str, *, since: int = 0) -> str:
        """The first stderr line after the ``since``-th containing ``text`` (StackError if the
        proxy ends or stays silent for :data:`XKS_PROXY_TIMEOUT_S`)."""
        with trio.move_on_after(XKS_PROXY_TIMEOUT_S):
            while True:
                first = self._count - len(self._lines)
                for i, line in enumerate(self._lines):
                    if first + i >= since and text in line:
                        return line
                if self.process.returncode is not None:
                    break
                await self._new.wait()
        raise StackError(
            f"the XKS proxy did not say {text!r} (exit status {self.process.returncode}); "
            f"its last lines: {self._lines[-5:]}"
        )

    async def set_key_enabled(self, enabled: bool) -> None:
        """The owner enables or disables its key: effective for the next request on return."""
        import signal

        since = self._count
        self.write_config(enabled=enabled)
        self.process.send_signal(signal.SIGHUP)
        await self.wait_for("xks_reloaded", since=since)


@asynccontextmanager
async def open_xks_proxy(directory: Path) -> AsyncIterator[XksProxyProcess]:
    """Start the owner's XKS proxy (``enclave kms xks-proxy``) with a fresh key and credential
    in ``directory``; stop it (SIGTERM, then SIGKILL after a bound) when the block ends."""
    import signal
    import subprocess
    import sys

    from transport.paths import ensure_private_dir

    directory = Path(directory)
    ensure_private_dir(directory)
    key = directory / "model-key.bin"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    # The proxy's log lines are read here: its console format, whatever the caller's level.
    env = {k: v for k, v in os.environ.items() if k != "ENCLAVE_LOG_LEVEL"}
    proxy = XksProxyProcess(directory)
    proxy.write_config()
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "runtime.cli", "kms", "xks-proxy",
             "--config", str(proxy.config_path), "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        proxy._process = process
        try:
            nursery.start_soon(proxy._read_stderr)
            line = await proxy.wait_for("xks-proxy listening on ")
            proxy.endpoint = line.split("listening on ", 1)[1].strip().removesuffix(XKS_URI_PATH)
            yield proxy
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with trio.move_on_after(XKS_PROXY_TIMEOUT_S):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                await process.wait()
            nursery.cancel_scope.cancel()


async def create_xks_model_key(
    stack: Stack,
    pcr0_hex: str,
    proxy: XksProxyProcess,
    *,
    store_name: str = "model-owner-xks",
    alias: str | None = MODEL_KEY_ALIAS,
) -> tuple[str, str]:
    """As the owner: create an external key store on ``proxy``, connect it, and create a model
    key in it (policy: :func:`key_policy_for_image`; its second layer is the owner's key in the
    proxy). Returns (the key's ARN, the custom key store id).

    Raises:
        kms.errors.KmsError: the KMS refused.
        StackError: the store did not connect (its ConnectionErrorCode says why).
    """
    async with stack.owner_kms() as kms:
        created = await kms.call(
            "CreateCustomKeyStore",
            {
                "CustomKeyStoreName": store_name,
                "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
                "XksProxyConnectivity": "PUBLIC_ENDPOINT",
                "XksProxyUriEndpoint": proxy.endpoint,
                "XksProxyUriPath": proxy.uri_path,
                "XksProxyAuthenticationCredential": {
                    "AccessKeyId": proxy.access_key_id,
                    "RawSecretAccessKey": proxy.secret,
                },
            },
        )
        store_id = str(created["CustomKeyStoreId"])
        await kms.call("ConnectCustomKeyStore", {"CustomKeyStoreId": store_id})
        # AWS connects asynchronously and clients poll; this KMS has connected on return.
        described = await kms.call("DescribeCustomKeyStores", {"CustomKeyStoreId": store_id})
        entries = described.get("CustomKeyStores")
        entry = entries[0] if isinstance(entries, list) and entries else {}
        if not isinstance(entry, Mapping) or entry.get("ConnectionState") != "CONNECTED":
            raise StackError(f"the external key store did not connect: {entry!r}")
        arn = await _create_key(
            kms,
            {
                "Description": "sealed ONNX models, the owner's key held in its XKS proxy",
                "Origin": "EXTERNAL_KEY_STORE",
                "CustomKeyStoreId": store_id,
                "XksKeyId": XKS_KEY_ID,
                "Policy": json.dumps(key_policy_for_image(pcr0_hex)),
            },
            alias,
        )
    return arn, store_id
