"""Display, inputs and cursor payloads that are more than a row of fields (CHANNELS.md 1.2-1.4):
rectangles, the images inside DRAW_COPY, cursor shapes, and the display and inputs migrate data.

The plain messages of these channels are declared in ``messages.py`` like every other; what lives
here are the layouts with pointers into the body and bulk pixel data, built and parsed by hand so
a 1080p frame is copied once, not field by field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import lz4.block  # type: ignore[import-untyped]
import numpy as np

from spicewire.errors import CodecError
from spicewire.protocol.enums import (
    BitmapFlags,
    BitmapFormat,
    ClipType,
    CursorFlags,
    CursorType,
    ImageScaleMode,
    ImageType,
    Ropd,
    SurfaceFormat,
)

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Rect:
    """SpiceRect: ``top`` and ``left`` inside, ``bottom`` and ``right`` one past the edge."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def area(self) -> int:
        return max(0, self.width) * max(0, self.height)


@dataclass(frozen=True)
class CursorShape:
    """A cursor image: ``pixels`` is height x width x 4 uint8 in SPICE's ALPHA layout (B, G, R, A
    in memory), ``hot_x``/``hot_y`` the pointer's tip."""

    pixels: np.ndarray
    hot_x: int = 0
    hot_y: int = 0
    unique: int = 0  # the client may cache shapes by this id; 0 with no CACHE_ME flag

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


# --- DRAW_COPY ---------------------------------------------------------------------------------
# Offsets in the body (CHANNELS.md 1.2, spice.proto DisplayBase / Copy / Image / BitmapData):
#    0  DisplayBase  u32 surface_id, Rect box (i32 top, left, bottom, right), u8 clip type
#   21  Copy         u32 src_bitmap (offset of the Image), Rect src_area, u16 rop, u8 scale_mode,
#                    QMask {u8 flags, i32 x, i32 y, u32 bitmap}
#   57  Image        u64 id, u8 type, u8 flags, u32 width, u32 height
#   75  BITMAP:      u8 format, u8 flags, u32 x, u32 y, u32 stride, u32 palette; pixels at 93
#       LZ4:         BinaryData {u32 size; u8 top_down, u8 format} at 75; the blocks at 81
# A RECTS clip inserts ``u32 n, Rect[n]`` inline after the clip type: everything after moves.

_BASE = struct.Struct("<IiiiiB")
_CLIP_COUNT = struct.Struct("<I")
_RECT = struct.Struct("<iiii")
_COPY = struct.Struct("<IiiiiHBBiiI")
_IMAGE = struct.Struct("<QBBII")
_BITMAP = struct.Struct("<BBIII")  # the palette pointer or id follows, by the flags
_PALETTE_PTR = struct.Struct("<I")
_PALETTE_ID = struct.Struct("<Q")
_BINARY_SIZE = struct.Struct("<I")
_LZ4_BLOCK_SIZE = struct.Struct(">I")  # big-endian, unlike everything else (canvas_get_lz4)

_IMAGE_AT = _BASE.size + _COPY.size  # 57, with no clip rects
_RAW_HEAD = struct.Struct("<" + "".join(s.format.lstrip("<") for s in (_BASE, _COPY, _IMAGE, _BITMAP, _PALETTE_PTR)))
_LZ4_HEAD = struct.Struct("<" + "".join(s.format.lstrip("<") for s in (_BASE, _COPY, _IMAGE, _BINARY_SIZE)) + "BB")
DRAW_COPY_HEADER_SIZE = _RAW_HEAD.size  # 93

MAX_PIXELS = 16384 * 16384
"""Default cap on an image's pixels in parse_draw_copy: what a decoder allocates for LZ4 at most."""
LZ4_BLOCK_BYTES = 1 << 20
"""Uncompressed bytes per LZ4 block (whole rows): big enough to compress well, small enough that a
strided rectangle is copied to contiguous memory a block at a time, not whole."""
_LZ4_MAX_RATIO = 255  # LZ4 turns n compressed bytes into at most about 255 n (a run of 255-length bytes)

