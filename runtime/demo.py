"""``enclave demo``: the whole mission on embedded defaults (run by ``./scripts/demo``).

1. a temporary state directory; its local CA (the attestation root, like AWS's Nitro root);
2. the KMS daemon (SQLite) with two principals: the *model owner* and the *instance*;
3. the host services: vsock-proxy (3, 8000) -> KMS, the model store (3, 7000), later the ingress;
4. the server image (``models/text_app`` built with ``build_eif``: the server configured for
   the digits model and MiniLM): PCR0/1/2;
5. a KMS key whose policy lets the owner create data keys and lets the instance ``Decrypt`` only
   with a Recipient attestation whose ``ImageSha384`` is that image's PCR0;
6. the bundled digits model and the MiniLM bundle (graph + tokenizer + config, one unit) sealed
   under that key (owner credentials);
7. the enclave (not debug): it unseals both with attested key release, extends PCR16 with their
   digests and serves on vsock port 5005;
8. the client through the ingress: verifies the attestation (local root, PCR0, PCR16 = these
   models) before sending anything, streams the whole test split, prints accuracy, latency,
   throughput and the verified measurements;
8b. the second act (:mod:`runtime.demo_text`): twenty confidential documents embedded inside the
   enclave, queries matched to them, the latency against in-process onnxruntime;
9. the same image in debug mode: PCR0 reads as zeros, KMS refuses the keys (reason from the
   audit log), the server reports the models unavailable;
10. everything stopped and removed (``--keep`` leaves the stack up, prints one ready-to-run
    ``enclave infer`` line per served model, and stops at Ctrl-C or SIGTERM).

With ``--replicas N`` step 7 starts N replicas of the image (group ``server``: each its own CID
and module id, the same PCR0/1/2 and, once they loaded the model, PCR16) and step 8's ingress
spreads connections over them by least connections; the ``enclave infer`` lines are the same.

The building blocks live in :mod:`runtime.stack`; this module adds the steps' narration.

Processes and signals: :func:`main` does not run the stack itself. It creates the state
directory and runs the demo in a child process (``python -m runtime.demo``) in a process group
of its own, and forwards SIGINT and SIGTERM to that child alone. A Ctrl-C on a terminal signals
the whole foreground process group; with the stack's helpers (the zygote, the enclaves) outside
it, only the demo sees the signal, and it stops them in order: enclaves terminated, cgroups
removed, services stopped, the state directory (CA root key, KMS database, sealed model)
deleted. The child also asks the kernel for SIGTERM if its parent dies (a closed terminal), and
the parent removes the state directory if the child could not.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final, TextIO

import numpy as np
import numpy.typing as npt
import trio

from runtime.demo_text import text_act

# Re-exported for code written against ``runtime.demo`` before the building blocks moved.
from runtime.stack import (
    KMS_PROXY_PORT,
    SERVER_PORT,
    STORE_PORT,
    TEXT_APP_DIR,
    TEXT_MODEL,
    ServerHandle,
    StackError,
    build_server_image,
    console_tail,
    create_model_key,
    describe_exit,
    format_exit_reason,
    open_stack,
    read_audit,
    seal_bundled_model,
    seal_text_model,
    size_pool_for,
    start_replicas,
    start_server,
)
from runtime.stack import SERVER_APP_DIR as SERVER_APP_DIR
from runtime.stack import SERVER_CMD as SERVER_CMD
from runtime.stack import Stack as Stack
from runtime.stack import model_key_policy as model_key_policy

if TYPE_CHECKING:
    from models.client import InferenceClient, ModelInfo

__all__ = [
    "main",
    "run_in_process",
    "run_demo",
    "DemoResults",
    "DemoFigures",
    "DemoFailure",
    "Console",
    "LATENCY_SAMPLES",
]

#: Unary round trips used for the latency figures.
LATENCY_SAMPLES: Final = 200
#: Rows per stream message when streaming the test split for accuracy.
STREAM_CHUNK: Final = 50
#: Throughput: the split streamed this many times in one stream, in messages of this many rows.
THROUGHPUT_PASSES: Final = 10
THROUGHPUT_CHUNK: Final = 150
#: Rows of the digits test split written as the ``--keep`` example input.
KEEP_INPUT_ROWS: Final = 5
#: Exit status after a signal stopped the demo: 128 + the signal's number (the shell's rule).
_SIGNAL_EXIT_BASE: Final = 128
#: Linux prctl(2) option: the signal this process gets when its parent dies.
_PR_SET_PDEATHSIG: Final = 1

Array = npt.NDArray[np.generic]


# --- output -----------------------------------------------------------------------------------


class Console:
    """Step-by-step progress on stderr (readable on a terminal and in a log)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.monotonic()
        self.color = self.stream.isatty()

    def _c(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def step(self, text: str) -> None:
        """A numbered step, with the time since the start."""
        t = time.monotonic() - self.t0
        print(f"{self._c('2', f'[{t:5.1f}s]')} {self._c('1', text)}", file=self.stream, flush=True)

    def info(self, text: str) -> None:
        """A detail of the current step."""
        print(f"          {text}", file=self.stream, flush=True)

    def ok(self, text: str) -> None:
        """A check of the current step that passed."""
        print(f"          {self._c('32', 'ok')} {text}", file=self.stream, flush=True)

    def fail(self, text: str) -> None:
        """What failed (the demo then stops with a non-zero status)."""
        print(f"          {self._c('31', 'FAILED')} {text}", file=self.stream, flush=True)

    def error(self, text: str) -> None:
        """The closing ``error:`` line of a failed run (the CLI's convention: one line)."""
        summary = text.strip().splitlines()[0] if text.strip() else "failed"
        print(f"error: demo: {summary}", file=self.stream, flush=True)


class DemoFailure(StackError):
    """A demo step failed (message says which and why)."""


@dataclass(frozen=True)
class DemoFigures:
    """What the client measured through the enclave."""

    #: Share of the test split classified correctly, and the split's size.
    accuracy: float
    samples: int
    #: One cold pass of the split (seconds), steady-state samples/s, unary latency (ms).
    stream_s: float
    throughput: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class DemoResults(DemoFigures):
    """The figures and measurements of one demo run."""

    #: PCR0 of the server image and the SHA-384 of the served model (hex).
    pcr0: str
    model_sha384: str
    #: What the client verified: the enclave's module id and PCR16 (hex).
    module_id: str
    pcr16: str
    #: Why the KMS refused the debug enclave (from the audit log).
    debug_denial: str
    #: SHA-384s (hex) of the served models in the server's order (PCR16 extends them all):
    #: digits, then MiniLM.
    model_digests: tuple[str, ...] = ()
    #: The second act: per query (query, best document, cosine), and one query's p50 through
    #: the enclave and in-process (ms).
    text_matches: tuple[tuple[str, int, float], ...] = ()
    text_enclave_ms: float = 0.0
    text_inproc_ms: float = 0.0


# --- the steps --------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def _measure(client: InferenceClient, x: Array, y: Array) -> DemoFigures:
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
    return DemoFigures(
        accuracy=accuracy,
        samples=len(y),
        stream_s=stream_s,
        throughput=streamed / steady_s,
        p50_ms=_pct(lat, 50) * 1e3,
        p99_ms=_pct(lat, 99) * 1e3,
    )


def _enclave_command() -> list[str]:
    """How to run ``enclave`` from any directory: this interpreter's console script."""
    script = Path(sys.executable).with_name("enclave")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "runtime.cli"]


