"""The things behind a display channel, and the plug-in API for writing more.

A screen owns a framebuffer, ``height`` x ``width`` x 4 uint8 holding B, G, R, X per pixel (32-bit
xRGB, little-endian: SPICE's surface format 32), and draws into it whenever it likes; the server
compares it with what the client has and sends what changed. Input reaches it as calls: keys as PC
XT set-1 scancodes (``key_name`` spells them), the mouse as motion, positions and buttons. The
pointer position is kept here, clamped to the screen, and the screen chooses the cursor image: when
``cursor_version`` changes, the server sends the client the new one.

Register a new kind with ``@register("name")``; ``--display KIND[:WxH]`` then gives every session
one instance. ``attach(context)`` tells a screen which server it now lives on, both when its session
starts and when it arrives by migration.

Migration moves the framebuffer itself (as a VM's RAM moves), so ``save()`` returns only the
screen's own state, a small JSON record first; ``restore(chunks)`` on a fresh instance of the same
kind and size takes it back.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from spicewire.devices import saved_object
from spicewire.logs import session_label
from spicewire.protocol.enums import ButtonMask, MouseButton
from spicewire.protocol.graphics import CursorShape

DEFAULT_WIDTH = 1024
DEFAULT_HEIGHT = 768
MAX_SIDE = 16384  # what the client-side image parser accepts; 1 GiB of framebuffer at most

# PC XT scan code set 1, make codes, named as X keysyms are. An extended key (0xE0 prefix on the
# wire) is 0x100 | code here.
_KEY_NAMES = {
    0x01: "Escape", 0x0E: "BackSpace", 0x0F: "Tab", 0x1C: "Return", 0x1D: "Control_L", 0x2A: "Shift_L",
    0x36: "Shift_R", 0x37: "KP_Multiply", 0x38: "Alt_L", 0x39: "space", 0x3A: "Caps_Lock", 0x45: "Num_Lock",
    0x46: "Scroll_Lock", 0x4A: "KP_Subtract", 0x4E: "KP_Add", 0x53: "KP_Decimal", 0x56: "less", 0x57: "F11",
    0x58: "F12",
    **dict(zip(range(0x02, 0x0E), [*"1234567890", "minus", "equal"], strict=True)),
    **dict(zip(range(0x10, 0x1C), [*"qwertyuiop", "bracketleft", "bracketright"], strict=True)),
    **dict(zip(range(0x1E, 0x2A), [*"asdfghjkl", "semicolon", "apostrophe", "grave"], strict=True)),
    **dict(zip(range(0x2B, 0x36), ["backslash", *"zxcvbnm", "comma", "period", "slash"], strict=True)),
    **{0x3B + i: f"F{i + 1}" for i in range(10)},
    **dict(zip([0x47, 0x48, 0x49, 0x4B, 0x4C, 0x4D, 0x4F, 0x50, 0x51, 0x52],
               [f"KP_{d}" for d in "7894561230"], strict=True)),
    0x11C: "KP_Enter", 0x11D: "Control_R", 0x135: "KP_Divide", 0x137: "Print", 0x138: "Alt_R", 0x147: "Home",
    0x148: "Up", 0x149: "Page_Up", 0x14B: "Left", 0x14D: "Right", 0x14F: "End", 0x150: "Down",
    0x151: "Page_Down", 0x152: "Insert", 0x153: "Delete", 0x15B: "Super_L", 0x15C: "Super_R", 0x15D: "Menu",
}


def key_name(code: int) -> str:
    """The key a scancode stands for, e.g. ``key_name(0x1E) == "a"``, ``key_name(0x148) == "Up"``."""
    return _KEY_NAMES.get(code, f"scancode_0x{code:x}")


@dataclass(frozen=True)
class ScreenContext:
    """Where a screen is being shown from."""

    server_name: str
    listen: str
    session_id: int


def bgrx(rgb: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    """A colour as the four bytes a pixel holds. X is 0xFF: a client may keep the byte as sent or
    set it, and either way its copy then equals ours."""
    return np.array([rgb[2], rgb[1], rgb[0], 0xFF], dtype=np.uint8)


def _arrow() -> CursorShape:
    """A plain arrow: white, outlined in black, its tip at the hot spot."""
    size = 16
    y, x = np.mgrid[0:size, 0:size]
    edge = y * 10 // size
    inside = x <= edge
    border = inside & ((x == 0) | (x == edge) | (y == size - 1))
    pixels = np.zeros((size, size, 4), dtype=np.uint8)
    pixels[inside] = (0xFF, 0xFF, 0xFF, 0xFF)
    pixels[border] = (0, 0, 0, 0xFF)
    return CursorShape(pixels=pixels, hot_x=0, hot_y=0)


def _size_or_default(width: int | None, height: int | None) -> tuple[int, int]:
    return (DEFAULT_WIDTH if width is None else width, DEFAULT_HEIGHT if height is None else height)


def _check_size(width: int, height: int) -> tuple[int, int]:
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ValueError(f"a screen must be 1x1 to {MAX_SIDE}x{MAX_SIDE}, not {width}x{height}")
    return width, height


class Screen:
    """Base screen: a framebuffer, the pointer and keys, an arrow cursor. Subclasses draw, and
    override the input calls they care about (calling the base's, which keeps the bookkeeping)."""

    kind = "screen"
    wants_ticks = False  # whether the server should call tick(now) periodically
    background = (0, 0, 0)

    def __init__(self, width: int | None = None, height: int | None = None) -> None:
        self.width, self.height = _check_size(*_size_or_default(width, height))
        self.framebuffer: npt.NDArray[np.uint8] = np.empty((self.height, self.width, 4), dtype=np.uint8)
        self.framebuffer[...] = bgrx(self.background)
        self.context: ScreenContext | None = None
        self.pointer = (self.width // 2, self.height // 2)
        self.buttons = 0
        self.modifiers = 0
        self.keys_down: set[int] = set()
        self.last_key: int | None = None
        self.key_presses = 0
        self.mouse_events = 0
        self.cursor: CursorShape | None = _arrow()
        self.cursor_visible = True
        self.cursor_version = 0

    def attach(self, context: ScreenContext) -> None:
        self.context = context

    def tick(self, now: float) -> None:
        """Periodic call (monotonic ``now``) for screens with ``wants_ticks``."""

    def set_cursor(self, shape: CursorShape | None, visible: bool = True) -> None:
        self.cursor = shape
        self.cursor_visible = visible
        self.cursor_version += 1

    # --- input ------------------------------------------------------------------------------------

    def key_down(self, code: int) -> None:
        self.keys_down.add(code)
        self.last_key = code
        self.key_presses += 1

    def key_up(self, code: int) -> None:
        self.keys_down.discard(code)

    def key_modifiers(self, flags: int) -> None:
        self.modifiers = flags

    def mouse_motion(self, dx: int, dy: int, buttons: int) -> None:
        self.move_to(self.pointer[0] + dx, self.pointer[1] + dy)
        self.buttons = buttons
        self.mouse_events += 1

    def mouse_position(self, x: int, y: int, buttons: int) -> None:
        self.move_to(x, y)
        self.buttons = buttons
        self.mouse_events += 1

    def mouse_press(self, button: int, buttons: int) -> None:
        self.buttons = buttons
        self.mouse_events += 1

    def mouse_release(self, button: int, buttons: int) -> None:
        self.buttons = buttons
        self.mouse_events += 1

    def move_to(self, x: int, y: int) -> None:
        self.pointer = (min(max(x, 0), self.width - 1), min(max(y, 0), self.height - 1))

    # --- state ------------------------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "kind": self.kind,
            "width": self.width,
            "height": self.height,
            "pointer": list(self.pointer),
            "buttons": self.buttons,
            "modifiers": self.modifiers,
            "keys_down": sorted(key_name(code) for code in self.keys_down),
            "last_key": None if self.last_key is None else key_name(self.last_key),
            "key_presses": self.key_presses,
            "mouse_events": self.mouse_events,
        }

    def save(self) -> list[bytes]:
        return [json.dumps(self.state()).encode()]

    def restore(self, chunks: Sequence[bytes | memoryview]) -> None:
        self.load_state(saved_object(chunks[0], f"a {self.kind} screen's"))

    def state(self) -> dict:
        """The JSON part of the saved state; subclasses extend it."""
        return {
            "kind": self.kind,
            "width": self.width,
            "height": self.height,
            "pointer": list(self.pointer),
            "buttons": self.buttons,
            "modifiers": self.modifiers,
            "keys_down": sorted(self.keys_down),
            "last_key": self.last_key,
            "key_presses": self.key_presses,
            "mouse_events": self.mouse_events,
            "cursor_visible": self.cursor_visible,
        }

    def load_state(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"cannot restore a {state.get('kind')!r} screen into a {self.kind!r} one")
        if (state["width"], state["height"]) != (self.width, self.height):
            raise ValueError(f"cannot restore a {state['width']}x{state['height']} screen into a "
                             f"{self.width}x{self.height} one")
        self.move_to(*state["pointer"])
        self.buttons = state["buttons"]
        self.modifiers = state["modifiers"]
        self.keys_down = set(state["keys_down"])
        self.last_key = state["last_key"]
        self.key_presses = state["key_presses"]
        self.mouse_events = state["mouse_events"]
        self.cursor_visible = state["cursor_visible"]
        self.cursor_version += 1  # whatever the client was last told, it hears the restored cursor again


ScreenFactory = Callable[[], Screen]
_KINDS: dict[str, type[Screen]] = {}


def register(kind: str) -> Callable[[type[Screen]], type[Screen]]:
    def add(cls: type[Screen]) -> type[Screen]:
        cls.kind = kind
        _KINDS[kind] = cls
        return cls

    return add


def factory(kind: str, width: int | None = None, height: int | None = None) -> ScreenFactory:
    """Makes screens of ``kind``, at ``width`` x ``height`` or the kind's default size; an unknown
    kind or an impossible size fails here, once, rather than in every session."""
    try:
        cls = _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown screen kind {kind!r}; known: {', '.join(sorted(_KINDS))}") from None
    _check_size(*_size_or_default(width, height))
    return functools.partial(cls, width, height)


def kinds() -> list[str]:
    return sorted(_KINDS)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=16)
