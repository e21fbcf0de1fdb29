"""What a migration does with a session's screen, on the servers' side: the picture is pre-copied to
s2 while the screen keeps changing, only what changed after travels at the stop, the screen runs on
s2 (and says so), the inputs a stopped screen held are applied there, and a failed pre-copy leaves
the session on s1 with its display running."""

from __future__ import annotations

import gevent
import numpy as np
import pytest

from spicewire import screens
from spicewire.client import ClientSession
from spicewire.control.client import ControlClient
from spicewire.control.server import ControlServer
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType, MigrateFlags
from spicewire.server.display import DisplayState
from spicewire.server.migration.precopy import PIECE
from spicewire.server.net import ServerConfig, SpiceServer

from .serverkit import wait_until
from .test_migration import PEER_TOKEN, Node

W, H = 256, 192
BOUND = 20.0


@screens.register("test-scribble")
class ScribbleScreen(screens.Screen):
    """Paints a random tile every tick until it is migrated (restored from a saved state): what it
    shows on s2 is exactly what s1 had at the stop."""

    kind = "test-scribble"
    wants_ticks = True

    def __init__(self, width: int | None = None, height: int | None = None) -> None:
        super().__init__(width, height)
        self.servers: list[str] = []
        self.rng = np.random.default_rng()
        self.scribbles = 0

    def attach(self, context: screens.ScreenContext) -> None:
        super().attach(context)
        self.servers.append(context.server_name)

    def state(self) -> dict:
        return {**super().state(), "servers": self.servers}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.servers = [*state["servers"], *self.servers]

    def tick(self, now: float) -> None:
        if len(self.servers) == 1:
            y, x = self.rng.integers(0, self.height - 8), self.rng.integers(0, self.width - 8)
            self.framebuffer[y:y + 8, x:x + 8, :3] = self.rng.integers(0, 256, 3, dtype=np.uint8)
            self.scribbles += 1


class DisplayNode(Node):
    def __init__(self, name: str, screen: str = "test-scribble", size: tuple[int, int] = (W, H)) -> None:
        self.spice = SpiceServer(ServerConfig(host="127.0.0.1", port=0, display=screen, display_size=size,
                                              server_name=name))
        self.spice.start()
        self.control = ControlServer(self.spice, "127.0.0.1", 0, peer_token=PEER_TOKEN)
        self.control.start()
        self.api = ControlClient(*self.control.address, token=PEER_TOKEN, timeout=60)
        self.address = self.spice.address
        self.control_address = self.control.address

    def display(self) -> DisplayState:
        (session,) = self.spice.sessions.values()
        assert session.display is not None
        return session.display


@pytest.fixture
def made():
    nodes: list[DisplayNode] = []
    yield nodes
    for node in nodes:
        node.stop()


@pytest.mark.parametrize("mode", ["seamless", "semi-seamless"])
def test_a_screen_that_keeps_changing_arrives_whole_and_runs_on_s2(made, mode):
    s1, s2 = DisplayNode("s1"), DisplayNode("s2")
    made += [s1, s2]
    with ClientSession(*s1.address, display=True) as session:
        assert session.display is not None
        wait_until(lambda: s1.display().screen.scribbles > 20, BOUND, what="the screen to scribble")
        screen_on_s1 = s1.display().screen
        report = s1.migrate_to(s2, mode=mode)
        assert report["migrated"] == 1, report
        assert session.wait_migrated(BOUND) is not None
        on_s2 = s2.display()
        assert on_s2.screen.servers == ["s1", "s2"]  # its own state came along, and it knows where it runs now
        # s1's screen stopped with the devices; s2's is a copy of that picture, to the pixel.
        assert np.array_equal(on_s2.screen.framebuffer, screen_on_s1.framebuffer)
        assert session.display.wait(lambda d: d.primary is not None
                                    and np.array_equal(d.primary, on_s2.screen.framebuffer), BOUND)
        expected_creates = 1 if mode == "seamless" else 2
        assert session.display.surface_creates == expected_creates


@pytest.mark.parametrize("height", [511, 512, 513], ids=["under", "at", "over"])
def test_a_surface_on_either_side_of_a_send_piece_is_pre_copied_whole(made, height):
    """The pre-copy sends each surface as views of at most precopy.PIECE (1 MiB, 512x512 pixels):
    one a row under, exactly one, and one a row over, through a real s2, arrive to the pixel."""
    assert PIECE == 512 * 512 * 4
    s1, s2 = DisplayNode("s1", size=(512, height)), DisplayNode("s2", size=(512, height))
    made += [s1, s2]
    with ClientSession(*s1.address, display=True) as session:
        wait_until(lambda: s1.display().screen.scribbles > 5, BOUND, what="the screen to scribble")
        screen_on_s1 = s1.display().screen
        assert s1.migrate_to(s2)["migrated"] == 1
        assert session.wait_migrated(BOUND) is not None
        assert np.array_equal(s2.display().screen.framebuffer, screen_on_s1.framebuffer)


