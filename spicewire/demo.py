"""``make demo``: a live session with a large in-flight state moved between two servers.

Starts two ``spicewire serve`` processes on loopback, streams data from a client into a paused sink
on the first until SIZE MiB are buffered there, migrates the session seamlessly, resumes the sink on
the second server and checks that it received every byte, in order (count and SHA-256). Then does
the same with a semi-seamless migration, which by design loses what was in flight, and shows how
much.

    python -m spicewire.demo [--mib 256] [--modes seamless,semi-seamless]

With ``--viewer``, it shows a migration instead: both servers give each session a ``paint`` screen,
remote-viewer opens on s1, and the session moves s1 -> s2 -> s1 ... every few seconds, alternating
seamless and semi-seamless, while you paint; what you painted stays. It needs remote-viewer
(virt-viewer) and a display.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import socket as stdlib_socket
import subprocess
import sys
import time
from collections.abc import Callable

import gevent

from spicewire import cli
from spicewire.client import ClientSession
from spicewire.control.client import ControlClient
from spicewire.errors import MigrationError
from spicewire.logs import session_label

SINK = "org.spicewire.sink"
CHUNK = 1 << 20
# The demo's servers take migrations from each other only: a secret of this run, given to them in
# their environment (not argv, which every local user sees) and presented by every /migrate.
PEER_TOKEN = secrets.token_hex(16)


def free_port() -> int:
    with stdlib_socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serving(proc: subprocess.Popen, control: ControlClient, timeout: float = 20) -> bool:
    """Whether ``proc``, a ``spicewire serve`` just started, came up: True once ``control`` (its
    control API) answers GET /status, False once the process has ended or ``timeout`` seconds
    passed without an answer (the caller says what failed, with what it knows)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            control.get_json("/status")
            return True
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            gevent.sleep(0.05)


class Server:
    """A ``spicewire serve`` process with a sink port and a control API."""

    def __init__(self, name: str, buffer_mib: float, control_timeout: float = 120, extra: tuple[str, ...] = ()) -> None:
        self.name = name
        self.port, self.control_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spicewire", "serve", "--listen", f"127.0.0.1:{self.port}",
             "--disable-ticketing", "--port-channel", f"{SINK}=sink", "--port-buffer-mib", str(buffer_mib),
             "--control", f"127.0.0.1:{self.control_port}", "--log-level", "WARNING", *extra],
            stdin=subprocess.DEVNULL, env={**os.environ, cli.PEER_TOKEN_ENV: PEER_TOKEN},
        )
        self.control = ControlClient("127.0.0.1", self.control_port, timeout=control_timeout)
        if not serving(self.proc, self.control):
            raise SystemExit(f"{name} did not start")

    def sink(self, session_id: int) -> dict:
        view = self.control.get_json(f"/sessions/{session_label(session_id)}")
        return next(p for p in view["ports"] if p["name"] == SINK)

    def migrate_to(self, other: Server, mode: str = "seamless", timeout: float = 30.0) -> dict:
        """Move this server's sessions to ``other``, presenting this run's peer token."""
        return self.control.post_json("/migrate", {
            "to": f"127.0.0.1:{other.port}", "to_control": f"127.0.0.1:{other.control_port}",
            "mode": mode, "timeout": timeout, "to_peer_token": PEER_TOKEN,
        })

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_drawn: list = [None]


def bar(label: str, done: float, total: float, width: int = 40) -> None:
    frac = 0.0 if total <= 0 else min(1.0, done / total)
    filled = int(frac * width)
    if _drawn[0] == (label, filled):
        return  # redraw only when the bar moves
    _drawn[0] = (label, filled)
    sys.stdout.write(f"\r  {label:<24} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}%")
    sys.stdout.flush()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        gevent.sleep(0.02)


