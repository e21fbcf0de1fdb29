"""Faults during a migration end in a known state (issue 9): the session on s1 or on s2, its bytes in
order, a report that says which, and no memory left behind on s2.

s2 is a ``spicewire serve`` subprocess where it must freeze (SIGSTOP) or where its memory is
measured (VmRSS in /proc/PID/status); s1 and the client run in this process, as in test_migration.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct

import gevent
import gevent.event
import pytest
from gevent import socket
from gevent.server import StreamServer

from spicewire.client import migration as client_migration
from spicewire.protocol.enums import ChannelType
from spicewire.server.migration import SessionSource
from spicewire.server.migration import precopy as precopy_module
from spicewire.server.migration.destination import migrate_data_limit
from spicewire.server.session import Limits

from .serverkit import PortChannel, read_exactly, read_until_closed, wait_until
from .test_migration import ECHO, SINK, SINK_ID, connect, drain_sink, echo_ok, fill_paused_sink, only_entry, procs  # noqa: F401
from .test_migration_control import link_target, migrate_data_head, raw_post

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def deadline(request):
    with gevent.Timeout(60, AssertionError(f"{request.node.name} took longer than 60 s")):
        yield


def write_through_the_switch(sink, digest) -> tuple[list[int], gevent.event.Event, gevent.Greenlet]:
    """The application writes into the sink before, through and after the switch (up to 24 MiB,
    hashed into ``digest``): the count written so far, the event that stops it, its greenlet."""
    written = [0]
    done = gevent.event.Event()

    def writer() -> None:
        piece = os.urandom(64 << 10)
        while not done.is_set() and written[0] < 24 << 20:
            sink.write(piece)
            digest.update(piece)
            written[0] += len(piece)
            gevent.sleep(0.002)

    return written, done, gevent.spawn(writer)


def assert_rolled_back_in_order(s1, session, report, total: int, digest) -> None:
    """s1 took the session back, the client heard it, and the sink on s1 drains all ``total``
    bytes in the order they were written."""
    entry = only_entry(report)
    assert report["rolled_back"] == 1 and report["migrated"] == 0, report
    assert entry["error"].startswith("rolled back: "), entry
    wait_until(lambda: not session.migrating, timeout=20, what="the client to take s1's MIGRATE_CANCEL")
    assert session.migrations[-1]["result"] == "rolled-back", session.migrations[-1]
    drain_sink(s1, session.session_id, total, digest.hexdigest())
    echo_ok(session)


@pytest.mark.parametrize("when, precopy", [("before-relay", True), ("before-relay", False), ("mid-relay", False)])
def test_s2_frozen_around_the_relay_of_a_big_migrate_data_rolls_back_in_order(
        nodes, procs, monkeypatch, when, precopy):  # noqa: F811  (procs: the fixture imported above)
    """s2 stops (SIGSTOP) as s1 starts the sink's MIGRATE_DATA or when half of it has left s1,
    while the application writes into the sink through the whole switch: s1's deadline passes and
    it rolls the session back. Every byte reaches the sink on s1, in order (the SHA-256 of
    everything written, held first). Without the port pre-copy the whole 128 MiB backlog is in
    that MIGRATE_DATA, relayed by the client; with it, most went to s2 beforehand."""
    if not precopy:
        monkeypatch.setattr(precopy_module, "PRECOPY_MIN", 1 << 62)
    held = 128 << 20
    (s1,) = nodes(1, limits=Limits(to_device=held + (32 << 20)))
    s2 = procs("s2", buffer_mib=(held >> 20) + 32)
    session = connect(s1)
    digest = hashlib.sha256()
    fill_paused_sink(s1, session, held, digest=digest)
    sink = session.open_port(SINK)
    frozen = gevent.event.Event()
    send_migrate_data = SessionSource._send_migrate_data

    def freeze_s2() -> None:
        s2.proc.send_signal(signal.SIGSTOP)
        frozen.set()

    def freeze_as_it_goes(self, channel):
        if channel != (ChannelType.PORT, SINK_ID):
            send_migrate_data(self, channel)
            return
        if when == "before-relay":
            freeze_s2()
        send_migrate_data(self, channel)
        transport = self.session.ports[SINK_ID].connection.transport
        left = transport.pending_write // 2

        def watch() -> None:
            while transport.pending_write > left and not transport.closed:
                gevent.sleep(0.001)
            freeze_s2()

        if when == "mid-relay":
            gevent.spawn(watch)

    monkeypatch.setattr(SessionSource, "_send_migrate_data", freeze_as_it_goes)
    written, done, writing = write_through_the_switch(sink, digest)
    try:
        report = s1.migrate_to(s2, timeout=4)
        done.set()
        writing.get()
        assert frozen.is_set(), report
        assert_rolled_back_in_order(s1, session, report, held + written[0], digest)
        assert session.connected_to == s1.address
    finally:
        done.set()
        s2.proc.send_signal(signal.SIGCONT)
        s2.kill()
    session.close()


def test_s2_frozen_as_the_client_relays_between_server_processes(procs, monkeypatch):  # noqa: F811
    """The same between two ``spicewire serve`` processes (s1 writes while the client relays, each
    on a core of its own): s2 stops as the client starts relaying the sink's MIGRATE_DATA."""
    held = 128 << 20
    s1 = procs("s1", buffer_mib=(held >> 20) + 32)
    s2 = procs("s2", buffer_mib=(held >> 20) + 32)
    session = connect(s1)
    digest = hashlib.sha256()
    fill_paused_sink(s1, session, held, digest=digest)
    sink = session.open_port(SINK)
    frozen = gevent.event.Event()
    relay = client_migration.MigrationDriver._relay

    def relay_then_freeze(self, ev):
        if ev.channel == (ChannelType.PORT, SINK_ID) and not frozen.is_set():
            s2.proc.send_signal(signal.SIGSTOP)
            frozen.set()
        return relay(self, ev)

    monkeypatch.setattr(client_migration.MigrationDriver, "_relay", relay_then_freeze)
    written, done, writing = write_through_the_switch(sink, digest)
    try:
        report = s1.migrate_to(s2, timeout=4)
        done.set()
        writing.get()
        assert frozen.is_set(), report
        assert_rolled_back_in_order(s1, session, report, held + written[0], digest)
    finally:
        done.set()
        s2.proc.send_signal(signal.SIGCONT)
        s2.kill()
    session.close()


