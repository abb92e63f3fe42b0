"""NSM server and client over real sockets (trio), byte streams, and the /dev/nsm ioctl path."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from attest.ca import LocalCA
from attest.document import parse_document
from attest.errors import NsmError, NsmUnavailableError
from attest.nsm import client as nsm_client
from attest.nsm import protocol as p
from attest.nsm.client import NSM_IOCTL_REQUEST, DevNsmTransport, NsmClient, nsm_ioctl
from attest.nsm.device import ZERO_PCR, EnclaveIdentity, NsmDevice
from attest.nsm.server import serve_nsm
from attest.policy import Policy
from attest.verify import Verifier

from .helpers import MODULE_ID, pcr


@pytest.fixture
def device(local_ca: LocalCA) -> NsmDevice:
    return NsmDevice(
        EnclaveIdentity(MODULE_ID, {0: pcr(1), 1: pcr(2), 2: pcr(3)}),
        local_ca.new_signer(MODULE_ID),
    )


async def exercise(client: NsmClient, local_ca: LocalCA) -> None:
    info = await client.describe_nsm()
    assert info["module_id"] == MODULE_ID
    assert info["max_pcrs"] == 32
    assert info["locked_pcrs"] == list(range(16))
    assert info["digest"] == "SHA384"
    new = await client.extend_pcr(16, b"model-digest")
    assert new == hashlib.sha384(ZERO_PCR + b"model-digest").digest()
    assert await client.describe_pcr(16) == (False, new)
    await client.lock_pcr(16)
    with pytest.raises(NsmError) as info_err:
        await client.extend_pcr(16, b"x")
    assert info_err.value.code == "ReadOnlyIndex"
    with pytest.raises(NsmError) as info_err:
        await client.describe_pcr(40)
    assert info_err.value.code == "InvalidIndex"
    await client.lock_pcrs(17)
    assert len(await client.get_random()) == 256
    doc = await client.attestation(nonce=b"nonce", public_key=b"pk", user_data=b"ud")
    verified = Verifier([local_ca.root_certificate]).verify(
        doc, policy=Policy(any_measurement=True, nonce=b"nonce")
    )
    assert verified.document.pcrs[16] == new
    assert verified.document.public_key == b"pk"
    with pytest.raises(NsmError) as info_err:
        await client.attestation(user_data=b"u" * 1025)
    assert info_err.value.code == "InputTooLarge"
    with pytest.raises(NsmError) as info_err:  # client-side request cap, like the driver
        await client.extend_pcr(20, b"x" * 5000)
    assert info_err.value.code == "InputTooLarge"


async def test_seqpacket_socketpair(device: NsmDevice, local_ca: LocalCA) -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_nsm, parent, device)
            async with NsmClient.from_socket(child) as client:
                await exercise(client, local_ca)
            # serve_nsm returns once the enclave end is closed


async def test_stream_socket_and_memory_stream(device: NsmDevice, local_ca: LocalCA) -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_nsm, parent, device)
            async with NsmClient.from_socket(child) as client:
                assert (await client.describe_nsm())["module_id"] == MODULE_ID
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_nsm, a, device)
            async with NsmClient.from_stream(b) as client:
                assert len(await client.get_random()) == 256


async def test_oversized_datagram_and_garbage(device: NsmDevice) -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tchild = trio.socket.from_stdlib_socket(child)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_nsm, parent, device)
            await tchild.send(b"\xa1" * (p.NSM_REQUEST_MAX_SIZE + 1))
            assert p.decode_response(await tchild.recv(20000)) == p.ErrorResponse("InputTooLarge")
            await tchild.send(b"\xff\x00\x13")
            assert p.decode_response(await tchild.recv(20000)) == p.ErrorResponse(
                "InvalidOperation"
            )
            await tchild.send(p.encode_request(p.DescribePCR(0)))  # still serving
            assert isinstance(p.decode_response(await tchild.recv(20000)), p.DescribePCRResponse)
            tchild.close()


async def test_oversized_stream_frame_closes(device: NsmDevice) -> None:
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_nsm, a, device)
            await b.send_all((p.NSM_REQUEST_MAX_SIZE + 1).to_bytes(4, "big"))
            header = await b.receive_some(4)
            body = await b.receive_some(int.from_bytes(header, "big"))
            assert p.decode_response(body) == p.ErrorResponse("InputTooLarge")
            assert await b.receive_some(10) == b""  # server closed the stream


async def test_open_from_env(device: NsmDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monkeypatch.setenv("ENCLAVE_NSM_FD", str(child.fileno()))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_nsm, parent, device)
            c1 = await NsmClient.open()
            c2 = await NsmClient.open()  # shares the channel; requests are serialised

            async def ask(c: NsmClient, out: list[Any]) -> None:
                for _ in range(5):
                    out.append(await c.describe_pcr(0))

            r1: list[Any] = []
            r2: list[Any] = []
            async with trio.open_nursery() as inner:
                inner.start_soon(ask, c1, r1)
                inner.start_soon(ask, c2, r2)
            assert r1 == r2 == [(True, pcr(1))] * 5
            await c1.aclose()
            assert (await c2.describe_nsm())["module_id"] == MODULE_ID
            await c2.aclose()
            child.close()


async def test_open_without_any_nsm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ENCLAVE_NSM_FD", raising=False)
    monkeypatch.setattr(nsm_client, "NSM_DEVICE_PATH", str(tmp_path / "nsm"))
    with pytest.raises(NsmUnavailableError):
        await NsmClient.open()
    monkeypatch.setenv("ENCLAVE_NSM_FD", "nope")
    with pytest.raises(NsmUnavailableError):
        await NsmClient.open()


async def test_channel_closed_by_device(device: NsmDevice) -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent.close()
    client = NsmClient.from_socket(child)
    with trio.fail_after(5), pytest.raises(NsmUnavailableError):
        await client.get_random()
    await client.aclose()
    with pytest.raises(NsmUnavailableError):
        await client.get_random()


# --- /dev/nsm ioctl ------------------------------------------------------------------------


def test_ioctl_request_number() -> None:
    # _IOWR(0x0A, 0, struct nsm_message{iovec, iovec}) on 64-bit Linux
    assert NSM_IOCTL_REQUEST == 0xC0200A00


def fake_driver(device: NsmDevice) -> Any:
    """An ioctl stand-in behaving like the nsm driver: read request iovec, fill response."""

    def ioctl(fd: int, request: int, msg: Any, mutate: bool) -> int:
        assert request == NSM_IOCTL_REQUEST
        assert mutate
        data = ctypes.string_at(msg.request.iov_base, msg.request.iov_len)
        response = device.handle(data)
        if len(response) > msg.response.iov_len:
            raise OSError(errno.ENOMEM, "response too large")
        ctypes.memmove(msg.response.iov_base, response, len(response))
        msg.response.iov_len = len(response)
        return 0

    return ioctl


async def test_dev_nsm_transport(device: NsmDevice, tmp_path: Path) -> None:
    fake_dev = tmp_path / "nsm"
    fake_dev.write_bytes(b"")
    client = NsmClient(DevNsmTransport(str(fake_dev), ioctl=fake_driver(device)))
    with trio.fail_after(10):
        assert await client.describe_pcr(1) == (True, pcr(2))
        doc = parse_document(await client.attestation(nonce=b"x"))
        assert doc.nonce == b"x"
        with pytest.raises(NsmError) as info:
            await client.lock_pcr(0)
        assert info.value.code == "ReadOnlyIndex"
    await client.aclose()


@pytest.mark.parametrize(
    ("err", "code"), [(errno.EMSGSIZE, "InputTooLarge"), (errno.EIO, "InternalError")]
)
def test_ioctl_errno_mapping(err: int, code: str) -> None:
    def failing(fd: int, request: int, msg: Any, mutate: bool) -> int:
        raise OSError(err, "driver says no")

    with pytest.raises(NsmError) as info:
        nsm_ioctl(0, p.encode_request(p.GetRandom()), ioctl=failing)
    assert info.value.code == code
    with pytest.raises(NsmError) as info:
        nsm_ioctl(0, b"\x00" * 4097, ioctl=failing)
    assert info.value.code == "InputTooLarge"


def test_real_ioctl_on_a_non_nsm_fd(tmp_path: Path) -> None:
    # the real fcntl.ioctl accepts our struct; a regular file answers ENOTTY -> InternalError
    path = tmp_path / "not-nsm"
    path.write_bytes(b"")
    with path.open("r+b") as f, pytest.raises(NsmError) as info:
        nsm_ioctl(f.fileno(), p.encode_request(p.GetRandom()))
    assert info.value.code == "InternalError"
