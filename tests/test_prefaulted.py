"""common.prefaulted: memory s2 faults in ahead of a migration's bytes is in memory before anyone
touches it (a page fault in the downtime costs about 2 ms per MiB)."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from spicewire.server.migration import common

STEP = 16 << 20  # sizes around a round number of pages


def resident(array: np.ndarray) -> int:
    """Bytes of ``array``'s own mapping in memory now, from /proc/self/smaps."""
    address = array.__array_interface__["data"][0]
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the array")


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
