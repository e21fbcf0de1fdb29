"""A session's display, inputs and cursor channels, without sockets.

``DisplayState`` belongs to the session, as a port's ``PortState`` does: the screen (the plug-in
that owns the framebuffer), what the client has of it (the damage tracker's shadow), and the inputs
held while the screen is stopped. It outlives any one connection and is what a migration moves.
The three connection classes are driven by the network layer through the ``Transport`` they are
given, and offer the migration the same hooks a ``PortConnection`` does (``parked``,
``waiting_for_migrate_data``, ``intercept``, ``on_closed``).

What the client is sent: SURFACE_CREATE for the primary once per client display (a seamless
migration keeps it, so s2 never sends a second), MONITORS_CONFIG when the client takes it, MARK
(spice-gtk shows nothing before it), then DRAW_COPY of the tiles that changed since the last
frame. Frames are collected only while the ACK window is open and the socket keeps up: a client
that stops reading makes the screen's changes coalesce into the next frame instead of a queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from spicewire import codec, screens
from spicewire.damage import Damage
from spicewire.errors import RemoteProtocolError
from spicewire.protocol import graphics as g
from spicewire.protocol import messages as m
from spicewire.protocol.caps import has_cap
from spicewire.protocol.channel import ChannelConnection
from spicewire.protocol.enums import (
    INPUT_MOTION_ACK_BUNCH,
    ChannelType,
    DisplayCap,
    MigrateFlags,
    MouseMode,
    MsgDisplay,
    SurfaceFormat,
)
from spicewire.protocol.migrate_data import HeldInput, build_inputs_migrate_data
from spicewire.screens import Screen, ScreenContext

if TYPE_CHECKING:
    from spicewire.server.session import Session, Transport

log = logging.getLogger(__name__)

GRAPHICS_MAX_MESSAGE = 64 << 10  # what a client sends on these channels is small: events, reports
DRAW_PIECE = 1 << 20  # pixel bytes per DRAW_COPY at most: a big change goes as bands the client shows as they come
PENDING_LIMIT = 4 << 20  # a new frame is collected only while less than this waits for the socket
SURFACE_PRIMARY = 1  # SURFACE_CREATE flags: the primary surface
PRIMARY = 0  # the primary's surface id
# The largest width or height a migrated screen may announce: the limit a screen is made with,
# so that every screen that runs on s1 can migrate.
MAX_SURFACE_SIDE = screens.MAX_SIDE
MAX_MOTION_COUNT = 0xFFFF  # the inputs' migrate data carries the unacknowledged motion count as a u16
DISPLAY_MIGRATE_FLAGS = MigrateFlags.NEED_DATA_TRANSFER
"""SPICE_MSG_MIGRATE's flags on the display channel. spice-server asks for a FLUSH_MARK first too;
here nothing the client sends on the display changes its MIGRATE_DATA (our serial and ACK
generation, the surfaces: the pixels went to s2 before), so the data follows the MIGRATE at once
and the client relays both in one turn, a round trip through s1 fewer on s2's way to the session.
spice-gtk takes each flag on its own (PROTOCOL.md 5.4). The inputs keep both: their data is what
the client sent."""
DISPLAY_STATE_VERSION = 1
"""Display state version 1: the display's channel record (``display_migrate_data``) goes to s2 with
the screen in the device state, s1 to s2 directly, and SPICE_MSG_MIGRATE on the display carries no
flags: the client only switches it, as it does the cursor, and s2 starts it once the session has
landed. Nothing the client relays, nothing s2 waits for: the display costs the downtime no round
trip and no MIGRATE_DATA. s1 offers it in the announcement and uses it only if s2 says it takes it;
otherwise the record travels in MIGRATE_DATA (DISPLAY_MIGRATE_FLAGS)."""
DIRECT_DISPLAY_MIGRATE_FLAGS = MigrateFlags(0)


@dataclass
class DisplayOptions:
    lz4: bool = True  # LZ4 images for clients that advertise the cap (raw bitmaps otherwise)
    frame_interval: float = 1 / 30  # the screen is compared with the client's picture at most this often
    ack_window: int = 20


class DisplayState:
    """One session's screen and what its client has of it."""

    def __init__(self, screen: Screen, options: DisplayOptions | None = None) -> None:
        self.screen = screen
        self.options = options or DisplayOptions()
        self.damage = Damage(screen.height, screen.width)
        self.display: DisplayConnection | None = None
        self.inputs: InputsConnection | None = None
        self.cursor: CursorConnection | None = None
        # Whether the client holds the primary surface: a seamless migration keeps it, a
        # semi-seamless one (the client resets its display) and a new display link do not.
        self.surface_created = False
        # Migration: a stopped screen neither runs nor takes input (the VM is paused); after
        # SPICE_MSG_MIGRATE nothing but MIGRATE_DATA goes out on a frozen channel.
        self.stopped = False
        self.frozen: set[int] = set()  # channel types
        self.held: list[HeldInput] = []
        # s2, DISPLAY_STATE_VERSION: the display channel's record, from the device state; the
        # display starts from it once the session has landed (restore_display_channel).
        self.migrated_channel: g.DisplayMigrateData | None = None
        self.motion_count = 0  # motion messages not yet acknowledged (the inputs' migrate data)
        self.mouse_mode = MouseMode.SERVER
        self.modifiers = 0
        self._next_frame = 0.0
        self._cursor_sent = (-1, -1, -1)  # (version, x, y) the cursor channel last told the client
        self.frames = 0  # frames that carried at least one rect
        self.bytes_drawn = 0

    @property
    def connections(self) -> list[GraphicsConnection]:
        return [c for c in (self.display, self.inputs, self.cursor) if c is not None]

    def attach_to(self, session: Session, server_name: str, listen: str) -> None:
        """The screen now lives on this server (a new session, or one that arrived by migration)."""
        self.screen.attach(ScreenContext(server_name=server_name, listen=listen, session_id=session.id))

    # --- running -----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if self.stopped:
            return
        if self.screen.wants_ticks:
            self.screen.tick(now)
        self.frame(now)
        self.push_cursor()

    def frame(self, now: float) -> None:
        """Push, if a frame interval has passed since the last one: input can bring the next
        frame early, never more of them (a mouse sends hundreds of events a second)."""
        if now >= self._next_frame:
            self._next_frame = now + self.options.frame_interval
            self.push()

    def push(self) -> None:
        """Send the client what changed since its last frame, if it keeps up."""
        conn = self.display
        if (conn is None or not conn.live or self.stopped or ChannelType.DISPLAY in self.frozen
                or not self.surface_created):
            return
        channel = conn.channel
        if not channel.window_open or conn.transport.pending_write >= PENDING_LIMIT:
            return  # the changes stay in the framebuffer and come with a later frame
        rects = self.damage.collect(self.screen.framebuffer)
        if not rects:
            return
        lz4 = self.options.lz4 and has_cap(conn.caps, DisplayCap.LZ4_COMPRESSION)
        framebuffer = self.damage.shadow  # what the client will have: the pixels just collected
        for rect in rects:
            for piece in bands(rect):
                pixels = framebuffer[piece.top:piece.bottom, piece.left:piece.right]
                body = (g.encode_draw_copy_lz4(PRIMARY, piece, pixels) if lz4
                        else g.encode_draw_copy(PRIMARY, piece, pixels))
                channel.send_raw(MsgDisplay.DRAW_COPY, body)
                self.bytes_drawn += piece.area * 4
        self.frames += 1
        conn.transport.flush()

    def push_cursor(self) -> None:
        conn = self.cursor
        if conn is None or not conn.live or ChannelType.CURSOR in self.frozen:
            return
        screen = self.screen
        x, y = screen.pointer
        version = screen.cursor_version
        sent_version, sent_x, sent_y = self._cursor_sent
        if version != sent_version:
            shape = screen.cursor if screen.cursor_visible else None
            if shape is None:
                conn.channel.send(m.MsgCursorHide())
            else:
                conn.channel.send(m.MsgCursorSet(x=x, y=y, visible=1, cursor=g.encode_cursor(shape)))
        elif (x, y) != (sent_x, sent_y) and self.mouse_mode == MouseMode.SERVER:
            # In client mouse mode the client draws the pointer where its own mouse is.
            conn.channel.send(m.MsgCursorMove(x=x, y=y))
        else:
            return
        self._cursor_sent = (version, x, y)
        conn.transport.flush()

    # --- inputs ------------------------------------------------------------------------------

    def input(self, msg: m.Message) -> None:
        """An inputs-channel message for the screen: applied now, or held while it is stopped."""
        if self.stopped:
            self.held.append(HeldInput(msg.TYPE, bytes(msg.encode())))
            return
        self._apply(msg)

    def _apply(self, msg: m.Message) -> None:
        apply_input(self.screen, msg)
        if isinstance(msg, m.MsgcInputsKeyModifiers):
            self.modifiers = msg.modifiers

    def release_held(self) -> None:
        """The screen runs again: what the client typed and moved meanwhile reaches it, in order."""
        held, self.held = self.held, []
        for item in held:
            self._apply(m.decode(ChannelType.INPUTS, m.Direction.CLIENT_TO_SERVER, item.msg_type, item.body))

    def stop(self) -> None:
        self.stopped = True

    def resume(self) -> None:
        self.stopped = False
        self.frozen.clear()
        self.release_held()
        if self.inputs is not None:
            self.inputs.acknowledge_motion()  # what came while frozen (a rollback), or what s1 counted
        self.push()

    def cursor_sent(self, version: int, x: int, y: int) -> None:
        self._cursor_sent = (version, x, y)

    def forget_cursor(self) -> None:
        """The client's cursor is not known to be ours: the next push sends it whole."""
        self._cursor_sent = (-1, -1, -1)

    def close_connections(self, reason: str) -> None:
        for conn in self.connections:
            conn.transport.close(reason)

    def status(self) -> dict[str, Any]:
        return {
            "screen": self.screen.status(),
            "width": self.screen.width,
            "height": self.screen.height,
            "surface_created": self.surface_created,
            "stopped": self.stopped,
            "frames": self.frames,
            "bytes_drawn": self.bytes_drawn,
            "mouse_mode": "client" if self.mouse_mode == MouseMode.CLIENT else "server",
            "held_inputs": len(self.held),
            "channels": {c.name: c.channel.state() for c in self.connections},
        }


