"""Errors stay where they happen: a bad request, a failing migration or a broken device ends
that request, that migration or that port, and nothing else. Servers run in this process on
127.0.0.1 with kernel-chosen ports; every test is bounded by a gevent.Timeout."""

from __future__ import annotations

import logging
import os

import gevent
import pytest

from spicewire import devices
from spicewire.client import ClientSession
from spicewire.control.client import ControlClient
from spicewire.control.server import ControlServer
from spicewire.errors import CodecError, MigrationError
from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.server.migration import orchestrator
from spicewire.server.net import ServerConfig, SpiceServer
from spicewire.server.session import Limits

from .serverkit import MainSession, read_until_closed, refused_port, running_server, wait_until

ECHO, SINK, SOURCE, BROKEN = "org.test.echo", "org.test.sink", "org.test.source", "org.test.broken"
PEER_TOKEN = "peer-token"  # what s1 presents on s2's /migration/*


@pytest.fixture(autouse=True)
def deadline(request):
    with gevent.Timeout(30, AssertionError(f"{request.node.name} took longer than 30 s")):
        yield


class Node:
    """A SpiceServer and its control API in this process."""

    def __init__(self, ports) -> None:
        self.spice = SpiceServer(ServerConfig(host="127.0.0.1", port=0, port_channels=list(ports)))
        self.spice.start()
        self.control = ControlServer(self.spice, "127.0.0.1", 0, peer_token=PEER_TOKEN)
        self.control.start()
        self.api = ControlClient(*self.control.address, timeout=30)

    def migrate_to(self, other: Node, **overrides) -> dict:
        body = {"to": "{}:{}".format(*other.spice.address), "to_control": "{}:{}".format(*other.control.address),
                "timeout": 5, "to_peer_token": PEER_TOKEN, **overrides}
        return self.api.post_json("/migrate", body)

    def stop(self) -> None:
        self.control.stop()
        self.spice.stop()


@pytest.fixture
def nodes():
    made: list[Node] = []

    def make(n: int = 2, ports=((ECHO, "echo"), (SINK, "sink"))):
        made.extend(Node(ports) for _ in range(n))
        return made[-n:]

    yield make
    for node in made:
        node.stop()


def echo_ok(session: ClientSession, n: int = 100_000) -> None:
    port = session.open_port(ECHO)
    data = os.urandom(n)
    port.write(data)
    assert port.read(n, timeout=10) == data


def assert_back_to_normal(node: Node, session: ClientSession) -> None:
    """The session is s1's again: no migration under way, devices running, the client not migrating."""
    state = node.spice.sessions[session.session_id]
    assert state.migration is None
    assert not any(port.device_stopped or port.frozen for port in state.ports.values())
    wait_until(lambda: not session.migrating, what="the client to be told the migration is off")
    assert session.connected_to == node.spice.address


def migrated_once(s1: Node, s2: Node, session: ClientSession) -> None:
    report = s1.migrate_to(s2)
    assert report["migrated"] == 1, report
    wait_until(lambda: session.connected_to == s2.spice.address, what="the client on s2")
    echo_ok(session)


# --- POST /migrate never leaves a session wedged ---------------------------------------------------


@pytest.mark.parametrize("to", ["127.0.0.1:70000", "127.0.0.1:0", "127.0.0.1", "::1:5900", "[::g]:5900", 5900])
def test_a_bad_destination_is_a_400_that_says_why_and_changes_nothing(nodes, to):
    s1, s2 = nodes(2)
    session = ClientSession(*s1.spice.address, timeout=10).connect()
    with pytest.raises(MigrationError, match=r": 400 bad migrate request: to: expected HOST:PORT") as err:
        s1.migrate_to(s2, to=to)
    assert "\n" not in str(err.value)
    assert s1.spice.sessions[session.session_id].migration is None
    assert not s2.spice.migration.announcements  # refused before anything was announced
    migrated_once(s1, s2, session)
    session.close()


def test_a_destination_port_past_65535_given_to_the_manager_is_undone(nodes):
    # Past the API's check, straight into the manager: BEGIN cannot carry the port, and the
    # session the failure left behind must be s1's again.
    s1, s2 = nodes(2)
    session = ClientSession(*s1.spice.address, timeout=10).connect()
    with pytest.raises(CodecError, match="cannot encode"):
        s1.spice.migration.migrate(("127.0.0.1", 70000), s2.control.address, mig.MigrationMode.SEAMLESS, 5,
                                   to_peer_token=PEER_TOKEN)
    assert_back_to_normal(s1, session)
    assert session.session_id not in s2.spice.migration.announcements  # s1 told s2 to forget it
    migrated_once(s1, s2, session)
    session.close()


def test_an_unreachable_destination_control_api_is_a_502_and_the_session_stays(nodes):
    s1, s2 = nodes(2)
    session = ClientSession(*s1.spice.address, timeout=10).connect()
    with refused_port() as port, pytest.raises(
        MigrationError, match=rf": 502 cannot reach the destination's control API at 127.0.0.1:{port}"
    ):
        s1.migrate_to(s2, to_control=f"127.0.0.1:{port}")
    assert_back_to_normal(s1, session)
    echo_ok(session)
    migrated_once(s1, s2, session)
    session.close()


