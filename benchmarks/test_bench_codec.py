"""Codec speed, each fast path beside the obvious alternative and the physical limit, in one run.

`make bench` writes bench-report.json and benchmarks/report.py prints the ratios the issues ask for.
Only ratios are stable on a shared 2-core machine; absolute figures are for context.
"""

import struct

import numpy as np
import pytest

GIB = 1 << 30
CHUNK = 64 << 10
UNROLL = 500

MINI = struct.Struct("<HI")


def struct_walk(data):
    """The obvious Python alternative to scan(): a precompiled Struct walking the same stream into
    the same three arrays."""
    unpack_from = MINI.unpack_from
    offsets, types, sizes = [], [], []
    pos, n = 0, len(data)
    while n - pos >= 6:
        msg_type, size = unpack_from(data, pos)
        if size > n - pos - 6:
            break
        offsets.append(pos + 6)
        types.append(msg_type)
        sizes.append(size)
        pos += 6 + size
    return np.array(offsets, np.int64), np.array(types, np.uint16), np.array(sizes, np.uint32), pos


def unrolled(call_source: str):
    """A function making UNROLL back-to-back calls, so loop overhead does not blur a ~30 ns call."""
    namespace = {}
    exec("def run(f, b):\n" + f"    {call_source}\n" * UNROLL, namespace)
    return namespace["run"]


# --- scan: 1M headers -----------------------------------------------------------------------------


@pytest.mark.benchmark(group="scan 1M mini headers")
def test_scan_compiled(benchmark, compiled, mini_stream):
    data, count = mini_stream
    benchmark.extra_info.update(items=count, nbytes=len(data))
    result = benchmark.pedantic(compiled.scan, (data,), rounds=30, warmup_rounds=3)
    assert len(result[0]) == count and result[3] == len(data)


@pytest.mark.benchmark(group="scan 1M mini headers")
def test_scan_struct_loop(benchmark, mini_stream):
    data, count = mini_stream
    benchmark.extra_info.update(items=count, nbytes=len(data))
    result = benchmark.pedantic(struct_walk, (data,), rounds=3, warmup_rounds=0)
    assert len(result[0]) == count


@pytest.mark.benchmark(group="scan 1M mini headers")
def test_scan_pure_twin(benchmark, pure, mini_stream):
    data, count = mini_stream
    benchmark.extra_info.update(items=count, nbytes=len(data))
    result = benchmark.pedantic(pure.scan, (data,), rounds=3, warmup_rounds=0)
    assert len(result[0]) == count


@pytest.mark.benchmark(group="scan 1M mini headers")
def test_scan_memory_read_limit(benchmark, mini_stream):
    """Reading the same bytes once with numpy: about the most any walk over them can cost less than."""
    data, count = mini_stream
    words = np.frombuffer(data, dtype=np.uint8)[: len(data) // 8 * 8].view(np.uint64)
    benchmark.extra_info.update(items=count, nbytes=len(data))
    benchmark.pedantic(np.bitwise_xor.reduce, (words,), rounds=30, warmup_rounds=3)


# --- parse_header: one call -----------------------------------------------------------------------


HEADER = bytes.fromhex("65 00 28 00 00 00") + bytes(40)


@pytest.mark.benchmark(group="parse_header x500")
def test_parse_header_compiled(benchmark, compiled):
    benchmark.extra_info.update(items=UNROLL)
    benchmark(unrolled("f(b)"), compiled.parse_header, HEADER)


@pytest.mark.benchmark(group="parse_header x500")
def test_parse_header_struct_unpack_from(benchmark):
    benchmark.extra_info.update(items=UNROLL)
    benchmark(unrolled("f(b)"), MINI.unpack_from, HEADER)


@pytest.mark.benchmark(group="parse_header x500")
def test_parse_header_pure_twin(benchmark, pure):
    benchmark.extra_info.update(items=UNROLL)
    benchmark(unrolled("f(b)"), pure.parse_header, HEADER)


# --- pack_chunks: 1 GiB as 16,384 x 64 KiB --------------------------------------------------------


@pytest.fixture(scope="module")
def gib_chunks():
    source = np.random.default_rng(3).integers(0, 256, GIB, dtype=np.uint8)
    return source, [source[i : i + CHUNK] for i in range(0, GIB, CHUNK)]


@pytest.fixture(scope="module")
def gib_out(compiled, gib_chunks):
    out = np.empty(compiled.packed_size(gib_chunks[1]), dtype=np.uint8)
    out.fill(0)  # fault every page in before timing
    return out


@pytest.mark.benchmark(group="pack 1 GiB")
def test_pack_chunks_compiled(benchmark, compiled, gib_chunks, gib_out):
    benchmark.extra_info.update(nbytes=GIB)
    packed = benchmark.pedantic(compiled.pack_chunks, (gib_chunks[1], gib_out), rounds=8, warmup_rounds=1)
    assert np.shares_memory(packed, gib_out)
    assert np.array_equal(packed[-CHUNK:], gib_chunks[1][-1])


@pytest.mark.benchmark(group="pack 1 GiB")
def test_pack_single_numpy_copy_limit(benchmark, gib_chunks, gib_out):
    """One numpy copy of the same GiB into a preallocated buffer: the reference the issue names."""
    source = gib_chunks[0]
    dst = gib_out[: GIB]
    benchmark.extra_info.update(nbytes=GIB)
    benchmark.pedantic(np.copyto, (dst, source), rounds=8, warmup_rounds=1)


@pytest.mark.benchmark(group="pack 1 GiB")
def test_pack_numpy_copy_per_chunk(benchmark, gib_chunks, gib_out):
    """The obvious alternative: a numpy slice assignment (memcpy) per chunk."""

    def per_chunk(chunks, out):
        pos = 0
        for chunk in chunks:
            out[pos : pos + CHUNK] = chunk
            pos += CHUNK

    benchmark.extra_info.update(nbytes=GIB)
    benchmark.pedantic(per_chunk, (gib_chunks[1], gib_out), rounds=8, warmup_rounds=1)


@pytest.mark.benchmark(group="pack 1 GiB")
def test_pack_chunks_pure_twin(benchmark, pure, gib_chunks, gib_out):
    benchmark.extra_info.update(nbytes=GIB)
    benchmark.pedantic(pure.pack_chunks, (gib_chunks[1], gib_out), rounds=4, warmup_rounds=1)


@pytest.mark.benchmark(group="unpack 16,384 chunks")
def test_unpack_chunks_compiled(benchmark, compiled, gib_chunks, gib_out):
    packed = compiled.pack_chunks(gib_chunks[1], gib_out)
    benchmark.extra_info.update(items=len(gib_chunks[1]))
    views = benchmark(compiled.unpack_chunks, packed)
    assert len(views) == len(gib_chunks[1])


@pytest.mark.benchmark(group="unpack 16,384 chunks")
def test_unpack_chunks_pure_twin(benchmark, pure, gib_chunks, gib_out):
    packed = pure.pack_chunks(gib_chunks[1], gib_out)
    benchmark.extra_info.update(items=len(gib_chunks[1]))
    views = benchmark(pure.unpack_chunks, packed)
    assert len(views) == len(gib_chunks[1])
