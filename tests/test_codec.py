"""The codec contract (codec.py), checked on both backends through the codec_impl fixture."""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from spicewire import _codec_layout as layout
from spicewire.errors import CodecError, MessageTooLarge

MAIN_INIT_BODY = bytes.fromhex(
    "44 33 22 11 00 00 00 00 01 00 00 00 01 00 00 00 00 00 00 00 0a 00 00 00 00 10 00 00 00 00 00 00"
)
MINI_MAIN_INIT = bytes.fromhex("67 00 20 00 00 00") + MAIN_INIT_BODY
FULL_MAIN_INIT = bytes.fromhex("01 00 00 00 00 00 00 00 67 00 20 00 00 00 00 00 00 00") + MAIN_INIT_BODY


def mini(msg_type: int, body: bytes) -> bytes:
    return struct.pack("<HI", msg_type, len(body)) + body


def full(serial: int, msg_type: int, body: bytes, sub_list: int = 0) -> bytes:
    return struct.pack("<QHII", serial, msg_type, len(body), sub_list) + body


# --- parse_header ---------------------------------------------------------------------------------


def test_parse_header_reads_the_spec_mini_vector(codec_impl):
    assert codec_impl.parse_header(MINI_MAIN_INIT) == (103, 32)


def test_parse_header_reads_the_spec_full_vector(codec_impl):
    assert codec_impl.parse_header(FULL_MAIN_INIT, mini=False) == (1, 103, 32, 0)


def test_parse_header_reads_at_an_offset(codec_impl):
    data = b"\xff" * 5 + mini(0xBEEF, b"xyz")
    assert codec_impl.parse_header(data, 5) == (0xBEEF, 3)


def test_parse_header_reads_every_field_width(codec_impl):
    data = full(0x0102030405060708, 0xFFFE, b"", sub_list=0xA0B0C0D0)
    data = data[:10] + struct.pack("<I", 0xFFFFFFFF) + data[14:]
    assert codec_impl.parse_header(data, mini=False) == (0x0102030405060708, 0xFFFE, 0xFFFFFFFF, 0xA0B0C0D0)


@pytest.mark.parametrize("n", range(6))
def test_parse_header_signals_incomplete_mini_header_with_none(codec_impl, n):
    assert codec_impl.parse_header(MINI_MAIN_INIT[:n]) is None


@pytest.mark.parametrize("n", [0, 1, 17])
def test_parse_header_signals_incomplete_full_header_with_none(codec_impl, n):
    assert codec_impl.parse_header(FULL_MAIN_INIT[:n], mini=False) is None


def test_parse_header_offset_past_the_end_is_incomplete(codec_impl):
    assert codec_impl.parse_header(MINI_MAIN_INIT, len(MINI_MAIN_INIT) + 100) is None


def test_parse_header_does_not_need_the_body(codec_impl):
    assert codec_impl.parse_header(MINI_MAIN_INIT[:6]) == (103, 32)


def test_parse_header_rejects_a_negative_offset(codec_impl):
    with pytest.raises(CodecError):
        codec_impl.parse_header(MINI_MAIN_INIT, -1)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, dtype=np.uint8)])
def test_parse_header_accepts_every_byte_buffer(codec_impl, kind):
    assert codec_impl.parse_header(kind(MINI_MAIN_INIT)) == (103, 32)


def test_parse_header_rejects_a_non_buffer(codec_impl):
    with pytest.raises(TypeError):
        codec_impl.parse_header("not bytes")


# --- scan -----------------------------------------------------------------------------------------


def test_scan_finds_every_complete_message(codec_impl):
    stream = mini(101, b"a") + mini(102, b"") + mini(103, b"xyz")
    offsets, types, sizes, consumed = codec_impl.scan(stream)
    assert offsets.tolist() == [6, 13, 19]
    assert types.tolist() == [101, 102, 103]
    assert sizes.tolist() == [1, 0, 3]
    assert consumed == len(stream)


