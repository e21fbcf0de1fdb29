"""The server's display, inputs and cursor channels, seen from a raw client (tests/serverkit.py):
what a client is sent and in what order, the picture it can rebuild from it, MOUSE_MOTION_ACK,
a client that never ACKs, bad input, and the migration helpers (tile deltas, held inputs)."""

from __future__ import annotations

import itertools

import gevent
import numpy as np
import pytest

from spicewire import screens
from spicewire.errors import CodecError, LinkError
from spicewire.protocol import graphics as g
from spicewire.protocol import messages as m
from spicewire.protocol.caps import caps_to_words
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import ChannelType, DisplayCap, ImageType, LinkErr, MsgcInputs
from spicewire.protocol.migrate_data import HeldInput, build_inputs_migrate_data, parse_inputs_migrate_data
from spicewire.server.display import (
    DRAW_PIECE,
    GRAPHICS_MAX_MESSAGE,
    MAX_SURFACE_SIDE,
    PENDING_LIMIT,
    DisplayOptions,
    DisplayState,
    InputsConnection,
    announced_screen,
    apply_tile_delta,
    bands,
    inputs_migrate_data,
    scancode_of,
    scancodes_of,
    tile_delta,
)
from tests.serverkit import MainSession, RawChannel, running_server, wait_until

W, H = 320, 200


@screens.register("test-noise")
class NoiseScreen(screens.Screen):
    """Every tick changes every pixel: the most a client can be asked to take."""

    kind = "test-noise"
    wants_ticks = True

    def tick(self, now: float) -> None:
        self.framebuffer[:] = np.random.default_rng().integers(0, 256, self.framebuffer.shape, dtype=np.uint8)


def display_server(kind: str = "paint", **options):
    return running_server(display=kind, display_size=(W, H), display_options=DisplayOptions(**options),
                          port_channels=[("org.test.echo", "echo")])


def link(session: MainSession, channel_type: int, caps=(), auto_ack: bool = True) -> RawChannel:
    return RawChannel.link(session.address, session.session_id, channel_type, 0, channel_caps=caps, auto_ack=auto_ack)


class Picture:
    """A client's primary surface rebuilt from what the display channel sent."""

    def __init__(self, channel: RawChannel) -> None:
        self.channel = channel
        self.pixels: np.ndarray | None = None
        self.messages: list[type] = []
        self.image_types: set[int] = set()

    def take(self, timeout: float = 0.2) -> None:
        with gevent.Timeout(timeout, False):
            while self.channel.pump(None):
                self._apply()
        self._apply()

    def _apply(self) -> None:
        while self.channel.inbox:
            msg = self.channel.inbox.popleft()
            self.messages.append(type(msg))
            if isinstance(msg, m.MsgDisplaySurfaceCreate):
                self.pixels = np.zeros((msg.height, msg.width, 4), dtype=np.uint8)
            elif isinstance(msg, m.MsgDisplayDrawCopy):
                assert self.pixels is not None, "DRAW_COPY before SURFACE_CREATE"
                draw = g.parse_draw_copy(msg.data)
                self.image_types.add(draw.image_type)
                box = draw.box
                self.pixels[box.top:box.bottom, box.left:box.right, :3] = draw.pixels[:, :, :3]

    def wait_equal(self, framebuffer: np.ndarray, timeout: float = 10.0) -> None:
        def same() -> bool:
            self.take(0.05)
            return self.pixels is not None and np.array_equal(self.pixels[:, :, :3], framebuffer[:, :, :3])
        wait_until(same, timeout, what="the client's picture to equal the server's")


def test_channels_list_offers_the_display_channels_only_with_a_screen():
    with display_server() as server, MainSession(server.address) as session:
        offered = {(c.type, c.id) for c in session.attach_channels()}
        assert {(ChannelType.DISPLAY, 0), (ChannelType.INPUTS, 0), (ChannelType.CURSOR, 0)} <= offered
        assert session.init.display_channels_hint == 1
    with running_server() as server, MainSession(server.address) as session:
        assert {c.type for c in session.attach_channels()} == {ChannelType.PORT}
        assert session.init.display_channels_hint == 0


