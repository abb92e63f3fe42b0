"""The training worker: what the training image runs inside each enclave (``python -m
models.training``).

Life of a worker:

1. read the measured ``train.toml``; open the NSM; build the peer identity (attester, and a
   verifier for "same PCR0, not debug": :func:`attest.peer.enclave_peer_identity`);
2. serve ring links on ``peer_port`` (mutually attested channels, ``serve_peer_channels``;
   with ``allow_unprotected`` only, plaintext vsock on ``plain_port`` too), report READY;
3. ask the host's coordinator for a plan (``join``), until it says stop; for each plan:

   * **form the ring**: open a channel to the right neighbour through the parent's relay (it
     must be the member the plan names: its verified module id), accept the left one's; both
     send a hello (the plan's digest and their rank), which the other checks;
   * **load**: fetch the owned shards from the host store and unseal them (the data key is
     released by KMS through Recipient to this image only); worker 0 the test set too; a
     resumed plan fetches and unseals the checkpoint it names;
   * **steps**: gradient on the owned part of the global batch, ring all-reduce, SGD; every
     ``checkpoint_every`` steps and at the end, worker 0 seals the state under the image's key
     and puts it on the host;
   * report the result (accuracy, phase times) to the coordinator. A lost member aborts the
     step (nothing of it is applied): the worker reports ``failed`` and asks for a new plan.

Nothing secret reaches the host: shards, gradients and weights exist in plaintext only inside
the workers; the host sees sealed files, the relay sees channel records, the coordinator sees
accuracy, timings and error kinds.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import structlog
import trio

from models.errors import ModelError
from models.sealing import DataKeyDecrypter
from models.training.allreduce import ring_allreduce
from models.training.checkpoint import checkpoint_name, decode_checkpoint, encode_checkpoint
from models.training.config import TrainConfig
from models.training.data import MAX_SHARD_BYTES, Shard, decode_shard, owned_shards
from models.training.errors import (
    CheckpointError,
    MemberLost,
    RingProtocolError,
    RunAborted,
    TrainingError,
    UnprotectedRefused,
)
from models.training.mlp import LocalData, Mlp
from models.training.plan import Plan

if TYPE_CHECKING:
    from attest.peer import PeerIdentity
    from kms.client import AttestedKmsClient
    from models.enclave_seal import OutputSealer
    from models.store import StoreClient
    from transport.rpc import RpcClient

__all__ = ["main", "run_worker", "SHARD_CONTENT", "DATASET_CONTEXT_KEY", "shard_name", "TEST_SET"]

log = structlog.get_logger()

#: The content marker of a sealed training shard in its encryption context.
SHARD_CONTENT: Final = "training-data"
#: The encryption-context key naming the data set its shards belong to (one data key for all).
DATASET_CONTEXT_KEY: Final = "enclave-runtime:dataset"
#: The host-store name of the test set (a shard of its own).
TEST_SET: Final = "test"
#: The ring hello: the plan's digest and the sender's rank.
_HELLO: Final = struct.Struct(">32sI")
#: Pause between two ``join`` polls while the host has no plan (seconds).
_POLL_S: Final = 0.1
#: Pause between two ``status`` polls during a run (seconds): how soon a worker stuck on a lost
#: neighbour learns that the host aborted the run.
_STATUS_POLL_S: Final = 0.25


def shard_name(index: int | str, *, protected: bool = True) -> str:
    """The host-store name of shard ``index`` (or of the test set)."""
    return f"{'shard' if protected else 'plain-shard'}-{index}"


@dataclass
class Phases:
    """Seconds spent per phase in one run (this worker)."""

    load_s: float = 0.0
    compute_s: float = 0.0
    exchange_s: float = 0.0
    checkpoint_s: float = 0.0
    #: Of ``load_s``: waiting for KMS to release the data set's key.
    key_release_s: float = 0.0
    #: Of ``load_s``: forming the ring (relayed connections, attested handshakes, hellos).
    ring_s: float = 0.0
    exchanged_bytes: int = 0

    def to_json(self) -> dict[str, float | int]:
        return dict(self.__dict__)


@dataclass
class _Inbound:
    """Links from left neighbours, as they arrive (held open until their run ends)."""

    send: trio.MemorySendChannel[tuple[bytes, trio.abc.Stream, str | None, trio.Event]]
    receive: trio.MemoryReceiveChannel[tuple[bytes, trio.abc.Stream, str | None, trio.Event]]
    released: list[trio.Event] = field(default_factory=list)


async def _receive_exact(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = await stream.receive_some(n - len(data))
        if not piece:
            raise MemberLost("a neighbour closed its link during the ring hello")
        data += piece
    return data


class _RunKeys:
    """Data keys released during one run, by their KMS ciphertext: the shards of a data set
    share one data key (each has its own file key), so the run asks KMS once. Concurrent
    loads of shards under one key wait for the first release instead of each asking. Dropped
    with the run."""

    def __init__(self, kms: DataKeyDecrypter) -> None:
        self._kms = kms
        self._keys: dict[bytes, bytes] = {}
        self._locks: dict[bytes, trio.Lock] = {}
        #: Seconds spent waiting for KMS (part of the load phase).
        self.waited_s = 0.0

    async def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> bytes:
        lock = self._locks.setdefault(ciphertext_blob, trio.Lock())
        async with lock:
            if ciphertext_blob not in self._keys:
                t0 = time.perf_counter()
                self._keys[ciphertext_blob] = await self._kms.decrypt(
                    ciphertext_blob, key_id=key_id, encryption_context=encryption_context
                )
                self.waited_s += time.perf_counter() - t0
        return self._keys[ciphertext_blob]


class Worker:
    """One enclave's worker (see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        identity: PeerIdentity,
        store: StoreClient,
        kms: AttestedKmsClient,
        coordinator: RpcClient,
    ) -> None:
        self.config = config
        self.identity = identity
        self.store = store
        self.kms = kms
        self.coordinator = coordinator
        send, receive = trio.open_memory_channel[
            tuple[bytes, trio.abc.Stream, str | None, trio.Event]
        ](16)
        self.inbound = _Inbound(send, receive)
        self._sealer: OutputSealer | None = None
        self._sealer_generation = -1

    # --- links -------------------------------------------------------------------------------

    async def _take_link(self, stream: trio.abc.Stream, peer: str | None) -> None:
        """A left neighbour connected: read its hello, queue the link, hold it for the run."""
        hello = b""
        with trio.move_on_after(self.config.ring_timeout_s):
            try:
                hello = await _receive_exact(stream, _HELLO.size)
            except MemberLost:
                hello = b""
        if len(hello) != _HELLO.size:
            log.info("ring_link_refused", reason="no hello in time", peer=peer)
            return
        released = trio.Event()
        await self.inbound.send.send((hello, stream, peer, released))
        await released.wait()

    async def serve_links(self, nursery: trio.Nursery) -> None:
        from transport.peers import serve_peer_channels

        async def attested(channel: Any) -> None:
            await self._take_link(channel, channel.peer.module_id)

        await nursery.start(
            lambda task_status: serve_peer_channels(
                self.config.peer_port,
                attested,
                attester=self.identity.attester,
                peer_verifier=self.identity.verifier,
                task_status=task_status,
            )
        )
        if self.config.allow_unprotected:
            from transport.vsock import open_vsock_listener

            listener = await open_vsock_listener(self.config.plain_port)

            async def plain(stream: trio.abc.Stream) -> None:
                async with stream:
                    await self._take_link(stream, None)

            nursery.start_soon(trio.serve_listeners, plain, [listener])

    async def _connect_right(self, plan: Plan) -> trio.abc.Stream:
        from transport.errors import PeerUnreachable
        from transport.peers import open_peer_channel, open_relayed_stream

        right = plan.members[(plan.rank + 1) % plan.world]
        deadline = trio.current_time() + self.config.ring_timeout_s
        while True:
            try:
                if plan.protected:
                    channel = await open_peer_channel(
                        right.cid,
                        self.config.peer_port,
                        verifier=self.identity.verifier,
                        attester=self.identity.attester,
                    )
                    if channel.peer is None or channel.peer.module_id != right.module_id:
                        await channel.aclose()
                        raise RingProtocolError(
                            f"CID {right.cid} attested as another enclave than the plan names"
                        )
                    stream: trio.abc.Stream = channel
                else:
                    stream, _cid = await open_relayed_stream(right.cid, self.config.plain_port)
                break
            except PeerUnreachable:  # not listening yet: it is still starting its links
                if trio.current_time() > deadline:
                    raise MemberLost(
                        f"the right neighbour (CID {right.cid}) never answered"
                    ) from None
                await trio.sleep(0.2)
        await stream.send_all(_HELLO.pack(plan.digest(), plan.rank))
        return stream

    async def _accept_left(self, plan: Plan) -> tuple[trio.abc.Stream, trio.Event]:
        left = plan.members[(plan.rank - 1) % plan.world]
        want = _HELLO.pack(plan.digest(), (plan.rank - 1) % plan.world)
        with trio.move_on_after(self.config.ring_timeout_s):
            while True:
                hello, stream, peer, released = await self.inbound.receive.receive()
                if hello != want:  # a link of an older run, or of a confused member
                    log.info("ring_link_refused", reason="another plan or rank", peer=peer)
                    released.set()
                    continue
                if plan.protected and peer != left.module_id:
                    log.info("ring_link_refused", reason="not the plan's left member", peer=peer)
                    released.set()
                    continue
                return stream, released
        raise MemberLost(f"the left neighbour (CID {left.cid}) never connected")

    # --- data ------------------------------------------------------------------------------

    async def _fetch_checkpoint(self, name: str, protected: bool) -> bytes | bytearray:
        """A checkpoint from the host: unsealed (only this image's enclaves get its key), or
        as it is in the baseline."""
        from models.enclave_seal import unseal_output

        if not protected:
            return await self.store.fetch(name)
        async with self.store.open_fetch(name) as pieces:
            return await unseal_output(pieces, kms=self.kms, name=name)

    async def _fetch_shard(self, name: str, keys: _RunKeys) -> bytearray:
        """Fetch and unseal a shard, its key release overlapping the transfer: the header
        (the first bytes) names the data key, whose release starts at once while the rest
        of the file keeps arriving (held until the key is there, at most one sealed shard:
        the store's size is bounded); then every piece is unsealed as it comes."""
        from models import sealed
        from models.sealing import CONTENT_CONTEXT_KEY

        unsealer = sealed.Unsealer()
        held: list[bytes | memoryview] = []
        released = trio.Event()
        key: list[bytes] = []

        async def release(header: sealed.SealedHeader) -> None:
            key.append(
                await keys.decrypt(
                    header.encrypted_data_key,
                    key_id=header.key_id,
                    encryption_context=header.encryption_context,
                )
            )
            released.set()

        def check(header: sealed.SealedHeader) -> None:
            if header.model_name != name:
                raise TrainingError(f"the host sent {header.model_name!r} for {name!r}")
            if header.encryption_context.get(CONTENT_CONTEXT_KEY) != SHARD_CONTENT:
                raise TrainingError(f"{name!r} is not a sealed training shard")

        try:
            async with (
                trio.open_nursery() as nursery,
                self.store.open_fetch(name, max_size=MAX_SHARD_BYTES + (1 << 20)) as pieces,
            ):
                async for piece in pieces:
                    if unsealer.header is None:
                        rest = unsealer.feed_header(piece)
                        if rest is None:
                            continue
                        assert unsealer.header is not None
                        check(unsealer.header)
                        nursery.start_soon(release, unsealer.header)
                        piece = bytes(rest)
                    if not released.is_set():
                        held.append(piece)
                        continue
                    if held:
                        await self._start_unseal(unsealer, key, held)
                    unsealer.feed(piece)
                    await trio.lowlevel.checkpoint()
                if unsealer.header is None:
                    raise TrainingError(f"the host sent a truncated {name!r}")
                await released.wait()
                await self._start_unseal(unsealer, key, held)
            return unsealer.finish()[1]
        except BaseException:
            unsealer.abort()
            raise

    @staticmethod
    async def _start_unseal(
        unsealer: Any, key: list[bytes], held: list[bytes | memoryview]
    ) -> None:
        """Start unsealing once (the key is there), then feed what was held meanwhile."""
        if key:
            unsealer.start(key.pop())
        for piece in held:
            unsealer.feed(piece)
            await trio.lowlevel.checkpoint()
        held.clear()

    async def _load_shard(self, index: int | str, protected: bool, keys: _RunKeys) -> Shard:
        name = shard_name(index, protected=protected)
        raw: bytes | bytearray
        raw = await self._fetch_shard(name, keys) if protected else await self.store.fetch(name)
        data = self.config.data
        return await trio.to_thread.run_sync(
            lambda: decode_shard(raw, features=data.features, classes=data.classes)
        )

    async def _load(self, plan: Plan, phases: Phases) -> tuple[Mlp, LocalData, Shard | None]:
        config = self.config
        wanted: list[int | str] = list(owned_shards(plan.rank, plan.world, config.shards))
        if plan.rank == 0:
            wanted.append(TEST_SET)
        loaded: dict[int | str, Shard] = {}
        keys = _RunKeys(self.kms)

        async def load(index: int | str) -> None:
            loaded[index] = await self._load_shard(index, plan.protected, keys)

        # Concurrently: each shard's fetch overlaps the others' unsealing (one key release).
        async with trio.open_nursery() as nursery:
            for index in wanted:
                nursery.start_soon(load, index)
        shards = [loaded[i] for i in wanted if i != TEST_SET]
        test = loaded.get(TEST_SET)
        model = Mlp.initial(config.sizes, config.data.seed)
        if plan.start_step:
            name = checkpoint_name(plan.start_step, protected=plan.protected)
            raw = await self._fetch_checkpoint(name, plan.protected)
            ckpt = decode_checkpoint(raw, fingerprint=config.fingerprint(), size=len(model.params))
            if ckpt.step != plan.start_step:
                raise CheckpointError(
                    f"checkpoint {name!r} holds step {ckpt.step}, not {plan.start_step}"
                )
            model.params[...] = ckpt.params
        phases.key_release_s = keys.waited_s
        return model, LocalData(shards), test

    async def _checkpoint(self, plan: Plan, model: Mlp, step: int) -> None:
        from models.enclave_seal import OutputSealer

        name = checkpoint_name(step, protected=plan.protected)
        data = encode_checkpoint(step, model.params, self.config.fingerprint())
        if plan.protected:
            if self._sealer is None or self._sealer_generation != plan.generation:
                # The run's checkpoint data key: one KMS call per run, at its first checkpoint.
                self._sealer = await OutputSealer.open(
                    kms=self.kms,
                    key_id=self.config.key_id,
                    series=f"checkpoints-{plan.generation}",
                )
                self._sealer_generation = plan.generation
            data = await self._sealer.seal(data, name=name)
        await self.store.put(name, data)

    # --- one run -----------------------------------------------------------------------------

    async def run_plan(self, plan: Plan) -> dict[str, Any]:
        """Load, form the ring, train; return the result report."""
        from models.training.data import batch_indices

        config = self.config
        if not plan.protected and not config.allow_unprotected:
            raise UnprotectedRefused(
                "this image trains only on sealed data over attested links (the unprotected "
                "baseline is reachable from `enclave bench training` only)"
            )
        phases = Phases()
        t0 = time.perf_counter()
        released: trio.Event | None = None
        right: trio.abc.Stream | None = None
        left: trio.abc.Stream | None = None
        try:
            if plan.world > 1:
                t_ring = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    got: dict[str, Any] = {}

                    async def connect() -> None:
                        got["right"] = await self._connect_right(plan)

                    async def accept() -> None:
                        got["left"], got["released"] = await self._accept_left(plan)

                    nursery.start_soon(connect)
                    nursery.start_soon(accept)
                right, left, released = got["right"], got["left"], got["released"]
                # Forming the links is part of the exchange's cost (attested handshakes).
                phases.ring_s = time.perf_counter() - t_ring
                phases.exchange_s += phases.ring_s
            # The ring first: no member asks KMS for the data before every member has
            # verified its neighbours.
            t_load = time.perf_counter()
            model, local, test = await self._load(plan, phases)
            phases.load_s = time.perf_counter() - t_load
            grad = np.empty_like(model.params)
            d = config.data
            for step in range(plan.start_step, plan.steps):
                t = time.perf_counter()
                idx = batch_indices(d.seed, step, d.train, config.batch)
                x, y = local.select(idx)
                model.gradient(x, y, config.batch, grad)
                t1 = time.perf_counter()
                if right is not None and left is not None:
                    stats = await ring_allreduce(
                        grad,
                        rank=plan.rank,
                        world=plan.world,
                        send=right,
                        receive=left,
                        round_id=step,
                        timeout_s=config.step_timeout_s,
                        chunk_bytes=config.chunk_bytes,
                    )
                    phases.exchanged_bytes += stats.sent
                t2 = time.perf_counter()
                model.sgd(grad, config.lr)
                t3 = time.perf_counter()
                phases.compute_s += (t1 - t) + (t3 - t2)
                phases.exchange_s += t2 - t1
                done = step + 1
                if plan.rank == 0 and (done % config.checkpoint_every == 0 or done == plan.steps):
                    await self._checkpoint(plan, model, done)
                    phases.checkpoint_s += time.perf_counter() - t3
        except BaseExceptionGroup as group:
            leaf = _first_typed(group)
            if leaf is None:
                raise
            raise leaf from None
        finally:
            if right is not None:
                await trio.aclose_forcefully(right)
            if released is not None:
                released.set()
        accuracy = model.accuracy(test.x, test.y) if test is not None else None
        return {
            "rank": plan.rank,
            "generation": plan.generation,
            "steps": plan.steps,
            "accuracy": accuracy,
            "phases": phases.to_json(),
            "wall_s": time.perf_counter() - t0,
        }

    async def _run_watched(self, plan: Plan) -> dict[str, Any]:
        """:meth:`run_plan`, cancelled if the host aborts the run meanwhile."""
        result: dict[str, Any] | None = None

        async def watch(scope: trio.CancelScope) -> None:
            while True:
                await trio.sleep(_STATUS_POLL_S)
                status = await self.coordinator.call("status", {"generation": plan.generation})
                if not isinstance(status, dict) or status.get("aborted") is not False:
                    scope.cancel()
                    return

        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch, scope)
                    result = await self.run_plan(plan)
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            leaf = _first_typed(group)
            if leaf is None:
                raise
            raise leaf from None
        if result is None:
            raise RunAborted(f"the host aborted run {plan.generation}")
        return result

    async def serve(self) -> int:
        """Ask for plans until the host says stop; returns an exit status."""
        while True:
            raw = await self.coordinator.call("join", {"module_id": self.identity.module_id})
            if raw is None:
                await trio.sleep(_POLL_S)
                continue
            plan = Plan.from_json(raw, shards=self.config.shards)
            if plan.stop is not None:
                log.info("training_stopped", reason=plan.stop)
                return 0
            try:
                result = await self._run_watched(plan)
            except (TrainingError, ModelError) as exc:
                log.warning("training_run_failed", error=type(exc).__name__, detail=str(exc))
                await self.coordinator.call(
                    "failed",
                    {
                        "generation": plan.generation,
                        "rank": plan.rank,
                        "error": type(exc).__name__,
                        "detail": str(exc)[:300],
                    },
                )
                continue
            except Exception as exc:  # a KMS refusal, a store failure: reported, not fatal
                log.warning("training_run_failed", error=type(exc).__name__, detail=str(exc))
                await self.coordinator.call(
                    "failed",
                    {
                        "generation": plan.generation,
                        "rank": plan.rank,
                        "error": type(exc).__name__,
                        "detail": " ".join(str(exc).split())[:300],
                    },
                )
                continue
            await self.coordinator.call("result", result)


