"""The embedding API: run enclaves from a trio program.

::

    async with open_runtime() as rt:                       # state dir: ENCLAVE_STATE_DIR/default
        info = await rt.run_enclave(Path("server.eif"), cpu_count=1, memory_mib=256)
        ...                                                # info.enclave_cid, info.enclave_id
        await rt.terminate(info.enclave_id)

The ``async with`` block owns a nursery that owns every supervisor it starts (STYLE B7):
leaving the block terminates the enclaves still running (graceful SIGTERM, bounded wait, then
SIGKILL), and cancellation tears them down with SIGKILL; either way no process, socket file,
cgroup or record is left behind. Enclaves started by other processes on the same state
directory (the CLI) are visible in :meth:`Runtime.describe` and can be terminated through
their supervisor's control socket.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Final, NoReturn

import structlog
import trio

from runtime.control import terminate_via_control
from runtime.errors import (
    AppNotReadyError,
    EnclaveSocketError,
    InvalidArgumentError,
)
from runtime.image._cache import ImageCache
from runtime.launch import MAX_BOOT_TIMEOUT_S, LaunchRequest, reserve_launch
from runtime.records import (
    DEFAULT_MAX_TASKS,
    AppStatusRecord,
    EnclaveDescribeInfo,
    EnclaveInfo,
    EnclaveRecord,
    EnclaveRunInfo,
    EnclaveState,
    ExitKind,
    ExitReason,
    ExitReasonRecord,
    IsolationReport,
    RecordError,
)
from runtime.spawners import FreshSpawner, Spawner
from runtime.state import StateDir
from runtime.supervisor import EnclaveSupervisor
from transport.paths import default_state_dir

__all__ = [
    "open_runtime",
    "Runtime",
    "EnclaveInfo",
    "ExitReason",
    "ExitKind",
    "IsolationReport",
    "EnclaveRunInfo",
    "EnclaveDescribeInfo",
    "EnclaveRecord",
    "ExitReasonRecord",
    "AppStatusRecord",
    "RecordError",
    "LaunchRequest",
    "DEFAULT_BOOT_TIMEOUT_S",
    "DEFAULT_TERMINATE_GRACE_S",
    "DEFAULT_READY_TIMEOUT_S",
    "KEEP_ENDED",
    "terminate_via_control",
]

log = structlog.get_logger("runtime.api")

#: Boot (heartbeat + app start) timeout. Nitro allows >= 180 s for real VMs; a sandboxed
#: interpreter that imports the whole stack boots in well under 2 s here.
DEFAULT_BOOT_TIMEOUT_S = 60.0
#: SIGTERM grace before SIGKILL on terminate.
DEFAULT_TERMINATE_GRACE_S = 5.0
#: ``wait_ready``: how long the app may take to report READY after it started (an inference
#: server fetches its model key and unseals its model first).
DEFAULT_READY_TIMEOUT_S = 60.0
#: Ended enclaves a runtime remembers (exit reason, supervisor: console history, app status).
KEEP_ENDED: Final = 64


class Runtime:
    """Handle returned by :func:`open_runtime`; see the module docstring."""

    def __init__(
        self,
        state: StateDir,
        nursery: trio.Nursery,
        *,
        strict_isolation: bool,
        spawner: Spawner,
        boot_timeout_s: float,
        terminate_grace_s: float,
        image_cache: ImageCache | None = None,
    ) -> None:
        self.image_cache = image_cache
        self.state = state
        self._nursery = nursery
        self.strict_isolation = strict_isolation
        self._spawner = spawner
        self.boot_timeout_s = boot_timeout_s
        self.terminate_grace_s = terminate_grace_s
        self._sups: dict[str, EnclaveSupervisor] = {}
        #: exit reasons of this runtime's enclaves that are gone (for wait_exited), oldest
        #: first, at most KEEP_ENDED of them
        self._exited: dict[str, ExitReason] = {}
        #: every supervisor this runtime started (the ended ones: at most KEEP_ENDED)
        self._all_sups: dict[str, EnclaveSupervisor] = {}

    @property
    def state_dir(self) -> Path:
        """The state directory this runtime works on."""
        return self.state.path

    @property
    def running(self) -> int:
        """How many enclaves this runtime started are still alive (starting included)."""
        return len(self._sups)

    async def run_enclave(
        self,
        eif_path: Path | str,
        *,
        cpu_count: int | None = None,
        cpu_ids: Sequence[int] | None = None,
        memory_mib: int,
        cid: int | None = None,
        debug: bool = False,
        name: str | None = None,
        parent_ports: frozenset[int] | None = None,
        peer_cids: frozenset[int] = frozenset(),
        strict_isolation: bool | None = None,
        boot_timeout_s: float | None = None,
        max_tasks: int = DEFAULT_MAX_TASKS,
        wait_ready: bool = False,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    ) -> EnclaveInfo:
        """Start an enclave; returns once its heartbeat arrived and its app started (with
        ``wait_ready``: once the app reported READY on its status port).

        Exactly one of ``cpu_count``/``cpu_ids``. ``cid`` None or 0 picks a free CID.
        ``max_tasks`` bounds the enclave's processes and threads.

        Raises:
            MissingArgumentError, ConflictingArgumentError, InvalidArgumentError: E01/E02/E03,
                argument misuse (all ``ValueError`` subclasses).
            FileOperationError: E19, the image cannot be read.
            InsufficientMemoryRequestedError (E26), MemoryBelowMinimumError (E29),
                InsufficientMemoryAvailableError (E27), CPU errors (E20-E22).
            EifParsingError: E35, not a valid image.
            EnclaveBootError: E36, boot failure or timeout, tampered image, strict isolation
                refused. With ``wait_ready``, its subclasses :class:`AppFailedError` (the
                app's own ``detail``), :class:`AppExitedError` (the exit reason) and
                :class:`AppReadyTimeoutError`; the enclave is terminated first.
            SignatureCheckError: E59, a signed image whose signature does not verify.

        Nothing is left running on error.
        """
        request = LaunchRequest(
            eif_path=str(eif_path),
            memory_mib=memory_mib,
            cpu_count=cpu_count,
            cpu_ids=None if cpu_ids is None else tuple(cpu_ids),
            cid=cid,
            debug=debug,
            name=name,
            strict_isolation=strict_isolation,
            parent_ports=parent_ports,
            peer_cids=peer_cids,
            boot_timeout_s=boot_timeout_s,
            max_tasks=max_tasks,
        )
        return await self.launch(request, wait_ready=wait_ready, ready_timeout_s=ready_timeout_s)

    async def launch(
        self,
        request: LaunchRequest,
        *,
        wait_ready: bool = False,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    ) -> EnclaveInfo:
        """Start the enclave ``request`` describes: the one launch path (the CLI's host
        daemon calls it too). See :meth:`run_enclave` for what it raises."""
        if not 0 < ready_timeout_s <= MAX_BOOT_TIMEOUT_S:
            raise InvalidArgumentError(
                f"`ready-timeout` must be in (0, {MAX_BOOT_TIMEOUT_S:g}] s, got {ready_timeout_s!r}"
            )
        res, spec = await trio.to_thread.run_sync(
            lambda: reserve_launch(
                self.state,
                request,
                owner_pid=os.getpid(),
                strict_isolation=self.strict_isolation,
                boot_timeout_s=self.boot_timeout_s,
                terminate_grace_s=self.terminate_grace_s,
            )
        )
        sup = EnclaveSupervisor(
            self.state, res, spec, spawner=self._spawner, image_cache=self.image_cache
        )
        self._sups[res.enclave_id] = sup
        self._all_sups[res.enclave_id] = sup
        try:
            info: EnclaveInfo = await self._nursery.start(sup.run)
        except BaseException:
            self._sups.pop(res.enclave_id, None)
            self._all_sups.pop(res.enclave_id, None)
            self.state.remove_record(res.enclave_id)
            raise

        async def _forget() -> None:
            reason = await sup.wait_exited()
            self._sups.pop(res.enclave_id, None)
            self._exited[res.enclave_id] = reason
            self._trim_ended()

        self._nursery.start_soon(_forget)
        if wait_ready:
            try:
                await sup.wait_app_ready(ready_timeout_s)
            except AppNotReadyError:
                with trio.CancelScope(shield=True):
                    await sup.terminate()
                raise
            except BaseException:  # cancelled while waiting: nothing is left running
                with trio.CancelScope(shield=True):
                    await sup.terminate()
                raise
            info = sup.info
        return info

    async def run_replicas(
        self,
        eif_path: Path | str,
        count: int,
        *,
        cpu_count: int | None = None,
        memory_mib: int,
        name: str | None = None,
        debug: bool = False,
        parent_ports: frozenset[int] | None = None,
        strict_isolation: bool | None = None,
        boot_timeout_s: float | None = None,
        max_tasks: int = DEFAULT_MAX_TASKS,
        wait_ready: bool = False,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    ) -> list[EnclaveInfo]:
        """Start ``count`` replicas of one image (:mod:`runtime.replicas`): each its own CID
        and module id, all the same PCR0/1/2, named ``name``, ``name_1``, ``name_2``... (the
        group ``name``; default: the EIF's base name). Each gets ``cpu_count`` CPUs of the
        pool (default 1).

        Raises:
            InvalidArgumentError: E03, ``count`` out of range.
            NitroCliError: as :meth:`run_enclave`; replicas already started are terminated.
        """
        from runtime.replicas import start_replicas

        request = LaunchRequest(
            eif_path=str(eif_path),
            memory_mib=memory_mib,
            cpu_count=1 if cpu_count is None else cpu_count,
            debug=debug,
            name=name,
            strict_isolation=strict_isolation,
            parent_ports=parent_ports,
            boot_timeout_s=boot_timeout_s,
            max_tasks=max_tasks,
        )
        return await start_replicas(
            self, request, count, wait_ready=wait_ready, ready_timeout_s=ready_timeout_s
        )

    async def start_relay(
        self,
        rules: Sequence[str],
        *,
        port: int | None = None,
        fabric_dir: Path | None = None,
    ) -> int:
        """Start the enclave-to-enclave relay on ``(3, port)`` for this state directory's
        enclaves (:mod:`runtime.relay`), with ``rules`` (``FROM=TO:PORT``) as its allowlist.
        It runs until the runtime closes. Returns the port.

        Raises:
            ConfigurationError: a malformed rule.
            VsockAddressInUse: the port is taken.
        """
        from runtime.relay import serve_relay
        from transport.peers import DEFAULT_RELAY_PORT, RelayPolicy

        RelayPolicy(rules)  # malformed rules raise here, in the caller's task
        relay_port: int = await self._nursery.start(
            partial(
                serve_relay,
                self.state,
                rules,
                port=DEFAULT_RELAY_PORT if port is None else port,
                fabric_dir=fabric_dir,
            )
        )
        return relay_port

    def _trim_ended(self) -> None:
        """Keep at most :data:`KEEP_ENDED` ended enclaves' supervisors and exit reasons (a
        long-lived runtime, such as the host daemon, must not grow without bound)."""
        while len(self._exited) > KEEP_ENDED:
            oldest = next(iter(self._exited))
            del self._exited[oldest]
            if oldest not in self._sups:
                self._all_sups.pop(oldest, None)

    def describe(self) -> list[EnclaveInfo]:
        """Running enclaves of this state directory (also those started by other processes)."""
        return [
            r
            for r in self.state.records()
            if r.state in (EnclaveState.RUNNING, EnclaveState.TERMINATING)
        ]

    def supervisor(self, enclave_id: str) -> EnclaveSupervisor | None:
        """The supervisor of an enclave this runtime started (kept a while after the enclave
        ended, so ``wait_exited``/``exit_reason``/``app_status`` stay available)."""
        return self._all_sups.get(enclave_id)

    async def terminate(self, enclave_id: str) -> ExitReason:
        """Terminate an enclave (graceful, bounded, then killed); returns its exit reason.

        Raises:
            EnclaveSocketError: E11, no enclave has this id.
            EnclaveProcessConnectionError: E39, its owner (another process) is unreachable.
        """
        sup = self._sups.get(enclave_id)
        if sup is not None:
            return await sup.terminate()
        if enclave_id in self._exited:
            return self._exited[enclave_id]
        self.state.find(enclave_id=enclave_id)  # E11 when unknown
        return await terminate_via_control(self.state, enclave_id)

    async def wait_exited(self, enclave_id: str) -> ExitReason:
        """Wait until an enclave started by this runtime is gone; returns why it ended.

        Raises:
            EnclaveSocketError: E11, this runtime started no enclave with this id.
        """
        sup = self._sups.get(enclave_id)
        if sup is None:
            if enclave_id in self._exited:
                return self._exited[enclave_id]
            raise EnclaveSocketError(f"no enclave {enclave_id} is supervised by this runtime")
        return await sup.wait_exited()

    async def console(self, enclave_id: str) -> trio.MemoryReceiveChannel[bytes]:
        """The console of a debug-mode enclave this runtime started: everything its app wrote
        to stdout and stderr since it started (the last :data:`CONSOLE_HISTORY_BYTES` of it),
        then live output; the channel closes when the enclave has ended. Works for an enclave
        that already ended, while the runtime still remembers it.

        Usage::

            async with await rt.console(info.enclave_id) as console:
                async for chunk in console:
                    sys.stdout.buffer.write(chunk)

        Returns:
            A receive channel of byte chunks (close it when done; a reader that falls more
            than 256 chunks behind is dropped and sees the end early).

        Raises:
            EnclaveSocketError: E11, this runtime started no enclave with this id.
            ConsoleConnectionError: E44, the enclave is not in debug mode (as on Nitro).
        """
        sup = self._all_sups.get(enclave_id)
        if sup is None:
            raise EnclaveSocketError(f"no enclave {enclave_id} is supervised by this runtime")
        return await sup.console_stream()

    async def aclose(self) -> None:
        """Terminate every enclave this runtime started (concurrently)."""
        async with trio.open_nursery() as n:
            for sup in list(self._sups.values()):
                n.start_soon(sup.terminate)


@asynccontextmanager
async def open_runtime(
    state_dir: Path | None = None,
    *,
    strict_isolation: bool = False,
    zygote: bool = True,
    boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S,
    terminate_grace_s: float = DEFAULT_TERMINATE_GRACE_S,
) -> AsyncIterator[Runtime]:
    """Open a runtime on ``state_dir`` (default: ``ENCLAVE_STATE_DIR`` or the per-user one).

    Args:
        strict_isolation: refuse to start an enclave when any sandbox layer is missing.
        zygote: start enclaves by forking a pre-imported zygote of the image's bootstrap
            (one per bootstrap digest, owned by this runtime); False: fresh interpreter.
        boot_timeout_s: heartbeat + app start deadline (E36 after it).
        terminate_grace_s: SIGTERM grace before SIGKILL.

    Resource handling: every enclave and zygote started here belongs to this block.

    Logging: the runtime logs with structlog, never to stdout. If the embedding process has
    not configured structlog, this configures it (once, for the process) to write to stderr
    at the level of ``ENCLAVE_LOG_LEVEL`` (default ``info``), as the ``enclave`` CLI does.

    Errors: a single exception leaving the block (e.g. a ``NitroCliError`` from
    :meth:`Runtime.run_enclave` not caught inside it) is re-raised as itself, not wrapped in
    the block nursery's ``ExceptionGroup``; several concurrent errors stay grouped.
    """
    _ensure_logging()
    state = StateDir(Path(state_dir) if state_dir is not None else default_state_dir())
    try:
        async with _open_runtime(
            state,
            strict_isolation=strict_isolation,
            zygote=zygote,
            boot_timeout_s=boot_timeout_s,
            terminate_grace_s=terminate_grace_s,
        ) as rt:
            yield rt
    except BaseExceptionGroup as eg:
        # The block's nursery wraps whatever escapes the block (strict exception groups). A
        # single error -- typically a NitroCliError from run_enclave that the caller did not
        # catch inside the block -- is re-raised as itself, so callers (and the CLI) can
        # catch the typed error; several concurrent errors stay grouped.
        lone = _lone_error(eg)
        if lone is None:
            raise
        _reraise(lone)


def _ensure_logging() -> None:
    """structlog's unconfigured default prints to stdout; an embedding service that never
    configured it must not get runtime logs mixed into its own stdout."""
    if not structlog.is_configured():
        from transport.logs import configure_logging

        configure_logging()


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def _lone_error(eg: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one member of ``eg`` that is not a cancellation (returned as is, even when it is
    a group the block raised itself), or None when there are several (or none)."""
    errors = [e for e in eg.exceptions if not _only_cancelled(e)]
    if len(errors) != 1:
        return None
    return errors[0]


def _reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` keeping its own cause/context (not the group it was unwrapped from)."""
    context, cause, suppress = exc.__context__, exc.__cause__, exc.__suppress_context__
    try:
        raise exc
    finally:
        exc.__context__, exc.__cause__ = context, cause
        exc.__suppress_context__ = suppress
        del exc, context, cause


@asynccontextmanager
async def _open_runtime(
    state: StateDir,
    *,
    strict_isolation: bool,
    zygote: bool,
    boot_timeout_s: float,
    terminate_grace_s: float,
) -> AsyncIterator[Runtime]:
    zyg = None
    cache: ImageCache | None = None
    try:
        async with trio.open_nursery() as nursery:
            spawner: Spawner
            if zygote:
                from runtime.zygote import ZygotePool

                zyg = ZygotePool(state, nursery)
                spawner = zyg
            else:
                spawner = FreshSpawner()
            cache = ImageCache(state.path / "images" / f"rt-{os.getpid()}-{id(nursery):x}")
            rt = Runtime(
                state,
                nursery,
                strict_isolation=strict_isolation,
                spawner=spawner,
                boot_timeout_s=boot_timeout_s,
                terminate_grace_s=terminate_grace_s,
                image_cache=cache,
            )
            try:
                yield rt
                await rt.aclose()
            finally:
                # supervisors still running tear their enclaves down (shielded, bounded)
                nursery.cancel_scope.cancel()
    finally:
        # zygotes last: their forked relays die with them (PDEATHSIG)
        if zyg is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await zyg.aclose()
        if cache is not None:
            cache.clear()
