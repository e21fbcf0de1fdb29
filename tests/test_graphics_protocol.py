"""Display, inputs and cursor payloads (CHANNELS.md 1.1-1.4, spice-common spice.proto): the plain
messages, DRAW_COPY with raw and LZ4 images, SpiceCursor, and the display and inputs migrate data.
Expected bytes are written out field by field here, apart from the implementation."""

import contextlib
import struct

import lz4.block
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spicewire.errors import CodecError
from spicewire.protocol import enums
from spicewire.protocol import graphics as g
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType

S2C, C2S = m.Direction.SERVER_TO_CLIENT, m.Direction.CLIENT_TO_SERVER
HEAD = m.MonitorHead(monitor_id=0, surface_id=0, width=1024, height=768, x=0, y=0, flags=0)

# (message, its body as spice.proto lays it out)
VECTORS = [
    (m.MsgDisplayMark(), ""),
    (m.MsgDisplayReset(), ""),
    (m.MsgDisplayInvalAllPalettes(), ""),
    (m.MsgDisplaySurfaceCreate(0, 1024, 768, enums.SurfaceFormat.XRGB32, enums.SurfaceFlags.PRIMARY),
     "00000000 00040000 00030000 20000000 01000000"),
    (m.MsgDisplaySurfaceDestroy(3), "03000000"),
    (m.MsgDisplayMonitorsConfig(count=1, max_allowed=4, heads=(HEAD,)),
     "0100 0400 00000000 00000000 00040000 00030000 00000000 00000000 00000000"),
    (m.MsgDisplayMonitorsConfig(count=0, max_allowed=1, heads=()), "0000 0100"),
    (m.MsgDisplayDrawCopy(b"\x01\x02"), "0102"),
    (m.MsgcDisplayInit(1, 20 * 1024 * 1024, 1, -1), "01 0000400100000000 01 ffffffff"),
    (m.MsgcDisplayPreferredCompression(enums.ImageCompression.LZ4), "07"),
    (m.MsgcDisplayStreamReport(b"\x05"), "05"),
    (m.MsgcDisplayGlDrawDone(), ""),
    (m.MsgcDisplayPreferredVideoCodecType(b"\x01\x01"), "0101"),
    (m.MsgInputsInit(enums.KeyModifier.NUM_LOCK), "0200"),
    (m.MsgInputsKeyModifiers(enums.KeyModifier.CAPS_LOCK | enums.KeyModifier.SCROLL_LOCK), "0500"),
    (m.MsgInputsMouseMotionAck(), ""),
    (m.MsgcInputsKeyDown(0x1C), "1c000000"),
    (m.MsgcInputsKeyUp(0x9CE0), "e09c0000"),  # extended key 0x11c released: E0 9C
    (m.MsgcInputsKeyModifiers(enums.KeyModifier.CAPS_LOCK), "0400"),
    (m.MsgcInputsKeyScancode(b"\xe0\x1c"), "e01c"),
    (m.MsgcInputsMouseMotion(dx=-3, dy=2, buttons=enums.ButtonMask.LEFT), "fdffffff 02000000 0100"),
    (m.MsgcInputsMousePosition(x=640, y=480, buttons=enums.ButtonMask.RIGHT, display_id=0),
     "80020000 e0010000 0400 00"),
    (m.MsgcInputsMousePress(enums.MouseButton.MIDDLE, enums.ButtonMask.MIDDLE), "02 0200"),
    (m.MsgcInputsMouseRelease(enums.MouseButton.EXTRA, 0), "07 0000"),
    (m.MsgCursorInit(x=-1, y=5, trail_length=0, trail_frequency=0, visible=1, cursor=b"\x01\x00"),
     "ffff 0500 0000 0000 01 0100"),
    (m.MsgCursorSet(x=10, y=-20, visible=0, cursor=b"\x01\x00"), "0a00 ecff 00 0100"),
    (m.MsgCursorMove(x=-32768, y=32767), "0080 ff7f"),
    (m.MsgCursorHide(), ""),
    (m.MsgCursorReset(), ""),
    (m.MsgCursorTrail(length=4, frequency=2), "0400 0200"),
    (m.MsgCursorInvalOne(id=0x0102030405060708), "0807060504030201"),
    (m.MsgCursorInvalAll(), ""),
]

