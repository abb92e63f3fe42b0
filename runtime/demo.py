"""``enclave demo``: the whole mission on embedded defaults (run by ``./scripts/demo``).

1. a temporary state directory; its local CA (the attestation root, like AWS's Nitro root);
2. the KMS daemon (SQLite) with two principals: the *model owner* and the *instance*;
3. the host services: vsock-proxy (3, 8000) -> KMS, the model store (3, 7000), later the ingress;
4. the server image (``models/server_app`` built with ``build_eif``): PCR0/1/2;
5. a KMS key whose policy lets the owner create data keys and lets the instance ``Decrypt`` only
   with a Recipient attestation whose ``ImageSha384`` is that image's PCR0;
6. the bundled digits model sealed under that key (owner credentials);
7. the enclave (not debug): it unseals the model with attested key release, extends PCR16 with
   the model digest and serves on vsock port 5005;
8. the client through the ingress: verifies the attestation (local root, PCR0, PCR16 = this
   model) before sending anything, streams the whole test split, prints accuracy, latency,
   throughput and the verified measurements;
9. the same image in debug mode: PCR0 reads as zeros, KMS refuses the key (reason from the
   audit log), the server reports the model unavailable;
10. everything stopped and removed (``--keep`` leaves the stack up and says how to use it).

The building blocks (:func:`open_stack`, :func:`build_server_image`, :func:`create_model_key`,
:func:`start_server`...) are reused by the integration tests and the inference benchmark.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import trio

__all__ = [
    "main",
    "Stack",
    "open_stack",
    "build_server_image",
    "create_model_key",
    "seal_bundled_model",
    "start_server",
    "ServerHandle",
    "SERVER_APP_DIR",
    "SERVER_CMD",
    "read_audit",
]

#: The enclave app directory shipped in the package.
SERVER_APP_DIR: Final = Path(__file__).resolve().parents[1] / "models" / "server_app"
#: The image's command (python runs in-process under the enclave init).
SERVER_CMD: Final = ("python", "-m", "models", "--config", "server.toml")
#: Host-side ports on the parent (CID 3), as in server.toml.
KMS_PROXY_PORT: Final = 8000
STORE_PORT: Final = 7000
SERVER_PORT: Final = 5005
#: Enclave size for the server: python + onnxruntime + the model fit well in 512 MiB.
ENCLAVE_MEMORY_MIB: Final = 512
#: Time allowed for the server to load its models and report (seconds).
READY_TIMEOUT_S: Final = 45.0
#: Time allowed for an ingress process to start listening (an interpreter start, ~0.4 s).
INGRESS_START_TIMEOUT_S: Final = 20.0
#: Unary round trips used for the latency figures.
LATENCY_SAMPLES: Final = 200
#: Rows per stream message when streaming the test split for accuracy.
STREAM_CHUNK: Final = 50
#: Throughput: the split streamed this many times in one stream, in messages of this many rows.
THROUGHPUT_PASSES: Final = 10
THROUGHPUT_CHUNK: Final = 150
ACCOUNT: Final = "111122223333"
OWNER_ARN: Final = f"arn:aws:iam::{ACCOUNT}:user/model-owner"
INSTANCE_ARN: Final = f"arn:aws:iam::{ACCOUNT}:role/enclave-instance"


# --- output ---------------------------------------------------------------------------------


class Console:
    """Step-by-step progress on stderr (readable on a terminal and in a log)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.monotonic()
        tty = getattr(self.stream, "isatty", None)
        self.color = bool(tty and tty())

    def _c(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def step(self, text: str) -> None:
        t = time.monotonic() - self.t0
        print(f"{self._c('2', f'[{t:5.1f}s]')} {self._c('1', text)}", file=self.stream, flush=True)

    def info(self, text: str) -> None:
        print(f"          {text}", file=self.stream, flush=True)

    def ok(self, text: str) -> None:
        print(f"          {self._c('32', 'ok')} {text}", file=self.stream, flush=True)

    def fail(self, text: str) -> None:
        print(f"          {self._c('31', 'FAILED')} {text}", file=self.stream, flush=True)


class DemoFailure(Exception):
    """A demo step failed (message says which and why)."""


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    """The host side of the demo: state, CA, KMS, vsock-proxy, model store, runtime."""

    state_dir: Path
    ca_root_pem: Path
    kms_endpoint: str
    owner: Any  # kms.client.Credentials
    instance: Any  # models.store.HostCredentials
    store: Any  # models.store.ModelStore
    runtime: Any  # runtime.api.Runtime
    nursery: trio.Nursery
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def kms_state_dir(self) -> Path:
        return self.state_dir / "kms"

    def owner_kms(self) -> Any:
        from kms.client import KmsClient

        return KmsClient(endpoint=self.kms_endpoint, credentials=self.owner)

    def roots(self) -> list[Any]:
        from attest.roots import load_pem_roots

        return load_pem_roots(self.ca_root_pem)

    async def start_ingress(
        self, cid: int, port: int = SERVER_PORT, *, separate_process: bool = False
    ) -> int:
        """Ingress 127.0.0.1:<free port> -> (cid, port); returns the TCP port.

        By default the ingress runs in this process (on a 2-vCPU host a third busy process
        costs more in wake-ups than it saves); ``separate_process=True`` runs it as its own
        ``enclave ingress`` process, as on a real host where clients are elsewhere. Either way
        it is stopped with the stack.
        """
        from transport.vsock import VsockAddr

        if not separate_process:
            from transport.ingress import serve_ingress

            tcp_port: int = await self.nursery.start(
                serve_ingress, "127.0.0.1", 0, VsockAddr(cid, port)
            )
            return tcp_port
        bound: int = await self.nursery.start(self._run_ingress_process, cid, port)
        return bound

    async def _run_ingress_process(
        self, cid: int, port: int, *, task_status: trio.TaskStatus[int]
    ) -> None:
        argv = [sys.executable, "-m", "runtime.cli", "ingress", "--listen", "127.0.0.1:0",
                "--cid", str(cid), "--port", str(port),
                "--fabric-dir", str(self.state_dir / "vsock")]  # fmt: skip
        env = {**os.environ, "ENCLAVE_LOG_LEVEL": os.environ.get("ENCLAVE_LOG_LEVEL", "warning")}
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout is not None
            line = b""
            with trio.fail_after(INGRESS_START_TIMEOUT_S):
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(4096)
                    if not chunk:
                        raise DemoFailure(f"ingress exited at start (status {proc.returncode})")
                    line += chunk
            listen = json.loads(line.splitlines()[0])["listen"]
            task_status.started(int(listen.rsplit(":", 1)[1]))
            await proc.wait()
            raise DemoFailure(f"the ingress process exited (status {proc.returncode})")
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.terminate()
                    with trio.move_on_after(3):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()


def _env_for(state_dir: Path) -> dict[str, str]:
    return {
        "ENCLAVE_STATE_DIR": str(state_dir),
        "ENCLAVE_VSOCK_DIR": str(state_dir / "vsock"),
    }


@asynccontextmanager
async def open_stack(
    state_dir: Path,
    *,
    models: Mapping[str, Path] | None = None,
    instance_credentials: bool = True,
    zygote: bool = True,
) -> AsyncIterator[Stack]:
    """Start the host side in ``state_dir`` (also exported as ENCLAVE_STATE_DIR for this
    process): CA, KMS daemon (port chosen by the OS), vsock-proxy, model store, runtime.

    Everything belongs to the ``async with`` block: leaving it stops every service and enclave.
    """
    from attest.ca import LocalCA
    from kms.client import Credentials
    from kms.config import CredentialEntry, KmsConfig
    from kms.daemon import serve_kms
    from models.store import HostCredentials, ModelStore, serve_model_store
    from runtime.api import open_runtime
    from transport.paths import ensure_private_dir
    from transport.proxy import serve_vsock_proxy

    ensure_private_dir(state_dir)
    os.environ.update(_env_for(state_dir))
    ca = await trio.to_thread.run_sync(LocalCA.load_or_create, state_dir / "ca")
    root_pem = state_dir / "ca" / "root.pem"
    if not root_pem.exists():
        root_pem.write_bytes(ca.root_pem)
    owner = Credentials("AKIDMODELOWNER000001", base64.b64encode(os.urandom(30)).decode())
    instance = HostCredentials(
        "AKIDENCLAVEINSTANCE1", base64.b64encode(os.urandom(30)).decode(), region="us-east-1"
    )
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
    env = {**os.environ, "ENCLAVE_KMS_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(lambda task_status: serve_kms(
            config, env=env, task_status=task_status))  # fmt: skip
        await nursery.start(
            lambda task_status: serve_vsock_proxy(
                KMS_PROXY_PORT,
                host,
                port,
                allowlist=[(host, port)],
                task_status=task_status,
            )
        )
        store = ModelStore(models or {}, credentials=instance if instance_credentials else None)
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
                nursery=nursery,
            )
        nursery.cancel_scope.cancel()