def test_the_clock_shows_the_server_it_runs_on(made):
    s1, s2 = DisplayNode("first-server", "clock"), DisplayNode("second-server", "clock")
    made += [s1, s2]
    with ClientSession(*s1.address, display=True) as session:
        assert s1.display().screen.status()["server_name"] == "first-server"
        assert s1.migrate_to(s2)["migrated"] == 1
        assert session.wait_migrated(BOUND) is not None
        assert s2.display().screen.status()["server_name"] == "second-server"
        # The clock redrew its name line on s2, and the client sees s2's picture.
        assert session.display.wait(lambda d: d.primary is not None
                                    and np.array_equal(d.primary[:40], s2.display().screen.framebuffer[:40]), BOUND)


def test_a_failed_pre_copy_leaves_the_session_on_s1_with_its_display_running(made, monkeypatch):
    s1, s2 = DisplayNode("s1"), DisplayNode("s2")
    made += [s1, s2]

    def refuse(migration_id, body):
        raise ValueError("this destination refuses pre-copies")

    monkeypatch.setattr(s2.spice.migration, "receive_display_precopy", refuse)
    with ClientSession(*s1.address, display=True) as session:
        report = s1.migrate_to(s2)
        assert report["migrated"] == 0 and report["stayed"] == 1, report
        assert "pre-copy" in report["sessions"][0]["error"]
        state = s1.display()
        assert not state.stopped and not state.frozen
        scribbles = state.screen.scribbles
        wait_until(lambda: state.screen.scribbles > scribbles + 5, BOUND, what="the screen to run again")
        assert session.display.wait(lambda d: d.primary is not None
                                    and np.array_equal(d.primary[:, :, :3], state.damage.shadow[:, :, :3]), BOUND)
        assert not s2.spice.sessions


def test_inputs_held_while_the_screen_is_stopped_reach_it_once_it_runs():
    state = DisplayState(screens.factory("paint", 64, 64)())
    state.stop()
    state.input(m.MsgcInputsMousePosition(x=10, y=10, buttons=0, display_id=0))
    state.input(m.MsgcInputsMousePress(button=1, buttons=1))
    assert len(state.held) == 2 and state.screen.framebuffer[10, 10, :3].all()  # still the white canvas
    state.resume()
    assert not state.held
    assert not state.screen.framebuffer[10, 10, :3].any()  # painted black, in the order they came


def older_destination(node: DisplayNode) -> None:
    """``node`` as a spicewire without DISPLAY_STATE_VERSION: it neither takes nor answers the offer."""
    manager = node.spice.migration
    announce, features = manager.announce, manager.features
    manager.announce = lambda *a, offered_display=None, **k: announce(*a, **k)  # type: ignore[method-assign]
    manager.features = lambda *a, offered_display=None, **k: features(*a, **k)  # type: ignore[method-assign]


@pytest.mark.parametrize("direct", [True, False], ids=["display-state-v1", "older-s2"])
def test_every_display_channel_migrates_with_its_flags(made, direct):
    """spice-server's flags, but for the display: with an s2 that takes the display's record in the
    device state (DISPLAY_STATE_VERSION) its MIGRATE has no flags and nothing is relayed for it;
    with an older s2 its MIGRATE_DATA follows the MIGRATE without a FLUSH_MARK
    (display.DISPLAY_MIGRATE_FLAGS). The picture and the client's surface survive both."""
    from spicewire.protocol.migration.rules import default_migrate_flags

    s1, s2 = DisplayNode("s1", "paint"), DisplayNode("s2", "paint")
    made += [s1, s2]
    if not direct:
        older_destination(s2)
    seen: dict[int, int] = {}
    with ClientSession(*s1.address, display=True) as session:
        wait_until(lambda: s1.display().cursor is not None and s1.display().inputs is not None, BOUND,
                   what="all three display channels")
        display = session.display
        assert display is not None
        state = s1.display()
        for conn in state.connections:
            original = conn.channel.send

            def spy(msg, conn=conn, original=original):
                if isinstance(msg, m.MsgMigrate):
                    seen[conn.channel_type] = msg.flags
                original(msg)

            conn.channel.send = spy
        state.screen.framebuffer[5:25, 5:45] = 77
        wait_until(lambda: display.primary is not None and np.array_equal(display.primary, state.screen.framebuffer),
                   BOUND, what="the picture on s1")
        assert s1.migrate_to(s2)["migrated"] == 1
        done = session.wait_migrated(BOUND)
        assert done is not None and done["result"] == "completed"
        assert ("display:0" in done["relayed"]) is not direct, done
        on_s2 = s2.display()
        on_s2.screen.framebuffer[30:40, 30:90] = 11  # s2 draws on the surface the client kept
        wait_until(lambda: np.array_equal(display.primary, on_s2.screen.framebuffer), BOUND, what="the picture on s2")
        assert display.surface_creates == 1 and display.resets == 0
    flags = MigrateFlags(0) if direct else MigrateFlags.NEED_DATA_TRANSFER
    assert seen == {ChannelType.DISPLAY: flags,
                    **{kind: int(default_migrate_flags(kind)) for kind in (ChannelType.INPUTS, ChannelType.CURSOR)}}
    gevent.sleep(0)