CHANNEL_OF = {m.Family.DISPLAY: ChannelType.DISPLAY, m.Family.INPUTS: ChannelType.INPUTS,
              m.Family.CURSOR: ChannelType.CURSOR}


@pytest.mark.parametrize(("msg", "body"), VECTORS, ids=lambda v: type(v).__name__ if isinstance(v, m.Message) else "")
def test_message_has_the_spice_proto_layout_and_round_trips(msg, body):
    wire = bytes.fromhex(body.replace(" ", ""))
    assert msg.encode() == wire
    assert m.decode(CHANNEL_OF[msg.FAMILY], msg.DIRECTION, msg.TYPE, wire) == msg


def test_every_new_class_is_in_a_vector():
    new = {cls for cls in m.REGISTRY.values() if cls.FAMILY in CHANNEL_OF}
    assert new == {type(msg) for msg, _ in VECTORS}


@pytest.mark.parametrize(("channel", "direction", "space"), [
    (ChannelType.INPUTS, C2S, enums.MsgcInputs),
    (ChannelType.INPUTS, S2C, enums.MsgInputs),
    (ChannelType.CURSOR, S2C, enums.MsgCursor),
    (ChannelType.DISPLAY, C2S, enums.MsgcDisplay),
])
def test_every_number_of_inputs_cursor_and_display_client_has_a_class(channel, direction, space):
    table = m.message_table(channel, direction)
    for number in space:
        assert table[number].TYPE is number
    assert table[enums.Msgc.ACK if direction is C2S else enums.Msg.SET_ACK] in (m.MsgcAck, m.MsgSetAck)


def test_message_tables_keep_the_channels_apart():
    assert m.lookup(ChannelType.DISPLAY, S2C, enums.MsgDisplay.DRAW_COPY) is m.MsgDisplayDrawCopy
    assert m.lookup(ChannelType.DISPLAY, S2C, enums.MsgDisplay.SURFACE_CREATE) is m.MsgDisplaySurfaceCreate
    assert m.lookup(ChannelType.DISPLAY, C2S, 101) is m.MsgcDisplayInit
    assert m.lookup(ChannelType.INPUTS, C2S, 101) is m.MsgcInputsKeyDown
    assert m.lookup(ChannelType.INPUTS, S2C, 101) is m.MsgInputsInit
    assert m.lookup(ChannelType.CURSOR, S2C, 101) is m.MsgCursorInit
    assert m.lookup(ChannelType.CURSOR, C2S, 101) is None
    assert m.lookup(ChannelType.MAIN, S2C, enums.MsgDisplay.DRAW_COPY) is None
    assert m.lookup(ChannelType.PORT, C2S, 111) is None


def test_monitors_config_count_must_match_its_heads():
    with pytest.raises(CodecError, match="count"):
        m.MsgDisplayMonitorsConfig(count=2, max_allowed=2, heads=(HEAD,)).encode()
    body = m.MsgDisplayMonitorsConfig(count=1, max_allowed=1, heads=(HEAD,)).encode()
    with pytest.raises(CodecError, match="MonitorHead"):
        m.MsgDisplayMonitorsConfig.decode(b"\x02\x00" + body[2:])  # announces a head it lacks


def test_signed_fields_refuse_what_they_cannot_hold():
    with pytest.raises(CodecError):
        m.MsgCursorMove(x=32768, y=0).encode()
    with pytest.raises(CodecError):
        m.MsgcInputsMouseMotion(dx=1 << 31, dy=0, buttons=0).encode()


def test_draw_copy_body_is_framed_without_a_copy():
    body = g.encode_draw_copy(0, g.Rect(0, 0, 1, 1), np.zeros((1, 1, 4), np.uint8))
    assert m.MsgDisplayDrawCopy(body).wire_body() is body


# --- DRAW_COPY -------------------------------------------------------------------------------------


def frame(height=48, width=64, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)