def bands(rect: g.Rect) -> list[g.Rect]:
    """``rect`` cut into horizontal bands of at most DRAW_PIECE pixel bytes each."""
    rows = max(1, DRAW_PIECE // max(1, rect.width * 4))
    return [g.Rect(top, rect.left, min(top + rows, rect.bottom), rect.right)
            for top in range(rect.top, rect.bottom, rows)]


def scancode_of(code: int) -> tuple[int, bool]:
    """KEY_DOWN/KEY_UP's u32 (the scancode's bytes, first byte lowest) as (scancode with 0x100 for
    an E0-extended key, released)."""
    first = code & 0xFF
    if first == 0xE0:
        last = (code >> 8) & 0xFF
        return 0x100 | (last & 0x7F), bool(last & 0x80)
    return first & 0x7F, bool(first & 0x80)


def scancodes_of(data: bytes | bytearray | memoryview) -> list[tuple[int, bool]]:
    """KEY_SCANCODE's raw set-1 bytes as (scancode, released) pairs."""
    keys, extended = [], False
    for byte in bytes(data):
        if byte == 0xE0:
            extended = True
            continue
        keys.append(((0x100 if extended else 0) | (byte & 0x7F), bool(byte & 0x80)))
        extended = False
    return keys


INPUT_MESSAGES = (
    m.MsgcInputsKeyDown, m.MsgcInputsKeyUp, m.MsgcInputsKeyScancode, m.MsgcInputsKeyModifiers,
    m.MsgcInputsMouseMotion, m.MsgcInputsMousePosition, m.MsgcInputsMousePress, m.MsgcInputsMouseRelease,
)


def apply_input(screen: Screen, msg: m.Message) -> None:
    match msg:
        case m.MsgcInputsKeyDown() | m.MsgcInputsKeyUp():
            code, released = scancode_of(msg.code)
            if released or isinstance(msg, m.MsgcInputsKeyUp):
                screen.key_up(code)
            else:
                screen.key_down(code)
        case m.MsgcInputsKeyScancode():
            for code, released in scancodes_of(msg.data):
                if released:
                    screen.key_up(code)
                else:
                    screen.key_down(code)
        case m.MsgcInputsKeyModifiers():
            screen.key_modifiers(msg.modifiers)
        case m.MsgcInputsMouseMotion():
            screen.mouse_motion(msg.dx, msg.dy, msg.buttons)
        case m.MsgcInputsMousePosition():
            screen.mouse_position(msg.x, msg.y, msg.buttons)
        case m.MsgcInputsMousePress():
            screen.mouse_press(msg.button, msg.buttons)
        case m.MsgcInputsMouseRelease():
            screen.mouse_release(msg.button, msg.buttons)
        case _:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} on the inputs channel")


