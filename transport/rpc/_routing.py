"""Server handlers: the shapes a method can take (:func:`unary`, :func:`unary_inline`, a plain
stream handler) and the dispatcher that picks one by method name (:func:`route`).

A *handler* is ``async def handler(stream: RpcStream) -> None``: it reads and sends messages on
its stream. :func:`unary` adapts a request-to-response coroutine; :func:`unary_inline` declares a
*synchronous* request-to-response function the server may run inside its reader task, with no
task at all (the fastest path, for work well under a millisecond). :func:`route` maps method
names to any of these; unknown methods fail with ``unimplemented``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, NoReturn

import trio

from transport.rpc._errors import RpcError
from transport.rpc._stream import EndOfStream, RpcStream

__all__ = [
    "Handler",
    "InlineFunction",
    "InlineUnary",
    "Router",
    "route",
    "unary",
    "unary_inline",
    "inline_function",
]

Handler = Callable[[RpcStream], Awaitable[None]]
"""A server handler: called once per stream, in its own task, with the stream."""

InlineFunction = Callable[[Any, RpcStream], Any]
"""A synchronous unary function ``fn(request, stream) -> response`` (see :func:`unary_inline`).

The stream passed to it is for :attr:`RpcStream.method` / :attr:`RpcStream.metadata` only."""


async def _unary_request(stream: RpcStream) -> Any:
    try:
        try:
            # The request usually arrived with the OPEN: skip a checkpoint (this task was just
            # started, so it has just been scheduled anyway).
            return stream.receive_nowait()
        except trio.WouldBlock:
            return await stream.receive()
    except EndOfStream:
        raise RpcError("invalid_argument", "a unary method needs one request") from None


def unary(fn: Callable[[Any, RpcStream], Awaitable[Any]]) -> Handler:
    """Adapt ``async def fn(request, stream) -> response`` into a stream handler.

    The handler reads one request, awaits ``fn`` and sends its result with END in one frame.
    A stream that ends without a request fails with ``invalid_argument``.
    """

    async def handler(stream: RpcStream) -> None:
        request = await _unary_request(stream)
        response = await fn(request, stream)
        await stream.send(response, end=True)

    return handler


class InlineUnary:
    """A unary method answered synchronously inside the server's reader task.

    Made by :func:`unary_inline`. Used as a handler (directly or in :func:`route`), the server
    runs ``fn(request, stream)`` as soon as the request arrives, with no task, no cancel scope
    and no hop between tasks, and writes the answer with the rest of the batch. ``stream`` is
    only for :attr:`RpcStream.method` / :attr:`RpcStream.metadata`; ``fn`` must not block.
    """

    def __init__(self, fn: InlineFunction) -> None:
        self.fn: Final = fn

    def inline_handler(self, method: str) -> InlineFunction | None:
        """The function to run inline for ``method`` (every method, for a bare InlineUnary)."""
        return self.fn

    async def __call__(self, stream: RpcStream) -> None:
        """Run as an ordinary handler (when not dispatched inline)."""
        request = await _unary_request(stream)
        await stream.send(self.fn(request, stream), end=True)


def unary_inline(fn: InlineFunction) -> InlineUnary:
    """Declare a *synchronous* unary method, answered in the server's reader task.

    The fastest path: no handler task is spawned. Use it for work that takes well under a
    millisecond and never blocks (a catalog lookup, a small model run inline as
    reference/perf-baseline.md §3 advises); while ``fn`` runs, the connection reads nothing
    else. ``fn`` raising :class:`RpcError` fails the call with its code; other exceptions are
    logged and sent as ``internal``.
    """
    return InlineUnary(fn)


def _unimplemented(request: Any, stream: RpcStream) -> NoReturn:
    raise RpcError("unimplemented", f"unknown method {stream.method[:64]!r}")


class Router:
    """A handler dispatching on :attr:`RpcStream.method` (see :func:`route`)."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers: Final = dict(handlers)

    def inline_handler(self, method: str) -> InlineFunction | None:
        """The synchronous function for ``method`` if it was declared with
        :func:`unary_inline`; unknown methods are refused inline too."""
        target = self.handlers.get(method)
        if target is None:
            return _unimplemented
        if isinstance(target, InlineUnary):
            return target.fn
        return None

    async def __call__(self, stream: RpcStream) -> None:
        target = self.handlers.get(stream.method)
        if target is None:
            _unimplemented(None, stream)
        await target(stream)


def route(handlers: Mapping[str, Handler]) -> Router:
    """A handler dispatching on :attr:`RpcStream.method`; unknown methods fail with
    ``unimplemented``. Methods made with :func:`unary_inline` are answered inline.

    Example::

        await serve_rpc(channel, route({
            "catalog": unary_inline(lambda request, stream: CATALOG),
            "infer": unary(infer),            # async def infer(request, stream) -> response
            "stream": infer_stream,           # async def infer_stream(stream) -> None
        }))
    """
    return Router(handlers)


def inline_function(handler: Handler, method: str) -> InlineFunction | None:
    """The inline function ``handler`` declares for ``method`` (a Router or InlineUnary), or
    None if the method runs in a handler task."""
    lookup = getattr(handler, "inline_handler", None)
    if not callable(lookup):
        return None
    fn: InlineFunction | None = lookup(method)
    return fn
