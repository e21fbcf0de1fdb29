"""Freed memory back to the system, without stopping the hub.

glibc keeps what Python frees on its heap; ``malloc_trim`` gives it back. The trim runs in a
worker thread (ctypes lets go of the GIL), but glibc holds the heap's lock while it returns the
pages, and every allocation the hub makes meanwhile waits for it: on the 2-core VM this was
measured on, the trim after a session's 1 GiB of 64 KiB buffers were freed stopped the hub for
75-95 ms, every other session with it.

So the buffers of a session that leaves go a step at a time (``Releaser``): RELEASE_STEP bytes of
them let go of on the hub, a trim in a worker thread, then the next step. With 16 MiB steps the hub
waited at most 3-5 ms, and the whole GiB took 150 ms instead of 95 (it runs beside everything
else). Smaller frees add up to a trim once TRIM_AFTER bytes were released (``SpiceServer.memory_freed``).
"""

from __future__ import annotations

import ctypes
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import gevent

log = logging.getLogger(__name__)

TRIM_AFTER = 64 << 20
RELEASE_STEP = 16 << 20

_libc: ctypes.CDLL | None = None


def release_free_memory() -> None:
    """Give freed heap back to the system (glibc; elsewhere nothing happens). A session that
    leaves (or migrates away) may free hundreds of MiB of small buffers, which glibc keeps on its
    heap otherwise: the RSS would stay as if the session were still here."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError) as err:
        log.debug("not glibc, freed heap stays with the process: %s", err)


def trim_in_thread(trim: Callable[[], None] = release_free_memory) -> None:
    """Run ``trim`` in the hub's thread pool and wait for it (this greenlet only)."""
    gevent.get_hub().threadpool.spawn(trim).get()


class Releaser:
    """Lets go of large buffer queues a step at a time, the heap trimmed after each step (see the
    module's docstring). ``drop`` takes queues over: whoever else holds one of them sees it emptied
    as the steps go."""

    def __init__(self, step: int = RELEASE_STEP, trim: Callable[[], None] = trim_in_thread) -> None:
        if step < 1:
            raise ValueError(f"a release step is at least one byte, not {step}")
        self.step = step
        self._trim = trim
        self._queues: deque[deque[Any]] = deque()
        self._worker: gevent.Greenlet[[], None] | None = None
        self.pending = 0  # bytes handed over and not let go of yet
        self.trims = 0

    @property
    def busy(self) -> bool:
        """Whether steps are under way (each ends with a trim: no other one is needed meanwhile)."""
        return self._worker is not None

    def drop(self, queues: Iterable[deque[Any]], size: int) -> None:
        """Let go of ``queues``, ``size`` bytes in all. Less than a step, while no steps are under
        way, goes at once: freeing it costs the hub little, and it adds to the server's next trim."""
        queues = [queue for queue in queues if queue]
        if not queues:
            return
        if size < self.step and not self.busy:
            for queue in queues:
                queue.clear()
            return
        self._queues.extend(queues)
        self.pending += size
        if self._worker is None:
            self._worker = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            while self._queues:
                self.pending = max(0, self.pending - self._let_go_of_a_step())
                try:
                    self._trim()
                except Exception as err:  # the buffers are let go of all the same
                    log.warning("freed memory could not go back to the system: %s", err)
                self.trims += 1
        finally:
            self._worker = None
            self.pending = 0

    def _let_go_of_a_step(self) -> int:
        """A step's bytes off the front queues (the buffer that crosses the step goes whole)."""
        freed = 0
        while self._queues and freed < self.step:
            queue = self._queues[0]
            while queue and freed < self.step:
                freed += memoryview(queue.popleft()).nbytes
            if not queue:
                self._queues.popleft()
        return freed

    def close(self) -> None:
        """The server stops: the rest goes at once."""
        if self._worker is not None:
            self._worker.kill()
        for queue in self._queues:
            queue.clear()
        self._queues.clear()