@pytest.mark.parametrize("lz4", [False, True])
def test_a_display_gets_its_surface_then_mark_then_the_whole_picture(lz4):
    caps = [DisplayCap.MONITORS_CONFIG, *([DisplayCap.LZ4_COMPRESSION] if lz4 else [])]
    with display_server() as server, MainSession(server.address) as session:
        screen = server.sessions[session.session_id].display.screen
        screen.framebuffer[10:50, 20:90] = (1, 2, 3, 0)
        display = link(session, ChannelType.DISPLAY, tuple(caps_to_words(caps)))
        picture = Picture(display)
        picture.wait_equal(screen.framebuffer)
        first = [t for t in picture.messages if t is not m.MsgSetAck]
        assert first[:3] == [m.MsgDisplaySurfaceCreate, m.MsgDisplayMonitorsConfig, m.MsgDisplayMark]
        assert picture.image_types == ({ImageType.LZ4} if lz4 else {ImageType.BITMAP})
        # What changes later is sent as it changes, and only it.
        before = len(picture.messages)
        screen.framebuffer[150:160, 300:320] = (200, 100, 50, 0)
        picture.wait_equal(screen.framebuffer)
        assert picture.messages[before:].count(m.MsgDisplaySurfaceCreate) == 0


def test_a_display_without_the_monitors_cap_gets_no_monitors_config():
    with display_server() as server, MainSession(server.address) as session:
        picture = Picture(link(session, ChannelType.DISPLAY))
        picture.wait_equal(server.sessions[session.session_id].display.screen.framebuffer)
        assert m.MsgDisplayMonitorsConfig not in picture.messages


def test_inputs_reach_the_screen_and_every_fourth_motion_is_acknowledged():
    with display_server() as server, MainSession(server.address) as session:
        session.attach_channels()
        state = server.sessions[session.session_id].display
        display = Picture(link(session, ChannelType.DISPLAY))
        inputs = link(session, ChannelType.INPUTS)
        assert inputs.expect(m.MsgInputsInit).modifiers == 0
        inputs.send(m.MsgcInputsMousePress(button=1, buttons=1))
        for x in range(40, 80):
            inputs.send(m.MsgcInputsMousePosition(x=x, y=100, buttons=1, display_id=0))
        inputs.send(m.MsgcInputsMouseRelease(button=1, buttons=0))
        acks = 0
        with gevent.Timeout(5):
            while acks < 10:
                acks += isinstance(inputs.expect(m.MsgInputsMouseMotionAck), m.MsgInputsMouseMotionAck)
        painted = state.screen.framebuffer[100, 40:80, :3]
        assert not painted.any(), "the paint screen's black brush missed where the mouse went"
        assert state.screen.framebuffer[180, 40:80, :3].all()  # and the white canvas elsewhere stays
        display.wait_equal(state.screen.framebuffer)


def test_a_thousand_motions_get_two_hundred_and_fifty_acks():
    with display_server() as server, MainSession(server.address) as session:
        inputs = link(session, ChannelType.INPUTS)
        inputs.expect(m.MsgInputsInit)
        for i in range(1000):
            inputs.send(m.MsgcInputsMouseMotion(dx=1 if i % 2 else -1, dy=0, buttons=0))
        acks = 0
        with gevent.Timeout(10):
            while acks < 250:
                inputs.expect(m.MsgInputsMouseMotionAck)
                acks += 1
        assert server.sessions[session.session_id].display.motion_count == 0  # every bunch acknowledged


