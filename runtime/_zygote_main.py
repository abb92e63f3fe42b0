"""The zygote process (``python -P runtime/_zygote_main.py``): see :mod:`runtime.zygote`.

Only the standard library is imported at module level: ``runtime`` on this process's
``sys.path`` is the measured bootstrap's stub package, not the host runtime.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the type checker only: at run time ``runtime`` is the bootstrap's stub
    from runtime.sandbox import ForkRequest

#: Modules the zygote imports before serving (missing ones are skipped).
PREIMPORT = (
    "trio", "numpy", "onnxruntime", "msgpack", "cryptography",
    "cryptography.hazmat.primitives.ciphers.aead", "cryptography.hazmat.primitives.hashes",
    "cryptography.hazmat.primitives.asymmetric.ec", "cryptography.hazmat.primitives.asymmetric.rsa",
    "cryptography.hazmat.primitives.asymmetric.x25519", "cryptography.hazmat.primitives.hpke",
    "cryptography.hazmat.primitives.serialization", "cryptography.x509", "cbor2", "structlog",
    "h11", "yaml",
    # enclave-side packages, from the verified bootstrap on sys.path
    "transport", "transport.vsock", "transport.fabric.enclave", "transport.channel",
    "transport.rpc", "attest", "attest.nsm.client", "attest.channel", "kms", "kms.client",
    "models", "models.server", "runtime.enclave_init",
    "transport.blocking",  # init's boot handshake (imported lazily there, eagerly here)
)  # fmt: skip
#: Largest fork request (JSON: env + sandbox parameters).
MAX_REQUEST = 1 << 20
#: fds per request: fabric, nsm, init, [console].
MAX_FDS = 4


def _load_host_sandbox(path: str) -> Any:
    """Load runtime/sandbox from the runtime's tree under a private name (see docstring)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_enclave_host_sandbox",
        os.path.join(path, "__init__.py"),
        submodule_search_locations=[path],
    )
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_enclave_host_sandbox"] = mod
    spec.loader.exec_module(mod)
    return mod