def test_scan_returns_the_documented_dtypes(codec_impl):
    offsets, types, sizes, _ = codec_impl.scan(mini(1, b"ab"))
    assert (offsets.dtype, types.dtype, sizes.dtype) == (np.int64, np.uint16, np.uint32)


def test_scan_offsets_point_at_bodies(codec_impl):
    stream = mini(1, b"first") + mini(2, b"second")
    offsets, _, sizes, _ = codec_impl.scan(stream)
    assert [stream[o : o + s] for o, s in zip(offsets, sizes, strict=True)] == [b"first", b"second"]


def test_scan_stops_at_an_incomplete_body(codec_impl):
    stream = mini(1, b"done") + mini(2, b"partial")[:-1]
    _, types, _, consumed = codec_impl.scan(stream)
    assert types.tolist() == [1]
    assert consumed == 10


def test_scan_stops_at_an_incomplete_header(codec_impl):
    stream = mini(1, b"") + b"\x02\x00\x01"
    _, types, _, consumed = codec_impl.scan(stream)
    assert types.tolist() == [1] and consumed == 6


def test_scan_of_nothing_is_empty(codec_impl):
    offsets, types, sizes, consumed = codec_impl.scan(b"")
    assert len(offsets) == len(types) == len(sizes) == consumed == 0


def test_scan_walks_full_headers(codec_impl):
    stream = full(1, 101, b"ab") + full(2, 102, b"c")
    offsets, types, sizes, consumed = codec_impl.scan(stream, mini=False)
    assert offsets.tolist() == [18, 38] and types.tolist() == [101, 102] and sizes.tolist() == [2, 1]
    assert consumed == len(stream)


def test_scan_rejects_a_size_above_the_maximum(codec_impl):
    stream = mini(1, b"ok") + mini(2, b"x" * 100)
    with pytest.raises(MessageTooLarge) as err:
        codec_impl.scan(stream, max_size=99)
    assert (err.value.size, err.value.limit, err.value.offset) == (100, 99, 8)


def test_scan_rejects_an_oversized_header_even_before_its_body_arrives(codec_impl):
    with pytest.raises(MessageTooLarge):
        codec_impl.scan(struct.pack("<HI", 1, 0xFFFFFFFF))


def test_scan_accepts_a_size_equal_to_the_maximum(codec_impl):
    _, _, sizes, _ = codec_impl.scan(mini(1, b"x" * 100), max_size=100)
    assert sizes.tolist() == [100]


def test_scan_default_maximum_is_documented(codec_impl):
    assert codec_impl.DEFAULT_MAX_SIZE == layout.DEFAULT_MAX_SIZE


def test_scan_rejects_a_negative_maximum(codec_impl):
    with pytest.raises(ValueError):
        codec_impl.scan(b"", max_size=-1)


def test_scan_rejects_a_non_contiguous_buffer(codec_impl):
    with pytest.raises(BufferError):
        codec_impl.scan(np.zeros(64, dtype=np.uint8)[::2])


# --- pack_chunks / unpack_chunks ------------------------------------------------------------------


def sample_chunks():
    return [b"abc", bytearray(b"de"), memoryview(b"fghi"), np.arange(7, dtype=np.uint8), b""]


def test_pack_chunks_round_trips_every_buffer_kind(codec_impl):
    packed = codec_impl.pack_chunks(sample_chunks())
    assert [bytes(v) for v in codec_impl.unpack_chunks(packed)] == [bytes(c) for c in sample_chunks()]


@pytest.mark.parametrize("batch", [1, 7, 64, 65, 1 << 20])
@pytest.mark.parametrize("chunks", [[], sample_chunks(), [bytes(130), np.arange(40, dtype=np.uint16)]],
                         ids=["none", "every-kind", "over-a-batch"])