_PIXEL_FORMATS = (BitmapFormat.BIT32, BitmapFormat.RGBA)  # 4 bytes a pixel: what a numpy (h, w, 4) holds


def draw_copy_size(width: int, height: int) -> int:
    """The body size of a raw DRAW_COPY of ``width`` x ``height`` pixels."""
    return DRAW_COPY_HEADER_SIZE + width * 4 * height


def _check_pixels(box: Rect, pixels: np.ndarray) -> tuple[int, int]:
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 4:
        raise CodecError(f"pixels must be (h, w, 4) uint8, got {pixels.shape} {pixels.dtype}")
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    if (box.height, box.width) != (height, width):
        raise CodecError(f"box {box} is {box.width}x{box.height}, the pixels {width}x{height}")
    if not width or not height or box.top < 0 or box.left < 0:
        raise CodecError(f"draw {box} is empty or off the surface")
    return height, width


def _draw_head(surface_id: int, box: Rect, width: int, height: int, image_type: ImageType) -> tuple:
    return (
        surface_id, box.top, box.left, box.bottom, box.right, ClipType.NONE,
        _IMAGE_AT, 0, 0, height, width, Ropd.OP_PUT, ImageScaleMode.INTERPOLATE, 0, 0, 0, 0,
        0, image_type, 0, width, height,
    )


def encode_draw_copy(surface_id: int, box: Rect, pixels: np.ndarray) -> memoryview:
    """A DRAW_COPY body drawing ``pixels`` (an (h, w, 4) uint8 view, any row stride, B G R x in
    memory) at ``box`` as a raw 32-bit top-down BITMAP. The pixels are copied once, into the body."""
    height, width = _check_pixels(box, pixels)
    body = np.empty(draw_copy_size(width, height), dtype=np.uint8)
    try:
        _RAW_HEAD.pack_into(
            body.data, 0, *_draw_head(surface_id, box, width, height, ImageType.BITMAP),
            BitmapFormat.BIT32, BitmapFlags.TOP_DOWN, width, height, width * 4, 0,
        )
    except struct.error as exc:
        raise CodecError(f"DRAW_COPY of {box} on surface {surface_id}: {exc}") from None
    np.copyto(body[DRAW_COPY_HEADER_SIZE:].reshape(height, width, 4), pixels)
    return body.data


