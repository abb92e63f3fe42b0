"""The host side of confidential training: image, key, sealed shards, coordinator, workers.

On top of a :class:`runtime.stack.Stack` (CA, KMS daemon, vsock-proxy, host store, runtime)::

    size_pool_for(state_dir, workers)                   # before open_stack
    async with open_stack(state_dir) as stack, open_training(stack, workdir, workers=2) as t:
        result = await t.run(steps=40)                   # a protected run end to end
        print(result.accuracy, result.phases)

:func:`open_training` builds the training image (``models/train_app``: ``python -m
models.training``), creates the training key (its policy releases ``Decrypt`` and
``GenerateDataKey`` only to an enclave running that image: PCR0, not debug), generates the data
set and seals its shards and test set as the data owner, starts the coordinator on
``(3, coordinator_port)``, the relay with the ring's rules (``train=train:<peer_port>``) and the
workers as replicas of the image (group ``train``). :meth:`Training.run` hands every live
worker a plan and collects the results; a member lost mid-step makes the survivors report
``MemberLost``: the run resumes from the last sealed checkpoint with the remaining members, or
raises :class:`TooFewWorkers`.

The coordinator is untrusted by the workers (see :mod:`models.training.plan`); it only sees
accuracy, timings and error kinds. The unprotected baseline (``protected=False``) is refused by
every image but the benchmark's (its measured ``train.toml`` says ``allow_unprotected``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from models import sealed
from models.sealing import CONTENT_CONTEXT_KEY
from models.training.checkpoint import checkpoint_name
from models.training.config import TrainConfig
from models.training.data import encode_shard, make_dataset, split_shards
from models.training.errors import (
    CheckpointError,
    MemberLost,
    RingProtocolError,
    RunAborted,
    TooFewWorkers,
    TrainingError,
    UnprotectedRefused,
)
from models.training.plan import MAX_WORKERS
from models.training.worker import DATASET_CONTEXT_KEY, SHARD_CONTENT, TEST_SET, shard_name

if TYPE_CHECKING:
    from runtime.api import EnclaveInfo
    from runtime.stack import Stack
    from transport.rpc import RpcStream

__all__ = [
    "TRAIN_APP_DIR",
    "TRAIN_CMD",
    "GROUP",
    "Coordinator",
    "RunResult",
    "Training",
    "open_training",
    "build_training_image",
    "training_key_policy",
]

log = structlog.get_logger()

TRAIN_APP_DIR: Final = Path(__file__).resolve().parents[1] / "train_app"
TRAIN_CMD: Final = ("python", "-m", "models.training", "--config", "train.toml")
#: One BLAS thread: the enclave has one CPU, and a fixed thread count keeps the sums' order
#: (and so every bit of the weights) the same from run to run.
TRAIN_ENV: Final = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: The replica group of the workers (the relay's rules name it).
GROUP: Final = "train"
#: Memory of one worker enclave (MiB): the data set is ~2.6 MB, the model 0.3 MB, numpy and
#: the runtime the rest.
WORKER_MEMORY_MIB: Final = 384
#: Errors of a run that a resume with the remaining members can cure.
_RESUMABLE: Final = (
    MemberLost.__name__,
    RingProtocolError.__name__,
    RunAborted.__name__,
    "exited",
    "silent",
)
_TYPED: Final = {
    cls.__name__: cls
    for cls in (UnprotectedRefused, CheckpointError, MemberLost, RingProtocolError, TrainingError)
}
_CKPT: Final = re.compile(r"ckpt-(\d{8})")


def build_training_image(output: Path, *, app_dir: Path = TRAIN_APP_DIR) -> Any:
    """Build the training image (blocking); its ``pcrs[0]`` is PCR0."""
    from runtime.eif import build_eif

    return build_eif(
        app_dir=app_dir,
        cmd=list(TRAIN_CMD),
        env=TRAIN_ENV,
        output=output,
        name="confidential-training",
        version="1.0",
    )


def training_key_policy(pcr0_hex: str) -> dict[str, Any]:
    """The owner administers and seals shards; only an enclave running the image whose PCR0
    is ``pcr0_hex`` gets data keys: to unseal shards and checkpoints, and to seal checkpoints."""
    from kms.policy import enclave_key_policy
    from runtime.stack import INSTANCE_ARN, OWNER_ACTIONS, OWNER_ARN

    return enclave_key_policy(
        admin_principal=OWNER_ARN,
        enclave_principal=INSTANCE_ARN,
        pcrs={0: pcr0_hex},
        actions=("kms:Decrypt", "kms:GenerateDataKey"),
        admin_actions=OWNER_ACTIONS,
        admin_sid="DataOwnerAdministersAndSeals",
        enclave_sid="OnlyTheAttestedTrainingImage",
    )


async def _create_key(stack: Stack, pcr0_hex: str, alias: str) -> str:
    async with stack.owner_kms() as kms:
        answer = await kms.call(
            "CreateKey",
            {
                "Description": "sealed training data and checkpoints",
                "KeySpec": "SYMMETRIC_DEFAULT",
                "KeyUsage": "ENCRYPT_DECRYPT",
                "Policy": json.dumps(training_key_policy(pcr0_hex)),
            },
        )
        metadata = answer.get("KeyMetadata")
        if not isinstance(metadata, Mapping):
            raise TrainingError("CreateKey answered without KeyMetadata")
        arn = str(metadata["Arn"])
        await kms.call("CreateAlias", {"AliasName": alias, "TargetKeyId": arn})
    return arn


async def _seal_as_owner(
    stack: Stack, key_id: str, parts: Mapping[str, bytes], out_dir: Path
) -> dict[str, Path]:
    """Seal the data set's parts as the data owner (plain ``GenerateDataKey``: the owner may
    create data keys, never Decrypt), all under one data key: a worker then needs one key
    release for all its shards. Each part still gets its own file key (a fresh salt) and its
    name in its authenticated header."""
    context = {DATASET_CONTEXT_KEY: "synthetic", CONTENT_CONTEXT_KEY: SHARD_CONTENT}
    async with stack.owner_kms() as kms:
        answer = await kms.call(
            "GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": context}
        )
    plaintext_b64, blob_b64 = answer.get("Plaintext"), answer.get("CiphertextBlob")
    if not isinstance(plaintext_b64, str) or not isinstance(blob_b64, str):
        raise TrainingError("GenerateDataKey answered without Plaintext or CiphertextBlob")
    data_key = base64.b64decode(plaintext_b64, validate=True)
    blob = base64.b64decode(blob_b64, validate=True)
    paths = {}
    for name, data in parts.items():
        header = sealed.new_header(
            key_id=key_id,
            encrypted_data_key=blob,
            model_name=name,
            model_sha384=hashlib.sha384(data).digest(),
            total_size=len(data),
            encryption_context=context,
        )
        out_buf = io.BytesIO()
        sealed.seal_stream(io.BytesIO(data), out_buf, data_key=data_key, header=header)
        paths[name] = out_dir / name
        await trio.Path(paths[name]).write_bytes(out_buf.getvalue())
    del data_key
    return paths


@dataclass
class _Generation:
    number: int
    plans: dict[str, dict[str, Any]]  # module id -> plan
    handed: set[str] = field(default_factory=set)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: dict[int, dict[str, Any]] = field(default_factory=dict)
    aborted: bool = False


class Coordinator:
    """The host's training coordinator (``enclave-rpc/1`` on ``(3, coordinator_port)``):
    ``join`` -> this worker's plan (None: none yet), ``result`` and ``failed`` reports."""

    def __init__(self) -> None:
        from transport.rpc import route, unary_inline

        self.current: _Generation | None = None
        self.stopping: str | None = None
        self.changed = trio.Event()
        self.handle = route(
            {
                "join": unary_inline(self._join),
                "result": unary_inline(self._result),
                "failed": unary_inline(self._failed),
                "status": unary_inline(self._status),
            }
        )

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _join(self, request: object, _stream: RpcStream) -> dict[str, Any] | None:
        module_id = request.get("module_id") if isinstance(request, dict) else None
        if self.stopping is not None:
            return {"stop": self.stopping}
        gen = self.current
        if gen is None or not isinstance(module_id, str) or module_id not in gen.plans:
            return None
        if module_id in gen.handed:
            return None
        gen.handed.add(module_id)
        return gen.plans[module_id]

    def _status(self, request: object, _stream: RpcStream) -> dict[str, Any]:
        number = request.get("generation") if isinstance(request, dict) else None
        gen = self.current
        current = gen is not None and gen.number == number and not gen.aborted
        return {"aborted": not current or self.stopping is not None}

    def _report(self, report: object, into: str) -> dict[str, Any]:
        gen = self.current
        if not isinstance(report, dict) or gen is None:
            return {}
        rank, number = report.get("rank"), report.get("generation")
        if number == gen.number and type(rank) is int and 0 <= rank < len(gen.plans):
            getattr(gen, into)[rank] = report
            self._notify()
        return {}

    def _result(self, report: object, _stream: RpcStream) -> dict[str, Any]:
        return self._report(report, "results")

    def _failed(self, report: object, _stream: RpcStream) -> dict[str, Any]:
        log.info("training_worker_failed", report=report)
        return self._report(report, "failures")


