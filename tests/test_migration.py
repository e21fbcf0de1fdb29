"""Migration end to end: our client (spicewire.client) between our servers (PROTOCOL.md section 5).

The servers run in this process (two SpiceServer + ControlServer pairs on one gevent hub; the
server-to-server HTTP client uses gevent sockets) unless a process boundary matters: where s2 must
die, or where 256 MiB should not share one core with the client, they are ``spicewire serve``
subprocesses. Every migration is driven the way an operator drives it, ``POST /migrate`` on s1's
control API. Every test is bounded by a gevent.Timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import gevent
import gevent.event
import pytest
from gevent import socket
from gevent.server import StreamServer

from spicewire.client import ClientSession
from spicewire.control.client import ControlClient
from spicewire.control.server import ControlServer
from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.protocol.enums import ChannelType, Msgc, MsgcSpicevmc
from spicewire.server.migration import SessionDestination, SessionSource, orchestrator
from spicewire.server.net import ServerConfig, SpiceServer
from spicewire.server.session import Limits

from .served import bound_addresses
from .serverkit import (
    Bystander,
    MainSession,
    PortChannel,
    echo_roundtrip,
    read_exactly,
    read_until_closed,
    refused_port,
    wait_until,
)

ECHO, SINK = "org.spicewire.echo", "org.spicewire.sink"
PORTS = [(ECHO, "echo"), (SINK, "sink")]
ECHO_ID, SINK_ID = 0, 1
TOKEN = "migration-token"
PEER_TOKEN = "peer-token"  # what s1 presents on an in-process s2's /migration/*


@pytest.fixture(autouse=True)
def deadline(request):
    """No test here outlives its budget (the 256 MiB one gets more)."""
    budget = 60 if request.node.get_closest_marker("slow") else 30
    with gevent.Timeout(budget, AssertionError(f"{request.node.name} took longer than {budget} s")):
        yield


# --- servers ------------------------------------------------------------------------------------


class Node:
    """An in-process server: SPICE and control API on 127.0.0.1, ports chosen by the kernel."""

    peer_token: str | None = PEER_TOKEN

    def __init__(
        self, limits: Limits | None = None, ports: list[tuple[str, str]] = PORTS, precopy: bool = True,
    ) -> None:
        self.spice = SpiceServer(ServerConfig(host="127.0.0.1", port=0, port_channels=list(ports),
                                              limits=limits or Limits(), precopy=precopy))
        self.spice.start()
        self.control = ControlServer(self.spice, "127.0.0.1", 0, peer_token=PEER_TOKEN)
        self.control.start()
        # The operator API is open here; the token opens /migration/* too, where tests act as s1.
        self.api = ControlClient(*self.control.address, token=PEER_TOKEN, timeout=60)
        self.address = self.spice.address
        self.control_address = self.control.address

    def migrate_to(self, other, mode: str = "seamless", timeout: float = 10.0, to=None) -> dict:
        return self.api.post_json("/migrate", {
            "to": "{}:{}".format(*(to or other.address)), "to_control": "{}:{}".format(*other.control_address),
            "mode": mode, "timeout": timeout, "to_token": getattr(other, "token", None),
            "to_peer_token": getattr(other, "peer_token", None),
        })

    def sessions(self) -> dict[int, dict]:
        return {int(s["session_id"], 16): s for s in self.api.get_json("/sessions")["sessions"]}

    def port(self, session_id: int, name: str) -> dict:
        return next(p for p in self.api.get_json(f"/sessions/{session_id:08x}")["ports"] if p["name"] == name)

    def lever(self, session_id: int, name: str, action: str) -> None:
        self.api.post_json(f"/sessions/{session_id:08x}/ports/{name}/{action}", {})

    def stop(self) -> None:
        self.control.stop()
        self.spice.stop()


class Proc(Node):
    """A ``spicewire serve`` subprocess with the same interface."""

    token = TOKEN
    peer_token = None  # its control token opens /migration/* too

    def __init__(self, tmp_path, name: str, buffer_mib: float = 8, precopy: bool = True) -> None:
        self.log = tmp_path / f"{name}.log"
        argv = [sys.executable, "-m", "spicewire", "serve", "--listen", "127.0.0.1:0",
                "--disable-ticketing", "--control", "127.0.0.1:0", "--control-token", TOKEN,
                "--port-buffer-mib", str(buffer_mib), "--log-level", "INFO", *(() if precopy else ("--no-precopy",))]
        for port_name, kind in PORTS:
            argv += ["--port-channel", f"{port_name}={kind}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.address, self.control_address = bound_addresses(self.proc, self.log)
        self.api = ControlClient(*self.control_address, token=TOKEN, timeout=60)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.api.get_json("/status")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()  # not in ``procs`` yet: nobody else would
                    pytest.fail(f"{name} did not answer /status:\n{self.log.read_text()}")
                gevent.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        self.kill()


@pytest.fixture
def procs(tmp_path):
    made = []

    def make(name: str, **kw) -> Proc:
        made.append(Proc(tmp_path, name, **kw))
        return made[-1]

    yield make
    for proc in made:
        proc.stop()


# --- a TCP proxy that cuts the stream anywhere ------------------------------------------------------


class ChoppyProxy:
    """Forwards every connection to ``target`` in both directions, re-cut into random pieces: the
    first ``fine`` bytes of each direction in pieces of 1..``small`` bytes, the rest mostly so (with
    probability ``p_small``) and otherwise up to 1 MiB; each piece is its own write on a
    TCP_NODELAY socket, so its own segment. Now and then it sleeps a millisecond."""

    def __init__(self, target, seed: int, *, small: int = 4096, p_small: float = 0.85,
                 fine: int = 4 << 20, p_sleep: float = 0.0005) -> None:
        self.target = tuple(target)
        self.seed, self.small, self.p_small, self.fine, self.p_sleep = seed, small, p_small, fine, p_sleep
        self.pieces = 0
        self.small_pieces = 0
        self.bytes = 0
        self._conns = 0
        self._server = StreamServer(("127.0.0.1", 0), self._handle)
        self._server.start()
        self.address = ("127.0.0.1", self._server.server_port)

    def _handle(self, client, _addr) -> None:
        self._conns += 1
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seed = self.seed * 1000 + self._conns * 2
        pumps = [gevent.spawn(self._pump, client, upstream, seed), gevent.spawn(self._pump, upstream, client, seed + 1)]
        try:
            gevent.joinall(pumps)
        finally:
            for pump in pumps:
                pump.kill()
            client.close()
            upstream.close()

    def _pump(self, src, dst, seed: int) -> None:
        rng = random.Random(seed)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        done = 0
        try:
            # a side that goes away ends the copy; the finally makes the other follow
            with contextlib.suppress(OSError):
                while n := src.recv_into(buf):
                    pos = 0
                    while pos < n:
                        if done + pos < self.fine or rng.random() < self.p_small:
                            k = rng.randint(1, self.small)
                            self.small_pieces += 1
                        else:
                            k = rng.randint(self.small + 1, 1 << 20)
                        k = min(k, n - pos)
                        dst.sendall(view[pos : pos + k])
                        pos += k
                        self.pieces += 1
                        if rng.random() < self.p_sleep:
                            gevent.sleep(0.001)
                    done += n
                    self.bytes += n
                dst.shutdown(socket.SHUT_WR)
        finally:  # one side went away: so does the other (as a dying peer would look)
            for sock in (src, dst):
                with contextlib.suppress(OSError):  # it may be shut down or reset already
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._server.stop(timeout=0)


# --- helpers ----------------------------------------------------------------------------------------


def connect(node, host_port=None) -> ClientSession:
    host, port = host_port or node.address
    return ClientSession(host, port, timeout=10).connect()


def fill_paused_sink(node, session: ClientSession, size: int, *, block: int = 1 << 20, digest=None) -> str:
    """Pause the session's sink on ``node``, write ``size`` random bytes into it, wait until they
    are all buffered there; returns their SHA-256 (``digest``, if given, goes on being updated)."""
    node.lever(session.session_id, SINK, "pause")
    sink = session.open_port(SINK)
    digest = digest or hashlib.sha256()
    data = os.urandom(block)
    for start in range(0, size, block):
        piece = data[: min(block, size - start)]
        sink.write(piece)
        digest.update(piece)
    wait_until(lambda: node.port(session.session_id, SINK)["to_device_bytes"] == size, 60,
               what=f"{size} bytes buffered in the paused sink")
    return digest.hexdigest()


def drain_sink(node, session_id: int, size: int, digest: str) -> None:
    """Resume the sink on ``node``; it must take exactly ``size`` bytes with ``digest``."""
    node.lever(session_id, SINK, "resume")
    wait_until(lambda: node.port(session_id, SINK)["device"]["bytes_in"] >= size, 30, what="the sink to drain")
    device = node.port(session_id, SINK)["device"]
    assert device["bytes_in"] == size
    assert device["sha256"] == digest


def echo_ok(session: ClientSession, n: int = 200_000) -> None:
    port = session.open_port(ECHO)
    data = os.urandom(n)
    port.write(data)
    assert read_exactly(port, n) == data


def only_entry(report: dict) -> dict:
    assert len(report["sessions"]) == 1, report
    return report["sessions"][0]


# --- 1. seamless, with an echo stream running ----------------------------------------------------


def test_seamless_echo_stream_survives_repeated_migrations_byte_exact(nodes):
    s1, s2 = nodes(2)
    session = connect(s1)
    echo = session.open_port(ECHO)
    session.open_port(SINK)  # every port of the session has a channel to move
    sent = bytearray()  # what the writer wrote and the reader has not matched yet
    totals = {"sent": 0, "checked": 0}
    stop = gevent.event.Event()
    rng = random.Random(1)
    block = os.urandom(1 << 16)

    def writer():
        while not stop.is_set():
            n = rng.randint(1, len(block))
            start = rng.randint(0, len(block) - n)
            piece = block[start : start + n]
            sent.extend(piece)
            totals["sent"] += n
            echo.write(piece)
            if totals["sent"] - totals["checked"] > 16 << 20:
                gevent.sleep(0.001)  # keep the pipe full, not the client's memory
            else:
                gevent.sleep(0)

    def reader():
        while not (stop.is_set() and totals["checked"] == totals["sent"]):
            got = echo.read(None, timeout=1)
            if not got:
                assert not echo.closed.is_set(), f"echo channel closed: {echo.error!r}"
                continue
            expected = bytes(sent[: len(got)])
            assert got == expected, f"stream differs at byte {totals['checked']}"
            del sent[: len(got)]
            totals["checked"] += len(got)

    greenlets = [gevent.spawn(writer), gevent.spawn(reader)]
    here, there = s1, s2
    reports = []
    try:
        for _ in range(6):
            before = totals["checked"]
            wait_until(lambda before=before: totals["checked"] > before + (256 << 10), what="the stream to move")
            report = here.migrate_to(there)
            reports.append(report)
            entry = only_entry(report)
            assert report["migrated"] == 1 and entry["migrated"], report
            assert entry["mode"] == "seamless", report
            assert session.wait_migrated(10) is not None
            for g in greenlets:
                assert not g.dead, g.exception
            here, there = there, here
        stop.set()
        gevent.joinall(greenlets, timeout=20, raise_error=True)
    finally:
        stop.set()
        gevent.killall(greenlets, block=False)
    assert totals["checked"] == totals["sent"] > 0 and not sent
    # The stream was in full flow through the migrations: megabytes in flight moved with each.
    moved = [only_entry(r)["in_flight_bytes_moved"] for r in reports]
    assert min(moved) >= 1 << 20, moved
    assert [r["mode"] for r in session.migrations] == ["seamless"] * 6
    assert all(r["result"] == "completed" and not r["errors"] for r in session.migrations)
    # Every channel is on the last server; the other one holds nothing.
    assert session.connected_to == here.address
    wait_until(lambda: not there.sessions(), what="the previous server to let go of the session")
    view = here.sessions()[session.session_id]
    assert view["migration"] is None and view["main"] is not None
    assert [p["connected"] for p in view["ports"]] == [True, True]
    echo_ok(session)
    session.close()


# --- 2. semi-seamless --------------------------------------------------------------------------


def test_semi_seamless_moves_the_session_and_reports_what_was_dropped(nodes):
    s1, s2 = nodes(2)
    session = connect(s1)
    echo_ok(session)  # the echo port is open and idle: nothing of it in flight
    held = 3 << 20
    fill_paused_sink(s1, session, held)
    report = s1.migrate_to(s2, mode="semi-seamless")
    entry = only_entry(report)
    assert entry["migrated"] and entry["mode"] == "semi-seamless", report
    # In-flight data is lost in this mode by design (5.3); the report says exactly how much.
    assert entry["bytes_dropped"] == held
    assert entry["in_flight_bytes_moved"] == 0
    client = session.wait_migrated(10)
    assert client is not None and client["mode"] == "semi-seamless" and client["result"] == "completed"
    # The client's own account: nothing of its own was unsent or cut (it held nothing back), and
    # nothing was relayed.
    assert client["relayed"] == {}
    assert sum(v for counts in client["dropped"].values() for v in counts.values()) == 0, client
    assert session.connected_to == s2.address
    echo_ok(session)  # the same port object, now on s2
    wait_until(lambda: not s1.sessions(), what="s1 to let go of the session")
    sink = s2.port(session.session_id, SINK)
    assert sink["to_device_bytes"] == 0 and sink["device"]["bytes_in"] == 0
    # The semi-seamless client keeps writing to the new sink (s2 sent PORT_INIT; the sink is a
    # fresh start, the device state moved: still paused).
    data = os.urandom(100_000)
    session.ports[SINK_ID].write(data)
    drain_sink(s2, session.session_id, len(data), hashlib.sha256(data).hexdigest())
    session.close()


# --- 3. 256 MiB through arbitrary segmentation ----------------------------------------------------------


@pytest.mark.slow
def test_256_mib_in_flight_arrive_byte_exact_through_arbitrary_segmentation(procs):
    size = 256 << 20
    # Without the pre-copy, so that the whole backlog goes through the client (the path under test).
    s1, s2 = (procs(name, buffer_mib=size / 2**20 + 32, precopy=False) for name in ("s1", "s2"))
    # The client reaches both servers through proxies: everything it writes to s1, the MIGRATE_DATA
    # s1 streams to it, and the relay into s2 are re-cut into arbitrary pieces.
    p1 = ChoppyProxy(s1.address, seed=1, p_small=0.5)
    p2 = ChoppyProxy(s2.address, seed=2, p_small=1.0)
    try:
        session = connect(s1, p1.address)
        digest = fill_paused_sink(s1, session, size)
        echo_ok(session)
        report = s1.migrate_to(s2, to=p2.address, timeout=30)
        entry = only_entry(report)
        assert entry["migrated"] and entry["mode"] == "seamless", report
        assert entry["in_flight_bytes_moved"] >= size and entry["bytes_dropped"] == 0
        client = session.wait_migrated(30)
        assert client is not None and client["relayed"]["port:1"] >= size, client
        assert client["result"] == "completed" and not client["errors"], client
        assert p2.small_pieces == p2.pieces > size // 4096 and p2.bytes >= size, (p2.pieces, p2.bytes)
        assert p1.bytes >= 2 * size and p1.small_pieces > 1000, (p1.pieces, p1.small_pieces, p1.bytes)
        assert s2.port(session.session_id, SINK)["to_device_bytes"] == size
        drain_sink(s2, session.session_id, size, digest)
        echo_ok(session)
        session.close()
    finally:
        p1.stop()
        p2.stop()


# --- 4. faults ------------------------------------------------------------------------------------


class GateProxy(ChoppyProxy):
    """Forwards the first ``open_first`` connections at once; later ones wait for ``gate``."""

    def __init__(self, target, open_first: int = 1) -> None:
        super().__init__(target, seed=9, p_small=0.0, fine=0, p_sleep=0.0)
        self.open_first = open_first
        self.gate = gevent.event.Event()

    def _handle(self, client, addr) -> None:
        if self._conns >= self.open_first:
            self.gate.wait()
        super()._handle(client, addr)


def session_with_held_sink(node, held: int = 1 << 20) -> tuple[ClientSession, str]:
    session = connect(node)
    echo_ok(session)
    return session, fill_paused_sink(node, session, held)


def test_fault_client_disconnects_mid_migration_is_cleaned_up_on_both_servers(nodes):
    s1, s2 = nodes(2)
    session, _ = session_with_held_sink(s1)
    sid = session.session_id
    # The client gets its main link to s2 through; its port links hang: it is after BEGIN and
    # before CONNECTED for as long as we like.
    gate = GateProxy(s2.address, open_first=1)
    try:
        migration = gevent.spawn(s1.migrate_to, s2, to=gate.address, timeout=5)
        wait_until(lambda: sid in s2.spice.sessions, what="the client's main link to s2")
        assert isinstance(s2.spice.sessions[sid].migration, SessionDestination)
        assert session.migrating and not session.migration_connected_event.is_set()
        session.close()
        entry = only_entry(migration.get(timeout=10))
        assert not entry["migrated"] and entry["mode"] is None
        assert entry["error"] == "the client disconnected before answering"
        # s1: the session is gone with its client. s2: the half session went with its link, and so
        # did the announcement (nothing can link to it any more).
        wait_until(lambda: not s1.spice.sessions and not s2.spice.sessions, what="both servers to clean up")
        assert sid not in s2.spice.migration.announcements
        assert not s2.spice.migration.expects(sid)
    finally:
        gate.gate.set()
        gate.stop()
    echo_ok(connect(s1))  # s1 goes on
    echo_ok(connect(s2))


def test_fault_unreachable_s2_is_a_connect_error_and_the_session_stays(nodes):
    s1, s2 = nodes(2)
    session, digest = session_with_held_sink(s1)
    with refused_port() as nobody:
        report = s1.migrate_to(s2, to=("127.0.0.1", nobody))
    entry = only_entry(report)
    assert report["stayed"] == 1 and not entry["migrated"]
    assert entry["error"] == "the client could not connect to the destination"
    client = session.migrations[-1]
    assert client["result"] == "connect-error" and any("refused" in e.lower() for e in client["errors"]), client
    assert not session.migrating and session.connected_to == s1.address
    assert s1.sessions()[session.session_id]["migration"] is None
    assert not s2.spice.sessions
    echo_ok(session)
    drain_sink(s1, session.session_id, 1 << 20, digest)
    session.close()


def test_fault_s2_dies_after_the_clients_ack_cancels_and_the_session_stays(nodes, procs, monkeypatch):
    (s1,) = nodes(1)
    s2 = procs("s2")
    session, digest = session_with_held_sink(s1)
    pack = orchestrator.pack_device_states

    def s2_dies_first(sessions, precopies=None, records=None):  # the clients answered CONNECTED_SEAMLESS; s2 goes
        assert session.migration_connected_event.is_set()         # before the POST
        s2.kill()
        return pack(sessions, precopies, records)

    monkeypatch.setattr(orchestrator, "pack_device_states", s2_dies_first)
    report = s1.migrate_to(s2)
    entry = only_entry(report)
    assert report["stayed"] == 1 and not entry["migrated"]
    assert entry["error"].startswith("device state could not reach the destination"), entry
    wait_until(lambda: not session.migrating, what="the client to take the MIGRATE_CANCEL")
    assert session.migrations[-1]["result"] == "cancelled"
    assert session.connected_to == s1.address
    view = s1.sessions()[session.session_id]
    assert view["migration"] is None and not any(p["device_stopped"] for p in view["ports"])
    echo_ok(session)
    drain_sink(s1, session.session_id, 1 << 20, digest)
    session.close()


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_fault_s2_fails_after_migrate_data_was_sent_rolls_back_to_s1_with_nothing_lost(
        nodes, procs, monkeypatch, fault):
    """s2 fails right after s1 sent the sink's MIGRATE_DATA (32 MiB of the sink's buffers).

    killed: its connections break at once. The client's relay into s2 fails, it reads the rest of
    the body from s1 and goes back to its s1 sockets; s1 finds s2 gone (refused status requests).
    frozen (SIGSTOP, a partition rather than a crash): nothing breaks. The client's relay stalls;
    s1's status requests time out until its migration deadline.

    Either way s1 resumes the session as it was at SPICE_MSG_MIGRATE (it still has the buffers) and
    sends MIGRATE_CANCEL, which the client reads on s1's main connection; what the client wrote
    meanwhile reaches s1 after it. The sink then drains every byte, in order, on s1."""
    (s1,) = nodes(1, limits=Limits(to_device=64 << 20))
    s2 = procs("s2", buffer_mib=64)
    session = connect(s1)
    sid = session.session_id
    held, digest = 32 << 20, hashlib.sha256()
    fill_paused_sink(s1, session, held, digest=digest)
    sink = session.open_port(SINK)  # the same port: written to again while the session is between servers
    send_migrate_data = SessionSource._send_migrate_data
    failed = []

    def then_s2_fails(self, channel):
        send_migrate_data(self, channel)
        if channel == (ChannelType.PORT, SINK_ID):
            s2.proc.send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
            failed.append(channel)

    monkeypatch.setattr(SessionSource, "_send_migrate_data", then_s2_fails)
    deadline = 30 if fault == "killed" else 3  # killed: found out long before any deadline
    try:
        migration = gevent.spawn(s1.migrate_to, s2, timeout=deadline)
        wait_until(lambda: failed, what="the sink's MIGRATE_DATA")
        late = os.urandom(300_000)  # written while the session is between servers
        sink.write(late)
        digest.update(late)
        report = migration.get(timeout=30)
        entry = only_entry(report)
        assert report["migrated"] == 0 and report["rolled_back"] == 1 and report["stayed"] == 1, report
        # The reason tells what ended the wait: a refused request to s2 (killed), or the deadline
        # (frozen: it never answers). Durations are not measured here.
        reason = "the destination is unreachable" if fault == "killed" else "the destination did not take"
        assert entry["error"].startswith(f"rolled back: {reason}"), entry
        assert entry["in_flight_bytes_moved"] >= held

        wait_until(lambda: not session.migrating, what="the client to take s1's MIGRATE_CANCEL")
        client = session.migrations[-1]
        assert client["result"] == "rolled-back", client
        assert session.connected_to == s1.address
        assert all(ch.sock.getpeername() == s1.address for _, ch in session.all_channels())
        view = s1.sessions()[sid]
        assert view["migration"] is None and not any(p["device_stopped"] for p in view["ports"])
        echo_ok(session)
        drain_sink(s1, sid, held + len(late), digest.hexdigest())
    finally:
        if fault == "frozen":
            s2.proc.send_signal(signal.SIGCONT)
    session.close()
    echo_ok(connect(s1))  # s1 serves new sessions


class CutProxy(ChoppyProxy):
    """Forwards plainly until ``cut_after`` bytes went toward ``target`` in all, then cuts every
    connection it carries: to the client, s2 has gone away; s2 itself is fine."""

    def __init__(self, target, cut_after: int) -> None:
        super().__init__(target, seed=3, p_small=0.0, fine=0, p_sleep=0.0)
        self.cut_after = cut_after
        self.toward_target = 0
        self.cut = gevent.event.Event()
        self._socks: list = []

    def _handle(self, client, addr) -> None:
        self._socks.append(client)
        super()._handle(client, addr)

    def _pump(self, src, dst, seed: int) -> None:
        if src not in self._socks:  # target -> client: as it comes
            super()._pump(src, dst, seed)
            return
        self._socks.append(dst)
        # a side that goes away ends the copy, as in ChoppyProxy
        with contextlib.suppress(OSError):
            while not self.cut.is_set() and (data := src.recv(1 << 16)):
                self.toward_target += len(data)
                if self.toward_target > self.cut_after:
                    self.cut.set()
                    for sock in self._socks:
                        with contextlib.suppress(OSError):  # it may be shut down or reset already
                            sock.shutdown(socket.SHUT_RDWR)
                    return
                dst.sendall(data)


def test_fault_client_loses_s2_mid_relay_rolls_back_through_s2s_report(nodes):
    """s2 stays up but the client loses every connection to it halfway through the sink's
    MIGRATE_DATA. The client returns to s1; s2 sees its half session go and reports it failed;
    s1 reads that, takes the session back and tells s2 to drop it. Nothing held is lost, and a second
    attempt then moves the session for good."""
    s1, s2 = nodes(2, limits=Limits(to_device=16 << 20))
    session, digest = session_with_held_sink(s1, held=8 << 20)
    sid = session.session_id
    proxy = CutProxy(s2.address, cut_after=2 << 20)
    try:
        report = s1.migrate_to(s2, to=proxy.address, timeout=10)
        assert proxy.cut.is_set()
    finally:
        proxy.stop()
    entry = only_entry(report)
    assert report["rolled_back"] == 1 and report["migrated"] == 0, report
    # s2's reason is whichever of the session's links it saw go first: a port before its state
    # was restored, or main.
    assert entry["error"] in (
        *(f"rolled back: port {cid} closed before its state was restored" for cid in (ECHO_ID, SINK_ID)),
        "rolled back: the client left the destination before the migration completed",
    ), entry
    wait_until(lambda: not session.migrating, what="the client to take s1's MIGRATE_CANCEL")
    assert session.migrations[-1]["result"] == "rolled-back", session.migrations[-1]
    # s2: nothing left of the session, and it cannot be linked to any more
    wait_until(lambda: not s2.spice.sessions, what="s2 to drop the half session")
    assert not s2.spice.migration.expects(sid) and sid in s2.spice.migration.failed
    echo_ok(session)
    # A second attempt starts clean, and carries the same held bytes over.
    again = only_entry(s1.migrate_to(s2, timeout=10))
    assert again["migrated"] and again["mode"] == "seamless", again
    wait_until(lambda: session.connected_to == s2.address, what="the client on s2")
    echo_ok(session)
    drain_sink(s2, sid, 8 << 20, digest)
    session.close()


class RawHolder:
    """A raw session (serverkit, no spicewire.client) whose main channel advertises the migration
    caps our client has, but which answers nothing unless told to: an echo port, and a paused sink
    holding ``held`` bytes. ``check()``: an echo round trip, then the sink drains them intact."""

    def __init__(self, node, held: int = 512 << 10) -> None:
        self.node = node
        self.raw = MainSession(node.address, channel_caps=ClientSession.channel_caps(ChannelType.MAIN))
        self.raw.attach_channels()
        self.main = self.raw.main
        self.session_id = self.raw.session_id
        self.echo = self.raw.open_port(ECHO_ID)
        self.sink = self.raw.open_port(SINK_ID)
        node.lever(self.session_id, SINK, "pause")
        self.held = os.urandom(held)
        self.sink.send_data(self.held)
        wait_until(lambda: node.port(self.session_id, SINK)["to_device_bytes"] == held, what="held bytes")

    def echo_ok(self) -> None:
        payload = os.urandom(100_000)
        assert echo_roundtrip(self.echo, payload) == payload

    def check(self) -> None:
        assert self.session_id in self.node.spice.sessions
        self.echo_ok()
        drain_sink(self.node, self.session_id, len(self.held), hashlib.sha256(self.held).hexdigest())

    def close(self) -> None:
        self.raw.close()


def test_fault_client_that_never_answers_begin_times_out_and_stays(nodes):
    s1, s2 = nodes(2)
    holder = RawHolder(s1)  # it never reads what s1 sends on main: BEGIN goes unanswered
    raw = holder.raw
    report = s1.migrate_to(s2, timeout=1)
    entry = only_entry(report)
    assert report["stayed"] == 1 and not entry["migrated"]
    assert entry["error"] == "the client could not connect to the destination"  # only the deadline says so
    assert raw.main.expect(m.MsgMainMigrateBeginSeamless).dst_info.port == s2.address[1]
    assert s1.sessions()[raw.session_id]["migration"] is None
    holder.check()
    # A late answer is cancelled (5.2), not taken for a protocol error.
    raw.main.send(m.MsgcMainMigrateConnectedSeamless())
    raw.main.expect(m.MsgMainMigrateCancel)
    holder.echo_ok()
    holder.close()


# --- 5. bad input during migration -------------------------------------------------------------------


def protocol_error_logged(caplog, sock, *needles: str) -> str:
    host, port = sock.getsockname()[:2]
    found = []

    def seen():
        found[:] = [r.getMessage() for r in caplog.records
                    if f"[{host}:{port}" in r.getMessage() and "protocol error" in r.getMessage()
                    and all(n in r.getMessage() for n in needles)]
        return bool(found)

    wait_until(seen, what=f"a protocol error logged for {host}:{port} with {needles}")
    return found[0]


def test_s1_flush_mark_without_migrate_is_a_protocol_error_for_that_connection_only(nodes, caplog):
    caplog.set_level(logging.INFO, logger="spicewire")
    s1, s2 = nodes(2)
    # Outside a migration.
    other = RawHolder(s1)
    raw = MainSession(s1.address)
    raw.attach_channels()
    port = raw.open_port(ECHO_ID)
    port.send(m.MsgcMigrateFlushMark())
    read_until_closed(port.sock)
    protocol_error_logged(caplog, port.sock, "MigrateFlushMark")
    raw.close()
    other.check()
    other.close()
    # During one: BEGIN went out to both sessions, SPICE_MSG_MIGRATE did not.
    other = RawHolder(s1)
    raw = RawHolder(s1)
    migration = gevent.spawn(s1.migrate_to, s2, timeout=1)
    raw.main.expect(m.MsgMainMigrateBeginSeamless)
    raw.echo.send(m.MsgcMigrateFlushMark())
    read_until_closed(raw.echo.sock)
    protocol_error_logged(caplog, raw.echo.sock, "MigrateFlushMark")
    report = migration.get(timeout=10)
    assert report["migrated"] == 0 and report["stayed"] == 2, report  # neither answered BEGIN
    raw.close()
    other.check()
    other.close()


def s2_target(s2, session_id: int):
    """A raw client linking to s2 as a seamless migration target would: the announcement s1 would
    have made, main with connection_id = the session id, DO_SEAMLESS and its ACK."""
    s2.api.post_json("/migration/announce", {"migration": f"{session_id:016x}", "ttl": 30, "sessions": [
        {"session_id": f"{session_id:08x}", "ports": [[ECHO_ID, ECHO, "echo"], [SINK_ID, SINK, "sink"]]}]})
    main = PortChannel.link(s2.address, session_id, ChannelType.MAIN, 0,
                            channel_caps=ClientSession.channel_caps(ChannelType.MAIN))
    main.send(m.MsgcMainMigrateDstDoSeamless(mig.MIGRATION_PROTOCOL_VERSION))
    main.expect(m.MsgMainMigrateDstSeamlessAck)
    return main


def test_s2_data_before_migrate_data_and_corrupt_migrate_data_are_protocol_errors(nodes, caplog):
    """Either fault is the client's: logged as its protocol error, and the arriving session ends as a
    whole (its migration is broken for good; s1 learns it failed). Nothing else on s2 notices."""
    caplog.set_level(logging.INFO, logger="spicewire")
    (s2,) = nodes(1)
    bystander = Bystander(s2.spice)
    # DATA where MIGRATE_DATA must come first.
    early = 0x51DE0001
    main = s2_target(s2, early)
    echo = PortChannel.link(s2.address, early, ChannelType.PORT, ECHO_ID)
    echo.send_raw(MsgcSpicevmc.DATA, b"too early")
    read_until_closed(echo.sock)
    protocol_error_logged(caplog, echo.sock, "before its MIGRATE_DATA")
    read_until_closed(main.sock)
    assert "before its MIGRATE_DATA" in s2.spice.migration.failed[early]
    # A MIGRATE_DATA that does not validate: a real SWPD with one byte of its magic changed.
    corrupt = 0x51DE0002
    main = s2_target(s2, corrupt)
    state = mig.PortMigrateData(ack_generation=1, ack_window=20, serial=1, pending=[b"held bytes"])
    body = bytearray(b"".join(piece.tobytes() for piece in mig.PortMigrateDataWriter(state).segments()))
    mig.parse_migrate_data(ChannelType.PORT, bytes(body))  # valid as built
    body[0] ^= 0xFF
    sink = PortChannel.link(s2.address, corrupt, ChannelType.PORT, SINK_ID)
    sink.send_raw(Msgc.MIGRATE_DATA, bytes(body))
    read_until_closed(sink.sock)
    protocol_error_logged(caplog, sink.sock, "MIGRATE_DATA")
    read_until_closed(main.sock)
    assert "MIGRATE_DATA" in s2.spice.migration.failed[corrupt]
    assert not any("internal error" in r.getMessage() for r in caplog.records)
    # s2 goes on: its other session, and new ones.
    bystander.check()
    bystander.close()
    echo_ok(connect(s2))


def test_seamless_migration_in_the_middle_of_a_large_echo_stream(procs):
    """`spicewire connect --send-mib 128 --expect-echo` (one greenlet writes, the program reads the
    echo) while the session migrates as soon as it exists: the switch lands mid-stream. What the
    client wrote during the switch is released after the relay; s2 restored more than its port
    limit, so it reads the client only once the echo drains. The client's reader must go on reading
    meanwhile and never block writing that backlog itself: it did, and then both sides waited on
    each other for ever (the echo stalled and connect timed out)."""
    s1, s2 = procs("s1"), procs("s2")
    host, port = s1.address
    connect_cmd = [sys.executable, "-m", "spicewire", "connect", f"{host}:{port}", "--port-channel", ECHO,
                   "--send-mib", "128", "--expect-echo", "--timeout", "60"]
    client = subprocess.Popen(connect_cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        def streaming() -> bool:
            sessions = s1.sessions()
            return any(port["name"] == ECHO and port["connected"] and port["device"]["bytes_in"] > 0
                       for session in sessions.values() for port in session["ports"])

        # As soon as the stream runs: a session migrated before its port linked would move no stream.
        wait_until(streaming, what="the echo stream to start on s1")
        entry = only_entry(s1.migrate_to(s2))
        out, _ = client.communicate(timeout=90)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    report = json.loads(out)
    assert entry["migrated"] and entry["mode"] == "seamless", entry
    assert report["ok"], report
    assert report["sha256_received"] == report["sha256_sent"]


# --- 6. back and forth, and many at once -------------------------------------------------------------


def test_twenty_sessions_migrate_in_one_command_and_straight_back(nodes):
    s1, s2 = nodes(2)
    sessions, digests = [], {}
    for _ in range(20):
        session, digest = session_with_held_sink(s1, held=256 << 10)
        sessions.append(session)
        digests[session.session_id] = digest
    there = s1.migrate_to(s2)
    assert there["migrated"] == 20 and there["stayed"] == 0, there
    for session in sessions:
        assert session.wait_migrated(10)["result"] == "completed"
    # Straight back: s1 takes the sessions it has just let go of (its announcements are per visit).
    back = s2.migrate_to(s1)
    assert back["migrated"] == 20 and back["stayed"] == 0, back
    for entry in (*there["sessions"], *back["sessions"]):
        assert entry["mode"] == "seamless" and entry["in_flight_bytes_moved"] >= 256 << 10, entry
    for session in sessions:
        wait_until(lambda s=session: len(s.migrations) == 2 and not s.migrating, what="the return")
        assert [r["result"] for r in session.migrations] == ["completed", "completed"]
        assert session.connected_to == s1.address
    wait_until(lambda: not s2.spice.sessions, what="s2 to let go of every session")
    assert set(s1.spice.sessions) == set(digests)
    for session in sessions:
        echo_ok(session)
        drain_sink(s1, session.session_id, 256 << 10, digests[session.session_id])
        assert [h["role"] for h in s1.sessions()[session.session_id]["migrations"]] == ["destination"]
        session.close()