def test_raw_draw_copy_offsets_of_channels_md_1_2():
    fb = frame()
    box = g.Rect(top=5, left=7, bottom=8, right=9)  # 2 wide, 3 high
    pixels = fb[5:8, 7:9]
    body = bytes(g.encode_draw_copy(3, box, pixels))
    assert len(body) == g.draw_copy_size(2, 3) == 93 + 2 * 3 * 4
    # 0: DisplayBase: surface 3, box top/left/bottom/right, clip NONE
    assert body[0:21] == struct.pack("<I", 3) + struct.pack("<4i", 5, 7, 8, 9) + b"\x00"
    # 21: Copy: image at 57, src_area = the whole image, OP_PUT (8), INTERPOLATE, no mask
    assert body[21:25] == struct.pack("<I", 57)
    assert body[25:41] == struct.pack("<4i", 0, 0, 3, 2)
    assert body[41:44] == b"\x08\x00" + b"\x00"
    assert body[44:57] == bytes(13)
    # 57: ImageDescriptor: id 0, BITMAP, no flags, width 2, height 3
    assert body[57:75] == bytes(8) + b"\x00\x00" + struct.pack("<II", 2, 3)
    # 75: BitmapData: 32BIT (8), TOP_DOWN (4), x 2, y 3, stride 8, palette 0
    assert body[75:93] == b"\x08\x04" + struct.pack("<IIII", 2, 3, 8, 0)
    # 93: the rows, top first, tightly packed
    assert body[93:] == pixels.tobytes()


def test_raw_draw_copy_round_trips_a_strided_view():
    fb = frame()
    box = g.Rect(10, 3, 30, 50)
    draw = g.parse_draw_copy(g.encode_draw_copy(0, box, fb[10:30, 3:50]))
    assert (draw.surface_id, draw.box, draw.src_area) == (0, box, g.Rect(0, 0, 20, 47))
    assert draw.image_type is enums.ImageType.BITMAP and draw.bitmap_format is enums.BitmapFormat.BIT32
    assert draw.clip == ()
    np.testing.assert_array_equal(draw.pixels, fb[10:30, 3:50])


def test_encode_refuses_pixels_that_do_not_fit_the_box():
    fb = frame()
    with pytest.raises(CodecError, match="box"):
        g.encode_draw_copy(0, g.Rect(0, 0, 4, 4), fb[:4, :5])
    with pytest.raises(CodecError, match="uint8"):
        g.encode_draw_copy(0, g.Rect(0, 0, 4, 4), fb[:4, :4, :3])
    with pytest.raises(CodecError, match="empty"):
        g.encode_draw_copy_lz4(0, g.Rect(0, 0, 0, 0), fb[:0, :0])
    with pytest.raises(CodecError, match="off the surface"):
        g.encode_draw_copy(0, g.Rect(-1, 0, 3, 4), fb[:4, :4])


def bitmap_body(pixels, *, top_down=True, stride=None, fmt=8, box=None, flags_extra=0, clip=()):
    """A DRAW_COPY with a BITMAP written out by hand, rows in wire order and padded to ``stride``."""
    height, width = pixels.shape[:2]
    stride = stride or width * 4
    box = box or (0, 0, height, width)
    base = struct.pack("<I4iB", 0, *box, 1 if clip else 0)
    if clip:
        base += struct.pack("<I", len(clip)) + b"".join(struct.pack("<4i", *r) for r in clip)
    image_at = len(base) + 36
    copy = struct.pack("<I4iHBBiiI", image_at, 0, 0, height, width, 8, 0, 0, 0, 0, 0)
    descriptor = struct.pack("<QBBII", 0, 0, 0, width, height)
    flags = (4 if top_down else 0) | flags_extra
    bitmap = struct.pack("<BBIII", fmt, flags, width, height, stride)
    bitmap += struct.pack("<Q", 7) if flags_extra & 2 else struct.pack("<I", 0)
    rows = pixels if top_down else pixels[::-1]
    data = b"".join(row.tobytes() + b"\xee" * (stride - width * 4) for row in rows)
    return base + copy + descriptor + bitmap + data


def test_bottom_up_bitmap_is_flipped():
    pixels = frame(5, 3)
    draw = g.parse_draw_copy(bitmap_body(pixels, top_down=False))
    np.testing.assert_array_equal(draw.pixels, pixels)


@pytest.mark.parametrize("top_down", [True, False])
def test_bitmap_with_padded_rows_and_rgba(top_down):
    pixels = frame(4, 3)
    draw = g.parse_draw_copy(bitmap_body(pixels, top_down=top_down, stride=3 * 4 + 5, fmt=9))
    assert draw.bitmap_format is enums.BitmapFormat.RGBA
    np.testing.assert_array_equal(draw.pixels, pixels)