def run_once(mode: str, mib: int, s1: Server, s2: Server) -> dict:
    size = mib << 20
    print(f"\n== {mode} migration with {mib} MiB in flight ==")
    session = ClientSession("127.0.0.1", s1.port).connect()
    sid = session.session_id
    port = session.open_port(SINK)
    s1.control.post_json(f"/sessions/{session_label(sid)}/ports/{SINK}/pause", {})
    digest, block = hashlib.sha256(), os.urandom(CHUNK)
    t0 = time.perf_counter()
    for i in range(0, size, CHUNK):
        piece = block[: min(CHUNK, size - i)]
        port.write(piece)
        digest.update(piece)
        bar("client -> paused sink", i + len(piece), size)
    wait_for(lambda: s1.sink(sid)["to_device_bytes"] == size, 60, "the sink's buffer to fill")
    print(f"\n  {mib} MiB buffered on s1 in {time.perf_counter() - t0:.2f} s")

    migration = gevent.spawn(s1.migrate_to, s2, mode, 60)
    # Progress: once s1 starts streaming MIGRATE_DATA, its socket's unsent bytes count down.
    streaming = 0
    while not migration.ready():
        try:
            pending = (s1.sink(sid)["channel"] or {}).get("pending_write", 0)
        except MigrationError:  # the session has left s1
            pending = 0 if streaming else size
        streaming = max(streaming, pending)
        bar("migrating", size - pending if streaming else 0, size)
        gevent.sleep(0.05)
    report = migration.get()
    bar("migrating", size, size)
    print()
    entry = report["sessions"][0]
    s2.control.post_json(f"/sessions/{session_label(sid)}/ports/{SINK}/resume", {})
    expected = size - entry["bytes_dropped"]
    wait_for(lambda: s2.sink(sid)["device"]["bytes_in"] >= expected, 60, "the sink on s2 to drain")
    gevent.sleep(0.2)
    sink = s2.sink(sid)["device"]
    intact = sink["bytes_in"] == size and sink["sha256"] == digest.hexdigest()
    session.close()
    result = {
        "mode": entry["mode"],
        "in_flight_mib": mib,
        "moved_bytes": entry["in_flight_bytes_moved"],
        "dropped_bytes": entry["bytes_dropped"],
        "sink_received_bytes": sink["bytes_in"],
        "sha256_matches": sink["sha256"] == digest.hexdigest(),
        "intact": intact,
        "pre_migration_ms": round(1000 * entry.get("pre_migration_s", 0), 2),
        "downtime_ms": round(1000 * entry.get("downtime_s", 0), 2),
        "total_ms": round(1000 * report["total_s"], 2),
    }
    verdict = "every byte arrived, in order" if intact else (
        f"{size - sink['bytes_in']} bytes lost, as semi-seamless migration does by design"
        if mode == "semi-seamless" else "DATA DIFFERS")
    print(f"  {entry['mode']}: downtime {result['downtime_ms']} ms, total {result['total_ms']} ms; {verdict}")
    return result


def run_viewer(rounds: int, interval: float) -> int:
    """remote-viewer on a paint session that migrates back and forth while you watch."""
    viewer = shutil.which("remote-viewer")
    if viewer is None or not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        print("spicewire demo --viewer needs remote-viewer (virt-viewer) and a display", file=sys.stderr)
        return 2
    servers: list[Server] = []
    client = None
    try:
        servers.extend(Server(name, 8, extra=("--display", "paint:1024x768", "--name", name)) for name in ("s1", "s2"))
        here, there = servers
        print(f"s1 on 127.0.0.1:{here.port}, s2 on 127.0.0.1:{there.port}; paint with the left button, "
              "keys 1-9 pick a colour, c clears")
        client = subprocess.Popen([viewer, f"spice://127.0.0.1:{here.port}"], stdin=subprocess.DEVNULL)
        wait_for(lambda: bool(here.control.get_json("/sessions")["sessions"]), 30, "remote-viewer to connect")
        for turn in range(rounds):
            gevent.sleep(interval)
            if client.poll() is not None:
                print("remote-viewer closed")
                break
            mode = "seamless" if turn % 2 == 0 else "semi-seamless"
            report = here.migrate_to(there, mode)
            entry = report["sessions"][0] if report["sessions"] else {}
            downtime = entry.get("downtime_s")
            print(f"{here.name} -> {there.name}: {mode}, "
                  f"{'migrated' if entry.get('migrated') else 'stayed: ' + str(entry.get('error'))}"
                  + (f", downtime {downtime * 1000:.2f} ms" if downtime is not None else ""))
            here, there = there, here
    finally:
        if client is not None and client.poll() is None:
            client.terminate()
        for server in servers:
            server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    # The checks of `spicewire demo`, so that both ways in refuse the same input.
    parser = argparse.ArgumentParser(prog="python -m spicewire.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=cli.positive_int, default=256, help="in-flight state to pile up (default 256)")
    parser.add_argument("--modes", type=cli.demo_modes, default=",".join(cli.DEMO_MODES))
    parser.add_argument("--viewer", action="store_true",
                        help="instead: remote-viewer on a paint session that migrates back and forth")
    parser.add_argument("--rounds", type=cli.positive_int, default=10,
                        help="with --viewer: how many migrations (default 10)")
    parser.add_argument("--interval", type=cli.positive_number, default=5.0,
                        help="with --viewer: seconds between them")
    args = parser.parse_args(argv)
    if args.viewer:
        return run_viewer(args.rounds, args.interval)
    servers = []
    try:
        s1 = Server("s1", args.mib + 16)
        servers.append(s1)
        s2 = Server("s2", args.mib + 16)
        servers.append(s2)
        print(f"s1 on 127.0.0.1:{s1.port}, s2 on 127.0.0.1:{s2.port}")
        results = [run_once(mode, args.mib, s1, s2) for mode in args.modes.split(",")]
    finally:
        for server in servers:
            server.stop()
    print("\n" + json.dumps(results, indent=1))
    seamless_ok = all(r["intact"] for r in results if r["mode"] == "seamless")
    return 0 if seamless_ok else 1


if __name__ == "__main__":
    sys.exit(main())