#: The ``--keep`` example for a text model: one text on the command line.
KEEP_TEXT: Final = "Which patient gets chest pain going up the stairs?"


def _example_input(model: ModelInfo, x: Array) -> dict[str, Array]:
    """An input for ``model``: rows of the digits test split for the bundled model, zeros of
    the declared shape (dynamic dimensions as 1) for any other."""
    if model.name == "digits" and [s.name for s in model.inputs] == ["pixels"]:
        return {"pixels": x[:KEEP_INPUT_ROWS]}
    return {
        spec.name: np.zeros(
            tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape), spec.dtype
        )
        for spec in model.inputs
    }


def _keep_instructions(
    out: Console,
    state_dir: Path,
    stack: Stack,
    server: ServerHandle,
    endpoint: str,
    policy: dict[str, object],
    catalog: Sequence[ModelInfo],
    x: Array,
) -> None:
    """Write a client policy and one input per served model; print how to use them."""
    policy_file = state_dir / "client-policy.json"
    policy_file.write_text(json.dumps(policy, indent=2) + "\n")
    enclave = _enclave_command()
    out.info(f"export ENCLAVE_STATE_DIR={shlex.quote(str(state_dir))}")
    for model in catalog:
        if not model.available:
            continue
        argv = [*enclave, "infer", "--endpoint", endpoint, "--root", str(stack.ca_root_pem),
                "--policy", str(policy_file), "--model", model.name]  # fmt: skip
        if model.is_text:
            argv += ["--text", KEEP_TEXT]
        else:
            input_file = state_dir / "inputs" / f"{model.name}.npz"
            input_file.parent.mkdir(exist_ok=True)
            np.savez(input_file, **_example_input(model, x))  # type: ignore[arg-type]
            argv += ["--input", str(input_file)]
        out.info(shlex.join(argv))
    out.info(f"{shlex.join([*enclave, 'describe-enclaves'])}   # enclave {server.enclave_id}")
    out.info(f"KMS at {stack.kms_endpoint}; audit log {stack.kms_state_dir}/audit.jsonl")