def test_gathered_chunks_are_the_packed_container_as_views_in_batches(codec_impl, chunks, batch):
    """What a socket sends of gathered_chunks is pack_chunks' container byte for byte, on either
    backend; each batch holds at most ``batch`` bytes, or one piece (the index) alone."""
    from spicewire import codec

    batches, size = codec.gathered_chunks(chunks, batch)
    joined = b"".join(bytes(piece) for pieces in batches for piece in pieces)
    assert joined == codec_impl.pack_chunks(chunks).tobytes() and size == len(joined)
    assert all(sum(len(p) for p in pieces) <= batch or len(pieces) == 1 for pieces in batches)
    big = [p for pieces in batches[1:] for p in pieces]
    assert all(isinstance(p, memoryview) for p in big)  # the chunks' own memory, never copied
    with pytest.raises(ValueError):
        codec.gathered_chunks(chunks, 0)


def test_pack_chunks_writes_the_documented_header(codec_impl):
    packed = codec_impl.pack_chunks([b"abc", b"de"])
    _, version, header_size, count, flags, total, payload = struct.unpack_from("<IHHIIQQ", packed)
    assert bytes(packed[:4]) == b"SWCK"
    assert (version, header_size, count, flags, payload) == (1, 32, 2, 0, 5)
    assert total == len(packed) == 64 + 5
    assert struct.unpack_from("<QQQQ", packed, 32) == (64, 3, 67, 2)
    assert bytes(packed[64:]) == b"abcde"


def test_pack_chunks_pads_the_index_with_zeros(codec_impl):
    packed = codec_impl.pack_chunks([b"x"])
    assert bytes(packed[48:64]) == bytes(16)


def test_pack_chunks_returns_a_numpy_uint8_array(codec_impl):
    packed = codec_impl.pack_chunks([b"abc"])
    assert isinstance(packed, np.ndarray) and packed.dtype == np.uint8 and packed.ndim == 1


def test_pack_chunks_of_nothing_is_a_valid_empty_container(codec_impl):
    packed = codec_impl.pack_chunks([])
    assert len(packed) == 64 and codec_impl.unpack_chunks(packed) == []


def test_pack_chunks_reuses_an_output_buffer_large_enough(codec_impl):
    out = np.zeros(4096, dtype=np.uint8)
    packed = codec_impl.pack_chunks([b"abc"], out=out)
    assert np.shares_memory(packed, out) and len(packed) == codec_impl.packed_size([b"abc"])


def test_pack_chunks_allocates_when_the_output_buffer_is_too_small(codec_impl):
    out = np.zeros(8, dtype=np.uint8)
    packed = codec_impl.pack_chunks([b"abc"], out=out)
    assert not np.shares_memory(packed, out) and bytes(packed[-3:]) == b"abc"


@pytest.mark.parametrize(
    "out",
    [bytearray(4096), np.zeros(4096, dtype=np.uint16), np.zeros((64, 64), dtype=np.uint8)],
    ids=["bytearray", "uint16", "2-d"],
)
def test_pack_chunks_rejects_an_output_that_is_not_a_flat_uint8_array(codec_impl, out):
    with pytest.raises(TypeError):
        codec_impl.pack_chunks([b"abc"], out=out)


def test_pack_chunks_rejects_a_read_only_output(codec_impl):
    out = np.zeros(4096, dtype=np.uint8)
    out.flags.writeable = False
    with pytest.raises(TypeError):
        codec_impl.pack_chunks([b"abc"], out=out)


def test_pack_chunks_refuses_a_chunk_inside_its_own_output(codec_impl):
    out = np.zeros(4096, dtype=np.uint8)
    with pytest.raises(CodecError):
        codec_impl.pack_chunks([out[100:200]], out=out)


def test_pack_chunks_accepts_a_generator(codec_impl):
    packed = codec_impl.pack_chunks(bytes([i]) * i for i in range(4))
    assert [bytes(v) for v in codec_impl.unpack_chunks(packed)] == [bytes([i]) * i for i in range(4)]


def test_packed_size_matches_pack_chunks(codec_impl):
    chunks = sample_chunks()
    assert codec_impl.packed_size(chunks) == len(codec_impl.pack_chunks(chunks))


def test_pack_chunks_of_large_chunks_uses_the_streaming_path_correctly(codec_impl):
    rng = np.random.default_rng(7)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8) for n in (5 << 20, 1, 65537, 3 << 20)]
    views = codec_impl.unpack_chunks(codec_impl.pack_chunks(chunks))
    assert all(np.array_equal(np.frombuffer(v, np.uint8), c) for v, c in zip(views, chunks, strict=True))


