"""Layout constants shared by the compiled codec and its pure-Python twin (one source of truth).

Bulk chunk container (``pack_chunks``), all integers little-endian::

    0   4s   magic        b"SWCK"
    4   u16  version      1
    6   u16  header_size  32
    8   u32  count        number of chunks
    12  u32  flags        0 (reserved; anything else is rejected)
    16  u64  total_size   bytes of the whole container: header, index, padding and data
    24  u64  payload_size sum of the chunk lengths
    32  count x {u64 offset, u64 length}   offsets from the container start
    ..  zero padding up to a multiple of 64 (so bulk stores start cache-line aligned)
    ..  chunk bytes, back to back, in index order
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from spicewire._codec import Buffer

CHUNK_MAGIC = 0x4B435753  # b"SWCK" as a little-endian u32
CHUNK_VERSION = 1
CHUNK_HEADER_SIZE = 32
CHUNK_INDEX_ENTRY_SIZE = 16
CHUNK_DATA_ALIGN = 64

# Message headers (PROTOCOL.md section 2), for the pure twin and the framing layer alike.
MINI_HEADER = struct.Struct("<HI")  # SpiceMiniDataHeader: type, size
FULL_HEADER = struct.Struct("<QHII")  # SpiceDataHeader: serial, type, size, sub_list
MINI_HEADER_SIZE = MINI_HEADER.size  # 6
FULL_HEADER_SIZE = FULL_HEADER.size  # 18

# Sizes of one message body that scan() and the framing accept unless told otherwise. SPICE allows a
# u32; real servers cap far lower per channel (PROTOCOL.md section 2).
DEFAULT_MAX_SIZE = 64 * 1024 * 1024

FAULT_STEP = 256 * 1024
"""Bytes ``fault_in`` faults in per system call: the kernel holds the process's mmap lock through
each, about 0.1 ms for this much, and every other thread's mmap, munmap and brk waits for it."""

# From this many bytes on (the payload pack_chunks copies, the input scan walks) the compiled codec
# writes its output with streaming stores: output that large leaves the cache before anyone reads it.
# Below it a plain store wins: the output fits in cache and is usually read soon. Results are the same.
STREAM_THRESHOLD = 4 * 1024 * 1024

# scan asks for the input's cache lines this many bytes ahead of its walk, while at least as many
# are left: a hint, which changes no result.
SCAN_PREFETCH = 1024

__all__ = [
    "CHUNK_DATA_ALIGN",
    "CHUNK_ENTRY",
    "CHUNK_HEADER",
    "CHUNK_HEADER_SIZE",
    "CHUNK_INDEX_ENTRY_SIZE",
    "CHUNK_MAGIC",
    "CHUNK_VERSION",
    "DEFAULT_MAX_SIZE",
    "FULL_HEADER",
    "FULL_HEADER_SIZE",
    "MINI_HEADER",
    "MINI_HEADER_SIZE",
    "SCAN_PREFETCH",
    "STREAM_THRESHOLD",
    "container_index",
]


def data_start(count: int) -> int:
    """Where the first chunk's bytes start in a container of ``count`` chunks."""
    index_end = CHUNK_HEADER_SIZE + CHUNK_INDEX_ENTRY_SIZE * count
    return -(-index_end // CHUNK_DATA_ALIGN) * CHUNK_DATA_ALIGN


CHUNK_HEADER = struct.Struct("<IHHIIQQ")  # magic, version, header size, count, flags, total size, payload size
CHUNK_ENTRY = struct.Struct("<QQ")  # a chunk's offset and length


def container_index(lengths: Sequence[int]) -> bytes:
    """The bytes of a container that come before its chunks, for chunks of ``lengths``: the header,
    the index, the padding up to ``data_start``."""
    start = data_start(len(lengths))
    payload = sum(lengths)
    index = bytearray(start)
    CHUNK_HEADER.pack_into(index, 0, CHUNK_MAGIC, CHUNK_VERSION, CHUNK_HEADER_SIZE, len(lengths), 0,
                           start + payload, payload)
    pos = start
    for k, length in enumerate(lengths):
        CHUNK_ENTRY.pack_into(index, CHUNK_HEADER_SIZE + k * CHUNK_INDEX_ENTRY_SIZE, pos, length)
        pos += length
    return bytes(index)


def output_buffer(out: object, total: int) -> npt.NDArray[np.uint8]:
    """The buffer pack_chunks writes into: ``out`` when it is usable and large enough, else a new one."""
    import numpy as np

    if out is None:
        return np.empty(total, dtype=np.uint8)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.uint8
        or out.ndim != 1
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise TypeError("out must be a writable, C-contiguous, 1-D numpy uint8 array")
    if out.shape[0] < total:
        return np.empty(total, dtype=np.uint8)
    return out


def byte_view(buf: Buffer) -> memoryview:
    """A flat unsigned-byte memoryview of any C-contiguous buffer, for slicing out zero-copy views."""
    view = memoryview(buf)  # type: ignore[arg-type]  # numpy declares ndarray.__buffer__ from Python 3.12 on
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view
