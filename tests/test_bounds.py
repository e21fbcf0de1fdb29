"""What one client can take from the others: queued bytes, the hub, the port limit, the memory
budget and the memory left behind.

Each flood case keeps flooding while a bystander session does an echo round trip and a sink
checked by SHA-256, and while the control API is asked for /status. The guarantees are asserted on
the server's own state and counters (unread_closed, flood_reads, the budget), never on timing:
speed goals are in benchmarks/bench_hostile.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import gevent
import pytest
from gevent import socket

from spicewire.control.client import ControlClient
from spicewire.control.server import ControlServer
from spicewire.errors import LinkError
from spicewire.protocol import messages as m
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import ChannelType, LinkErr
from spicewire.protocol.framing import MINI_HEADER
from spicewire.server import budget as budget_module
from spicewire.server.budget import TRIM_IDLE, MemoryBudget, default_limit
from spicewire.server.net import (
    FLOOD_MESSAGES,
    FLOOD_READ,
    RECV_BUFFER,
    Connection,
    ServerConfig,
    SpiceServer,
    next_read_size,
)
from spicewire.server.session import Limits, PortState
from tests.served import bound_addresses
from tests.serverkit import (
    DEFAULT_PORTS,
    ECHO,
    SINK,
    Bystander,
    MainSession,
    PortChannel,
    RawChannel,
    echo_roundtrip,
    port_state,
    running_server,
    sha256,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


def control_of(server):
    control = ControlServer(server, "127.0.0.1", 0)
    control.start()
    return control


def control_answers(control) -> None:
    status = ControlClient(*control.address, timeout=10).get_json("/status")
    assert status["sessions"] >= 1, status


def frames(channel: RawChannel, msg: m.Message, count: int) -> bytes:
    """``count`` framed copies of ``msg``, numbered as the channel goes on."""
    for _ in range(count):
        channel.channel.send(msg)
    return b"".join(channel.channel.data_to_send())


class Flood:
    """Writes ``count`` copies of ``msg`` onto a channel's socket again and again, never reading,
    until stopped or refused. The frames are made once: with mini headers (no serials) they are
    the same every time, and the flood costs this process nothing but the writes."""

    def __init__(self, channel: RawChannel, msg: m.Message, count: int = 20_000) -> None:
        assert channel.channel.sends_mini_header
        self.channel = channel
        self.sent = 0
        self.ended: str | None = None
        self._greenlet = gevent.spawn(self._run, frames(channel, msg, count))

    def _run(self, blob: bytes) -> None:
        try:
            while True:
                self.channel.sock.sendall(blob)
                self.sent += len(blob)
        except OSError as err:
            self.ended = str(err) or type(err).__name__

    @property
    def running(self) -> bool:
        return not self._greenlet.dead

    def stop(self) -> None:
        self._greenlet.kill()
        self.channel.close()


def connection_of(server, handler):
    (conn,) = [c for c in server.connections if c.handler is handler]
    return conn


# --- floods ----------------------------------------------------------------------------------


def test_a_main_channel_that_asks_and_never_reads_is_stopped_then_closed():
    queue_limit = 64 << 10
    # Many ports make each CHANNELS_LIST 68 times its request: the megabytes TCP takes toward a
    # client that reads nothing fill in a moment, and then the server's own queue does.
    ports = [*DEFAULT_PORTS, *((f"org.test.sink{i}", "sink") for i in range(200))]
    with running_server(queue_limit=queue_limit, stall_timeout=2.0, port_channels=ports) as server:
        control = control_of(server)
        try:
            hostile = RawChannel.link(server.address, 0, ChannelType.MAIN, bufsize=4096)
            init = hostile.expect(m.MsgMainInit)
            main = server.sessions[init.session_id].main
            conn = connection_of(server, main)
            request = frames(hostile, m.MsgcMainAttachChannels(), 1)
            reply = len(main.channel.writer.frame(0, m.MsgMainChannelsList(server.sessions[init.session_id]
                                                                            .channel_ids()).encode()))
            flood = Flood(hostile, m.MsgcMainAttachChannels(), 2000)
            wait_until(lambda: conn.queued >= queue_limit, what="the unread replies to reach the queue limit")
            # Reading stopped at the limit: at most the replies to one read came on top of it.
            bound = queue_limit + RECV_BUFFER // len(request) * reply
            peak = server.budget.peak
            assert queue_limit <= peak <= bound, (peak, bound)

            bystander = Bystander(server)
            bystander.check()
            control_answers(control)
            assert flood.running and server.unread_closed == 0  # still there, only not read

            wait_until(lambda: server.unread_closed == 1, what="the client that reads nothing to be closed")
            wait_until(lambda: not flood.running, what="the flood to be refused")
            assert init.session_id not in server.sessions
            wait_until(lambda: server.budget.used == bystander_held(server), what="its queue to be released")
            assert bystander.session.session_id in server.sessions
            bystander.close()
        finally:
            control.stop()


@pytest.mark.parametrize("over", [-1, 0, 1])
def test_a_connection_is_read_only_while_its_queue_is_under_the_limit(over):
    """Frames of a known size queued one byte under, at and over the queue limit (no writer runs,
    so they stay): reading goes on under the limit only, and the budget holds every queued byte."""
    limit = 4096
    server = SpiceServer(ServerConfig(host="127.0.0.1", port=0, queue_limit=limit))
    near, far = socket.socketpair()
    try:
        conn = Connection(server, near, ("127.0.0.1", 1))
        channel = conn.channel = ChannelConnection(Side.SERVER, ChannelType.MAIN, 0, send_mini=True,
                                                   expect_mini=True)
        channel.send_raw(1, b"x" * (limit + over - MINI_HEADER.size))
        conn.flush()
        assert conn.queued == server.budget.used == limit + over
        waiter = gevent.spawn(conn._wait_for_reading, SimpleNamespace(reading_allowed=True))
        gevent.idle()  # it runs until it returns or waits
        assert waiter.dead is (over < 0)
        conn.close("test over")
        waiter.get(timeout=5)
    finally:
        near.close()
        far.close()


@pytest.mark.parametrize(("average", "want"), [
    (FLOOD_READ // FLOOD_MESSAGES - 1, FLOOD_READ),  # small messages: the floor
    (FLOOD_READ // FLOOD_MESSAGES, FLOOD_READ),
    (FLOOD_READ // FLOOD_MESSAGES + 1, FLOOD_READ + FLOOD_MESSAGES),
    (RECV_BUFFER // FLOOD_MESSAGES - 1, RECV_BUFFER - FLOOD_MESSAGES),
    (RECV_BUFFER // FLOOD_MESSAGES, RECV_BUFFER),
    (RECV_BUFFER // FLOOD_MESSAGES + 1, RECV_BUFFER),  # large messages: the ceiling
])
def test_the_next_read_holds_about_flood_messages_of_the_last_reads_size(average, want):
    count = 10
    assert next_read_size(average * count, count) == want


def test_a_read_that_completed_no_message_is_followed_by_a_full_one():
    assert next_read_size(FLOOD_READ, 0) == RECV_BUFFER


def bystander_held(server) -> int:
    return sum(port.in_flight for session in server.sessions.values() for port in session.ports.values())


@pytest.mark.parametrize("case", ["pong_on_main", "ack_on_port"])
def test_a_flood_of_small_messages_is_read_in_small_pieces_and_others_go_on(case):
    with running_server() as server:
        control = control_of(server)
        try:
            hostile = MainSession(server.address)
            hostile.attach_channels()
            if case == "pong_on_main":
                channel, msg = hostile.main, m.MsgcPong(1, 2)
            else:
                channel, msg = hostile.open_port(ECHO, auto_ack=False), m.MsgcAck()
            flood = Flood(channel, msg)
            wait_until(lambda: server.flood_reads >= 1, what="the flood to be noticed")
            bystander = Bystander(server)
            bystander.check()
            control_answers(control)
            assert flood.running, flood.ended  # the bystander came through while the flood went on
            assert hostile.session_id in server.sessions  # a flood of valid messages is throttled, not closed
            flood.stop()
            bystander.close()
            hostile.close()
        finally:
            control.stop()


def test_a_client_streaming_into_a_sink_leaves_room_for_the_others():
    with running_server() as server:
        control = control_of(server)
        try:
            hostile = MainSession(server.address)
            hostile.attach_channels()
            sink = hostile.open_port(SINK)
            device = port_state(server, hostile.session_id, SINK).device
            block = os.urandom(64 << 10)
            flood = Flood(sink, m.MsgcSpicevmcData(block), 16)
            wait_until(lambda: device.bytes_in >= 8 << 20, what="the stream to flow")
            bystander = Bystander(server)
            bystander.check()
            control_answers(control)
            assert flood.running, flood.ended
            flood.stop()
            bystander.close()
            hostile.close()
        finally:
            control.stop()


# --- the per-port limit ----------------------------------------------------------------------


def held_by(port: PortState) -> int:
    """Client bytes the port holds: buffered for the device, and of a message received in part."""
    return port.to_device_bytes + (port.connection.receiving if port.connection else 0)


class Watch:
    """The most ``held_by(port)`` was, sampled every 0.1 ms while it runs (on a timer: a greenlet
    spinning on sleep(0) would keep the server's idle() yields from ever coming back)."""

    def __init__(self, port: PortState) -> None:
        self.port = port
        self.most = 0
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            self.most = max(self.most, held_by(self.port))
            gevent.sleep(0.0001)

    def stop(self) -> int:
        self._greenlet.kill()
        return self.most


LIMIT = 1 << 20


@pytest.mark.parametrize("over_room", [-1, 0, 1, LIMIT // 2])
def test_a_port_holds_its_limit_plus_one_read_whatever_the_message_size(over_room):
    """The sink holds half its limit; then one message one byte under, at and over the room left,
    and one of the whole limit (twice the room)."""
    with running_server(limits=Limits(to_device=LIMIT)) as server, MainSession(server.address) as session:
        session.attach_channels()
        sink = session.open_port(SINK, bufsize=64 << 10)
        port = port_state(server, session.session_id, SINK)
        port.device.pause()
        first = os.urandom(LIMIT // 2)
        sink.send_data(first, chunk=len(first))
        wait_until(lambda: port.to_device_bytes == len(first), what="the first message")
        second = os.urandom(LIMIT - len(first) + over_room)
        watch = Watch(port)
        writer = gevent.spawn(sink.send_data, second, len(second))
        if over_room > 0:
            # Reading stops once the port is at its limit, the rest waiting in TCP: whether the
            # last byte of a message one over came in the same read depends on how TCP cut it.
            wait_until(lambda: not port.reading_allowed, what="reading to stop at the limit")
            assert LIMIT <= held_by(port) < LIMIT + RECV_BUFFER
            if over_room >= RECV_BUFFER:
                assert port.to_device_bytes == len(first)  # stopped inside the message
        else:
            writer.get()
            wait_until(lambda: port.to_device_bytes == len(first) + len(second), what="the second message")
        assert watch.most < LIMIT + RECV_BUFFER
        port.device.resume()
        writer.get()
        wait_until(lambda: port.device.bytes_in == len(first) + len(second), what="the sink to drain")
        assert watch.stop() < LIMIT + RECV_BUFFER
        assert port.device.status()["sha256"] == sha256(first + second)


@pytest.mark.parametrize("size", [LIMIT - 1, LIMIT, LIMIT + 1])
def test_a_message_larger_than_the_port_limit_is_refused(size):
    with running_server(limits=Limits(to_device=LIMIT)) as server, MainSession(server.address) as session:
        session.attach_channels()
        sink = session.open_port(SINK)
        port = port_state(server, session.session_id, SINK)
        data = os.urandom(size)
        writer = gevent.spawn(sink.send_data, data, size)
        if size > LIMIT:
            sink.wait_closed()
            assert port.device.bytes_in == 0 and port.to_device_bytes == 0
            assert session.session_id in server.sessions  # the port's connection alone ended
        else:
            writer.get()
            wait_until(lambda: port.device.bytes_in == size, what="the message to reach the sink")
            assert port.device.status()["sha256"] == sha256(data)
        writer.kill()


# --- the memory budget -----------------------------------------------------------------------


def test_budget_accounting_below_at_and_over_the_limit():
    budget = MemoryBudget(100)
    resumed = []
    budget.reserve(99)
    assert not budget.exhausted and budget.admits() and not budget.admits(2) and budget.admits(1)
    budget.wait_for_room(lambda: resumed.append("at once"))
    assert resumed == ["at once"]
    budget.reserve(1)
    assert budget.exhausted and not budget.admits()
    budget.reserve(1)  # never refused: accepted bytes are not dropped
    assert budget.used == 101 and budget.peak == 101
    budget.wait_for_room(lambda: resumed.append("later"))
    budget.release(1)
    assert resumed == ["at once"]  # at the limit still
    budget.release(1)
    assert resumed == ["at once", "later"] and not budget.exhausted
    assert budget.status() == {"limit": 100, "used": 99, "peak": 101, "refused": 2, "throttled": 1}
    with pytest.raises(ValueError):
        budget.release(100)
    with pytest.raises(ValueError):
        budget.reserve(-1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            MemoryBudget(bad)
    with pytest.raises(ValueError):
        ServerConfig(port=0, memory_budget=0)


def test_the_default_budget_is_a_quarter_of_the_memory():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert default_limit() == total // budget_module.DEFAULT_SHARE
    assert MemoryBudget().limit == default_limit()


@pytest.mark.parametrize("freed, due", [(TRIM_IDLE - 1, False), (TRIM_IDLE, True), (TRIM_IDLE + 1, True)])
def test_freed_heap_is_trimmed_once_all_is_released(freed, due):
    budget = MemoryBudget(1 << 30)
    budget.reserve(freed)
    budget.release(freed - 10)
    assert not budget.trim_due(1 << 30)  # something is still held and far under the threshold
    budget.release(10)
    assert budget.trim_due(1 << 30) is due
    assert not budget.trim_due(1 << 30)  # said once


def test_at_the_budget_reading_stops_new_sessions_are_refused_and_nothing_is_dropped():
    limit = 2 << 20
    with running_server(memory_budget=limit, limits=Limits(to_device=8 << 20)) as server, \
            MainSession(server.address) as session:
        session.attach_channels()
        sink = session.open_port(SINK, bufsize=64 << 10)
        port = port_state(server, session.session_id, SINK)
        port.device.pause()
        data = os.urandom(16 << 20)  # more than the budget and what TCP buffers on loopback take
        writer = gevent.spawn(sink.send_data, data)
        wait_until(lambda: server.budget.exhausted, what="the budget to be spent")
        wait_until(lambda: server.budget.throttled >= 1, what="the sink's reading to stop")
        assert limit <= port.to_device_bytes < limit + RECV_BUFFER
        assert not writer.dead  # the rest waits in TCP, not in the server

        with pytest.raises(LinkError) as refused:
            MainSession(server.address)
        assert refused.value.code == LinkErr.ERROR
        assert server.budget.refused == 1

        port.device.resume()
        writer.get()
        wait_until(lambda: port.device.bytes_in == len(data), what="the sink to take everything")
        assert port.device.status()["sha256"] == sha256(data)
        assert server.budget.used == 0
        with MainSession(server.address) as later:  # under the budget again: sessions come in
            assert later.session_id in server.sessions


def test_port_buffers_and_queues_are_reserved_and_released():
    """Echo traffic through a client that reads nothing: the port's buffers and the connection's
    queue are in the budget while held, and all of it is released when the session ends."""
    with running_server(limits=Limits(to_device=1 << 20, to_client=1 << 20)) as server:
        session = MainSession(server.address)
        session.attach_channels()
        echo = session.open_port(ECHO, bufsize=16 << 10)
        port = port_state(server, session.session_id, ECHO)
        writer = gevent.spawn(echo.send_data, os.urandom(1 << 20) * 24)  # more than TCP buffers take
        wait_until(lambda: not port.reading_allowed, what="the echo to back up")
        conn = port.connection.transport
        assert server.budget.used == port.to_device_bytes + port.to_client_bytes + conn.queued
        writer.kill()
        session.close()
        wait_until(lambda: not server.sessions, what="the session to end")
        wait_until(lambda: not server.connections, what="its connections to end")
        assert server.budget.used == 0


# --- many sessions ---------------------------------------------------------------------------


SESSIONS = 200


def link_failures(server) -> float:
    return sum(sample.value for metric in server.metrics.link_failures.collect() for sample in metric.samples
               if sample.name.endswith("_total"))


def many_sessions(server, count: int) -> list[tuple[MainSession, PortChannel]]:
    out = []
    for _ in range(count):
        session = MainSession(server.address)
        out.append((session, session.open_port(ECHO)))
    return out


def echo_all(sessions) -> None:
    payloads = [os.urandom(4096) for _ in sessions]
    echoes = [gevent.spawn(echo_roundtrip, port, data) for (_, port), data in zip(sessions, payloads, strict=True)]
    gevent.joinall(echoes, raise_error=True)
    assert [g.value for g in echoes] == payloads


def test_200_sessions_with_echo_traffic_are_all_served_also_while_one_floods():
    with running_server() as server:
        sessions = many_sessions(server, SESSIONS)
        echo_all(sessions)
        hostile = MainSession(server.address)
        flood = Flood(hostile.main, m.MsgcPong(1, 2))
        wait_until(lambda: server.flood_reads >= 1, what="the flood to be noticed")
        echo_all(sessions)
        assert flood.running, flood.ended
        assert len(server.sessions) == SESSIONS + 1
        assert link_failures(server) == 0
        flood.stop()
        with open("/proc/self/status") as status:
            rss = re.search(r"VmRSS:\s+(\d+) kB", status.read())
        print(f"{SESSIONS} sessions and a flood: RSS {int(rss[1]) >> 10} MiB (client and server)")
        for session, _ in sessions:
            session.close()


# --- memory given back -----------------------------------------------------------------------


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read())[1]) << 10


def test_memory_goes_back_to_the_system_once_every_client_left(tmp_path):
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "spicewire", "serve", "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0",
            "--control-token", "t", "--disable-ticketing", "--memory-budget", "4096",
            *(a for name, kind in DEFAULT_PORTS
                                                            for a in ("--port-channel", f"{name}={kind}"))]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        address, control_address = bound_addresses(proc, log)
        control = ControlClient(*control_address, token="t", timeout=10)
        assert control.get_json("/status")["memory"]["limit"] == 4096 << 20
        idle = vm_rss(proc.pid)
        # Echo ports whose clients read nothing: each holds its port buffer, its queue toward the
        # client and what TCP took, up to about 12 MiB a session.
        sessions = []
        for _ in range(20):
            session = MainSession(address)
            echo = session.open_port(ECHO, bufsize=16 << 10)
            sessions.append((session, gevent.spawn(echo.send_data, os.urandom(1 << 20) * 12)))
        # Both views of the load: the process's memory, and what the budget counts of it.
        wait_until(lambda: vm_rss(proc.pid) > idle + (100 << 20)
                   and control.get_json("/status")["memory"]["used"] > 100 << 20, what="the server to hold the load")
        loaded = vm_rss(proc.pid)
        for session, writer in sessions:
            writer.kill()
            session.close()
        wait_until(lambda: not control.get_json("/sessions").get("sessions"), what="every session to end")
        # A session is gone once its main channel closed; its port connections give back what they
        # still had queued as each one's greenlet ends, a turn or more later (CI once saw 128 KiB).
        wait_until(lambda: control.get_json("/status")["memory"]["used"] == 0, what="the budget to be empty")
        memory = control.get_json("/status")["memory"]
        assert memory["used"] == 0 and memory["peak"] > 100 << 20, memory
        left = time.monotonic()
        wait_until(lambda: vm_rss(proc.pid) <= 2 * idle, timeout=10,
                   what=f"RSS back within 2x of idle ({idle >> 20} MiB; loaded {loaded >> 20} MiB)")
        print(f"idle {idle >> 20} MiB, loaded {loaded >> 20} MiB, {time.monotonic() - left:.1f} s after: "
              f"{vm_rss(proc.pid) >> 20} MiB")
    finally:
        proc.kill()
        proc.wait(timeout=5)
