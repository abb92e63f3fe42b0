"""A man in the middle between the client and the ingress: every change to the bytes (flip,
drop, reorder, replay, truncate; either direction) is detected by the channel and no tampered
result is ever returned; the enclave keeps serving other connections."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
import trio

from models.client import open_inference_client
from models.digits import load_test_split
from transport.errors import EnclaveError

from .conftest import Served

pytestmark = pytest.mark.slow

_FRAME = struct.Struct("!BI")  # enclave-channel/1 frame header: type, body length
_DATA = 0x17  # encrypted application record


class _Truncate(Exception):
    pass


class Mitm:
    """TCP proxy that parses channel frames and, once armed, tampers with DATA records."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode: str | None = None
        self.direction = "s2c"
        self.fired = False
        self.port = 0

    def arm(self, mode: str, direction: str) -> None:
        self.mode, self.direction, self.fired = mode, direction, False

    def disarm(self) -> None:
        self.mode = None

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, "c2s", nursery.cancel_scope)
            nursery.start_soon(self._pump, upstream, client, "s2c", nursery.cancel_scope)

    def _transform(self, direction: str, frame: bytes, held: list[bytes]) -> list[bytes]:
        if self.mode is None or self.fired or direction != self.direction or frame[0] != _DATA:
            return [frame]
        mode = self.mode
        if mode == "flip":
            self.fired = True
            body = bytearray(frame)
            body[_FRAME.size + (len(frame) - _FRAME.size) // 2] ^= 0x04
            return [bytes(body)]
        if mode == "flip_header":
            self.fired = True
            body = bytearray(frame)
            body[0] = 0x15  # DATA -> CLOSE type byte: the header is the AAD
            return [bytes(body)]
        if mode == "drop":
            self.fired = True
            return []
        if mode == "replay":
            self.fired = True
            return [frame, frame]
        if mode == "reorder":
            if not held:
                held.append(frame)
                return []
            self.fired = True
            return [frame, held.pop()]
        if mode in ("truncate", "cut"):
            self.fired = True
            raise _Truncate(frame[: len(frame) // 2] if mode == "truncate" else b"")
        raise AssertionError(mode)

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, direction: str, scope: Any
    ) -> None:
        buf = bytearray()
        held: list[bytes] = []
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    await dst.send_eof()
                    return
                buf += data
                while len(buf) >= _FRAME.size:
                    _, length = _FRAME.unpack_from(buf)
                    if len(buf) < _FRAME.size + length:
                        break
                    frame = bytes(buf[: _FRAME.size + length])
                    del buf[: _FRAME.size + length]
                    for out in self._transform(direction, frame, held):
                        await dst.send_all(out)
        except _Truncate as cut:
            if cut.args[0]:
                await dst.send_all(cut.args[0])
            scope.cancel()  # both directions closed: EOF without an authenticated close
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()


CASES = [
    ("flip", "s2c"),
    ("flip", "c2s"),
    ("flip_header", "s2c"),
    ("drop", "s2c"),
    ("drop", "c2s"),
    ("reorder", "s2c"),
    ("reorder", "c2s"),
    ("replay", "s2c"),
    ("replay", "c2s"),
    ("truncate", "s2c"),
    ("cut", "s2c"),
]


async def test_mitm_detected(served: Served) -> None:
    x, _ = load_test_split()
    genuine = {}
    with trio.fail_after(20):
        client_cm = open_inference_client(served.endpoint, verifier=served.verifier())
        async with client_cm as client:
            for i in range(2):
                genuine[i] = (await client.infer("digits", {"pixels": x[i * 10 : i * 10 + 10]}))[
                    "probabilities"
                ]
    upstream = int(served.endpoint.rsplit(":", 1)[1])
    mitm = Mitm(upstream)
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            await nursery.start(mitm.serve)
            endpoint = f"127.0.0.1:{mitm.port}"
            for mode, direction in CASES:
                mitm.disarm()
                accepted: dict[int, np.ndarray] = {}
                errors: list[BaseException] = []
                try:
                    # failover=False: the calls must see the channel's verdict, not a retry
                    # on a fresh connection (which the mitm, disarmed by then, would let pass).
                    async with open_inference_client(
                        endpoint, verifier=served.verifier(), failover=False
                    ) as client:
                        assert (await client.infer("digits", {"pixels": x[:1]}))["label"].shape
                        mitm.arm(mode, direction)

                        async def call(
                            i: int,
                            delay: float,
                            client: Any = client,
                            accepted: dict[int, np.ndarray] = accepted,
                            errors: list[BaseException] = errors,
                        ) -> None:
                            await trio.sleep(delay)
                            try:
                                out = await client.infer(
                                    "digits", {"pixels": x[i * 10 : i * 10 + 10]}
                                )
                                accepted[i] = out["probabilities"]
                            except (EnclaveError, trio.BrokenResourceError) as exc:
                                errors.append(exc)

                        with trio.move_on_after(10) as hung:
                            async with trio.open_nursery() as calls:
                                calls.start_soon(call, 0, 0.0)
                                calls.start_soon(call, 1, 0.05)
                        assert not hung.cancelled_caught, f"{mode}/{direction}: client hung"
                except (EnclaveError, trio.BrokenResourceError) as exc:
                    errors.append(exc)
                assert mitm.fired, f"{mode}/{direction}: the tampering never happened"
                assert errors, f"{mode}/{direction}: tampering went undetected"
                # Nothing altered was ever accepted: whatever came back is the genuine answer.
                for i, probs in accepted.items():
                    np.testing.assert_array_equal(probs, genuine[i])
                if mode not in ("replay",):
                    assert len(accepted) < 2, f"{mode}/{direction}: {sorted(accepted)}"
            mitm.disarm()
            # The enclave is still serving new clients after all of that.
            async with open_inference_client(endpoint, verifier=served.verifier()) as client:
                out = await client.infer("digits", {"pixels": x[:10]})
                np.testing.assert_array_equal(out["probabilities"], genuine[0])
            nursery.cancel_scope.cancel()
