"""Helpers shared by the lifecycle/sandbox tests (real subprocess enclaves); no tests here."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from runtime.api import Runtime
from runtime.sandbox import CGROUP_MEMORY_ROOT, CGROUP_PIDS_ROOT

#: Hard bound on any single enclave operation in these tests.
OP_TIMEOUT_S = 30


async def console_json(rt: Runtime, enclave_id: str, *, timeout: float = 20) -> dict[str, Any]:
    """Read the enclave's console until a line starting with ``RESULT `` arrives."""
    buf = b""
    with trio.fail_after(timeout):
        ch = await rt.console(enclave_id)
        async with ch:
            async for chunk in ch:
                buf += chunk
                for line in buf.splitlines():
                    if line.startswith(b"RESULT "):
                        result: dict[str, Any] = json.loads(line[len(b"RESULT ") :])
                        return result
    raise AssertionError(f"no RESULT line on the console: {buf!r}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def assert_no_leftovers(state: Path, enclave_id: str, pids: list[int]) -> None:
    """Nothing of the enclave remains: processes, record, socket, work dir, fabric, cgroup."""
    slot = enclave_id.rpartition("-enc")[2]
    for pid in pids:
        assert not pid_alive(pid), f"pid {pid} still alive"
    enclaves = state / "enclaves"
    assert not (enclaves / f"{slot}.json").exists()
    assert not (enclaves / f"{slot}.sock").exists()
    assert not (enclaves / slot).exists()
    assert not (CGROUP_MEMORY_ROOT / slot).exists()
    assert not (CGROUP_PIDS_ROOT / slot).exists()


def fabric_cids(state: Path) -> list[str]:
    vsock = state / "vsock"
    return sorted(p.name for p in vsock.iterdir()) if vsock.exists() else []


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """In-process ``enclave`` CLI calls configure structlog onto pytest's (later closed) capture
    streams; reset to structlog's defaults so later log calls do not hit a closed file."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
