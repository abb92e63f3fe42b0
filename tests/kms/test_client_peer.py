"""KmsClient against a misbehaving server: every failure is a typed error, never an h11 one.

A server that dies mid-answer (the kill -9 test) is a transport failure
(``trio.BrokenResourceError``); a server that answers with something that is not HTTP/1.1 is a
``KmsError``. Before, both surfaced as ``h11.RemoteProtocolError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.client import Credentials, KmsClient
from kms.errors import KmsApiError, KmsError

pytestmark = pytest.mark.timeout(60)

CREDS = Credentials("AKIDPEER", "peer-secret")
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: 2\r\n\r\n{}"

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def _read_request(stream: trio.SocketStream) -> None:
    """Read one request: the head, then Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, "client closed before sending a request"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += await stream.receive_some(65536)


async def _call_against(handler: Handler, *, calls: int = 1) -> list[int]:
    """Serve ``handler`` on loopback TCP and make ``calls`` calls; returns the connection count."""
    accepted: list[int] = []

    async def serve(stream: trio.SocketStream) -> None:
        accepted.append(1)
        async with stream:
            await handler(stream)

    failure: BaseException | None = None
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            client = KmsClient(endpoint=f"http://127.0.0.1:{port}", credentials=CREDS)
            try:
                for _ in range(calls):
                    await client.call("ListKeys", {})
            except Exception as exc:  # raised below, outside the nursery's exception group
                failure = exc
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return [len(accepted)]


async def test_server_closing_before_it_answers_is_a_broken_connection() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)

    with pytest.raises(trio.BrokenResourceError, match="before it answered"):
        await _call_against(handler)


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Le",  # the head cut off
        b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"Keys":',  # the body cut off
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"Key',  # a chunk cut off
    ],
)
async def test_server_dying_mid_answer_is_a_broken_connection(partial: bytes) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(partial)

    with pytest.raises(trio.BrokenResourceError):
        await _call_against(handler)


@pytest.mark.parametrize(
    "answer",
    [
        b"HELLO THERE\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20_000,  # a head over h11's 16 KiB bound
    ],
)
async def test_an_answer_that_is_not_http_is_a_kms_error(answer: bytes) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(answer)
        await trio.sleep_forever()  # the client must not need the EOF to decide

    with pytest.raises(KmsError, match=r"not valid HTTP/1\.1"):
        await _call_against(handler)


async def test_an_idle_connection_the_server_closed_is_replaced_once() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(_OK)
        # then close while the client holds the connection idle

    assert await _call_against(handler, calls=3) == [3]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=st.binary(max_size=400), close=st.booleans())
def test_any_answer_is_a_result_or_a_typed_error(answer: bytes, close: bool) -> None:
    """Whatever the server sends, the caller sees an answer or one of the documented errors."""

    async def main() -> None:
        client_side, server_side = trio.testing.memory_stream_pair()

        async def connect() -> trio.abc.Stream:
            return client_side

        async def server() -> None:
            await server_side.send_all(answer)
            if close:
                await server_side.aclose()

        client = KmsClient(connect=connect, credentials=CREDS)
        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server)
                try:
                    await client.call("ListKeys", {})
                except (KmsError, KmsApiError, trio.BrokenResourceError):
                    pass
                nursery.cancel_scope.cancel()
        # Without a close, a truncated answer legitimately waits for more bytes: only then may
        # the call time out.
        assert not (scope.cancelled_caught and close)

    # The autojump clock makes a call that waits for bytes that never come time out at once.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