async def _serve_coordinator(
    coordinator: Coordinator, port: int, *, task_status: trio.TaskStatus[None]
) -> None:
    from transport.rpc import serve_rpc
    from transport.vsock import open_vsock_listener

    listener = await open_vsock_listener(port)

    async def connection(stream: trio.abc.Stream) -> None:
        try:
            await serve_rpc(stream, coordinator.handle)
        except Exception as exc:  # one worker's broken connection must not stop the rest
            log.info("training_coordinator_connection_failed", error=str(exc))

    async with listener:
        task_status.started()
        await trio.serve_listeners(connection, [listener])


@dataclass(frozen=True)
class RunResult:
    """What :meth:`Training.run` returns."""

    accuracy: float
    #: Members of the run that finished (fewer than started after a resume).
    world: int
    #: Each rank's report of the finishing generation: ``phases`` (load_s, compute_s,
    #: exchange_s, checkpoint_s, exchanged_bytes), ``wall_s``.
    reports: tuple[dict[str, Any], ...]
    #: Each resume: the generation that failed, its failure reports, the step resumed from.
    resumes: tuple[dict[str, Any], ...]
    #: The sealed checkpoint of the final state on the host.
    final_checkpoint: Path
    #: SHA-384 of the final state (from the sealed header: public by design).
    final_sha384: bytes
    wall_s: float

    @property
    def phases(self) -> dict[str, float]:
        """Per phase, worker 0's seconds. Worker 0 does every phase's whole work (it also
        loads the test set and seals the checkpoints), and taking one worker's figures counts
        each second once: another worker's exchange time includes waiting while worker 0
        seals a checkpoint."""
        keys = ("load_s", "compute_s", "exchange_s", "checkpoint_s")
        return {k: float(self.reports[0]["phases"][k]) for k in keys}