def test_an_exception_in_the_middle_of_a_migration_gives_every_session_back(nodes, monkeypatch, caplog):
    s1, s2 = nodes(2)
    sessions = [ClientSession(*s1.spice.address, timeout=10).connect() for _ in range(2)]

    def broken(_sessions, _precopies=None, _records=None):  # every client answered BEGIN, the devices stopped
        raise RuntimeError("packing broke")

    monkeypatch.setattr(orchestrator, "pack_device_states", broken)
    with pytest.raises(MigrationError, match=": 500 internal error"):
        s1.migrate_to(s2)
    assert "RuntimeError: packing broke" in caplog.text  # logged with its traceback on s1
    for session in sessions:
        assert_back_to_normal(s1, session)
        assert session.migrations[-1]["result"] == "cancelled"
        echo_ok(session)
    wait_until(lambda: not s2.spice.sessions, what="s2 to let the half sessions go")
    assert not s2.spice.migration.announcements
    monkeypatch.undo()
    report = s1.migrate_to(s2)
    assert report["migrated"] == 2, report
    for session in sessions:
        wait_until(lambda s=session: s.connected_to == s2.spice.address, what="the client on s2")
        echo_ok(session)
        session.close()


# --- a device that raises closes its own port ------------------------------------------------------


@devices.register("test-broken-tick")
class BrokenTick(devices.Device):
    """Ticks like a source, and fails on its first tick."""

    wants_ticks = True

    def write(self, data: memoryview) -> int:
        return len(data)

    def tick(self, now: float) -> None:
        raise RuntimeError("the device broke")


def read_some(port, n: int = 100_000) -> None:
    got = 0
    while got < n:
        got += len(port.read_data(1, timeout=10)) + len(port.read_available(0.05))


def test_a_device_whose_tick_raises_closes_its_port_only(caplog):
    ports = [(SOURCE, "source"), (BROKEN, "test-broken-tick")]
    with running_server(port_channels=ports) as server:
        bystander = MainSession(server.address)
        bystander_source = bystander.open_port(0)
        victim = MainSession(server.address)
        victim_source = victim.open_port(0)
        with caplog.at_level(logging.ERROR, logger="spicewire"):
            broken = victim.open_port(1)
            read_until_closed(broken.sock)  # the server closed the broken port
            read_some(victim_source)  # every source keeps producing, in both sessions
            read_some(bystander_source)
        failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(failures) == 1, caplog.text  # once, not once per tick
        assert f"session {victim.session_id:08x} port 1 ({BROKEN})" in failures[0].getMessage()
        assert failures[0].exc_info[0] is RuntimeError
        port = server.sessions[victim.session_id].ports[1]
        assert port.status()["failed"] == "the test-broken-tick device failed in tick"
        assert victim.session_id in server.sessions
        bystander.close()
        victim.close()


# --- a session that ended lets go of its devices -----------------------------------------------------


def test_bytes_a_port_read_after_its_session_ended_never_reach_the_echo_device():
    with running_server() as server:
        session = MainSession(server.address)
        echo = session.open_port(0)
        echo.send_data(b"x" * 1000)
        assert echo.read_data(1000) == b"x" * 1000
        port = server.sessions[session.session_id].ports[0]
        handler = port.connection
        session.main.close()  # the session ends; its port connection may still hold bytes it read
        wait_until(lambda: session.session_id not in server.sessions, what="the session to end")
        handler.handle([m.MsgcSpicevmcData(b"late")])  # what such a connection then delivers
        handler.on_drained()
        assert port.device.bytes_in == 1000 and port.to_device_bytes == 0
        echo.close()


def send_until_refused(port, data: bytes) -> OSError | None:
    """The server may close the port under the sender; what counts is what it does meanwhile."""
    try:
        port.send_data(data)
    except OSError as err:
        return err
    return None


def test_many_sessions_ending_with_echo_data_in_flight_leave_no_failure(monkeypatch):
    failures = []
    hub = gevent.get_hub()
    report = hub.handle_error

    def record(context, kind, value, tb):
        failures.append(f"{kind.__name__}: {value}")
        report(context, kind, value, tb)

    monkeypatch.setattr(hub, "handle_error", record)
    with running_server() as server:

        def one() -> None:
            session = MainSession(server.address)
            echo = session.open_port(0, bufsize=1 << 16)
            device = server.sessions[session.session_id].ports[0].device
            sender = gevent.spawn(send_until_refused, echo, os.urandom(2 << 20))  # nobody reads the echo
            wait_until(lambda: device.bytes_in > 0, what="the echo to take bytes")
            session.main.close()  # the session ends with the port's bytes still coming
            sender.get()
            echo.close()

        gevent.joinall([gevent.spawn(one) for _ in range(16)], raise_error=True)
        wait_until(lambda: not server.sessions, what="every session to end")
        with MainSession(server.address) as after:
            echo = after.open_port(0)
            echo.send_data(b"still echoing")
            assert echo.read_data(13) == b"still echoing"
    assert not failures


# --- bad values are refused where they are given ---------------------------------------------------


@pytest.mark.parametrize("limits", [dict(to_device=0), dict(to_device=-1), dict(to_client=0), dict(to_device=1.5),
                                    dict(ack_window=-1)])
def test_limits_that_would_stall_every_port_are_refused(limits):
    with pytest.raises(ValueError, match=f"Limits.{next(iter(limits))} must be"):
        Limits(**limits)


@pytest.mark.parametrize("config", [dict(port=70000), dict(port=-1), dict(tick_interval=0),
                                    dict(link_timeout=float("nan")), dict(stall_timeout=-1), dict(limits=8)])
def test_a_server_config_with_a_bad_value_is_refused(config):
    with pytest.raises(ValueError, match=f"ServerConfig.{next(iter(config))} must be"):
        ServerConfig(**config)