class GraphicsConnection:
    """A live display, inputs or cursor connection of a session."""

    channel_type: ClassVar[int]
    name: ClassVar[str]

    def __init__(self, state: DisplayState, channel: ChannelConnection, transport: Transport,
                 caps: tuple[int, ...] = ()) -> None:
        self.state = state
        self.channel = channel
        self.transport = transport
        self.caps = caps  # the client's channel caps
        # Migration hooks, as on a PortConnection: a parked link is neither read nor answered until
        # s2 attaches it; one waiting for its MIGRATE_DATA is read but starts only once restored.
        self.parked = False
        self.waiting_for_migrate_data = False
        # s2, DISPLAY_STATE_VERSION: read, but started only once the session has landed here.
        self.waiting_for_landing = False
        self.intercept: Callable[[m.Message], bool] | None = None
        self.on_closed: Callable[[GraphicsConnection], None] | None = None
        self.started = False

    @property
    def live(self) -> bool:
        return self.started and not self.parked and not self.waiting_for_migrate_data and not self.waiting_for_landing

    @property
    def reading_allowed(self) -> bool:
        return not self.parked

    def start(self, announce: bool = True) -> None:
        """Begin serving: ``announce`` says the client's channel is new (or was reset), so it gets
        the channel's INIT; after a seamless switch it keeps its state and gets none. The link and
        a migration may both ask; only the first start counts."""
        if self.parked or self.waiting_for_migrate_data or self.waiting_for_landing or self.started:
            return
        self.started = True
        self._begin(announce)
        self.transport.flush()

    def _begin(self, announce: bool) -> None:
        raise NotImplementedError

    def handle(self, msgs: list[m.Message]) -> None:
        for msg in msgs:
            if self.intercept is not None and self.intercept(msg):
                continue
            if isinstance(msg, m.MsgcDisconnecting):
                self.transport.close("client is disconnecting")
            else:
                self._handle(msg)

    def _handle(self, msg: m.Message) -> None:
        raise RemoteProtocolError(f"unexpected {type(msg).__name__} on the {self.name} channel")

    def on_drained(self) -> None:
        pass

    def closed(self) -> None:
        if getattr(self.state, self.name) is self:
            setattr(self.state, self.name, None)
        if self.on_closed is not None:
            self.on_closed(self)