# --- steps ----------------------------------------------------------------------------------


def build_server_image(
    output: Path,
    *,
    app_dir: Path = SERVER_APP_DIR,
    env: Mapping[str, str] | None = None,
) -> Any:
    """Build the inference server's EIF; returns ``runtime.eif.EifInfo`` (``.pcrs[0]``...)."""
    from runtime.eif import build_eif

    return build_eif(
        app_dir=app_dir,
        cmd=list(SERVER_CMD),
        env=dict(env or {}),
        output=output,
        name="confidential-inference",
        version="1.0",
    )


def model_key_policy(pcr0_hex: str, *, owner_arn: str = OWNER_ARN,
                     instance_arn: str = INSTANCE_ARN) -> dict[str, Any]:  # fmt: skip
    """Owner administers and creates data keys; the instance may Decrypt only from an enclave
    running the image whose PCR0 is ``pcr0_hex`` (the AWS Nitro pattern)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ModelOwnerAdministersAndSeals",
                "Effect": "Allow",
                "Principal": {"AWS": owner_arn},
                "Action": [
                    "kms:CreateAlias",
                    "kms:DescribeKey",
                    "kms:GenerateDataKey",
                    "kms:GetKeyPolicy",
                    "kms:PutKeyPolicy",
                    "kms:EnableKey",
                    "kms:DisableKey",
                ],
                "Resource": "*",
            },
            {
                "Sid": "OnlyTheAttestedServerImageMayDecrypt",
                "Effect": "Allow",
                "Principal": {"AWS": instance_arn},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {
                    "StringEqualsIgnoreCase": {
                        "kms:RecipientAttestation:ImageSha384": pcr0_hex,
                    }
                },
            },
        ],
    }


async def create_model_key(
    stack: Stack, pcr0_hex: str, *, alias: str | None = "alias/confidential-models"
) -> str:
    """Create the model key (policy: :func:`model_key_policy`); returns its ARN."""
    async with stack.owner_kms() as kms:
        answer = await kms.call(
            "CreateKey",
            {
                "Description": "sealed ONNX models for the confidential inference server",
                "KeySpec": "SYMMETRIC_DEFAULT",
                "KeyUsage": "ENCRYPT_DECRYPT",
                "Policy": json.dumps(model_key_policy(pcr0_hex)),
            },
        )
        arn = str(answer["KeyMetadata"]["Arn"])
        if alias:
            await kms.call("CreateAlias", {"AliasName": alias, "TargetKeyId": arn})
    return arn


async def seal_bundled_model(stack: Stack, key_id: str, out: Path, *, name: str = "digits") -> Any:
    """Seal ``models/digits/digits.onnx`` under ``key_id`` (owner credentials)."""
    from models.digits import MODEL_PATH
    from models.sealing import seal_model_file

    async with stack.owner_kms() as kms:
        result = await seal_model_file(MODEL_PATH, out, kms=kms, key_id=key_id, name=name)
    return result


@dataclass
class ServerHandle:
    """A started server enclave and what it reported."""

    info: Any  # runtime EnclaveInfo
    report: dict[str, Any]
    supervisor: Any = None  # runtime.supervisor.EnclaveSupervisor (exit reason, console)

    async def wait_exited(self) -> Any:
        """The enclave's ExitReason once it is gone."""
        return await self.supervisor.wait_exited()

    @property
    def cid(self) -> int:
        return int(self.info.enclave_cid)

    @property
    def enclave_id(self) -> str:
        return str(self.info.enclave_id)


