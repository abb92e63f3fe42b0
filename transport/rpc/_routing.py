"""Server handlers: the shapes a method can take (:func:`unary`, :func:`unary_inline`, a plain
stream handler) and the dispatcher that picks one by method name (:func:`route`).

A *handler* is ``async def handler(stream: RpcStream) -> None``: it reads and sends messages on
its stream. :func:`unary` adapts a request-to-response coroutine; :func:`unary_inline` declares a
*synchronous* request-to-response function the server may run inside its reader task, with no
task at all (the fastest path, for work well under a millisecond), optionally with a handler
that takes over the requests it cannot answer at once (it returns :data:`DEFER`). :func:`route`
maps method names to any of these; unknown methods fail with ``unimplemented``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, NoReturn

import trio

from transport.rpc._errors import RpcError
from transport.rpc._stream import EndOfStream, RpcStream

__all__ = [
    "DEFER",
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


class _Defer:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFER"


DEFER: Final = _Defer()
"""What an inline function returns when it cannot answer a request at once (it would have to
wait: for a busy resource, a full budget...): the request goes to the ``otherwise`` handler of
its :func:`unary_inline`, in a handler task, as if the method had no inline function. The
inline function must not have acted on the request (it is handed over whole)."""


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

    def __init__(self, fn: InlineFunction, otherwise: Handler | None = None) -> None:
        self.fn: Final = fn
        self.otherwise: Final = otherwise

    def inline_handler(self, method: str) -> InlineFunction | None:
        """The function to run inline for ``method`` (every method, for a bare InlineUnary)."""
        return self.fn

    async def __call__(self, stream: RpcStream) -> None:
        """Run as an ordinary handler: when not dispatched inline, or for a request the inline
        function deferred (then ``otherwise`` handles it)."""
        if self.otherwise is not None:
            await self.otherwise(stream)
            return
        request = await _unary_request(stream)
        response = self.fn(request, stream)
        if response is DEFER:
            # A bug in the server's code, not the client's: logged, answered "internal".
            raise TypeError(
                f"{stream.method!r}: the inline function deferred a request, and "
                "unary_inline was given no `otherwise` handler for it"
            )
        await stream.send(response, end=True)


def unary_inline(fn: InlineFunction, *, otherwise: Handler | None = None) -> InlineUnary:
    """Declare a *synchronous* unary method, answered in the server's reader task.

    The fastest path: no handler task is spawned. Use it for work that takes well under a
    millisecond and never blocks (a catalog lookup, a small model run inline as
    reference/perf-baseline.md §3 advises); while ``fn`` runs, the connection reads nothing
    else. ``fn`` raising :class:`RpcError` fails the call with its code; other exceptions are
    logged and sent as ``internal``.

    Args:
        otherwise: the handler for requests ``fn`` cannot answer at once: ``fn`` returns
            :data:`DEFER` for them, and the server runs ``otherwise`` on the stream in a
            handler task (the request is its first message), exactly as for a method
            declared without ``fn``. So the common case runs inline and the rare one (a busy
            model, a full budget) may wait, with no task for the common case. Only a request
            that arrives whole with its stream's OPEN (what :meth:`RpcClient.call` sends) is
            tried inline; a stream opened without one goes to ``otherwise`` at once, under
            that handler's rules (its idle deadline, for one).
    """
    return InlineUnary(fn, otherwise)


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


def has_otherwise(handler: Handler, method: str) -> bool:
    """True if ``method``'s inline function has an ``otherwise`` handler (see
    :func:`unary_inline`): then only a request that comes whole with its stream's OPEN is
    tried inline, and any other stream of that method goes to the handler task at once (so it
    has the handler's own rules: its idle deadline, its reading of a streamed request)."""
    target: object = handler
    if isinstance(handler, Router):
        target = handler.handlers.get(method)
    return isinstance(target, InlineUnary) and target.otherwise is not None


def inline_function(handler: Handler, method: str) -> InlineFunction | None:
    """The inline function ``handler`` declares for ``method`` (a Router or InlineUnary), or
    None if the method runs in a handler task."""
    lookup = getattr(handler, "inline_handler", None)
    if not callable(lookup):
        return None
    fn: InlineFunction | None = lookup(method)
    return fn