async def run_demo(
    state_dir: Path, *, keep: bool = False, out: Console | None = None, replicas: int = 1
) -> DemoResults:
    """Run every step (see the module docstring) in ``state_dir``; returns the figures.

    With ``keep`` the stack stays up after the steps until this is cancelled. With
    ``replicas`` > 1 the server runs as that many replicas of the one image behind one
    ingress (least connections, health from the runtime; clients fail over).

    Raises:
        DemoFailure: a step's outcome was wrong (the message says which).
        runtime.stack.StackError, transport.errors.EnclaveError: a service failed.
    """
    from models.client import open_inference_client
    from models.text.minilm import ensure_minilm_bundle

    out = out or Console()
    sealed_path = state_dir / "models" / "digits.sealed"
    text_path = state_dir / "models" / f"{TEXT_MODEL}.sealed"
    out.step(f"state directory {state_dir}")
    size_pool_for(state_dir, replicas + 1)  # + the debug enclave of step 9
    models = {"digits": sealed_path, TEXT_MODEL: text_path}
    async with open_stack(state_dir, models=models) as stack:
        out.ok(f"local attestation root CA: {stack.ca_root_pem}")
        out.ok(f"KMS daemon (SQLite, audit log) at {stack.kms_endpoint}")
        out.ok(f"vsock-proxy (3, {KMS_PROXY_PORT}) -> KMS; model store on (3, {STORE_PORT})")

        out.step("building the inference server image (models/text_app: digits + MiniLM)")
        eif_path = state_dir / "server.eif"
        image = await trio.to_thread.run_sync(
            lambda: build_server_image(eif_path, app_dir=TEXT_APP_DIR)
        )
        pcr0 = image.pcrs[0].hex()
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
        out.ok(
            f"{sealed_path.name}: {sealed_path.stat().st_size} bytes, "
            f"{sealed.header.chunk_count} chunk(s), model SHA-384 {digest[:32]}..."
        )
        out.step("sealing the MiniLM bundle: graph + tokenizer.json + config as one unit")
        text_sealed = await seal_text_model(stack, key_arn, text_path)
        text_digest = text_sealed.header.model_sha384.hex()
        out.ok(
            f"{text_path.name}: {text_path.stat().st_size:,} bytes, "
            f"{text_sealed.header.chunk_count} chunks, bundle SHA-384 {text_digest[:32]}..."
        )
        digests = (digest, text_digest)

        out.step("running the server enclave (not debug): attested key release, unseal")
        t0 = time.monotonic()
        server = await start_server(stack, eif_path)
        if not server.report.ok:
            detail = await describe_exit(server)
            raise DemoFailure(f"the server could not load its model: {server.report.raw}; {detail}")
        out.ok(
            f"enclave {server.enclave_id} CID {server.cid}: model 'digits' unsealed, model "
            f"'{TEXT_MODEL}' unsealed inside, PCR16 extended, listening on vsock {SERVER_PORT} "
            f"(start {time.monotonic() - t0:.1f} s)"
        )
        missing = server.info.isolation.missing
        if missing:
            out.info(f"sandbox layers missing on this host: {', '.join(missing)}")

        if replicas > 1:
            out.step(f"running {replicas - 1} more replica(s) of the same image")
            more = await start_replicas(stack, eif_path, replicas - 1)
            for replica in [server, *more]:
                out.info(
                    f"replica {replica.info.enclave_name}: enclave {replica.enclave_id} "
                    f"CID {replica.cid}"
                )
            ingress_port = await stack.start_group_ingress(server.info.enclave_name)
            endpoint = f"127.0.0.1:{ingress_port}"
            out.step(
                f"client -> ingress {endpoint} -> the least busy of {replicas} replicas "
                f"(group {server.info.enclave_name!r}, vsock port {SERVER_PORT})"
            )
        else:
            ingress_port = await stack.start_ingress(server.cid)
            endpoint = f"127.0.0.1:{ingress_port}"
            out.step(f"client -> ingress {endpoint} -> vsock ({server.cid}, {SERVER_PORT})")
        from models.client import make_verifier, policy_for
        from models.digits import load_test_split

        verifier = make_verifier(stack.roots(), policy_for(pcr0=pcr0, model_digests=list(digests)))
        x, y = load_test_split()
        async with open_inference_client(endpoint, verifier=verifier) as client:
            peer = client.attestation
            out.ok("attestation verified before sending any data:")
            out.info(f"module_id  {peer.module_id}")
            out.info(f"root       {stack.ca_root_pem} (local CA, chain + ES384 signature)")
            out.info(f"PCR0       {peer.pcrs[0].hex()}  (= the image built above)")
            out.info(f"PCR16      {peer.pcrs[16].hex()}  (= extend(extend(0, digits), MiniLM))")
            out.info(f"channel    {getattr(client._channel, 'suite', '?')}")
            catalog = await client.list_models()
            out.info("catalog    " + ", ".join(_describe(m) for m in catalog))
            out.step(f"streaming the test split ({len(y)} samples) through the enclave")
            figures = await _measure(client, x, y)
        module_id, pcr16 = str(peer.module_id), peer.pcrs[16].hex()
        out.ok(f"accuracy   {figures.accuracy:.2%} on {figures.samples} held-out samples")
        out.ok(
            f"latency    p50 {figures.p50_ms:.2f} ms, p99 {figures.p99_ms:.2f} ms "
            f"(unary round trip, batch 1, {LATENCY_SAMPLES} requests)"
        )
        out.ok(
            f"throughput {figures.throughput:,.0f} samples/s streaming (steady state: the split "
            f"{THROUGHPUT_PASSES}x as {THROUGHPUT_CHUNK}-row inputs; one cold pass took "
            f"{figures.stream_s * 1e3:.1f} ms)"
        )
        async with open_inference_client(endpoint, verifier=verifier) as client:
            text = await text_act(
                client,
                out,
                model=TEXT_MODEL,
                bundle=await trio.to_thread.run_sync(ensure_minilm_bundle),
                enclave_cpus=server.info.cpu_ids,
            )

        denial = await _debug_enclave_refused(stack, eif_path, out)

        if keep:
            out.step("--keep: the stack stays up (Ctrl-C to stop everything)")
            policy: dict[str, object] = {"measurements": [{"pcrs": {"0": pcr0, "16": pcr16}}]}
            _keep_instructions(out, state_dir, stack, server, endpoint, policy, catalog, x)
            await trio.sleep_forever()
        out.step("stopping the enclave, ingress, model store, vsock-proxy and KMS")
    return DemoResults(
        **asdict(figures),
        pcr0=pcr0,
        model_sha384=digest,
        module_id=module_id,
        pcr16=pcr16,
        debug_denial=denial,
        model_digests=digests,
        text_matches=text.matches,
        text_enclave_ms=text.enclave_p50_ms,
        text_inproc_ms=text.inproc_p50_ms,
    )


