"""spice-gtk's display, inputs and cursor channels against in-process servers with a screen.

spice-gtk runs headless in ``peers/spicegtk_display_driver.py`` (Debian's python3 with
SpiceClientGLib); its primary surface is read back byte for byte and compared with the server's
framebuffer (B, G, R; the X byte is padding).  Inputs go through spice-gtk's own inputs channel
calls, so scancode encoding, the motion ACK window and the mouse mode are spice-gtk's.

Facts about spice-gtk 0.42 (Debian) these tests rest on:

- It advertises DISPLAY cap LZ4_COMPRESSION (it is linked against liblz4).
- A second SURFACE_CREATE of the primary at the same size emits no second display-primary-create:
  spice-gtk reuses the canvas ("Reusing existing primary surface"). The driver counts SURFACE_CREATE
  messages from spice-gtk's "surface flags" debug line instead.
- It asks for client mouse mode when MAIN_INIT offers it; it sends at most 2 * 4 motion or position
  messages before a MOUSE_MOTION_ACK and adds later motion up (keeps the latest position) until one.
- Keys go out as set-1 scancodes, an E0-extended key (0x1xx) as the two bytes E0 xx in KEY_DOWN's u32.

The bad-input tests at the end use the raw client of tests/serverkit.py.
"""

from __future__ import annotations

import gevent
import gevent.event
import numpy as np
import pytest

from spicewire.control.client import ControlClient
from spicewire.control.server import ControlServer
from spicewire.protocol import messages as m
from spicewire.protocol.caps import has_cap
from spicewire.protocol.enums import (
    INPUT_MOTION_ACK_BUNCH,
    ButtonMask,
    ChannelType,
    DisplayCap,
    MouseButton,
    MsgcDisplay,
    MsgcInputs,
)
from spicewire.screens import PALETTE, bgrx
from spicewire.server import display as display_module
from spicewire.server.display import PENDING_LIMIT, DisplayOptions
from spicewire.server.net import ServerConfig, SpiceServer

from . import peers
from .peers.spicegtk import DisplayDriver
from .served import TOKEN
from .serverkit import MainSession, RawChannel, running_server, wait_until

pytestmark = pytest.mark.peer

SIZE = (320, 240)
PEER_TOKEN = "peer-token"  # what s1 presents on the in-process s2's /migration/*
MOUSE_MODE_CLIENT = 2  # SpiceMouseMode
KEY_2, KEY_3, KEY_C, KEY_UP = 0x03, 0x04, 0x2E, 0x148  # set-1 scancodes; Up is E0 48


@pytest.fixture
def bounded():
    with gevent.Timeout(120, AssertionError("the test took longer than 120 s")):
        yield


def only_session(server: SpiceServer):
    wait_until(lambda: len(server.sessions) == 1, what="one session")
    return next(iter(server.sessions.values()))


def screen_of(server: SpiceServer):
    return only_session(server).display.screen


def differing(picture: np.ndarray, framebuffer: np.ndarray) -> np.ndarray:
    return (picture[:, :, :3] != framebuffer[:, :, :3]).any(axis=2)


def assert_shows(drv: DisplayDriver, framebuffer: np.ndarray, what: str, timeout: float = 15.0) -> np.ndarray:
    """Wait until spice-gtk's primary equals ``framebuffer`` (B, G, R of every pixel); returns it."""
    deadline = gevent.get_hub().loop.now() + timeout
    while True:
        picture = drv.picture()
        assert picture.shape == framebuffer.shape, (picture.shape, framebuffer.shape)
        wrong = differing(picture, framebuffer)
        if not wrong.any():
            return picture
        if gevent.get_hub().loop.now() > deadline:
            ys, xs = np.nonzero(wrong)
            pytest.fail(f"{what}: spice-gtk's primary differs from the framebuffer in {wrong.sum()} pixels, "
                        f"rows {ys.min()}-{ys.max()}, columns {xs.min()}-{xs.max()}, after {timeout} s")
        gevent.sleep(0.05)


def move_to(drv: DisplayDriver, screen, points, buttons: int = 0) -> None:
    """The pointer along ``points`` through spice-gtk: positions in client mouse mode, motions in
    server mode (the server's screen keeps the pointer there)."""
    if drv.state()["mouse_mode"] == MOUSE_MODE_CLIENT:
        drv.position(points, buttons)
        return
    x, y = screen.pointer
    steps = []
    for px, py in points:
        steps.append((px - x, py - y))
        x, y = px, py
    drv.motion(steps, buttons)


