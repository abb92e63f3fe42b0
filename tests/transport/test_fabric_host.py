"""Host backend over real Unix sockets: layout, modes, stale files, cleanup, refusals."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from transport.errors import VsockConnectionRefused, VsockError
from transport.fabric.host import BoundSocket, bind_fabric_socket, probe_listener
from transport.vsock import (
    VMADDR_CID_PARENT,
    VMADDR_PORT_ANY,
    VsockAddr,
    VsockAddressInUse,
    default_fabric_dir,
    open_vsock_listener,
    open_vsock_stream,
)

TIMEOUT_S = 5


async def _echo_once(listener: trio.SocketListener) -> None:
    conn = await listener.accept()
    async with conn:
        while data := await conn.receive_some(65536):
            await conn.send_all(data)


async def test_listen_connect_echo_and_modes(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        listener = await open_vsock_listener(5005, fabric_dir=fabric_dir)
        path = fabric_dir / "3" / "5005"
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert stat.S_IMODE(fabric_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((fabric_dir / "3").stat().st_mode) == 0o700
        assert listener.socket.getsockname() == (VMADDR_CID_PARENT, 5005)
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(_echo_once, listener)
            stream = await open_vsock_stream(VsockAddr(3, 5005), fabric_dir=fabric_dir)
            async with stream:
                await stream.send_all(b"ping" * 1000)
                await stream.send_eof()
                got = b""
                while data := await stream.receive_some(65536):
                    got += data
                assert got == b"ping" * 1000
        assert not path.exists(), "closing the listener removes its socket file"


async def test_no_world_accessible_socket_files_even_with_open_umask(fabric_dir: Path) -> None:
    old = os.umask(0)
    try:
        with trio.fail_after(TIMEOUT_S):
            async with await open_vsock_listener(VMADDR_PORT_ANY, fabric_dir=fabric_dir) as lst:
                port = lst.socket.getsockname()[1]
                mode = (fabric_dir / "3" / str(port)).lstat().st_mode
                assert stat.S_IMODE(mode) == 0o600
                assert not mode & (stat.S_IWOTH | stat.S_IWGRP | stat.S_IROTH)
    finally:
        os.umask(old)


async def test_existing_public_directory_is_tightened(fabric_dir: Path) -> None:
    (fabric_dir / "3").mkdir(parents=True)
    fabric_dir.chmod(0o777)
    (fabric_dir / "3").chmod(0o777)
    with trio.fail_after(TIMEOUT_S):
        async with await open_vsock_listener(7000, fabric_dir=fabric_dir):
            assert stat.S_IMODE(fabric_dir.stat().st_mode) == 0o700
            assert stat.S_IMODE((fabric_dir / "3").stat().st_mode) == 0o700


async def test_connect_to_nobody_is_refused_promptly(fabric_dir: Path) -> None:
    with trio.fail_after(1):
        with pytest.raises(VsockConnectionRefused):
            await open_vsock_stream(VsockAddr(16, 5005), fabric_dir=fabric_dir)
        # A stale file (its listener died without cleanup) is refused too, not a hang.
        (fabric_dir / "16").mkdir(parents=True)
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(fabric_dir / "16" / "5005"))
        dead.close()
        with pytest.raises(VsockConnectionRefused):
            await open_vsock_stream(VsockAddr(16, 5005), fabric_dir=fabric_dir)


async def test_stale_socket_file_is_replaced(fabric_dir: Path) -> None:
    (fabric_dir / "3").mkdir(parents=True)
    path = fabric_dir / "3" / "8000"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.listen(1)
    dead.close()  # the file stays behind: a crashed listener
    assert not probe_listener(path)
    with trio.fail_after(TIMEOUT_S):
        async with (
            await open_vsock_listener(8000, fabric_dir=fabric_dir) as listener,
            trio.open_nursery() as n,
        ):
            assert probe_listener(path)  # the file now leads to a live listener
            await (await listener.accept()).aclose()  # (that probe's connection)
            n.start_soon(_echo_once, listener)
            async with await open_vsock_stream(VsockAddr(3, 8000), fabric_dir=fabric_dir) as s:
                await s.send_all(b"x")
                assert await s.receive_some(1) == b"x"


async def test_live_listener_is_never_displaced(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with await open_vsock_listener(8000, fabric_dir=fabric_dir) as first:
            ino = (fabric_dir / "3" / "8000").lstat().st_ino
            with pytest.raises(VsockAddressInUse):
                await open_vsock_listener(8000, fabric_dir=fabric_dir)
            assert (fabric_dir / "3" / "8000").lstat().st_ino == ino
            # the probe was a connection that closed at once; the first listener still works
            probe = await first.accept()
            assert await probe.receive_some(10) == b""
            await probe.aclose()
            async with trio.open_nursery() as n:
                n.start_soon(_echo_once, first)
                async with await open_vsock_stream(VsockAddr(3, 8000), fabric_dir=fabric_dir) as s:
                    await s.send_all(b"y")
                    assert await s.receive_some(1) == b"y"


async def test_non_socket_file_is_not_replaced(fabric_dir: Path) -> None:
    (fabric_dir / "3").mkdir(parents=True)
    (fabric_dir / "3" / "8000").write_text("precious")
    with trio.fail_after(TIMEOUT_S), pytest.raises(VsockError, match="not a socket"):
        await open_vsock_listener(8000, fabric_dir=fabric_dir)
    assert (fabric_dir / "3" / "8000").read_text() == "precious"


async def test_close_does_not_remove_a_replacement(fabric_dir: Path) -> None:
    """A listener only ever unlinks its own file (compared by inode)."""
    with trio.fail_after(TIMEOUT_S):
        first = await open_vsock_listener(8000, fabric_dir=fabric_dir)
        path = fabric_dir / "3" / "8000"
        path.unlink()  # someone removed it and a new listener took the address
        second = await open_vsock_listener(8000, fabric_dir=fabric_dir)
        await first.aclose()
        assert path.exists()
        await second.aclose()
        assert not path.exists()


async def test_port_any_and_cid_checks(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with await open_vsock_listener(VMADDR_PORT_ANY, fabric_dir=fabric_dir) as lst:
            cid, port = lst.socket.getsockname()
            assert cid == 3
            assert port != VMADDR_PORT_ANY
            assert (fabric_dir / "3" / str(port)).exists()
        async with await open_vsock_listener(9, cid=3, fabric_dir=fabric_dir):
            pass
        with pytest.raises(VsockError, match="cannot bind CID 16"):
            await open_vsock_listener(9, cid=16, fabric_dir=fabric_dir)
        with pytest.raises(VsockError, match="32-bit"):
            await open_vsock_listener(1 << 32, fabric_dir=fabric_dir)


async def test_closed_listener_accept_raises_closed(fabric_dir: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        listener = await open_vsock_listener(8001, fabric_dir=fabric_dir)
        await listener.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await listener.accept()


async def test_default_backend_uses_env_fabric_dir(
    fabric_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENCLAVE_VSOCK_DIR", str(fabric_dir))
    monkeypatch.delenv("ENCLAVE_FABRIC_FD", raising=False)
    monkeypatch.setenv("ENCLAVE_VSOCK_BACKEND", "emulated")
    assert default_fabric_dir() == fabric_dir
    with trio.fail_after(TIMEOUT_S):
        async with await open_vsock_listener(4000) as listener, trio.open_nursery() as n:
            assert (fabric_dir / "3" / "4000").exists()
            n.start_soon(_echo_once, listener)
            async with await open_vsock_stream(VsockAddr(3, 4000)) as s:
                await s.send_all(b"z")
                assert await s.receive_some(1) == b"z"


def test_default_fabric_dir_under_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ENCLAVE_VSOCK_DIR", raising=False)
    monkeypatch.setenv("ENCLAVE_STATE_DIR", str(tmp_path))
    assert default_fabric_dir() == tmp_path.resolve() / "vsock"


def test_bind_is_exclusive_between_processes_view(fabric_dir: Path) -> None:
    """A second bind while the first is live fails; after the first closes it is stale."""
    first = bind_fabric_socket(fabric_dir, VsockAddr(3, 1234))
    with pytest.raises(VsockAddressInUse):
        bind_fabric_socket(fabric_dir, VsockAddr(3, 1234))
    first.sock.close()
    second = bind_fabric_socket(fabric_dir, VsockAddr(3, 1234))
    second.sock.close()


def test_socket_file_appears_only_once_listening(
    fabric_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bind() creates a Unix socket's file, but connects are refused until listen(): whoever
    sees the fabric file (a client waiting for it to appear) must find it accepting."""
    path = fabric_dir / "3" / "1234"
    visible_before_listen: list[bool] = []

    class Recording(socket.socket):
        def listen(self, *args: int) -> None:
            visible_before_listen.append(path.exists())
            super().listen(*args)

    monkeypatch.setattr(socket, "socket", Recording)
    bound = bind_fabric_socket(fabric_dir, VsockAddr(3, 1234))
    monkeypatch.undo()
    try:
        assert visible_before_listen == [False]
        assert probe_listener(path)
        assert os.listdir(path.parent) == ["1234"]  # no temporary name left behind
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    finally:
        bound.sock.close()