async def start_server(
    stack: Stack,
    eif: Path,
    *,
    debug: bool = False,
    memory_mib: int = ENCLAVE_MEMORY_MIB,
    timeout_s: float = READY_TIMEOUT_S,
) -> ServerHandle:
    """Run the server image and wait for its start-up report (served models or failure).

    Raises:
        DemoFailure: the enclave exited or went silent before reporting (with its exit reason
            and, for a debug enclave, the console tail).
    """
    index = len(stack.store.ready_reports)
    info = await stack.runtime.run_enclave(
        eif,
        cpu_count=1,
        memory_mib=memory_mib,
        debug=debug,
        parent_ports=frozenset({KMS_PROXY_PORT, STORE_PORT}),
    )
    sup = stack.runtime.supervisor(info.enclave_id)
    report: dict[str, Any] | None = None
    with trio.move_on_after(timeout_s):
        async with trio.open_nursery() as n:

            async def wait_exit() -> None:
                await sup.wait_exited()
                await trio.sleep(0.5)  # a final report may still be in flight
                n.cancel_scope.cancel()

            n.start_soon(wait_exit)
            report = await stack.store.wait_report(index)
            n.cancel_scope.cancel()
    handle = ServerHandle(info, report or {}, sup)
    if report is None:
        raise DemoFailure(
            f"the server enclave did not report within {timeout_s:g} s; {describe_exit(handle)}"
        )
    return handle


