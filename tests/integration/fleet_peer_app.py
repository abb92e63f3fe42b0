"""The enclave app of tests/integration/test_fleet.py (copied into its images as ``main.py``).

It is an ordinary user of the enclave-side peer API, plus a plain control port for the test:

* vsock 5005: :func:`transport.peers.serve_peer_channels`, mutual attestation with the default
  peer policy of :func:`attest.peer.enclave_peer_identity` (the same image, not debug). Each
  verified caller gets one JSON answer: who this enclave is and who it verified the caller to be.
* vsock 6100 (control, from the host; test harness only): one JSON command per connection,
  one JSON result. ``dial`` opens a peer channel through the parent's relay and reports what
  the callee answered, or the error; ``dial_parent`` runs the mutual handshake with a service
  of the host on (3, port) (the test's own server) and reports the same; ``whoami``. A dial
  may say which callees this caller accepts (``accept``: PCR0s, debug or not); by default the
  caller's own policy (the same image, not debug) applies. The callee's policy is never changed.
"""

import json

import trio

from attest.channel import channel_verifier
from attest.nsm.client import NsmClient
from attest.peer import enclave_peer_identity
from attest.policy import MeasurementSet, Policy
from attest.verify import Verifier
from transport.app_status import AppState, AppStatus, report_app_status
from transport.channel import connect_channel
from transport.peers import open_peer_channel, serve_peer_channels
from transport.vsock import VsockAddr, open_vsock_listener, open_vsock_stream

PEER_PORT = 5005
CONTROL_PORT = 6100


async def main():
    nsm = await NsmClient.open()
    identity = await enclave_peer_identity(nsm)

    async def answer(channel):
        peer = channel.peer
        got = await channel.receive_some()
        await channel.send_all(
            json.dumps(
                {
                    "me": identity.module_id,
                    "caller": peer.module_id,
                    "caller_pcr0": peer.pcr0.hex(),
                    "caller_debug": peer.debug,
                    "got": got.decode(),
                }
            ).encode()
        )

    async def ping(channel):
        async with channel:
            await channel.send_all(b"ping")
            reply = await channel.receive_some()
            return {
                "ok": True,
                "callee": channel.peer.module_id,
                "callee_pcr0": channel.peer.pcr0.hex(),
                "reply": reply.decode(),
            }

    def verifier_for(accept):
        if not accept:
            return identity.verifier
        sets = [MeasurementSet({0: bytes.fromhex(pcr0)}) for pcr0 in accept["pcr0"]]
        policy = Policy(sets, allow_debug=accept.get("allow_debug", False))
        return channel_verifier(Verifier(list(identity.roots)), policy)

    async def control(stream):
        async with stream:
            command = json.loads(await stream.receive_some(4096))
            try:
                if command["op"] == "whoami":
                    result = {
                        "ok": True,
                        "module_id": identity.module_id,
                        "pcr0": identity.pcr0.hex(),
                    }
                elif command["op"] == "dial":
                    channel = await open_peer_channel(
                        command["target"],
                        command["port"],
                        verifier=verifier_for(command.get("accept")),
                        attester=identity.attester,
                        any_replica=command.get("any", False),
                    )
                    result = await ping(channel)
                else:  # dial_parent
                    raw = await open_vsock_stream(VsockAddr(3, command["port"]))
                    channel = await connect_channel(
                        raw,
                        verifier=verifier_for(command.get("accept")),
                        attester=identity.attester,
                    )
                    result = await ping(channel)
            except Exception as exc:
                result = {
                    "ok": False,
                    "error": type(exc).__name__,
                    "reason": getattr(exc, "reason", None) or str(exc),
                }
            await stream.send_all(json.dumps(result).encode())

    listener = await open_vsock_listener(CONTROL_PORT)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_peer_channels(
                PEER_PORT,
                answer,
                attester=identity.attester,
                peer_verifier=identity.verifier,
                task_status=task_status,
            )
        )
        nursery.start_soon(trio.serve_listeners, control, [listener])
        await report_app_status(AppStatus(AppState.READY, "", (PEER_PORT, CONTROL_PORT)))


trio.run(main)