class DisplayConnection(GraphicsConnection):
    channel_type = ChannelType.DISPLAY
    name = "display"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.preferred_compression: int | None = None

    def _begin(self, announce: bool) -> None:
        state, screen = self.state, self.state.screen
        state.display = self
        if announce or not state.surface_created:
            # A new client display (or one a semi-seamless migration reset): the surface, then
            # the whole picture.
            self.channel.send(m.MsgDisplaySurfaceCreate(
                surface_id=PRIMARY, width=screen.width, height=screen.height, format=SurfaceFormat.XRGB32,
                flags=SURFACE_PRIMARY))
            if has_cap(self.caps, DisplayCap.MONITORS_CONFIG):
                head = m.MonitorHead(monitor_id=0, surface_id=PRIMARY, width=screen.width, height=screen.height,
                                     x=0, y=0, flags=0)
                self.channel.send(m.MsgDisplayMonitorsConfig(count=1, max_allowed=1, heads=(head,)))
            self.channel.send(m.MsgDisplayMark())
            state.surface_created = True
            state.damage.invalidate()
        if state.options.ack_window:
            self.channel.set_ack(state.options.ack_window)
        state.push()

    def _handle(self, msg: m.Message) -> None:
        if isinstance(msg, m.MsgcDisplayPreferredCompression):
            self.preferred_compression = msg.image_compression
        elif isinstance(msg, (m.MsgcDisplayInit, m.MsgcDisplayStreamReport, m.MsgcDisplayGlDrawDone,
                              m.MsgcDisplayPreferredVideoCodecType)):
            pass  # no caches, GLZ, streams or GL here: nothing these could change
        else:
            super()._handle(msg)

    def on_drained(self) -> None:
        self.state.push()  # the socket caught up: a frame held back may go now