def encode_draw_copy_lz4(surface_id: int, box: Rect, pixels: np.ndarray, block_bytes: int = LZ4_BLOCK_BYTES) -> bytes:
    """The same draw as an LZ4 image (the client must have DisplayCap.LZ4_COMPRESSION): rows top
    down in independent LZ4 blocks, each prefixed by its big-endian length, as spice-server's
    lz4_encode writes them. It may come out larger than the raw draw for noisy pixels."""
    height, width = _check_pixels(box, pixels)
    rows_per_block = max(1, block_bytes // (width * 4))
    blocks: list[bytes] = []
    for top in range(0, height, rows_per_block):
        rows = np.ascontiguousarray(pixels[top : top + rows_per_block])  # no copy for whole rows
        block = lz4.block.compress(rows, store_size=False)
        blocks += (_LZ4_BLOCK_SIZE.pack(len(block)), block)
    data_size = 2 + sum(len(block) for block in blocks)
    try:
        head = _LZ4_HEAD.pack(
            *_draw_head(surface_id, box, width, height, ImageType.LZ4), data_size, 1, BitmapFormat.BIT32,
        )
    except struct.error as exc:
        raise CodecError(f"DRAW_COPY of {box} on surface {surface_id}: {exc}") from None
    return b"".join((head, *blocks))


@dataclass(frozen=True, slots=True, eq=False)  # numpy arrays have no truth value to compare by
class DrawCopy:
    """A parsed DRAW_COPY: draw ``src_area`` of the image ``pixels`` (height x width x 4, top row
    first, B G R x/A in memory) onto ``box`` of surface ``surface_id``, scaled if the sizes differ.

    For a BITMAP, ``pixels`` is a view into the body (a bottom-up one flipped): copy it out before
    the body's buffer is reused. ``clip`` lists the RECTS clip, empty for none."""

    surface_id: int
    box: Rect
    src_area: Rect
    pixels: np.ndarray
    image_type: ImageType
    bitmap_format: BitmapFormat = BitmapFormat.BIT32
    clip: tuple[Rect, ...] = ()


def _flat(body: Buffer, what: str) -> memoryview:
    try:
        return memoryview(body).cast("B")
    except TypeError as exc:
        raise CodecError(f"{what} body is not a flat buffer: {exc}") from None


def _need(body: memoryview, pos: int, n: int, what: str) -> None:
    if n < 0 or pos + n > len(body):
        raise CodecError(f"DRAW_COPY {what} needs bytes {pos}..{pos + n} but the body has {len(body)}")


def _image_size(width: int, height: int, max_pixels: int) -> None:
    if not width or not height:
        raise CodecError(f"DRAW_COPY image of {width}x{height} pixels is empty")
    if width * height > max_pixels:
        raise CodecError(f"DRAW_COPY image of {width}x{height} pixels is over the limit of {max_pixels}")


def _pixel_format(value: int) -> BitmapFormat:
    if value not in _PIXEL_FORMATS:
        raise CodecError(f"DRAW_COPY bitmap format {value} is not a 32-bit one (8 xRGB, 9 ARGB)")
    return BitmapFormat(value)


def parse_draw_copy(body: Buffer, max_pixels: int = MAX_PIXELS) -> DrawCopy:
    """Parse a DRAW_COPY body with a BITMAP (32-bit xRGB or ARGB, top-down or bottom-up, any stride)
    or an LZ4 image. Anything else, or any inconsistency, is a CodecError: every offset is checked
    against the body, and an LZ4 image may not claim more pixels than ``max_pixels`` nor than its
    compressed bytes can expand to."""
    view = _flat(body, "DRAW_COPY")
    _need(view, 0, _BASE.size, "DisplayBase")
    surface_id, *box_fields, clip_type = _BASE.unpack_from(view)
    box = Rect(*box_fields)
    if not (0 <= box.top < box.bottom and 0 <= box.left < box.right):
        raise CodecError(f"DRAW_COPY box {box} is empty or off the surface")
    pos = _BASE.size
    clip: tuple[Rect, ...] = ()
    if clip_type == ClipType.RECTS:
        _need(view, pos, _CLIP_COUNT.size, "clip count")
        (count,) = _CLIP_COUNT.unpack_from(view, pos)
        pos += _CLIP_COUNT.size
        _need(view, pos, count * _RECT.size, f"{count} clip rects")
        clip = tuple(Rect(*r) for r in _RECT.iter_unpack(view[pos : pos + count * _RECT.size]))
        pos += count * _RECT.size
    elif clip_type != ClipType.NONE:
        raise CodecError(f"DRAW_COPY clip type {clip_type} is unknown")
    _need(view, pos, _COPY.size, "Copy")
    image_at, *src_fields, rop, _scale, mask_flags, _mask_x, _mask_y, mask = _COPY.unpack_from(view, pos)
    if rop != Ropd.OP_PUT or mask or mask_flags:
        raise CodecError(f"DRAW_COPY with rop {rop:#x} and mask {mask}/{mask_flags}: only a plain OP_PUT is supported")
    if not image_at:
        raise CodecError("DRAW_COPY without an image")
    _need(view, image_at, _IMAGE.size, "Image")
    _id, image_type, _flags, width, height = _IMAGE.unpack_from(view, image_at)
    _image_size(width, height, max_pixels)
    src = Rect(*src_fields)
    if not (0 <= src.top < src.bottom <= height and 0 <= src.left < src.right <= width):
        raise CodecError(f"DRAW_COPY source {src} is not inside its {width}x{height} image")
    at = image_at + _IMAGE.size
    if image_type == ImageType.BITMAP:
        pixels, fmt = _parse_bitmap(view, at, width, height)
    elif image_type == ImageType.LZ4:
        pixels, fmt = _parse_lz4(view, at, width, height)
    else:
        raise CodecError(f"DRAW_COPY image type {image_type} is not supported (only BITMAP 0 and LZ4 109)")
    return DrawCopy(surface_id, box, src, pixels, ImageType(image_type), fmt, clip)


def _parse_bitmap(view: memoryview, at: int, width: int, height: int) -> tuple[np.ndarray, BitmapFormat]:
    _need(view, at, _BITMAP.size, "BitmapData")
    fmt, flags, x, y, stride = _BITMAP.unpack_from(view, at)
    fmt = _pixel_format(fmt)
    if (x, y) != (width, height):
        raise CodecError(f"DRAW_COPY bitmap of {x}x{y} in an image of {width}x{height}")
    if stride < x * 4:
        raise CodecError(f"DRAW_COPY bitmap stride {stride} is under its {x * 4}-byte rows")
    at += _BITMAP.size
    at += _PALETTE_ID.size if flags & BitmapFlags.PAL_FROM_CACHE else _PALETTE_PTR.size  # no palette at 32 bits
    _need(view, at, stride * y, f"{x}x{y} bitmap with stride {stride}")
    rows = np.frombuffer(view, dtype=np.uint8, count=stride * y, offset=at).reshape(y, stride)
    pixels = rows[:, : x * 4].reshape(y, x, 4)
    return (pixels if flags & BitmapFlags.TOP_DOWN else pixels[::-1]), fmt


def _parse_lz4(view: memoryview, at: int, width: int, height: int) -> tuple[np.ndarray, BitmapFormat]:
    _need(view, at, _BINARY_SIZE.size, "LZ4 data size")
    (size,) = _BINARY_SIZE.unpack_from(view, at)
    at += _BINARY_SIZE.size
    _need(view, at, size, "LZ4 data")
    if size < 2:
        raise CodecError(f"LZ4 data of {size} bytes has no header")
    top_down, fmt = view[at], _pixel_format(view[at + 1])
    pos, end = at + 2, at + size
    total = width * height * 4
    if total > _LZ4_MAX_RATIO * (end - pos) + 64:
        raise CodecError(f"{end - pos} LZ4 bytes cannot hold a {width}x{height} image")
    out = np.empty(total, dtype=np.uint8)
    filled = 0
    while pos < end:
        _need(view, pos, _LZ4_BLOCK_SIZE.size, "LZ4 block length")
        (n,) = _LZ4_BLOCK_SIZE.unpack_from(view, pos)
        pos += _LZ4_BLOCK_SIZE.size
        if not n or n > end - pos:
            raise CodecError(f"LZ4 block of {n} bytes at offset {pos} in data ending at {end}")
        room = total - filled
        if not room:
            raise CodecError(f"LZ4 block at offset {pos} after the whole {width}x{height} image")
        try:
            block = lz4.block.decompress(view[pos : pos + n], uncompressed_size=min(room, _LZ4_MAX_RATIO * n + 64))
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"LZ4 block at offset {pos}: {exc}") from None
        if not block:
            raise CodecError(f"LZ4 block at offset {pos} decodes to nothing")  # canvas_get_lz4 refuses it too
        out[filled : filled + len(block)] = np.frombuffer(block, dtype=np.uint8)
        filled += len(block)
        pos += n
    if filled != total:
        raise CodecError(f"LZ4 blocks hold {filled} bytes, a {width}x{height} image {total}")
    pixels = out.reshape(height, width, 4)
    return (pixels if top_down else pixels[::-1]), fmt