# --- a destination whose control API says nothing useful ------------------------------------------


EMPTY_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class BlankingControl:
    """s2's control API behind a proxy that passes each request on (or not, ``forward``) and
    answers those whose path starts with ``blank`` with ``answer`` instead of s2's: an empty 200,
    or nothing at all (b""). The others get s2's own answer."""

    def __init__(self, target: tuple[str, int], answer: bytes, forward: bool, blank: str = "/") -> None:
        self.target, self.answer, self.forward, self.blank = target, answer, forward, blank
        self.paths: list[str] = []
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.address = self.server.address[:2]

    def _handle(self, sock, _addr) -> None:
        with sock:
            request = bytearray()
            while b"\r\n\r\n" not in request and (chunk := sock.recv(65536)):
                request += chunk
            head = bytes(request).partition(b"\r\n\r\n")[0].decode("latin-1")
            length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                           if line.lower().startswith("content-length:")), 0)
            while len(request) < len(head) + 4 + length and (chunk := sock.recv(65536)):
                request += chunk
            path = head.split()[1]
            self.paths.append(path)
            blanked = path.startswith(self.blank)
            answer = bytearray()
            if self.forward or not blanked:
                with socket.create_connection(self.target, timeout=10) as s2:
                    s2.sendall(request)
                    while chunk := s2.recv(65536):
                        answer += chunk
            sock.sendall(self.answer if blanked else answer)

    def stop(self) -> None:
        self.server.stop()


@pytest.mark.parametrize("answer", [EMPTY_200, b""], ids=["empty-200", "no-answer"])
@pytest.mark.parametrize("forward", [False, True], ids=["s2-asked-nothing", "s2-acts"])
def test_a_destination_control_api_answering_empty_is_a_502_and_the_session_stays(nodes, answer, forward):
    """s2's control API answers every call with an empty body (or closes without a word): /migrate
    is a 502 that names the address (never a 500), the session stays on s1 and works, and whatever
    s2 registered is gone (s1 aborts it; the announcement's ttl would end it otherwise)."""
    s1, s2 = nodes(2)
    session = connect(s1)
    proxy = BlankingControl(s2.control_address, answer, forward)
    try:
        status, report = raw_post(s1, "/migrate", json.dumps({
            "to": "{}:{}".format(*s2.address), "to_control": "{}:{}".format(*proxy.address), "timeout": 5,
            "to_peer_token": s2.peer_token}))
    finally:
        proxy.stop()
    where = "{}:{}".format(*proxy.address)
    assert status == 502 and where in report["error"], report
    assert proxy.paths[0] == "/migration/announce" and "/migration/abort" in proxy.paths, proxy.paths
    assert not any(path.startswith("/migration/device-state") for path in proxy.paths), proxy.paths
    view = s1.sessions()[session.session_id]
    assert view["migration"] is None and not any(p["device_stopped"] for p in view["ports"])
    assert not session.migrating and session.connected_to == s1.address
    echo_ok(session)
    assert not s2.spice.migration.announcements and not s2.spice.sessions
    session.close()


