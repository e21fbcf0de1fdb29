"""What the server's migration roles share: channel keys, mode labels, and the memory tricks
that keep the downtime short."""

from __future__ import annotations

import gc
import logging
import mmap
import os
import weakref
from collections.abc import Callable
from contextlib import contextmanager, suppress
from typing import Any

import gevent.monkey
import numpy as np

from spicewire import codec
from spicewire.protocol import migration as mig
from spicewire.protocol.enums import ChannelType
from spicewire.server.display import GraphicsConnection
from spicewire.server.session import PortConnection

log = logging.getLogger(__name__)

MAIN = mig.MAIN


def port_channel(channel_id: int) -> mig.Channel:
    return (ChannelType.PORT, channel_id)


def channel_of(handler: PortConnection | GraphicsConnection) -> mig.Channel:
    """The migration's key for a session channel's connection."""
    if isinstance(handler, PortConnection):
        return port_channel(handler.port.channel_id)
    return (handler.channel_type, 0)


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
    """Anonymous memory faulted in at once, for a worker thread to make. The faults go through
    ``codec.fault_in``, not MAP_POPULATE: mmap makes those holding the GIL, and the kernel holds
    the process's mmap lock through all of them, so a worker thread populating a GiB stopped the
    hub for 0.5-2 s (every session of the server with it). The memory is given back in a thread
    of its own too, once the last view of it is gone (``_unmap_later``): returning faulted-in
    pages costs about 0.1 ms a MiB, and that last view usually goes on the hub, right as a session
    lands (a 64 MiB tail room, 5-7 ms) or as a device takes the last bytes of a GiB it was
    restored with (~90 ms), while every other session waits."""
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(region, dtype=np.uint8)
    # The finalizer holds the mapping until the array is gone, then hands it to the unmapper
    # thread, which drops the last reference: the munmap happens there.
    weakref.finalize(array, _unmap_later, region).atexit = False
    _fault_in(array)
    return array


SPLIT_FAULT_MIN = 64 << 20
"""A prefault at least this large is split in two, faulted in side by side by this thread and a
helper: zeroing fresh pages is most of its cost (on this 2-core VM 1.3-2.5 ms a MiB one thread
alone, as the host backs what the guest gave back), and a GiB announced for a port took s2 2.5 s
before its pre-copy could start. Two threads: 0.23-0.26 ms a MiB against 0.47-1.26."""


def _fault_in(array: np.ndarray) -> None:
    """codec.fault_in, in two halves side by side for a large array (SPLIT_FAULT_MIN) on a
    machine with more than one core."""
    if len(array) < SPLIT_FAULT_MIN or (os.cpu_count() or 1) < 2:
        codec.fault_in(array)
        return
    cut = len(array) // 2 // mmap.PAGESIZE * mmap.PAGESIZE
    done = _allocate_lock()
    done.acquire()
    failed: list[BaseException] = []

    def helper() -> None:
        try:
            codec.fault_in(array[cut:])
        except BaseException as err:  # reported by the caller, once the halves are done
            failed.append(err)
        finally:
            done.release()

    _start_thread(helper, ())
    try:
        codec.fault_in(array[:cut])
    finally:
        done.acquire()  # never left running over memory the caller may drop on an error
    if failed:
        raise failed[0]


# The originals: under monkey-patching a thread would be a greenlet, and its munmap (or a
# prefault's half) the hub's again.
_start_thread: Callable[..., int] = gevent.monkey.get_original("_thread", "start_new_thread")
_allocate_lock: Callable[[], Any] = gevent.monkey.get_original("_thread", "allocate_lock")
_SimpleQueue: Any = gevent.monkey.get_original("queue", "SimpleQueue")
_unmapping: Any = None  # the unmapper's queue, made with its thread on first use
_unmapping_lock = _allocate_lock()  # any thread may drop a view


def _unmap_later(region: mmap.mmap) -> None:
    global _unmapping
    with _unmapping_lock:
        if _unmapping is None:
            _unmapping = _SimpleQueue()
            _start_thread(_unmapper, (_unmapping,))
    _unmapping.put(region)


def _unmapper(regions: Any) -> None:
    """Closes the regions it is handed (an OS thread: the munmap lets go of the GIL)."""
    while True:
        region = regions.get()
        with suppress(BufferError):  # a view outlived its array after all: the mapping goes with it
            region.close()
        del region

