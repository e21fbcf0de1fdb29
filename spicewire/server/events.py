"""What happened on a server, for whoever follows it (``GET /events``), as QEMU's QMP reports
SPICE_CONNECTED, SPICE_INITIALIZED, SPICE_DISCONNECTED and SPICE_MIGRATE_COMPLETED.

Each subscriber has a queue of its own with a fixed bound. A subscriber that does not keep up loses
its oldest events, never the server's memory, and the next thing it reads says how many it lost.
Emitting costs nothing while nobody follows.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import gevent.event

from spicewire.logs import iso_utc

QUEUE_LIMIT = 1024

CONNECTED = "connected"  # a channel linked (QMP SPICE_CONNECTED)
INITIALIZED = "initialized"  # the channel is up: its first messages went out (SPICE_INITIALIZED)
DISCONNECTED = "disconnected"  # a channel closed (SPICE_DISCONNECTED)
MIGRATION_STARTED = "migration-started"
MIGRATION_COMPLETED = "migration-completed"  # the session is on s2 (SPICE_MIGRATE_COMPLETED)
MIGRATION_ROLLED_BACK = "migration-rolled-back"
MIGRATION_FAILED = "migration-failed"  # it did not move and was not rolled back: it stayed, or was lost
EVENTS_LOST = "events-lost"  # this subscriber fell behind: ``count`` events were dropped for it


class Subscription:
    """One follower's queue: ``get`` waits for events; old ones make room for new ones."""

    def __init__(self, bus: EventBus, limit: int) -> None:
        self._bus = bus
        self._queue: deque[dict[str, Any]] = deque()
        self._limit = limit
        self._ready = gevent.event.Event()
        self.lost = 0
        self.ended = False  # the server stops following for it (its control API stops)

    def put(self, event: dict[str, Any]) -> None:
        if len(self._queue) >= self._limit:
            self._queue.popleft()
            self.lost += 1
        self._queue.append(event)
        self._ready.set()

    def get(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """What arrived since the last call (an empty list if nothing did within ``timeout``),
        led by an ``events-lost`` notice when some were dropped."""
        if not self._queue and not self.lost and not self.ended:
            self._ready.clear()
            self._ready.wait(timeout)
        events = list(self._queue)
        self._queue.clear()
        if self.lost:
            events.insert(0, {"event": EVENTS_LOST, "ts": iso_utc(time.time()), "count": self.lost})
            self.lost = 0
        return events

    def end(self) -> None:
        self.ended = True
        self._ready.set()

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self.limit = limit
        self._subscribers: set[Subscription] = set()
        self._seq = 0

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self.limit)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def emit(self, kind: str, **fields: Any) -> None:
        if not self._subscribers:
            return
        self._seq += 1
        event = {"event": kind, "seq": self._seq, "ts": iso_utc(time.time()), **fields}
        for sub in self._subscribers:
            sub.put(event)
