"""A host listener learns which enclave connected (``transport.fabric.origin``), as ``accept()``
on AF_VSOCK tells the parent on Nitro: from the broker, never from the enclave's bytes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tests.transport.test_fabric_broker import TIMEOUT_S, broker
from transport.fabric.origin import ORIGIN_PREFIX, bind_origin, origin_cid, peer_cid
from transport.vsock import FabricPolicy, VsockAddr, open_vsock_listener, open_vsock_stream


async def test_a_host_listener_sees_the_connecting_enclaves_cid(fabric_dir: Path) -> None:
    seen: list[int | None] = []
    with trio.fail_after(TIMEOUT_S):
        async with (
            await open_vsock_listener(8100, fabric_dir=fabric_dir) as host,
            broker(fabric_dir, FabricPolicy(cid=21, parent_ports=None)) as (enclave21, _),
            broker(fabric_dir, FabricPolicy(cid=22, parent_ports=None)) as (enclave22, _),
        ):
            for client in (enclave21, enclave22):
                async with await client.connect(VsockAddr(3, 8100)):
                    conn = await host.accept()
                    seen.append(peer_cid(conn))
                    await conn.aclose()
            # A host process's own connection carries no enclave CID.
            async with await open_vsock_stream(VsockAddr(3, 8100), fabric_dir=fabric_dir):
                conn = await host.accept()
                seen.append(peer_cid(conn))
                await conn.aclose()
    assert seen == [21, 22, None]


def test_origin_names_round_trip_and_nothing_else_parses() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        bind_origin(sock, 4242)
        name = sock.getsockname()
        assert isinstance(name, bytes)
        assert name.startswith(ORIGIN_PREFIX)
        assert origin_cid(name) == 4242
    with pytest.raises(ValueError, match="enclave CID"):
        bind_origin(socket.socket(socket.AF_UNIX), 3)  # the parent is not an enclave
    assert origin_cid(b"") is None
    assert origin_cid("") is None
    assert origin_cid(None) is None
    assert origin_cid(ORIGIN_PREFIX + b"3/0123456789abcdef") is None  # not an enclave CID
    assert origin_cid(ORIGIN_PREFIX + b"99999999999/0123456789abcdef") is None
    assert peer_cid(object()) is None


@given(st.binary(max_size=80))
def test_arbitrary_peer_names_never_crash(name: bytes) -> None:
    cid = origin_cid(name)
    assert cid is None or 4 <= cid <= 0xFFFF_FFFE