def stroke(drv: DisplayDriver, screen, points) -> None:
    """Press the left button at the first point, drag through the rest, release. (In client mouse
    mode the press follows the position on the same channel; in server mode the next motion is
    reckoned from where the screen's pointer is.)"""
    move_to(drv, screen, points[:1])
    if drv.state()["mouse_mode"] != MOUSE_MODE_CLIENT:
        wait_until(lambda: tuple(screen.pointer) == tuple(points[0]), what=f"the pointer at {points[0]}")
    drv.button("press", MouseButton.LEFT, ButtonMask.LEFT)
    move_to(drv, screen, points[1:], ButtonMask.LEFT)
    drv.button("release", MouseButton.LEFT, 0)


def display_server(**config):
    config.setdefault("display", "paint")
    config.setdefault("display_size", SIZE)
    return running_server(port_channels=[], **config)


# --- the picture --------------------------------------------------------------------------------


@pytest.mark.parametrize("lz4", [False, True], ids=["raw", "lz4"])
def test_spicegtk_primary_equals_the_framebuffer_pixel_for_pixel(tmp_path, bounded, lz4):
    peers.require("spicegtk")
    with display_server(display_options=DisplayOptions(lz4=lz4)) as server, \
            DisplayDriver(server.address[1], tmp_path) as drv:
        state = drv.ready()
        assert (state["primary"]["width"], state["primary"]["height"]) == SIZE
        assert state["primary"]["format"] == 32 and state["primary_creates"] == 1
        display = only_session(server).display
        assert has_cap(display.display.caps, DisplayCap.LZ4_COMPRESSION)  # the Debian build advertises it
        framebuffer = display.screen.framebuffer
        assert_shows(drv, framebuffer, "the first picture")
        rng = np.random.default_rng(11)
        w, h = SIZE
        updates = {
            "noise across tile edges": (slice(50, 130), slice(30, 161)),
            "a band of one colour": (slice(0, 20), slice(0, w)),
            "the bottom-right pixel": (slice(h - 1, h), slice(w - 1, w)),
            "the whole frame": (slice(0, h), slice(0, w)),
        }
        for what, (rows, cols) in updates.items():
            shape = framebuffer[rows, cols].shape
            if what == "a band of one colour":
                framebuffer[rows, cols] = bgrx((0x12, 0x34, 0x56))
            else:
                framebuffer[rows, cols] = rng.integers(0, 256, shape, dtype=np.uint8)
            assert_shows(drv, framebuffer, what)
        # one more, the same rectangle twice in a row: only what changed goes, and it lands
        framebuffer[100:110, 100:110] = bgrx((0xFF, 0, 0))
        framebuffer[100:110, 100:110] = bgrx((0, 0xFF, 0))
        assert_shows(drv, framebuffer, "the last change")
        status = display.status()
        sent, drawn = status["channels"]["display"]["bytes_out"], status["bytes_drawn"]
        if lz4:
            assert sent < drawn * 0.9, status  # one noise rectangle of 5: most of it compresses
        else:
            assert sent >= drawn, status  # raw bitmaps: every pixel byte on the wire
        final = drv.quit()["state"]
    assert final["primary_surface_creates"] == 1 and final["primary_destroys"] == 0, final
    assert final["warnings"] == [], final["warnings"]