def _shades(background: tuple[int, int, int], ink: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    """Pixel for each coverage 0-255 of a glyph mask: indexing this with the mask paints the text."""
    alpha = np.arange(256, dtype=np.uint32)[:, None]
    back, fore = bgrx(background).astype(np.uint32), bgrx(ink).astype(np.uint32)
    return ((back * (255 - alpha) + fore * alpha + 127) // 255).astype(np.uint8)


@register("clock")
class ClockScreen(Screen):
    """Which server shows this session, and a running clock: after a migration it names s2.

    The text lines are drawn when the screen is attached; each tick redraws only the clock line,
    and only when the tenth of a second it shows has changed, so only the clock's tiles go dirty.
    """

    wants_ticks = True
    background = (0x1E, 0x2A, 0x3C)
    ink = (0xE8, 0xEC, 0xF0)
    clock_ink = (0xFF, 0xD2, 0x4A)

    def __init__(self, width: int | None = None, height: int | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        super().__init__(width, height)
        self.wall_clock = wall_clock
        unit = max(8, min(self.height // 24, self.width // 40))
        self.margin = unit
        self.line_height = unit * 3 // 2
        self.text_size = unit
        self.clock_size = unit * 3
        # Title and three info lines, then the clock: fixed bands, so redrawing one never touches another.
        self.clock_top = self.margin + 4 * self.line_height + unit
        self.clock_height = self.clock_size * 5 // 4
        font = _font(self.clock_size)
        digit = max(font.getlength(d) for d in "0123456789")
        self.clock_width = min(self.width, self.margin + int(font.getlength("::.") + 7 * digit) + self.clock_size)
        self.shown = ""
        self._draw_info()
        self._draw_clock()

    def attach(self, context: ScreenContext) -> None:
        super().attach(context)
        self._draw_info()

    def tick(self, now: float) -> None:
        self._draw_clock()

    def clock_text(self) -> str:
        wall = self.wall_clock()
        return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 10) % 10}"

    def _draw_info(self) -> None:
        ctx = self.context
        lines = [
            "spicewire",
            f"server   {ctx.server_name if ctx else '-'}",
            f"listen   {ctx.listen if ctx else '-'}",
            f"session  {session_label(ctx.session_id) if ctx else '-'}",
        ]
        for k, line in enumerate(lines):
            top = self.margin + k * self.line_height
            self._draw_text(top, self.line_height, self.width, line, self.text_size, self.ink)

    def _draw_clock(self) -> None:
        text = self.clock_text()
        if text != self.shown:
            self._draw_text(self.clock_top, self.clock_height, self.clock_width, text, self.clock_size,
                            self.clock_ink)
            self.shown = text

    def _draw_text(self, top: int, height: int, width: int, text: str, size: int,
                   ink: tuple[int, int, int]) -> None:
        """Clear a band and write ``text`` into it, anti-aliased onto the background."""
        height = min(height, self.height - top)
        if height <= 0:
            return
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).text((self.margin, 0), text, font=_font(size), fill=255)
        self.framebuffer[top : top + height, :width] = _shades(self.background, ink)[np.asarray(mask)]

    def status(self) -> dict:
        return {**super().status(), "server_name": self.context.server_name if self.context else None,
                "clock": self.shown}


# Keys 1 to 9 pick these (as RGB); the last one paints with the background, as an eraser.
PALETTE = [
    (0x00, 0x00, 0x00), (0xE5, 0x39, 0x35), (0x43, 0xA0, 0x47), (0x1E, 0x88, 0xE5), (0xFD, 0xD8, 0x35),
    (0x8E, 0x24, 0xAA), (0x00, 0xAC, 0xC1), (0xFB, 0x8C, 0x00), (0xFF, 0xFF, 0xFF),
]

_COLOUR_KEYS = {str(k) for k in range(1, len(PALETTE) + 1)}


@register("paint")
class PaintScreen(Screen):
    """Draw with the mouse: the left button paints a square brush where the pointer goes, keys 1-9
    pick the colour, ``c`` clears. The canvas is the framebuffer, so it is what a migration moves;
    the colour, pointer and buttons travel in ``save()``. The cursor is the brush in its colour."""

    background = PALETTE[-1]
    brush = 8

    def __init__(self, width: int | None = None, height: int | None = None) -> None:
        super().__init__(width, height)
        self.colour = 0
        self.strokes = 0
        self.set_cursor(self._brush_cursor())

    def key_down(self, code: int) -> None:
        super().key_down(code)
        name = key_name(code).removeprefix("KP_")
        if name in _COLOUR_KEYS:
            self.colour = int(name) - 1
            self.set_cursor(self._brush_cursor())
        elif name == "c":
            self.clear()

    def mouse_motion(self, dx: int, dy: int, buttons: int) -> None:
        start = self.pointer
        super().mouse_motion(dx, dy, buttons)
        self._stroke(start)

    def mouse_position(self, x: int, y: int, buttons: int) -> None:
        start = self.pointer
        super().mouse_position(x, y, buttons)
        self._stroke(start)

    def mouse_press(self, button: int, buttons: int) -> None:
        super().mouse_press(button, buttons)
        if button == MouseButton.LEFT:
            self.strokes += 1
            self._stamp(*self.pointer)

    def clear(self) -> None:
        self.framebuffer[...] = bgrx(self.background)

    def _stroke(self, start: tuple[int, int]) -> None:
        """Paint from ``start`` to the pointer, in steps of half a brush so a fast stroke has no gaps."""
        if not self.buttons & ButtonMask.LEFT:
            return
        (x0, y0), (x1, y1) = start, self.pointer
        steps = max(abs(x1 - x0), abs(y1 - y0)) // max(1, self.brush // 2) + 1
        for k in range(steps + 1):
            self._stamp(x0 + (x1 - x0) * k // steps, y0 + (y1 - y0) * k // steps)

    def _stamp(self, x: int, y: int) -> None:
        half = self.brush // 2
        self.framebuffer[max(y - half, 0) : y - half + self.brush, max(x - half, 0) : x - half + self.brush] = bgrx(
            PALETTE[self.colour]
        )

    def _brush_cursor(self) -> CursorShape:
        size = self.brush + 2
        pixels = np.zeros((size, size, 4), dtype=np.uint8)
        pixels[...] = (0, 0, 0, 0xFF)  # outlined, so white and black brushes show on any canvas
        r, g, b = PALETTE[self.colour]
        pixels[1:-1, 1:-1] = (b, g, r, 0xFF)
        return CursorShape(pixels=pixels, hot_x=size // 2, hot_y=size // 2)

    def status(self) -> dict:
        return {**super().status(), "colour": self.colour + 1, "strokes": self.strokes}

    def state(self) -> dict:
        return {**super().state(), "colour": self.colour, "strokes": self.strokes}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        colour = state["colour"]
        if not 0 <= colour < len(PALETTE):
            raise ValueError(f"no colour {colour} in the palette")
        self.colour = colour
        self.strokes = state["strokes"]
        self.set_cursor(self._brush_cursor(), self.cursor_visible)