def _describe(model: ModelInfo) -> str:
    """``digits (available, float32 [None, 64])``, ``minilm (available, text -> float32 ...)``."""
    state = "available" if model.available else "unavailable"
    if model.is_text and model.outputs:
        out = model.outputs[0]
        return f"{model.name} ({state}, text -> {out.dtype} {list(out.shape)})"
    if model.inputs:
        return f"{model.name} ({state}, {model.inputs[0].dtype} {list(model.inputs[0].shape)})"
    return f"{model.name} ({state})"


async def _debug_enclave_refused(stack: Stack, eif_path: Path, out: Console) -> str:
    """Step 9: the same image in debug mode must be refused the model key; returns why."""
    out.step("same image in DEBUG mode: PCR0 reads as zeros, KMS must refuse the keys")
    audit_before = len(read_audit(stack.kms_state_dir))
    debug_server = await start_server(stack, eif_path, debug=True)
    model = debug_server.report.model("digits")
    if model is None or model.available:
        raise DemoFailure("the debug enclave was given the model key!")
    text_model = debug_server.report.model(TEXT_MODEL)
    if text_model is None or text_model.available:
        raise DemoFailure("the debug enclave was given the MiniLM key!")
    denials = [
        line
        for line in read_audit(stack.kms_state_dir)[audit_before:]
        if line.get("operation") == "Decrypt" and line.get("decision") != "allow"
    ]
    if not denials:
        raise DemoFailure("no KMS denial recorded for the debug enclave")
    denial = denials[-1]
    out.ok(f"KMS refused Decrypt: {denial.get('error') or denial.get('decision')}")
    out.info(f"audit log reason: {denial.get('reason')}")
    out.info(f"server reported: {model.reason}")
    for line in (await console_tail(debug_server)).splitlines():
        if "model_unavailable" in line:
            try:
                entry = json.loads(line)
                line = f"{entry['event']} model={entry['model']!r} ({entry['level']})"
            except (ValueError, KeyError, TypeError):
                line = line.strip()[:200]
            out.info(f"debug console (the enclave's own log): {line}")
    with trio.move_on_after(10):
        await debug_server.wait_exited()
    out.info(
        f"debug enclave {debug_server.enclave_id}: {format_exit_reason(debug_server.exit_reason)}"
    )
    return str(denial.get("reason") or denial.get("error"))