def serve(sock_path: str, bootstrap: str, sandbox_path: str) -> None:  # pragma: no cover
    """The zygote's main loop (runs in the zygote process)."""
    import importlib

    # Not PR_SET_PDEATHSIG: it fires when the *thread* that forked us exits, and trio starts
    # subprocesses from worker threads that it retires after a few idle seconds. Poll the
    # parent instead (the accept loop wakes every 0.5 s).
    parent = os.getppid()
    sb = _load_host_sandbox(sandbox_path)
    for name in PREIMPORT:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    threads = len(os.listdir("/proc/self/task"))
    _refresh_bootstrap_modules(bootstrap)
    import gc

    # Move every pre-imported object to the permanent generation: collections in a forked
    # enclave then never walk (and so never copy-on-write) the zygote's pages.
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    old = os.umask(0o177)
    if len(sock_path.encode()) > 107:  # sun_path limit: bind through /proc/self/fd
        dfd = os.open(os.path.dirname(sock_path), os.O_PATH | os.O_DIRECTORY)
        listener.bind(f"/proc/self/fd/{dfd}/{os.path.basename(sock_path)}")
        os.close(dfd)
    else:
        listener.bind(sock_path)
    os.umask(old)
    listener.listen(8)
    listener.settimeout(0.5)  # wake up to reap exited relays
    state: dict[str, Any] = {"spare": None, "n": 0}

    def factory(req: ForkRequest, fds: list[int]) -> tuple[Any, Any]:
        return _build(sb, req, fds, bootstrap)

    def prepare() -> None:
        # In the spare, before its claim: write what the claimed child will write (same
        # values), so those copy-on-write page faults (µs each here) are off the start-up path.
        rebase_modules(bootstrap, bootstrap, _current_bootstrap_modules())
        importlib_invalidate()

    def replenish() -> None:
        _refresh_bootstrap_modules(bootstrap)  # a no-op unless sys.modules grew
        if state["spare"] is None:
            state["n"] += 1
            # SIGTERM must not land between the fork and the bookkeeping (the spare would be
            # forgotten by on_term); the spare unblocks it for itself.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                state["spare"] = sb.prefork_spare(
                    f"z{os.getpid()}-{state['n']}", factory, prepare=prepare
                )
            except OSError:
                state["spare"] = None  # no cgroup: plain spawns
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    def on_term(*_: Any) -> None:
        if state["spare"] is not None:
            sb.discard_spare(state["spare"])
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    replenish()
    sys.stdout.write(json.dumps({"ready": True, "threads": threads}) + "\n")
    sys.stdout.flush()
    while True:
        _reap()
        if os.getppid() != parent:  # the runtime is gone: so are we (and our spare)
            on_term()
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(None)
            try:
                spare, state["spare"] = state["spare"], None
                _handle(sb, conn, bootstrap, spare)
            except Exception as exc:
                with contextlib.suppress(OSError):
                    conn.sendmsg([json.dumps({"ok": False, "error": repr(exc)}).encode()])
        replenish()  # off the start-up path: after the reply


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _build(
    sb: Any, req: ForkRequest, fds: list[int], zygote_bootstrap: str
) -> tuple[Any, Any]:  # pragma: no cover
    """The enclave's SandboxSpec and in-process child entry from a fork request."""
    fabric, nsm, init = fds[0], fds[1], fds[2]
    console = fds[3] if req.get("console") and len(fds) > 3 else None
    s = req["sandbox"]
    spec = sb.SandboxSpec(
        enclave_id=s["enclave_id"],
        cpu_ids=tuple(s["cpu_ids"]),
        memory_mib=s["memory_mib"],
        image_root=s["image_root"],
        fds={3: fabric, 4: nsm, 5: init},
        console_fd=console,
        strict=s["strict"],
        cwd=s["cwd"],
        outside_uid=int(s["outside_uid"]),
        max_tasks=int(s["max_tasks"]),
    )
    env = {str(k): str(v) for k, v in req["env"].items()}
    own_bootstrap = str(req["bootstrap_dir"])

    def child() -> Any:
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = [own_bootstrap if p == zygote_bootstrap else p for p in sys.path]
        rebase_modules(zygote_bootstrap, own_bootstrap, _current_bootstrap_modules())
        forget_finders(zygote_bootstrap)
        importlib_invalidate()
        from runtime.enclave_init import main

        main()

    return spec, child


def _handle(
    sb: Any, conn: socket.socket, zygote_bootstrap: str, spare: Any
) -> None:  # pragma: no cover
    msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, MAX_FDS)
    t0 = time.monotonic()
    try:
        req = json.loads(msg)
        spec, child = _build(sb, req, fds, zygote_bootstrap)
        if spare is not None:
            claimed, spare = spare, None  # claim_spare consumes it, success or not
            sp = sb.claim_spare(claimed, spec, msg, fds)
        else:
            sp = sb.spawn(spec, child, attach=bool(req.get("attach_cgroup", True)))
    except BaseException:
        if spare is not None:
            sb.discard_spare(spare)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    reply = {
        "ok": True,
        "middle_pid": sp.middle_pid,
        "app_pid": sp.app_pid,
        "layers": sp.layers,
        "cgroup": sp.cgroup,
        "pids_cgroup": sp.pids_cgroup,
        "attached": sp.attached,
        "timing": sp.timing,
        "t_request": t0,
        "zygote_ms": round((time.monotonic() - t0) * 1000, 2),
        "spare": spare is not None,
    }
    try:
        socket.send_fds(conn, [json.dumps(reply).encode()], [sp.status_fd])
    finally:
        os.close(sp.status_fd)


#: ``(len(sys.modules), modules naming the zygote's bootstrap)`` as of the last
#: :func:`_refresh_bootstrap_modules`, inherited by every fork (see :func:`rebase_modules`).
_BOOTSTRAP_MODULES: tuple[int, tuple[Any, ...]] | None = None


def _names_tree(mod: Any, old: str) -> bool:
    """Whether ``mod``'s ``__file__`` or (list) ``__path__`` lies in the tree ``old``."""
    prefix = old.rstrip("/") + "/"

    def inside(p: Any) -> bool:
        return isinstance(p, str) and (p == old or p.startswith(prefix))

    path = getattr(mod, "__path__", None)
    return inside(getattr(mod, "__file__", None)) or (
        isinstance(path, list) and any(inside(p) for p in path)
    )