def test_a_binder_still_setting_up_is_not_taken_for_a_stale_file(
    fabric_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second binder between the first one's bind() and listen(): exactly one of them wins
    and the file leads to the winner (the other's probe must not see a dead listener)."""
    path = fabric_dir / "3" / "1234"
    raced: list[object] = []

    class Racing(socket.socket):
        def listen(self, *args: int) -> None:
            if not raced:
                raced.append(None)
                try:
                    raced.append(bind_fabric_socket(fabric_dir, VsockAddr(3, 1234)))
                except VsockAddressInUse as exc:
                    raced.append(exc)
            super().listen(*args)

    monkeypatch.setattr(socket, "socket", Racing)
    try:
        first: object = bind_fabric_socket(fabric_dir, VsockAddr(3, 1234))
    except VsockAddressInUse as exc:
        first = exc
    monkeypatch.undo()
    second = raced[1]
    winners = [b for b in (first, second) if not isinstance(b, VsockAddressInUse)]
    try:
        assert len(winners) == 1, (first, second)
        [winner] = winners
        assert isinstance(winner, BoundSocket)
        st = path.lstat()
        assert (st.st_dev, st.st_ino) == winner.ident
        assert probe_listener(path)
    finally:
        for b in winners:
            assert isinstance(b, BoundSocket)
            b.sock.close()