# --- cursor --------------------------------------------------------------------------------------
# SpiceCursor: u16 flags; unless NONE, CursorHeader {u64 unique, u8 type, u16 width, height,
# hot_spot_x, hot_spot_y}; then the image to the end of the message (ALPHA: width * height * 4).

_CURSOR_FLAGS = struct.Struct("<H")
_CURSOR_HEADER = struct.Struct("<QBHHHH")
CURSOR_HEADER_SIZE = _CURSOR_FLAGS.size + _CURSOR_HEADER.size  # 19


def encode_cursor(shape: CursorShape | None) -> bytes:
    """The SpiceCursor of CURSOR_INIT and CURSOR_SET: flags NONE for no cursor, else an ALPHA image
    (cached by the client when ``shape.unique`` is set)."""
    if shape is None:
        return _CURSOR_FLAGS.pack(CursorFlags.NONE)
    pixels = shape.pixels
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 4 or not pixels.size:
        raise CodecError(f"cursor pixels must be non-empty (h, w, 4) uint8, got {pixels.shape} {pixels.dtype}")
    flags = CursorFlags.CACHE_ME if shape.unique else 0
    try:
        head = _CURSOR_FLAGS.pack(flags) + _CURSOR_HEADER.pack(
            shape.unique, CursorType.ALPHA, shape.width, shape.height, shape.hot_x, shape.hot_y,
        )
    except struct.error as exc:
        raise CodecError(f"cursor {shape.width}x{shape.height}, hot spot {shape.hot_x},{shape.hot_y}: {exc}") from None
    return head + np.ascontiguousarray(pixels).tobytes()


