"""Link keys made ahead of the links that use them.

Every link gets a fresh RSA-1024 key, as spice-server does (the client encrypts its ticket with it).
Making one costs ~9 ms of CPU, so a burst of links (a migration of 500 sessions links 1,000 channels
on the destination) would otherwise queue behind key generation. The pool keeps up to ``size`` keys
made in background threads, refills once links stop taking them, and hands each key out once.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable

import gevent
import gevent.monkey
from cryptography.hazmat.primitives.asymmetric import rsa
from gevent.event import AsyncResult, Event
from gevent.threadpool import ThreadPool

from spicewire.protocol.link import new_link_key

log = logging.getLogger(__name__)

KeyFactory = Callable[[], rsa.RSAPrivateKey]

# The native thread id, also under monkey-patching.
_native_id: Callable[[], int] = gevent.monkey.get_original("threading", "get_native_id")

# Background refills run at the lowest CPU priority: a refill right after a burst of links would
# otherwise compete with the latency-sensitive steps that follow it (a migration's switch).
BACKGROUND_NICE = 19


class KeyPool:
    """Up to ``size`` keys ready, made by ``threads`` background threads; ``size`` 0 makes every key
    on demand. Call start() to begin filling and stop() to end.

    Refilling waits until no link has taken a key for ``refill_delay`` seconds: links come in bursts
    (a session's channels, a migration's pre-connect of hundreds of sessions), and keys made during
    one take CPU from exactly the links and switches it is made of, even at the lowest priority
    (500 sessions migrated in 2.6 s instead of 3.1 s). 0 refills at once."""

    def __init__(self, size: int, threads: int = 1, factory: KeyFactory = new_link_key,
                 refill_delay: float = 0.5) -> None:
        if type(size) is not int or size < 0:
            raise ValueError(f"a key pool's size must be a whole number >= 0, not {size!r}")
        if type(threads) is not int or threads < 1:
            raise ValueError(f"a key pool needs at least one thread, not {threads!r}")
        if not 0 <= refill_delay < float("inf"):  # NaN fails this too
            raise ValueError(f"a key pool's refill delay must be a finite number of seconds >= 0, not {refill_delay!r}")
        self.size = size
        self.threads = threads
        self.refill_delay = refill_delay
        self.made_on_demand = 0  # keys a link had to wait for: the pool was empty
        self._factory = factory
        self._keys: deque[rsa.RSAPrivateKey] = deque()
        self._pending = 0  # keys being made in the background
        self._running = False
        self._workers: ThreadPool | None = None
        self._full = Event()
        self._last_pop = 0.0  # time.monotonic() of the last key taken
        self._quiet: gevent.Greenlet[[], None] | None = None  # waits out a burst before refilling

    @property
    def ready(self) -> int:
        return len(self._keys)

    @property
    def pending(self) -> int:
        """Keys being made in the background right now."""
        return self._pending

    def start(self) -> None:
        if self.size and self._workers is None:
            self._workers = ThreadPool(self.threads)
        self._running = True
        self._refill()

    def stop(self) -> None:
        """Drops the keys; a key still being made is discarded when it arrives."""
        self._running = False
        self._keys.clear()
        self._full.clear()
        if self._quiet is not None:
            self._quiet.kill(block=False)
            self._quiet = None
        if self._workers is not None:
            self._workers.kill()
            self._workers = None

    def wait_full(self, timeout: float | None = None) -> bool:
        """Waits until ``size`` keys are ready (for a caller about to expect a burst of links)."""
        return self._full.wait(timeout)

    def pop(self) -> rsa.RSAPrivateKey:
        self._last_pop = time.monotonic()
        self._full.clear()
        self._refill_when_quiet()
        if self._keys:
            return self._keys.popleft()
        self.made_on_demand += 1
        # In a thread of the hub's pool, at normal priority: this link waits for it, the hub does not.
        return gevent.get_hub().threadpool.apply(self._factory)

    def _refill_when_quiet(self) -> None:
        if not self.refill_delay:
            self._refill()
        elif self._quiet is None and self._running:
            self._quiet = gevent.spawn_later(self.refill_delay, self._after_quiet)

    def _after_quiet(self) -> None:
        self._quiet = None
        left = self._last_pop + self.refill_delay - time.monotonic()
        if left > 0:  # a link took a key meanwhile: the burst goes on
            self._quiet = gevent.spawn_later(left, self._after_quiet)
        else:
            self._refill()

    def _refill(self) -> None:
        # At most one key per thread in flight, so stop() leaves no queue of work behind.
        while (self._running and self._workers is not None and self._pending < self.threads
               and len(self._keys) + self._pending < self.size):
            self._pending += 1
            self._workers.spawn(self._make_in_background).rawlink(self._arrived)
        if len(self._keys) >= self.size:
            self._full.set()

    def _make_in_background(self) -> rsa.RSAPrivateKey:
        if sys.platform == "linux":  # where a thread has its own priority
            os.setpriority(os.PRIO_PROCESS, _native_id(), BACKGROUND_NICE)
        return self._factory()

    def _arrived(self, result: AsyncResult[rsa.RSAPrivateKey]) -> None:
        self._pending -= 1
        key = result.value if result.successful() else None
        if key is None:
            # Not retried here, which could spin: the next link's pop() tries again.
            log.warning("making a link key in the background failed: %s", result.exception)
        elif self._running:
            self._keys.append(key)
            self._refill()
