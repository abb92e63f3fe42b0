"""Builders for the channel tests: a throwaway attester/verifier pair and a pure ChannelPair.

The attester/verifier are ``transport.channel.testing``'s Ed25519-signed test documents (real
signatures, real PCR / debug / nonce checks) until attest/ provides NSM documents; attest's own
integration test covers the real ones. ``ChannelPair`` is h11's ``ConnectionPair``: two sans-IO
cores wired back to back, no event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import trio

from transport.channel import (
    NEED_DATA,
    Attestation,
    AttestationRequest,
    ChannelConnection,
    ChannelEstablished,
    ClientConnection,
    Event,
    Hello,
    ServerConnection,
    Suite,
    accept_channel,
    connect_channel,
)
from transport.channel.testing import TestAttester, TestAuthority, TestVerifier, default_pcrs

__all__ = [
    "ChannelPair",
    "MutualPair",
    "Forge",
    "drain",
    "make_channel_pair",
    "sign_request",
]

#: payload mutation applied by a forging attester: (payload) -> None
Forge = Callable[[dict[str, Any]], None]


def sign_request(
    attester: TestAttester, request: AttestationRequest, forge: Forge | None = None
) -> bytes:
    """Synchronously produce the document ``attester`` would return (optionally forged)."""
    payload = attester.payload(
        nonce=request.nonce, public_key=request.public_key, user_data=request.user_data
    )
    if forge is not None:
        forge(payload)
    return attester.authority.sign(payload)


def drain(conn: ChannelConnection) -> list[Event]:
    """All events available now (stops at NEED_DATA or after a Close)."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        assert isinstance(event, Event)
        events.append(event)
        if type(event).__name__ == "Close":
            return events


def _next_or_eof(conn: ChannelConnection) -> Event:
    """The next event; if the frame is incomplete (e.g. a tampered length), the transport ends."""
    event = conn.next_event()
    if event is NEED_DATA:
        conn.receive_data(b"")
        event = conn.next_event()
    assert isinstance(event, Event)
    return event


class ChannelPair:
    """A client and a server core, plus the authority, attester and verifier behind them."""

    def __init__(
        self,
        *,
        client_suites: Sequence[Suite] = (Suite.X25519,),
        server_suites: Sequence[Suite] = (Suite.MLKEM768_X25519, Suite.X25519),
        max_records: int | None = None,
        attester: TestAttester | None = None,
        verifier: TestVerifier | None = None,
        authority: TestAuthority | None = None,
    ) -> None:
        self.authority = authority or TestAuthority()
        self.attester = attester or self.authority.attester()
        self.verifier = verifier or self.authority.verifier()
        extra = {} if max_records is None else {"max_records": max_records}
        self.client = ClientConnection(verifier=self.verifier, suites=client_suites, **extra)
        self.server = ServerConnection(suites=server_suites, **extra)
        self.wire: dict[str, bytes] = {}

    def handshake(
        self,
        *,
        forge: Forge | None = None,
        tamper: Callable[[str, bytes], bytes] | None = None,
    ) -> tuple[ChannelEstablished, ChannelEstablished]:
        """Run the three-message handshake; ``tamper(name, frame)`` may rewrite a frame in
        transit (names: hello, attestation, key), ``forge`` the signed document payload."""

        def transit(name: str, frame: bytes) -> bytes:
            self.wire[name] = frame
            return tamper(name, frame) if tamper else frame

        self.server.receive_data(transit("hello", self.client.send(Hello())))
        request = _next_or_eof(self.server)
        assert isinstance(request, AttestationRequest)
        self.request = request
        document = sign_request(self.attester, request, forge)
        self.client.receive_data(transit("attestation", self.server.send(Attestation(document))))
        client_done = _next_or_eof(self.client)
        assert isinstance(client_done, ChannelEstablished)
        self.server.receive_data(transit("key", self.client.data_to_send()))
        server_done = _next_or_eof(self.server)
        assert isinstance(server_done, ChannelEstablished)
        return client_done, server_done

    def ends(self, client_sends: bool) -> tuple[ChannelConnection, ChannelConnection]:
        return (self.client, self.server) if client_sends else (self.server, self.client)


