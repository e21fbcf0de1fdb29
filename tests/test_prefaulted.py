"""common.prefaulted: memory s2 faults in ahead of a migration's bytes is in memory before anyone
touches it (a page fault in the downtime costs about 2 ms per MiB), and is given back by a thread of
its own once its last view is gone."""

from __future__ import annotations

import mmap
import time

import numpy as np
import pytest

from spicewire.server.migration import common

STEP = 16 << 20  # sizes around a round number of pages


def resident(array: np.ndarray) -> int:
    """Bytes of ``array``'s pages in memory now, from /proc/self/pagemap (bit 63 of each page's
    entry: present). Exact to the array's own pages: smaps counts a whole mapping, which the
    kernel may have merged with a neighbour."""
    address = array.__array_interface__["data"][0]
    first, end = address // mmap.PAGESIZE, (address + array.nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = np.frombuffer(pagemap.read((end - first) * 8), dtype="<u8")
    return int(np.count_nonzero(entries >> np.uint64(63))) * mmap.PAGESIZE


@pytest.mark.parametrize("size", [STEP - 1, STEP, STEP + 1])
def test_prefaulted_memory_is_in_memory_before_it_is_touched(size):
    array = common.prefaulted(size)
    assert len(array) == size and array.dtype == np.uint8
    assert resident(array) >= size - size % mmap.PAGESIZE
    assert not array.any()
    array[-1] = 7  # writable, and private to us
    assert array[-1] == 7


def test_an_unfaulted_mapping_is_not_resident():
    """The check above can fail: a mapping nobody touched holds no pages."""
    memory = mmap.mmap(-1, 4 * STEP, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    assert resident(np.frombuffer(memory, dtype=np.uint8)) < STEP


def mapped(address: int) -> bool:
    """Whether ``address`` lies in one of this process's mappings (/proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if start <= address < end:
                return True
    return False


class Holding:
    """Stands in for the unmapper's queue: keeps what it is handed, unmapped."""

    def __init__(self) -> None:
        self.regions: list[mmap.mmap] = []

    def put(self, region: mmap.mmap) -> None:
        self.regions.append(region)


def test_the_last_view_going_hands_the_mapping_to_the_unmapper_instead_of_unmapping_it(monkeypatch):
    """Where the last view goes (the hub, usually) no munmap happens: a faulted-in GiB takes ~90 ms
    to give back, which every other session would wait for."""
    holding = Holding()
    monkeypatch.setattr(common, "_unmapping", holding)
    array = common.prefaulted(STEP)
    view = array[STEP // 2:]
    address = array.__array_interface__["data"][0]
    del array
    assert mapped(address) and not holding.regions  # a view is left: nothing is handed on
    del view
    assert len(holding.regions) == 1 and mapped(address)  # handed on, still mapped here
    holding.regions.pop().close()
    assert not mapped(address)


def test_the_unmapper_thread_gives_the_memory_back():
    array = common.prefaulted(STEP)
    address = array.__array_interface__["data"][0]
    assert mapped(address)
    del array
    deadline = time.monotonic() + 10
    while mapped(address) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not mapped(address)


def test_a_worker_thread_faulting_memory_in_leaves_the_hub_its_turns():
    """The hub keeps running, mapping and unmapping memory as it serves, while a worker thread
    faults 512 MiB in. With MAP_POPULATE it got no turn from the populate's start to its end: mmap
    held the GIL, and the kernel the process's mmap lock, all that time (0.5-2 s a GiB here).
    The worker's call is cut in eighths; the hub must have had turns in most of the six inner
    ones (the outer ones hold the thread's own Python, where the GIL goes back and forth). The
    hub's mmap waits for the lock while the populate's steps hold it, up to a few ms each time:
    256 MiB of recently used memory took 0.07 s, eighths of 9 ms, and the hub then missed three
    of them in 4 runs of 40."""
    import gevent

    turns: list[float] = []
    window: list[float] = []
    done = gevent.event.Event()

    def hub_work() -> None:
        while not done.is_set():
            scratch = mmap.mmap(-1, 1 << 20)  # needs the mmap lock for writing
            scratch.close()
            turns.append(time.monotonic())
            gevent.sleep(0)

    def fault_in_a_worker() -> np.ndarray:
        window.append(time.monotonic())
        array = common.prefaulted(32 * STEP)
        window.append(time.monotonic())
        return array

    worker = gevent.spawn(hub_work)
    try:
        array = gevent.get_hub().threadpool.apply(fault_in_a_worker)
    finally:
        done.set()
        worker.join()
    assert resident(array) == array.nbytes
    start, end = window
    eighth = (end - start) / 8
    served = {int((t - start) // eighth) for t in turns if start <= t < end}
    inner = served & set(range(1, 7))
    assert len(inner) >= 4, f"the hub had turns in {sorted(served)} of the populate's eighths ({end - start:.3f} s)"


@pytest.mark.parametrize("size", [common.SPLIT_FAULT_MIN - 1, common.SPLIT_FAULT_MIN, common.SPLIT_FAULT_MIN + 1])
def test_a_large_prefault_is_faulted_in_two_halves_side_by_side(monkeypatch, size):
    """From SPLIT_FAULT_MIN on, two threads fault in the two page-aligned halves, which cover
    the array exactly; below it, one call does it all. Either way every page is in memory."""
    import threading

    real, calls = common.codec.fault_in, []

    def fault_in(view):
        start = view.__array_interface__["data"][0]
        calls.append((threading.get_native_id(), start, len(view)))
        real(view)

    monkeypatch.setattr(common.codec, "fault_in", fault_in)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    array = common.prefaulted(size)
    base = array.__array_interface__["data"][0]
    spans = sorted((start - base, length) for _, start, length in calls)
    if size < common.SPLIT_FAULT_MIN:
        assert spans == [(0, size)]
    else:
        (first, cut), (second, rest) = spans
        assert first == 0 and second == cut and cut % mmap.PAGESIZE == 0 and cut + rest == size
        assert len({thread for thread, _, _ in calls}) == 2
    assert resident(array) >= size - size % mmap.PAGESIZE


def test_a_prefault_whose_helper_fails_raises_once_both_halves_are_done(monkeypatch):
    real, done = common.codec.fault_in, []

    def fault_in(view):
        if view.__array_interface__["data"][0] != base[0]:
            raise MemoryError("no room for the second half")
        time.sleep(0.05)  # the helper fails first; the caller still finishes its half
        real(view)
        done.append(len(view))

    region = mmap.mmap(-1, common.SPLIT_FAULT_MIN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(region, dtype=np.uint8)
    base = [array.__array_interface__["data"][0]]
    monkeypatch.setattr(common.codec, "fault_in", fault_in)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    with pytest.raises(MemoryError, match="second half"):
        common._fault_in(array)
    assert done == [common.SPLIT_FAULT_MIN // 2]


def test_one_core_faults_in_with_one_thread(monkeypatch):
    calls = []
    monkeypatch.setattr(common.codec, "fault_in", lambda view: calls.append(len(view)))
    monkeypatch.setattr(common.os, "cpu_count", lambda: 1)
    common._fault_in(np.empty(common.SPLIT_FAULT_MIN, dtype=np.uint8))
    assert calls == [common.SPLIT_FAULT_MIN]
