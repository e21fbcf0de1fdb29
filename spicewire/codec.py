"""The hot-path codec: message headers and the bulk chunk container used for MIGRATE_DATA.

The compiled extension (_codec.pyx) is used when it is built; SPICEWIRE_PURE=1 forces the pure-Python
twin (_codec_py.py), which gives identical results and raises identical errors.

- ``parse_header(buf, offset=0, mini=True)``: ``(type, size)`` for a mini header, ``(serial, type,
  size, sub_list)`` for a full one, or ``None`` when fewer bytes than a header remain at ``offset``.
- ``scan(buf, mini=True, max_size=DEFAULT_MAX_SIZE)``: every complete message back to back from the
  start of ``buf`` as ``(body_offsets int64, types uint16, sizes uint32, consumed)``; stops at the
  first incomplete message; a body larger than ``max_size`` raises MessageTooLarge.
- ``pack_chunks(chunks, out=None)``: many buffers into ONE numpy uint8 container (layout in
  _codec_layout.py); ``out`` is reused when it is large enough. ``packed_size(chunks)`` sizes it.
- ``unpack_chunks(buf)``: the container's chunks as zero-copy memoryviews, after validating it.
- ``gathered_chunks(chunks, batch)``: the container ``pack_chunks(chunks)`` makes, as lists of about
  ``batch`` bytes of views (its index, then the chunks' own memory), and its size: for a socket to
  send as they are, with no copy made (one backend for both: it only builds the index).
- ``damage_tiles(current, shadow, tile, dirty, copy=True)``: compares two C-contiguous (h, w, 4) uint8
  frames in tiles of ``tile`` pixels; sets ``dirty[ty, tx]`` (a C-contiguous uint8 array of
  ``(ceil(h / tile), ceil(w / tile))``) to 1 where the tile differs and 0 where not, copies the
  differing tiles from ``current`` into ``shadow`` when ``copy``, and returns how many differ. Any
  other shape, dtype, layout, a read-only output or arrays sharing memory raise ValueError.
- ``fault_in(buf, step=FAULT_STEP, advise=True)``: faults in every page of the writable buffer
  ``buf`` (fresh memory nobody else uses yet) for writing, contents unchanged, without holding the
  GIL: MADV_POPULATE_WRITE ``step`` bytes per system call, or (where the kernel refuses it, or
  ``advise`` is false) each page written in place. mmap's MAP_POPULATE does it holding the GIL,
  and the kernel's mmap lock, for the whole mapping: a worker thread that faulted a GiB in that
  way stopped the hub for 0.5-2 s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from spicewire._codec_layout import DEFAULT_MAX_SIZE, byte_view, container_index

if TYPE_CHECKING:
    # Both twins keep the API that _codec.pyi declares; type checkers read it there.
    from spicewire import _codec as _impl

    BACKEND: str
elif os.environ.get("SPICEWIRE_PURE", "") not in ("", "0"):
    from spicewire import _codec_py as _impl

    BACKEND = "python"
else:
    try:
        from spicewire import _codec as _impl

        BACKEND = "cython"
    except ImportError:
        from spicewire import _codec_py as _impl

        BACKEND = "python"

parse_header = _impl.parse_header
scan = _impl.scan
pack_chunks = _impl.pack_chunks
packed_size = _impl.packed_size
unpack_chunks = _impl.unpack_chunks
damage_tiles = _impl.damage_tiles
fault_in = _impl.fault_in


def gathered_chunks(chunks: Sequence[Any], batch: int) -> tuple[list[list[bytes | memoryview]], int]:
    """See the module's docstring. A chunk larger than ``batch`` is cut into views of ``batch``."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    views = [byte_view(chunk) for chunk in chunks]
    index = container_index([len(view) for view in views])
    batches: list[list[bytes | memoryview]] = [[index]]
    filled = len(index)
    for view in views:
        for start in range(0, len(view), batch):
            piece = view[start : start + batch]
            if filled + len(piece) > batch:
                batches.append([])
                filled = 0
            batches[-1].append(piece)
            filled += len(piece)
    return batches, len(index) + sum(len(view) for view in views)


__all__ = [
    "BACKEND",
    "DEFAULT_MAX_SIZE",
    "damage_tiles",
    "fault_in",
    "gathered_chunks",
    "pack_chunks",
    "packed_size",
    "parse_header",
    "scan",
    "unpack_chunks",
]
