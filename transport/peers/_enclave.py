"""The enclave side: open a mutually attested channel to a named peer, serve peers.

Inside an enclave::

    # the caller
    channel = await open_peer_channel("model", 5005, verifier=verifier, attester=attester)
    async with channel:
        print(channel.peer.module_id, channel.peer.pcr0.hex())   # the peer, verified
        await channel.send_all(b"...")

    # the callee
    async def handle(channel: SecureChannel) -> None:
        caller = channel.peer               # verified: PCR0, PCR8, PCR16, module id
        ...
    await serve_peer_channels(5005, handle, attester=attester, peer_verifier=verifier)

Both sides attest (``enclave-channel/1`` mutual mode, PROTOCOL.md §3.4): the callee demands the
caller's document and checks it against its own roots and policy before any data flows; the
caller checks the callee's. The parent's relay (:mod:`transport.peers._service`) only carries
the bytes, so nothing here trusts the relay: it could connect us to the wrong enclave, and the
attestation would fail. ``attester`` and the verifiers come from the NSM and ``attest``
(``attest.peer.enclave_peer_identity`` builds all three for the usual "same image" policy);
``transport`` itself stays below ``attest``.

Nothing here is specific to inference: the channel is a byte stream, and RPC
(``transport.rpc``), a ring of training workers or anything else runs over it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final, NoReturn

import structlog
import trio

from transport.channel import (
    HANDSHAKE_TIMEOUT_S,
    Attester,
    DocumentVerifier,
    SecureChannel,
    Suite,
    accept_channel,
    connect_channel,
)
from transport.errors import (
    ChannelClosed,
    ConfigurationError,
    PeerTimeout,
    PeerUnreachable,
    RemoteProtocolError,
    TransportError,
    VsockConnectionRefused,
)
from transport.fabric.addressing import VMADDR_CID_PARENT, VsockAddr
from transport.fabric.api import open_vsock_listener, open_vsock_stream
from transport.peers._errors import RelayProtocolError, refusal_for
from transport.peers._service import DEFAULT_RELAY_PORT
from transport.peers._wire import REPLY_SIZE, RelayRequest, RelayStatus, TargetKind, decode_reply

__all__ = [
    "PEER_SUITES",
    "CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_HANDSHAKES",
    "DEFAULT_MAX_CHANNELS",
    "PeerHandler",
    "open_peer_channel",
    "open_relayed_stream",
    "serve_peer_channels",
]

log = structlog.get_logger()

#: Suites between enclaves: the hybrid post-quantum suite first (both ends are ours).
PEER_SUITES: Final = (Suite.MLKEM768_X25519, Suite.X25519)
#: Bound on reaching the relay and getting its answer (seconds): the relay answers at once.
CONNECT_TIMEOUT_S: Final = 10.0
#: Handshakes a peer server runs at once: each costs a key pair, an NSM document and a
#: verification (~ms here, 0.1-0.3 s on Nitro); more callers wait in the accept backlog.
DEFAULT_MAX_HANDSHAKES: Final = 16
#: Channels a peer server holds open at once (a ring of training workers needs two per worker;
#: a model enclave one per calling replica); more callers wait in the accept backlog.
DEFAULT_MAX_CHANNELS: Final = 256

PeerHandler = Callable[[SecureChannel], Awaitable[None]]
"""Serves one verified peer: ``channel.peer`` is the caller's verified attestation."""


