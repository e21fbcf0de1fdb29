"""The client's display, inputs and cursor channels (CHANNELS.md 1.2-1.4): against in-process servers
with a ``paint`` screen, through seamless and semi-seamless migrations; against a scripted server
where the client's own pacing of mouse motion is the subject; through the threaded and asyncio
clients against ``spicewire serve --display``."""

from __future__ import annotations

import asyncio

import gevent
import gevent.event
import gevent.queue
import numpy as np
import pytest

from spicewire import aio
from spicewire.client import ClientSession, connect
from spicewire.client.graphics import HAS_LZ4, MAX_QUEUED_INPUTS, MOTION_WINDOW, key_code
from spicewire.control.client import ControlClient
from spicewire.control.server import ControlServer
from spicewire.errors import PeerStalled, RemoteProtocolError
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType, ImageType, MouseButton, SurfaceFlags, SurfaceFormat
from spicewire.protocol.graphics import Rect, encode_cursor, encode_draw_copy
from spicewire.screens import PALETTE, bgrx
from spicewire.server.display import DisplayOptions
from spicewire.server.net import ServerConfig, SpiceServer

from .served import TOKEN
from .serverkit import running_server, wait_until
from .test_client_migration import SESSION_ID, FakeServer, main_listing
from .test_migration import PEER_TOKEN, Node

W, H = 320, 200
KEY_3 = 0x04  # "3" in PC XT set 1: the paint screen's third colour
BOUND = 20.0  # every wait here ends by then
LEFT = MouseButton.LEFT


@pytest.fixture(autouse=True)
def deadline(request):
    with gevent.Timeout(45, AssertionError(f"{request.node.name} took longer than 45 s")):
        yield


def screen_of(server: SpiceServer):
    """The screen of the one session ``server`` holds."""
    (session,) = server.sessions.values()
    assert session.display is not None
    return session.display.screen


def shows(session: ClientSession, server: SpiceServer) -> bool:
    """Whether the client's primary comes to equal the server's framebuffer, pixel for pixel."""
    assert session.display is not None
    return session.display.wait(
        lambda d: d.primary is not None and np.array_equal(d.primary, screen_of(server).framebuffer), BOUND
    )


def stroke(session: ClientSession, start: tuple[int, int], end: tuple[int, int]) -> None:
    inputs = session.inputs
    assert inputs is not None
    inputs.mouse_position(*start)
    inputs.mouse_press(LEFT)
    inputs.mouse_position(*end)
    inputs.mouse_release(LEFT)


class DisplayNode(Node):
    """An in-process server whose sessions show a ``paint`` screen, with its control API."""

    def __init__(self) -> None:
        self.spice = SpiceServer(ServerConfig(host="127.0.0.1", port=0, display="paint", display_size=(W, H)))
        self.spice.start()
        self.control = ControlServer(self.spice, "127.0.0.1", 0, peer_token=PEER_TOKEN)
        self.control.start()
        self.api = ControlClient(*self.control.address, token=PEER_TOKEN, timeout=60)
        self.address = self.spice.address
        self.control_address = self.control.address


@pytest.fixture
def two_nodes():
    made = [DisplayNode(), DisplayNode()]
    yield made
    for node in made:
        node.stop()


def migrate(src: Node, dst: Node, session: ClientSession, mode: str) -> None:
    report = src.migrate_to(dst, mode=mode)
    assert report["migrated"] == 1, report
    done = session.wait_migrated(BOUND)
    assert done is not None and done["result"] == "completed" and done["mode"] == mode, session.migrations
    if mode == "seamless":  # the inputs carry MIGRATE_DATA; the display's record went s1 -> s2 directly
        assert "inputs:0" in done["relayed"] and not {"display:0", "cursor:0"} & set(done["relayed"]), done


# --- the picture -----------------------------------------------------------------------------


@pytest.mark.parametrize("lz4", [False, True], ids=["raw", "lz4"])
def test_the_primary_equals_the_framebuffer_after_updates(lz4):
    if lz4 and not HAS_LZ4:
        pytest.skip("the lz4 package is not installed")
    with running_server(display="paint", display_size=(W, H), display_options=DisplayOptions(lz4=lz4)) as server, \
            ClientSession(*server.address, display=True) as session:
        display = session.display
        assert display is not None
        assert shows(session, server)
        assert display.primary.shape == (H, W, 4) and display.marked
        screen = screen_of(server)
        for k, colour in enumerate(PALETTE):  # the server's screen changes; each change reaches the client
            screen.framebuffer[10 * k : 10 * k + 25, 7 * k : 7 * k + 90] = bgrx(colour)
            assert shows(session, server)
        assert display.surface_creates == 1
        assert set(display.images) == {ImageType.LZ4 if lz4 else ImageType.BITMAP}


