"""scan() over inputs around the streaming-store threshold, where the compiled walk switches how it
writes its output, and around its prefetch distance, where it stops asking for lines ahead: it must
still agree with the pure twin on results and errors."""

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


P = layout.SCAN_PREFETCH


@pytest.mark.parametrize("length", [P - 1, P, P + 1, 2 * P + 1])
@pytest.mark.parametrize("tail", [b"", struct.pack("<HI", 3, 9) + b"abc", b"\x01\x00\x05"])
def test_scan_agrees_either_side_of_the_prefetch_distance(both_codecs, length, tail):
    """Whole streams and streams with a partial message (or a partial header) at the end, their
    last whole message ending a byte under, at and over the prefetch distance."""
    compiled, pure = both_codecs
    data = stream_of(length, tail)
    assert outcome(compiled.scan, data) == outcome(pure.scan, data)
    assert compiled.scan(data)[3] == length


@pytest.mark.parametrize("length", [P - 1, P, P + 1])
def test_scan_full_headers_either_side_of_the_prefetch_distance(both_codecs, length):
    compiled, pure = both_codecs
    body = length - 18
    data = struct.pack("<QHII", 1, 7, body, 0) + b"\x33" * body + struct.pack("<QHII", 2, 8, 0, 0)
    result = outcome(compiled.scan, data, mini=False)
    assert result == outcome(pure.scan, data, mini=False)
    assert compiled.scan(data, mini=False)[3] == len(data)