class InputsConnection(GraphicsConnection):
    channel_type = ChannelType.INPUTS
    name = "inputs"

    def _begin(self, announce: bool) -> None:
        self.state.inputs = self
        if announce:
            self.channel.send(m.MsgInputsInit(modifiers=self.state.modifiers))
        self.acknowledge_motion()  # after a seamless switch: the count s1's MIGRATE_DATA carried

    def _handle(self, msg: m.Message) -> None:
        state = self.state
        if isinstance(msg, (m.MsgcInputsMouseMotion, m.MsgcInputsMousePosition)):
            # spice-gtk stops sending motion after 2 * 4 unacknowledged messages: the mouse freezes
            # unless every fourth is answered.
            state.motion_count += 1
            self.acknowledge_motion()
        if isinstance(msg, INPUT_MESSAGES):
            state.input(msg)
            state.frame(time.monotonic())  # what the input drew, without waiting for the next tick
        else:
            super()._handle(msg)

    def acknowledge_motion(self) -> None:
        """One MOUSE_MOTION_ACK per bunch of motion messages not yet acknowledged. After
        SPICE_MSG_MIGRATE (frozen) the count only grows: it travels in the MIGRATE_DATA and s2 (or
        s1, after a rollback) acknowledges it, so the client's window never loses an ACK."""
        state = self.state
        if ChannelType.INPUTS in state.frozen or not self.live:
            return
        while state.motion_count >= INPUT_MOTION_ACK_BUNCH:
            state.motion_count -= INPUT_MOTION_ACK_BUNCH
            self.channel.send(m.MsgInputsMouseMotionAck())


class CursorConnection(GraphicsConnection):
    channel_type = ChannelType.CURSOR
    name = "cursor"

    def _begin(self, announce: bool) -> None:
        state, screen = self.state, self.state.screen
        state.cursor = self
        if not announce:
            # A seamless switch: spice-gtk keeps its cursor channel initialised and refuses a second
            # INIT, so s2 tells it the cursor with SET once the screen runs here.
            state.forget_cursor()
            return
        x, y = screen.pointer
        shape = screen.cursor if screen.cursor_visible else None
        self.channel.send(m.MsgCursorInit(x=x, y=y, trail_length=0, trail_frequency=0, visible=int(shape is not None),
                                          cursor=g.encode_cursor(shape)))
        state.cursor_sent(screen.cursor_version, x, y)


# --- migration: what s1 sends and s2 takes back ----------------------------------------------

