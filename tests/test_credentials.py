"""Credentials: the password from a file or the environment, changed and expired at runtime over
``POST /password`` (QMP's set_password and expire_password), and the ticket a migration carries so
a password that expired on s2 never strands a migrating client."""

from __future__ import annotations

import json
import time

import gevent
import pytest

from spicewire.client import ClientSession
from spicewire.control.server import ControlServer
from spicewire.errors import LinkError, LocalProtocolError
from spicewire.protocol.enums import ChannelType, LinkErr
from spicewire.protocol.link import LinkEstablished, ServerLink
from spicewire.server.net import ServerConfig, SpiceServer
from tests.rawclient import RawChannel, open_session
from tests.serverkit import PortChannel
from tests.test_control import call, get
from tests.test_link import encrypt, failure, kinds, requested, send_ticket, u32

ECHO = "org.spicewire.echo"
SINK = "org.spicewire.sink"


@pytest.fixture(autouse=True)
def deadline():
    timeout = gevent.Timeout(30, TimeoutError("test took longer than 30 s"))
    timeout.start()
    yield
    timeout.close()


@pytest.fixture
def spice():
    server = SpiceServer(ServerConfig(host="127.0.0.1", port=0, password="first",
                                      port_channels=[(ECHO, "echo"), (SINK, "sink")]))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def control(spice):
    control = ControlServer(spice, "127.0.0.1", 0)
    control.start()
    yield control
    control.stop()


def post_password(control, body) -> tuple[int, dict]:
    status, _, answer = call(control, "POST", "/password", body=json.dumps(body))
    return status, answer


def refusal(address, password) -> int | None:
    """The link error a new main link with ``password`` gets, or None when it links."""
    try:
        open_session(address, password=password)[0].sock.close()
    except LinkError as err:
        return err.code
    return None


# --- POST /password ---------------------------------------------------------------------------


def test_a_new_password_applies_to_new_links_and_linked_channels_stay(spice, control):
    _main, session_id = open_session(spice.address, password="first")
    echo = PortChannel.link(spice.address, session_id, ChannelType.PORT, 0, password="first")
    status, answer = post_password(control, {"password": "second"})
    assert (status, answer) == (200, {"ticketing": True, "password_expiry": None})
    assert refusal(spice.address, "first") == LinkErr.PERMISSION_DENIED
    assert refusal(spice.address, "second") is None
    echo.send_data(b"still linked")
    assert echo.read_data(12) == b"still linked"
    assert "second" not in json.dumps(get(control, "/status"))


def test_expiring_the_password_refuses_it_from_then_on(spice, control):
    assert refusal(spice.address, "first") is None
    status, answer = post_password(control, {"expires_in": 0})
    assert status == 200 and answer["ticketing"] is True and answer["password_expiry"].endswith("Z")
    assert refusal(spice.address, "first") == LinkErr.PERMISSION_DENIED
    assert get(control, "/status")["config"]["password_expiry"] <= time.time()
    # "never" revives it, as expire_password never does.
    assert post_password(control, {"expires_in": None}) == (200, {"ticketing": True, "password_expiry": None})
    assert refusal(spice.address, "first") is None


def test_an_expiry_in_the_future_still_lets_clients_in(spice, control):
    status, answer = post_password(control, {"password": "later", "expires_in": 3600})
    assert status == 200 and answer["password_expiry"] is not None
    assert refusal(spice.address, "later") is None
    _, expiry = spice.password
    assert expiry is not None and time.time() + 3500 < expiry <= time.time() + 3600


def test_a_null_password_turns_ticketing_off(spice, control):
    assert post_password(control, {"password": None}) == (200, {"ticketing": False, "password_expiry": None})
    assert refusal(spice.address, None) is None
    assert get(control, "/status")["config"]["ticketing"] is False


@pytest.mark.parametrize(("body", "reason"), [
    ({}, "empty"),
    ([], "must be a JSON object"),
    ({"password": 5}, "password must be a string of 1-60 bytes"),
    ({"password": ""}, "password must be a string"),
    ({"password": "x" * 61}, "password must be a string"),
    ({"password": "a\0b"}, "password must be a string"),
    ({"expires_in": -1}, "expires_in must be a finite number of seconds, 0 or more"),
    ({"expires_in": True}, "expires_in must be"),
    ({"expires_in": "soon"}, "expires_in must be"),
    ({"password": None, "expires_in": 5}, "there is no password to expire"),
    ({"password": "x", "lifetime": 5}, "unknown field lifetime"),
])
def test_bad_password_requests_are_a_400_and_change_nothing(spice, control, body, reason):
    before = spice.password
    status, answer = post_password(control, body)
    assert status == 400 and reason in answer["error"], answer
    assert spice.password == before


def test_set_password_refuses_an_expiry_without_a_password(spice):
    with pytest.raises(ValueError, match="an expiry needs a password"):
        spice.set_password(None, time.time())


# --- the password from a file or the environment ----------------------------------------------


def _links(served, password) -> int | None:
    return refusal(served.address, password)