def _first_typed(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        elif isinstance(exc, Exception):
            return exc
    return None


@asynccontextmanager
async def _rpc_to_parent(port: int) -> AsyncIterator[RpcClient]:
    from transport.rpc import open_rpc_client
    from transport.vsock import VMADDR_CID_PARENT, VsockAddr, open_vsock_stream

    stream = await open_vsock_stream(VsockAddr(VMADDR_CID_PARENT, port))
    async with stream, open_rpc_client(stream) as rpc:
        yield rpc


async def run_worker(config: TrainConfig) -> int:
    """The worker's whole life in the enclave (see the module docstring)."""
    from attest.nsm.client import NsmClient
    from attest.peer import enclave_peer_identity
    from kms.client import AttestedKmsClient, Credentials, KmsClient
    from models.store import StoreClient
    from transport.app_status import AppState, AppStatus, report_app_status
    from transport.vsock import VMADDR_CID_PARENT, VsockAddr

    nsm = await NsmClient.open()
    identity = await enclave_peer_identity(nsm)
    async with (
        _rpc_to_parent(config.host_port) as store_rpc,
        _rpc_to_parent(config.coordinator_port) as coordinator,
    ):
        store = StoreClient(store_rpc)
        creds = await store.credentials()
        kms = AttestedKmsClient(
            KmsClient(
                vsock=VsockAddr(VMADDR_CID_PARENT, config.kms_proxy_port),
                credentials=Credentials(
                    creds.access_key_id, creds.secret_access_key, creds.session_token
                ),
                region=creds.region,
            ),
            nsm,
        )
        kms.prepare()
        worker = Worker(config, identity, store, kms, coordinator)
        try:
            async with trio.open_nursery() as nursery:
                await worker.serve_links(nursery)
                await report_app_status(
                    AppStatus(AppState.READY, "training worker", (config.peer_port,))
                )
                status = await worker.serve()
                nursery.cancel_scope.cancel()
        finally:
            await kms.aclose()
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point inside the enclave: ``python -m models.training [--config train.toml]``."""
    from transport.logs import configure_logging

    parser = argparse.ArgumentParser(prog="models.training", allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=Path("train.toml"))
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = TrainConfig.from_file(args.config)
    except TrainingError as exc:
        log.error("training_config_refused", detail=str(exc))
        return 2
    return trio.run(run_worker, config)


if __name__ == "__main__":
    sys.exit(main())
