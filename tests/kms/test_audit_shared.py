"""The audit log with several writers (worker processes) and group commit."""

from __future__ import annotations

import base64
import errno
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

from kms import audit as audit_mod
from kms.audit import AuditLog, verify_audit_log
from kms.errors import AuditChainError
from kms.group_commit import GroupCommit, SyncFailed
from kms.integrity import MasterKey

_WRITER = """
import base64, sys, time
from pathlib import Path
from kms.audit import AuditLog
from kms.integrity import MasterKey
path = Path(sys.argv[1])
log = AuditLog(path, MasterKey(base64.b64decode(sys.argv[2])), fsync=False)
count, me, writers = int(sys.argv[3]), sys.argv[4], int(sys.argv[5])

def barrier(name):
    (path.parent / f"{name}-{me}").touch()
    deadline = time.monotonic() + 60
    while len(list(path.parent.glob(f"{name}-*"))) < writers and time.monotonic() < deadline:
        time.sleep(0.001)

barrier("ready")  # all writers start appending together
for phase in range(PHASES):
    for i in range(count // PHASES):
        log.append({"operation": "GenerateDataKey", "writer": me, "i": i, "phase": phase})
    barrier(f"phase{phase}")  # every writer appended in this phase before any goes on
log.close()
"""
#: Phases separated by barriers: each phase holds a run of every writer, so the chain has at
#: least (writers - 1) * PHASES hand-overs between processes, whatever the scheduler does.
PHASES = 3


@pytest.mark.timeout(120)
def test_writer_processes_build_one_valid_chain(tmp_path: Path) -> None:
    key = os.urandom(32)
    path = tmp_path / "audit.jsonl"
    AuditLog(path, MasterKey(key)).close()
    b64 = base64.b64encode(key).decode()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"PHASES = {PHASES}\n" + _WRITER,
                str(path),
                b64,
                "300",
                str(w),
                "4",
            ]
        )
        for w in range(4)
    ]
    for p in procs:
        assert p.wait(timeout=100) == 0
    assert verify_audit_log(path, MasterKey(key)) == 1200
    lines = path.read_text().splitlines()
    writers = [line.split('"writer":"')[1][0] for line in lines]
    assert len(set(writers)) == 4
    # They did interleave (otherwise this test proves nothing about the tail hand-over): the
    # phases guarantee a hand-over from every writer's run to the next one's.
    assert sum(a != b for a, b in itertools.pairwise(writers)) >= 3 * PHASES


def test_a_failed_write_leaves_no_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    master = MasterKey(os.urandom(32))
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, master)
    log.append({"operation": "Encrypt"})
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])  # a disk that filled up mid-line

    monkeypatch.setattr(audit_mod.os, "write", short_write)
    with pytest.raises(OSError, match="short write") as failed:
        log.append({"operation": "Decrypt"})
    assert failed.value.errno == errno.ENOSPC
    monkeypatch.setattr(audit_mod.os, "write", real_write)
    log.append({"operation": "Decrypt"})  # the chain goes on from the last whole line
    log.close()
    assert verify_audit_log(path, master) == 2


def test_a_foreign_tail_that_does_not_verify_is_not_extended(tmp_path: Path) -> None:
    master = MasterKey(os.urandom(32))
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, master)
    log.append({"operation": "Encrypt"})
    with path.open("ab") as f:
        f.write(b'{"seq": 2, "prev": "00", "mac": "00"}\n')  # complete, but not ours
    with pytest.raises(AuditChainError, match="mac does not match"):
        log.append({"operation": "Decrypt"})
    log.close()


@pytest.mark.parametrize("at_open", [False, True])
def test_a_line_torn_by_a_dying_writer_is_cut_off_and_kept_in_the_chain(
    tmp_path: Path, at_open: bool
) -> None:
    master = MasterKey(os.urandom(32))
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, master)
    log.append({"operation": "Encrypt"})
    torn = b'{"decision":"allow","operation":"GenerateDa'
    with path.open("ab") as f:
        f.write(torn)  # what a SIGKILL between two pages of a write leaves
    if at_open:
        log.close()
        log = AuditLog(path, master)
    log.append({"operation": "Decrypt"})
    log.close()
    assert verify_audit_log(path, master) == 3
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["operation"] for r in lines] == ["Encrypt", "AuditTornLine", "Decrypt"]
    assert base64.b64decode(lines[1]["torn_b64"]) == torn


async def test_commit_returns_only_after_its_sync() -> None:
    release = threading.Event()
    started = threading.Event()
    calls: list[int] = []

    def sync() -> None:
        started.set()
        release.wait(10)
        calls.append(1)

    group = GroupCommit(sync)
    done = trio.Event()

    async def writer() -> None:
        await group.durable(group.wrote())
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.to_thread.run_sync(started.wait, 10)
        await trio.sleep(0.05)
        assert not done.is_set()  # the sync has not finished: no acknowledgement yet
        release.set()
        with trio.fail_after(10):
            await done.wait()
    assert calls == [1]


