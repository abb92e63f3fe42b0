"""Connection slots of the inference server: a new client is served or refused at once, never
parked behind connections that do nothing.

The server holds at most ``capacity`` connections (each costs buffers and a task; the byte
budgets bound the rest). With a plain limiter, ``capacity`` clients that connect and then sit
idle (before or after the handshake) lock everyone else out until their timeouts fire (issue
10: 64 idle clients). Here a new connection that finds every slot taken *evicts* the
connection that has done nothing for longest, provided it has been doing nothing for at least
``min_idle_s``:

* a connection still in its handshake after ``min_idle_s`` (an honest handshake takes a few
  milliseconds; one that has not finished is stalled or hostile);
* an established connection with no open RPC stream whose byte counters have not moved for
  ``min_idle_s`` (a keep-alive connection; a client that comes back reconnects, which the
  client's failover does for idempotent calls).

A connection with a call in flight is never evicted. When no connection can be evicted, the new
one is refused at once (closed): the client gets a prompt error instead of a hang. The evicted
connection is cancelled; its slot counts as free immediately, so memory stays bounded by
``capacity`` connections plus the ones finishing their cancellation (each a checkpoint away).

This module is the policy (pure, clock injected); :func:`models.server.serve_inference` is the
trio adapter (it also calls :meth:`ConnectionSlots.observe` a few times per ``min_idle_s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import structlog

__all__ = ["ConnectionSlots", "Slot", "DEFAULT_MIN_IDLE_S"]

log = structlog.get_logger()

#: Idle time after which a connection may give its slot to a newcomer. Long against an honest
#: handshake on a loaded machine (milliseconds to ~100 ms), short against the idle (60 s) and
#: handshake (10 s) timeouts that would otherwise be the only way a slot comes back.
DEFAULT_MIN_IDLE_S: Final = 1.0


class _Stats(Protocol):
    @property
    def open_streams(self) -> int: ...
    @property
    def frames_received(self) -> int: ...
    @property
    def frames_sent(self) -> int: ...


class _Rpc(Protocol):
    def statistics(self) -> _Stats: ...


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


@dataclass(eq=False)
class Slot:
    """One admitted connection. The adapter sets :attr:`scope` (cancelled on eviction) and
    calls :meth:`serving` once the handshake is done."""

    admitted_at: float
    scope: _Cancellable | None = None
    rpc: _Rpc | None = None
    #: (frames received, frames sent) when last looked at, and when they were first seen so
    #: (a change noticed at a look counts as activity at that look: eviction errs towards
    #: keeping a connection).
    _seen: tuple[int, int] = (0, 0)
    _active_at: float = 0.0
    evicted: bool = field(default=False)

    def serving(self, rpc: _Rpc, now: float) -> None:
        """The handshake is done; ``rpc`` tells from now on whether the connection works."""
        self.rpc = rpc
        stats = rpc.statistics()
        self._seen = (stats.frames_received, stats.frames_sent)
        self._active_at = now

    def idle_since(self, now: float) -> float | None:
        """When this connection last did something, or None if it is busy (a call in flight)."""
        if self.rpc is None:
            return self.admitted_at  # still in its handshake since admission
        stats = self.rpc.statistics()
        if stats.open_streams:
            return None
        seen = (stats.frames_received, stats.frames_sent)
        if seen != self._seen:
            self._seen = seen
            self._active_at = now
        return self._active_at


class ConnectionSlots:
    """At most ``capacity`` connections; see the module docstring for the eviction rule."""

    def __init__(
        self,
        capacity: int,
        *,
        min_idle_s: float = DEFAULT_MIN_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.min_idle_s = min_idle_s
        self._clock = clock
        self._slots: set[Slot] = set()
        self.evictions = 0
        self.refusals = 0

    def __len__(self) -> int:
        return len(self._slots)

    def now(self) -> float:
        return self._clock()

    def admit(self) -> Slot | None:
        """A slot for a new connection (evicting the idlest one if full), or None: refuse it."""
        now = self._clock()
        if len(self._slots) >= self.capacity:
            victim = self._idlest(now)
            if victim is None:
                self.refusals += 1
                log.warning("connection_refused_server_full", capacity=self.capacity)
                return None
            self._evict(victim, now)
        slot = Slot(admitted_at=now)
        self._slots.add(slot)
        return slot

    def observe(self) -> None:
        """Look at every connection's counters now. The adapter calls this every
        :attr:`observe_interval_s`, so that a connection's last activity is known to within that
        interval when a newcomer needs its slot (a change first noticed at admission would count
        as activity at admission, and the connection would look busy)."""
        now = self._clock()
        for slot in self._slots:
            slot.idle_since(now)

    @property
    def observe_interval_s(self) -> float:
        return self.min_idle_s / 4

    def release(self, slot: Slot) -> None:
        """The connection ended (idempotent; an evicted slot was released already)."""
        self._slots.discard(slot)

    def _idlest(self, now: float) -> Slot | None:
        best: Slot | None = None
        best_since = now - self.min_idle_s
        for slot in self._slots:
            since = slot.idle_since(now)
            if since is not None and since <= best_since:
                best, best_since = slot, since
        return best

    def _evict(self, slot: Slot, now: float) -> None:
        since = slot.idle_since(now)
        self._slots.discard(slot)
        slot.evicted = True
        self.evictions += 1
        log.info(
            "connection_evicted_for_newcomer",
            handshaking=slot.rpc is None,
            idle_s=round(now - (since if since is not None else now), 3),
        )
        if slot.scope is not None:
            slot.scope.cancel()
