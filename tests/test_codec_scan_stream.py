"""scan() over inputs around the streaming-store threshold: the compiled walk switches how it writes
its output there, and must still agree with the pure twin on results and errors."""

import struct

import numpy as np
import pytest

from spicewire import _codec_layout as layout
from tests.test_codec_agreement import outcome

T = layout.STREAM_THRESHOLD


def stream_of(length: int, tail: bytes = b"") -> bytes:
    """Complete mini-header messages of 0-64 byte bodies filling exactly ``length`` bytes, then ``tail``."""
    rng = np.random.default_rng(length)
    parts, used = [], 0
    while length - used > 6 + 64 + 6:
        body = int(rng.integers(0, 65))
        parts.append(struct.pack("<HI", int(rng.integers(0, 0x10000)), body) + bytes([used % 251]) * body)
        used += 6 + body
    last = length - used - 6  # one closing message lands the stream on the exact length
    parts.append(struct.pack("<HI", 7, last) + b"\x5a" * last)
    data = b"".join(parts)
    assert len(data) == length
    return data + tail


@pytest.mark.parametrize("length", [T - 1, T, T + 1])
def test_scan_agrees_either_side_of_the_streaming_threshold(both_codecs, length):
    compiled, pure = both_codecs
    data = stream_of(length)
    result = outcome(compiled.scan, data)
    assert result == outcome(pure.scan, data)
    offsets, _, sizes, consumed = compiled.scan(data)
    assert consumed == length and offsets[-1] + sizes[-1] == length


@pytest.mark.parametrize("length", [T - 7, T - 6, T - 5])
def test_scan_stops_the_same_at_a_partial_last_message(both_codecs, length):
    """The input crosses the threshold only with its incomplete tail (a header promising 9 bytes)."""
    compiled, pure = both_codecs
    data = stream_of(length, tail=struct.pack("<HI", 3, 9) + b"abc")
    assert outcome(compiled.scan, data) == outcome(pure.scan, data)
    assert compiled.scan(data)[3] == length


def test_scan_reports_an_oversized_header_the_same_past_the_threshold(both_codecs):
    compiled, pure = both_codecs
    data = stream_of(T + 1, tail=struct.pack("<HI", 3, 1 << 20))
    result = outcome(compiled.scan, data, max_size=1 << 16)
    assert result[0] == "error" and result == outcome(pure.scan, data, max_size=1 << 16)