# --- one migration at a time ----------------------------------------------------------------------


def test_a_second_migrate_while_one_runs_is_a_409_and_changes_nothing(nodes, monkeypatch):
    """Two /migrate on one server at once would BEGIN the same clients twice. The second is refused
    (409, naming the running migration) while the first is held in its announcement; the first then
    moves the session, once, with its echo stream intact, and the server takes the next one."""
    s1, s2 = nodes(2)
    session = connect(s1)
    echo = session.open_port(ECHO)
    announce = s2.spice.migration.announce
    entered, release = gevent.event.Event(), gevent.event.Event()

    def held(*args, **kwargs):
        entered.set()
        release.wait()
        return announce(*args, **kwargs)

    monkeypatch.setattr(s2.spice.migration, "announce", held)
    sent = os.urandom(1 << 20)
    echo.write(sent[: len(sent) // 2])
    first = gevent.spawn(s1.migrate_to, s2, timeout=10)
    try:
        entered.wait()
        status, answer = raw_post(s1, "/migrate", json.dumps({
            "to": "{}:{}".format(*s2.address), "to_control": "{}:{}".format(*s2.control_address), "timeout": 10,
            "to_peer_token": s2.peer_token}))
        assert status == 409 and "one at a time" in answer["error"], answer
        # The refused one touched nothing; the first has not sent BEGIN yet (it is announcing).
        assert s1.sessions()[session.session_id]["migration"] is None and not session.migrating
    finally:
        release.set()
    report = first.get()
    assert only_entry(report)["migrated"] and report["migrated"] == 1, report
    wait_until(lambda: session.connected_to == s2.address, what="the client on s2")
    echo.write(sent[len(sent) // 2:])
    assert read_exactly(echo, len(sent)) == sent
    assert list(s2.spice.sessions) == [session.session_id] and not s1.spice.sessions
    monkeypatch.undo()
    back = s2.migrate_to(s1, timeout=10)  # s2's manager is free; and s1's is again
    assert only_entry(back)["migrated"], back
    wait_until(lambda: session.connected_to == s1.address, what="the client back on s1")
    echo_ok(session)
    session.close()


# --- no memory left on s2 -------------------------------------------------------------------------


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) << 10


def wait_rss_near(pid: int, idle: int) -> None:
    wait_until(lambda: vm_rss(pid) - idle < 32 << 20, timeout=15,
               what=f"s2's RSS back near idle ({idle >> 20} MiB; {vm_rss(pid) >> 20} MiB now)")


def test_s2_lets_go_of_a_migration_whose_client_died_mid_relay(nodes, procs, monkeypatch):  # noqa: F811
    """The client dies halfway through relaying the sink's 160 MiB MIGRATE_DATA (every socket of it
    reset at once). The half-received body and the announcement's prefault go with the session: s2's
    RSS returns near its idle level; s1 keeps the session's state until its own client is gone."""
    monkeypatch.setattr(precopy_module, "PRECOPY_MIN", 1 << 62)  # the whole backlog in MIGRATE_DATA
    held = 160 << 20
    (s1,) = nodes(1, limits=Limits(to_device=held + (16 << 20)))
    s2 = procs("s2", buffer_mib=(held >> 20) + 16)
    idle = vm_rss(s2.proc.pid)
    session = connect(s1)
    fill_paused_sink(s1, session, held)
    peak = [0]

    def die_halfway(source, out, count, what):
        if what != f"port:{SINK_ID}":
            return relay(source, out, count, what)
        relay(source, out, count // 2, what)
        wait_until(lambda: vm_rss(s2.proc.pid) - idle > held // 4, what="s2 holding the half it received")
        peak[0] = vm_rss(s2.proc.pid)
        for _, channel in session.all_channels():
            channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        out.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gevent.spawn(session.close)  # not from inside the relay's own greenlet
        raise ConnectionError("the client died")

    relay = client_migration.relay
    monkeypatch.setattr(client_migration, "relay", die_halfway)
    report = s1.migrate_to(s2, timeout=10)
    assert peak[0] - idle > held // 4
    assert report["migrated"] == 0, report
    wait_until(lambda: not s2.api.get_json("/sessions")["sessions"], what="s2 to drop the half session")
    wait_rss_near(s2.proc.pid, idle)


@pytest.mark.parametrize("in_flight", [7 << 29, 0], ids=["announced-3.5-GiB", "announced-nothing"])
def test_a_migrate_data_declaring_4_gib_holds_nothing_once_its_client_hung_up(procs, in_flight):  # noqa: F811
    """A target client declares a MIGRATE_DATA of almost 4 GiB. Where the announcement allows it,
    s2 takes the first 256 MiB, then the client hangs up; where it does not, s2 refuses it at its
    header. Either way s2 ends the half session and its RSS returns near idle."""
    s2 = procs("s2")
    idle = vm_rss(s2.proc.pid)
    sid = 0x4C1B0000
    main = link_target(s2, sid, in_flight=in_flight)
    sink = PortChannel.link(s2.address, sid, ChannelType.PORT, SINK_ID)
    declared = (4 << 30) - 64
    try:
        if in_flight:
            assert declared <= migrate_data_limit(in_flight, Limits())
            sink.send_bytes(migrate_data_head(sink, declared))
            piece = bytes(1 << 20)
            for _ in range(256):
                sink.send_bytes(piece)
            wait_until(lambda: vm_rss(s2.proc.pid) - idle > 128 << 20, timeout=15, what="s2 holding what it received")
        else:
            sink.send_bytes(migrate_data_head(sink, declared) + bytes(1 << 20))
            read_until_closed(sink.sock)  # refused at its header
    finally:
        sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sink.close()
        main.close()
    wait_until(lambda: not s2.api.get_json("/sessions")["sessions"], what="s2 to end the half session")
    wait_rss_near(s2.proc.pid, idle)


def test_s2_dies_mid_relay_while_its_landing_reports_are_empty_rolls_back_in_order(nodes, procs, monkeypatch):  # noqa: F811
    """s2 takes the announcement and the device state, but answers every "have they landed?" with an
    empty body; then it dies as the client starts relaying the sink's MIGRATE_DATA. s1 counts the
    empty answers as failed requests, takes the session back (not a 500, not a session lost on both
    servers), and the sink drains every byte on s1, in order."""
    monkeypatch.setattr(precopy_module, "PRECOPY_MIN", 1 << 62)  # the whole backlog in MIGRATE_DATA
    held = 32 << 20
    (s1,) = nodes(1, limits=Limits(to_device=held + (16 << 20)))
    s2 = procs("s2", buffer_mib=(held >> 20) + 16)
    session = connect(s1)
    digest = hashlib.sha256()
    fill_paused_sink(s1, session, held, digest=digest)
    relay = client_migration.MigrationDriver._relay

    def s2_dies(self, ev):
        if ev.channel == (ChannelType.PORT, SINK_ID):
            s2.kill()
        return relay(self, ev)

    monkeypatch.setattr(client_migration.MigrationDriver, "_relay", s2_dies)
    proxy = BlankingControl(s2.control_address, EMPTY_200, forward=False, blank="/migration/completed")
    try:
        status, report = raw_post(s1, "/migrate", json.dumps({
            "to": "{}:{}".format(*s2.address), "to_control": "{}:{}".format(*proxy.address), "timeout": 10,
            "to_token": s2.token}))
    finally:
        proxy.stop()
    assert status == 200, report
    entry = only_entry(report)
    assert report["rolled_back"] == 1 and report["lost"] == 0, report
    assert entry["error"].startswith("rolled back: the destination is unreachable"), entry
    assert "/migration/completed" in " ".join(proxy.paths)
    wait_until(lambda: not session.migrating, what="the client to take s1's MIGRATE_CANCEL")
    assert session.migrations[-1]["result"] == "rolled-back", session.migrations[-1]
    drain_sink(s1, session.session_id, held, digest.hexdigest())
    echo_ok(session)
    session.close()
