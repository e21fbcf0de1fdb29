"""Fuzzing the compiled codec against guard pages: an out-of-bounds read or write faults at once.

Each parser gets at least 20,000 random and mutated inputs, placed so that they end right at an
inaccessible page (and once so that they start right after one); the pure twin must agree on each.
"""

import random
import struct

import numpy as np
import pytest

from spicewire import _codec_py
from spicewire.errors import CodecError

from .guarded import GuardedArena

CASES = 20_000


def random_inputs(seed: int, valid):
    """Random bytes, truncations and bit flips of valid inputs, tiny and empty ones included."""
    rng = random.Random(seed)
    for i in range(CASES):
        kind = i % 4
        if kind == 0:
            yield rng.randbytes(rng.randrange(0, 80))
        else:
            data = bytearray(valid(rng))
            if kind >= 2:
                for _ in range(rng.randrange(1, 4)):
                    if data:
                        data[rng.randrange(len(data))] = rng.randrange(256)
            if kind == 3 and data:
                del data[rng.randrange(len(data)) :]
            yield bytes(data)


def valid_stream(mini: bool):
    def build(rng):
        out = b""
        for _ in range(rng.randrange(0, 6)):
            body = rng.randbytes(rng.randrange(0, 24))
            t = rng.randrange(0x10000)
            if mini:
                out += struct.pack("<HI", t, len(body))
            else:
                out += struct.pack("<QHII", rng.randrange(2**64), t, len(body), 0)
            out += body
        return out

    return build


def valid_container(rng):
    return _codec_py.pack_chunks([rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(0, 5))]).tobytes()


def same(fast_call, pure_call):
    try:
        expected = ("ok", pure_call())
    except CodecError as err:
        expected = ("error", type(err), str(err))
    try:
        got = ("ok", fast_call())
    except CodecError as err:
        got = ("error", type(err), str(err))
    return got, expected


@pytest.fixture(scope="module")
def arena():
    return GuardedArena(1 << 16)


@pytest.mark.parametrize("mini", [True, False], ids=["mini", "full"])
def test_parse_header_never_leaves_its_buffer(both_codecs, arena, mini):
    fast, _ = both_codecs
    for i, data in enumerate(random_inputs(1 + mini, valid_stream(mini))):
        placed = arena.at_end(data) if i % 2 else arena.at_start(data)
        for offset in (0, len(data) // 2, max(len(data) - 6, 0), len(data), len(data) + 3):
            assert fast.parse_header(placed, offset, mini) == _codec_py.parse_header(data, offset, mini)


@pytest.mark.parametrize("mini", [True, False], ids=["mini", "full"])
def test_scan_never_leaves_its_buffer(both_codecs, arena, mini):
    fast, _ = both_codecs
    for i, data in enumerate(random_inputs(3 + mini, valid_stream(mini))):
        placed = arena.at_end(data) if i % 2 else arena.at_start(data)
        got, want = same(
            lambda placed=placed: [a.tolist() if hasattr(a, "tolist") else a for a in fast.scan(placed, mini, 1 << 20)],
            lambda data=data: [a.tolist() if hasattr(a, "tolist") else a for a in _codec_py.scan(data, mini, 1 << 20)],
        )
        assert got == want


def test_unpack_chunks_never_leaves_its_buffer(both_codecs, arena):
    fast, _ = both_codecs
    for i, data in enumerate(random_inputs(5, valid_container)):
        placed = arena.at_end(data) if i % 2 else arena.at_start(data)
        got, want = same(
            lambda placed=placed: [v.tobytes() for v in fast.unpack_chunks(placed)],
            lambda data=data: [v.tobytes() for v in _codec_py.unpack_chunks(data)],
        )
        assert got == want


def test_pack_chunks_writes_exactly_its_packed_size(both_codecs, arena):
    fast, _ = both_codecs
    rng = random.Random(6)
    for _ in range(2_000):
        chunks = [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(0, 8))]
        out = arena.empty_at_end(fast.packed_size(chunks))
        packed = fast.pack_chunks(chunks, out=out)
        assert np.shares_memory(packed, out)
        assert packed.tobytes() == _codec_py.pack_chunks(chunks).tobytes()
