"""Buffers that end (or start) right at an inaccessible page, so any out-of-bounds access by the
compiled codec kills the test process instead of silently reading a neighbour's bytes."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_NONE = 0


class GuardedArena:
    """[guard page][capacity bytes][guard page]; data is copied to touch one guard or the other."""

    def __init__(self, capacity: int) -> None:
        page = mmap.PAGESIZE
        self.capacity = -(-capacity // page) * page
        self._map = mmap.mmap(-1, self.capacity + 2 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        base = self._array.ctypes.data
        for guard in (base, base + page + self.capacity):
            if _libc.mprotect(guard, page, PROT_NONE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
        self._lo = page
        self._hi = page + self.capacity

    def at_end(self, data) -> np.ndarray:
        """A writable uint8 array holding ``data`` whose last byte is followed by the guard page."""
        n = len(data)
        view = self._array[self._hi - n : self._hi]
        view[:] = np.frombuffer(bytes(data), dtype=np.uint8)
        return view

    def at_start(self, data) -> np.ndarray:
        n = len(data)
        view = self._array[self._lo : self._lo + n]
        view[:] = np.frombuffer(bytes(data), dtype=np.uint8)
        return view

    def empty_at_end(self, n: int) -> np.ndarray:
        return self._array[self._hi - n : self._hi]
