"""The display, inputs and cursor channels of a client session (CHANNELS.md 1.2-1.4).

``DisplayChannel`` draws what the server sends into numpy surfaces (``primary`` is the screen, height
x width x 4 uint8, B, G, R, x in memory, as SURFACE_CREATE format 32 means); ``InputsChannel`` sends
keys and mouse events, paced by MOUSE_MOTION_ACK as spice-gtk paces them; ``CursorChannel`` keeps the
pointer's shape, position and visibility. All three follow migrations as the ports do: in seamless
mode they keep their state (the picture is not redrawn); in semi-seamless mode and after a host
switch the next server introduces everything again, and the primary's memory is reused for it.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import gevent
import gevent.event
import numpy as np
from gevent import socket

from spicewire.client.channels import ChannelClient, ChannelOwner, check_thread
from spicewire.errors import CodecError, PeerStalled, RemoteProtocolError
from spicewire.protocol import messages as m
from spicewire.protocol.enums import (
    INPUT_MOTION_ACK_BUNCH,
    ButtonMask,
    ChannelType,
    DisplayCap,
    ImageType,
    MouseButton,
    SurfaceFlags,
    SurfaceFormat,
)
from spicewire.protocol.graphics import CursorShape, DrawCopy, parse_cursor, parse_draw_copy
from spicewire.protocol.link import LinkEstablished

log = logging.getLogger(__name__)

HAS_LZ4 = importlib.util.find_spec("lz4") is not None  # parse_draw_copy decodes LZ4 images with it
DISPLAY_CAPS = (DisplayCap.MONITORS_CONFIG, *((DisplayCap.LZ4_COMPRESSION,) if HAS_LZ4 else ()))
CHANNEL_CAPS: dict[int, tuple[int, ...]] = {ChannelType.DISPLAY: DISPLAY_CAPS}
"""The caps each graphics channel advertises: only what this client decodes (no streams, no
composite, no caches), so a server never sends it an image it cannot draw."""

# A SURFACE_CREATE beyond these is refused rather than allocated: a server cannot make the client
# take more memory than a 16384 x 16384 image (parse_draw_copy's own cap on an image).
MAX_SURFACE_SIDE = 16384
MAX_SURFACE_BYTES = 1 << 30
_SURFACE_FORMATS = (SurfaceFormat.XRGB32, SurfaceFormat.ARGB32)  # 4 bytes a pixel, as DRAW_COPY brings them
MOTION_WINDOW = 2 * INPUT_MOTION_ACK_BUNCH  # spice-gtk's limit of unacknowledged motion messages
MAX_QUEUED_INPUTS = 4096  # events waiting behind unacknowledged motion before a call fails (PeerStalled)
_MOTION = (m.MsgcInputsMouseMotion, m.MsgcInputsMousePosition)

_C = TypeVar("_C", bound="WatchedChannel")


class WatchedChannel(ChannelClient):
    """A channel whose state an application waits on: ``wait(predicate)`` rechecks after every
    change the channel makes (and when it closes); ``version`` counts the changes."""

    def __init__(self, session: ChannelOwner, sock: socket.socket, established: LinkEstablished) -> None:
        self.version = 0
        self._changed = gevent.event.Event()
        super().__init__(session, sock, established)

    def _notify(self) -> None:
        self.version += 1
        self._changed.set()

    def _on_closed(self) -> None:
        self._notify()

    def wait(self: _C, predicate: Callable[[_C], bool], timeout: float | None = None) -> bool:
        """Until ``predicate(self)`` holds (True), or ``timeout`` passed or the channel closed
        without it holding (False)."""
        check_thread(self.owner_thread)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate(self):
            if self.closed.is_set():
                return False
            self._changed.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._changed.wait(left)
        return True


# --- display ---------------------------------------------------------------------------------


class DisplayChannel(WatchedChannel):
    """The display channel: surfaces as numpy arrays, drawn as DRAW_COPY messages arrive.

    ``updates`` counts the draws applied, ``surface_creates`` the SURFACE_CREATE messages received
    (a seamless migration brings none), ``resets`` the RESET messages and the resets for a new
    server (semi-seamless, host switch); ``marked`` says the server sent MARK (spice-gtk shows
    nothing before it). Read them in the session's hub; ``wait``/``wait_for_update`` block there.
    """

    def __init__(self, session: ChannelOwner, sock: socket.socket, established: LinkEstablished) -> None:
        self.surfaces: dict[int, np.ndarray] = {}
        self.primary_id: int | None = None
        self.monitors: tuple[m.MonitorHead, ...] = ()
        self.marked = False
        self.updates = 0
        self.surface_creates = 0
        self.resets = 0
        self.images: dict[ImageType, int] = {}  # draws applied, by the image type that brought them
        # The primary of the server before a reset (semi-seamless, host switch): the next server's
        # SURFACE_CREATE of the same size gets this memory back, and with it the last picture until
        # it draws over it, as spice-gtk keeps showing its primary.
        self._kept: np.ndarray | None = None
        super().__init__(session, sock, established)

    @property
    def primary(self) -> np.ndarray | None:
        """The primary surface (height, width, 4) uint8, drawn into in place; None before SURFACE_CREATE."""
        if self.primary_id is None:
            return self._kept
        return self.surfaces.get(self.primary_id)

    def start(self) -> None:
        super().start()
        self._send_init()

    def _send_init(self) -> None:
        # No room for a pixmap cache or a GLZ dictionary: this client decodes neither.
        self.send(m.MsgcDisplayInit(pixmap_cache_id=1, pixmap_cache_size=0, glz_dictionary_id=1,
                                    glz_dictionary_window_size=0))

    def handle(self, msg: m.Message) -> None:
        if isinstance(msg, m.MsgDisplayDrawCopy):
            self._draw_copy(msg)
        elif isinstance(msg, m.MsgDisplaySurfaceCreate):
            self._create(msg)
        elif isinstance(msg, m.MsgDisplaySurfaceDestroy):
            self._destroy(msg.surface_id)
        elif isinstance(msg, m.MsgDisplayMonitorsConfig):
            if msg.heads:  # spice-gtk ignores an empty one
                self.monitors = msg.heads
        elif isinstance(msg, m.MsgDisplayMark):
            if self.primary_id is None:  # spice-gtk's g_return_if_fail(c->primary != NULL)
                log.warning("display: MARK before the primary surface exists (ignored)")
                return
            self.marked = True
        elif isinstance(msg, m.MsgDisplayReset):
            # spice-gtk keeps the surfaces: it clears the primary and waits for the next MARK.
            primary = self.primary
            if primary is not None:
                primary[...] = 0
            self.marked = False
            self.resets += 1
        else:
            super().handle(msg)
            return
        self._notify()

    def _create(self, msg: m.MsgDisplaySurfaceCreate) -> None:
        width, height, sid = msg.width, msg.height, msg.surface_id
        if msg.format not in _SURFACE_FORMATS:
            raise RemoteProtocolError(f"SURFACE_CREATE {sid}: format {msg.format} is not a 32-bit one")
        sides_ok = 0 < width <= MAX_SURFACE_SIDE and 0 < height <= MAX_SURFACE_SIDE
        if not sides_ok or width * height * 4 > MAX_SURFACE_BYTES:
            raise RemoteProtocolError(f"SURFACE_CREATE {sid}: {width}x{height} is out of range")
        shape = (height, width, 4)
        old = self.surfaces.get(sid)
        if msg.flags & SurfaceFlags.PRIMARY and old is None:
            old = self._kept
        self.surfaces[sid] = old if old is not None and old.shape == shape else np.zeros(shape, np.uint8)
        if msg.flags & SurfaceFlags.PRIMARY:
            self.primary_id, self._kept = sid, None
        self.surface_creates += 1

    def _destroy(self, sid: int) -> None:
        if self.surfaces.pop(sid, None) is None:
            raise RemoteProtocolError(f"SURFACE_DESTROY of surface {sid}, which does not exist")
        if sid == self.primary_id:
            self.primary_id, self.marked = None, False

    def reset_state(self) -> None:
        """A new server (semi-seamless 5.3, host switch): off-screen surfaces go, the primary's
        memory waits for the next SURFACE_CREATE (spice-gtk clears its surfaces but for the primary)."""
        primary = self.primary
        self.surfaces.clear()
        self.primary_id, self._kept, self.marked, self.monitors = None, primary, False, ()
        self.resets += 1
        # The new connection is introduced as spice-gtk's channel_up does it. Not from here: this
        # runs inside the migration's switch, which routes the message once it is done.
        gevent.spawn(self._send_init_quietly)
        self._notify()

    def _draw_copy(self, msg: m.MsgDisplayDrawCopy) -> None:
        try:
            draw = parse_draw_copy(msg.data)
        except CodecError as err:
            raise RemoteProtocolError(f"malformed DRAW_COPY: {err}") from None
        surface = self.surfaces.get(draw.surface_id)
        if surface is None:
            raise RemoteProtocolError(f"DRAW_COPY to surface {draw.surface_id}, which does not exist")
        copy_area(surface, draw)
        self.images[draw.image_type] = self.images.get(draw.image_type, 0) + 1
        self.updates += 1

    def wait_for_update(self, timeout: float | None = None, after: int | None = None) -> bool:
        """Until a draw is applied after the one counted ``after`` (default: now), or ``timeout``."""
        seen = self.updates if after is None else after
        return self.wait(lambda display: display.updates > seen, timeout)

    def _send_init_quietly(self) -> None:
        try:
            self._send_init()
        except OSError as err:  # the reader finds the broken connection and ends the channel
            log.debug("display: DISPLAY_INIT not sent: %s", err)


def copy_area(surface: np.ndarray, draw: DrawCopy) -> None:
    """SPICE's copy with OP_PUT: the draw's ``src_area`` of its image onto its ``box`` (scaled to
    the nearest pixel when the sizes differ), inside its clip rectangles and the surface."""
    box, area = draw.box, draw.src_area
    src = draw.pixels[area.top : area.bottom, area.left : area.right]  # parse_draw_copy checked both
    if src.shape[:2] != (box.height, box.width):
        rows = np.arange(box.height) * src.shape[0] // box.height
        cols = np.arange(box.width) * src.shape[1] // box.width
        src = src[rows][:, cols]
    height, width = surface.shape[:2]
    for clip in draw.clip or (box,):
        top, left = max(clip.top, box.top, 0), max(clip.left, box.left, 0)
        bottom, right = min(clip.bottom, box.bottom, height), min(clip.right, box.right, width)
        if bottom > top and right > left:
            surface[top:bottom, left:right] = src[top - box.top : bottom - box.top, left - box.left : right - box.left]


# --- inputs ----------------------------------------------------------------------------------


def key_code(scancode: int, release: bool) -> int:
    """The KEY_DOWN/KEY_UP code of a PC XT set-1 scancode (an extended key is 0x100 | its second
    byte): release sets 0x80, and an extended key goes as the bytes E0 xx, as spice-gtk sends it."""
    if not 0 < scancode < 0x200 or not scancode & 0x7F:
        raise ValueError(f"scancode {scancode:#x} is not a set-1 scancode (0x01-0x7f, 0x101-0x17f)")
    code = (scancode & 0x7F) | (0x80 if release else 0)
    return (code << 8) | 0xE0 if scancode & 0x100 else code


def button_mask(button: int) -> int:
    """The ButtonMask bit of a MouseButton."""
    if not MouseButton.LEFT <= button <= MouseButton.EXTRA:
        raise ValueError(f"{button} is not a mouse button (1-7)")
    return 1 << (button - 1)


class InputsChannel(WatchedChannel):
    """The inputs channel: keys and mouse events, in the order they were given.

    Motion and position messages are paced as spice-gtk paces them: at most MOTION_WINDOW unacknowledged
    (the server acknowledges every INPUT_MOTION_ACK_BUNCH). Beyond that they wait, and a motion
    that waits is merged with the next one (deltas add up, a position replaces the previous one);
    keys and buttons given meanwhile wait behind them, so nothing overtakes and nothing is lost.
    ``buttons`` is the ButtonMask held (press and release keep it); a mouse call without
    ``buttons`` sends it.
    """

    def __init__(self, session: ChannelOwner, sock: socket.socket, established: LinkEstablished) -> None:
        self.modifiers = 0  # the keyboard LEDs as the server last said (INIT, KEY_MODIFIERS): KeyModifier
        self.buttons = 0
        self.motion_count = 0  # motion and position messages sent and not acknowledged
        self.motion_acks = 0
        self.sent_motion = 0
        self.initialised = gevent.event.Event()
        self._queue: deque[m.Message] = deque()
        self._pumping = False
        super().__init__(session, sock, established)

    @property
    def queued(self) -> int:
        """Events given and not sent yet (waiting for MOUSE_MOTION_ACK)."""
        return len(self._queue)

    def handle(self, msg: m.Message) -> None:
        if isinstance(msg, m.MsgInputsMouseMotionAck):
            self.motion_count = max(0, self.motion_count - INPUT_MOTION_ACK_BUNCH)
            self.motion_acks += 1
            if self._queue:
                gevent.spawn(self._pump_quietly)  # the reader goes on reading meanwhile
        elif isinstance(msg, (m.MsgInputsInit, m.MsgInputsKeyModifiers)):
            self.modifiers = msg.modifiers
            self.initialised.set()
        else:
            super().handle(msg)
            return
        self._notify()

    def reset_state(self) -> None:
        # A new server counts motion from zero; what waits goes to it.
        self.motion_count = 0
        self.initialised.clear()
        if self._queue:
            gevent.spawn(self._pump_quietly)
        self._notify()

    # what the application calls

    def key_down(self, scancode: int) -> None:
        self._give(m.MsgcInputsKeyDown(key_code(scancode, release=False)))

    def key_up(self, scancode: int) -> None:
        self._give(m.MsgcInputsKeyUp(key_code(scancode, release=True)))

    def key_press(self, scancode: int) -> None:
        """Down, then up."""
        self.key_down(scancode)
        self.key_up(scancode)

    def set_modifiers(self, modifiers: int) -> None:
        """Tell the server which lock keys (KeyModifier) are on."""
        self._give(m.MsgcInputsKeyModifiers(modifiers))

    def mouse_motion(self, dx: int, dy: int, buttons: int | None = None) -> None:
        """Relative motion (server mouse mode)."""
        self._give(m.MsgcInputsMouseMotion(dx, dy, self._buttons(buttons)))

    def mouse_position(self, x: int, y: int, buttons: int | None = None, display_id: int = 0) -> None:
        """Absolute position on display ``display_id`` (client mouse mode)."""
        self._give(m.MsgcInputsMousePosition(x, y, self._buttons(buttons), display_id))

    def mouse_press(self, button: int) -> None:
        self.buttons |= button_mask(button)
        self._give(m.MsgcInputsMousePress(button, self.buttons))

    def mouse_release(self, button: int) -> None:
        self.buttons &= ~button_mask(button)
        self._give(m.MsgcInputsMouseRelease(button, self.buttons))

    def _buttons(self, buttons: int | None) -> int:
        if buttons is None:
            return self.buttons
        if not 0 <= buttons <= max(ButtonMask):
            raise ValueError(f"buttons {buttons:#x} is not a ButtonMask")
        return buttons

    def _give(self, msg: m.Message) -> None:
        check_thread(self.owner_thread)
        tail = self._queue[-1] if self._queue else None
        if isinstance(msg, m.MsgcInputsMouseMotion) and isinstance(tail, m.MsgcInputsMouseMotion) \
                and tail.buttons == msg.buttons:
            self._queue[-1] = m.MsgcInputsMouseMotion(tail.dx + msg.dx, tail.dy + msg.dy, msg.buttons)
        elif isinstance(msg, m.MsgcInputsMousePosition) and isinstance(tail, m.MsgcInputsMousePosition) \
                and (tail.buttons, tail.display_id) == (msg.buttons, msg.display_id):
            self._queue[-1] = msg
        elif len(self._queue) >= MAX_QUEUED_INPUTS:
            raise PeerStalled(f"the server acknowledges no mouse motion; {len(self._queue)} input events wait")
        else:
            self._queue.append(msg)
        self._pump()

    def _pump(self) -> None:
        """Send what waits, in order, until a motion finds the window full."""
        if self._pumping:
            return  # the greenlet pumping now sends what was just queued too
        self._pumping = True
        try:
            while self._queue:
                msg = self._queue[0]
                if isinstance(msg, _MOTION):
                    if self.motion_count >= MOTION_WINDOW:
                        break
                    self.motion_count += 1
                    self.sent_motion += 1
                self._queue.popleft()
                self.send(msg)
        finally:
            self._pumping = False

    def _pump_quietly(self) -> None:
        try:
            self._pump()
        except OSError as err:  # the reader finds the broken connection and ends the channel
            log.debug("inputs: sending queued events failed: %s", err)


# --- cursor ----------------------------------------------------------------------------------


class CursorChannel(WatchedChannel):
    """The cursor channel: ``shape`` (None: no image), ``position`` (x, y) and ``visible``, as the
    server last set them."""

    def __init__(self, session: ChannelOwner, sock: socket.socket, established: LinkEstablished) -> None:
        self.shape: CursorShape | None = None
        self.position = (0, 0)
        self.visible = False
        self.trail = (0, 0)  # (length, frequency)
        self.initialised = gevent.event.Event()
        super().__init__(session, sock, established)

    def handle(self, msg: m.Message) -> None:
        if isinstance(msg, m.MsgCursorInit):
            self.trail = (msg.trail_length, msg.trail_frequency)
            self._set(msg.x, msg.y, msg.visible, msg.cursor)
            self.initialised.set()
        elif isinstance(msg, m.MsgCursorSet):
            self._set(msg.x, msg.y, msg.visible, msg.cursor)
        elif isinstance(msg, m.MsgCursorMove):
            self.position = (msg.x, msg.y)
        elif isinstance(msg, m.MsgCursorHide):
            self.visible = False
        elif isinstance(msg, m.MsgCursorReset):
            self.shape, self.visible = None, False
        elif isinstance(msg, m.MsgCursorTrail):
            self.trail = (msg.length, msg.frequency)
        else:
            super().handle(msg)  # INVAL_ONE/INVAL_ALL: this client caches no cursor
            return
        self._notify()

    def _set(self, x: int, y: int, visible: int, cursor: m.Buffer) -> None:
        try:
            shape = parse_cursor(cursor)
        except CodecError as err:
            raise RemoteProtocolError(f"malformed cursor: {err}") from None
        self.shape, self.position, self.visible = shape, (x, y), bool(visible)

    def reset_state(self) -> None:
        self.shape, self.visible = None, False
        self.initialised.clear()
        self._notify()

