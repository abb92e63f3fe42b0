"""Private Unix sockets (runtime._unixsock.bind_private): mode 0600, and the process umask is
never left narrowed, even when several are bound at once (two enclaves' control sockets)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import trio
import trio.testing

from runtime._unixsock import bind_private
from runtime.control import ControlServer
from runtime.records import ExitReason


class _Target:
    cid = 16

    async def terminate(self) -> ExitReason:  # pragma: no cover - never called here
        raise AssertionError("not used")

    async def console_stream(self) -> trio.MemoryReceiveChannel[bytes]:  # pragma: no cover
        raise AssertionError("not used")


def test_bind_private_makes_a_0600_socket_and_restores_the_umask(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)  # the path passes sun_path: bound through /proc/self/fd
    deep.mkdir()
    before = os.umask(0o022)
    try:
        sock = bind_private(deep / "s.sock")
        sock.close()
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)
    assert stat.S_IMODE((deep / "s.sock").stat().st_mode) == 0o600


async def test_control_sockets_started_together_leave_the_umask_alone(tmp_path: Path) -> None:
    """Regression: the bind used to await inside the umask window, so two servers starting
    together could restore each other's narrowed umask (0177) for the whole process, and the
    next directory the runtime made came out 0600."""
    before = os.umask(0o022)
    try:
        with trio.fail_after(10):
            for round_ in range(8):  # the old interleaving leaked in about half the rounds
                async with trio.open_nursery() as nursery:
                    for i in range(3):  # started together, so their binds would overlap
                        server = ControlServer(tmp_path / f"c{round_}-{i}.sock", _Target())
                        nursery.start_soon(server.run)
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.cancel_scope.cancel()
                assert os.umask(0o022) == 0o022, f"umask leaked in round {round_}"
        fresh = tmp_path / "fresh"
        fresh.mkdir(0o700)
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
        for sock in tmp_path.glob("*.sock"):
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    finally:
        os.umask(before)