def bootstrap_modules(old: str) -> tuple[Any, ...]:
    """The modules of ``sys.modules`` that name the tree ``old`` (``__file__``/``__path__``):
    the ones :func:`rebase_modules` has to move. One pass over every module (~600 with
    numpy and onnxruntime, ms in a fresh fork), so the zygote does it once, not each enclave."""
    return tuple(mod for mod in list(sys.modules.values()) if _names_tree(mod, old))


def _refresh_bootstrap_modules(old: str) -> None:
    """(Zygote, before forking) record :func:`bootstrap_modules` unless ``sys.modules`` kept
    its size since the last record (nothing is imported after the pre-imports, so this is
    normally a single pass at start-up)."""
    global _BOOTSTRAP_MODULES
    if _BOOTSTRAP_MODULES is None or _BOOTSTRAP_MODULES[0] != len(sys.modules):
        _BOOTSTRAP_MODULES = (len(sys.modules), bootstrap_modules(old))


def _current_bootstrap_modules() -> tuple[Any, ...] | None:
    """(Forked child) the zygote's record if it still matches ``sys.modules`` (by size), else
    None: :func:`rebase_modules` then walks every module."""
    rec = _BOOTSTRAP_MODULES
    return rec[1] if rec is not None and rec[0] == len(sys.modules) else None


def rebase_modules(old: str, new: str, modules: Iterable[Any] | None = None) -> None:
    """Point the pre-imported modules of the zygote's bootstrap copy (``old``) at the
    enclave's own verified bootstrap (``new``), the only one its sandbox mounts.

    Their code is already in memory (the zygote's verified copy of the same PCR1 bytes), but a
    package's ``__path__`` decides where its not-yet-imported submodules are found
    (``models.__main__``) and ``__file__``/the loader's path where its data files are read;
    left alone they would name a tree the enclave cannot see.

    ``modules``: the candidates (normally the zygote's :func:`bootstrap_modules` record, the
    few enclave-side packages); None walks all of ``sys.modules``. Only modules naming ``old``
    are changed either way.
    """
    prefix = old.rstrip("/") + "/"

    def move(p: Any) -> Any:
        if isinstance(p, str) and (p == old or p.startswith(prefix)):
            return new + p[len(old) :]
        return p

    for mod in list(sys.modules.values()) if modules is None else modules:
        file = getattr(mod, "__file__", None)
        path = getattr(mod, "__path__", None)
        if not _names_tree(mod, old):
            continue
        with contextlib.suppress(AttributeError, TypeError):
            if file is not None:
                mod.__file__ = move(file)
            if isinstance(path, list):
                path[:] = [move(p) for p in path]
            vars(mod)["__cached__"] = None
            spec = getattr(mod, "__spec__", None)
            if spec is not None:
                spec.origin = move(spec.origin)
                spec.cached = None
                locs = spec.submodule_search_locations
                if isinstance(locs, list) and locs is not path:
                    locs[:] = [move(p) for p in locs]
            loader = getattr(mod, "__loader__", None)
            if loader is not None and isinstance(getattr(loader, "path", None), str):
                loader.path = move(loader.path)


def forget_finders(old: str) -> None:
    """Drop the cached path finders of the tree ``old`` (the zygote's bootstrap, not mounted
    in the enclave). The others stay: :func:`importlib_invalidate` then marks every one stale,
    so each re-lists its directory (as the enclave sees it) on its next use. Clearing the
    whole cache instead would free every finder's directory listing in the forked child, a
    copy-on-write fault for each page those strings live on."""
    prefix = old.rstrip("/") + "/"
    cache = sys.path_importer_cache
    for key in [k for k in cache if k == old or k.startswith(prefix)]:
        del cache[key]


def importlib_invalidate() -> None:
    import importlib

    importlib.invalidate_caches()


if __name__ == "__main__":  # pragma: no cover - the zygote process
    import argparse

    _p = argparse.ArgumentParser()
    _p.add_argument("--serve", required=True)
    _p.add_argument("--bootstrap", required=True)
    _p.add_argument("--sandbox", required=True)
    _a = _p.parse_args()
    serve(_a.serve, _a.bootstrap, _a.sandbox)