@dataclass
class Training:
    """Workers, their coordinator and the sealed data, ready to run (see :func:`open_training`)."""

    stack: Stack
    config: TrainConfig
    coordinator: Coordinator
    workers: list[EnclaveInfo]
    outputs_dir: Path
    pcr0: bytes
    _generation: int = 0

    def running(self, info: EnclaveInfo) -> bool:
        """Whether ``info``'s enclave (started by this stack's runtime) still runs."""
        sup = self.stack.runtime.supervisor(info.enclave_id)
        return sup is not None and sup.exit_reason is None

    def alive(self) -> list[EnclaveInfo]:
        """Workers whose enclave still runs."""
        return [info for info in self.workers if self.running(info)]

    def checkpoints(self, *, protected: bool = True) -> dict[int, int]:
        """Checkpoints on the host: step -> the file's modification time (ns)."""
        prefix = "" if protected else "plain-"
        found = {}
        for p in self.outputs_dir.glob(f"{prefix}ckpt-*"):
            if m := _CKPT.fullmatch(p.name[len(prefix) :]):
                found[int(m.group(1))] = p.stat().st_mtime_ns
        return found

    def _resume_point(
        self, before: dict[int, int], start_step: int, steps: int, protected: bool
    ) -> int:
        """The newest checkpoint of this run: written since it began (or the one it began
        from), at most ``steps``; a checkpoint another run left behind is not this run's."""
        now = self.checkpoints(protected=protected)
        ours = [
            step
            for step, mtime in now.items()
            if step <= steps and (step == start_step or before.get(step) != mtime)
        ]
        return max(ours, default=0)

    async def run(
        self,
        steps: int,
        *,
        members: Sequence[EnclaveInfo] | None = None,
        start_step: int = 0,
        min_workers: int = 1,
        protected: bool = True,
        timeout_s: float = 600.0,
    ) -> RunResult:
        """Train to ``steps`` steps with ``members`` (default: every live worker), from
        ``start_step`` (its checkpoint must be on the host), resuming after lost members.

        Raises:
            TooFewWorkers: fewer than ``min_workers`` remain after a loss.
            UnprotectedRefused: ``protected=False`` on an image that does not allow it.
            CheckpointError, TrainingError: a worker's typed failure (the message has it).
            trio.TooSlowError: the run did not finish within ``timeout_s``.
        """
        t0 = trio.current_time()
        ring = list(members if members is not None else self.alive())
        before = self.checkpoints(protected=protected)
        resumes: list[dict[str, Any]] = []
        with trio.fail_after(timeout_s):
            while True:
                if len(ring) < max(1, min_workers):
                    raise TooFewWorkers(
                        f"{len(ring)} training worker(s) remain, the run needs {min_workers}"
                    )
                gen = self._plan(ring, start_step, steps, protected)
                failed = await self._wait(gen, ring)
                if not failed:
                    break
                kinds = {f.get("error") for f in gen.failures.values()}
                if not kinds <= set(_RESUMABLE):
                    first = next(
                        f for f in gen.failures.values() if f.get("error") not in _RESUMABLE
                    )
                    cls = _TYPED.get(str(first.get("error")), TrainingError)
                    detail = "; ".join(
                        f"worker {f.get('rank')}: {f.get('error')}: {f.get('detail', '')}"
                        for _, f in sorted(gen.failures.items())
                    )
                    raise cls(f"the training run failed: {detail}")
                ring = [
                    info
                    for rank, info in enumerate(ring)
                    if self.running(info)
                    and gen.failures.get(rank, {}).get("error") not in ("exited", "silent")
                ]
                start_step = self._resume_point(before, start_step, steps, protected)
                resumes.append(
                    {
                        "generation": gen.number,
                        "failures": list(gen.failures.values()),
                        "resumed_from": start_step,
                        "members": len(ring),
                    }
                )
                log.warning(
                    "training_resuming", from_step=start_step, members=len(ring),
                    failures=list(gen.failures.values()),
                )  # fmt: skip
        reports = tuple(gen.results[r] for r in range(len(ring)))
        final = self.outputs_dir / checkpoint_name(steps, protected=protected)
        digest = await trio.to_thread.run_sync(lambda: _sealed_digest(final, protected))
        accuracy = reports[0].get("accuracy")
        return RunResult(
            accuracy=float(accuracy) if accuracy is not None else float("nan"),
            world=len(ring),
            reports=reports,
            resumes=tuple(resumes),
            final_checkpoint=final,
            final_sha384=digest,
            wall_s=trio.current_time() - t0,
        )

    def _plan(
        self, ring: Sequence[EnclaveInfo], start_step: int, steps: int, protected: bool
    ) -> _Generation:
        self._generation += 1
        members = [{"cid": int(i.enclave_cid), "module_id": str(i.enclave_id)} for i in ring]
        plans = {
            str(info.enclave_id): {
                "generation": self._generation,
                "rank": rank,
                "members": members,
                "start_step": start_step,
                "steps": steps,
                "protected": protected,
                "stop": None,
            }
            for rank, info in enumerate(ring)
        }
        gen = _Generation(self._generation, plans)
        self.coordinator.current = gen
        return gen

    async def _wait(self, gen: _Generation, ring: Sequence[EnclaveInfo]) -> bool:
        """Wait for the generation's end; True if it failed. At the first failure (a report,
        or a member's enclave ending) the run is aborted (the survivors' ``status`` polls say
        so) and every member's report awaited, for at most the step timeout: a member still
        silent then counts as lost."""
        grace: float | None = None
        everyone = set(range(len(ring)))
        while True:
            gone = {r for r, info in enumerate(ring) if not self.running(info)}
            if len(gen.results) == len(ring):
                return False
            if (gen.failures or gone) and grace is None:
                gen.aborted = True
                grace = trio.current_time() + self.config.step_timeout_s
            if grace is not None:
                settled = set(gen.failures) | set(gen.results) | gone
                if settled >= everyone or trio.current_time() > grace:
                    for rank in everyone - set(gen.failures) - set(gen.results):
                        lost = "exited" if rank in gone else "silent"
                        gen.failures[rank] = {"rank": rank, "error": lost}
                    return True
            with trio.move_on_after(0.5):  # also polls the enclaves' ends
                await self.coordinator.changed.wait()