def test_without_display_no_graphics_channel_is_linked():
    with running_server(display="paint", display_size=(W, H)) as server, \
            ClientSession(*server.address) as session:
        assert (ChannelType.DISPLAY, 0) in session.channels
        assert session.display is None and session.inputs is None and session.cursor is None
        (state,) = server.sessions.values()
        assert state.display is not None and state.display.display is None


@pytest.mark.parametrize("nonsense", [
    m.MsgDisplayDrawCopy(b"\x00" * 10),  # truncated
    m.MsgDisplaySurfaceCreate(0, 1 << 20, 1 << 20, SurfaceFormat.XRGB32, SurfaceFlags.PRIMARY),  # 4 TiB
    m.MsgDisplaySurfaceCreate(0, W, H, SurfaceFormat.RGB16_565, SurfaceFlags.PRIMARY),
    m.MsgDisplaySurfaceDestroy(7),
], ids=["short-draw", "huge-surface", "16-bit-surface", "destroy-unknown"])
def test_nonsense_on_the_display_ends_that_channel_only(nonsense):
    main = main_listing(ChannelType.DISPLAY)

    def display(server, conn):
        conn.send(nonsense)
        for _ in conn.messages():
            pass

    fake = FakeServer({ChannelType.MAIN: main, ChannelType.DISPLAY: display})
    try:
        with ClientSession("127.0.0.1", fake.port, display=True) as session:
            display_channel = session.display
            assert display_channel is not None
            assert display_channel.closed.wait(BOUND)
            assert isinstance(display_channel.error, RemoteProtocolError), display_channel.error
            assert display_channel.primary is None
            assert not session.main.closed.is_set()
    finally:
        fake.stop()


def test_reset_clears_the_primary_and_waits_for_the_next_mark():
    """spice-gtk's display_handle_reset: the surfaces stay, the primary is cleared, MARK comes again."""
    reset, mark = gevent.event.Event(), gevent.event.Event()
    red = np.empty((H, W, 4), np.uint8)
    red[...] = bgrx(PALETTE[1])

    main = main_listing(ChannelType.DISPLAY)

    def display(server, conn):
        conn.send(m.MsgDisplaySurfaceCreate(0, W, H, SurfaceFormat.XRGB32, SurfaceFlags.PRIMARY))
        conn.send(m.MsgDisplayMark())
        conn.send(m.MsgDisplayDrawCopy(encode_draw_copy(0, Rect(0, 0, H, W), red)))
        reset.wait()
        conn.send(m.MsgDisplayReset())
        conn.send(m.MsgDisplayDrawCopy(encode_draw_copy(0, Rect(10, 20, 30, 60), red[:20, :40])))
        mark.wait()
        conn.send(m.MsgDisplayMark())
        for _ in conn.messages():
            pass

    fake = FakeServer({ChannelType.MAIN: main, ChannelType.DISPLAY: display})
    try:
        with ClientSession("127.0.0.1", fake.port, display=True) as session:
            d = session.display
            assert d is not None
            assert d.wait(lambda d: d.updates == 1 and d.marked, BOUND)
            reset.set()
            assert d.wait(lambda d: d.updates == 2, BOUND)
            expected = np.zeros((H, W, 4), np.uint8)
            expected[10:30, 20:60] = bgrx(PALETTE[1])
            assert np.array_equal(d.primary, expected) and not d.marked and d.resets == 1
            mark.set()
            assert d.wait(lambda d: d.marked, BOUND)
            assert d.surface_creates == 1
    finally:
        fake.stop()
    fake.check()


# --- inputs ----------------------------------------------------------------------------------