async def test_concurrent_commits_share_syncs() -> None:
    gate = threading.Event()

    def sync() -> None:
        gate.wait(10)

    group = GroupCommit(sync)
    finished = 0

    async def writer() -> None:
        nonlocal finished
        await group.durable(group.wrote())
        finished += 1

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(writer)
            await trio.sleep(0.05)  # all 20 wrote; one sync runs, 19 wait for the next
            gate.set()
    assert finished == 20
    assert group.syncs == 2  # the first writer's sync, then one for the other 19


async def test_a_failed_sync_fails_its_batch_and_every_later_one() -> None:
    def sync() -> None:
        raise OSError(errno.EIO, "I/O error")

    group = GroupCommit(sync)
    with pytest.raises(OSError, match="I/O error"):
        await group.durable(group.wrote())
    with pytest.raises(SyncFailed):
        await group.durable(group.wrote())


async def test_commit_with_fsync_is_on_disk_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    master = MasterKey(os.urandom(32))
    path = tmp_path / "audit.jsonl"
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        synced.append(path.stat().st_size)

    monkeypatch.setattr(audit_mod.os, "fdatasync", fdatasync)
    log = AuditLog(path, master, fsync=True)  # the sync callable is bound at open
    for i in range(3):
        await log.commit({"operation": "Encrypt", "i": i})
        assert synced[-1] == path.stat().st_size  # this line was synced before the return
    log.close()
    assert verify_audit_log(path, master) == 3


# ------------------------------------------------- group commit: inline while syncs are fast


class _Disk:
    """A sync whose duration a test sets, on a fake clock; records the thread it ran on."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.now = 0.0
        self.threads: list[int] = []

    def clock(self) -> float:
        return self.now

    def sync(self) -> None:
        self.threads.append(threading.get_ident())
        self.now += self.seconds


async def test_fast_syncs_run_inline_and_writers_that_are_ready_share_one() -> None:
    disk = _Disk(0.0002)
    group = GroupCommit(disk.sync, inline_max_s=0.002, clock=disk.clock)
    assert group.inline

    async def writer() -> None:
        await group.durable(group.wrote())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(writer)
    # The leader yielded once before syncing: all 20 had written, one sync covered them.
    assert (group.syncs, group.inline_syncs) == (1, 1)
    assert disk.threads == [threading.get_ident()]  # in the event loop's thread
    for _ in range(5):
        await writer()
    assert (group.syncs, group.inline_syncs) == (6, 6)


async def test_a_slow_sync_moves_syncs_to_a_thread_until_they_are_fast_again() -> None:
    disk = _Disk(0.0002)
    group = GroupCommit(disk.sync, inline_max_s=0.002, clock=disk.clock)
    me = threading.get_ident()
    await group.durable(group.wrote())
    assert group.inline
    disk.seconds = 0.010  # one sync over four times the limit: the loop must not wait on it
    await group.durable(group.wrote())
    assert not group.inline
    await group.durable(group.wrote())
    assert disk.threads[-1] != me  # this one ran in a worker thread
    disk.seconds = 0.0002  # the disk recovers: the average falls under half the limit
    for _ in range(30):
        await group.durable(group.wrote())
        if group.inline:
            break
    assert group.inline
    await group.durable(group.wrote())
    assert disk.threads[-1] == me
    assert group.syncs == len(disk.threads)


async def test_a_slowly_drifting_disk_moves_syncs_to_a_thread_on_the_average() -> None:
    """No single sync over four times the limit, but an average over it: thread too."""
    disk = _Disk(0.0035)
    group = GroupCommit(disk.sync, inline_max_s=0.002, clock=disk.clock)
    for _ in range(30):
        await group.durable(group.wrote())
        if not group.inline:
            break
    assert not group.inline
    assert group.inline_syncs >= 2  # it took the average a few syncs to cross the limit


async def test_a_failed_inline_sync_fails_its_batch_and_every_later_one() -> None:
    def sync() -> None:
        raise OSError(errno.EIO, "I/O error")

    group = GroupCommit(sync, inline_max_s=0.002)
    with pytest.raises(OSError, match="I/O error"):
        await group.durable(group.wrote())
    with pytest.raises(SyncFailed):
        await group.durable(group.wrote())


async def test_a_cancelled_inline_leader_still_syncs_its_batch() -> None:
    disk = _Disk(0.0002)
    group = GroupCommit(disk.sync, inline_max_s=0.002, clock=disk.clock)
    with trio.CancelScope() as scope:
        scope.cancel()
        await group.durable(group.wrote())  # the yield before the sync is shielded
    assert group.syncs == 1
    await group.durable(1)  # durable already: returns without another sync
    assert group.syncs == 1


async def test_the_audit_log_syncs_inline_on_a_healthy_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        threads.append(threading.get_ident())
        real(fd)

    monkeypatch.setattr(audit_mod.os, "fdatasync", fdatasync)
    log = AuditLog(tmp_path / "audit.jsonl", MasterKey(os.urandom(32)), fsync=True)
    try:
        for i in range(20):
            await log.commit({"operation": "Encrypt", "i": i})
    finally:
        log.close()
    # The log starts with syncs inline (whether they stay so depends on this disk's speed).
    assert threads[0] == threading.get_ident()
    assert len(threads) == 20

