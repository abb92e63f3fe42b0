"""App status: how an enclave's application tells the parent "serving" or "cannot serve, because".

Nitro's boot heartbeat (``(3, 9000)``) says the enclave's *init* is up, not that the application
inside can do its job. An inference server whose model key is refused exits a moment later, and
without this report the only trace would be in some host-side log. So an app reports once, on a
parent port the runtime serves in-process for every enclave::

    enclave app                                   parent (runtime supervisor)
    connect (3, APP_STATUS_PORT)   ─────────────▶ accept
    u32 length ‖ JSON {"state", "detail", "ports"}  ─▶  decode (bounded), record, ack
                                   ◀───────────── 0x06

``state`` is ``"ready"`` (``ports``: the vsock ports it serves) or ``"failed"`` (``detail``: one
line a user can act on, such as ``"KMS unreachable via (3, 8000)"``). The runtime records the
first report of each enclave (later ones are ignored), shows it in ``describe-enclaves`` and lets
``run-enclave --wait-ready`` and ``Runtime.run_enclave(wait_ready=True)`` wait for it.

Only non-secret facts go in a report: the host reads it. The same code runs on real Nitro, where
the parent application would serve this port itself (it is an ordinary vsock stream).

The codec (:func:`encode_status` / :func:`decode_status`) is pure; :func:`report_app_status`
(enclave side) and :func:`receive_app_status` (parent side) are thin trio adapters.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import trio

from transport.errors import RemoteProtocolError, TransportError
from transport.fabric.addressing import VMADDR_CID_PARENT, VsockAddr
from transport.fabric.api import open_vsock_stream

__all__ = [
    "APP_STATUS_PORT",
    "AppState",
    "AppStatus",
    "encode_status",
    "decode_status",
    "report_app_status",
    "receive_app_status",
]

#: Parent port of the status report (next to Nitro's heartbeat port 9000, which init owns).
APP_STATUS_PORT: Final = 9001
#: Longest ``detail`` kept: one actionable line, not a log dump.
MAX_DETAIL_CHARS: Final = 1000
#: Ports one report may list (a server listens on a handful).
MAX_PORTS: Final = 64
#: Upper bound of an encoded report; a length above it is refused before reading the body.
MAX_STATUS_BYTES: Final = 8192
#: How long each side waits for the other (a stalled peer must not hold either forever).
STATUS_TIMEOUT_S: Final = 10.0
_ACK: Final = b"\x06"
_LEN = struct.Struct(">I")


class AppState(StrEnum):
    """What the app reports."""

    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class AppStatus:
    """One report. ``detail`` is truncated to :data:`MAX_DETAIL_CHARS`."""

    state: AppState
    detail: str = ""
    ports: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.state, AppState):
            raise ValueError(f"state must be an AppState, got {self.state!r}")
        if len(self.ports) > MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS} ports in one report")
        for port in self.ports:
            VsockAddr(VMADDR_CID_PARENT, port)  # type and range check
        if len(self.detail) > MAX_DETAIL_CHARS:
            object.__setattr__(self, "detail", self.detail[: MAX_DETAIL_CHARS - 1] + "…")


def encode_status(status: AppStatus) -> bytes:
    """Frame one report (length prefix + JSON)."""
    body = json.dumps(
        {"state": status.state.value, "detail": status.detail, "ports": list(status.ports)},
        separators=(",", ":"),
    ).encode()
    return _LEN.pack(len(body)) + body


def decode_status(frame: bytes) -> AppStatus:
    """Parse one framed report; anything malformed is a :class:`RemoteProtocolError`."""
    if len(frame) < _LEN.size:
        raise RemoteProtocolError("app status: truncated length")
    (length,) = _LEN.unpack_from(frame)
    if length > MAX_STATUS_BYTES:
        raise RemoteProtocolError(f"app status: {length} bytes exceeds {MAX_STATUS_BYTES}")
    body = frame[_LEN.size :]
    if len(body) != length:
        raise RemoteProtocolError("app status: length does not match the body")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RemoteProtocolError(f"app status: not JSON ({exc})") from None
    if not isinstance(obj, dict) or set(obj) - {"state", "detail", "ports"}:
        raise RemoteProtocolError("app status: expected an object with state, detail, ports")
    detail = obj.get("detail", "")
    ports = obj.get("ports", [])
    if not isinstance(detail, str) or not isinstance(ports, list):
        raise RemoteProtocolError("app status: detail must be a string, ports a list")
    if not all(type(p) is int for p in ports):
        raise RemoteProtocolError("app status: ports must be integers")
    try:
        return AppStatus(AppState(str(obj.get("state"))), detail, tuple(ports))
    except ValueError as exc:
        raise RemoteProtocolError(f"app status: {exc}") from None


async def report_app_status(status: AppStatus, *, timeout_s: float = STATUS_TIMEOUT_S) -> bool:
    """Send ``status`` to the parent; True once acknowledged.

    Returns False (and raises nothing) when no parent serves the port, or it does not answer
    within ``timeout_s``: an app run outside the runtime keeps working.
    """
    frame = encode_status(status)
    with trio.move_on_after(timeout_s):
        try:
            stream = await open_vsock_stream(VsockAddr(VMADDR_CID_PARENT, APP_STATUS_PORT))
        except (OSError, TransportError):
            return False
        async with stream:
            try:
                await stream.send_all(frame)
                return await stream.receive_some(1) == _ACK
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return False
    return False


async def receive_app_status(
    stream: trio.abc.Stream, *, timeout_s: float = STATUS_TIMEOUT_S
) -> AppStatus:
    """Parent side: read one report from ``stream`` (bounded in size and time), then ack it.

    Raises:
        RemoteProtocolError: malformed, oversized or truncated report.
        trio.TooSlowError: the app did not finish its report within ``timeout_s``.
    """
    with trio.fail_after(timeout_s):
        buf = bytearray()
        while len(buf) < _LEN.size or len(buf) < _LEN.size + _LEN.unpack_from(buf)[0]:
            if len(buf) >= _LEN.size and _LEN.unpack_from(buf)[0] > MAX_STATUS_BYTES:
                break  # decode_status refuses it without reading the body
            chunk = await stream.receive_some(MAX_STATUS_BYTES + _LEN.size - len(buf))
            if not chunk:
                break
            buf += chunk
        status = decode_status(bytes(buf))
        await stream.send_all(_ACK)
        return status
