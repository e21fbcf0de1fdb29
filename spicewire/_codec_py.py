"""Pure-Python twin of the compiled codec: same results, same errors, no compiler needed.

It is the reference the property tests hold the extension to, and the fallback where the extension
cannot be built. Keep every check in the same order as _codec.pyx so both raise the same error.
"""

from __future__ import annotations

import mmap
import operator
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, SupportsIndex

import numpy as np
import numpy.typing as npt

from spicewire import _codec_layout as layout
from spicewire.errors import CodecError, MessageTooLarge

if TYPE_CHECKING:
    from spicewire._codec import Buffer

DEFAULT_MAX_SIZE = layout.DEFAULT_MAX_SIZE
_SSIZE_MAX = 2**63 - 1

_MINI = layout.MINI_HEADER
_FULL = layout.FULL_HEADER


def _ssize(value: SupportsIndex) -> int:
    value = operator.index(value)
    if not -_SSIZE_MAX - 1 <= value <= _SSIZE_MAX:
        raise OverflowError("Python int too large to convert to C ssize_t")
    return value


def _flat(buf: Buffer) -> memoryview:
    """Raise what the buffer protocol raises for a compiled PyBUF_SIMPLE request."""
    view = memoryview(buf)  # type: ignore[arg-type]  # numpy declares ndarray.__buffer__ from Python 3.12 on
    if not view.c_contiguous:
        raise BufferError("buffer is not C-contiguous")
    return layout.byte_view(view)


def parse_header(buf: Buffer, offset: int = 0, mini: bool = True) -> tuple[int, ...] | None:
    offset = _ssize(offset)
    data = buf if type(buf) is bytes else _flat(buf)
    if offset < 0:
        raise CodecError(f"negative offset {offset}")
    layout_ = _MINI if mini else _FULL
    if offset > len(data) - layout_.size:
        return None
    return layout_.unpack_from(data, offset)


def scan(
    buf: Buffer, mini: bool = True, max_size: int = DEFAULT_MAX_SIZE
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint16], npt.NDArray[np.uint32], int]:
    max_size = _ssize(max_size)
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0, got {max_size}")
    data = _flat(buf)
    header = _MINI if mini else _FULL
    hdr = header.size
    type_at, size_at = (0, 2) if mini else (8, 10)
    n = len(data)
    offsets, types, sizes = [], [], []
    pos = 0
    while n - pos >= hdr:
        (size,) = struct.unpack_from("<I", data, pos + size_at)
        if size > max_size:
            raise MessageTooLarge(size, max_size, pos)
        if size > n - pos - hdr:
            break
        offsets.append(pos + hdr)
        types.append(struct.unpack_from("<H", data, pos + type_at)[0])
        sizes.append(size)
        pos += hdr + size
    return (
        np.array(offsets, dtype=np.int64),
        np.array(types, dtype=np.uint16),
        np.array(sizes, dtype=np.uint32),
        pos,
    )


def _chunk_arrays(chunks: Iterable[Buffer]) -> list[npt.NDArray[np.uint8]]:
    seq = chunks if isinstance(chunks, (list, tuple)) else list(chunks)
    return [np.frombuffer(_flat(chunk), dtype=np.uint8) for chunk in seq]


def packed_size(chunks: Iterable[Buffer]) -> int:
    arrays = _chunk_arrays(chunks)
    return layout.data_start(len(arrays)) + sum(a.size for a in arrays)


def pack_chunks(chunks: Iterable[Buffer], out: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.uint8]:
    arrays = _chunk_arrays(chunks)
    count = len(arrays)
    start = layout.data_start(count)
    payload = sum(a.size for a in arrays)
    total = start + payload
    result = layout.output_buffer(out, total)
    lo = result.__array_interface__["data"][0]
    hi = lo + total
    for k, a in enumerate(arrays):
        c_lo = a.__array_interface__["data"][0]
        if a.size and c_lo < hi and lo < c_lo + a.size:
            raise CodecError(f"chunk {k} overlaps the output buffer")
    result[:start] = np.frombuffer(layout.container_index([a.size for a in arrays]), dtype=np.uint8)
    pos = start
    for a in arrays:
        result[pos : pos + a.size] = a
        pos += a.size
    return result[:total]


