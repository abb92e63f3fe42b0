"""Client failover (``models.client``): an idempotent call whose connection breaks is retried
once on a fresh, re-attested connection that must show the same PCR0 and PCR16; a stream gets
``StreamInterrupted`` with how many inputs were answered; nothing is ever answered by an
enclave that fails the policy.

The "replicas" are in-process servers behind one TCP address (a real attested channel with test
documents, real RPC); each connection goes to the replica the test names current, and a replica
can be made to die under a call (its connection is closed without a close record).
Real enclaves: tests/integration/test_fleet.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pytest
import trio

from models.client import InferenceClient, StreamInterrupted, open_inference_client
from models.tensors import decode_tensors, encode_tensors
from models.text.embeddings import Embeddings
from models.text.wire import EMBED_STREAM, encode_answer
from transport.channel import accept_channel
from transport.channel.testing import TestAuthority, default_pcrs
from transport.errors import AuthenticationFailed
from transport.rpc import RpcStream, route, serve_rpc, unary

TIMEOUT_S = 15
MODELS = hashlib.sha384(b"the models").digest()


@dataclass
class Replica:
    name: str
    pcrs: dict[int, bytes]
    die_after: int | None = None  # answers before it dies under the next call
    answered: int = 0


@dataclass
class Fleet:
    authority: TestAuthority = field(default_factory=TestAuthority)
    current: Replica | None = None
    connections: list[str] = field(default_factory=list)
    #: connections to close without a byte first (a relay whose replica just died)
    voids: int = 0

    async def serve(self, stream: trio.SocketStream) -> None:
        if self.voids:
            self.voids -= 1
            self.connections.append("void")
            await stream.aclose()
            return
        replica = self.current
        assert replica is not None
        self.connections.append(replica.name)
        attester = self.authority.attester(
            module_id=f"i-test-enc-{replica.name}", pcrs=replica.pcrs
        )
        try:
            channel = await accept_channel(stream, attester=attester)
        except Exception:
            return
        died = trio.Event()

        async def infer(request: Any, _stream: RpcStream) -> Any:
            if replica.die_after is not None and replica.answered >= replica.die_after:
                died.set()
                await trio.sleep_forever()
            replica.answered += 1
            tensors = decode_tensors(request["inputs"], max_bytes=1 << 20, what="inputs")
            return {
                "outputs": encode_tensors(
                    {"y": tensors["x"] * 2, "by": np.frombuffer(replica.name.encode(), np.uint8)}
                )
            }

        async def embed_stream_handler(st: RpcStream) -> None:
            async for message in st:
                if replica.die_after is not None and replica.answered >= replica.die_after:
                    died.set()
                    await trio.sleep_forever()
                replica.answered += 1
                n = len(message["texts"])
                vectors = np.full((n, 4), replica.answered, dtype=np.float32)
                await st.send(encode_answer(Embeddings(vectors, (False,) * n)))
            await st.send_end()

        async def stream_handler(st: RpcStream) -> None:
            async for message in st:
                if replica.die_after is not None and replica.answered >= replica.die_after:
                    died.set()
                    await trio.sleep_forever()
                replica.answered += 1
                await st.send({"outputs": message["inputs"]})
            await st.send_end()

        async with trio.open_nursery() as nursery:

            async def kill_when_dead() -> None:
                await died.wait()
                await trio.sleep(0.2)  # what it answered reaches the client first
                await trio.aclose_forcefully(channel.transport_stream)  # no close record
                nursery.cancel_scope.cancel()

            nursery.start_soon(kill_when_dead)
            try:
                await serve_rpc(
                    channel,
                    route(
                        {
                            "infer": unary(infer),
                            "catalog": unary(lambda r, s: _catalog()),
                            "stream": stream_handler,
                            EMBED_STREAM: embed_stream_handler,
                        }
                    ),
                )
            except Exception:
                pass
            nursery.cancel_scope.cancel()


async def _catalog() -> Any:
    await trio.lowlevel.checkpoint()
    return {"models": []}


IMAGE = {**default_pcrs(), 16: MODELS}


async def _start(nursery: trio.Nursery, fleet: Fleet) -> str:
    listeners = await nursery.start(partial(trio.serve_tcp, fleet.serve, 0, host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def _verifier(fleet: Fleet) -> Any:
    return fleet.authority.verifier(expected_pcrs={0: IMAGE[0]})


async def _infer(client: InferenceClient) -> str:
    out = await client.infer("m", {"x": np.arange(3, dtype=np.float32)})
    assert out["y"].tolist() == [0.0, 2.0, 4.0]
    return bytes(out["by"]).decode()


async def test_a_unary_call_is_retried_once_on_another_replica() -> None:
    fleet = Fleet(current=Replica("a", IMAGE, die_after=1))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            endpoint = await _start(nursery, fleet)
            async with open_inference_client(endpoint, verifier=_verifier(fleet)) as client:
                assert await _infer(client) == "a"
                fleet.current = Replica("b", IMAGE)  # the ingress would now pick b
                assert await _infer(client) == "b"  # a died under the call; retried on b
                assert client.failovers == 1
                assert client.attestation.module_id == "i-test-enc-b"
                assert await _infer(client) == "b"  # and the client stays on b
                assert (await client.list_models()) == []
            nursery.cancel_scope.cancel()
    assert fleet.connections == ["a", "b"]


@pytest.mark.parametrize("index", [0, 16])
async def test_a_replica_with_another_pcr0_or_pcr16_never_answers(index: int) -> None:
    fleet = Fleet(current=Replica("a", IMAGE, die_after=1))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            endpoint = await _start(nursery, fleet)
            # The policy pins PCR0 only: another PCR16 would pass it, the failover pin does not.
            async with open_inference_client(endpoint, verifier=_verifier(fleet)) as client:
                assert await _infer(client) == "a"
                # PCR0: the policy refuses it too; PCR16: only the failover pin does.
                other = {**IMAGE, index: hashlib.sha384(b"other").digest()}
                imposter = Replica("imposter", other)
                fleet.current = imposter
                with pytest.raises(AuthenticationFailed):
                    await _infer(client)
                assert imposter.answered == 0  # the call never reached it
            nursery.cancel_scope.cancel()


async def test_a_call_that_fails_again_after_its_retry_raises() -> None:
    fleet = Fleet(current=Replica("a", IMAGE, die_after=1))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            endpoint = await _start(nursery, fleet)
            async with open_inference_client(endpoint, verifier=_verifier(fleet)) as client:
                await _infer(client)
                fleet.current = Replica("b", IMAGE, die_after=0)  # b dies under the retry too
                with pytest.raises(Exception) as info:
                    await _infer(client)
                assert not isinstance(info.value, AssertionError)
            nursery.cancel_scope.cancel()
    assert fleet.connections == ["a", "b"]  # exactly one retry


async def test_a_stream_says_how_many_inputs_were_answered() -> None:
    fleet = Fleet(current=Replica("a", IMAGE, die_after=5))
    inputs = [{"x": np.full(2, i, dtype=np.float32)} for i in range(20)]
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            endpoint = await _start(nursery, fleet)
            async with open_inference_client(endpoint, verifier=_verifier(fleet)) as client:
                got = []
                with pytest.raises(StreamInterrupted) as info:  # noqa: PT012
                    async for out in client.stream("m", inputs, coalesce_bytes=0):
                        got.append(int(out["x"][0]))
                assert info.value.acknowledged == len(got) == 5
                assert got == [0, 1, 2, 3, 4]
                fleet.current = Replica("b", IMAGE)
                rest = [
                    int(o["x"][0]) async for o in client.stream("m", inputs[5:], coalesce_bytes=0)
                ]
                assert rest == list(range(5, 20))  # resumed on a fresh connection
                assert client.failovers == 1
            nursery.cancel_scope.cancel()


async def test_a_text_stream_says_how_many_batches_were_answered_and_the_next_reconnects() -> None:
    """Regression: ``embed_stream`` opened its stream on the connection as it was (a broken one
    after a failure) and let the break out untyped; it now behaves as :meth:`stream` does."""
    fleet = Fleet(current=Replica("a", IMAGE, die_after=3))
    batches = [[f"text {i}"] for i in range(8)]
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            endpoint = await _start(nursery, fleet)
            async with open_inference_client(endpoint, verifier=_verifier(fleet)) as client:
                got = []
                with pytest.raises(StreamInterrupted) as info:  # noqa: PT012
                    async for e in client.embed_stream("m", batches):
                        got.append(int(e.vectors[0, 0]))
                assert info.value.acknowledged == len(got) == 3
                fleet.current = Replica("b", IMAGE)
                rest = [int(e.vectors[0, 0]) async for e in client.embed_stream("m", batches[3:])]
                assert rest == [1, 2, 3, 4, 5]  # answered by replica b, on a fresh connection
                assert client.failovers == 1
            nursery.cancel_scope.cancel()


async def test_no_failover_for_an_open_stream_target_or_when_disabled() -> None:
    fleet = Fleet(current=Replica("a", IMAGE, die_after=1))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            endpoint = await _start(nursery, fleet)
            async with open_inference_client(
                endpoint, verifier=_verifier(fleet), failover=False
            ) as client:
                await _infer(client)
                fleet.current = Replica("b", IMAGE)
                with pytest.raises(Exception) as info:
                    await _infer(client)
                assert not isinstance(info.value, AssertionError)
                assert client.failovers == 0
            nursery.cancel_scope.cancel()
    assert fleet.connections == ["a"]


async def test_an_error_in_the_block_comes_out_as_itself() -> None:
    fleet = Fleet(current=Replica("a", IMAGE))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            endpoint = await _start(nursery, fleet)
            cause = ValueError("why")
            with pytest.raises(LookupError) as info:
                async with open_inference_client(endpoint, verifier=_verifier(fleet)):
                    raise LookupError("mine") from cause
            assert info.value.__cause__ is cause
            nursery.cancel_scope.cancel()


async def test_a_failover_that_first_reaches_nothing_tries_again() -> None:
    """Right after a replica died, an ingress may still route a connection to it, which then
    closes without a byte: nothing was sent, nothing attested, so the failover connects again
    (within its connect timeout) instead of failing the call."""
    fleet = Fleet(current=Replica("a", IMAGE, die_after=1))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            endpoint = await _start(nursery, fleet)
            async with open_inference_client(endpoint, verifier=_verifier(fleet)) as client:
                assert await _infer(client) == "a"
                fleet.current = Replica("b", IMAGE)
                fleet.voids = 2
                assert await _infer(client) == "b"
                assert client.failovers == 1
            nursery.cancel_scope.cancel()
    assert fleet.connections == ["a", "void", "void", "b"]
