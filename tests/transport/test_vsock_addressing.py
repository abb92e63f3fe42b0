"""Pure tests: addresses, the fabric layout, backend selection, native sockaddr handling."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.errors import ConfigurationError, VsockConnectionRefused, VsockError
from transport.fabric import native
from transport.fabric.addressing import cid_dir, parse_socket_name, socket_path
from transport.fabric.backend import Backend, PlatformProbe, select_backend
from transport.vsock import (
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_HYPERVISOR,
    VMADDR_CID_LOCAL,
    VMADDR_CID_PARENT,
    VMADDR_PORT_ANY,
    FabricPolicy,
    InvalidVsockAddress,
    VsockAddr,
    is_enclave_cid,
)


def test_nitro_constants() -> None:
    assert (VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL, VMADDR_CID_HOST, VMADDR_CID_PARENT) == (
        0,
        1,
        2,
        3,
    )
    assert VMADDR_CID_ANY == VMADDR_PORT_ANY == 0xFFFFFFFF
    assert not is_enclave_cid(3)
    assert is_enclave_cid(4)
    assert is_enclave_cid(0xFFFFFFFE)
    assert not is_enclave_cid(VMADDR_CID_ANY)


@pytest.mark.parametrize(("cid", "port"), [(-1, 0), (0, -1), (1 << 32, 0), (0, 1 << 32)])
def test_vsock_addr_range(cid: int, port: int) -> None:
    with pytest.raises(InvalidVsockAddress, match="32-bit") as caught:
        VsockAddr(cid, port)
    assert isinstance(caught.value, VsockError)
    assert isinstance(caught.value, ValueError)


@settings(max_examples=200)
@given(st.integers(min_value=-(1 << 40), max_value=1 << 40), st.integers(-(1 << 40), 1 << 40))
def test_vsock_addr_is_valid_exactly_for_u32(cid: int, port: int) -> None:
    valid = 0 <= cid <= 0xFFFFFFFF and 0 <= port <= 0xFFFFFFFF
    try:
        addr = VsockAddr(cid, port)
    except InvalidVsockAddress:
        assert not valid
    else:
        assert valid
        assert addr.as_tuple() == (cid, port)


@pytest.mark.parametrize("bad", [1.0, "3", True, None])
def test_vsock_addr_types(bad: object) -> None:
    with pytest.raises(TypeError):
        VsockAddr(bad, 1)  # type: ignore[arg-type]


def test_vsock_addr_value_semantics() -> None:
    a = VsockAddr(16, 5005)
    assert a == VsockAddr(16, 5005)
    assert hash(a) == hash(VsockAddr(16, 5005))
    assert sorted([VsockAddr(16, 2), VsockAddr(3, 9), VsockAddr(16, 1)])[0] == VsockAddr(3, 9)
    assert a.as_tuple() == (16, 5005)
    assert str(a) == "vsock:16:5005"


def test_socket_path_layout(tmp_path: Path) -> None:
    assert socket_path(tmp_path, VsockAddr(16, 5005)) == tmp_path / "16" / "5005"
    assert cid_dir(tmp_path, 3) == tmp_path / "3"
    with pytest.raises(VsockError, match="wildcard"):
        socket_path(tmp_path, VsockAddr(16, VMADDR_PORT_ANY))
    with pytest.raises(VsockError, match="wildcard"):
        socket_path(tmp_path, VsockAddr(VMADDR_CID_ANY, 1))
    with pytest.raises(VsockError, match="longer than"):
        socket_path(tmp_path / ("x" * 120), VsockAddr(16, 5005))


@pytest.mark.parametrize(
    ("name", "port"),
    [
        ("5005", 5005),
        ("0", 0),
        ("4294967294", 4294967294),
        ("4294967295", None),
        ("05", None),
        ("x", None),
        ("", None),
        (".lock", None),
        ("99999999999", None),
    ],
)
def test_parse_socket_name(name: str, port: int | None) -> None:
    assert parse_socket_name(name) == port


def test_fabric_policy() -> None:
    policy = FabricPolicy(cid=16, parent_ports=frozenset({8000}), peer_cids=frozenset({17}))
    assert policy.allows(VsockAddr(3, 8000))
    assert not policy.allows(VsockAddr(3, 8001))
    assert policy.allows(VsockAddr(3, 9000), handled_ports=frozenset({9000}))
    assert policy.allows(VsockAddr(17, 1))
    assert not policy.allows(VsockAddr(18, 1))
    assert not policy.allows(VsockAddr(2, 8000))
    assert not policy.allows(VsockAddr(16, 1))
    assert FabricPolicy(cid=16, parent_ports=None).allows(VsockAddr(3, 12345))
    assert not FabricPolicy(cid=16, parent_ports=None).allows(VsockAddr(17, 1))
    with pytest.raises(ValueError, match="enclave CID"):
        FabricPolicy(cid=3, parent_ports=None)
    with pytest.raises(ValueError, match="peer CID"):
        FabricPolicy(cid=16, parent_ports=None, peer_cids=frozenset({16}))


# -- backend selection --------------------------------------------------------------------

NITRO_ENCLAVE = PlatformProbe(af_vsock=True, local_cid=16, nsm_device=True)
NITRO_PARENT = PlatformProbe(af_vsock=True, local_cid=3, nsm_device=False)
THIS_MACHINE_LIKE = PlatformProbe(af_vsock=True, local_cid=3, nsm_device=False)
NO_VSOCK = PlatformProbe(af_vsock=False, local_cid=None, nsm_device=False)


def _never() -> PlatformProbe:
    raise AssertionError("the platform must not be probed here")


@pytest.mark.parametrize(
    ("env", "probe", "expected"),
    [
        ({}, NO_VSOCK, Backend.HOST),
        ({}, THIS_MACHINE_LIKE, Backend.HOST),
        ({}, NITRO_PARENT, Backend.HOST),
        ({}, NITRO_ENCLAVE, Backend.NATIVE),
        ({}, PlatformProbe(af_vsock=True, local_cid=16, nsm_device=False), Backend.HOST),
        ({}, PlatformProbe(af_vsock=False, local_cid=None, nsm_device=True), Backend.HOST),
        ({"ENCLAVE_VSOCK_BACKEND": "AUTO"}, NITRO_ENCLAVE, Backend.NATIVE),
        ({"ENCLAVE_VSOCK_BACKEND": "emulated"}, NITRO_ENCLAVE, Backend.HOST),
        ({"ENCLAVE_VSOCK_BACKEND": "native"}, THIS_MACHINE_LIKE, Backend.NATIVE),
        ({"ENCLAVE_VSOCK_BACKEND": ""}, NO_VSOCK, Backend.HOST),
    ],
)
def test_select_backend(env: dict[str, str], probe: PlatformProbe, expected: Backend) -> None:
    assert select_backend(env, lambda: probe) is expected


@pytest.mark.parametrize("mode", ["auto", "emulated", None])
def test_fabric_fd_means_enclave_side_without_probing(mode: str | None) -> None:
    env = {"ENCLAVE_FABRIC_FD": "7"}
    if mode is not None:
        env["ENCLAVE_VSOCK_BACKEND"] = mode
    assert select_backend(env, _never) is Backend.ENCLAVE


def test_select_backend_errors() -> None:
    with pytest.raises(ConfigurationError, match="not one of"):
        select_backend({"ENCLAVE_VSOCK_BACKEND": "vhost"}, _never)
    with pytest.raises(ConfigurationError, match="not available"):
        select_backend({"ENCLAVE_VSOCK_BACKEND": "native"}, lambda: NO_VSOCK)


def test_this_machine_uses_the_emulated_host_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """vsock loopback does not work here, so auto must not pick native."""
    monkeypatch.delenv("ENCLAVE_FABRIC_FD", raising=False)
    monkeypatch.delenv("ENCLAVE_VSOCK_BACKEND", raising=False)
    from transport.vsock import current_backend

    assert current_backend() is Backend.HOST


# -- native sockaddr handling (no working AF_VSOCK needed) ---------------------------------


def test_native_sockaddr() -> None:
    assert native.native_sockaddr(VsockAddr(3, 8000)) == (3, 8000)
    assert native.native_sockaddr(VsockAddr(VMADDR_CID_ANY, VMADDR_PORT_ANY)) == (
        0xFFFFFFFF,
        0xFFFFFFFF,
    )


def test_local_cid_of_missing_device(tmp_path: Path) -> None:
    assert native.local_cid(str(tmp_path / "no-such-device")) is None


needs_af_vsock = pytest.mark.skipif(
    not native.af_vsock_supported(), reason="AF_VSOCK sockets cannot be created here"
)


@needs_af_vsock
async def test_native_listener_binds_wildcards() -> None:
    """bind()/listen() work without vsock loopback; the address is the (cid, port) tuple."""
    with trio.fail_after(5):
        listener = await native.open_native_listener(VMADDR_PORT_ANY)
        async with listener:
            cid, port = listener.socket.getsockname()
            assert listener.socket.family == socket.AF_VSOCK
            assert cid == VMADDR_CID_ANY
            assert 1024 <= port < VMADDR_PORT_ANY


@needs_af_vsock
async def test_native_connect_errors_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connect failures map onto the project's errors (simulated: no vsock loopback here)."""

    async def refuse(self: object, address: object) -> None:
        assert address == (5, 77)
        raise ConnectionResetError(104, "Connection reset by peer")

    probe = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    probe.close()
    monkeypatch.setattr(type(probe), "connect", refuse)
    with trio.fail_after(5), pytest.raises(VsockConnectionRefused):
        await native.open_native_stream(VsockAddr(5, 77))
