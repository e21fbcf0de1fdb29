"""Who may link (issue 9): the ticket is checked before the connection id, failed links wait longer
each time, per-session tickets, channel links only from their session's client host, no link ever
displaces a live channel, a migration's target link only from the host s1 announced and once, caps
on links in progress, and a listener that pauses (not spins) when descriptors run out.

Loopback has many addresses: a client socket bound to 127.0.0.2 is "another client host"."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
import urllib.error
import urllib.request

import gevent
import pytest
from gevent import socket

from spicewire.client import ClientSession
from spicewire.control.server import ControlServer
from spicewire.errors import LinkError, LocalProtocolError
from spicewire.protocol import messages as m
from spicewire.protocol.enums import LINK_HEADER_SIZE, PUBLIC_KEY_SIZE, ChannelType, LinkErr
from spicewire.protocol.link import ClientLink, LinkAuthenticated, LinkEstablished
from spicewire.server.admission import (
    MAX_TICKETS,
    AcceptBackoff,
    LinkGuard,
    LinkLimits,
    LogThrottle,
    SessionTickets,
    host_of,
)
from spicewire.server.net import ServerConfig, SpiceServer
from tests.served import bound_addresses
from tests.serverkit import ECHO, MainSession, PortChannel, RawChannel, running_server, wait_until
from tests.test_link import requested, send_ticket

PASSWORD = "s3cret"
STRANGER = "127.0.0.2"
OTHER = "127.0.0.3"
ECHO_NAME = "org.spicewire.echo"
PORTS = [(ECHO_NAME, "echo"), ("org.spicewire.sink", "sink")]
# No delay for a failed link unless a test asks: the suite links wrongly on purpose.
QUIET = LinkLimits(free_failures=1000)


@pytest.fixture(autouse=True)
def _bounded():
    with gevent.Timeout(30, AssertionError("the test took longer than 30 s")):
        yield


class Attempt:
    """One link attempt, from ``source``: what the server answered, byte for byte, and how it ended
    (``code`` 0 and ``channel`` when linked, else the link error)."""

    def __init__(self, address, connection_id: int, channel_type: int, channel_id: int = 0, *,
                 password: str | None = PASSWORD, source: str = "127.0.0.1") -> None:
        self.answer = bytearray()
        self.code: int | None = None
        self.channel: RawChannel | None = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.connect(tuple(address))
        link = ClientLink(connection_id, channel_type, channel_id, password=password)
        try:
            with gevent.Timeout(10):
                while True:
                    try:
                        event = link.next_event()
                    except LinkError as err:
                        self.code = err.code
                        break
                    out = link.data_to_send()
                    if out:
                        sock.sendall(out)
                    if isinstance(event, LinkEstablished):
                        self.code = LinkErr.OK
                        self.channel = (PortChannel if channel_type == ChannelType.PORT else RawChannel)(sock, event)
                        return
                    data = sock.recv(65536)
                    if not data:
                        self.code = -1  # closed without an answer
                        break
                    self.answer += data
                    link.receive_data(data)
        except BaseException:
            sock.close()
            raise
        sock.close()

    def shape(self) -> bytes:
        """The answer with the link's key blanked: a fresh key per link is the only difference
        the protocol allows between two refusals."""
        data = bytearray(self.answer)
        if len(data) >= LINK_HEADER_SIZE + 4 + PUBLIC_KEY_SIZE:
            start = LINK_HEADER_SIZE + 4
            data[start:start + PUBLIC_KEY_SIZE] = bytes(PUBLIC_KEY_SIZE)
        return bytes(data)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()


def failures(server: SpiceServer, reason: str) -> float:
    return server.metrics.link_failures.labels(reason)._value.get()


def unknown_id(server: SpiceServer) -> int:
    candidate = 0x5EED0001
    while candidate in server.sessions:
        candidate += 1
    return candidate


# --- the link machine: the owner decides after the ticket -------------------------------------------------


def _deciding(credential_for: dict[str, str] | None = None, password: str | None = "pw"):
    """A server link accepted with decide_after_ticket, its LinkReply taken."""
    server = requested(password=password)
    for secret, name in (credential_for or {}).items():
        server.allow_ticket(secret, name)
    server.accept((0x09,), decide_after_ticket=True)
    server.data_to_send()
    return server


def _authenticated(credential_for: dict[str, str] | None = None, password: str | None = "pw", ticket: bytes = b"pw\0"):
    server = _deciding(credential_for, password)
    return server, send_ticket(server, ticket)


def test_a_good_ticket_waits_for_the_owners_verdict_before_any_link_result():
    server, events = _authenticated()
    assert events == [LinkAuthenticated(0, ChannelType.MAIN, 0, "password")]
    assert server.data_to_send() == b""  # no link result yet: the ids are only now looked at
    server.establish()
    assert server.data_to_send() == (0).to_bytes(4, "little")
    assert isinstance(server.next_event(), LinkEstablished)


def test_the_owners_refusal_after_the_ticket_is_the_link_result():
    server, _ = _authenticated()
    server.refuse(LinkErr.BAD_CONNECTION_ID)
    assert server.data_to_send() == int(LinkErr.BAD_CONNECTION_ID).to_bytes(4, "little")
    assert server.next_event() is None
    with pytest.raises(LocalProtocolError):
        server.establish()


def test_a_bad_ticket_is_denied_before_the_owner_sees_the_ids():
    server = _deciding({"one-time": "ticket 1"})
    server.receive_data(b"", 0.0)
    with pytest.raises(LinkError):
        send_ticket(server, b"wrong\0")
    assert server.data_to_send() == int(LinkErr.PERMISSION_DENIED).to_bytes(4, "little")


def test_an_allowed_ticket_is_reported_by_its_name_and_outlives_the_password():
    _, events = _authenticated({"one-time": "ticket 1"}, ticket=b"one-time\0")
    assert events == [LinkAuthenticated(0, ChannelType.MAIN, 0, "ticket 1")]
    _, events = _authenticated({"one-time": "ticket 1"}, password="", ticket=b"one-time\0")
    assert events == [LinkAuthenticated(0, ChannelType.MAIN, 0, "ticket 1")]  # no server-wide password at all


def test_without_ticketing_the_credential_is_open():
    _, events = _authenticated(password=None, ticket=b"\0")
    assert events == [LinkAuthenticated(0, ChannelType.MAIN, 0, "open")]


@pytest.mark.parametrize("call", ["establish", "refuse"])
def test_a_verdict_before_the_ticket_is_our_bug(call):
    server = _deciding()
    with pytest.raises(LocalProtocolError):
        server.establish() if call == "establish" else server.refuse(LinkErr.BAD_CONNECTION_ID)


def test_refuse_needs_an_error():
    server, _ = _authenticated()
    with pytest.raises(LocalProtocolError):
        server.refuse(LinkErr.OK)


# --- without the password, ids cannot be told apart ---------------------------------------------------


def _probe(address, connection_id: int, channel_type: int, *, password: str | None, source: str = STRANGER):
    attempt = Attempt(address, connection_id, channel_type, ECHO if channel_type == ChannelType.PORT else 0,
                      password=password, source=source)
    attempt.close()
    return attempt


@pytest.mark.parametrize("channel_type", [ChannelType.PORT, ChannelType.DISPLAY, ChannelType.MAIN],
                         ids=["port", "display", "main-target"])
def test_an_unknown_id_and_a_live_one_get_the_same_answer_without_the_password(channel_type):
    with running_server(password=PASSWORD, display="clock", link_limits=QUIET) as server, \
            MainSession(server.address, password=PASSWORD) as live:
        popped = []
        pop = server.keys.pop
        server.keys.pop = lambda: popped.append(1) or pop()  # type: ignore[method-assign]
        unknown = _probe(server.address, unknown_id(server), channel_type, password="guess")
        known = _probe(server.address, live.session_id, channel_type, password="guess")
        assert unknown.code == known.code == LinkErr.PERMISSION_DENIED
        assert unknown.shape() == known.shape()
        assert len(popped) == 2  # both took a key and had their ticket decrypted: the same path
        assert failures(server, "permission_denied") == 2
        assert failures(server, "bad_connection_id") == 0


def test_with_per_session_tickets_another_sessions_ticket_tells_nothing_either():
    with running_server(password="", link_limits=QUIET) as server:  # tickets only
        own = server.session_tickets.issue(None, 60, time.monotonic()).secret
        victim_ticket = server.session_tickets.issue(None, 60, time.monotonic()).secret
        with MainSession(server.address, password=own) as mine, \
                MainSession(server.address, password=victim_ticket) as victim:
            unknown = _probe(server.address, unknown_id(server), ChannelType.PORT, password=own, source="127.0.0.1")
            known = _probe(server.address, victim.session_id, ChannelType.PORT, password=own, source="127.0.0.1")
            assert unknown.code == known.code == LinkErr.PERMISSION_DENIED
            assert unknown.shape() == known.shape()
            assert mine.open_port(ECHO)  # its own session's channel: the same ticket opens it


def test_with_the_password_a_live_id_from_another_host_is_answered_as_an_unknown_one():
    with running_server(password=PASSWORD, link_limits=QUIET) as server, \
            MainSession(server.address, password=PASSWORD) as live:
        unknown = _probe(server.address, unknown_id(server), ChannelType.PORT, password=PASSWORD)
        known = _probe(server.address, live.session_id, ChannelType.PORT, password=PASSWORD)
        assert unknown.code == known.code == LinkErr.BAD_CONNECTION_ID
        assert unknown.shape() == known.shape()


# --- failed links wait, longer each time -------------------------------------------------------------------


def test_failed_links_of_one_address_wait_longer_each_time_and_others_not_at_all():
    limits = LinkLimits(free_failures=1, failure_delay=0.01, failure_delay_max=0.04)
    with running_server(password=PASSWORD, link_limits=limits) as server:
        delays = []
        for _ in range(5):  # one free, then 0.01, 0.02, 0.04 (the maximum), 0.04 (held at it)
            assert _probe(server.address, 0, ChannelType.MAIN, password="guess").code == LinkErr.PERMISSION_DENIED
            delays.append(server.guard.failures(STRANGER, time.monotonic()))
        assert delays == [(1, 0.0), (2, 0.01), (3, 0.02), (4, 0.04), (5, 0.04)]
        other = _probe(server.address, 0, ChannelType.MAIN, password="guess", source=OTHER)
        assert other.code == LinkErr.PERMISSION_DENIED
        assert server.guard.failures(OTHER, time.monotonic()) == (1, 0.0)
        # An unknown id, with the password, counts as a failure too.
        unknown = _probe(server.address, unknown_id(server), ChannelType.PORT, password=PASSWORD)
        assert unknown.code == LinkErr.BAD_CONNECTION_ID
        assert server.guard.failures(STRANGER, time.monotonic()) == (6, 0.04)
        assert server.guard.delayed == 5 and server.guard.delayed_seconds == pytest.approx(0.15)
        scraped = server.metrics.exposition().decode()
        assert "spicewire_link_failure_delays_total 5.0" in scraped
        assert re.search(r"spicewire_link_failure_delay_seconds_total 0\.15\d*", scraped)
        # The answer waited in that link's greenlet alone: a good link from the same host is served.
        with MainSession(server.address, password=PASSWORD) as fine:
            assert fine.attach_channels()


def test_a_held_answer_never_holds_the_hub():
    limits = LinkLimits(free_failures=0, failure_delay=30.0, failure_delay_max=30.0)
    with running_server(password=PASSWORD, link_limits=limits) as server, \
            MainSession(server.address, password=PASSWORD) as bystander:
        port = bystander.open_port(ECHO)
        held = gevent.spawn(_probe, server.address, 0, ChannelType.MAIN, password="guess")
        wait_until(lambda: server.guard.failures(STRANGER, time.monotonic()) == (1, 30.0), what="the answer held")
        port.send_data(b"meanwhile")
        assert port.read_data(9) == b"meanwhile"  # served while that answer waits its 30 s
        assert not held.ready()
        held.kill()


def test_the_free_failures_and_the_memory_of_an_address():
    guard = LinkGuard(LinkLimits(free_failures=2, failure_delay=1.0, failure_delay_max=4.0, failure_memory=60.0))
    assert [guard.failed("a", 0.0) for _ in range(2)] == [0.0, 0.0]  # under and at the free ones
    assert guard.failed("a", 0.0) == 1.0  # one over
    assert guard.failed("a", 60.0) == 2.0  # exactly the memory later: still remembered
    guard.answered("a")
    guard.answered("a")
    assert guard.failed("a", 120.0 + 1e-6) == 0.0  # just past it: afresh
    assert guard.failures("a", 120.0 + 1e-6) == (1, 0.0)
    assert guard.failures("a", 180.0 + 2e-6) == (0, 0.0)


def test_an_address_with_failed_links_waiting_gets_its_new_connections_closed_at_once():
    guard = LinkGuard(LinkLimits(free_failures=0, failure_delay=1.0, failures_waiting_per_address=2))
    guard.failed("a", 0.0)
    assert guard.begin("a") is None  # one waiting: under the cap
    guard.end("a")
    guard.failed("a", 0.0)
    assert guard.begin("a") == "failed_links_waiting"  # at the cap
    assert guard.begin("b") is None
    guard.answered("a")
    assert guard.begin("a") is None


def test_the_failure_table_keeps_the_freshest_addresses():
    guard = LinkGuard(LinkLimits(tracked_addresses=2))
    for host in ("a", "b", "a", "c"):
        guard.failed(host, 0.0)
    assert guard.failures("a", 0.0)[0] == 2 and guard.failures("c", 0.0)[0] == 1
    assert guard.failures("b", 0.0) == (0, 0.0)  # the stalest went


def test_an_ipv6_client_is_counted_by_its_64():
    guard = LinkGuard(LinkLimits(in_progress_per_address=2))
    assert guard.begin("2001:db8:0:1::1") is None
    assert guard.begin("2001:db8:0:1:ffff::2") is None  # the same /64: at the cap
    assert guard.begin("2001:db8:0:1::3") == "links_in_progress_per_address"
    assert guard.begin("2001:db8:0:2::1") is None  # the next /64
    guard.failed("2001:db8:0:1::9", 0.0)
    assert guard.failures("2001:db8:0:1::1", 0.0)[0] == 1
    guard.end("2001:db8:0:1::1")
    assert guard.begin("2001:db8:0:1::7") is None
    guard.begin("10.0.0.1")
    assert guard.failures("10.0.0.2", 0.0) == (0, 0.0)  # IPv4: per address


def test_an_ipv4_mapped_address_is_the_same_host():
    assert host_of("::ffff:127.0.0.2") == "127.0.0.2"
    assert host_of("fe80::1%eth0") == "fe80::1"
    assert host_of("127.0.0.2") == "127.0.0.2"


# --- per-session tickets -------------------------------------------------------------------------------


def _control(server: SpiceServer, token: str = "op") -> ControlServer:
    control = ControlServer(server, "127.0.0.1", 0, token=token)
    control.start()
    return control


def _post(control: ControlServer, path: str, body, token: str = "op") -> tuple[int, dict]:
    request = urllib.request.Request(
        "http://{}:{}{}".format(*control.address, path), method="POST", data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})

    def send() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    return gevent.get_hub().threadpool.apply(send)


def test_a_ticket_opens_one_new_session_whose_channels_link_with_it():
    with running_server(password="", port_channels=PORTS, link_limits=QUIET) as server:
        control = _control(server)
        try:
            status, body = _post(control, "/tickets", {"session_id": None, "expires_in": 30})
            assert status == 200 and len(body["ticket"]) == 32 and body["session_id"] is None
            ticket = body["ticket"]
            with MainSession(server.address, password=ticket) as session:
                port = session.open_port(ECHO)  # its channels: the same ticket
                port.send_data(b"ping")
                assert port.read_data(4) == b"ping"
                again = Attempt(server.address, 0, ChannelType.MAIN, password=ticket)
                assert again.code == LinkErr.PERMISSION_DENIED  # one-time: no second session
                _, other = _post(control, "/tickets", {"session_id": None, "expires_in": 30})
                with MainSession(server.address, password=other["ticket"]) as second:
                    # A ticket for one session never opens another: not its channels either.
                    stolen = Attempt(server.address, second.session_id, ChannelType.PORT, 1, password=ticket)
                    assert stolen.code == LinkErr.PERMISSION_DENIED
            wait_until(lambda: not server.sessions, what="the sessions to end")
            assert len(server.session_tickets) == 0  # gone with their sessions
        finally:
            control.stop()


def test_a_ticket_for_a_named_session_opens_its_channels_and_no_new_session():
    with running_server(password=PASSWORD, port_channels=PORTS, link_limits=QUIET) as server:
        control = _control(server)
        try:
            with MainSession(server.address, password=PASSWORD) as session, \
                    MainSession(server.address, password=PASSWORD) as neighbour:
                _, body = _post(control, "/tickets", {"session_id": f"{session.session_id:08x}", "expires_in": 30})
                ticket = body["ticket"]
                linked = Attempt(server.address, session.session_id, ChannelType.PORT, 1, password=ticket)
                assert linked.code == LinkErr.OK
                linked.close()
                assert Attempt(server.address, 0, ChannelType.MAIN, password=ticket).code == LinkErr.PERMISSION_DENIED
                other = Attempt(server.address, neighbour.session_id, ChannelType.PORT, 1, password=ticket)
                assert other.code == LinkErr.PERMISSION_DENIED
                # The server-wide password stays, for simple setups.
                assert session.open_port(0)
        finally:
            control.stop()


def test_tickets_expire_at_their_time():
    tickets = SessionTickets()
    ticket = tickets.issue(None, 10.0, now=100.0)
    assert list(tickets.allowed(0, True, 110.0)) == [ticket]  # at the expiry: still good
    assert list(tickets.allowed(0, True, 110.0 + 1e-6)) == []  # just past it
    assert tickets.claim(ticket.name, 0, True, 110.0 + 1e-6) is None
    assert tickets.claim(ticket.name, 0, True, 109.0) is ticket
    assert tickets.claim(ticket.name, 0, True, 109.0) is None  # used: a racing second link loses
    tickets.bind(ticket.name, 0x1234)
    assert list(tickets.allowed(0x1234, False, 1e9)) == [ticket]  # its session's channels, while it lives
    assert list(tickets.allowed(0x1235, False, 0.0)) == []
    tickets.session_ended(0x1234)
    assert len(tickets) == 0


def test_an_expired_ticket_opens_nothing_on_the_server():
    with running_server(password="", link_limits=QUIET) as server:
        ticket = server.session_tickets.issue(None, 30, time.monotonic() - 31).secret  # issued 31 s ago
        assert Attempt(server.address, 0, ChannelType.MAIN, password=ticket).code == LinkErr.PERMISSION_DENIED


def test_unused_tickets_are_bounded():
    tickets = SessionTickets()
    for _ in range(MAX_TICKETS):
        tickets.issue(None, 10.0, 0.0)
    with pytest.raises(OverflowError):
        tickets.issue(None, 10.0, 0.0)
    tickets.issue(None, 10.0, 11.0)  # the expired ones are forgotten: room again


@pytest.mark.parametrize("body", [
    {"session_id": "nope", "expires_in": 10}, {"session_id": "00000000"}, {"expires_in": 0},
    {"expires_in": -1}, {"expires_in": "10"}, {"expires_in": float("inf")}, {"session": None}, [],
], ids=["bad-id", "zero-id", "zero-expiry", "negative", "string", "infinite", "unknown-field", "not-an-object"])
def test_a_bad_ticket_request_is_a_400(body):
    with running_server(password="") as server:
        control = _control(server)
        try:
            status, answer = _post(control, "/tickets", body)
            assert status == 400, answer
            assert len(server.session_tickets) == 0
        finally:
            control.stop()


# --- channel links belong to their session's client -----------------------------------------------------


CHANNELS = [ChannelType.PORT, ChannelType.DISPLAY, ChannelType.INPUTS, ChannelType.CURSOR]


@pytest.mark.parametrize("channel_type", CHANNELS)
@pytest.mark.parametrize("anywhere", [False, True], ids=["default", "any-address"])
def test_a_channel_link_from_another_host_is_refused_unless_allowed(channel_type, anywhere):
    with running_server(password=PASSWORD, display="clock", link_limits=QUIET,
                        channels_from_any_address=anywhere) as server, \
            MainSession(server.address, password=PASSWORD) as session:
        channel_id = ECHO if channel_type == ChannelType.PORT else 0
        attempt = Attempt(server.address, session.session_id, channel_type, channel_id, source=STRANGER)
        try:
            assert attempt.code == (LinkErr.OK if anywhere else LinkErr.BAD_CONNECTION_ID)
        finally:
            attempt.close()
        # From the session's own host it links (the stranger's, if any, went with its close).
        wait_until(lambda: all(c.closed for c in server.connections if c.host == STRANGER), what="the stranger gone")
        own = Attempt(server.address, session.session_id, channel_type, channel_id)
        try:
            assert own.code == LinkErr.OK
        finally:
            own.close()


@pytest.mark.parametrize("channel_type", CHANNELS)
def test_a_link_never_displaces_a_live_channel(channel_type):
    with running_server(password=PASSWORD, display="clock", link_limits=QUIET) as server, \
            MainSession(server.address, password=PASSWORD) as session:
        channel_id = ECHO if channel_type == ChannelType.PORT else 0
        first = Attempt(server.address, session.session_id, channel_type, channel_id)
        assert first.code == LinkErr.OK and first.channel is not None
        try:
            second = Attempt(server.address, session.session_id, channel_type, channel_id)
            assert second.code == LinkErr.CHANNEL_NOT_AVAILABLE
            if isinstance(first.channel, PortChannel):
                first.channel.expect(m.MsgPortInit)
                first.channel.send_data(b"still mine")
                assert first.channel.read_data(10) == b"still mine"
            else:
                assert not first.channel.eof
                assert sum(1 for c in server.connections if c.channel is not None
                           and c.channel.channel_type == channel_type) == 1
        finally:
            first.close()


# --- a migration's target link: from the announced host, once ----------------------------------------


def test_a_stranger_flooding_target_links_during_a_migration_loses_and_the_client_lands(nodes):
    s1, s2 = nodes(2)
    s2.spice.guard.limits = QUIET  # every flood link gets its answer: the race is run in full
    session = ClientSession(*s1.address, timeout=10).connect()
    victim = session.session_id
    echo = session.open_port(ECHO_NAME)
    echo.write(b"before")
    assert echo.read(6, timeout=10) == b"before"
    results: list[int | None] = []
    stop = gevent.event.Event()

    def flood(channel_type: int, channel_id: int) -> None:
        while not stop.is_set():
            attempt = Attempt(s2.address, victim, channel_type, channel_id, password=None, source=STRANGER)
            attempt.close()
            results.append(attempt.code)
            gevent.sleep(0)

    flooders = [gevent.spawn(flood, ChannelType.MAIN, 0) for _ in range(3)] + [gevent.spawn(flood, ChannelType.PORT, 0)]
    try:
        wait_until(lambda: len(results) >= 4, what="the flood under way")
        report = s1.migrate_to(s2, timeout=10)
    finally:
        stop.set()
        gevent.joinall(flooders, timeout=10)
    assert report["migrated"] == 1, report
    assert session.wait_migrated(10)["result"] == "completed"
    landed = s2.spice.sessions[victim]
    assert landed.client.startswith("127.0.0.1:")
    assert results and set(results) == {LinkErr.BAD_CONNECTION_ID}  # none of the stranger's links took
    echo.write(b"after")
    assert echo.read(5, timeout=10) == b"after"
    session.close()


def test_s1_announces_the_client_host_and_s2_takes_one_target_link_from_it(nodes):
    s1, s2 = nodes(2)
    with MainSession(s1.address) as session:
        wait_until(lambda: session.session_id in s1.spice.client_hosts, what="the session")
        seen = {}
        announce = s2.spice.migration.announce

        def recording(migration_id, sessions, *args, **kwargs):
            seen.update({entry["session_id"]: entry.get("client") for entry in sessions})
            return announce(migration_id, sessions, *args, **kwargs)

        s2.spice.migration.announce = recording
        s1.migrate_to(s2, timeout=2)  # the raw client never answers: it stays on s1
        assert seen == {session.session_id: "127.0.0.1"}
    manager = s2.spice.migration
    manager.announce("0123456789abcdef", [{"session_id": 0x77, "ports": [], "client": "127.0.0.1"}], ttl=30)
    assert manager.claim_target(0x77, STRANGER, any_address=False) is not None  # another host
    assert manager.claim_target(0x77, "127.0.0.1", any_address=False) is None
    assert manager.claim_target(0x77, "127.0.0.1", any_address=False) is not None  # once
    manager.announce("0123456789abcdef", [{"session_id": 0x78, "ports": [], "client": "127.0.0.1"}], ttl=30)
    assert manager.claim_target(0x78, STRANGER, any_address=True) is None  # behind a changing NAT


def test_a_client_that_linked_with_a_session_ticket_migrates_with_it(nodes):
    s1, s2 = nodes(2)
    for node in (s1, s2):
        node.spice.set_password("", None)  # tickets only, on both
    ticket = s1.spice.session_tickets.issue(None, 30, time.monotonic()).secret
    session = ClientSession(*s1.address, password=ticket, timeout=10).connect()
    try:
        echo = session.open_port(ECHO_NAME)
        echo.write(b"before")
        assert echo.read(6, timeout=10) == b"before"
        report = s1.migrate_to(s2, timeout=10)
        assert report["migrated"] == 1, report
        assert session.connected_to == s2.address
        echo.write(b"after")
        assert echo.read(5, timeout=10) == b"after"
        assert s2.spice.tickets[session.session_id] == ticket  # carried on, to a next migration
    finally:
        session.close()
    for node in (s1, s2):  # used up: it opens no new session anywhere
        assert Attempt(node.address, 0, ChannelType.MAIN, password=ticket).code == LinkErr.PERMISSION_DENIED


@pytest.mark.parametrize("client, status", [("127.0.0.9", 200), ("::ffff:127.0.0.9", 200), ("host.example", 400),
                                            (7, 400)])
def test_an_announced_client_must_be_an_ip_address(nodes, client, status):
    (s2,) = nodes(1)
    body = {"migration": "0123456789abcdef", "ttl": 30,
            "sessions": [{"session_id": "00000077", "ports": [], "client": client}]}
    try:
        s2.api.post_json("/migration/announce", body)
        answered = 200
    except Exception as err:  # the control client raises on a 4xx, naming the status
        answered = int(re.search(r"\b(4\d\d)\b", str(err))[1])
    assert answered == status
    if status == 200:
        assert s2.spice.migration.announcements[0x77].client == "127.0.0.9"


# --- links in progress ---------------------------------------------------------------------------------


def _idle(address, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(tuple(address))
    return sock


def _closed_at_once(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_links_in_progress_are_capped_per_address_and_overall():
    limits = LinkLimits(in_progress_per_address=2, in_progress=3, free_failures=1000)
    with running_server(password=PASSWORD, link_limits=limits) as server:
        idle = [_idle(server.address, STRANGER), _idle(server.address, STRANGER)]  # at the address's cap
        wait_until(lambda: server.guard.in_progress == 2, what="both linking")
        over = _idle(server.address, STRANGER)  # one over it
        assert _closed_at_once(over)
        assert failures(server, "links_in_progress_per_address") == 1
        idle.append(_idle(server.address, OTHER))  # another address: at the overall cap
        wait_until(lambda: server.guard.in_progress == 3, what="three linking")
        assert _closed_at_once(_idle(server.address, "127.0.0.4"))
        assert failures(server, "links_in_progress") == 1
        for sock in idle:
            sock.close()
        wait_until(lambda: server.guard.in_progress == 0, what="the idle links gone")
        with MainSession(server.address, password=PASSWORD) as session:  # room again
            assert session.attach_channels()


def test_refusals_at_accept_log_one_line_a_second_and_count_the_rest():
    throttle = LogThrottle(interval=1.0)
    assert throttle.allow("links_in_progress", 0.0) == 0
    assert throttle.allow("links_in_progress", 0.999) is None  # just under the interval: left out
    assert throttle.allow("links_in_progress_per_address", 0.5) == 0  # each reason has its own
    assert throttle.allow("links_in_progress", 1.0) == 1  # at it: logged, with the one left out
    assert throttle.allow("links_in_progress", 2.5) == 0


def test_accept_backoff_doubles_to_its_maximum_and_starts_afresh():
    backoff = AcceptBackoff(LinkLimits(accept_backoff_min=0.01, accept_backoff_max=0.05))
    assert [backoff.exhausted() for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    assert backoff.accepted() is True
    assert backoff.accepted() is False
    assert backoff.exhausted() == 0.01


PAUSE = re.compile(r"cannot accept a SPICE connection on [\d.:]+: Too many open files; pausing ([\d.e-]+) s")


def test_serve_out_of_descriptors_pauses_accepting_and_recovers(tmp_path):
    """A ``spicewire serve`` limited to 64 open files (and told to take 1000 links in progress,
    more than that; by default it takes three quarters of it), filled with idle connections: accept fails
    with EMFILE, and the listener pauses 0.01, 0.02, ... 1 s (its own log says so), never spinning;
    once the idle connections go, a client links again."""
    log = tmp_path / "serve.log"
    limit = 64

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    argv = [sys.executable, "-m", "spicewire", "serve", "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0",
            "--control-token", "t", "--password", PASSWORD, "--port-channel", f"{ECHO_NAME}=echo",
            "--log-level", "DEBUG", "--max-links-in-progress", "1000"]  # not capped below the descriptors
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=low_limit)
    idle: list[socket.socket] = []
    try:
        address, _ = bound_addresses(proc, log)
        # More than it has room for; the rest wait in the kernel's backlog.
        idle.extend(_idle(address, STRANGER) for _ in range(limit))

        def pauses() -> list[float]:
            return [float(p) for p in PAUSE.findall(log.read_text(errors="replace"))]

        wait_until(lambda: 1.0 in pauses(), timeout=20, what="the pause to reach its maximum")
        seen = pauses()
        assert seen[:8] == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0], seen
        assert len(seen) <= 12  # each try waited its pause: no spinning
        for sock in idle:
            sock.close()
        idle.clear()
        wait_until(lambda: "accepting SPICE connections" in log.read_text(errors="replace"), timeout=20,
                   what="accepting again")
        with MainSession(address, password=PASSWORD) as session:
            assert session.attach_channels()
        assert proc.poll() is None
    finally:
        for sock in idle:
            sock.close()
        proc.kill()
        proc.wait(timeout=5)


@pytest.mark.parametrize("soft, hard, given, expected", [
    (64, 128, (), "open files: 128; links in progress: at most 96, 96 per address"),
    (64, 128, ("--max-links-in-progress", "500", "--max-links-in-progress-per-address", "7"),
     "open files: 128; links in progress: at most 500, 7 per address"),
], ids=["derived", "given"])
def test_serve_raises_its_open_files_to_the_hard_limit_and_caps_links_below_them(tmp_path, soft, hard, given,
                                                                                 expected):
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spicewire", "serve", "--listen", "127.0.0.1:0",
                                 "--disable-ticketing", "--control", "127.0.0.1:0", *given],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    try:
        bound_addresses(proc, log)
        wait_until(lambda: "links in progress" in log.read_text(), what="the limits logged")
        assert expected in log.read_text()
    finally:
        proc.kill()
        proc.wait(timeout=5)


def test_serve_says_loudly_what_disable_ticketing_means(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "spicewire", "serve", "--help"], capture_output=True,
                               text=True, check=True).stdout
    flat = " ".join(help_text.split())
    assert "NO AUTHENTICATION: anyone who can reach the SPICE port can open a session, and join any session" in flat
    assert f"(default {LinkLimits.in_progress}, or three quarters of the open-file limit" in flat
    assert f"(default {LinkLimits.in_progress_per_address};" in flat
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spicewire", "serve", "--listen", "127.0.0.1:0",
                                 "--disable-ticketing", "--control", "127.0.0.1:0"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        bound_addresses(proc, log)
        wait_until(lambda: "TICKETING IS DISABLED" in log.read_text(), what="the warning")
        assert re.search(r"WARNING.*TICKETING IS DISABLED: anyone who can reach 127\.0\.0\.1:\d+ can open a "
                         r"session and join any session", log.read_text())
    finally:
        proc.kill()
        proc.wait(timeout=5)


@pytest.mark.parametrize("argv, message", [
    (("--tickets-only",), "--tickets-only needs --control"),
    (("--tickets-only", "--control", "127.0.0.1:0", "--ticket-lifetime", "5"), "--ticket-lifetime needs --password"),
    (("--tickets-only", "--password", "pw"), "not allowed with argument"),
])
def test_serve_tickets_only_needs_the_control_api_and_no_password(argv, message):
    done = subprocess.run([sys.executable, "-m", "spicewire", "serve", "--listen", "127.0.0.1:0", *argv],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_serve_tickets_only_opens_sessions_by_tickets_alone(serve):
    served = serve("--tickets-only")
    assert "ticketing by tickets only" in served.output()
    ticket = served.request("POST", "/tickets", {"session_id": None, "expires_in": 30})["ticket"]
    assert served.get("/status")["config"]["ticketing"] is True

    def linked(password: str | None) -> int | None:
        attempt = Attempt(served.address, 0, ChannelType.MAIN, password=password)
        attempt.close()
        return attempt.code

    assert linked(None) == LinkErr.PERMISSION_DENIED  # no password: nothing but a ticket opens
    assert linked(ticket) == LinkErr.OK
    assert linked(ticket) == LinkErr.PERMISSION_DENIED


def test_server_config_refuses_bad_link_limits():
    with pytest.raises(ValueError, match="link_limits"):
        ServerConfig(link_limits={"in_progress": 3})  # type: ignore[arg-type]
    for bad in ({"in_progress": 0}, {"free_failures": -1}, {"failure_delay": float("nan")}):
        with pytest.raises(ValueError, match="LinkLimits"):
            LinkLimits(**bad)


