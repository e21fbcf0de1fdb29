"""What the server's migration roles share: channel keys, mode labels, and the memory tricks
that keep the downtime short."""

from __future__ import annotations

import gc
import logging
import mmap
from contextlib import contextmanager

import numpy as np

from spicewire.protocol import migration as mig
from spicewire.protocol.enums import ChannelType

log = logging.getLogger(__name__)

MAIN = mig.MAIN


def port_channel(channel_id: int) -> mig.Channel:
    return (ChannelType.PORT, channel_id)


def mode_label(mode: mig.MigrationMode | None) -> str | None:
    return None if mode is None else mode.label


@contextmanager
def collector_paused():
    """For the downtime's bursts of small objects (a chunk list per MIGRATE_DATA): the cyclic
    collector would otherwise walk the whole heap in the middle of them, several ms in a big server."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def prefaulted(size: int) -> np.ndarray:
    """Anonymous memory the kernel maps in at once (MAP_POPULATE), in a worker thread."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, size, flags=flags), dtype=np.uint8)