def test_serve_reads_the_password_from_the_first_line_of_a_file(serve, tmp_path):
    path = tmp_path / "password"
    path.write_text("from-a-file\nsecond line ignored\n")
    served = serve("--password-file", str(path))
    assert _links(served, "from-a-file") is None
    assert _links(served, "second line ignored") == LinkErr.PERMISSION_DENIED
    assert "from-a-file" not in served.output()


def test_serve_takes_the_password_from_the_environment(serve, monkeypatch):
    monkeypatch.setenv("SPICEWIRE_PASSWORD", "from-the-env")
    served = serve()
    assert _links(served, "from-the-env") is None
    assert _links(served, "other") == LinkErr.PERMISSION_DENIED


def test_post_password_on_a_served_server(serve):
    served = serve("--password", "given")
    served.request("POST", "/password", {"expires_in": 0})
    assert _links(served, "given") == LinkErr.PERMISSION_DENIED
    assert "password expiry changed over the control API" in served.output()


# --- the migration ticket ---------------------------------------------------------------------


def test_a_migration_lands_although_the_password_expired_on_s2(nodes):
    s1, s2 = nodes(2)
    s1.spice.set_password("linked-with", None)
    session = ClientSession(*s1.address, password="linked-with", timeout=10).connect()
    try:
        echo = session.open_port(ECHO)
        session.open_port(SINK)
        echo.write(b"before")
        assert echo.read(6, timeout=10) == b"before"
        # s1's password changes after the client linked; s2 has its own, and it has expired.
        s1.spice.set_password("changed-since", None)
        s2.spice.set_password("s2-own", time.time() - 1)
        report = s1.migrate_to(s2)
        assert report["migrated"] == 1, report
        assert session.connected_to == s2.address
        echo.write(b"after")
        assert echo.read(5, timeout=10) == b"after"
        (sid,) = s2.spice.sessions
        assert s2.spice.migration.ticket(sid) is None  # the announcement ended with the migration
        assert s2.spice.tickets[sid] == "linked-with"  # and goes on with the session, to a next migration
    finally:
        session.close()
    # The ticket was what let it in: on s2 nobody links with it, nor with s2's expired password.
    assert refusal(s2.address, "linked-with") == LinkErr.PERMISSION_DENIED
    assert refusal(s2.address, "s2-own") == LinkErr.PERMISSION_DENIED


def test_a_ticket_opens_only_the_announced_session(nodes):
    (s2,) = nodes(1)
    s2.spice.set_password("s2-own", time.time() - 1)  # expired: the ticket does not care
    s2.api.post_json("/migration/announce", {
        "migration": "0123456789abcdef", "ttl": 30,
        "sessions": [{"session_id": "0000abcd", "ports": [[0, ECHO, "echo", 0]], "ticket": "carried"}],
    })
    # Its main link with the ticket is taken; a new session with the ticket is not.
    main = RawChannel(s2.address, 0xABCD, ChannelType.MAIN, password="carried")
    main.sock.close()
    with pytest.raises(LinkError) as refused:
        RawChannel(s2.address, 0, ChannelType.MAIN, password="carried")
    assert refused.value.code == LinkErr.PERMISSION_DENIED


@pytest.mark.parametrize("ticket", [5, "", "x" * 61, "a\0b"])
def test_an_announced_ticket_that_is_no_password_is_a_400(nodes, ticket):
    (s2,) = nodes(1)
    status, _, answer = call(s2.control, "POST", "/migration/announce", body=json.dumps({
        "migration": "0123456789abcdef", "ttl": 30,
        "sessions": [{"session_id": "0000abcd", "ports": [[0, ECHO, "echo", 0]], "ticket": ticket}],
    }))
    assert status == 400 and "ticket" in answer["error"]
    assert s2.spice.migration.ticket(0xABCD) is None


# --- the link machine's side of the ticket (sans-I/O) -----------------------------------------


def ticketed(ticket: str) -> ServerLink:
    """A link of a server whose password "own" expired at 50, told to take ``ticket`` too."""
    server = requested(password="own", password_expiry=50.0)
    server.allow_migration_ticket(ticket)
    server.accept((0x09,))
    server.data_to_send()
    return server


def test_a_migration_ticket_links_past_an_expired_password():
    assert kinds(send_ticket(ticketed("carried"), b"carried\0", now=60.0)) == [LinkEstablished]


def test_the_server_password_still_links_beside_a_ticket_until_it_expires():
    assert kinds(send_ticket(ticketed("carried"), b"own\0", now=10.0)) == [LinkEstablished]
    server = ticketed("carried")
    server.receive_data(u32(1) + encrypt(b"own\0"), 60.0)
    assert failure(server, LinkError).code == LinkErr.PERMISSION_DENIED


@pytest.mark.parametrize(("ticket", "sent"), [("carried", b"other\0"), ("", b"\0"), ("carried", b"carrie\0")])
def test_anything_else_is_denied(ticket, sent):
    server = ticketed(ticket)
    server.receive_data(u32(1) + encrypt(sent), 10.0)
    assert failure(server, LinkError).code == LinkErr.PERMISSION_DENIED


def test_a_ticket_is_allowed_only_while_the_request_awaits_its_answer():
    server = requested(password="own")
    server.accept((0x09,))
    with pytest.raises(LocalProtocolError):
        server.allow_migration_ticket("late")