@pytest.mark.parametrize("lz4", [False, True], ids=["raw", "lz4"])
@pytest.mark.parametrize("size, draws", [((512, 512), 1), ((512, 513), 2)], ids=["draw-piece", "draw-piece+row"])
def test_a_change_of_draw_piece_bytes_goes_whole_and_one_row_more_in_two_bands(tmp_path, bounded, monkeypatch,
                                                                               size, draws, lz4):
    """A whole 512-pixel-wide frame of noise: at 512 rows it is DRAW_PIECE pixel bytes exactly,
    one DRAW_COPY; one row more and it goes as two bands. spice-gtk shows either pixel for pixel,
    raw and as LZ4."""
    peers.require("spicegtk")
    assert size[0] * size[1] * 4 == display_module.DRAW_PIECE + (draws - 1) * size[0] * 4  # on the threshold
    cut: list[int] = []
    real_bands = display_module.bands

    def bands(rect):
        cut.append(len(real_bands(rect)))
        return real_bands(rect)

    monkeypatch.setattr(display_module, "bands", bands)
    with display_server(display_size=size, display_options=DisplayOptions(lz4=lz4)) as server, \
            DisplayDriver(server.address[1], tmp_path) as drv:
        drv.ready()
        framebuffer = screen_of(server).framebuffer
        assert_shows(drv, framebuffer, "the first picture")
        cut.clear()
        framebuffer[...] = np.random.default_rng(size[1]).integers(0, 256, framebuffer.shape, dtype=np.uint8)
        assert_shows(drv, framebuffer, "the whole frame changed")
        assert cut == [draws]
        final = drv.quit()["state"]
    assert final["primary_surface_creates"] == 1 and final["warnings"] == [], final


def test_keys_and_mouse_through_spicegtk_reach_the_screen(tmp_path, bounded):
    peers.require("spicegtk")
    with display_server() as server, DisplayDriver(server.address[1], tmp_path) as drv:
        drv.ready()
        screen = screen_of(server)
        drv.keys([KEY_2, KEY_UP])
        wait_until(lambda: screen.key_presses == 2, what="two key presses on the screen")
        assert screen.last_key == KEY_UP and not screen.keys_down  # E0 48: Up, pressed and released
        assert screen.colour == 1  # "2" picked the second colour
        stroke(drv, screen, [(40, 40), (120, 40), (200, 40)])
        wait_until(lambda: screen.strokes == 1 and tuple(screen.pointer) == (200, 40) and screen.buttons == 0,
                   what="the stroke to end at (200, 40)")
        red = bgrx(PALETTE[1])[:3]
        assert (screen.framebuffer[38:42, 40:200, :3] == red).all()  # a line, not two dots
        assert_shows(drv, screen.framebuffer, "the stroke")
        drv.keys([KEY_C])
        wait_until(lambda: not (screen.framebuffer[:, :, :3] == red).all(axis=2).any(), what="the canvas cleared")
        assert_shows(drv, screen.framebuffer, "the cleared canvas")
        assert drv.state()["cursor_set"] >= 1  # the brush cursor came through the cursor channel