def test_keys_and_mouse_paint_the_screen_and_the_cursor_follows():
    with running_server(display="paint", display_size=(W, H)) as server, \
            ClientSession(*server.address, display=True) as session:
        display, inputs, cursor = session.display, session.inputs, session.cursor
        assert display is not None and inputs is not None and cursor is not None
        assert inputs.wait(lambda i: i.initialised.is_set(), BOUND)
        inputs.key_press(KEY_3)
        stroke(session, (50, 60), (150, 60))
        colour = bgrx(PALETTE[2])
        assert display.wait(lambda d: d.primary is not None and (d.primary[60, 50:150] == colour).all(), BOUND)
        assert shows(session, server)
        screen = screen_of(server)
        assert (screen.colour, screen.strokes, screen.pointer) == (2, 1, (150, 60))
        # The brush cursor takes the new colour: CURSOR_SET with the screen's shape.
        brush = screen.cursor.pixels
        assert cursor.wait(lambda c: c.shape is not None and np.array_equal(c.shape.pixels, brush), BOUND)
        assert cursor.visible


def test_a_thousand_motion_events_keep_the_mouse_moving():
    with running_server(display="paint", display_size=(W, H)) as server, \
            ClientSession(*server.address, display=True) as session:
        inputs = session.inputs
        assert inputs is not None
        screen = screen_of(server)
        x, y = screen.pointer
        for i in range(1000):  # x swings by one pixel, y goes down by 40 in all
            inputs.mouse_motion(1 if i % 2 == 0 else -1, 1 if i % 25 == 0 else 0)
            assert inputs.motion_count <= MOTION_WINDOW
            gevent.sleep(0)
        wait_until(lambda: screen.pointer == (x, y + 40), BOUND, what="the pointer after 1,000 motions")
        assert inputs.sent_motion > MOTION_WINDOW and inputs.motion_acks > 0
        inputs.mouse_motion(5, 0)
        wait_until(lambda: screen.pointer == (x + 5, y + 40), BOUND, what="the pointer after one more motion")


@pytest.fixture
def inputs_only():
    """(session, what its inputs channel sent, the fake server) against a server that lists only an
    inputs channel and acknowledges no motion unless the test does."""
    received = gevent.queue.Queue()

    main = main_listing(ChannelType.INPUTS)

    def inputs(server, conn):
        conn.send(m.MsgInputsInit(0))
        for msg in conn.messages():
            received.put(msg)

    fake = FakeServer({ChannelType.MAIN: main, ChannelType.INPUTS: inputs})
    try:
        with ClientSession("127.0.0.1", fake.port, display=True) as session:
            assert session.inputs is not None and session.display is None
            yield session, received, fake
    finally:
        fake.stop()
    fake.check()


def test_motion_beyond_the_window_waits_for_an_ack_merged_and_in_order(inputs_only):
    session, received, fake = inputs_only
    channel = session.inputs
    for _ in range(MOTION_WINDOW + 12):
        channel.mouse_motion(1, 2)
    channel.key_press(0x1E)
    channel.mouse_motion(3, 0)
    sent = [received.get(timeout=BOUND) for _ in range(MOTION_WINDOW)]
    assert sent == [m.MsgcInputsMouseMotion(1, 2, 0)] * MOTION_WINDOW
    assert (channel.motion_count, channel.queued) == (MOTION_WINDOW, 4)  # merged motion, key down/up, motion
    fake.conns[(ChannelType.INPUTS, 0)].send(m.MsgInputsMouseMotionAck())
    rest = [received.get(timeout=BOUND) for _ in range(4)]
    assert rest == [
        m.MsgcInputsMouseMotion(12, 24, 0), m.MsgcInputsKeyDown(0x1E), m.MsgcInputsKeyUp(0x9E),
        m.MsgcInputsMouseMotion(3, 0, 0),
    ]
    assert channel.queued == 0


def test_a_server_that_never_acknowledges_motion_gets_a_bounded_queue(inputs_only):
    session, _, _ = inputs_only
    channel = session.inputs
    for _ in range(MOTION_WINDOW + 1):
        channel.mouse_motion(1, 0)
    for _ in range(MAX_QUEUED_INPUTS - 1):  # keys queue behind the waiting motion
        channel.key_down(0x1E)
    assert channel.queued == MAX_QUEUED_INPUTS
    for one_more in (lambda: channel.key_down(0x1E), lambda: channel.mouse_motion(1, 0)):
        with pytest.raises(PeerStalled):
            one_more()
    assert channel.queued == MAX_QUEUED_INPUTS


def test_key_codes_are_spice_gtks():
    assert key_code(0x1E, release=False) == 0x1E and key_code(0x1E, release=True) == 0x9E
    assert key_code(0x148, release=False) == 0x48E0 and key_code(0x148, release=True) == 0xC8E0  # Up: E0 48
    for bad in (0, 0x80, 0x100, 0x200):
        with pytest.raises(ValueError):
            key_code(bad, release=False)


