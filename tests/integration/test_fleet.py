"""Many enclaves, for real (issue 13): mutually attested enclave-to-enclave channels through the
parent's relay, and replicas behind one ingress with client failover.

One set of enclaves serves the whole module (they start through the CLI and the host daemon,
``enclave run-enclave --replicas 2 --wait-ready``, so they outlive each test's trio loop):

* ``peer``, ``peer_1``: two replicas of image A (tests/integration/fleet_peer_app.py), whose peer
  policy is "the same image, not debug";
* ``q``: the same app in image B (another PCR0);
* ``pdebug``: image A in debug mode (PCR0 reads as zeros).

Each test starts the relay (``runtime.relay.serve_relay``) in its own loop with the module's
rules, then drives the enclaves through their control port. The refusals the issue names are
each a test: the wrong PCR0 on either side, a debug peer, a replayed client document, a rule
that does not allow the connection, and (last test, with the inference server) a replica
killed mid-call.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from attest.ca import LocalCA
from attest.channel import channel_verifier, nsm_attester
from attest.nsm.local import InProcessNsm
from attest.policy import MeasurementSet, Policy
from attest.verify import Verifier
from runtime.eif import build_eif
from runtime.host import LINGER_ENV
from runtime.relay import serve_relay
from runtime.state import StateDir
from transport.channel import DocumentVerifier, PeerAttestation, accept_channel, connect_channel
from transport.errors import AuthenticationFailed, ChannelClosed
from transport.paths import STATE_DIR_ENV
from transport.vsock import VsockAddr, open_vsock_listener, open_vsock_stream

pytestmark = pytest.mark.slow

APP = Path(__file__).with_name("fleet_peer_app.py")
#: Each operation through the enclaves (a relayed mutual handshake is a few ms; the margin is
#: for a loaded 2-core machine).
OP_TIMEOUT_S = 60
#: Starting the module's enclaves (four CLI starts, each waiting for the app's READY).
START_TIMEOUT_S = 300
RULES = (
    "peer=peer:5005",  # the replicas of one image reach each other
    "peer=q:5005",  # allowed by the relay; refused by the caller's attestation check
    "q=peer:5005",  # allowed by the relay; refused by the callee's attestation check
    "pdebug=peer:5005",  # a debug enclave: the callee's policy refuses it
)
HOST_PORT = 7300  # the test's own mutual server on the parent


@dataclass
class Fleet:
    state_dir: Path
    env: dict[str, str]
    enclaves: dict[str, dict[str, Any]]  # name -> run-enclave JSON
    pcr0: dict[str, str]  # image -> PCR0 hex
    pcrs: dict[str, dict[int, bytes]]  # image -> PCR0/1/2

    def cid(self, name: str) -> int:
        return int(self.enclaves[name]["EnclaveCID"])


def _enclave(fleet_env: dict[str, str], *args: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        env=fleet_env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    root = Path(tempfile.mkdtemp(prefix="er-fleet-"))
    state_dir = root / "s"
    state_dir.mkdir(mode=0o700)
    # Four one-CPU enclaves on a 2-core host: two CPU ids more than it has (their affinity
    # layer is reported missing; the enclaves share the real CPUs).
    (state_dir / "allocator.yaml").write_text(
        '---\nmemory_mib: 4096\ncpu_pool: "0-3"\nmax_enclaves: 4\n'
    )
    env = {**os.environ, STATE_DIR_ENV: str(state_dir), LINGER_ENV: "1"}
    env.pop("ENCLAVE_VSOCK_DIR", None)
    pcr0 = {}
    pcrs = {}
    for image, flavor in (("peer", "a"), ("q", "b")):
        app = root / f"app-{image}"
        app.mkdir()
        shutil.copy(APP, app / "main.py")
        info = build_eif(
            app_dir=app,
            cmd=["python", "main.py"],
            env={"FLAVOR": flavor},  # another app ramdisk: another PCR0
            output=root / f"{image}.eif",
        )
        pcr0[image] = info.pcrs[0].hex()
        pcrs[image] = {i: info.pcrs[i] for i in (0, 1, 2)}
    run = ["run-enclave", "--cpu-count", "1", "--memory", "256", "--wait-ready", "120"]
    enclaves: dict[str, dict[str, Any]] = {}
    try:
        for item in _enclave(env, *run, "--eif-path", str(root / "peer.eif"), "--replicas", "2"):
            enclaves[item["EnclaveName"]] = item
        enclaves["q"] = _enclave(env, *run, "--eif-path", str(root / "q.eif"),
                                 "--enclave-name", "q")  # fmt: skip
        enclaves["pdebug"] = _enclave(env, *run, "--eif-path", str(root / "peer.eif"),
                                      "--enclave-name", "pdebug", "--debug-mode")  # fmt: skip
        yield Fleet(state_dir, env, enclaves, pcr0, pcrs)
    finally:
        subprocess.run(
            [sys.executable, "-m", "runtime.cli", "terminate-enclave", "--all"],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fabric(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's process talks to the module's fabric."""
    monkeypatch.setenv(STATE_DIR_ENV, str(fleet.state_dir))
    monkeypatch.delenv("ENCLAVE_VSOCK_DIR", raising=False)
    return fleet.state_dir / "vsock"


