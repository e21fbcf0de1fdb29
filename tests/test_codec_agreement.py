"""Both backends, fed the same random and mutated input, give identical results or identical errors
(aiohttp 7165/9851 are what happens without this)."""

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spicewire import _codec_py
from spicewire._codec_layout import STREAM_THRESHOLD

QUICK = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def outcome(fn, *args, **kwargs):
    """A comparable summary of a call: its normalised result, or its error type and message."""
    try:
        result = fn(*args, **kwargs)
    except Exception as err:  # the comparison is the point: any difference is a failure
        return ("error", type(err), str(err))
    return ("ok", normalise(result))


def normalise(value):
    if isinstance(value, tuple):
        return tuple(normalise(v) for v in value)
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, np.ndarray):
        return (str(value.dtype), value.tolist())
    if isinstance(value, memoryview):
        return ("view", value.tobytes())
    return value


def messages(mini: bool):
    body = st.binary(max_size=40)
    if mini:
        return st.lists(st.tuples(st.integers(0, 0xFFFF), body), max_size=12).map(
            lambda ms: b"".join(struct.pack("<HI", t, len(b)) + b for t, b in ms)
        )
    return st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF), body), max_size=12).map(
        lambda ms: b"".join(struct.pack("<QHII", s, t, len(b), 0) + b for s, t, b in ms)
    )


@st.composite
def mutated(draw, base):
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        if data and draw(st.booleans()):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@QUICK
@given(data=st.one_of(st.binary(max_size=64), mutated(messages(True))), offset=st.integers(-2, 70))
def test_parse_header_mini_agrees(both_codecs, data, offset):
    fast, pure = both_codecs
    assert outcome(fast.parse_header, data, offset) == outcome(pure.parse_header, data, offset)


@QUICK
@given(data=st.one_of(st.binary(max_size=64), mutated(messages(False))), offset=st.integers(-2, 70))
def test_parse_header_full_agrees(both_codecs, data, offset):
    fast, pure = both_codecs
    assert outcome(fast.parse_header, data, offset, False) == outcome(pure.parse_header, data, offset, False)


@QUICK
@given(data=st.one_of(st.binary(max_size=200), mutated(messages(True))), max_size=st.integers(0, 64))
def test_scan_mini_agrees(both_codecs, data, max_size):
    fast, pure = both_codecs
    assert outcome(fast.scan, data, True, max_size) == outcome(pure.scan, data, True, max_size)


@QUICK
@given(data=st.one_of(st.binary(max_size=200), mutated(messages(False))), max_size=st.integers(0, 64))
def test_scan_full_agrees(both_codecs, data, max_size):
    fast, pure = both_codecs
    assert outcome(fast.scan, data, False, max_size) == outcome(pure.scan, data, False, max_size)


@QUICK
@given(chunks=st.lists(st.binary(max_size=300), max_size=20))
def test_pack_chunks_agrees_and_round_trips(both_codecs, chunks):
    fast, pure = both_codecs
    a, b = fast.pack_chunks(chunks), pure.pack_chunks(chunks)
    assert a.tobytes() == b.tobytes()
    assert [v.tobytes() for v in fast.unpack_chunks(a)] == chunks


def containers():
    return st.lists(st.binary(max_size=50), max_size=6).map(lambda cs: _codec_py.pack_chunks(cs).tobytes())


@QUICK
@given(data=st.one_of(st.binary(max_size=200), mutated(containers())))
def test_unpack_chunks_agrees(both_codecs, data):
    fast, pure = both_codecs
    assert outcome(fast.unpack_chunks, data) == outcome(pure.unpack_chunks, data)


# --- the streaming-store threshold (_codec_layout.STREAM_THRESHOLD) -------------------------------
# At and above it the compiled codec copies with non-temporal stores (its own head, 64-byte body and
# tail handling); below it, memcpy. Both sides, with chunks that leave the output unaligned and
# lengths that are not multiples of 64, must give the pure twin's bytes exactly.


def _threshold_chunks(payload: int) -> list[bytes]:
    rng = np.random.default_rng(payload)
    small = [rng.bytes(n) for n in (0, 1, 63, 255, 256, 257)]  # memcpy'd even when streaming (< 256)
    rest = payload - sum(map(len, small))
    return [*small, rng.bytes(rest // 3 + 5), rng.bytes(rest - rest // 3 - 5)]


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_pack_chunks_agrees_on_both_sides_of_the_streaming_threshold(both_codecs, delta):
    fast, pure = both_codecs
    chunks = _threshold_chunks(STREAM_THRESHOLD + delta)
    assert sum(map(len, chunks)) == STREAM_THRESHOLD + delta
    packed = fast.pack_chunks(chunks)
    assert packed.tobytes() == pure.pack_chunks(chunks).tobytes()
    assert [v.tobytes() for v in fast.unpack_chunks(packed)] == chunks


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_scan_agrees_on_both_sides_of_the_streaming_threshold(both_codecs, delta):
    fast, pure = both_codecs
    size = STREAM_THRESHOLD + delta
    one = struct.pack("<HI", 7, 10) + bytes(10)  # 16 bytes a message, then a partial one at the end
    data = one * (size // len(one)) + one[: size % len(one)]
    assert len(data) == size
    assert outcome(fast.scan, data, True) == outcome(pure.scan, data, True)