def _sealed_digest(path: Path, protected: bool) -> bytes:
    import hashlib

    if not protected:
        return hashlib.sha384(path.read_bytes()).digest()
    from models.sealing import inspect_sealed

    return inspect_sealed(path).model_sha384


@asynccontextmanager
async def open_training(
    stack: Stack,
    workdir: Path,
    *,
    workers: int,
    app_dir: Path = TRAIN_APP_DIR,
    memory_mib: int = WORKER_MEMORY_MIB,
) -> AsyncIterator[Training]:
    """Build, seal and start everything for ``workers`` training enclaves (module docstring).

    The stack's runtime must have room for ``workers`` enclaves
    (:func:`runtime.stack.size_pool_for` before :func:`runtime.stack.open_stack`).

    Raises:
        TrainingError: a bad worker count or training config.
        runtime.errors.NitroCliError: an enclave could not start.
    """
    config = TrainConfig.from_file(Path(app_dir) / "train.toml")
    if not 1 <= workers <= min(config.shards, MAX_WORKERS):
        raise TrainingError(f"--workers must be 1-{config.shards} (the data set's shards)")
    workdir = Path(workdir)
    data_dir = workdir / "data"
    outputs = workdir / "outputs"
    for d in (data_dir, outputs):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, mode=0o700)
    info = await trio.to_thread.run_sync(
        lambda: build_training_image(workdir / "train.eif", app_dir=app_dir)
    )
    pcr0 = bytes(info.pcrs[0])
    key_id = await _create_key(stack, pcr0.hex(), config.key_id)
    dataset = await trio.to_thread.run_sync(make_dataset, config.data)
    parts: dict[str, bytes] = {
        str(s.index): encode_shard(s)
        for s in split_shards(dataset.x_train, dataset.y_train, config.shards)
    }
    from models.training.data import Shard

    parts[TEST_SET] = encode_shard(Shard(-1, 0, dataset.x_test, dataset.y_test))
    store_models = stack.store.models
    sealed_parts = await _seal_as_owner(
        stack, key_id, {shard_name(i): raw for i, raw in parts.items()}, data_dir
    )
    store_models.update(sealed_parts)
    if config.allow_unprotected:  # the benchmark's image: its baseline reads plaintext
        for index, raw in parts.items():
            plain = shard_name(index, protected=False)
            await trio.Path(data_dir / plain).write_bytes(raw)
            store_models[plain] = data_dir / plain
    stack.store.outputs_dir = outputs
    coordinator = Coordinator()
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_coordinator, coordinator, config.coordinator_port)
        rules = [f"{GROUP}={GROUP}:{config.peer_port}"]
        if config.allow_unprotected:
            rules.append(f"{GROUP}={GROUP}:{config.plain_port}")
        await stack.runtime.start_relay(rules)
        started = await stack.runtime.run_replicas(
            workdir / "train.eif", workers, memory_mib=memory_mib, name=GROUP, wait_ready=True
        )
        training = Training(stack, config, coordinator, list(started), outputs, pcr0)
        try:
            yield training
        finally:
            coordinator.stopping = "the host closed the training session"
            with trio.move_on_after(5):  # idle workers poll join every 0.1 s and exit
                for info in training.alive():
                    sup = stack.runtime.supervisor(info.enclave_id)
                    if sup is not None:
                        await sup.wait_exited()
            nursery.cancel_scope.cancel()