def unpack_chunks(buf: Buffer) -> list[memoryview]:
    flat = layout.byte_view(buf)
    length = len(flat)
    if length < layout.CHUNK_HEADER_SIZE:
        raise CodecError(
            f"chunk container truncated: {length} bytes, the header alone needs {layout.CHUNK_HEADER_SIZE}"
        )
    magic, version, header_size, count, flags, total, payload = layout.CHUNK_HEADER.unpack_from(flat, 0)
    if magic != layout.CHUNK_MAGIC:
        raise CodecError(f"bad chunk container magic 0x{magic:08x}")
    if version != layout.CHUNK_VERSION:
        raise CodecError(f"unsupported chunk container version {version}")
    if header_size != layout.CHUNK_HEADER_SIZE:
        raise CodecError(f"bad chunk container header size {header_size}")
    if flags != 0:
        raise CodecError(f"reserved chunk container flags set: 0x{flags:08x}")
    if count > (length - layout.CHUNK_HEADER_SIZE) // layout.CHUNK_INDEX_ENTRY_SIZE:
        raise CodecError(f"index of {count} chunks runs past the end of {length} bytes")
    if total > length:
        raise CodecError(f"container claims {total} bytes, the buffer holds {length}")
    prev_end = layout.data_start(count)
    seen = 0
    pieces = []
    for k in range(count):
        entry = layout.CHUNK_HEADER_SIZE + k * layout.CHUNK_INDEX_ENTRY_SIZE
        offset, size = layout.CHUNK_ENTRY.unpack_from(flat, entry)
        if offset < prev_end:
            raise CodecError(f"chunk {k} at offset {offset} overlaps the index or the chunk before it")
        if offset > total or size > total - offset:
            raise CodecError(f"chunk {k} (offset {offset}, length {size}) runs past the end ({total})")
        pieces.append(flat[offset : offset + size])
        prev_end = offset + size
        seen += size
    if seen != payload:
        raise CodecError(f"chunk lengths add up to {seen}, the header says {payload}")
    return pieces


def _check_frame(name: str, frame: object) -> npt.NDArray[np.uint8]:
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 4:
        raise ValueError(f"{name} must be a (height, width, 4) uint8 array, got {frame.dtype} {frame.shape}")
    if not frame.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return frame


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    a_lo = a.__array_interface__["data"][0]
    b_lo = b.__array_interface__["data"][0]
    return bool(a.nbytes and b.nbytes and a_lo < b_lo + b.nbytes and b_lo < a_lo + a.nbytes)


def damage_tiles(
    current: npt.NDArray[np.uint8],
    shadow: npt.NDArray[np.uint8],
    tile: int,
    dirty: npt.NDArray[np.uint8],
    copy: bool = True,
) -> int:
    tile = _ssize(tile)
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    current = _check_frame("current", current)
    shadow = _check_frame("shadow", shadow)
    if shadow.shape != current.shape:
        raise ValueError(f"shadow has shape {shadow.shape}, current {current.shape}")
    height, width = current.shape[0], current.shape[1]
    expected = (height // tile + (height % tile != 0), width // tile + (width % tile != 0))
    if not isinstance(dirty, np.ndarray):
        raise ValueError(f"dirty must be a numpy array, got {type(dirty).__name__}")
    if dirty.dtype != np.uint8 or dirty.shape != expected:
        raise ValueError(
            f"dirty must be a {expected} uint8 array for tiles of {tile}, got {dirty.dtype} {dirty.shape}"
        )
    if not dirty.flags.c_contiguous:
        raise ValueError("dirty must be C-contiguous")
    if not dirty.flags.writeable:
        raise ValueError("dirty is read-only")
    if copy and not shadow.flags.writeable:
        raise ValueError("shadow is read-only, and copy needs to write it")
    if _overlap(current, shadow) or _overlap(dirty, current) or _overlap(dirty, shadow):
        raise ValueError("current, shadow and dirty must not share memory")
    if not dirty.size:
        return 0
    # One 32-bit comparison per pixel instead of four byte ones and a reduction.
    differs = current.view(np.uint32)[:, :, 0] != shadow.view(np.uint32)[:, :, 0]
    # A tile differs when any of its pixels does: OR over each band of rows, then each band of columns.
    bands = np.logical_or.reduceat(differs, np.arange(0, height, tile), axis=0)
    tiles = np.logical_or.reduceat(bands, np.arange(0, width, tile), axis=1)
    dirty[...] = tiles
    if copy:
        for ty, tx in np.argwhere(tiles):
            rows = slice(ty * tile, (ty + 1) * tile)
            cols = slice(tx * tile, (tx + 1) * tile)
            shadow[rows, cols] = current[rows, cols]
    return int(np.count_nonzero(tiles))


def fault_in(buf: Buffer, step: int = layout.FAULT_STEP, advise: bool = True) -> None:
    step = _ssize(step)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    view = _flat(buf)
    if view.readonly:
        raise BufferError("Object is not writable.")
    if not view.nbytes:
        return
    # The first byte, then the first byte of every later page, written back in place: a write
    # fault each, the contents unchanged. numpy lets go of the GIL for the strided copies. Here
    # ``step`` and ``advise`` change nothing: they only choose how the compiled one faults.
    array = np.frombuffer(view, dtype=np.uint8)
    array[:1] = array[:1].copy()
    pages = array[-array.ctypes.data % mmap.PAGESIZE :: mmap.PAGESIZE]
    pages[...] = pages.copy()