async def open_peer_channel(
    target: int | str,
    port: int,
    *,
    verifier: DocumentVerifier,
    attester: Attester,
    any_replica: bool = False,
    relay_port: int = DEFAULT_RELAY_PORT,
    suites: Sequence[Suite] = PEER_SUITES,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    connect: Callable[[VsockAddr], Awaitable[trio.abc.Stream]] = open_vsock_stream,
) -> SecureChannel:
    """Open a mutually attested channel to port ``port`` of another enclave, through the
    parent's relay.

    Args:
        target: the peer's CID, or its name (exact, or with ``any_replica`` any running
            enclave of that name, the least busy one).
        port: the peer's vsock port.
        verifier: checks the peer's document (roots, policy: which images may answer).
        attester: this enclave's NSM, for its own document (the peer demands it).
        any_replica: with a name: any replica of it, not only the enclave of that exact name.
        relay_port: the relay's port on the parent.
        suites: channel suites offered, preferred first.
        connect_timeout_s: bound on reaching the relay and its answer.
        handshake_timeout_s: bound on the attested handshake.
        connect: opens the vsock stream to the relay (default: this enclave's fabric; tests
            pass a broker client's ``connect``).

    Returns:
        The channel; ``channel.peer`` is the peer's verified attestation. The caller owns it.

    Raises:
        PeerAccessDenied: no allowlist rule lets this enclave reach that port of that peer.
        PeerNotFound / PeerNotListening: no such enclave, or nothing on that port (both are
            ``PeerUnreachable``).
        RelayBusy: the relay has no free slot.
        PeerUnreachable: no relay on ``(3, relay_port)``, or it closed without an answer.
        AuthenticationFailed: the peer's attestation failed our verifier, or the peer refused
            ours (its policy), or the bytes were tampered with.
        PeerTimeout: the relay or the handshake did not answer in time.
        ConfigurationError: a bad target or port.
    """
    stream, cid = await open_relayed_stream(
        target,
        port,
        any_replica=any_replica,
        relay_port=relay_port,
        connect_timeout_s=connect_timeout_s,
        connect=connect,
    )
    try:
        channel = await connect_channel(
            stream,
            verifier=verifier,
            attester=attester,
            suites=suites,
            handshake_timeout=handshake_timeout_s,
        )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    log.info("peer_channel_open", target=target, port=port, peer_cid=cid)
    return channel


async def open_relayed_stream(
    target: int | str,
    port: int,
    *,
    any_replica: bool = False,
    relay_port: int = DEFAULT_RELAY_PORT,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    connect: Callable[[VsockAddr], Awaitable[trio.abc.Stream]] = open_vsock_stream,
) -> tuple[trio.abc.Stream, int]:
    """The relay's part of :func:`open_peer_channel` alone: a byte stream to the peer's port
    through the parent's relay, and the peer's CID, **without** the attested channel.

    Only for what must not be protected, such as a benchmark's plaintext baseline through the
    same relay; anything else opens a channel over it (``open_peer_channel`` does). Arguments
    and refusals as for :func:`open_peer_channel`.
    """
    if isinstance(target, int):
        request = RelayRequest(TargetKind.CID, target, port)
    else:
        kind = TargetKind.GROUP if any_replica else TargetKind.NAME
        request = RelayRequest(kind, target, port)
    relay = VsockAddr(VMADDR_CID_PARENT, relay_port)
    try:
        with trio.fail_after(connect_timeout_s):
            stream = await connect(relay)
    except (VsockConnectionRefused, OSError) as exc:
        raise PeerUnreachable(f"no enclave relay on {relay}: {exc}") from exc
    except trio.TooSlowError:
        raise PeerTimeout(
            f"the relay on {relay} did not accept within {connect_timeout_s:g} s"
        ) from None
    try:
        cid = await _ask_relay(stream, request, connect_timeout_s)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, cid


