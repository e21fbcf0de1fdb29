"""codec.fault_in: every page of a buffer is in memory afterwards, its contents unchanged, in both
backends and both ways the compiled one has (MADV_POPULATE_WRITE a step at a time, and writing each
page in place, as on kernels that refuse the advice), on both sides of the step and of page edges."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from spicewire._codec_layout import FAULT_STEP
from tests.test_prefaulted import resident

PAGE = mmap.PAGESIZE


def fresh(size: int) -> tuple[mmap.mmap, np.ndarray]:
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return memory, np.frombuffer(memory, dtype=np.uint8)


def ways(both_codecs):
    fast, pure = both_codecs
    return [("compiled, advised", lambda buf, **kw: fast.fault_in(buf, **kw)),
            ("compiled, page by page", lambda buf, **kw: fast.fault_in(buf, advise=False, **kw)),
            ("pure", lambda buf, **kw: pure.fault_in(buf, **kw))]


@pytest.mark.parametrize("size", [FAULT_STEP - 1, FAULT_STEP, FAULT_STEP + 1, 3 * FAULT_STEP + PAGE + 1])
@pytest.mark.parametrize("start", [0, 1, PAGE - 1])
def test_every_page_of_the_buffer_is_resident_and_nothing_else_is_touched(both_codecs, size, start):
    for label, fault_in in ways(both_codecs):
        memory, whole = fresh(size + 3 * PAGE)
        buffer = whole[PAGE + start:PAGE + start + size]
        assert resident(buffer) == 0
        fault_in(buffer)
        first, end = (PAGE + start) // PAGE, (PAGE + start + size + PAGE - 1) // PAGE
        assert resident(buffer) == (end - first) * PAGE, label
        assert resident(whole[:PAGE]) == 0 and resident(whole[end * PAGE:]) == 0, label  # only its own pages
        assert not whole.any(), label
        del buffer, whole
        memory.close()


@pytest.mark.parametrize("step", [1, PAGE - 1, PAGE, PAGE + 1, FAULT_STEP, 1 << 30])
def test_any_step_faults_every_page_in(both_codecs, step):
    for label, fault_in in ways(both_codecs):
        memory, whole = fresh(4 * FAULT_STEP)
        fault_in(whole[3:], step=step)
        assert resident(whole) == whole.nbytes, label
        del whole
        memory.close()


def test_contents_stay_as_they_were(both_codecs):
    for label, fault_in in ways(both_codecs):
        memory, whole = fresh(8 * PAGE)
        pattern = np.random.default_rng(1).integers(0, 256, 3 * PAGE, dtype=np.uint8)
        whole[2 * PAGE + 5:5 * PAGE + 5] = pattern
        fault_in(whole[1:])
        assert np.array_equal(whole[2 * PAGE + 5:5 * PAGE + 5], pattern), label
        assert not whole[:2 * PAGE + 5].any() and not whole[5 * PAGE + 5:].any(), label
        del whole
        memory.close()


def test_an_empty_buffer_is_nothing_to_do(both_codecs):
    for _, fault_in in ways(both_codecs):
        fault_in(bytearray())
        fault_in(np.zeros(0, dtype=np.uint8))


@pytest.mark.parametrize("bad", [b"read-only", np.zeros(16, dtype=np.uint8)[::2]], ids=["bytes", "strided"])
def test_what_cannot_be_written_in_place_is_refused_alike(both_codecs, bad):
    for _, fault_in in ways(both_codecs):
        with pytest.raises(BufferError):
            fault_in(bad)
        with pytest.raises(ValueError, match="step must be >= 1"):
            fault_in(bytearray(8), step=0)
