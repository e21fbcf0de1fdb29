"""The pre-copy's fast path: s1 cuts a queue's chunks into socket batches without copying them;
s2 grows a region by SEGMENT."""

from __future__ import annotations

import io
import os

import pytest

from spicewire.server.migration import precopy
from spicewire.server.session import Limits

from .test_precopy import MIB, announced_echo, echo_entry, precopy_body

pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


def queue_chunks() -> list:
    """A queue as s1 holds it: mostly 64 KiB messages, a few odd ones, an empty one, and one
    chunk longer than PIECE (a restored region's view)."""
    sizes = [64 << 10] * 20 + [1, 7, 0, 100_003] + [precopy.PIECE + 5] + [64 << 10] * 3
    return [memoryview(os.urandom(size)) for size in sizes]


@pytest.mark.parametrize("length", [precopy.PIECE - 1, precopy.PIECE, precopy.PIECE + 1, 2 * precopy.PIECE,
                                    2 * precopy.PIECE + 1, None])
@pytest.mark.parametrize("start", [0, 1, 64 << 10, (64 << 10) + 3])
def test_batches_carry_the_bytes_asked_in_piece_sized_lists_of_the_chunks_themselves(start, length):
    """Around PIECE, from a chunk's first byte or inside one: the batches join to exactly the bytes
    asked, each PIECE bytes but the last (never more); a chunk wholly inside a batch is the queue's
    own object (no copy, no view)."""
    chunks = queue_chunks()
    data = b"".join(bytes(chunk) for chunk in chunks)
    length = len(data) - start if length is None else length
    batches = list(precopy._batches(chunks, start, length))
    assert b"".join(bytes(part) for batch in batches for part in batch) == data[start:start + length]
    sizes = [sum(len(part) for part in batch) for batch in batches]
    assert all(size == precopy.PIECE for size in sizes[:-1]) and 0 < sizes[-1] <= precopy.PIECE
    inner = [part for batch in batches for part in batch[1:-1]]
    assert inner and all(any(part is chunk for chunk in chunks) for part in inner)


def test_batches_of_nothing_are_none():
    assert list(precopy._batches(queue_chunks(), 5, 0)) == []


@pytest.mark.parametrize("size", [precopy.PIECE - 1, precopy.PIECE, precopy.PIECE + 1])
def test_hashed_batches_give_the_digest_of_the_bytes_sent(size):
    data = os.urandom(size + 3)
    chunks = [memoryview(data)[i:i + (64 << 10)] for i in range(0, len(data), 64 << 10)]
    digest = precopy.DIGESTS["xxh3-128"]()
    sent = b"".join(bytes(part) for batch in precopy._hashed(precopy._batches(chunks, 3, size), digest)
                    for part in batch)
    assert sent == data[3:]
    assert digest.digest() == precopy.DIGESTS["xxh3-128"](data[3:]).digest()


@pytest.mark.parametrize("first, segments", [(precopy.SEGMENT - 1, 1), (precopy.SEGMENT, 2), (precopy.SEGMENT + 1, 2)])
def test_a_region_grows_by_segment_once_its_memory_is_full(first, segments):
    """No announcement buffer: the first round gets at least SEGMENT bytes of memory; a second
    round of one byte fits it below SEGMENT and adds a segment at and above. The region's views
    are the two rounds' bytes, and its digest theirs."""
    in_flight = 3 * precopy.SEGMENT
    ann, manager = announced_echo(Limits(to_device=64 * MIB), in_flight)
    data = os.urandom(first + 1)
    capacity = 4 * precopy.SEGMENT
    for offset, piece in ((0, data[:first]), (first, data[first:])):
        body = precopy_body([echo_entry(len(piece), digest="xxh3-128", offset=offset, capacity=capacity)], piece)
        precopy.receive_port_precopy(manager, "m" * 16, io.BytesIO(body), len(body))
    held = ann.precopied[(0, "to_device")]
    assert len(held.segments) == segments
    assert len(held.segments[0]) == max(precopy.SEGMENT, first)
    assert b"".join(bytes(view) for view in held.views(0)) == data
    assert held.digest.digest() == precopy.DIGESTS["xxh3-128"](data).digest()
