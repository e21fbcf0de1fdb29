"""Pure-Python twin of the compiled codec: same results, same errors, no compiler needed.

It is the reference the property tests hold the extension to, and the fallback where the extension
cannot be built. Keep every check in the same order as _codec.pyx so both raise the same error.
"""

from __future__ import annotations

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
_CHUNK_HEADER = struct.Struct("<IHHIIQQ")
_CHUNK_ENTRY = struct.Struct("<QQ")


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
    index = bytearray(start)
    _CHUNK_HEADER.pack_into(
        index, 0, layout.CHUNK_MAGIC, layout.CHUNK_VERSION, layout.CHUNK_HEADER_SIZE, count, 0, total, payload
    )
    pos = start
    for k, a in enumerate(arrays):
        _CHUNK_ENTRY.pack_into(index, layout.CHUNK_HEADER_SIZE + k * layout.CHUNK_INDEX_ENTRY_SIZE, pos, a.size)
        pos += a.size
    result[:start] = np.frombuffer(index, dtype=np.uint8)
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
    magic, version, header_size, count, flags, total, payload = _CHUNK_HEADER.unpack_from(flat, 0)
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
        offset, size = _CHUNK_ENTRY.unpack_from(flat, layout.CHUNK_HEADER_SIZE + k * layout.CHUNK_INDEX_ENTRY_SIZE)
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