# --- running it -------------------------------------------------------------------------------


def _flatten(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_flatten(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__


def _lone(exc: BaseException) -> BaseException:
    """The single leaf of nested one-member exception groups (``exc`` itself otherwise)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run_in_process(
    state_dir: Path,
    *,
    keep: bool = False,
    out: Console | None = None,
    debug: bool = False,
    on_ready: Callable[[], None] | None = None,
    replicas: int = 1,
) -> int:
    """Run the demo in this process until it ends or SIGINT/SIGTERM arrives; return the exit
    status: 0, 1 when a step failed, 128 + the signal's number when a signal stopped it.

    Either signal cancels the steps; the stack then stops in order (enclaves, cgroups,
    services). Signals arriving during that shutdown are absorbed, never raised.
    ``state_dir`` is used as is and not removed (see :func:`main`). ``on_ready`` is called
    once the signal handlers are in place.
    """
    out = out or Console()
    received: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    # Outside trio (before it starts, after it ends) a signal is only recorded: it must not
    # raise KeyboardInterrupt in the middle of the stack's shutdown.
    previous = {s: signal.signal(s, remember) for s in (signal.SIGINT, signal.SIGTERM)}
    if on_ready is not None:
        on_ready()

    async def until_signal() -> DemoResults | None:
        work = trio.CancelScope()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:  # every signal is consumed; the first stops
                        if not received:
                            out.step(f"{signal.Signals(signum).name}: stopping everything")
                        received.append(signum)
                        work.cancel()

                nursery.start_soon(watch)
                if received:  # arrived before the receiver was open
                    work.cancel()
                with work:
                    results = await run_demo(state_dir, keep=keep, out=out, replicas=replicas)
                nursery.cancel_scope.cancel()
        return None if received else results

    try:
        results = trio.run(until_signal)
    except Exception as exc:  # every failure ends the demo with a non-zero status
        lone = _lone(exc)
        if debug:
            traceback.print_exception(exc)
        text = (
            str(lone)
            if isinstance(lone, DemoFailure)
            else f"{type(lone).__name__}: {_flatten(lone)}"
        )
        out.fail(text)
        out.error(text)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if results is None:
        out.step("stopped; the enclaves, their cgroups and every service are gone")
        return _SIGNAL_EXIT_BASE + received[0]
    out.step(
        f"done: accuracy {results.accuracy:.2%}, p50 {results.p50_ms:.2f} ms, "
        f"{results.throughput:,.0f} samples/s; MiniLM query p50 {results.text_enclave_ms:.1f} ms "
        f"(in-process {results.text_inproc_ms:.1f} ms); nothing left running"
    )
    return 0


def _remove_tree(path: Path) -> None:
    """Remove ``path`` entirely; a leftover is reported (it holds the CA key and the KMS data)."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        print(f"error: could not remove the demo's state directory {path}", file=sys.stderr)


def main(*, keep: bool, debug: bool = False, replicas: int = 1) -> int:
    """``enclave demo [--keep] [--replicas N]``; returns the exit status (non-zero if any
    step fails).

    The demo runs in a child process of its own process group (see the module docstring); this
    process forwards SIGINT and SIGTERM to it once it is ready to handle them, waits, and
    makes sure the temporary state directory is gone.
    """
    state_dir = Path(tempfile.mkdtemp(prefix="enclave-demo-"))
    ready_r, ready_w = os.pipe()
    pending: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)  # delivered once the child handles signals
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        argv = [sys.executable, "-m", "runtime.demo", "--state-dir", str(state_dir),
                "--ready-fd", str(ready_w)]  # fmt: skip
        if keep:
            argv.append("--keep")
        if debug:
            argv.append("--debug")
        if replicas != 1:
            argv += ["--replicas", str(replicas)]
        proc = subprocess.Popen(argv, pass_fds=(ready_w,), process_group=0)
        os.close(ready_w)
        ready = os.read(ready_r, 1)  # b"" if the child ended before it was ready
        if ready:
            child = proc
            for signum in pending:
                forward(signum, None)
        status = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(ready_r)
        _remove_tree(state_dir)
    if status < 0:
        name = signal.Signals(-status).name
        print(f"error: the demo process was killed by {name}", file=sys.stderr)
        return _SIGNAL_EXIT_BASE - status
    return status


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies (a closed terminal), so the stack stops."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime.demo --state-dir DIR [--ready-fd FD] [--keep] [--debug]``."""
    parser = argparse.ArgumentParser(prog="python -m runtime.demo", allow_abbrev=False)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args(argv)
    parent = os.getppid()
    _die_with_parent()
    from transport.logs import configure_logging

    # The demo prints its own progress; service logs only when something is wrong, unless
    # ENCLAVE_LOG_LEVEL asks for more (info shows them all).
    configure_logging(None if "ENCLAVE_LOG_LEVEL" in os.environ else "error")
    ready_fd: int | None = args.ready_fd

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"r")
            os.close(ready_fd)

    try:
        if os.getppid() != parent:  # the parent died before the death signal was armed
            return 1
        return run_in_process(
            args.state_dir,
            keep=args.keep,
            out=Console(),
            debug=args.debug,
            on_ready=ready,
            replicas=args.replicas,
        )
    finally:
        _remove_tree(args.state_dir)


if __name__ == "__main__":
    sys.exit(_child_main())