def make_channel_pair(**kwargs: Any) -> ChannelPair:
    pair = ChannelPair(**kwargs)
    pair.handshake()
    return pair


async def open_secure_pair(
    client_stream: trio.abc.Stream,
    server_stream: trio.abc.Stream,
    *,
    authority: TestAuthority | None = None,
    client_suites: Sequence[Suite] = (Suite.X25519,),
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Handshake a SecureChannel pair over two connected streams (concurrently)."""
    authority = authority or TestAuthority()
    result: dict[str, Any] = {}

    async def server() -> None:
        result["server"] = await accept_channel(
            server_stream, attester=authority.attester(), **kwargs
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        result["client"] = await connect_channel(
            client_stream,
            verifier=authority.verifier(expected_pcrs=default_pcrs()),
            suites=client_suites,
            **kwargs,
        )
    return result["client"], result["server"]


class MutualPair:
    """A mutual-mode client and server core: each side attests and verifies the other.

    The client's attester has its own module id and (by default) the same image PCRs as the
    server; the server's peer verifier pins ``client_pcrs`` (tests change either to get a
    mismatch).
    """

    def __init__(
        self,
        *,
        suites: Sequence[Suite] = (Suite.X25519,),
        authority: TestAuthority | None = None,
        client_attester: TestAttester | None = None,
        peer_verifier: TestVerifier | None = None,
        client_pcrs: dict[int, bytes] | None = None,
    ) -> None:
        self.authority = authority or TestAuthority()
        self.server_attester = self.authority.attester(module_id="i-test-enc00000000000srv")
        self.client_attester = client_attester or self.authority.attester(
            module_id="i-test-enc00000000000cli"
        )
        self.peer_verifier = peer_verifier or self.authority.verifier(
            expected_pcrs=client_pcrs if client_pcrs is not None else default_pcrs()
        )
        self.client = ClientConnection(verifier=self.authority.verifier(), suites=suites)
        self.server = ServerConnection(
            suites=(Suite.MLKEM768_X25519, Suite.X25519), peer_verifier=self.peer_verifier
        )
        self.wire: dict[str, bytes] = {}
        self.server_request: AttestationRequest | None = None
        self.client_request: AttestationRequest | None = None

    def to_client_attestation(
        self,
        *,
        tamper: Callable[[str, bytes], bytes] | None = None,
        forge: Forge | None = None,
    ) -> AttestationRequest:
        """HELLO and (MUTUAL_)ATTESTATION; returns the client's own AttestationRequest."""

        def transit(name: str, frame: bytes) -> bytes:
            self.wire[name] = frame
            return tamper(name, frame) if tamper else frame

        self.server.receive_data(transit("hello", self.client.send(Hello())))
        request = _next_or_eof(self.server)
        assert isinstance(request, AttestationRequest)
        self.server_request = request
        document = sign_request(self.server_attester, request)
        self.client.receive_data(transit("attestation", self.server.send(Attestation(document))))
        own = _next_or_eof(self.client)
        assert isinstance(own, AttestationRequest), own
        self.client_request = own
        return own

    def client_document(self, forge: Forge | None = None) -> bytes:
        assert self.client_request is not None
        return sign_request(self.client_attester, self.client_request, forge)

    def handshake(
        self,
        *,
        tamper: Callable[[str, bytes], bytes] | None = None,
        forge: Forge | None = None,
        document: bytes | None = None,
    ) -> tuple[ChannelEstablished, ChannelEstablished]:
        """The whole mutual handshake; ``document`` replaces the client's own document."""

        def transit(name: str, frame: bytes) -> bytes:
            self.wire[name] = frame
            return tamper(name, frame) if tamper else frame

        self.to_client_attestation(tamper=tamper)
        doc = document if document is not None else self.client_document(forge)
        self.server.receive_data(transit("key+client", self.client.send(Attestation(doc))))
        server_done = _next_or_eof(self.server)
        assert isinstance(server_done, ChannelEstablished)
        self.client.receive_data(transit("accepted", self.server.data_to_send()))
        client_done = _next_or_eof(self.client)
        assert isinstance(client_done, ChannelEstablished)
        return client_done, server_done