def test_raw_pixels_are_a_view_into_the_body():
    body = bytearray(bitmap_body(frame(2, 2)))
    draw = g.parse_draw_copy(body)
    body[93] ^= 0xFF
    assert draw.pixels[0, 0, 0] == body[93]


def test_palette_id_variant_moves_the_pixels():
    # PAL_FROM_CACHE replaces the u32 palette pointer by a u64 palette id (spice.proto BitmapData)
    pixels = frame(2, 2)
    draw = g.parse_draw_copy(bitmap_body(pixels, flags_extra=2))
    np.testing.assert_array_equal(draw.pixels, pixels)


def test_clip_rects_are_inline_and_shift_the_rest():
    pixels = frame(2, 3)
    clip = ((0, 0, 1, 1), (1, 1, 2, 3))
    draw = g.parse_draw_copy(bitmap_body(pixels, clip=clip))
    assert draw.clip == tuple(g.Rect(*r) for r in clip)
    np.testing.assert_array_equal(draw.pixels, pixels)


def lz4_body(pixels, rows_per_block, *, top_down=True, fmt=8):
    """An LZ4 DRAW_COPY built by hand as spice-server's lz4_encode lays it out, with lz4.block."""
    height, width = pixels.shape[:2]
    rows = pixels if top_down else pixels[::-1]
    data = bytes([1 if top_down else 0, fmt])
    for top in range(0, height, rows_per_block):
        block = lz4.block.compress(rows[top : top + rows_per_block].tobytes(), store_size=False)
        data += struct.pack(">I", len(block)) + block
    head = struct.pack("<I4iB", 0, 0, 0, height, width, 0)
    head += struct.pack("<I4iHBBiiI", 57, 0, 0, height, width, 8, 0, 0, 0, 0, 0)
    head += struct.pack("<QBBII", 0, 109, 0, width, height)
    return head + struct.pack("<I", len(data)) + data


def test_lz4_draw_copy_layout_and_round_trip():
    fb = frame(40, 30)
    fb[:20] = 0  # something to compress
    box = g.Rect(0, 0, 40, 30)
    body = g.encode_draw_copy_lz4(0, box, fb, block_bytes=30 * 4 * 7)  # blocks of 7 rows
    assert body[57 + 8] == 109  # image type LZ4
    (size,) = struct.unpack_from("<I", body, 75)
    assert size == len(body) - 79
    assert body[79:81] == b"\x01\x08"  # top-down, 32BIT
    pos, rows = 81, b""
    while pos < len(body):
        (n,) = struct.unpack_from(">I", body, pos)
        rows += lz4.block.decompress(body[pos + 4 : pos + 4 + n], uncompressed_size=30 * 4 * 7)
        pos += 4 + n
    assert pos == len(body) and rows == fb.tobytes()
    draw = g.parse_draw_copy(body)
    assert draw.image_type is enums.ImageType.LZ4
    np.testing.assert_array_equal(draw.pixels, fb)


def test_lz4_round_trip_of_a_strided_view():
    fb = frame(50, 60)
    draw = g.parse_draw_copy(g.encode_draw_copy_lz4(2, g.Rect(3, 4, 13, 44), fb[3:13, 4:44]))
    assert draw.surface_id == 2 and draw.box == g.Rect(3, 4, 13, 44)
    np.testing.assert_array_equal(draw.pixels, fb[3:13, 4:44])


@pytest.mark.parametrize("top_down", [True, False])
@pytest.mark.parametrize("fmt", [8, 9])
def test_lz4_body_built_independently_decodes(top_down, fmt):
    pixels = frame(9, 5)
    draw = g.parse_draw_copy(lz4_body(pixels, rows_per_block=4, top_down=top_down, fmt=fmt))
    assert draw.bitmap_format == fmt
    np.testing.assert_array_equal(draw.pixels, pixels)


def replace(body, offset, fmt, value):
    out = bytearray(body)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


RAW = bitmap_body(frame(4, 3))
LZ4 = lz4_body(frame(4, 3), rows_per_block=2)