def parse_cursor(data: Buffer) -> CursorShape | None:
    """The shape a SpiceCursor carries, None for NONE. Only ALPHA images are understood; a cursor
    FROM_CACHE is refused, as this side caches none."""
    view = _flat(data, "cursor")
    if len(view) < _CURSOR_FLAGS.size:
        raise CodecError(f"cursor of {len(view)} bytes has no flags")
    (flags,) = _CURSOR_FLAGS.unpack_from(view)
    if flags & CursorFlags.NONE:
        return None
    if flags & CursorFlags.FROM_CACHE:
        raise CodecError("cursor from the client's cache, which this side does not keep")
    if len(view) < CURSOR_HEADER_SIZE:
        raise CodecError(f"cursor of {len(view)} bytes, its header needs {CURSOR_HEADER_SIZE}")
    unique, kind, width, height, hot_x, hot_y = _CURSOR_HEADER.unpack_from(view, _CURSOR_FLAGS.size)
    if kind != CursorType.ALPHA:
        raise CodecError(f"cursor type {kind} is not supported (only ALPHA 0)")
    size = width * height * 4
    if not size or len(view) - CURSOR_HEADER_SIZE < size:
        raise CodecError(f"{width}x{height} ALPHA cursor with {len(view) - CURSOR_HEADER_SIZE} bytes of image")
    pixels = np.frombuffer(view, dtype=np.uint8, count=size, offset=CURSOR_HEADER_SIZE)
    return CursorShape(pixels.reshape(height, width, 4).copy(), hot_x, hot_y, unique)


# --- migrate data --------------------------------------------------------------------------------

_MIGRATE_HEADER = struct.Struct("<4sI")  # SpiceMigrateDataHeader: magic bytes in wire order, version


def _migrate_header(body: Buffer, what: str, magic: bytes, size: int) -> tuple[memoryview, int]:
    """``body`` as bytes of at least ``size`` that start with ``magic``, and the version it names:
    each record judges the version itself (display wants its own, inputs any up to its own)."""
    view = _flat(body, what)
    if len(view) < size:
        raise CodecError(f"{what} of {len(view)} bytes, needs {size}")
    found, version = _MIGRATE_HEADER.unpack_from(view)
    if found != magic:
        raise CodecError(f"{what} magic {found!r}, expected {magic!r}")
    return view, version


DISPLAY_MIGRATE_MAGIC = b"SWDD"
DISPLAY_MIGRATE_VERSION = 1
_DISPLAY_STATE = struct.Struct("<QIIQI")
_SURFACE_INFO = struct.Struct("<IIII")
DISPLAY_MIGRATE_FIXED_SIZE = _MIGRATE_HEADER.size + _DISPLAY_STATE.size  # 36


@dataclass(frozen=True, slots=True)
class SurfaceInfo:
    surface_id: int
    width: int
    height: int
    format: int  # SurfaceFormat


