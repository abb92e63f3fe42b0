"""``enclave run-enclave``: start an enclave (nitro-cli's flags, rules and output, §1.1-§1.3).

The enclave is started and owned by the state directory's host daemon (:mod:`runtime.host`,
started on demand), like nitro-cli's "enclave process": through the same launch path as the
embedding API, zygote warm start included. This command returns once the enclave is running
(heartbeat received, app started; with ``--wait-ready``, once its app reported READY) and the
enclave keeps running after it exits. With ``--attach-console`` the console follows, from the
app's first byte; Ctrl-C then detaches and leaves the enclave running.

``--replicas N`` (ours) starts N enclaves of the image, one after the other through the same
path: each its own CID and module id, the same PCRs, named ``NAME``, ``NAME_1``... (the group
``NAME``, which ``enclave ingress --target-name`` follows). It prints a JSON array of their run
records. If one fails, those already started are terminated and the error is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import select
import sys
from typing import TYPE_CHECKING, Final

from runtime.cli._common import (
    RunRequest,
    load_config,
    open_state_dir,
    parse_cid,
    parse_memory,
    parse_u32,
    print_json,
)
from runtime.errors import InvalidArgumentError, UsageError
from runtime.launch import MAX_BOOT_TIMEOUT_S, LaunchRequest

if TYPE_CHECKING:
    import socket

    from runtime.cli import SubParsers
    from runtime.host import HostReply

__all__ = [
    "register",
    "run",
    "request_from_args",
    "BOOT_TIMEOUT_S",
    "MAX_BOOT_TIMEOUT_S",
    "DEFAULT_WAIT_READY_S",
]

#: Boot deadline of the CLI path (a fresh interpreter importing the stack takes ~1 s here;
#: Nitro allows >= 180 s for real VMs).
BOOT_TIMEOUT_S: Final = 60.0
#: ``--wait-ready`` without a value: how long the app may take to report READY.
DEFAULT_WAIT_READY_S: Final = 60.0
_FLAGS: Final = (
    "eif_path",
    "cpu_ids",
    "cpu_count",
    "memory",
    "enclave_cid",
    "debug_mode",
    "enclave_name",
    "strict_isolation",
)


def register(subparsers: SubParsers) -> None:
    """Add ``run-enclave``."""
    p = subparsers.add_parser(
        "run-enclave", help="start an enclave from an EIF (nitro-cli)", allow_abbrev=False
    )
    p.add_argument("--eif-path", metavar="PATH")
    p.add_argument("--cpu-ids", metavar="ID", nargs="+")
    p.add_argument("--cpu-count", metavar="N")
    p.add_argument("--memory", metavar="MEM", help="MiB, or with a unit: 512M, 2G, 1T")
    p.add_argument("--enclave-cid", metavar="CID", help="4..4294967294; 0 = auto")
    p.add_argument("--debug-mode", action="store_true")
    p.add_argument("--attach-console", action="store_true", help="implies --debug-mode")
    p.add_argument("--enclave-name", metavar="NAME")
    p.add_argument("--config", metavar="JSON", help="run-enclave arguments as a JSON file")
    p.add_argument(
        "--strict-isolation",
        action="store_true",
        help="refuse to start when a sandbox layer is unavailable on this host",
    )
    p.add_argument(
        "--replicas",
        metavar="N",
        help="start N replicas of the image (each its own CID and module id; prints a JSON "
        "array); not with --attach-console or a fixed --enclave-cid",
    )
    p.add_argument(
        "--wait-ready",
        metavar="SECONDS",
        nargs="?",
        const=str(DEFAULT_WAIT_READY_S),
        help="wait until the app reports READY (default "
        f"{DEFAULT_WAIT_READY_S:g} s); fail with its own reason otherwise",
    )
    p.set_defaults(func=run)


def _wait_ready_s(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_BOOT_TIMEOUT_S:
        raise InvalidArgumentError(
            f"`wait-ready` must be a number of seconds in (0, {MAX_BOOT_TIMEOUT_S:g}]",
            info=("wait-ready", text),
        )
    return value


def request_from_args(args: argparse.Namespace) -> RunRequest:
    """The validated request.

    Raises:
        UsageError: missing or conflicting flags (exit 2, as clap).
        NitroCliError: a bad value (E03), or what ``--config`` yields (E17, E19, E01, E02...).
    """
    if args.config is not None:
        given = [f for f in _FLAGS if getattr(args, f) not in (None, False)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"the argument '--config <json-config>' cannot be used with '{flag}'")
        # --attach-console is accepted with --config, and ignored: the JSON decides (nitro-cli);
        # --wait-ready (ours, not a field of nitro-cli's JSON) applies to it
        req = load_config(args.config)
        return dataclasses.replace(req, wait_ready_s=_wait_ready_s(args.wait_ready))
    if args.cpu_ids is None and args.cpu_count is None:
        raise UsageError("one of '--cpu-ids <ID>...' or '--cpu-count <N>' is required")
    if args.cpu_ids is not None and args.cpu_count is not None:
        raise UsageError("the argument '--cpu-ids <ID>...' cannot be used with '--cpu-count <N>'")
    if args.memory is None:
        raise UsageError("the following required arguments were not provided: --memory <MEM>")
    if args.eif_path is None:
        raise UsageError("the following required arguments were not provided: --eif-path <PATH>")
    cpu_count = None if args.cpu_count is None else parse_u32(args.cpu_count, "cpu-count")
    cpu_ids = None if args.cpu_ids is None else tuple(parse_u32(c, "cpu-id") for c in args.cpu_ids)
    memory = parse_memory(args.memory)
    cid = parse_cid(args.enclave_cid) if args.enclave_cid is not None else None
    wait_ready_s = _wait_ready_s(args.wait_ready)
    launch = LaunchRequest(
        eif_path=args.eif_path,
        memory_mib=memory,
        cpu_count=cpu_count,
        cpu_ids=cpu_ids,
        cid=cid,
        debug=args.debug_mode or args.attach_console,
        name=args.enclave_name,
        strict_isolation=args.strict_isolation,
        boot_timeout_s=BOOT_TIMEOUT_S,
    )
    return RunRequest(launch, attach_console=args.attach_console, wait_ready_s=wait_ready_s)


def _replicas(text: str | None, req: RunRequest) -> int | None:
    """The ``--replicas`` count, checked against the rest of the request."""
    if text is None:
        return None
    from runtime.replicas import MAX_REPLICAS

    value = text.strip()
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_REPLICAS:
        raise InvalidArgumentError(
            f"`replicas` must be an integer in 1..{MAX_REPLICAS}", info=("replicas", text)
        )
    if req.attach_console:
        raise UsageError("the argument '--replicas <N>' cannot be used with '--attach-console'")
    if req.launch.cid not in (None, 0) and int(value) > 1:
        raise InvalidArgumentError(
            "`enclave-cid` cannot be given with several replicas: each gets its own CID",
            info=("enclave-cid", str(req.launch.cid)),
        )
    return int(value)


def _run_replicas(req: RunRequest, count: int) -> int:
    """Start ``count`` replicas one after the other; on a failure terminate the others."""
    from runtime.control import terminate_via_control
    from runtime.host import launch_via_host

    state = open_state_dir()
    started = []
    try:
        for index in range(count):
            print(f"Starting replica {index + 1} of {count}...", file=sys.stderr)
            reply = launch_via_host(
                state,
                req.launch,
                wait_ready=req.wait_ready_s is not None,
                ready_timeout_s=req.wait_ready_s or DEFAULT_WAIT_READY_S,
                boot_timeout_s=BOOT_TIMEOUT_S,
            )
            started.append(reply.info)
            print(
                f"Started enclave {reply.info.enclave_name} with enclave-cid: "
                f"{reply.info.enclave_cid}",
                file=sys.stderr,
            )
    except BaseException:
        import trio

        for info in started:
            with contextlib.suppress(Exception):
                trio.run(terminate_via_control, state, info.enclave_id)
        if started:
            print(f"Terminated the {len(started)} replica(s) already started.", file=sys.stderr)
        raise
    print_json([info.run_json() for info in started])
    return 0


def run(args: argparse.Namespace) -> int:
    """Start the enclave, print its JSON (and follow its console with --attach-console)."""
    from runtime.host import launch_via_host

    req = request_from_args(args)
    replicas = _replicas(args.replicas, req)
    if replicas is not None:
        return _run_replicas(req, replicas)
    state = open_state_dir()
    print("Start allocating memory...", file=sys.stderr)
    try:
        reply = launch_via_host(
            state,
            req.launch,
            wait_ready=req.wait_ready_s is not None,
            ready_timeout_s=req.wait_ready_s or DEFAULT_WAIT_READY_S,
            console=req.attach_console,
            boot_timeout_s=BOOT_TIMEOUT_S,
        )
    except KeyboardInterrupt:
        # the connection is closed: the daemon cancels the start (tears down what it began)
        print(
            "error: interrupted while the enclave was starting; the start is cancelled",
            file=sys.stderr,
        )
        return 130
    info = reply.info
    print(
        f"Started enclave with enclave-cid: {info.enclave_cid}, memory: {info.memory_mib} MiB, "
        f"cpu-ids: {list(info.cpu_ids)}",
        file=sys.stderr,
    )
    print_json(info.run_json())
    if reply.conn is None:
        return 0
    return _follow_console(reply, info.enclave_cid)


def _follow_console(reply: HostReply, cid: int) -> int:
    """Copy the console (from the app's first byte) to stdout until the enclave ends. Ctrl-C
    detaches: the enclave keeps running, and the user is told its id."""
    assert reply.conn is not None
    conn: socket.socket = reply.conn
    out = sys.stdout.buffer
    try:
        print(f"Connecting to the console for enclave {cid}...", flush=True)
        print("Successfully connected to the console.", flush=True)
        if reply.leftover:
            out.write(reply.leftover)
            out.flush()
        while True:
            select.select([conn], [], [])
            chunk = conn.recv(65536)
            if not chunk:
                return 0
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            out.flush()
        print(
            f"\nDetached from the console. The enclave {reply.info.enclave_id} is still "
            "running (stop it with: enclave terminate-enclave --enclave-id "
            f"{reply.info.enclave_id}).",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        return 0
    finally:
        conn.close()
