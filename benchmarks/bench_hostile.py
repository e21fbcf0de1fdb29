"""One hostile client against everyone else (issue 9's fairness goal), measured.

For each flood case, a `spicewire serve` process serves BYSTANDERS sessions that each echo 1 KiB
back and forth in a loop, while one client in a process of its own floods it:

- ``main_unread``: ATTACH_CHANNELS requests on main, never reading a reply;
- ``pong_main``: PONGs on main as fast as it can write;
- ``ack_port``: ACKs on a port as fast as it can write;
- ``sink_stream``: 64 KiB DATA messages into a sink as fast as it can write;
- ``big_leaves``: not a flood but a big session coming and going: LEAVER_MIB queued in a paused
  sink, then the session ends and the server lets go of it, again and again (spicewire/server/
  heap.py: glibc's trim of that much memory used to stop the hub for tens of ms).

Reported per case: the bystanders' echo round trip p50/p99/max, the control API's GET /status p50/max,
and the goal (echo p99 <= 50 ms, every /status answered). Then SESSIONS sessions, each a main and an
echo port with echo traffic, without and with a PONG flood: all served, errors, the server's RSS.

    python benchmarks/bench_hostile.py [--seconds 5] [--bystanders 4] [--sessions 500]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import gevent

from spicewire.control.client import ControlClient
from spicewire.demo import free_port, serving
from spicewire.logs import session_label
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType
from tests.serverkit import DEFAULT_PORTS, ECHO, SINK, MainSession, RawChannel, echo_roundtrip

TOKEN = "bench-token"
GOAL_P99_MS = 50.0
CASES = ("none", "main_unread", "pong_main", "ack_port", "sink_stream", "big_leaves")
LEAVER_MIB = 512
SINK_NAME = DEFAULT_PORTS[SINK][0]


class Server:
    """A ``spicewire serve`` with an echo and a sink port and a control API."""

    def __init__(self, log: pathlib.Path) -> None:
        self.port, self.control_port = free_port(), free_port()
        ports = [a for name, kind in DEFAULT_PORTS for a in ("--port-channel", f"{name}={kind}")]
        argv = [sys.executable, "-m", "spicewire", "serve", "--listen", f"127.0.0.1:{self.port}",
                "--control", f"127.0.0.1:{self.control_port}", "--control-token", TOKEN,
                "--disable-ticketing", "--log-level", "WARNING", "--port-buffer-mib", str(LEAVER_MIB + 64), *ports]
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.address = ("127.0.0.1", self.port)
        self.control = ControlClient("127.0.0.1", self.control_port, token=TOKEN, timeout=3)
        if not serving(self.proc, self.control):
            raise RuntimeError(f"serve did not start:\n{log.read_text()}")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as status:
            return int(re.search(r"VmRSS:\s+(\d+) kB", status.read())[1]) / 1024

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=5)


# --- the flooding client, in a process of its own ------------------------------------------------


def flood(case: str, host: str, port: int, control_port: int) -> None:
    """Flood the server at host:port as ``case`` says until killed."""
    address = (host, port)
    if case == "big_leaves":
        come_and_go(address, ControlClient(host, control_port, token=TOKEN, timeout=30))
        return
    if case == "main_unread":
        channel = RawChannel.link(address, 0, ChannelType.MAIN, bufsize=4096)
        msg, count = m.MsgcMainAttachChannels(), 2000
    else:
        session = MainSession(address)
        if case == "pong_main":
            channel, msg, count = session.main, m.MsgcPong(1, 2), 20_000
        elif case == "ack_port":
            channel, msg, count = session.open_port(ECHO, auto_ack=False), m.MsgcAck(), 20_000
        else:
            channel, msg, count = session.open_port(SINK), m.MsgcSpicevmcData(os.urandom(64 << 10)), 16
    for _ in range(count):  # mini headers: the same frames can be written again and again
        channel.channel.send(msg)
    blob = b"".join(channel.channel.data_to_send())
    print("flooding", flush=True)
    try:
        while True:
            channel.sock.sendall(blob)
    except OSError as err:
        print(f"flood refused: {err}", flush=True)
        gevent.sleep(3600)  # stay, so the parent sees a live process either way


def come_and_go(address: tuple[str, int], control: ControlClient) -> None:
    """A session queues LEAVER_MIB in its paused sink and ends, again and again, until killed."""
    wire = b""  # DATA frames with mini headers: the same bytes serve every session
    print("flooding", flush=True)
    while True:
        with MainSession(address) as session:
            session.attach_channels()
            sink = session.open_port(SINK)
            sid = session_label(session.session_id)
            control.post_json(f"/sessions/{sid}/ports/{SINK_NAME}/pause", {})
            if not wire:
                piece = os.urandom(64 << 10)
                for _ in range(LEAVER_MIB << 4):
                    sink.channel.send(m.MsgcSpicevmcData(piece))
                wire = b"".join(sink.channel.data_to_send())
            sink.sock.sendall(wire)
            while _queued(control, sid) < LEAVER_MIB << 20:
                gevent.sleep(0.02)
        gevent.sleep(0.5)


def _queued(control: ControlClient, sid: str) -> int:
    session = next(s for s in control.get_json("/sessions")["sessions"] if s["session_id"] == sid)
    return next(p for p in session["ports"] if p["name"] == SINK_NAME)["to_device_bytes"]


def start_flood(case: str, server: Server) -> subprocess.Popen | None:
    if case == "none":
        return None
    proc = subprocess.Popen([sys.executable, __file__, "--flood", case, "--port", str(server.port),
                             "--control-port", str(server.control_port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("flooding"):
        raise RuntimeError(f"the {case} flood did not start: {line!r}")
    return proc


# --- measuring ----------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def bystander(address, seconds: float, rtts: list[float], errors: list[str]) -> None:
    try:
        with MainSession(address) as session:
            echo = session.open_port(ECHO)
            payload = os.urandom(1024)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                started = time.perf_counter()
                if echo_roundtrip(echo, payload, timeout=5) != payload:
                    errors.append("echo came back wrong")
                rtts.append((time.perf_counter() - started) * 1000)
                gevent.sleep(0.005)
    except Exception as err:  # a benchmark reports every failure as a figure, never stops on one
        errors.append(repr(err))


def control_prober(server: Server, seconds: float, latencies: list[float], errors: list[str]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            server.control.get_json("/status")
            latencies.append((time.perf_counter() - started) * 1000)
        except Exception as err:  # counted: the goal is that every request is answered
            errors.append(repr(err))
        gevent.sleep(0.1)


def run_case(case: str, seconds: float, bystanders: int, workdir: pathlib.Path) -> dict:
    server = Server(workdir / f"serve-{case}.log")
    flooder = None
    try:
        flooder = start_flood(case, server)
        gevent.sleep(0.5)  # the flood under way before the first measurement
        rtts: list[float] = []
        control: list[float] = []
        errors: list[str] = []
        control_errors: list[str] = []
        jobs = [gevent.spawn(bystander, server.address, seconds, rtts, errors) for _ in range(bystanders)]
        jobs.append(gevent.spawn(control_prober, server, seconds, control, control_errors))
        gevent.joinall(jobs)
        rss = server.rss_mib()
    finally:
        if flooder is not None:
            flooder.kill()
            flooder.wait(timeout=5)
        server.stop()
    p99 = percentile(rtts, 99) if rtts else float("inf")
    return {
        "case": case, "echoes": len(rtts), "p50": percentile(rtts, 50) if rtts else float("inf"), "p99": p99,
        "max": max(rtts) if rtts else float("inf"),
        "control_p50": percentile(control, 50) if control else float("inf"),
        "control_max": max(control) if control else float("inf"),
        "errors": len(errors) + len(control_errors), "rss": rss,
        "met": p99 <= GOAL_P99_MS and not errors and not control_errors and bool(control),
    }


def run_sessions(count: int, flooded: bool, workdir: pathlib.Path) -> dict:
    server = Server(workdir / f"serve-{count}-{flooded}.log")
    flooder = None
    try:
        idle = server.rss_mib()
        sessions = []
        errors: list[str] = []
        for _ in range(count):
            try:
                session = MainSession(server.address)
                sessions.append((session, session.open_port(ECHO)))
            except Exception as err:  # counted below: all must be served
                errors.append(repr(err))
        if flooded:
            flooder = start_flood("pong_main", server)
        payloads = [os.urandom(4096) for _ in sessions]
        started = time.monotonic()
        jobs = [gevent.spawn(echo_roundtrip, port, data, None, 30)
                for (_, port), data in zip(sessions, payloads, strict=True)]
        gevent.joinall(jobs)
        elapsed = time.monotonic() - started
        errors += [repr(job.exception) for job in jobs if not job.successful()]
        errors += ["wrong echo" for job, data in zip(jobs, payloads, strict=True)
                   if job.successful() and job.value != data]
        served = server.control.get_json("/status")["sessions"] - flooded
        rss = server.rss_mib()
        for session, _ in sessions:
            session.close()
    finally:
        if flooder is not None:
            flooder.kill()
            flooder.wait(timeout=5)
        server.stop()
    return {"sessions": count, "flooded": flooded, "served": served, "errors": len(errors),
            "first_error": errors[0] if errors else "", "echo_s": elapsed, "idle_rss": idle, "rss": rss,
            "met": served == count and not errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per case")
    parser.add_argument("--bystanders", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--flood", choices=CASES[1:], help=argparse.SUPPRESS)  # the flooder process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--control-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        flood(args.flood, "127.0.0.1", args.port, args.control_port)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        print("| flood | bystander echoes | echo p50 ms | echo p99 ms | echo max ms | /status p50 ms "
              "| /status max ms | errors | server RSS MiB | goal | met |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for case in args.cases.split(","):
            r = run_case(case, args.seconds, args.bystanders, workdir)
            print(f"| {case} | {r['echoes']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.1f} "
                  f"| {r['control_p50']:.1f} | {r['control_max']:.1f} | {r['errors']} | {r['rss']:.0f} "
                  f"| echo p99 <= {GOAL_P99_MS:g} ms, /status answers | {'yes' if r['met'] else 'NO'} |", flush=True)
        if args.sessions:
            print()
            print("| sessions | flood | served | errors | echo all (s) | RSS idle MiB | RSS MiB | goal | met |")
            print("|---|---|---|---|---|---|---|---|---|")
            for flooded in (False, True):
                r = run_sessions(args.sessions, flooded, workdir)
                print(f"| {r['sessions']} | {'pong_main' if flooded else 'none'} | {r['served']} | {r['errors']} "
                      f"| {r['echo_s']:.2f} | {r['idle_rss']:.0f} | {r['rss']:.0f} | all served, no errors "
                      f"| {'yes' if r['met'] else 'NO'} |", flush=True)
                if r["first_error"]:
                    print(f"first error: {r['first_error']}")
        print(f"\n{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
