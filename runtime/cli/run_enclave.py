"""``enclave run-enclave``: start an enclave (nitro-cli's flags, rules and output, §1.1-§1.3).

The enclave is owned by a detached supervisor process (``python -m runtime.supervisor``), like
nitro-cli's per-enclave "enclave process"; this command returns once the enclave is running
(heartbeat received, app started) and the enclave keeps running after it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from runtime.cli._common import RunRequest, load_config, parse_cid, parse_memory, print_json
from runtime.errors import NitroCliError
from runtime.records import EnclaveInfo, LaunchSpec
from runtime.state import StateDir
from transport.paths import default_state_dir

if TYPE_CHECKING:
    from runtime.cli import SubParsers

#: Boot deadline of the CLI path (supervisor start-up + a fresh interpreter importing the
#: stack takes ~1 s here; Nitro allows >= 180 s for real VMs).
BOOT_TIMEOUT_S = 60.0
#: Extra time for the supervisor process to start and report.
LAUNCH_SLACK_S = 30.0
_FLAGS = (
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
    p = subparsers.add_parser("run-enclave", help="start an enclave from an EIF (nitro-cli)")
    p.add_argument("--eif-path", metavar="PATH")
    p.add_argument("--cpu-ids", metavar="ID", nargs="+", type=int)
    p.add_argument("--cpu-count", metavar="N", type=int)
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
    p.set_defaults(func=run)


def _usage(msg: str) -> int:
    print(f"error: {msg}\n\nUsage: enclave run-enclave [OPTIONS]", file=sys.stderr)
    return 2


def request_from_args(args: argparse.Namespace) -> RunRequest | str:
    """The validated request, or a usage-error message (exit 2, as clap)."""
    if args.config is not None:
        given = [f for f in _FLAGS if getattr(args, f) not in (None, False)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            return f"the argument '--config <json-config>' cannot be used with '{flag}'"
        return load_config(args.config, attach_console=args.attach_console)
    if args.cpu_ids is None and args.cpu_count is None:
        return "one of '--cpu-ids <ID>...' or '--cpu-count <N>' is required"
    if args.cpu_ids is not None and args.cpu_count is not None:
        return "the argument '--cpu-ids <ID>...' cannot be used with '--cpu-count <N>'"
    if args.memory is None:
        return "the following required arguments were not provided: --memory <MEM>"
    if args.eif_path is None:
        return "the following required arguments were not provided: --eif-path <PATH>"
    memory = parse_memory(args.memory)
    cid = parse_cid(args.enclave_cid) if args.enclave_cid is not None else None
    return RunRequest(
        eif_path=args.eif_path,
        memory_mib=memory,
        cpu_count=args.cpu_count,
        cpu_ids=None if args.cpu_ids is None else tuple(args.cpu_ids),
        cid=cid,
        debug=args.debug_mode or args.attach_console,
        attach_console=args.attach_console,
        name=args.enclave_name,
        strict_isolation=args.strict_isolation,
    )


def launch(
    state: StateDir, req: RunRequest, *, boot_timeout_s: float = BOOT_TIMEOUT_S
) -> EnclaveInfo:
    """Reserve capacity, start the detached supervisor, wait for its ready report."""
    res = state.reserve(
        eif_path=req.eif_path,
        memory_mib=req.memory_mib,
        cpu_count=req.cpu_count,
        cpu_ids=req.cpu_ids,
        cid=req.cid,
        name=req.name,
        debug=req.debug,
        owner_pid=os.getpid(),
    )
    spec = LaunchSpec(
        eif_path=res.eif_path,
        enclave_id=res.enclave_id,
        enclave_name=res.enclave_name,
        cid=res.enclave_cid,
        cpu_ids=res.cpu_ids,
        memory_mib=res.memory_mib,
        debug=req.debug,
        strict_isolation=req.strict_isolation,
        boot_timeout_s=boot_timeout_s,
    )
    logs = state.path / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    r, w = os.pipe()
    try:
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "runtime.supervisor",
                    "--state-dir",
                    str(state.path),
                    "--spec",
                    json.dumps(spec.to_json()),
                    "--ready-fd",
                    str(w),
                    "--log-file",
                    str(logs / f"{state.slot_of(res.enclave_id)}.log"),
                ],
                pass_fds=(w,),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError as exc:
            state.remove_record(res.enclave_id)
            raise NitroCliError("E05", f"Failed to spawn the enclave process: {exc}") from exc
        os.close(w)
        w = -1
        line = _read_line(r, boot_timeout_s + LAUNCH_SLACK_S)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    try:
        reply = json.loads(line) if line else None
    except ValueError:
        reply = None
    if not reply:
        proc.kill()
        proc.wait()
        state.remove_record(res.enclave_id)
        raise NitroCliError("E36", "Enclave boot failed: the enclave process did not report")
    if not reply.get("ok"):
        proc.wait()
        raise NitroCliError(str(reply.get("code", "E36")), str(reply.get("message")))
    return EnclaveInfo.from_record(reply["info"])


def _read_line(fd: int, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    buf = b""
    while b"\n" not in buf and len(buf) < (1 << 20):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0]


def run(args: argparse.Namespace) -> int:
    req = request_from_args(args)
    if isinstance(req, str):
        return _usage(req)
    state = StateDir(default_state_dir())
    print("Start allocating memory...", file=sys.stderr)
    info = launch(state, req)
    print(
        f"Started enclave with enclave-cid: {info.enclave_cid}, memory: {info.memory_mib} MiB, "
        f"cpu-ids: {list(info.cpu_ids)}",
        file=sys.stderr,
    )
    print_json(info.run_json())
    if req.attach_console:
        from runtime.cli.console import stream_console

        return stream_console(state, info, disconnect_timeout=None)
    return 0