# --- migration -------------------------------------------------------------------------------


def test_seamless_there_and_back_keeps_the_primary_while_the_screen_changes(two_nodes):
    s1, s2 = two_nodes
    with ClientSession(*s1.address, display=True) as session:
        display, inputs = session.display, session.inputs
        assert display is not None and inputs is not None
        assert shows(session, s1.spice)
        primary = display.primary
        inputs.key_press(KEY_3)
        inputs.mouse_position(20, 20)
        inputs.mouse_press(LEFT)
        moved = [0, 0]
        painting = True

        def paint() -> None:
            """A square path of side 40 from (20, 20), over and over, while the session migrates."""
            step = 0
            while painting:
                dx, dy = ((4, 0), (0, 4), (-4, 0), (0, -4))[step // 10 % 4]
                inputs.mouse_motion(dx, dy)
                moved[0] += dx
                moved[1] += dy
                step += 1
                gevent.sleep(0.002)

        painter = gevent.spawn(paint)
        migrate(s1, s2, session, "seamless")
        migrate(s2, s1, session, "seamless")
        painting = False
        painter.join(BOUND)
        inputs.mouse_release(LEFT)
        screen = screen_of(s1.spice)
        wait_until(lambda: screen.pointer == (20 + moved[0], 20 + moved[1]), BOUND, what="every motion applied")
        assert shows(session, s1.spice)
        assert (screen.framebuffer == bgrx(PALETTE[2])).all(axis=2).any()  # the canvas came back painted
        assert display.surface_creates == 1 and display.resets == 0
        assert display.primary is primary  # drawn into in place all along


def test_semi_seamless_shows_the_same_picture_after_the_reset(two_nodes):
    s1, s2 = two_nodes
    with ClientSession(*s1.address, display=True) as session:
        display, inputs, cursor = session.display, session.inputs, session.cursor
        assert display is not None and inputs is not None and cursor is not None
        inputs.key_press(KEY_3)
        stroke(session, (30, 40), (200, 120))
        wait_until(lambda: screen_of(s1.spice).strokes == 1, BOUND, what="the stroke on s1")
        assert shows(session, s1.spice)
        picture, memory = screen_of(s1.spice).framebuffer.copy(), display.primary
        migrate(s1, s2, session, "semi-seamless")
        assert shows(session, s2.spice)
        assert np.array_equal(display.primary, picture)
        assert display.surface_creates == 2 and display.resets == 1
        assert np.shares_memory(display.primary, memory)  # the reset kept the primary's memory
        assert cursor.wait(lambda c: c.initialised.is_set() and c.shape is not None, BOUND)
        # Inputs go to s2 now.
        stroke(session, (10, 150), (100, 150))
        wait_until(lambda: screen_of(s2.spice).strokes == 2, BOUND, what="the stroke on s2")
        assert shows(session, s2.spice)


def _fake_graphics_server(session_id: int, colour: tuple[int, int, int]) -> FakeServer:
    """A scripted server whose display shows one colour and whose inputs and cursor say hello."""
    pixels = np.empty((H, W, 4), np.uint8)
    pixels[...] = bgrx(colour)
    main = main_listing(ChannelType.DISPLAY, ChannelType.INPUTS, ChannelType.CURSOR, session_id=session_id)

    def display(server, conn):
        conn.send(m.MsgDisplaySurfaceCreate(0, W, H, SurfaceFormat.XRGB32, SurfaceFlags.PRIMARY))
        conn.send(m.MsgDisplayMark())
        conn.send(m.MsgDisplayDrawCopy(encode_draw_copy(0, Rect(0, 0, H, W), pixels)))
        for msg in conn.messages():
            server.events.put(("display", type(msg).__name__))

    def inputs(server, conn):
        conn.send(m.MsgInputsInit(0))
        for msg in conn.messages():
            server.events.put(("inputs", type(msg).__name__))

    def cursor(server, conn):
        conn.send(m.MsgCursorInit(1, 2, 0, 0, 1, encode_cursor(None)))
        for _ in conn.messages():
            pass

    return FakeServer({ChannelType.MAIN: main, ChannelType.DISPLAY: display, ChannelType.INPUTS: inputs,
                       ChannelType.CURSOR: cursor})


def test_switch_host_links_display_inputs_and_cursor_again_on_the_new_host():
    s1, s2 = _fake_graphics_server(SESSION_ID, PALETTE[1]), _fake_graphics_server(0x2222, PALETTE[3])
    try:
        with ClientSession("127.0.0.1", s1.port, display=True) as session:
            display, inputs = session.display, session.inputs
            assert display is not None and inputs is not None
            assert display.wait(lambda d: d.updates == 1 and (d.primary == bgrx(PALETTE[1])).all(), BOUND)
            memory = display.primary
            s1.conns[ChannelType.MAIN, 0].send(m.MsgMainMigrateSwitchHost(m.MigrationDstInfo(s2.port, 0, "127.0.0.1")))
            report = session.wait_migrated(BOUND)
            assert report is not None, session.migrations
            assert (report["mode"], report["result"]) == ("switch-host", "completed"), report
            assert session.session_id == 0x2222
            assert display.wait(lambda d: d.updates == 2 and (d.primary == bgrx(PALETTE[3])).all(), BOUND)
            assert display.surface_creates == 2 and np.shares_memory(display.primary, memory)
            inputs.key_press(0x1E)
            seen = [s2.events.get(timeout=BOUND) for _ in range(3)]
            assert ("display", "MsgcDisplayInit") in seen and ("inputs", "MsgcInputsKeyUp") in seen
    finally:
        s1.stop()
        s2.stop()
    s1.check()
    s2.check()


# --- threads and asyncio ---------------------------------------------------------------------


def test_the_threaded_client_shows_the_screen_and_sends_inputs_through_a_migration(serve):
    s1, s2 = (serve("--disable-ticketing", "--display", f"paint:{W}x{H}") for _ in range(2))
    with connect(*s1.address, display=True) as session:
        display, inputs, cursor = session.display, session.inputs, session.cursor
        assert display is not None and inputs is not None and cursor is not None
        assert display.wait(lambda d: d.marked and d.updates > 0, BOUND)

        def stroke_in(key: int, y: int) -> None:
            inputs.key_press(key)
            inputs.mouse_position(50, y)
            inputs.mouse_press(LEFT)
            inputs.mouse_position(150, y)
            inputs.mouse_release(LEFT)

        def painted(y: int, colour: np.ndarray) -> bool:
            return display.wait(lambda d: (p := d.primary) is not None and (p[y, 50:150] == colour).all(), BOUND)

        third, fifth = bgrx(PALETTE[2]), bgrx(PALETTE[4])
        stroke_in(KEY_3, 60)
        assert painted(60, third)
        frame = display.primary
        assert frame is not None
        frame[...] = 0  # a copy: the session's picture is untouched
        assert (display.primary[60, 50:150] == third).all()
        assert cursor.wait(lambda c: c.visible and c.shape is not None, BOUND)
        report = s1.request("POST", "/migrate", {
            "to": "{}:{}".format(*s2.address), "to_control": "{}:{}".format(*s2.control),
            "mode": "seamless", "timeout": 10, "to_token": TOKEN,
        }, timeout=BOUND)
        assert report["migrated"] == 1, report
        wait_until(lambda: session.migrations, BOUND, what="the client's migration report")
        assert session.migrations[-1]["result"] == "completed", session.migrations
        stroke_in(0x06, 120)  # "5": the fifth colour, drawn on s2
        assert painted(120, fifth) and painted(60, third)
        assert display.surface_creates == 1


def test_the_asyncio_client_shows_the_screen_and_sends_inputs(serve):
    server = serve("--disable-ticketing", "--display", f"paint:{W}x{H}")
    colour = bgrx(PALETTE[2])

    async def painted(d: aio.AsyncDisplay) -> bool:
        p = await d.primary()
        return p is not None and bool((p[60, 50:150] == colour).all())

    async def main() -> None:
        async with aio.connect(*server.address, display=True) as session:
            display, inputs = session.display, session.inputs
            assert display is not None and inputs is not None
            assert await display.wait(lambda d: d.marked, BOUND)
            await inputs.key_press(KEY_3)
            await inputs.mouse_position(50, 60)
            await inputs.mouse_press(LEFT)
            await inputs.mouse_position(150, 60)
            await inputs.mouse_release(LEFT)
            assert await display.wait(painted, BOUND)
            assert not await display.wait_for_update(0.01, after=display.updates + 10**6)

    asyncio.run(asyncio.wait_for(main(), 2 * BOUND))