async def _ask_relay(stream: trio.abc.Stream, request: RelayRequest, timeout_s: float) -> int:
    """Send ``request``; return the connected peer's CID, or raise the refusal."""
    reply = b""
    try:
        with trio.fail_after(timeout_s):
            await stream.send_all(request.encode())
            while len(reply) < REPLY_SIZE:
                data = await stream.receive_some(REPLY_SIZE - len(reply))
                if not data:
                    break
                reply += data
    except trio.TooSlowError:
        raise PeerTimeout(f"the enclave relay did not answer within {timeout_s:g} s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise PeerUnreachable(f"the enclave relay dropped the connection: {exc}") from None
    if len(reply) < REPLY_SIZE:
        raise PeerUnreachable(
            "the enclave relay closed the connection without an answer (full, or stopping)"
        )
    try:
        status, cid = decode_reply(reply)
    except RemoteProtocolError as exc:
        raise RelayProtocolError(str(exc)) from None
    if status is not RelayStatus.OK:
        raise refusal_for(status, f"the enclave relay refused {request.describe()}: {status.name}")
    return cid


async def serve_peer_channels(
    port: int | trio.abc.Listener[trio.abc.Stream],
    handler: PeerHandler,
    *,
    attester: Attester,
    peer_verifier: DocumentVerifier,
    suites: Sequence[Suite] = PEER_SUITES,
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
    max_channels: int = DEFAULT_MAX_CHANNELS,
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve mutually attested channels on this enclave's vsock ``port``.

    Each connection (relayed from another enclave) must complete the mutual handshake: the
    caller's document must pass ``peer_verifier`` (roots, the caller policy: which images, debug
    or not), else the connection is closed and the reason logged. Then ``handler(channel)``
    runs in its own task with ``channel.peer`` the caller's verified attestation; the channel
    is closed when it returns. A handler's exception is logged and ends only its connection.

    Args:
        port: vsock port to listen on (or a listener already open on it).
        handler: serves one verified caller.
        attester: this enclave's NSM.
        peer_verifier: which callers are accepted.
        suites: suites accepted, preferred first.
        max_handshakes: handshakes at once (callers beyond wait in the accept backlog).
        max_channels: connections held at once, handshaking or open (the same).
        handshake_timeout_s: bound on each handshake.
        task_status: ``started(port)`` once listening.

    Never returns; cancel it to stop (open channels are closed).

    Raises:
        ConfigurationError: ``max_handshakes`` or ``max_channels`` < 1.
        VsockError: the port cannot be listened on.
    """
    if max_handshakes < 1 or max_channels < 1:
        raise ConfigurationError("max_handshakes and max_channels must be at least 1")
    listener = await open_vsock_listener(port) if isinstance(port, int) else port
    where = port if isinstance(port, int) else repr(port)
    # Both are taken before accept(): callers over either bound wait in the backlog, unread.
    handshakes = trio.Semaphore(max_handshakes)
    channels = trio.Semaphore(max_channels)

    async def serve_one(stream: trio.abc.Stream) -> None:
        try:
            await _serve_one(stream)
        finally:
            channels.release()

    async def _serve_one(stream: trio.abc.Stream) -> None:
        try:
            try:
                channel = await accept_channel(
                    stream,
                    attester=attester,
                    peer_verifier=peer_verifier,
                    suites=suites,
                    handshake_timeout=handshake_timeout_s,
                )
            finally:
                handshakes.release()
        except (TransportError, trio.BrokenResourceError) as exc:
            # Logged by the channel with its reason (refused caller, timeout, hang-up).
            log.info("peer_channel_refused", port=where, error=type(exc).__name__)
            return
        except Exception:  # our own attester failed (the NSM): this caller only
            log.exception("peer_channel_attester_failed", port=where)
            return
        peer = channel.peer
        assert peer is not None  # mutual mode: accept_channel verified the caller
        try:
            async with channel:
                await handler(channel)
        except (ChannelClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("peer_channel_lost", port=where, peer=peer.module_id, error=str(exc))
        except Exception:
            log.exception("peer_handler_failed", port=where, peer=peer.module_id)

    async with trio.open_nursery() as nursery, listener:
        log.info("peer_channels_listening", port=where)
        task_status.started(port if isinstance(port, int) else 0)
        while True:
            await channels.acquire()
            await handshakes.acquire()
            try:
                stream = await listener.accept()
            except BaseException:
                handshakes.release()
                channels.release()
                raise
            nursery.start_soon(serve_one, stream)