def test_unpack_chunks_returns_zero_copy_views(codec_impl):
    packed = codec_impl.pack_chunks([b"abc", b"defg"])
    views = codec_impl.unpack_chunks(packed)
    packed[-1] = ord("Z")
    assert bytes(views[1]) == b"defZ"


def test_unpack_chunks_accepts_bytes(codec_impl):
    packed = bytes(codec_impl.pack_chunks([b"abc"]))
    assert [bytes(v) for v in codec_impl.unpack_chunks(packed)] == [b"abc"]


def test_unpack_chunks_ignores_bytes_after_the_container(codec_impl):
    packed = bytes(codec_impl.pack_chunks([b"abc"])) + b"trailing"
    assert [bytes(v) for v in codec_impl.unpack_chunks(packed)] == [b"abc"]


def corrupt(packed, offset: int, fmt: str, value) -> bytes:
    data = bytearray(packed)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


VALID = bytes(__import__("spicewire._codec_py", fromlist=["x"]).pack_chunks([b"abc", b"defg"]))


@pytest.mark.parametrize(
    "bad, message",
    [
        (VALID[:31], "truncated"),
        (corrupt(VALID, 0, "<I", 0x4B435758), "magic"),
        (corrupt(VALID, 4, "<H", 2), "version"),
        (corrupt(VALID, 6, "<H", 40), "header size"),
        (corrupt(VALID, 12, "<I", 1), "flags"),
        (corrupt(VALID, 8, "<I", 1000), "index"),
        (corrupt(VALID, 16, "<Q", len(VALID) + 1), "claims"),
        (corrupt(VALID, 32, "<Q", 8), "overlaps"),
        (corrupt(VALID, 48, "<Q", 65), "overlaps"),
        (corrupt(VALID, 48 + 8, "<Q", 5), "past the end"),
        (corrupt(VALID, 48, "<Q", 2**64 - 1), "past the end"),
        (corrupt(VALID, 48 + 8, "<Q", 2**64 - 1), "past the end"),
        (corrupt(VALID, 24, "<Q", 6), "add up"),
        (VALID[:-1], "claims"),
    ],
    ids=[
        "short-header", "magic", "version", "header-size", "flags", "count", "total", "first-offset",
        "second-overlaps", "length", "offset-huge", "length-huge", "payload-size", "truncated-data",
    ],
)
def test_unpack_chunks_rejects_a_malformed_container(codec_impl, bad, message):
    with pytest.raises(CodecError, match=message):
        codec_impl.unpack_chunks(bad)


def test_codec_picks_the_compiled_backend_when_built():
    pytest.importorskip("spicewire._codec")
    out = subprocess.run(
        [sys.executable, "-c", "from spicewire import codec; print(codec.BACKEND)"],
        capture_output=True, text=True, check=True, env={**os.environ, "SPICEWIRE_PURE": ""},
    )
    assert out.stdout.strip() == "cython"


def test_spicewire_pure_forces_the_python_backend():
    out = subprocess.run(
        [sys.executable, "-c", "from spicewire import codec; print(codec.BACKEND)"],
        capture_output=True, text=True, check=True, env={**os.environ, "SPICEWIRE_PURE": "1"},
    )
    assert out.stdout.strip() == "python"


@pytest.mark.parametrize("body_size", [0, 1, 7, 100])
def test_scan_finds_every_message_whatever_their_density(codec_impl, body_size):
    """Dense streams of tiny messages outgrow the compiled scan's first capacity guess."""
    count = 20_000
    stream = b"".join(mini(i % 300, bytes([i % 256]) * body_size) for i in range(count))
    offsets, types, sizes, consumed = codec_impl.scan(stream + b"\x01")
    assert len(offsets) == count and consumed == len(stream)
    assert types.tolist() == [i % 300 for i in range(count)]
    assert offsets[-1] == len(stream) - body_size and set(sizes.tolist()) == {body_size}
