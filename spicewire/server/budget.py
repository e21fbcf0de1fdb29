"""One bound on the bytes a server holds for all its sessions together.

Each place that keeps client or device bytes around (a port's buffers in both directions, a
connection's queued frames, a migration's receive buffers, an announcement's prefault) reserves
what it keeps and releases it when the bytes are gone. Nothing here refuses a reservation: bytes
already accepted are never dropped, so a reservation may take the total over the limit. What the
limit changes is what the server takes on next: over it, connections stop reading (``exhausted``)
and new work is refused (``admits``), until releases bring the total back under it.

No I/O, no clock: the network layer decides when to read, and when to return freed heap to the
system (``trim_due``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

# Without a limit given: a quarter of the machine's memory, as the rest belongs to the guests,
# the host and the other processes a SPICE server shares a machine with.
DEFAULT_SHARE = 4
FALLBACK_LIMIT = 1 << 30  # when the machine's memory cannot be read

# Freed heap goes back to the system once this much was released since the last time, or once
# nothing is held any more and at least TRIM_IDLE was released: trimming a large heap takes time.
TRIM_IDLE = 1 << 20


def default_limit() -> int:
    """A quarter of the machine's physical memory."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError) as err:  # a platform without these names
        log.debug("physical memory unknown (%s): a memory budget of %d bytes", err, FALLBACK_LIMIT)
        return FALLBACK_LIMIT
    return max(1, total // DEFAULT_SHARE) if total > 0 else FALLBACK_LIMIT


class MemoryBudget:
    """The bytes held across every session, against ``limit``."""

    def __init__(self, limit: int | None = None) -> None:
        if limit is None:
            limit = default_limit()
        if type(limit) is not int or limit < 1:
            raise ValueError(f"a memory budget must be a whole number of bytes, at least 1, not {limit!r}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.refused = 0  # new work turned away over the limit (admits() said no)
        self.throttled = 0  # times a reader was told to stop (wait_for_room)
        self._freed = 0  # released since trim_due last said yes
        self._waiting: list[Callable[[], None]] = []

    def reserve(self, n: int) -> None:
        """``n`` more bytes are held. Always taken: refusing would drop data already accepted."""
        if n < 0:
            raise ValueError(f"cannot reserve {n} bytes")
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    def release(self, n: int) -> None:
        """``n`` bytes reserved earlier are gone. Under the limit again, whoever waits is called."""
        if n < 0 or n > self.used:
            raise ValueError(f"cannot release {n} bytes of the {self.used} reserved")
        self.used -= n
        self._freed += n
        if self._waiting and self.used < self.limit:
            waiting, self._waiting = self._waiting, []
            for resume in waiting:
                resume()

    @property
    def exhausted(self) -> bool:
        """Whether readers should stop: the limit is reached."""
        return self.used >= self.limit

    def admits(self, n: int = 0) -> bool:
        """Whether new work needing ``n`` bytes may start; a refusal is counted."""
        if self.used + n <= self.limit and not self.exhausted:
            return True
        self.refused += 1
        return False

    def wait_for_room(self, resume: Callable[[], None]) -> None:
        """Call ``resume`` once the total is under the limit again (at once if it already is)."""
        if not self.exhausted:
            resume()
            return
        self.throttled += 1
        if resume not in self._waiting:
            self._waiting.append(resume)

    def forget(self, resume: Callable[[], None]) -> None:
        """``resume`` no longer waits (its connection closed)."""
        if resume in self._waiting:
            self._waiting.remove(resume)

    def trim_due(self, threshold: int) -> bool:
        """Whether freed heap should go back to the system now: ``threshold`` bytes were released
        since the last time this said yes, or nothing is held and some was released."""
        if self._freed >= threshold or (self.used == 0 and self._freed >= TRIM_IDLE):
            self._freed = 0
            return True
        return False

    def status(self) -> dict[str, int]:
        return {"limit": self.limit, "used": self.used, "peak": self.peak,
                "refused": self.refused, "throttled": self.throttled}