def describe_exit(handle: ServerHandle) -> str:
    """The enclave's exit reason (and debug console tail), for failure messages."""
    reason = getattr(handle.supervisor, "exit_reason", None)
    parts = [f"exit reason: {_fmt_reason(reason) if reason else 'still running'}"]
    if handle.info.debug and handle.supervisor is not None:
        parts.append("console tail:\n" + console_tail(handle.supervisor))
    return "; ".join(parts)


def _fmt_reason(reason: Any) -> str:
    data = reason.to_json()
    return ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, ""))


def console_tail(sup: Any, limit: int = 4000) -> str:
    hist = bytes(getattr(sup, "_console_hist", b""))
    return hist[-limit:].decode(errors="replace")


def read_audit(kms_state_dir: Path) -> list[dict[str, Any]]:
    """The KMS audit log's lines."""
    path = kms_state_dir / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the demo -------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def _measure(client: Any, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any],
                   out: Console) -> dict[str, Any]:  # fmt: skip
    from models.digits import MODEL_NAME

    # Stream the whole test split (chunks of STREAM_CHUNK rows, pipelined).
    t0 = time.perf_counter()
    chunks = ({"pixels": x[i : i + STREAM_CHUNK]} for i in range(0, len(x), STREAM_CHUNK))
    labels = [o["label"] async for o in client.stream(MODEL_NAME, chunks)]
    stream_s = time.perf_counter() - t0
    pred = np.concatenate(labels)
    if pred.shape != y.shape:
        raise DemoFailure(f"stream returned {pred.shape[0]} labels for {y.shape[0]} samples")
    accuracy = float((pred == y).mean())
    # Steady-state throughput: the split THROUGHPUT_PASSES times in one stream.
    passes = [{"pixels": x[i : i + THROUGHPUT_CHUNK]} for i in range(0, len(x), THROUGHPUT_CHUNK)]
    t0 = time.perf_counter()
    streamed = 0
    async for o in client.stream(MODEL_NAME, passes * THROUGHPUT_PASSES):
        streamed += int(o["label"].shape[0])
    steady_s = time.perf_counter() - t0
    # Unary round-trip latency, batch 1.
    lat = []
    for i in range(LATENCY_SAMPLES):
        row = x[i % len(x) : i % len(x) + 1]
        t = time.perf_counter()
        await client.infer(MODEL_NAME, {"pixels": row})
        lat.append(time.perf_counter() - t)
    return {
        "accuracy": accuracy,
        "samples": len(y),
        "stream_s": stream_s,
        "throughput": streamed / steady_s,
        "p50_ms": _pct(lat, 50) * 1e3,
        "p99_ms": _pct(lat, 99) * 1e3,
    }