def test_the_mouse_keeps_moving_after_1000_motion_events(tmp_path, bounded):
    peers.require("spicegtk")
    with display_server() as server, DisplayDriver(server.address[1], tmp_path) as drv:
        drv.ready()
        screen = screen_of(server)
        move_to(drv, screen, [(100, 100)])
        wait_until(lambda: tuple(screen.pointer) == (100, 100), what="the pointer at (100, 100)")
        before = screen.mouse_events
        # 1,000 relative motions: back and forth, then 50 diagonal steps, never near an edge
        drv.motion([(3, 0), (-3, 0)] * 475 + [(1, 1)] * 50, interval_ms=1)
        wait_until(lambda: tuple(screen.pointer) == (150, 150), what="the 1,000 motions to add up to (+50, +50)")
        # spice-gtk sends at most 2 * 4 motions without a MOUSE_MOTION_ACK (and adds the rest up
        # until one comes): more arrived, so the ACKs came
        assert screen.mouse_events - before > 2 * INPUT_MOTION_ACK_BUNCH, screen.mouse_events - before
        # and after them all, one more motion still goes out at once: the window is open
        drv.motion([(5, 0)])
        wait_until(lambda: tuple(screen.pointer) == (155, 150), what="one more motion")
        # and absolute positions after that still land, the last one exactly
        points = [(20 + k % 200, 30 + k // 10) for k in range(1000)]
        move_to(drv, screen, points)
        wait_until(lambda: tuple(screen.pointer) == points[-1], what=f"the pointer at {points[-1]}")
        state = drv.state()
        assert state["motions_sent"] + state["positions_sent"] >= 1000


# --- migrations ---------------------------------------------------------------------------------


class DisplayNode:
    """An in-process server named ``name`` with a screen (paint by default) and its control API."""

    def __init__(self, name: str, kind: str = "paint", size: tuple[int, int] = SIZE) -> None:
        self.spice = SpiceServer(ServerConfig(host="127.0.0.1", port=0, port_channels=[], display=kind,
                                              display_size=size, server_name=name))
        self.spice.start()
        self.control = ControlServer(self.spice, "127.0.0.1", 0, peer_token=PEER_TOKEN)
        self.control.start()
        self.api = ControlClient(*self.control.address, timeout=60)
        self.address = self.spice.address

    def migrate_to(self, other: DisplayNode, mode: str) -> dict:
        report = self.api.post_json("/migrate", {
            "to": "{}:{}".format(*other.address), "to_control": "{}:{}".format(*other.control.address),
            "mode": mode, "timeout": 10.0, "to_peer_token": PEER_TOKEN,
        })
        assert report["migrated"] == 1 and report["stayed"] == 0, report
        return report

    def stop(self) -> None:
        self.control.stop()
        self.spice.stop(timeout=2.0)


@pytest.fixture
def display_nodes():
    made: list[DisplayNode] = []
    yield lambda *names: made.extend(DisplayNode(n) for n in names) or made[-len(names):]
    for node in made:
        node.stop()


def test_seamless_migrations_keep_the_canvas_while_spicegtk_paints(tmp_path, bounded, display_nodes):
    peers.require("spicegtk")
    s1, s2 = display_nodes("s1", "s2")
    with DisplayDriver(s1.address[1], tmp_path) as drv:
        drv.ready()
        screen = screen_of(s1.spice)
        drv.keys([KEY_3])
        stroke(drv, screen, [(20, 20), (300, 20)])
        stroke(drv, screen, [(20, 50), (150, 90)])
        wait_until(lambda: screen.strokes == 2 and screen.buttons == 0, what="the first two strokes")
        assert_shows(drv, screen.framebuffer, "the canvas before the migrations")
        top = screen.framebuffer[:110].copy()  # what the user drew before: it must come through

        painting = gevent.event.Event()
        strokes, keys = [2], [1]

        def painter():
            # keep the screen changing through the migrations, below the first strokes
            k = 0
            while not painting.is_set():
                y = 130 + (k * 7) % 100
                current = screen_of(s1.spice if s1.spice.sessions else s2.spice)
                stroke(drv, current, [(10 + k % 50, y), (300 - k % 50, 240 - y // 2)])
                strokes[0] += 1
                drv.keys([KEY_2 + k % 7])
                keys[0] += 1
                k += 1

        worker = gevent.spawn(painter)
        try:
            wait_until(lambda: strokes[0] >= 4, what="the painter to start")
            s1.migrate_to(s2, "seamless")
            wait_until(lambda: not s1.spice.sessions, what="s1 to let go of the session")
            wait_until(lambda: strokes[0] >= 8, what="painting on s2")
            s2.migrate_to(s1, "seamless")
            wait_until(lambda: not s2.spice.sessions, what="s2 to let go of the session")
            painted = strokes[0]
            wait_until(lambda: strokes[0] >= painted + 2, what="painting on s1 again")
        finally:
            painting.set()
            worker.get(timeout=30)
        final = screen_of(s1.spice)
        wait_until(lambda: final.strokes == strokes[0] and final.buttons == 0 and final.key_presses == keys[0],
                   what=f"all {strokes[0]} strokes and {keys[0]} keys on the final screen")
        picture = assert_shows(drv, final.framebuffer, "the picture after s1 -> s2 -> s1")
        assert (final.framebuffer[:110] == top).all()  # the canvas is intact
        assert (picture[:110, :, :3] == top[:, :, :3]).all()
        state = drv.state()
    assert state["warnings"] == [], state["warnings"]  # spice-gtk refused nothing s2 or s1 sent
    assert state["migrations"] == 2, state["events"]
    assert state["primary_surface_creates"] == 1, state["events"]  # no second SURFACE_CREATE
    assert state["primary_creates"] == 1 and state["primary_destroys"] == 0
    assert set(state["peers"].values()) == {"{}:{}".format(*s1.address)}, state["peers"]


def test_semi_seamless_migration_shows_the_same_picture_after_the_reset(tmp_path, bounded, display_nodes):
    peers.require("spicegtk")
    s1, s2 = display_nodes("s1", "s2")
    with DisplayDriver(s1.address[1], tmp_path) as drv:
        drv.ready()
        screen = screen_of(s1.spice)
        drv.keys([KEY_3 + 2])
        stroke(drv, screen, [(30, 30), (290, 210)])
        stroke(drv, screen, [(30, 210), (290, 30)])
        wait_until(lambda: screen.strokes == 2 and screen.buttons == 0, what="two strokes")
        assert_shows(drv, screen.framebuffer, "the canvas before the migration")
        before = screen.framebuffer.copy()
        drawn = drv.state()["invalidated_pixels"]
        s1.migrate_to(s2, "semi-seamless")
        landed = screen_of(s2.spice)
        assert (landed.framebuffer == before).all()
        assert_shows(drv, landed.framebuffer, "the picture after the reset")
        state = drv.state()
        assert state["primary_surface_creates"] == 2, state["events"]  # s2 created the surface again
        assert state["warnings"] == [], state["warnings"]
        assert state["invalidated_pixels"] - drawn >= SIZE[0] * SIZE[1]  # and sent the whole picture
        # the session works on s2: a stroke there shows
        stroke(drv, landed, [(160, 10), (160, 230)])
        wait_until(lambda: landed.strokes == 3 and landed.buttons == 0, what="a stroke on s2")
        assert_shows(drv, landed.framebuffer, "a stroke on s2")


# --- bad input (raw client) --------------------------------------------------------------------


def linked_graphics(server: SpiceServer, **display_kw):
    main = MainSession(server.address)
    main.attach_channels()
    display = RawChannel.link(server.address, main.session_id, ChannelType.DISPLAY, 0, **display_kw)
    inputs = RawChannel.link(server.address, main.session_id, ChannelType.INPUTS, 0)
    return main, display, inputs


@pytest.mark.parametrize("client", ["reads-but-never-acks", "stops-reading"])
def test_a_flood_of_draws_to_a_client_that_never_acks_stays_bounded(bounded, client):
    size = (640, 480)
    frame = size[0] * size[1] * 4
    with display_server(display_size=size, display_options=DisplayOptions(lz4=False)) as server:
        main, display, inputs = linked_graphics(server, auto_ack=False, bufsize=64 << 10)
        state = only_session(server).display
        wait_until(lambda: state.display is not None and state.display.live, what="the display channel")
        reader = gevent.spawn(lambda: display.wait_closed(timeout=60)) if client == "reads-but-never-acks" else None
        rng = np.random.default_rng(5)
        pending = []
        for _ in range(100):
            state.screen.framebuffer[...] = rng.integers(0, 256, state.screen.framebuffer.shape, dtype=np.uint8)
            gevent.sleep(state.options.frame_interval)
            pending.append(state.display.transport.pending_write)
        draws = sum(isinstance(msg, m.MsgDisplayDrawCopy) for msg in display.inbox)
        # the frames coalesced: no more went than the window allows (each has a DRAW_COPY at
        # least), and what waits for the socket stays small
        assert state.frames <= 2 * state.options.ack_window, state.frames
        assert max(pending) <= PENDING_LIMIT + frame + (64 << 10), max(pending)
        if client == "reads-but-never-acks":
            # spice-server's rule: at most twice the window unacknowledged, plus the rest of the
            # frame that crossed it (a 1.2 MB frame goes as two DRAW_COPYs)
            assert draws <= 2 * state.options.ack_window + 2, draws
        # the session and its other channels are fine
        inputs.send(m.MsgcInputsKeyDown(code=KEY_2))
        wait_until(lambda: state.screen.key_presses == 1, what="a key on the flooded session")
        if reader is not None:
            reader.kill()
        for channel in (display, inputs, main.main):
            channel.close()


NONSENSE = {
    "unknown type": (0x7777, b"not a message of this channel"),
    "short body": (None, b"\x01"),  # the channel's first real message type, one byte of its body
}


@pytest.mark.parametrize("nonsense", NONSENSE)
@pytest.mark.parametrize("victim", ["inputs", "display"])
def test_nonsense_on_one_graphics_channel_ends_only_that_channel(bounded, victim, nonsense):
    with display_server() as server:
        main, display, inputs = linked_graphics(server)
        state = only_session(server).display
        wait_until(lambda: state.display is not None and state.inputs is not None, what="both channels")
        bad, good = (inputs, display) if victim == "inputs" else (display, inputs)
        msg_type, body = NONSENSE[nonsense]
        if msg_type is None:
            msg_type = MsgcInputs.KEY_DOWN if victim == "inputs" else MsgcDisplay.INIT
        bad.send_raw(msg_type, body)
        bad.wait_closed()
        wait_until(lambda: getattr(state, victim) is None, what=f"the server to drop its {victim} connection")
        # the other channel and the session go on
        if victim == "inputs":
            display.expect(m.MsgDisplayMark)
            state.screen.framebuffer[:8, :8] = bgrx((1, 2, 3))
            display.expect(m.MsgDisplayDrawCopy)
        else:
            inputs.send(m.MsgcInputsKeyDown(code=KEY_2))
            wait_until(lambda: state.screen.key_presses == 1, what="a key after the display went")
        assert not good.eof and not main.main.eof
        assert only_session(server).display is state
        for channel in (display, inputs, main.main):
            channel.close()


# --- `spicewire serve --display`, as a user runs it ---------------------------------------------


def screen_png(served, session_id: str) -> np.ndarray:
    """GET /sessions/<id>/screen.png as an (h, w, 3) RGB array."""
    import io
    import urllib.request

    from PIL import Image

    request = urllib.request.Request("http://{}:{}/sessions/{}/screen.png".format(*served.control, session_id),
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"] == "image/png"
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def assert_shows_served(drv: DisplayDriver, served, session_id: str, what: str, timeout: float = 15.0) -> None:
    """spice-gtk's primary equals the served screen (its screen.png), within ``timeout``."""
    deadline = gevent.get_hub().loop.now() + timeout
    while True:
        picture, expected = drv.picture()[:, :, 2::-1], screen_png(served, session_id)
        if picture.shape == expected.shape and (picture == expected).all():
            return
        if gevent.get_hub().loop.now() > deadline:
            pytest.fail(f"{what}: spice-gtk shows {picture.shape} with "
                        f"{(picture != expected).any(axis=2).sum() if picture.shape == expected.shape else '?'} "
                        f"pixels off the server's screen.png")
        gevent.sleep(0.1)


def screen_status(served) -> dict:
    (session,) = served.get("/sessions")["sessions"]
    return session["display"]["screen"]


def migrate_served(src, dst, mode: str) -> None:
    body = {"to": f"127.0.0.1:{dst.address[1]}", "to_control": f"127.0.0.1:{dst.control[1]}",
            "mode": mode, "timeout": 10, "to_token": TOKEN}
    report = src.request("POST", "/migrate", body, timeout=40)
    assert report["migrated"] == 1, report


def test_spicewire_serve_display_through_seamless_and_semi_seamless_migrations(serve, tmp_path, bounded):
    peers.require("spicegtk")
    args = ("--disable-ticketing", "--display", "paint:{}x{}".format(*SIZE))
    s1, s2 = serve(*args), serve(*args)
    with DisplayDriver(s1.address[1], tmp_path) as drv:
        state = drv.ready()
        assert state["mouse_mode"] == MOUSE_MODE_CLIENT  # serve offers client mode; strokes are positions
        (session,) = s1.get("/sessions")["sessions"]
        sid = session["session_id"]
        drv.keys([KEY_3])
        stroke(drv, None, [(20, 20), (300, 200)])
        wait_until(lambda: screen_status(s1)["strokes"] == 1, what="the stroke on s1")
        assert_shows_served(drv, s1, sid, "the stroke on s1")
        migrate_served(s1, s2, "seamless")
        assert_shows_served(drv, s2, sid, "after the seamless migration")
        stroke(drv, None, [(20, 200), (300, 20)])  # inputs on s2
        wait_until(lambda: screen_status(s2)["strokes"] == 2, what="the stroke on s2")
        assert_shows_served(drv, s2, sid, "the stroke on s2")
        wait_until(lambda: not s1.get("/sessions")["sessions"], what="s1 to let go of the session")
        migrate_served(s2, s1, "semi-seamless")
        assert_shows_served(drv, s1, sid, "after the semi-seamless migration")
        assert screen_status(s1)["strokes"] == 2 and screen_status(s1)["colour"] == 3
        state = drv.state()
    assert state["primary_creates"] == 1 and state["primary_surface_creates"] == 2, state["events"]
    assert state["warnings"] == [], state["warnings"]