@dataclass(frozen=True, slots=True)
class DisplayMigrateData:
    """spicewire's display-channel migrate data, ``SWDD`` version 1, little endian::

        0   4s   magic          b"SWDD"
        4   u32  version        1
        8   u64  serial         last server->client message serial sent
        16  u32  ack_generation last SET_ACK generation sent (0 = none)
        20  u32  ack_window     its window (0 = ACKs off)
        24  u64  client_serial  last client->server message serial received
        32  u32  num_surfaces
        36  num_surfaces x {u32 surface_id, u32 width, u32 height, u32 format}: the surfaces the
            client holds, which s2 therefore never creates again

    No pixels: s2 already has the surfaces' contents, moved beside the migration, and the
    client keeps its own. A version 1 body is exactly 36 + 16 n bytes.
    """

    serial: int
    ack_generation: int
    ack_window: int
    client_serial: int
    surfaces: tuple[SurfaceInfo, ...] = ()

    def encode(self) -> bytes:
        try:
            out = _MIGRATE_HEADER.pack(DISPLAY_MIGRATE_MAGIC, DISPLAY_MIGRATE_VERSION) + _DISPLAY_STATE.pack(
                self.serial, self.ack_generation, self.ack_window, self.client_serial, len(self.surfaces),
            )
            return out + b"".join(
                _SURFACE_INFO.pack(s.surface_id, s.width, s.height, s.format) for s in self.surfaces
            )
        except struct.error as exc:
            raise CodecError(f"display migrate data {self}: {exc}") from None

    @classmethod
    def decode(cls, body: Buffer) -> DisplayMigrateData:
        view, version = _migrate_header(body, "display migrate data", DISPLAY_MIGRATE_MAGIC,
                                        DISPLAY_MIGRATE_FIXED_SIZE)
        if version != DISPLAY_MIGRATE_VERSION:
            raise CodecError(f"display migrate data version {version}, this side reads {DISPLAY_MIGRATE_VERSION}")
        serial, generation, window, client_serial, count = _DISPLAY_STATE.unpack_from(view, _MIGRATE_HEADER.size)
        if len(view) != DISPLAY_MIGRATE_FIXED_SIZE + count * _SURFACE_INFO.size:
            raise CodecError(f"display migrate data of {len(view)} bytes announces {count} surfaces")
        surfaces = tuple(
            SurfaceInfo(*fields) for fields in _SURFACE_INFO.iter_unpack(view[DISPLAY_MIGRATE_FIXED_SIZE:])
        )
        for surface in surfaces:
            if surface.format not in SurfaceFormat.__members__.values() or not surface.width or not surface.height:
                raise CodecError(f"display migrate data surface {surface} is not a surface")
        if len({s.surface_id for s in surfaces}) != len(surfaces):
            raise CodecError("display migrate data lists a surface twice")
        return cls(serial, generation, window, client_serial, surfaces)


INPUTS_MIGRATE_MAGIC = b"ICMD"
INPUTS_MIGRATE_VERSION = 1
_INPUTS_STATE = struct.Struct("<H")
INPUTS_MIGRATE_SIZE = _MIGRATE_HEADER.size + _INPUTS_STATE.size  # 10


@dataclass(frozen=True, slots=True)
class InputsMigrateData:
    """spice-server's inputs migrate data (server/migration-protocol.h): SpiceMigrateDataHeader
    {"ICMD", 1} and SpiceMigrateDataInputs {u16 motion_count}, the motion messages not yet acked.
    Read as spice-server reads it: any version up to ours, bytes after the record ignored."""

    motion_count: int

    def encode(self) -> bytes:
        try:
            return _MIGRATE_HEADER.pack(INPUTS_MIGRATE_MAGIC, INPUTS_MIGRATE_VERSION) + _INPUTS_STATE.pack(
                self.motion_count
            )
        except struct.error as exc:
            raise CodecError(f"inputs migrate data {self}: {exc}") from None

    @classmethod
    def decode(cls, body: Buffer) -> InputsMigrateData:
        view, version = _migrate_header(body, "inputs migrate data", INPUTS_MIGRATE_MAGIC, INPUTS_MIGRATE_SIZE)
        if version > INPUTS_MIGRATE_VERSION:
            raise CodecError(f"inputs migrate data version {version} is newer than {INPUTS_MIGRATE_VERSION}")
        (motion_count,) = _INPUTS_STATE.unpack_from(view, _MIGRATE_HEADER.size)
        return cls(motion_count)
