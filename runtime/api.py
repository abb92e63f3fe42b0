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

import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NoReturn

import structlog
import trio

from runtime._unixsock import short_path
from runtime.errors import NitroCliError
from runtime.records import EnclaveInfo, ExitKind, ExitReason, IsolationReport, LaunchSpec
from runtime.state import StateDir
from runtime.supervisor import EnclaveSupervisor, FreshSpawner, ImageCache, Spawner
from transport.paths import default_state_dir

__all__ = [
    "open_runtime",
    "Runtime",
    "EnclaveInfo",
    "ExitReason",
    "ExitKind",
    "IsolationReport",
    "DEFAULT_BOOT_TIMEOUT_S",
    "DEFAULT_TERMINATE_GRACE_S",
    "terminate_via_control",
]

log = structlog.get_logger("runtime.api")

#: Boot (heartbeat + app start) timeout. Nitro allows >= 180 s for real VMs; a sandboxed
#: interpreter that imports the whole stack boots in well under 2 s here.
DEFAULT_BOOT_TIMEOUT_S = 60.0
#: SIGTERM grace before SIGKILL on terminate.
DEFAULT_TERMINATE_GRACE_S = 5.0


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
        #: exit reasons of this runtime's enclaves that are gone (for wait_exited)
        self._exited: dict[str, ExitReason] = {}
        #: every supervisor this runtime started (also after the enclave ended)
        self._all_sups: dict[str, EnclaveSupervisor] = {}

    @property
    def state_dir(self) -> Path:
        return self.state.path

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
    ) -> EnclaveInfo:
        """Start an enclave; returns once its heartbeat arrived and its app started.

        Exactly one of ``cpu_count``/``cpu_ids``. ``cid`` None or 0 picks a free CID.

        Raises:
            NitroCliError: E01/E02 (CPU arguments), E03 (CID), E19/E35 (image), E20-E22
                (CPUs), E26/E27 (memory), E36 (boot failure/timeout, tampered image, strict
                isolation refused). Nothing is left running on error.
        """
        if cpu_count is None and cpu_ids is None:
            raise NitroCliError("E01", "Missing both `cpu-count` and `cpu-ids`")
        if cpu_count is not None and cpu_ids is not None:
            raise NitroCliError("E02", "`cpu-count` and `cpu-ids` cannot be used together")
        if cid is not None and cid != 0 and not 4 <= cid <= 0xFFFFFFFE:
            raise NitroCliError("E03", f"CID {cid} is not a valid enclave CID")
        res = self.state.reserve(
            eif_path=str(eif_path),
            memory_mib=memory_mib,
            cpu_count=cpu_count,
            cpu_ids=cpu_ids,
            cid=cid,
            name=name,
            debug=debug,
            owner_pid=os.getpid(),
        )
        spec = LaunchSpec(
            eif_path=res.eif_path,
            enclave_id=res.enclave_id,
            enclave_name=res.enclave_name,
            cid=res.enclave_cid,
            cpu_ids=res.cpu_ids,
            memory_mib=res.memory_mib,
            debug=debug,
            strict_isolation=self.strict_isolation
            if strict_isolation is None
            else strict_isolation,
            parent_ports=parent_ports,
            peer_cids=peer_cids,
            boot_timeout_s=boot_timeout_s or self.boot_timeout_s,
            terminate_grace_s=self.terminate_grace_s,
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

        self._nursery.start_soon(_forget)
        return info

    def describe(self) -> list[EnclaveInfo]:
        """Running enclaves of this state directory (also those started by other processes)."""
        return [r for r in self.state.records() if r.state in ("RUNNING", "TERMINATING")]

    def supervisor(self, enclave_id: str) -> EnclaveSupervisor | None:
        """The supervisor of an enclave this runtime started (kept after the enclave ended,
        so ``wait_exited``/``exit_reason`` stay available)."""
        return self._all_sups.get(enclave_id)

    async def terminate(self, enclave_id: str) -> ExitReason:
        """Terminate an enclave (graceful, bounded, then killed); returns its exit reason."""
        sup = self._sups.get(enclave_id)
        if sup is not None:
            return await sup.terminate()
        if enclave_id in self._exited:
            return self._exited[enclave_id]
        self.state.find(enclave_id=enclave_id)  # E39 when unknown
        return await terminate_via_control(self.state, enclave_id)

    async def wait_exited(self, enclave_id: str) -> ExitReason:
        """Wait until an enclave started by this runtime is gone; returns why it ended."""
        sup = self._sups.get(enclave_id)
        if sup is None:
            if enclave_id in self._exited:
                return self._exited[enclave_id]
            raise NitroCliError("E39", f"no enclave {enclave_id} is supervised by this runtime")
        return await sup.wait_exited()

    async def console(self, enclave_id: str) -> trio.MemoryReceiveChannel[bytes]:
        """The console bytes of a debug-mode enclave of this runtime (E44 otherwise)."""
        sup = self._sups.get(enclave_id)
        if sup is None:
            raise NitroCliError("E39", f"no enclave {enclave_id} is supervised by this runtime")
        return await sup.console_stream()

    async def aclose(self) -> None:
        """Terminate every enclave this runtime started (concurrently)."""
        async with trio.open_nursery() as n:
            for sup in list(self._sups.values()):
                n.start_soon(sup.terminate)


async def terminate_via_control(state: StateDir, enclave_id: str) -> ExitReason:
    """Ask the supervisor of an enclave (any process) to terminate it, through its socket."""
    path = state.socket_path(enclave_id)
    try:
        with short_path(path) as connectable:
            stream = await trio.open_unix_socket(connectable)
    except OSError as exc:
        raise NitroCliError(
            "E39", f"Failed to connect to the enclave process of {enclave_id}: {exc.strerror}"
        ) from exc
    async with stream:
        await stream.send_all(b'{"op": "terminate"}\n')
        buf = b""
        while b"\n" not in buf and len(buf) < 65536:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buf += chunk
    try:
        reply = json.loads(buf.split(b"\n", 1)[0])
        if reply.get("ok"):
            return ExitReason.from_json(reply["exit_reason"])
        raise NitroCliError(str(reply.get("code", "E39")), str(reply.get("message")))
    except (ValueError, KeyError, TypeError) as exc:
        raise NitroCliError("E39", f"bad reply from the enclave process: {exc}") from exc


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

    Errors: a single exception leaving the block (e.g. a ``NitroCliError`` from
    :meth:`Runtime.run_enclave` not caught inside it) is re-raised as itself, not wrapped in
    the block nursery's ``ExceptionGroup``; several concurrent errors stay grouped.
    """
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
