"""The one contract of the project's sans-IO protocol cores (h11's, which the project follows).

Both cores, ``enclave-channel/1`` (:class:`transport.channel.ChannelConnection`) and
``enclave-rpc/1`` (:class:`transport.rpc.RpcConnection`), speak the same verbs:

* ``receive_data(data) -> None``: buffer bytes from the peer; ``b""`` means the peer's
  end-of-file. Nothing is parsed yet.
* ``next_event() -> Event | type[NEED_DATA]``: parse up to the next event; :data:`NEED_DATA`
  means "feed me more bytes". Taking events one at a time lets the adapter act on each (answer
  a request, which frees a slot) before the next frame is looked at. A peer's violation raises
  that core's ``RemoteProtocolError`` (the channel: ``AuthenticationFailed``).
* ``send(...)`` / ``send_*(...) -> bytes``: encode what *we* say; misuse raises
  ``LocalProtocolError`` before any state changes.
* ``data_to_send() -> bytes``: what the core produced on its own (PONGs, grants, the channel
  client's key message); drains it.

An adapter's receive loop is therefore the same everywhere (h11's ``TrioHTTPWrapper``)::

    while (event := core.next_event()) is NEED_DATA:
        core.receive_data(await stream.receive_some(RECEIVE_SIZE))
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NEED_DATA", "SansIOConnection"]


class NEED_DATA:
    """Returned by ``next_event()`` when more bytes must be received first (h11's sentinel)."""


class SansIOConnection(Protocol):
    """The verbs every sans-IO core of the project provides (see the module docstring)."""

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes received from the peer; ``b""`` marks end-of-file."""

    def next_event(self) -> object:
        """The next event, or :data:`NEED_DATA`."""

    def data_to_send(self) -> bytes:
        """Bytes the core owes the peer on its own; drains them."""
