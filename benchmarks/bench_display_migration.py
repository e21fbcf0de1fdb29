"""Downtime of a seamless migration of a session whose 1920x1080 ``paint`` screen changes during
pre-migration, beside the downtime of an idle session without a display, in one run (`make bench`).

The issue's goal: the display's downtime is at most 1.5x the idle one. It holds only if the
picture travels before the switch (pre-copied while the screen runs, then the tiles changed since
at the stop) and not through the client after SPICE_MSG_MIGRATE. s1 and s2 are `spicewire serve`
processes; the client (ours, with its display channels) runs in this process's I/O thread and
keeps painting with the mouse while the migrations run. Downtime is what s1 reports per session:
from SPICE_MSG_MIGRATE to the session being live on s2.

The three configurations run in interleaved blocks (idle, still, changing; again; ...), each block
with fresh servers, and each median is taken over all of a configuration's rounds. One block's
median moves by up to a third from one pair of server processes to the next, idle included, with
where the kernel happens to place three busy processes on two cores (a server woken on the
client's core preempts it there while the other core idles); a ratio of two single blocks mostly
measured that.

    python benchmarks/bench_display_migration.py [--rounds 10] [--blocks 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

from spicewire.client import connect
from spicewire.demo import Server

WIDTH, HEIGHT = 1920, 1080


def start(display: str | None) -> Server:
    """The demo's ``spicewire serve`` (a sink port, a control API, this run's peer token), with a
    display when asked."""
    return Server("server", 8, extra=("--display", display) if display else ())


def downtimes(display: str | None, rounds: int, paint: bool = True) -> dict:
    s1, s2 = start(display), start(display)
    stop = threading.Event()
    strokes = [0]
    try:
        with connect("127.0.0.1", s1.port, display=display is not None, timeout=30) as session:
            painter = None
            if display is not None:
                inputs = session.inputs
                assert inputs is not None and session.display is not None
                session.display.wait(lambda d: d.primary is not None, 30)

                def paint() -> None:
                    x = 0
                    inputs.mouse_press(1)
                    while not stop.is_set():  # a long stroke back and forth across the screen
                        x = (x + 37) % WIDTH
                        inputs.mouse_position(x, (x * 7) % HEIGHT)
                        strokes[0] += 1
                        time.sleep(0.002)

                painter = threading.Thread(target=paint, daemon=True)
                if paint:
                    painter.start()
                time.sleep(0.5)
            results, here, there = [], s1, s2
            for _ in range(rounds):
                entry = here.migrate_to(there)["sessions"][0]
                assert entry["migrated"], entry
                results.append(entry["downtime_s"])
                here, there = there, here
                time.sleep(0.2)  # the screen runs on the new server for a while before the next one
            stop.set()
            if painter is not None and painter.is_alive():
                painter.join(5)
    finally:
        stop.set()
        s1.stop()
        s2.stop()
    return {"downtimes_s": results, "mouse_positions_sent": strokes[0]}


def pooled(blocks: list[dict]) -> dict:
    """A configuration's blocks as one: the median over every round, and each block's own."""
    every = [d for block in blocks for d in block["downtimes_s"]]
    return {"rounds": len(every), "median_downtime_s": statistics.median(every), "max_downtime_s": max(every),
            "block_medians_s": [statistics.median(block["downtimes_s"]) for block in blocks],
            "mouse_positions_sent": sum(block["mouse_positions_sent"] for block in blocks)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10, help="migrations per block")
    parser.add_argument("--blocks", type=int, default=3, help="blocks per configuration, interleaved")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"idle": [], "still": [], "changing": []}
    for _ in range(args.blocks):
        runs["idle"].append(downtimes(None, args.rounds))
        runs["still"].append(downtimes(f"paint:{WIDTH}x{HEIGHT}", args.rounds, paint=False))
        runs["changing"].append(downtimes(f"paint:{WIDTH}x{HEIGHT}", args.rounds))
    idle, still, painted = pooled(runs["idle"]), pooled(runs["still"]), pooled(runs["changing"])
    ratio = painted["median_downtime_s"] / idle["median_downtime_s"]
    growth = painted["median_downtime_s"] / still["median_downtime_s"]
    # Other work on the machine shows up in every figure: the ratio is taken within one run.
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    results = {"machine": f"{os.cpu_count()} cores", "load_average": load,
               "idle_without_display": idle, "paint_1080p_still": still,
               "paint_1080p_changing": painted, "display_vs_idle": ratio, "changing_vs_still": growth}
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(f"\nload average (1, 5, 15 min) before {load['before']}, after {load['after']}")
    print("\n| measure | figure | goal | met |\n|---|---|---|---|")
    print(f"| idle session without display, seamless downtime: median ms | "
          f"{idle['median_downtime_s'] * 1e3:.2f} |  |  |")
    print(f"| 1920x1080 paint screen changing during pre-migration: median ms | "
          f"{painted['median_downtime_s'] * 1e3:.2f} |  |  |")
    print(f"| the same 1920x1080 session with a still screen: median ms | "
          f"{still['median_downtime_s'] * 1e3:.2f} |  |  |")
    print(f"| display vs idle | {ratio:.2f}x | <= 1.5x | {'yes' if ratio <= 1.5 else 'NO'} |")
    for name, config in (("idle", idle), ("changing", painted)):
        medians = ", ".join(f"{m * 1e3:.2f}" for m in config["block_medians_s"])
        print(f"| {name}: each block's median, ms | {medians} |  |  |")
    print(f"| changing vs still screen (what the picture's changes cost) | {growth:.2f}x |  |  |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