MIGRATION_TILE = 64  # the pre-copy's granularity: a tile dirtied after it travels again at the stop


def tile_delta(current: np.ndarray, base: np.ndarray, tile: int = MIGRATION_TILE) -> list[bytes]:
    """What changed in ``current`` since ``base`` (which becomes equal to it), as two chunks: the
    dirty tiles' indices (int32 pairs, row-major) and their pixels, tile after tile."""
    height, width = current.shape[:2]
    dirty = np.zeros((-(-height // tile), -(-width // tile)), dtype=np.uint8)
    codec.damage_tiles(current, base, tile, dirty, True)
    where = np.argwhere(dirty).astype(np.int32)
    pieces = [base[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile].tobytes() for ty, tx in where]
    return [where.tobytes(), b"".join(pieces)]


def apply_tile_delta(target: np.ndarray, indices: bytes | memoryview, data: bytes | memoryview,
                     tile: int = MIGRATION_TILE) -> int:
    """Write a ``tile_delta`` into ``target``; returns the tiles written. Every index and size is
    checked against ``target`` first: a delta that does not fit is refused whole."""
    if len(indices) % 8:
        raise ValueError(f"a tile index list of {len(indices)} bytes is not int32 pairs")
    where = np.frombuffer(indices, dtype=np.int32).reshape(-1, 2)
    height, width = target.shape[:2]
    rows, cols = -(-height // tile), -(-width // tile)
    if len(where) and (where.min() < 0 or where[:, 0].max() >= rows or where[:, 1].max() >= cols):
        raise ValueError("a tile index lies outside the surface")
    sizes = [(min(tile, height - ty * tile), min(tile, width - tx * tile)) for ty, tx in where]
    if sum(h * w * 4 for h, w in sizes) != len(data):
        raise ValueError(f"{len(data)} bytes of tiles for {len(where)} tiles of other sizes")
    view, pos = np.frombuffer(data, dtype=np.uint8), 0
    for (ty, tx), (h, w) in zip(where, sizes, strict=True):
        target[ty * tile:ty * tile + h, tx * tile:tx * tile + w] = view[pos:pos + h * w * 4].reshape(h, w, 4)
        pos += h * w * 4
    return len(where)


class Precopy:
    """s1's copy of a session's picture as the pre-copy sent it: at the stop, only the tiles that
    differ from it travel (``tile_delta``), for the screen and for what the client has."""

    def __init__(self, state: DisplayState) -> None:
        self.framebuffer = state.screen.framebuffer.copy()
        self.shadow = state.damage.shadow.copy()

    def chunks(self) -> list[bytes | np.ndarray]:
        return [self.framebuffer.reshape(-1), self.shadow.reshape(-1)]

    def delta(self, state: DisplayState) -> list[bytes]:
        return [*tile_delta(state.screen.framebuffer, self.framebuffer),
                *tile_delta(state.damage.shadow, self.shadow)]


def check_precopy(state: DisplayState, framebuffer: memoryview, shadow: memoryview) -> None:
    """ValueError unless both pre-copied surfaces fit this screen: a batch is checked whole first."""
    for target, data in ((state.screen.framebuffer, framebuffer), (state.damage.shadow, shadow)):
        if len(data) != target.nbytes:
            raise ValueError(f"a pre-copied surface of {len(data)} bytes for one of {target.nbytes}")


def take_precopy(state: DisplayState, framebuffer: memoryview, shadow: memoryview) -> None:
    """s2: the whole picture, as s1 had it during pre-migration (``check_precopy`` passed)."""
    check_precopy(state, framebuffer, shadow)
    for target, data in ((state.screen.framebuffer, framebuffer), (state.damage.shadow, shadow)):
        target.reshape(-1)[:] = np.frombuffer(data, dtype=np.uint8)


@dataclass
class ScreenUpdate:
    """A screen's state and picture from the device state, built apart and checked whole: a batch
    refused anywhere leaves every screen as it was."""

    state: DisplayState
    screen: Screen  # not yet shown: its framebuffer already holds the picture with the delta
    shadow: np.ndarray
    channel: g.DisplayMigrateData | None = None  # the display channel's record (DISPLAY_STATE_VERSION)

    def apply(self) -> None:
        self.state.screen = self.screen
        self.state.damage.shadow[...] = self.shadow
        self.state.migrated_channel = self.channel


def prepare_update(state: DisplayState, saved: list[memoryview], delta: list[memoryview],
                   channel: memoryview | None = None) -> ScreenUpdate:
    """The screen ``saved`` describes, with the tiles of ``delta`` (``Precopy.delta``) applied to
    copies of the picture and the client's shadow, and the display channel's record ``channel``
    when s1 sent it (DISPLAY_STATE_VERSION); raises (ValueError, CodecError, or what the screen's
    own ``restore`` raises for a state it cannot take) before anything of ``state`` changes."""
    record = None if channel is None else g.DisplayMigrateData.decode(channel)
    if len(delta) != 4:
        raise ValueError(f"a display delta has 4 chunks, not {len(delta)}")
    current = state.screen
    screen = screens.factory(current.kind, current.width, current.height)()
    screen.restore([bytes(chunk) for chunk in saved])
    # The new screen's own framebuffer takes the picture: one copy of it in the downtime, not two.
    screen.framebuffer[...] = current.framebuffer
    apply_tile_delta(screen.framebuffer, delta[0], delta[1])
    shadow = state.damage.shadow.copy()
    apply_tile_delta(shadow, delta[2], delta[3])
    return ScreenUpdate(state, screen, shadow, record)


def announce_screen(state: DisplayState) -> dict[str, Any]:
    """What s2 needs to make the same screen before anything of it arrives."""
    return {"kind": state.screen.kind, "width": state.screen.width, "height": state.screen.height}


def announced_screen(spec: Any) -> Callable[[], Screen]:
    """The screen an announcement names (``announce_screen``); ValueError for anything else."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise ValueError(f"a screen is announced as {{kind, width, height}}, not {spec!r:.80}")
    width, height = spec.get("width"), spec.get("height")
    for value in (width, height):
        if type(value) is not int or not 0 < value <= MAX_SURFACE_SIDE:
            raise ValueError(f"a screen's width and height are 1-{MAX_SURFACE_SIDE} pixels, not {value!r:.20}")
    return screens.factory(spec["kind"], width, height)


def display_migrate_data(state: DisplayState, channel: ChannelConnection) -> bytes:
    """The display channel's MIGRATE_DATA: the channel's place in the stream and which surfaces
    the client holds (the pixels went to s2 directly, in the pre-copy and the delta). Made at the
    stop for DISPLAY_STATE_VERSION (nothing goes out on a stopped display before its MIGRATE): the
    serial is then the MIGRATE's, which s2 numbers on from."""
    screen = state.screen
    primary = g.SurfaceInfo(PRIMARY, screen.width, screen.height, SurfaceFormat.XRGB32)
    surfaces = (primary,) if state.surface_created else ()
    return g.DisplayMigrateData(serial=channel.serial_out + 1, ack_generation=channel.ack_generation,
                                ack_window=channel.ack_window, client_serial=channel.serial_in,
                                surfaces=surfaces).encode()


def inputs_migrate_data(state: DisplayState) -> bytes:
    """spice-server's ICMD record (the motion count), then the inputs held since the screen stopped."""
    return build_inputs_migrate_data(min(state.motion_count, MAX_MOTION_COUNT), state.held)


def restore_display_channel(conn: DisplayConnection, data: g.DisplayMigrateData) -> None:
    """s2: the display goes on where s1's left off (``display_migrate_data``), and the client keeps
    its surfaces through a seamless switch: no second SURFACE_CREATE."""
    conn.channel.restore_migrated(serial_out=data.serial, ack_generation=data.ack_generation)
    conn.state.surface_created = any(s.surface_id == PRIMARY for s in data.surfaces)
