"""Ring all-reduce of one float32 vector: reduce-scatter then all-gather, chunked and pipelined.

Worker ``r`` of ``world`` sends to its right neighbour (``r + 1``) and receives from its left
(``r - 1``), over any byte streams: the mutually attested channels through the parent's relay
in a protected run, the relay's plaintext streams in the benchmark's baseline, trio memory
streams in the unit tests. The vector is cut into ``world`` segments, each into chunks of
``chunk_bytes``; the ``2 (world - 1)`` steps are the classic schedule:

    reduce-scatter step s:  send segment (r - s),     receive (r - s - 1) and add it in
    all-gather step s:      send segment (r + 1 - s), receive (r - s) and keep it

Pipelining: one task sends and one receives, unit by unit (a unit is one chunk of one step). A
unit may be sent as soon as the chunk it forwards arrived at the previous step, so every link
carries chunks of several steps at once instead of waiting for whole segments. Each chunk's
sum is taken in ring order, so every worker ends with the same bits and a run is
reproducible for a given ``world``.

Each round starts with a 16-byte header both ways (magic, round number, element count): a
neighbour out of step or with another plan is a :class:`RingProtocolError`, not silent
garbage. A closed, reset or tampered link, or a neighbour silent past ``timeout_s``, is a
:class:`MemberLost` (the caller aborts the step).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import trio

from models.training.errors import MemberLost, RingProtocolError
from transport.errors import TransportError

__all__ = ["ring_allreduce", "ExchangeStats", "DEFAULT_CHUNK_BYTES", "HEADER"]

#: Bytes per chunk: large enough that per-record costs (AEAD setup, a relay hop's syscalls)
#: are amortised, small enough that a 4-worker ring of a 300 KB gradient still has several
#: chunks in flight per segment.
DEFAULT_CHUNK_BYTES: Final = 64 << 10
#: The round header: magic, version, round number, element count.
HEADER: Final = struct.Struct(">4sIQ")
_MAGIC: Final = b"RAR1"
_LINK_ERRORS: Final = (
    TransportError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class ExchangeStats:
    """Bytes this worker sent and received in one round."""

    sent: int
    received: int


def _header(round_id: int, count: int) -> bytes:
    return HEADER.pack(_MAGIC, count, round_id)


async def _receive_exact(stream: trio.abc.ReceiveStream, view: memoryview) -> None:
    at = 0
    while at < len(view):
        data = await stream.receive_some(len(view) - at)
        if not data:
            raise MemberLost("the left neighbour closed its link mid-round")
        view[at : at + len(data)] = data
        at += len(data)


async def ring_allreduce(
    buf: npt.NDArray[np.float32],
    *,
    rank: int,
    world: int,
    send: trio.abc.SendStream,
    receive: trio.abc.ReceiveStream,
    round_id: int,
    timeout_s: float,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ExchangeStats:
    """Sum ``buf`` (1-D float32, contiguous) across the ring, in place.

    Raises:
        MemberLost: a link closed, failed or stayed silent for ``timeout_s``.
        RingProtocolError: the left neighbour is in another round or has another size.
        ValueError: bad arguments.
    """
    if buf.dtype != np.float32 or buf.ndim != 1 or not buf.flags.c_contiguous:
        raise ValueError("ring_allreduce sums a contiguous 1-D float32 vector")
    if not 0 <= rank < world or chunk_bytes < 4:
        raise ValueError(f"bad ring position {rank}/{world} or chunk size {chunk_bytes}")
    if world == 1:
        return ExchangeStats(0, 0)
    n = len(buf)
    bounds = [n * i // world for i in range(world + 1)]
    per_chunk = chunk_bytes // 4
    chunks = max(1, -(-max(bounds[i + 1] - bounds[i] for i in range(world)) // per_chunk))
    steps = 2 * (world - 1)

    def span(step: int, chunk: int, sending: bool) -> tuple[int, int]:
        if step < world - 1:
            seg = (rank - step) % world if sending else (rank - step - 1) % world
        else:
            s = step - (world - 1)
            seg = (rank + 1 - s) % world if sending else (rank - s) % world
        lo = min(bounds[seg] + chunk * per_chunk, bounds[seg + 1])
        return lo, min(lo + per_chunk, bounds[seg + 1])

    done = 0  # units received so far, in order
    progressed = trio.Event()
    sent = received = 0

    async def sender() -> None:
        nonlocal sent
        await send.send_all(_header(round_id, n))
        for unit in range(steps * chunks):
            step, chunk = divmod(unit, chunks)
            while step and done < unit - chunks + 1:  # forwards what arrived at step - 1
                await progressed.wait()
            lo, hi = span(step, chunk, True)
            if hi > lo:
                data = buf[lo:hi].tobytes()
                await send.send_all(data)
                sent += len(data)

    async def receiver() -> None:
        nonlocal done, progressed, received
        head = bytearray(HEADER.size)
        await _receive_exact(receive, memoryview(head))
        magic, count, their_round = HEADER.unpack(head)
        if magic != _MAGIC or count != n or their_round != round_id:
            raise RingProtocolError(
                f"the left neighbour is in round {their_round} with {count} elements; "
                f"this worker is in round {round_id} with {n}"
            )
        scratch = np.empty(per_chunk, dtype=np.float32)
        raw = memoryview(scratch.view(np.uint8))  # type: ignore[arg-type]  # numpy buffers
        for unit in range(steps * chunks):
            step, chunk = divmod(unit, chunks)
            lo, hi = span(step, chunk, False)
            if hi > lo:
                await _receive_exact(receive, raw[: (hi - lo) * 4])
                received += (hi - lo) * 4
                if step < world - 1:
                    buf[lo:hi] += scratch[: hi - lo]
                else:
                    buf[lo:hi] = scratch[: hi - lo]
            done = unit + 1
            progressed.set()
            progressed = trio.Event()

    try:
        with trio.fail_after(timeout_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                nursery.start_soon(receiver)
    except trio.TooSlowError:
        raise MemberLost(f"a ring neighbour was silent for {timeout_s:g} s") from None
    except BaseExceptionGroup as group:
        typed = _typed(group)
        if typed is None:
            raise
        raise typed from None
    return ExchangeStats(sent, received)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _typed(group: BaseExceptionGroup[BaseException]) -> Exception | None:
    """The ring error a task group's failure stands for (None: not ours, re-raise it)."""
    leaves = _leaves(group)
    for leaf in leaves:
        if isinstance(leaf, RingProtocolError | MemberLost):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, _LINK_ERRORS):
            return MemberLost(f"a ring link failed: {type(leaf).__name__}: {leaf}")
    return None
