"""Sharing the hub while one greenlet moves a large body.

gevent switches greenlets only when a socket would block. On loopback a socket to a fast peer
seldom does, so a greenlet sending or receiving a large body (a MIGRATE_DATA, a pre-copy round, a
control API body such as a display pre-copy) would keep the hub, and every other connection of the
process waiting, until the body's end: a 1 GiB pre-copy round held s1's hub for 0.3-0.5 s, during
which the migrating client's own writes piled up unread in its socket (2 MB) and went through the
client in the downtime instead. So such a loop gives the others a turn (``gevent.idle()``, after
every ready socket had its own) every BULK_TURN bytes it moved: ``BulkTurns.share``.
"""

from __future__ import annotations

import gevent

BULK_TURN = 8 << 20
"""Bytes of one large body read or written between two turns for the other greenlets. A turn per
1 MiB sendmsg or per landing read cost s1 and s2 each some 8% of their CPU in a 512 MiB switch (the
hub's loop after every copy, with cold caches), while this one connection is the downtime; a socket
that runs dry or full still waits, and the others run then."""


class BulkTurns:
    """Counts the bytes of a large body moved since the other greenlets last had a turn."""

    def __init__(self) -> None:
        self.unturned = 0

    def moved(self, n: int) -> bool:
        """``n`` more bytes moved; True when the others are due a turn (counted from 0 again)."""
        self.unturned += n
        if self.unturned < BULK_TURN:
            return False
        self.unturned = 0
        return True

    def share(self, n: int) -> None:
        """``n`` more bytes moved: the others get their turn here when it is due."""
        if self.moved(n):
            gevent.idle()

    def restart(self) -> None:
        """The others had their turn (or the body ended): count from 0."""
        self.unturned = 0