async def control(fleet: Fleet, name: str, **command: Any) -> dict[str, Any]:
    """One command to an enclave's control port; its JSON result."""
    stream = await open_vsock_stream(VsockAddr(fleet.cid(name), 6100))
    async with stream:
        await stream.send_all(json.dumps(command).encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    result: dict[str, Any] = json.loads(data)
    return result


async def with_relay(fleet: Fleet, nursery: trio.Nursery) -> None:
    await nursery.start(partial(serve_relay, StateDir(fleet.state_dir), RULES))


def test_replicas_share_the_image_not_the_identity(fleet: Fleet) -> None:
    peer, peer1 = fleet.enclaves["peer"], fleet.enclaves["peer_1"]
    assert peer["EnclaveCID"] != peer1["EnclaveCID"]
    assert peer["EnclaveID"] != peer1["EnclaveID"]
    described = _enclave(fleet.env, "describe-enclaves")
    pcrs = {d["EnclaveName"]: d["Measurements"]["PCR0"] for d in described}
    assert pcrs["peer"] == pcrs["peer_1"] == fleet.pcr0["peer"]
    assert pcrs["q"] == fleet.pcr0["q"] != fleet.pcr0["peer"]


async def test_two_replicas_talk_over_a_mutually_attested_relayed_channel(
    fleet: Fleet, fabric: Path
) -> None:
    with trio.fail_after(OP_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await with_relay(fleet, nursery)
            me = await control(fleet, "peer", op="whoami")
            other = await control(fleet, "peer_1", op="whoami")
            result = await control(fleet, "peer", op="dial", target="peer_1", port=5005)
            assert result["ok"], result
            assert result["callee"] == other["module_id"]  # the caller verified the callee
            reply = json.loads(result["reply"])
            assert reply["caller"] == me["module_id"]  # the callee verified the caller
            assert reply["caller_pcr0"] == fleet.pcr0["peer"]
            assert reply["caller_debug"] is False
            assert reply["got"] == "ping"
            # By group: the relay picks a member; by CID too.
            by_group = await control(fleet, "peer_1", op="dial", target="peer", port=5005, any=True)
            assert by_group["ok"], by_group
            by_cid = await control(fleet, "peer_1", op="dial", target=fleet.cid("peer"), port=5005)
            assert by_cid["callee"] == me["module_id"]
            nursery.cancel_scope.cancel()


async def test_the_wrong_pcr0_is_refused_on_either_side(fleet: Fleet, fabric: Path) -> None:
    with trio.fail_after(OP_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await with_relay(fleet, nursery)
            # The callee has another image: the caller's verifier refuses its document.
            callee_wrong = await control(fleet, "peer", op="dial", target="q", port=5005)
            assert not callee_wrong["ok"]
            assert callee_wrong["error"] == "AuthenticationFailed"
            assert "PCR0" in callee_wrong["reason"] or "measurement" in callee_wrong["reason"]
            # The caller has another image (and accepts the callee's): the callee refuses the
            # caller's document, and the caller is told.
            caller_wrong = await control(
                fleet, "q", op="dial", target="peer", port=5005,
                accept={"pcr0": [fleet.pcr0["peer"]]},
            )  # fmt: skip
            assert not caller_wrong["ok"]
            assert caller_wrong["error"] == "AuthenticationFailed"
            assert "instead of accepting" in caller_wrong["reason"]
            nursery.cancel_scope.cancel()


async def test_a_debug_peer_is_refused(fleet: Fleet, fabric: Path) -> None:
    """The debug enclave accepts the callee (it is told to accept image A); the callee's
    policy (the same image, not debug) refuses the debug caller's document."""
    accept = {"pcr0": [fleet.pcr0["peer"]]}
    with trio.fail_after(OP_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await with_relay(fleet, nursery)
            result = await control(
                fleet, "pdebug", op="dial", target="peer", port=5005, accept=accept
            )
            assert not result["ok"]
            assert result["error"] == "AuthenticationFailed"
            assert "instead of accepting" in result["reason"]  # refused by the callee
            nursery.cancel_scope.cancel()


async def test_what_no_rule_allows_is_refused(fleet: Fleet, fabric: Path) -> None:
    with trio.fail_after(OP_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await with_relay(fleet, nursery)
            for caller, target, port in (("q", "peer", 5006), ("pdebug", "q", 5005),
                                         ("q", "pdebug", 5005)):  # fmt: skip
                result = await control(fleet, caller, op="dial", target=target, port=port)
                assert result == {
                    "ok": False,
                    "error": "PeerAccessDenied",
                    "reason": f"the enclave relay refused name {target!r} port {port}: DENIED",
                }
            nursery.cancel_scope.cancel()


class _Captured:
    """A peer verifier that accepts anything its policy accepts and keeps the documents."""

    def __init__(self, verifier: DocumentVerifier) -> None:
        self.verifier = verifier
        self.documents: list[bytes] = []

    def __call__(self, document: bytes, *, nonce: bytes) -> PeerAttestation:
        self.documents.append(document)
        return self.verifier(document, nonce=nonce)


def _host_nsm(fleet: Fleet, *, pcr0_of: str) -> InProcessNsm:
    """An NSM of the host holding the emulator's CA key: it signs documents for ``pcr0_of``'s
    image (what only a root user of the host can do here; on Nitro, nobody can)."""
    ca = LocalCA.load_or_create(fleet.state_dir / "ca")
    return InProcessNsm.create(
        ca, pcrs=fleet.pcrs[pcr0_of], module_id="i-0123456789abcdef0-enc0123456789abcdef"
    )


async def test_a_replayed_client_document_is_refused(fleet: Fleet, fabric: Path) -> None:
    """A genuine client document of ``peer``, made for one handshake (with a server of the
    host), is sent by the host in another handshake to ``peer_1``: refused (its nonce)."""
    ca = LocalCA.load_or_create(fleet.state_dir / "ca")
    image = Policy([MeasurementSet({0: bytes.fromhex(fleet.pcr0["peer"])})])
    captured = _Captured(channel_verifier(Verifier([ca.root_certificate]), image))
    host = _host_nsm(fleet, pcr0_of="peer")
    with trio.fail_after(OP_TIMEOUT_S):
        listener = await open_vsock_listener(HOST_PORT)
        async with trio.open_nursery() as nursery, listener:

            async def serve_once() -> None:
                stream = await listener.accept()
                try:
                    channel = await accept_channel(
                        stream, attester=nsm_attester(host), peer_verifier=captured
                    )
                except (AuthenticationFailed, ChannelClosed):
                    return  # the enclave's answer says why
                async with channel:
                    await channel.receive_some()
                    await channel.send_all(b"pong")

            nursery.start_soon(serve_once)
            first = await control(fleet, "peer", op="dial_parent", port=HOST_PORT)
            assert first["ok"], first
            assert len(captured.documents) == 1
            recorded = captured.documents[0]

            async def replay(*, nonce: bytes, public_key: bytes, user_data: bytes | None) -> bytes:
                del nonce, public_key, user_data
                await trio.lowlevel.checkpoint()
                return recorded

            stream = await open_vsock_stream(VsockAddr(fleet.cid("peer_1"), 5005))
            with pytest.raises(AuthenticationFailed) as info:
                await connect_channel(
                    stream,
                    verifier=channel_verifier(Verifier([ca.root_certificate]), image),
                    attester=replay,
                )
            assert "instead of accepting" in info.value.reason
            nursery.cancel_scope.cancel()


async def test_a_host_process_without_an_nsm_cannot_pass(fleet: Fleet, fabric: Path) -> None:
    ca = LocalCA.load_or_create(fleet.state_dir / "ca")
    image = Policy([MeasurementSet({0: bytes.fromhex(fleet.pcr0["peer"])})])
    with trio.fail_after(OP_TIMEOUT_S):
        stream = await open_vsock_stream(VsockAddr(fleet.cid("peer"), 5005))
        with pytest.raises(AuthenticationFailed) as info:
            await connect_channel(
                stream, verifier=channel_verifier(Verifier([ca.root_certificate]), image)
            )
        assert "no attester" in info.value.reason


@pytest.mark.parametrize("allow_debug", [False, True])
async def test_a_debug_enclave_passes_only_a_policy_that_allows_debug(
    fleet: Fleet, fabric: Path, allow_debug: bool
) -> None:
    """``pdebug``'s real client document (PCR0 zero), judged by a server of the host whose
    caller policy pins the zero PCR0 and allows debug or not. (pdebug is told to accept the
    host server's document, a debug one too.)"""
    ca = LocalCA.load_or_create(fleet.state_dir / "ca")
    zero = Policy([MeasurementSet({0: bytes(48)})], allow_debug=allow_debug)
    verifier = channel_verifier(Verifier([ca.root_certificate]), zero)
    host = InProcessNsm.create(ca, pcrs={i: bytes(48) for i in (0, 1, 2)}, debug=True)
    outcome: dict[str, Any] = {}
    with trio.fail_after(OP_TIMEOUT_S):
        listener = await open_vsock_listener(HOST_PORT)
        async with trio.open_nursery() as nursery, listener:

            async def serve_once() -> None:
                stream = await listener.accept()
                try:
                    channel = await accept_channel(
                        stream, attester=nsm_attester(host), peer_verifier=verifier
                    )
                except (AuthenticationFailed, ChannelClosed) as exc:
                    outcome["server"] = exc
                    return
                outcome["server"] = channel.peer
                async with channel:
                    await channel.receive_some()
                    await channel.send_all(b"pong")

            nursery.start_soon(serve_once)
            accept = {"pcr0": ["00" * 48], "allow_debug": True}
            result = await control(fleet, "pdebug", op="dial_parent", port=HOST_PORT, accept=accept)
            with trio.move_on_after(5):
                while "server" not in outcome:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    if allow_debug:
        assert result["ok"], result
        peer = outcome["server"]
        assert isinstance(peer, PeerAttestation)
        assert peer.debug
        assert peer.module_id == fleet.enclaves["pdebug"]["EnclaveID"]
    else:
        assert not result["ok"]
        assert "instead of accepting" in result["reason"]
        assert isinstance(outcome["server"], AuthenticationFailed)
        assert "debug" in outcome["server"].reason


# --- replicas of the inference server behind one ingress --------------------------------------


async def test_a_replica_killed_mid_call_costs_no_call(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Two replicas of the inference server behind a least-connections ingress; clients call
    in a loop; one replica is killed (SIGKILL) under them. Every call succeeds (the broken
    ones are retried once on a fresh, re-attested connection to the other replica), and the
    ingress drops the dead replica."""
    from models.client import open_inference_client
    from models.digits import INPUT_NAME, load_test_split
    from runtime.stack import open_inference_stack

    root = Path(tempfile.mkdtemp(prefix="er-fl-"))
    x, _ = load_test_split()
    calls = {"ok": 0, "failed": 0}
    failovers: list[int] = []
    try:
        with trio.fail_after(START_TIMEOUT_S):
            async with open_inference_stack(root / "s", replicas=2) as served:
                victim = served.servers[0]
                stop = trio.Event()

                async def client(index: int) -> None:
                    async with open_inference_client(
                        served.endpoint, verifier=served.verifier()
                    ) as c:
                        while not stop.is_set():
                            try:
                                await c.infer(served.model, {INPUT_NAME: x[index : index + 1]})
                                calls["ok"] += 1
                            except Exception:
                                calls["failed"] += 1
                        failovers.append(c.failovers)

                async with trio.open_nursery() as nursery:
                    for i in range(4):
                        nursery.start_soon(client, i)
                    while calls["ok"] < 200:  # the load is steady
                        await trio.sleep(0.01)
                    assert victim.info.app_pid is not None
                    os.kill(victim.info.app_pid, signal.SIGKILL)
                    await victim.wait_exited()
                    before = calls["ok"]
                    while calls["ok"] < before + 200:  # and goes on, on the other replica
                        await trio.sleep(0.01)
                    stop.set()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert calls["failed"] == 0
    assert sum(failovers) >= 1  # some call was in flight on the dead replica
    assert len(failovers) == 4