LIES = {
    "negative box": replace(RAW, 4, "<i", -1),
    "empty box": replace(RAW, 12, "<i", 0),
    "unknown clip type": replace(RAW, 20, "<B", 2),
    "clip rects past the end": replace(replace(RAW, 20, "<B", 1), 21, "<I", 1 << 30),
    "no image": replace(RAW, 21, "<I", 0),
    "image past the end": replace(RAW, 21, "<I", len(RAW) - 10),
    "rop other than OP_PUT": replace(RAW, 41, "<H", 16),
    "a mask": replace(RAW, 53, "<I", 57),
    "source outside the image": replace(RAW, 37, "<i", 4),
    "unknown image type": replace(RAW, 65, "<B", 1),
    "zero width": replace(RAW, 67, "<I", 0),
    "16-bit bitmap": replace(RAW, 75, "<B", 6),
    "bitmap size unlike the image": replace(RAW, 77, "<I", 2),
    "stride under a row": replace(RAW, 85, "<I", 11),
    "stride past the body": replace(RAW, 85, "<I", 1 << 31),
    "lz4 size past the body": replace(LZ4, 75, "<I", len(LZ4)),
    "lz4 24-bit": replace(LZ4, 80, "<B", 7),
    "lz4 block past its data": replace(LZ4, 81, ">I", 1 << 20),
    "lz4 empty block": replace(LZ4, 81, ">I", 0),
    "lz4 claims more pixels than its bytes hold": replace(replace(LZ4, 67, "<I", 4096), 71, "<I", 4096),
    "lz4 block after the whole image": replace(replace(LZ4, 71, "<I", 2), 33, "<i", 2),
    "lz4 block larger than the image": replace(replace(LZ4, 71, "<I", 1), 33, "<i", 1),
    "lz4 claims more rows": replace(replace(LZ4, 71, "<I", 5), 33, "<i", 5),
    "lz4 no blocks": replace(LZ4[:81], 75, "<I", 2),
}


@pytest.mark.parametrize("name", LIES)
def test_lying_body_is_a_codec_error(name):
    with pytest.raises(CodecError):
        g.parse_draw_copy(LIES[name])


def test_lz4_corrupt_block_is_a_codec_error():
    body = bytearray(LZ4)
    body[85:] = b"\xff" * (len(body) - 85)
    with pytest.raises(CodecError, match="LZ4"):
        g.parse_draw_copy(bytes(body))


def test_max_pixels_caps_the_image():
    body = g.encode_draw_copy_lz4(0, g.Rect(0, 0, 16, 16), np.zeros((16, 16, 4), np.uint8))
    assert g.parse_draw_copy(body, max_pixels=256).pixels.shape == (16, 16, 4)
    with pytest.raises(CodecError, match="limit"):
        g.parse_draw_copy(body, max_pixels=255)


@pytest.mark.parametrize("body", [RAW, LZ4], ids=["raw", "lz4"])
def test_every_truncation_is_a_codec_error(body):
    for cut in range(len(body)):
        with pytest.raises(CodecError):
            g.parse_draw_copy(body[:cut])


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_codec_error(body):
    with contextlib.suppress(CodecError):
        assert isinstance(g.parse_draw_copy(body), g.DrawCopy)


@settings(max_examples=300)
@given(st.sampled_from([RAW, LZ4]), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4))
def test_any_corruption_of_a_body_parses_or_raises_codec_error(body, edits):
    damaged = bytearray(body)
    for pos, value in edits:
        damaged[pos % len(damaged)] = value
    with contextlib.suppress(CodecError):
        draw = g.parse_draw_copy(bytes(damaged), max_pixels=1 << 16)
        assert draw.pixels.shape[2] == 4 and draw.pixels.dtype == np.uint8


# --- cursor -----------------------------------------------------------------------------------------


def test_no_cursor_is_flags_none_alone():
    assert g.encode_cursor(None) == b"\x01\x00"
    assert g.parse_cursor(b"\x01\x00") is None


def test_cursor_layout_and_round_trip():
    pixels = frame(3, 2)
    data = g.encode_cursor(g.CursorShape(pixels, hot_x=1, hot_y=2))
    # flags 0, then CursorHeader {unique 0, ALPHA, width 2, height 3, hot 1, 2}, then B G R A rows
    assert data[:19] == b"\x00\x00" + bytes(8) + b"\x00" + struct.pack("<HHHH", 2, 3, 1, 2)
    assert data[19:] == pixels.tobytes()
    shape = g.parse_cursor(data)
    assert (shape.hot_x, shape.hot_y, shape.unique) == (1, 2, 0)
    np.testing.assert_array_equal(shape.pixels, pixels)


