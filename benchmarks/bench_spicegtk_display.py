"""Pixel data delivered to spice-gtk from a screen that changes every frame, against the bytes our
port channel delivers to spice-gtk in the same run (raw images: no LZ4).

Both phases run an in-process server and the same spice-gtk (the tests' display driver,
tests/peers/spicegtk_display_driver.py), and count on spice-gtk's side over the same interval:

- display: a ``bench-churn`` screen (registered here through the screens plug-in API) rewrites every
  pixel on every tick; MB/s = the pixels of spice-gtk's display-invalidate signals x 4 bytes / s.
- port: a ``bench-source`` device (registered here: the source device with no rate limit) sends as
  fast as the client takes it; MB/s = the bytes of spice-gtk's port-data signals / s.  That server
  has a paint screen nobody paints on, so the same channels are linked and the display is idle.

``ratio`` = display MB/s / port MB/s; issue 11 asks for >= 0.5.

    .venv/bin/python benchmarks/bench_spicegtk_display.py [--seconds 5] [--size 1920x1080]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import gevent

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from spicewire import devices, screens
from spicewire.server.display import DisplayOptions
from spicewire.server.net import ServerConfig
from tests import peers
from tests.peers.spicegtk import DisplayDriver
from tests.serverkit import running_server, wait_until

PORT_NAME = "org.spicewire.bench"


@screens.register("bench-churn")
class ChurnScreen(screens.Screen):
    """Every pixel different on every tick: each frame the server sends is the whole surface."""

    wants_ticks = True

    def __init__(self, width: int | None = None, height: int | None = None) -> None:
        super().__init__(width, height)
        self.ticks = 0

    def tick(self, now: float) -> None:
        self.ticks += 1
        self.framebuffer[:, :, 0] = self.ticks & 0xFF


@devices.register("bench-source")
class FastSource(devices.SourceDevice):
    def __init__(self) -> None:
        super().__init__(rate=0)


def measure(config: ServerConfig, counter, seconds: float, tmp: pathlib.Path) -> dict:
    """spice-gtk's ``counter(state)`` bytes per second over ``seconds``, once it is flowing."""
    with running_server(config) as server, DisplayDriver(server.address[1], tmp) as drv:
        drv.ready()
        first = counter(drv.state())
        wait_until(lambda: counter(drv.state()) > first, 20, 0.05, "data to flow")
        gevent.sleep(0.5)  # past the first frames and TCP's slow start
        start, before = time.monotonic(), counter(drv.state())
        gevent.sleep(seconds)
        after, end = counter(drv.state()), time.monotonic()
        status = next(iter(server.sessions.values())).display.status()
        drv.quit()
    rate = (after - before) / (end - start)
    return {"MB_s": round(rate / 1e6, 2), "bytes": after - before, "seconds": round(end - start, 3),
            "server_frames": status["frames"], "server_bytes_drawn": status["bytes_drawn"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--size", default="1920x1080", help="WxH of both screens")
    args = p.parse_args()
    if not peers.have_spicegtk():
        print(json.dumps({"error": peers.why_missing("spicegtk")}))
        return 2
    width, height = (int(v) for v in args.size.split("x"))
    base = {"host": "127.0.0.1", "port": 0, "display_size": (width, height)}
    with tempfile.TemporaryDirectory(prefix="sw-bench-display-") as tmp:
        display = measure(ServerConfig(**base, display="bench-churn", display_options=DisplayOptions(lz4=False)),
                          lambda state: state["invalidated_pixels"] * 4, args.seconds, pathlib.Path(tmp))
        port = measure(ServerConfig(**base, display="paint", port_channels=[(PORT_NAME, "bench-source")]),
                       lambda state: state["port_bytes"], args.seconds, pathlib.Path(tmp))
    out = {
        "machine": {"cpus": os.cpu_count()},
        "size": [width, height],
        "display_raw": display,
        "port": port,
        "ratio": round(display["MB_s"] / port["MB_s"], 3) if port["MB_s"] else None,
        "target": 0.5,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