def test_a_client_that_never_acks_makes_frames_coalesce_not_queue():
    with display_server("test-noise") as server, MainSession(server.address) as session:
        state = server.sessions[session.session_id].display
        display = link(session, ChannelType.DISPLAY, auto_ack=False)
        conn = None
        def linked():
            nonlocal conn
            conn = state.display
            return conn is not None
        wait_until(linked, what="the display link")
        # Either bound stops the frames: the ACK window (40 messages unacknowledged) or the socket
        # (PENDING_LIMIT waiting), whichever this client's reading (none) reaches first.
        wait_until(lambda: not conn.channel.window_open or conn.transport.pending_write >= PENDING_LIMIT,
                   what="the frames to be held back")
        frames = state.frames
        gevent.sleep(0.5)  # 15 frame intervals: a queue would grow by 15 full frames
        assert state.frames == frames
        assert conn.transport.pending_write <= PENDING_LIMIT + W * H * 4 + 4096
        display.close()


def test_nonsense_on_inputs_ends_that_channel_only():
    with display_server() as server, MainSession(server.address) as session:
        state = server.sessions[session.session_id].display
        display = Picture(link(session, ChannelType.DISPLAY))
        inputs = link(session, ChannelType.INPUTS)
        inputs.expect(m.MsgInputsInit)
        inputs.send_raw(MsgcInputs.KEY_DOWN, b"\x01")  # a u32 field, one byte long
        inputs.wait_closed()
        wait_until(lambda: state.inputs is None, what="the inputs channel to go")
        state.screen.framebuffer[:5, :5] = 77
        display.wait_equal(state.screen.framebuffer)
        assert session.session_id in server.sessions


def test_a_second_display_link_is_refused():
    with display_server() as server, MainSession(server.address) as session:
        first = link(session, ChannelType.DISPLAY)
        wait_until(lambda: server.sessions[session.session_id].display.display is not None, what="the display")
        with pytest.raises(LinkError) as refused:
            link(session, ChannelType.DISPLAY)
        assert getattr(refused.value, "code", None) == LinkErr.CHANNEL_NOT_AVAILABLE
        first.close()


def test_the_screen_png_endpoint_shows_the_framebuffer(tmp_path):
    from PIL import Image

    from spicewire.control.server import screen_png

    frame = np.zeros((H, W, 4), dtype=np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 10, 20, 30  # B, G, R
    png = tmp_path / "s.png"
    png.write_bytes(screen_png(frame))
    assert Image.open(png).convert("RGB").getpixel((5, 5)) == (30, 20, 10)


# --- pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("code,expected", [
    (0x1E, (0x1E, False)), (0x9E, (0x1E, True)), (0x4DE0, (0x14D, False)), (0xCDE0, (0x14D, True)),
])
def test_key_codes_as_spice_gtk_sends_them(code, expected):
    assert scancode_of(code) == expected


def test_raw_scancodes_with_extended_keys():
    assert scancodes_of(b"\x1e\x9e\xe0\x48\xe0\xc8") == [(0x1E, False), (0x1E, True), (0x148, False), (0x148, True)]


