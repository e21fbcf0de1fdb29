"""remote-viewer, what SPICE users run, shows a ``clock`` screen and follows it to s2.

remote-viewer runs under Xvfb with no window manager; the X screen is grabbed with Pillow and the
SPICE picture is found in remote-viewer's window (unscaled, below its title bar).  Everything but
the clock's band must equal the server's framebuffer pixel for pixel; the clock band changes every
tenth of a second, so there the test looks for the clock's ink.  The screenshots are kept as PNG
files in the test's tmp directory.
"""

from __future__ import annotations

import gevent
import numpy as np
import pytest
from PIL import Image

from spicewire.screens import ClockScreen

from .peers import remote_viewer as rv
from .serverkit import wait_until
from .test_spicegtk_display import DisplayNode

pytestmark = pytest.mark.peer

SIZE = (640, 480)


def steady_rows(screen: ClockScreen) -> np.ndarray:
    """The rows the clock does not redraw."""
    rows = np.ones(screen.height, dtype=bool)
    rows[screen.clock_top:screen.clock_top + screen.clock_height] = False
    return rows


def wait_for_picture(xvfb: rv.Xvfb, screen: ClockScreen, png, what: str, timeout: float = 30.0):
    """Grab the X screen until the window shows ``screen``'s steady rows exactly; the last grab is
    saved to ``png``. Returns (screenshot, x, y)."""
    rows = steady_rows(screen)
    deadline = gevent.get_hub().loop.now() + timeout
    while True:
        shot = xvfb.screenshot()
        x, y, share = rv.locate(shot, rv.rgb_of(screen.framebuffer), rows=rows)
        if share == 1.0 or gevent.get_hub().loop.now() > deadline:
            Image.fromarray(shot).save(png)
            assert share == 1.0, f"{what}: at best {share:.4f} of the picture at ({x}, {y}); see {png}"
            return shot, x, y
        gevent.sleep(0.2)


@pytest.fixture
def clock_nodes():
    nodes = [DisplayNode(name, "clock", SIZE) for name in ("s1", "s2")]
    yield nodes
    for node in nodes:
        node.stop()


def test_remote_viewer_shows_the_clock_and_then_s2s_name(tmp_path, clock_nodes):
    rv.require()
    s1, s2 = clock_nodes
    with gevent.Timeout(120, AssertionError("the test took longer than 120 s")), \
            rv.Xvfb(tmp_path) as xvfb, rv.RemoteViewer(s1.address[1], xvfb.display, tmp_path) as viewer:
        wait_until(lambda: len(s1.spice.sessions) == 1, 30, what="remote-viewer's session")
        on_s1 = next(iter(s1.spice.sessions.values())).display.screen
        assert on_s1.status()["server_name"] == "s1"
        shot, x, y = wait_for_picture(xvfb, on_s1, tmp_path / "s1.png", "the clock from s1")
        band = slice(y + on_s1.clock_top, y + on_s1.clock_top + on_s1.clock_height)
        ink = np.array(ClockScreen.clock_ink, dtype=np.uint8)
        assert (shot[band, x:x + SIZE[0]] == ink).all(axis=2).sum() > 100  # the clock's digits, in their colour
        before = on_s1.framebuffer.copy()

        s1.migrate_to(s2, "seamless")
        on_s2 = next(iter(s2.spice.sessions.values())).display.screen
        assert on_s2.status()["server_name"] == "s2"
        # the name and listen lines differ between the servers: the picture must be s2's
        names = steady_rows(on_s2) & (on_s2.framebuffer != before).any(axis=(1, 2))
        assert names.sum() > 10, "s1's and s2's pictures should differ in the server lines"
        shot, x2, y2 = wait_for_picture(xvfb, on_s2, tmp_path / "s2.png", "the clock from s2")
        assert (x2, y2) == (x, y)
        assert (shot[y:y + SIZE[1], x:x + SIZE[0]][names] != rv.rgb_of(before)[names]).any(axis=2).sum() > 100
        # spice-gtk in remote-viewer refused nothing either server sent (g_return_if_fail says CRITICAL)
        assert "CRITICAL" not in viewer.log(), viewer.log()
