"""common.prefaulted: memory s2 faults in ahead of a migration's bytes is in memory before anyone
touches it (a page fault in the downtime costs about 2 ms per MiB)."""

from __future__ import annotations

import mmap

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