async def run_demo(
    state_dir: Path,
    *,
    keep: bool = False,
    out: Console | None = None,
    stop: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Run every step (see the module docstring); returns the figures. Raises on failure."""
    from models.client import make_verifier, open_inference_client, policy_for
    from models.digits import load_test_split

    out = out or Console()
    results: dict[str, Any] = {}
    sealed_path = state_dir / "models" / "digits.sealed"
    out.step(f"state directory {state_dir}")
    async with open_stack(state_dir, models={"digits": sealed_path}) as stack:
        out.ok(f"local attestation root CA: {stack.ca_root_pem}")
        out.ok(f"KMS daemon (SQLite, audit log) at {stack.kms_endpoint}")
        out.ok(f"vsock-proxy (3, {KMS_PROXY_PORT}) -> KMS; model store on (3, {STORE_PORT})")

        out.step("building the inference server image (models/server_app)")
        eif_path = state_dir / "server.eif"
        image = await trio.to_thread.run_sync(build_server_image, eif_path)
        pcr0 = image.pcrs[0].hex()
        results["pcr0"] = pcr0
        out.ok(f"{eif_path.name}: {image.size} bytes")
        for i in (0, 1, 2):
            out.info(f"PCR{i} {image.pcrs[i].hex()}")

        out.step("creating the model key: Decrypt only for an enclave with that PCR0")
        key_arn = await create_model_key(stack, pcr0)
        out.ok(f"{key_arn} (alias/confidential-models)")
        out.info(f"condition kms:RecipientAttestation:ImageSha384 = {pcr0[:32]}...")

        out.step("sealing the bundled digits model (envelope encryption, owner credentials)")
        sealed = await seal_bundled_model(stack, key_arn, sealed_path)
        digest = sealed.header.model_sha384.hex()
        results["model_sha384"] = digest
        out.ok(
            f"{sealed_path.name}: {sealed_path.stat().st_size} bytes, "
            f"{sealed.header.chunk_count} chunk(s), model SHA-384 {digest[:32]}..."
        )

        out.step("running the server enclave (not debug): attested key release, unseal")
        t0 = time.monotonic()
        server = await start_server(stack, eif_path)
        if server.report.get("error") or not all(
            m.get("available") for m in server.report.get("models", [])
        ):
            detail = describe_exit(server)
            raise DemoFailure(f"the server could not load its model: {server.report}; {detail}")
        out.ok(
            f"enclave {server.enclave_id} CID {server.cid}: model 'digits' unsealed inside, "
            f"PCR16 extended, listening on vsock {SERVER_PORT} "
            f"(start {time.monotonic() - t0:.1f} s)"
        )
        missing = server.info.isolation.missing
        if missing:
            out.info(f"sandbox layers missing on this host: {', '.join(missing)}")

        ingress_port = await stack.start_ingress(server.cid)
        endpoint = f"127.0.0.1:{ingress_port}"
        out.step(f"client -> ingress {endpoint} -> vsock ({server.cid}, {SERVER_PORT})")
        policy = policy_for(pcr0=pcr0, model_digests=[digest])
        verifier = make_verifier(stack.roots(), policy)
        x, y = load_test_split()
        async with open_inference_client(endpoint, verifier=verifier) as client:
            peer = client.attestation
            out.ok("attestation verified before sending any data:")
            out.info(f"module_id  {peer.module_id}")
            out.info(f"root       {stack.ca_root_pem} (local CA, chain + ES384 signature)")
            out.info(f"PCR0       {peer.pcrs[0].hex()}  (= the image built above)")
            out.info(f"PCR16      {peer.pcrs[16].hex()}  (= extend(0, model SHA-384))")
            out.info(f"channel    {getattr(client._channel, 'suite', '?')}")
            models = await client.list_models()
            out.info("catalog    " + ", ".join(
                f"{m.name} ({'available' if m.available else 'unavailable'}, "
                f"{m.inputs[0].dtype if m.inputs else '?'} "
                f"{list(m.inputs[0].shape) if m.inputs else []})" for m in models))  # fmt: skip
            out.step(f"streaming the test split ({len(y)} samples) through the enclave")
            figures = await _measure(client, x, y, out)
        results.update(figures)
        results["module_id"] = peer.module_id
        results["pcr16"] = peer.pcrs[16].hex()
        out.ok(f"accuracy   {figures['accuracy']:.2%} on {figures['samples']} held-out samples")
        out.ok(
            f"latency    p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms "
            f"(unary round trip, batch 1, {LATENCY_SAMPLES} requests)"
        )
        out.ok(
            f"throughput {figures['throughput']:,.0f} samples/s streaming (steady state: the split "
            f"{THROUGHPUT_PASSES}x as {THROUGHPUT_CHUNK}-row inputs; one cold pass took "
            f"{figures['stream_s'] * 1e3:.1f} ms)"
        )

        out.step("same image in DEBUG mode: PCR0 reads as zeros, KMS must refuse the key")
        audit_before = len(read_audit(stack.kms_state_dir))
        debug_server = await start_server(stack, eif_path, debug=True)
        model_report: dict[str, Any] = next(
            (m for m in debug_server.report.get("models", []) if m.get("name") == "digits"), {}
        )
        if model_report.get("available"):
            raise DemoFailure("the debug enclave was given the model key!")
        denials = [
            line
            for line in read_audit(stack.kms_state_dir)[audit_before:]
            if line.get("operation") == "Decrypt" and line.get("decision") != "allow"
        ]
        if not denials:
            raise DemoFailure("no KMS denial recorded for the debug enclave")
        denial = denials[-1]
        results["debug_denial"] = denial.get("reason") or denial.get("error")
        out.ok(f"KMS refused Decrypt: {denial.get('error') or denial.get('decision')}")
        out.info(f"audit log reason: {denial.get('reason')}")
        out.info(f"server reported: {model_report.get('reason')}")
        for line in console_tail(debug_server.supervisor).splitlines():
            if "model_unavailable" in line:
                try:
                    entry = json.loads(line)
                    line = f"{entry['event']} model={entry['model']!r} ({entry['level']})"
                except (ValueError, KeyError, TypeError):
                    line = line.strip()[:200]
                out.info(f"debug console (the enclave's own log): {line}")
        with trio.move_on_after(10):
            await debug_server.wait_exited()
        reason = debug_server.supervisor.exit_reason
        out.info(
            f"debug enclave {debug_server.enclave_id}: "
            f"{_fmt_reason(reason) if reason else 'still running'}"
        )

        if keep:
            out.step("--keep: the stack stays up (Ctrl-C to stop everything)")
            policy_file = state_dir / "policy.json"
            policy_file.write_text(
                json.dumps(
                    {"measurements": [{"pcrs": {"0": pcr0, "16": results["pcr16"]}}]}, indent=2
                )
            )
            input_file = state_dir / "digits-test.npz"
            np.savez(input_file, x=x[:5])
            out.info(f"export ENCLAVE_STATE_DIR={state_dir}")
            out.info(
                f".venv/bin/enclave infer --endpoint {endpoint} --root {stack.ca_root_pem} "
                f"--policy {policy_file} --model digits --input {input_file}"
            )
            out.info(f".venv/bin/enclave describe-enclaves   # enclave {server.enclave_id}")
            out.info(f"KMS at {stack.kms_endpoint}; audit log {stack.kms_state_dir}/audit.jsonl")
            await trio.sleep_forever()
        out.step("stopping the enclave, ingress, model store, vsock-proxy and KMS")
    return results


def main(*, keep: bool) -> int:
    """``enclave demo [--keep]``; returns the exit status (non-zero if any step fails)."""
    out = Console()
    if "ENCLAVE_LOG_LEVEL" not in os.environ:
        # The demo prints its own progress; service logs only when something is wrong
        # (ENCLAVE_LOG_LEVEL=info shows them all).
        from transport.logs import configure_logging

        configure_logging("error")
    tmp = Path(tempfile.mkdtemp(prefix="enclave-demo-"))
    saved_env = {k: os.environ.get(k) for k in _env_for(tmp)}
    try:
        results = trio.run(lambda: run_demo(tmp, keep=keep, out=out))
    except KeyboardInterrupt:
        out.step("interrupted; everything stopped")
        return 130
    except DemoFailure as exc:
        out.fail(str(exc))
        return 1
    except BaseException as exc:  # every failure ends the demo with a non-zero status
        if isinstance(exc, SystemExit | GeneratorExit):
            raise
        if isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None:
            out.step("interrupted; everything stopped")
            return 130
        out.fail(f"{type(exc).__name__}: {_flatten(exc)}")
        return 1
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
    out.step(
        f"done: accuracy {results['accuracy']:.2%}, p50 {results['p50_ms']:.2f} ms, "
        f"{results['throughput']:,.0f} samples/s; nothing left running"
    )
    return 0


def _flatten(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_flatten(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__