def test_cursor_with_an_id_asks_to_be_cached():
    data = g.encode_cursor(g.CursorShape(frame(1, 1)[:, :, :], unique=42))
    assert struct.unpack_from("<HQ", data) == (enums.CursorFlags.CACHE_ME, 42)
    assert g.parse_cursor(data).unique == 42


@pytest.mark.parametrize("data", [
    b"",
    b"\x00",
    b"\x04\x00" + bytes(17),  # FROM_CACHE: nothing here to find it in
    b"\x00\x00" + bytes(8) + b"\x01" + struct.pack("<HHHH", 1, 1, 0, 0) + bytes(4),  # MONO
    b"\x00\x00" + bytes(8) + b"\x00" + struct.pack("<HHHH", 2, 2, 0, 0) + bytes(15),  # one byte short
    b"\x00\x00" + bytes(8) + b"\x00" + struct.pack("<HHHH", 0, 0, 0, 0),  # empty: spice-gtk refuses it
])
def test_bad_cursor_is_a_codec_error(data):
    with pytest.raises(CodecError):
        g.parse_cursor(data)


def test_cursor_too_large_for_the_header_is_refused():
    with pytest.raises(CodecError):
        g.encode_cursor(g.CursorShape(np.zeros((1, 65536, 4), np.uint8)))


# --- migrate data -----------------------------------------------------------------------------------


def test_display_migrate_data_layout_and_round_trip():
    data = g.DisplayMigrateData(serial=77, ack_generation=2, ack_window=20, client_serial=9,
                                surfaces=(g.SurfaceInfo(0, 1920, 1080, enums.SurfaceFormat.XRGB32),))
    body = data.encode()
    assert body == (b"SWDD" + struct.pack("<IQIIQI", 1, 77, 2, 20, 9, 1) + struct.pack("<4I", 0, 1920, 1080, 32))
    assert g.DisplayMigrateData.decode(body) == data
    empty = g.DisplayMigrateData(1, 0, 0, 0)
    assert len(empty.encode()) == 36 and g.DisplayMigrateData.decode(empty.encode()) == empty


GOOD_SWDD = g.DisplayMigrateData(5, 1, 20, 3, (g.SurfaceInfo(0, 640, 480, 32),)).encode()


@pytest.mark.parametrize("body", [
    b"DCMD" + GOOD_SWDD[4:],  # spice-server's display magic: not ours
    GOOD_SWDD[:4] + struct.pack("<I", 2) + GOOD_SWDD[8:],
    GOOD_SWDD[:4] + struct.pack("<I", 0) + GOOD_SWDD[8:],
    GOOD_SWDD[:-1],
    GOOD_SWDD + b"\x00",
    GOOD_SWDD[:35],
    GOOD_SWDD[:32] + struct.pack("<I", 2) + GOOD_SWDD[36:],  # announces a surface it lacks
    GOOD_SWDD[:-4] + struct.pack("<I", 33),  # not a surface format
    GOOD_SWDD[:32] + struct.pack("<I", 2) + GOOD_SWDD[36:] * 2,  # the same surface twice
])
def test_bad_display_migrate_data_is_a_codec_error(body):
    with pytest.raises(CodecError):
        g.DisplayMigrateData.decode(body)


def test_inputs_migrate_data_is_spice_servers_icmd():
    body = g.InputsMigrateData(motion_count=3).encode()
    assert body == b"ICMD" + struct.pack("<IH", 1, 3)
    assert g.InputsMigrateData.decode(body) == g.InputsMigrateData(3)
    # as spice-server reads it: bytes after the record ignored, an older version accepted
    assert g.InputsMigrateData.decode(body + b"more").motion_count == 3
    assert g.InputsMigrateData.decode(b"ICMD" + struct.pack("<IH", 0, 1)).motion_count == 1


@pytest.mark.parametrize("body", [
    b"ICMD" + struct.pack("<IH", 2, 0),
    b"DCMD" + struct.pack("<IH", 1, 0),
    b"ICMD" + struct.pack("<I", 1) + b"\x00",
])
def test_bad_inputs_migrate_data_is_a_codec_error(body):
    with pytest.raises(CodecError):
        g.InputsMigrateData.decode(body)