@pytest.mark.parametrize("width", [DRAW_PIECE // 4 - 1, DRAW_PIECE // 4, DRAW_PIECE // 4 + 1, 64])
def test_bands_cover_a_rect_in_pieces_of_at_most_draw_piece(width):
    rect = g.Rect(3, 0, 900, width)
    pieces = bands(rect)
    assert pieces[0].top == 3 and pieces[-1].bottom == 900
    assert all(a.bottom == b.top for a, b in itertools.pairwise(pieces))
    assert all(p.area * 4 <= max(DRAW_PIECE, width * 4) for p in pieces)


@pytest.mark.parametrize("shape", [(64, 64), (65, 129), (1, 1), (200, 63)])
def test_a_tile_delta_carries_exactly_what_changed(shape):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    current = base.copy()
    current[-1, -1] ^= 1
    current[0, 0] ^= 2
    snapshot = base.copy()
    indices, data = tile_delta(current, snapshot)
    assert np.array_equal(snapshot, current)  # the base becomes the current picture
    target = base.copy()
    written = apply_tile_delta(target, indices, data)
    assert np.array_equal(target, current)
    assert written == (1 if shape[0] <= 64 and shape[1] <= 64 else 2)
    assert tile_delta(current, snapshot) == [b"", b""]


def test_a_tile_delta_that_does_not_fit_is_refused_whole():
    target = np.zeros((64, 64, 4), dtype=np.uint8)
    with pytest.raises(ValueError):
        apply_tile_delta(target, np.array([[1, 0]], dtype=np.int32).tobytes(), bytes(64 * 64 * 4))
    with pytest.raises(ValueError):
        apply_tile_delta(target, np.array([[0, 0]], dtype=np.int32).tobytes(), bytes(64 * 64 * 4 - 1))
    with pytest.raises(ValueError):
        apply_tile_delta(target, b"\0" * 7, b"")
    assert not target.any()


def test_inputs_migrate_data_with_held_inputs_round_trips():
    held = [HeldInput(MsgcInputs.KEY_DOWN, m.MsgcInputsKeyDown(code=0x1E).encode()),
            HeldInput(MsgcInputs.MOUSE_MOTION, m.MsgcInputsMouseMotion(dx=-3, dy=4, buttons=1).encode())]
    state = parse_inputs_migrate_data(build_inputs_migrate_data(3, held))
    assert state.record.motion_count == 3 and state.held == held
    assert parse_inputs_migrate_data(build_inputs_migrate_data(0, [])).held == []
    body = build_inputs_migrate_data(1, held)
    for broken in (body[:-1], body + b"x", body[:10] + b"XXXX" + body[14:]):
        with pytest.raises(CodecError):
            parse_inputs_migrate_data(broken)


def test_frames_come_at_most_once_an_interval_however_often_input_asks():
    state = DisplayState(screens.factory("paint", 64, 64)(), DisplayOptions(frame_interval=0.5))
    pushes = []
    state.push = lambda: pushes.append(1)  # type: ignore[method-assign]
    state.frame(100.0)
    state.frame(100.499)  # just under the interval: no frame
    assert len(pushes) == 1
    state.frame(100.5)  # at it: the next frame
    state.frame(100.5)
    assert len(pushes) == 2
    state.frame(101.001)  # past it
    assert len(pushes) == 3


def test_a_message_of_graphics_max_message_is_taken_one_byte_more_ends_the_channel():
    with display_server() as server, MainSession(server.address) as session:
        state = server.sessions[session.session_id].display
        inputs = link(session, ChannelType.INPUTS)
        inputs.expect(m.MsgInputsInit)
        presses = b"\x1e\x9e" * (GRAPHICS_MAX_MESSAGE // 2)  # press and release: no key left down
        inputs.send_raw(MsgcInputs.KEY_SCANCODE, presses)
        for _ in range(4):  # a MOUSE_MOTION_ACK after them shows the channel read past the big one
            inputs.send(m.MsgcInputsMouseMotion(dx=1, dy=0, buttons=0))
        inputs.expect(m.MsgInputsMouseMotionAck)
        inputs.send_raw(MsgcInputs.KEY_SCANCODE, presses + b"\x1e")
        inputs.wait_closed()
        wait_until(lambda: state.inputs is None, what="the inputs channel to go")


def test_a_frame_is_collected_only_while_less_than_pending_limit_waits():
    state = DisplayState(screens.factory("paint", 64, 64)())
    sent: list[int] = []
    transport = type("Transport", (), {"pending_write": PENDING_LIMIT, "flush": lambda self: None})()
    channel = type("Channel", (), {"window_open": True, "send_raw": lambda self, t, body: sent.append(t)})()
    state.display = type("Conn", (), {"live": True, "channel": channel, "transport": transport, "caps": ()})()
    state.surface_created = True
    state.screen.framebuffer[:4, :4] = 9
    state.push()  # at the limit: the change waits in the framebuffer
    assert sent == [] and state.frames == 0
    transport.pending_write = PENDING_LIMIT - 1
    state.push()
    assert sent and state.frames == 1


@pytest.mark.parametrize("side,fits", [(1, True), (MAX_SURFACE_SIDE, True), (0, False), (MAX_SURFACE_SIDE + 1, False)])
def test_a_migrated_screen_may_announce_sides_up_to_max_surface_side(side, fits):
    for width, height in ((side, 1), (1, side)):
        spec = {"kind": "paint", "width": width, "height": height}
        if fits:
            assert callable(announced_screen(spec))
        else:
            with pytest.raises(ValueError):
                announced_screen(spec)


# --- motion acknowledgements through a migration --------------------------------------------


class _Sent:
    """A server channel's outgoing side, read back as a client would."""

    def __init__(self) -> None:
        self.server = ChannelConnection(Side.SERVER, ChannelType.INPUTS)
        self.client = ChannelConnection(Side.CLIENT, ChannelType.INPUTS)
        self.transport = type("Transport", (), {"flush": lambda self: None, "pending_write": 0})()

    def acks(self) -> int:
        out = [msg for frame in self.server.data_to_send() for msg in self.client.receive_data(frame)]
        assert all(isinstance(msg, m.MsgInputsMouseMotionAck) for msg in out), out
        return len(out)


def _inputs(state: DisplayState, sent: _Sent, announce: bool) -> InputsConnection:
    conn = InputsConnection(state, sent.server, sent.transport)  # type: ignore[arg-type]
    conn.start(announce=announce)
    if announce:
        assert isinstance(sent.client.receive_data(b"".join(sent.server.data_to_send()))[0], m.MsgInputsInit)
    return conn


@pytest.mark.parametrize("before", [0, 3, 4, 5, 7])  # motions s1 takes before its MIGRATE on inputs
@pytest.mark.parametrize("after", [0, 1, 3, 4, 5, 9])  # motions that reach s1 after it (before FLUSH_MARK)
def test_every_bunch_of_motion_is_acknowledged_once_across_a_seamless_switch(before, after):
    """spice-gtk stops moving the mouse with 8 motions unacknowledged: an ACK s1 owes when it
    freezes must come from s2, or each migration costs the client's window up to 3 of its 8."""
    motion = m.MsgcInputsMouseMotion(dx=1, dy=0, buttons=0)
    s1, on_s1 = DisplayState(screens.factory("paint", 64, 64)()), _Sent()
    inputs = _inputs(s1, on_s1, announce=True)
    inputs.handle([motion] * before)
    assert on_s1.acks() == before // 4
    s1.stop()
    s1.frozen.add(ChannelType.INPUTS)  # SPICE_MSG_MIGRATE went out on inputs
    inputs.handle([motion] * after)
    assert on_s1.acks() == 0  # nothing but MIGRATE_DATA after MIGRATE
    carried = parse_inputs_migrate_data(inputs_migrate_data(s1))
    assert carried.record.motion_count == before % 4 + after and len(carried.held) == after
    s2, on_s2 = DisplayState(screens.factory("paint", 64, 64)()), _Sent()
    s2.stop()
    s2.motion_count = carried.record.motion_count  # what SessionDestination._restore_graphics does
    _inputs(s2, on_s2, announce=False)
    assert on_s2.acks() == (before % 4 + after) // 4
    assert before // 4 + (before % 4 + after) // 4 == (before + after) // 4  # the client's count, exactly
    assert s2.motion_count == (before + after) % 4


@pytest.mark.parametrize("after", [0, 1, 4, 6])
def test_a_rollback_acknowledges_the_motion_that_came_while_frozen(after):
    motion = m.MsgcInputsMouseMotion(dx=1, dy=0, buttons=0)
    state, sent = DisplayState(screens.factory("paint", 64, 64)()), _Sent()
    inputs = _inputs(state, sent, announce=True)
    inputs.handle([motion] * 3)
    state.stop()
    state.frozen.add(ChannelType.INPUTS)
    inputs.handle([motion] * after)
    assert sent.acks() == 0
    state.resume()  # the migration rolled back: s1 serves the session again
    assert sent.acks() == (3 + after) // 4 and state.motion_count == (3 + after) % 4
    assert state.screen.pointer == (32 + 3 + after, 32)  # held motion applied, in order
