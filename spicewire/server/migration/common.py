"""What the server's migration roles share: channel keys, mode labels, and the memory tricks
that keep the downtime short."""

from __future__ import annotations

import ctypes
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


POPULATE_STEP = 16 << 20
"""Bytes faulted in per system call. Faulting in holds the process's memory-map lock, which every
mmap and munmap of the hub's (a large allocation, a freed one) waits for: one MAP_POPULATE of 1 GiB
stalled the hub up to 76 ms; a step of 16 MiB costs it a few ms at most."""
MADV_POPULATE_WRITE = 23  # Linux 5.14; Python's mmap names it from 3.12 on

# Through ctypes, which lets go of the GIL for the call (mmap.madvise keeps it): the hub runs
# while a step faults in.
_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int


def prefaulted(size: int) -> np.ndarray:
    """Anonymous memory faulted in now, POPULATE_STEP bytes at a time, in a worker thread."""
    array = np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=np.uint8)
    address = array.__array_interface__["data"][0]
    for offset, length in populate_steps(size):
        if _madvise(address + offset, length, MADV_POPULATE_WRITE) != 0:
            # An older kernel (EINVAL): a write per page faults it in, one lock each.
            array[offset:offset + length:mmap.PAGESIZE] = 0
    return array


def populate_steps(size: int) -> list[tuple[int, int]]:
    """The (offset, length) pieces ``prefaulted`` faults in, POPULATE_STEP each, the last one less."""
    return [(offset, min(POPULATE_STEP, size - offset)) for offset in range(0, size, POPULATE_STEP)]
