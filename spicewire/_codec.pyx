# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, binding=False
"""Compiled codec. The contract and the pure-Python twin that must agree with it: codec.py, _codec_py.py.

Bounds and wraparound checks are off, so every read and write below is preceded by an explicit
length check; the fuzz tests put inputs against a guard page to prove it.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from cpython.sequence cimport PySequence_GetSlice
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcmp, memcpy, memset

import numpy as np

from spicewire import _codec_layout as layout
from spicewire.errors import CodecError, MessageTooLarge

cdef extern from "_fastmem.h" nogil:
    uint16_t sw_load_u16le(const unsigned char *p)
    uint32_t sw_load_u32le(const unsigned char *p)
    uint64_t sw_load_u64le(const unsigned char *p)
    void sw_store_u16le(unsigned char *p, uint16_t v)
    void sw_store_u32le(unsigned char *p, uint32_t v)
    void sw_store_u64le(unsigned char *p, uint64_t v)
    void sw_copy_stream(unsigned char *dst, const unsigned char *src, size_t n)
    void sw_stream_i64(int64_t *dst, int64_t v)
    void sw_stream_u32(uint32_t *dst, uint32_t v)
    void sw_stream_fence()
    void sw_prefetch(const unsigned char *p)
    void sw_fault_in(unsigned char *p, size_t n, size_t step, size_t page, int advise)

cdef extern from "unistd.h" nogil:
    long sysconf(int name)
    enum: _SC_PAGESIZE

cdef Py_ssize_t MINI = layout.MINI_HEADER_SIZE
cdef Py_ssize_t FULL = layout.FULL_HEADER_SIZE
cdef uint32_t CHUNK_MAGIC = layout.CHUNK_MAGIC
cdef uint16_t CHUNK_VERSION = layout.CHUNK_VERSION
cdef Py_ssize_t CHUNK_HEADER = layout.CHUNK_HEADER_SIZE
cdef Py_ssize_t CHUNK_ENTRY = layout.CHUNK_INDEX_ENTRY_SIZE
cdef Py_ssize_t CHUNK_ALIGN = layout.CHUNK_DATA_ALIGN
DEFAULT_MAX_SIZE = layout.DEFAULT_MAX_SIZE

cdef int _get_buffer(object obj, Py_buffer *view, int flags) except -1:
    """PyObject_GetBuffer, with numpy's ValueError for a strided array reported as the BufferError
    every other exporter raises, so both backends fail the same way."""
    try:
        PyObject_GetBuffer(obj, view, flags)
    except ValueError as err:
        raise BufferError(str(err)) from None
    return 0


cdef size_t STREAM_THRESHOLD = layout.STREAM_THRESHOLD


# Mini headers repeat: a stream is mostly a few message kinds at a few sizes (PINGs, ACKs, full-size
# DATA). Like CPython's small-int cache, hand out one immutable tuple per recent (type, size) pair
# instead of building a new one per call; a direct-mapped table keeps the memory bounded.
DEF HEADER_CACHE_BITS = 12
cdef uint64_t _header_cache_keys[1 << HEADER_CACHE_BITS]
cdef PyObject *_header_cache[1 << HEADER_CACHE_BITS]


cdef inline object _mini_header_tuple(uint16_t msg_type, uint32_t size):
    cdef uint64_t key = (<uint64_t>size << 16) | msg_type
    cdef size_t slot = <size_t>((key * 0x9E3779B97F4A7C15ULL) >> (64 - HEADER_CACHE_BITS))
    cdef PyObject *cached = _header_cache[slot]
    if cached != NULL and _header_cache_keys[slot] == key:
        return <object>cached
    result = (msg_type, size)
    Py_INCREF(result)
    Py_XDECREF(cached)
    _header_cache[slot] = <PyObject *>result
    _header_cache_keys[slot] = key
    return result


cdef inline object _header_at(const unsigned char *p, Py_ssize_t n, Py_ssize_t offset, bint mini):
    if offset < 0:
        raise CodecError(f"negative offset {offset}")
    if mini:
        if offset > n - MINI:
            return None
        p += offset
        return _mini_header_tuple(sw_load_u16le(p), sw_load_u32le(p + 2))
    if offset > n - FULL:
        return None
    p += offset
    return (sw_load_u64le(p), sw_load_u16le(p + 8), sw_load_u32le(p + 10), sw_load_u32le(p + 14))


def parse_header(object buf, Py_ssize_t offset=0, bint mini=True):
    cdef Py_buffer view
    if PyBytes_CheckExact(buf):  # the common case skips the buffer protocol entirely
        return _header_at(<const unsigned char *>PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf), offset, mini)
    _get_buffer(buf, &view, PyBUF_SIMPLE)
    try:
        return _header_at(<const unsigned char *>view.buf, view.len, offset, mini)
    finally:
        PyBuffer_Release(&view)


cdef Py_ssize_t SCAN_PREFETCH = layout.SCAN_PREFETCH  # about 27 of the bench's mini messages


cdef inline Py_ssize_t _scan_loop(
    const unsigned char *p, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t hdr, Py_ssize_t type_at,
    Py_ssize_t size_at, uint64_t max_size, int64_t *offsets, uint16_t *types, uint32_t *sizes,
    Py_ssize_t room, bint stream, Py_ssize_t *consumed, uint32_t *too_large,
) noexcept nogil:
    """Walk headers from ``pos`` until the data, or the ``room`` output slots, run out."""
    # Each header's address depends on the size read from the one before, so the walk is a chain of
    # loads, and its speed is how short each link is. The next size is read at q + size + a
    # constant, an address the load unit adds up itself, while q moves on beside it: one load per
    # link, where loading from the advanced q put two additions in it too (1.25x slower, in
    # cache). And the chain cannot wait for memory: the next lines are asked for ahead
    # (SCAN_PREFETCH), which took 1M mini headers from 2.9 ms to 2.0 on an AVX-512 Xeon, whose own
    # prefetcher fell behind.
    cdef const unsigned char *q = p + pos
    cdef const unsigned char *end = p + n
    cdef Py_ssize_t count = 0, body_room
    # A local: the module's value would be read again at every header, as the stores through the
    # output pointers may change it as far as the compiler knows.
    cdef Py_ssize_t ahead = SCAN_PREFETCH
    cdef uint32_t size, next_size
    if room > 0 and end - q >= hdr:
        size = sw_load_u32le(q + size_at)
        while True:
            body_room = end - q - hdr
            if size > max_size:
                too_large[0] = size
                break
            if size > body_room:
                break
            if stream:
                sw_stream_i64(&offsets[count], q - p + hdr)
                sw_stream_u32(&sizes[count], size)
            else:
                offsets[count] = q - p + hdr
                sizes[count] = size
            types[count] = sw_load_u16le(q + type_at)
            count += 1
            if count == room or body_room - size < hdr:  # no room, or no whole header next
                q += hdr + size
                break
            if end - q > ahead:
                sw_prefetch(q + ahead)
            next_size = sw_load_u32le(q + size + (hdr + size_at))  # inside: a whole header is there
            q += hdr + size
            size = next_size
    if stream:
        sw_stream_fence()
    consumed[0] = q - p
    return count


# First guess at the message count: bodies of ~26 bytes on average. Guessing from the worst case
# (empty bodies) would allocate several times what is used; output arrays sized close to their use
# are also recycled by malloc instead of being mapped, faulted and zeroed afresh on every call.
cdef Py_ssize_t SCAN_GUESS_BYTES_PER_MESSAGE = 32


def scan(object buf, bint mini=True, Py_ssize_t max_size=DEFAULT_MAX_SIZE):
    cdef Py_buffer view
    cdef Py_ssize_t hdr = MINI if mini else FULL
    cdef Py_ssize_t type_at = 0 if mini else 8
    cdef Py_ssize_t count = 0, consumed = 0, capacity, most, added
    cdef uint32_t too_large = 0
    cdef bint stream
    cdef int64_t[::1] offsets_mv
    cdef uint16_t[::1] types_mv
    cdef uint32_t[::1] sizes_mv
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0, got {max_size}")
    _get_buffer(buf, &view, PyBUF_SIMPLE)
    try:
        most = view.len // hdr  # every message takes at least a header
        capacity = min(most, view.len // SCAN_GUESS_BYTES_PER_MESSAGE + 16)
        # Streaming stores skip reading each output line in before overwriting it: a third of the
        # walk's time over a large input.
        stream = <size_t>view.len >= STREAM_THRESHOLD
        offsets = np.empty(capacity, dtype=np.int64)
        types = np.empty(capacity, dtype=np.uint16)
        sizes = np.empty(capacity, dtype=np.uint32)
        while capacity:
            offsets_mv = offsets
            types_mv = types
            sizes_mv = sizes
            with nogil:
                added = _scan_loop(<const unsigned char *>view.buf, view.len, consumed, hdr, type_at,
                                   type_at + 2, max_size, &offsets_mv[count], &types_mv[count],
                                   &sizes_mv[count], capacity - count, stream, &consumed, &too_large)
            count += added
            if count < capacity or too_large or capacity == most:
                break
            capacity = min(most, capacity * 2)
            offsets = np.concatenate((offsets, np.empty(capacity - count, dtype=np.int64)))
            types = np.concatenate((types, np.empty(capacity - count, dtype=np.uint16)))
            sizes = np.concatenate((sizes, np.empty(capacity - count, dtype=np.uint32)))
    finally:
        PyBuffer_Release(&view)
    if too_large:
        raise MessageTooLarge(too_large, max_size, consumed)
    return offsets[:count], types[:count], sizes[:count], consumed


def packed_size(chunks):
    """Bytes pack_chunks(chunks) will produce, to size a reusable output buffer."""
    cdef Py_buffer view
    cdef Py_ssize_t payload = 0
    seq = chunks if isinstance(chunks, (list, tuple)) else list(chunks)
    for chunk in seq:
        _get_buffer(chunk, &view, PyBUF_SIMPLE)
        payload += view.len
        PyBuffer_Release(&view)
    return layout.data_start(len(seq)) + payload


def pack_chunks(chunks, out=None):
    cdef Py_ssize_t count, acquired = 0, k
    cdef Py_buffer *views = NULL
    cdef Py_buffer out_view
    cdef bint have_out = False
    cdef Py_ssize_t start, payload = 0, total, pos
    cdef unsigned char *dst
    cdef uintptr_t lo, hi, c_lo
    cdef bint stream
    seq = chunks if isinstance(chunks, (list, tuple)) else list(chunks)
    count = len(seq)
    views = <Py_buffer *>PyMem_Malloc((count if count else 1) * sizeof(Py_buffer))
    if views == NULL:
        raise MemoryError()
    try:
        for k in range(count):
            _get_buffer(seq[k], &views[k], PyBUF_SIMPLE)
            acquired += 1
            payload += views[k].len
        start = layout.data_start(count)
        total = start + payload
        result = layout.output_buffer(out, total)
        _get_buffer(result, &out_view, PyBUF_WRITABLE)
        have_out = True
        dst = <unsigned char *>out_view.buf
        lo = <uintptr_t>dst
        hi = lo + <uintptr_t>total
        for k in range(count):
            c_lo = <uintptr_t>views[k].buf
            if views[k].len and c_lo < hi and lo < c_lo + <uintptr_t>views[k].len:
                raise CodecError(f"chunk {k} overlaps the output buffer")

        sw_store_u32le(dst, CHUNK_MAGIC)
        sw_store_u16le(dst + 4, CHUNK_VERSION)
        sw_store_u16le(dst + 6, <uint16_t>CHUNK_HEADER)
        sw_store_u32le(dst + 8, <uint32_t>count)
        sw_store_u32le(dst + 12, 0)
        sw_store_u64le(dst + 16, <uint64_t>total)
        sw_store_u64le(dst + 24, <uint64_t>payload)
        pos = start
        for k in range(count):
            sw_store_u64le(dst + CHUNK_HEADER + k * CHUNK_ENTRY, <uint64_t>pos)
            sw_store_u64le(dst + CHUNK_HEADER + k * CHUNK_ENTRY + 8, <uint64_t>views[k].len)
            pos += views[k].len
        memset(dst + CHUNK_HEADER + count * CHUNK_ENTRY, 0, start - CHUNK_HEADER - count * CHUNK_ENTRY)

        stream = <size_t>payload >= STREAM_THRESHOLD
        with nogil:
            pos = start
            for k in range(count):
                if stream:
                    sw_copy_stream(dst + pos, <const unsigned char *>views[k].buf, views[k].len)
                else:
                    memcpy(dst + pos, views[k].buf, views[k].len)
                pos += views[k].len
            if stream:
                sw_stream_fence()
    finally:
        if have_out:
            PyBuffer_Release(&out_view)
        for k in range(acquired):
            PyBuffer_Release(&views[k])
        PyMem_Free(views)
    return result[:total]


def unpack_chunks(object buf):
    cdef Py_buffer view
    cdef const unsigned char *p
    cdef uint64_t length, count, total, payload, offset, size, start, prev_end, seen = 0
    cdef Py_ssize_t k
    flat = layout.byte_view(buf)
    _get_buffer(flat, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char *>view.buf
        length = <uint64_t>view.len
        if length < <uint64_t>CHUNK_HEADER:
            raise CodecError(f"chunk container truncated: {length} bytes, the header alone needs {CHUNK_HEADER}")
        if sw_load_u32le(p) != CHUNK_MAGIC:
            raise CodecError(f"bad chunk container magic 0x{sw_load_u32le(p):08x}")
        if sw_load_u16le(p + 4) != CHUNK_VERSION:
            raise CodecError(f"unsupported chunk container version {sw_load_u16le(p + 4)}")
        if sw_load_u16le(p + 6) != CHUNK_HEADER:
            raise CodecError(f"bad chunk container header size {sw_load_u16le(p + 6)}")
        if sw_load_u32le(p + 12) != 0:
            raise CodecError(f"reserved chunk container flags set: 0x{sw_load_u32le(p + 12):08x}")
        count = sw_load_u32le(p + 8)
        total = sw_load_u64le(p + 16)
        payload = sw_load_u64le(p + 24)
        if count > (length - CHUNK_HEADER) // CHUNK_ENTRY:
            raise CodecError(f"index of {count} chunks runs past the end of {length} bytes")
        if total > length:
            raise CodecError(f"container claims {total} bytes, the buffer holds {length}")
        start = layout.data_start(count)
        prev_end = start
        result = PyList_New(<Py_ssize_t>count)
        for k in range(<Py_ssize_t>count):
            offset = sw_load_u64le(p + CHUNK_HEADER + k * CHUNK_ENTRY)
            size = sw_load_u64le(p + CHUNK_HEADER + k * CHUNK_ENTRY + 8)
            if offset < prev_end:
                raise CodecError(f"chunk {k} at offset {offset} overlaps the index or the chunk before it")
            if offset > total or size > total - offset:
                raise CodecError(f"chunk {k} (offset {offset}, length {size}) runs past the end ({total})")
            piece = PySequence_GetSlice(flat, <Py_ssize_t>offset, <Py_ssize_t>(offset + size))
            Py_INCREF(piece)  # PyList_SET_ITEM steals a reference
            PyList_SET_ITEM(result, k, piece)
            prev_end = offset + size
            seen += size
        if seen != payload:
            raise CodecError(f"chunk lengths add up to {seen}, the header says {payload}")
    finally:
        PyBuffer_Release(&view)
    return result


cdef int _check_frame(str name, object frame) except -1:
    """A framebuffer as damage_tiles needs it, or ValueError; the pure twin checks the same way."""
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 4:
        raise ValueError(f"{name} must be a (height, width, 4) uint8 array, got {frame.dtype} {frame.shape}")
    if not frame.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return 0


cdef inline bint _overlap(object a, object b):
    cdef uintptr_t a_lo = a.__array_interface__["data"][0]
    cdef uintptr_t b_lo = b.__array_interface__["data"][0]
    cdef uintptr_t a_n = a.nbytes, b_n = b.nbytes
    return a_n != 0 and b_n != 0 and a_lo < b_lo + b_n and b_lo < a_lo + a_n


cdef Py_ssize_t _damage_loop(
    const unsigned char *cur, unsigned char *shadow, unsigned char *dirty, Py_ssize_t height,
    Py_ssize_t width, Py_ssize_t tile, bint copy,
) noexcept nogil:
    """Row by row through each band of tiles, so both frames are read in address order. A whole row
    is compared first: where it matches, no tile of it needs looking at. A tile found dirty has its
    remaining rows copied at once, which keeps the whole-row comparison valid for the rows below."""
    cdef Py_ssize_t stride = width * 4, tiles_x = width // tile + (width % tile != 0)
    cdef Py_ssize_t count = 0, y0, y1, y, r, tx, x0, nbytes, off
    cdef unsigned char *marks
    y0 = 0
    while y0 < height:
        y1 = y0 + tile if height - y0 > tile else height
        marks = dirty + (y0 // tile) * tiles_x
        memset(marks, 0, tiles_x)
        for y in range(y0, y1):
            if memcmp(cur + y * stride, shadow + y * stride, stride) == 0:
                continue
            for tx in range(tiles_x):
                if marks[tx]:
                    continue
                x0 = tx * tile
                nbytes = (tile if width - x0 > tile else width - x0) * 4
                off = y * stride + x0 * 4
                if memcmp(cur + off, shadow + off, nbytes) == 0:
                    continue
                marks[tx] = 1
                count += 1
                if copy:
                    for r in range(y, y1):
                        memcpy(shadow + r * stride + x0 * 4, cur + r * stride + x0 * 4, nbytes)
        y0 = y1
    return count


def damage_tiles(object current, object shadow, Py_ssize_t tile, object dirty, bint copy=True):
    cdef Py_buffer cur_view, shadow_view, dirty_view
    cdef Py_ssize_t height, width, count
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    _check_frame("current", current)
    _check_frame("shadow", shadow)
    if shadow.shape != current.shape:
        raise ValueError(f"shadow has shape {shadow.shape}, current {current.shape}")
    height, width = current.shape[0], current.shape[1]
    expected = (height // tile + (height % tile != 0), width // tile + (width % tile != 0))
    if not isinstance(dirty, np.ndarray):
        raise ValueError(f"dirty must be a numpy array, got {type(dirty).__name__}")
    if dirty.dtype != np.uint8 or dirty.shape != expected:
        raise ValueError(f"dirty must be a {expected} uint8 array for tiles of {tile}, "
                         f"got {dirty.dtype} {dirty.shape}")
    if not dirty.flags.c_contiguous:
        raise ValueError("dirty must be C-contiguous")
    if not dirty.flags.writeable:
        raise ValueError("dirty is read-only")
    if copy and not shadow.flags.writeable:
        raise ValueError("shadow is read-only, and copy needs to write it")
    if _overlap(current, shadow) or _overlap(dirty, current) or _overlap(dirty, shadow):
        raise ValueError("current, shadow and dirty must not share memory")
    _get_buffer(current, &cur_view, PyBUF_SIMPLE)
    try:
        _get_buffer(shadow, &shadow_view, PyBUF_WRITABLE if copy else PyBUF_SIMPLE)
        try:
            _get_buffer(dirty, &dirty_view, PyBUF_WRITABLE)
            try:
                with nogil:
                    count = _damage_loop(<const unsigned char *>cur_view.buf, <unsigned char *>shadow_view.buf,
                                         <unsigned char *>dirty_view.buf, height, width, tile, copy)
            finally:
                PyBuffer_Release(&dirty_view)
        finally:
            PyBuffer_Release(&shadow_view)
    finally:
        PyBuffer_Release(&cur_view)
    return count


def fault_in(object buf, Py_ssize_t step=layout.FAULT_STEP, bint advise=True):
    """Fault in every page of the writable buffer ``buf`` (memory nobody else uses yet), without
    the GIL, ``step`` bytes per system call; ``advise=False`` writes each page in place instead,
    as where the kernel refuses MADV_POPULATE_WRITE (see sw_fault_in)."""
    cdef Py_buffer view
    cdef size_t page = <size_t>sysconf(_SC_PAGESIZE)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    _get_buffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        with nogil:
            # A step of whole pages: each call after the first starts page-aligned, as madvise asks.
            sw_fault_in(<unsigned char *>view.buf, <size_t>view.len, (<size_t>step + page - 1) // page * page, page,
                        advise)
    finally:
        PyBuffer_Release(&view)
