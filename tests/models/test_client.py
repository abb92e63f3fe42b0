"""The client SDK's failure modes: unreachable endpoints, bad addresses, deadlines (issue 10,
items 4 and 5). Nothing here needs an enclave: the cases are about what answers, or does not."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio
import trio.testing

from models.client import (
    DEFAULT_TIMEOUT_S,
    BlockingInferenceClient,
    InferenceClient,
    open_inference_client,
    parse_endpoint,
    policy_for,
)
from models.digits import MODEL_PATH
from models.engine import EngineConfig, ModelEngine, create_session
from models.errors import InferenceTimeoutError, ModelError
from models.service import InferenceService, ModelEntry
from transport.channel import DocumentVerifier, PeerAttestation
from transport.errors import AddressError, PeerUnreachable
from transport.rpc import open_rpc_client, serve_rpc


def _refusing_verifier(document: bytes, *, nonce: bytes) -> PeerAttestation:
    raise AssertionError("no document should ever be verified in these tests")


VERIFIER: DocumentVerifier = _refusing_verifier


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_default_deadline_is_at_most_30_s() -> None:
    assert DEFAULT_TIMEOUT_S <= 30


def test_endpoints_use_the_one_parser() -> None:
    assert parse_endpoint("127.0.0.1:5005") == ("127.0.0.1", 5005)
    assert parse_endpoint("[::1]:5005") == ("::1", 5005)
    for bad in ("127.0.0.1", "http://127.0.0.1:5005", "::1:5005", "host:0", "host:99999"):
        with pytest.raises(AddressError):
            parse_endpoint(bad)


async def test_nothing_listening_is_unreachable_not_an_attestation_failure() -> None:
    """Regression (issue 10): both printed ``authentication failed``."""
    endpoint = f"127.0.0.1:{_free_port()}"
    with trio.fail_after(10), pytest.raises(PeerUnreachable, match="nothing listens") as info:
        async with open_inference_client(endpoint, verifier=VERIFIER):
            pass
    assert f"enclave unreachable at {endpoint}" in str(info.value)


async def test_bad_endpoint_is_an_address_error() -> None:
    with pytest.raises(AddressError, match="without a scheme"):
        async with open_inference_client("http://127.0.0.1:5005", verifier=VERIFIER):
            pass


async def test_no_handshake_ends_in_a_typed_timeout() -> None:
    """A peer that accepts and then says nothing: the connect deadline, not a hang."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held: list[trio.abc.Stream] = []

    async def silent(stream: trio.abc.Stream) -> None:
        held.append(stream)  # keep it open, say nothing
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, silent, listeners)
        with trio.fail_after(10), pytest.raises(InferenceTimeoutError, match=r"within 0\.3 s"):
            async with open_inference_client(
                f"127.0.0.1:{port}", verifier=VERIFIER, connect_timeout_s=0.3
            ):
                pass
        nursery.cancel_scope.cancel()


def test_blocking_client_reports_unreachable() -> None:
    client = BlockingInferenceClient(f"127.0.0.1:{_free_port()}", verifier=VERIFIER)
    with pytest.raises(PeerUnreachable), client:
        pass


def test_policy_for_needs_a_pcr() -> None:
    with pytest.raises(ValueError, match="at least one PCR"):
        policy_for()
    policy = policy_for(pcr0="00" * 48)
    assert policy.measurements[0].pcrs[0] == bytes(48)


# --- a server that stops answering mid-call ---------------------------------------------------


class WithholdingStream(trio.abc.Stream):
    """The client's side of a relay that stops passing the server's bytes on when told to."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.withhold = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.withhold:
            await trio.sleep_forever()
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def withholding_client() -> AsyncIterator[tuple[InferenceClient, WithholdingStream]]:
    data = MODEL_PATH.read_bytes()
    engine = ModelEngine("digits", create_session(data), config=EngineConfig(execution="inline"))
    entry = ModelEntry("digits", digest=hashlib.sha384(data).digest(), engine=engine)
    service = InferenceService({"digits": entry})
    client_stream, server_stream = trio.testing.memory_stream_pair()
    relay = WithholdingStream(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_rpc, server_stream, service.connection_handler())
        async with open_rpc_client(relay) as rpc:
            yield InferenceClient(rpc, None, timeout_s=5.0), relay
        nursery.cancel_scope.cancel()


async def test_withheld_answers_end_in_a_typed_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    x = np.zeros((2, 64), np.float32)
    async with withholding_client() as (client, relay):
        assert (await client.infer("digits", {"pixels": x}))["label"].shape == (2,)
        relay.withhold = True
        t0 = trio.current_time()
        with pytest.raises(InferenceTimeoutError, match=r"within 5 s \(infer\)") as info:
            await client.infer("digits", {"pixels": x})
        assert trio.current_time() - t0 == pytest.approx(5.0)
        assert isinstance(info.value, ModelError)
        assert info.value.code == "deadline_exceeded"
        with pytest.raises(InferenceTimeoutError, match="within 1 s"):
            await client.list_models(timeout_s=1)
        with pytest.raises(InferenceTimeoutError, match="stream output"):
            async for _ in client.stream("digits", [{"pixels": x}] * 3):
                pass


def test_client_timeout_is_checked() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        InferenceClient(None, None, timeout_s=0)  # type: ignore[arg-type]
