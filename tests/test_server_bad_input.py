"""Bad input, one rule per test: each bad connection must end with the right SPICE link error (the
LinkReply error field, or the u32 link result after the ticket, PROTOCOL.md 1.4 / 1.7) or with a
logged disconnect, while a second session on the same server keeps working with its buffered data
intact (``Bystander``: an echo round trip, and a paused sink whose held bytes arrive whole after
the bad input)."""

from __future__ import annotations

import logging
import os
import struct

import gevent
import pytest

from spicewire.errors import LinkError
from spicewire.protocol.enums import (
    LINK_HEADER_SIZE,
    ChannelType,
    LinkErr,
    MsgcMain,
)
from spicewire.protocol.link import ClientLink, SpiceLinkHeader, SpiceLinkReply
from spicewire.server.session import Limits
from tests.serverkit import (
    ECHO,
    SINK,
    Bystander,
    MainSession,
    RawChannel,
    echo_roundtrip,
    link_error_of,
    link_mess_bytes,
    raw_connect,
    read_until_closed,
    recv_exactly,
    running_server,
    wait_until,
)

PASSWORD = "s3cret"
LINK_TIMEOUT = 0.5
STALL_TIMEOUT = 0.5
MAIN_MAX_MESSAGE = 26624  # spice-server's main-channel receive limit (2)


@pytest.fixture(scope="module")
def server():
    with running_server(
        password=PASSWORD, link_timeout=LINK_TIMEOUT, stall_timeout=STALL_TIMEOUT,
        limits=Limits(to_device=1 << 20, to_client=1 << 20),
    ) as srv:
        yield srv


@pytest.fixture
def bystander(server):
    """A second session running through the test; checked intact afterwards."""
    b = Bystander(server, password=PASSWORD)
    yield b
    b.check()
    b.close()


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="spicewire")
    return caplog


def peer_of(sock) -> str:
    """How the server labels this client in its log lines."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def wait_for_log(caplog, peer: str, *needles: str, timeout: float = 5.0) -> str:
    """The first server log line about ``peer`` containing every needle."""
    found: list[str] = []

    def seen() -> bool:
        for record in caplog.records:
            text = record.getMessage()
            if f"[{peer}" in text and all(n in text for n in needles):
                found.append(text)
                return True
        return False

    wait_until(seen, timeout, what=f"a log line about {peer} with {needles}")
    return found[0]


def refused(address, payload: bytes) -> tuple[int, str]:
    """Send ``payload`` raw; the link error the server answered with, and the client's peer label.
    The server must close the connection after answering."""
    sock = raw_connect(address)
    peer = peer_of(sock)
    return link_error_of(send_until_closed(sock, payload)), peer


def refused_after_ticket(address, connection_id: int, channel_type: int, channel_id: int) -> tuple[int, str]:
    """Link with the password; the link error the server answered (an id is looked at only once
    the ticket passed, as in spice-server: the u32 link result, PROTOCOL.md 1.7), and the peer."""
    sock = raw_connect(address)
    peer = peer_of(sock)
    link = ClientLink(connection_id, channel_type, channel_id, password=PASSWORD)
    try:
        with gevent.Timeout(5):
            while True:
                try:
                    link.next_event()
                except LinkError as err:
                    return err.code, peer
                out = link.data_to_send()
                if out:
                    sock.sendall(out)
                data = sock.recv(65536)
                assert data, "the server closed without a link result"
                link.receive_data(data)
    finally:
        sock.close()


def send_until_closed(sock, data: bytes) -> bytes:
    """Send ``data``, then read everything until the server closes; the socket is closed after."""
    try:
        sock.sendall(data)
        return read_until_closed(sock)
    finally:
        sock.close()


def link_to_reply(address, payload: bytes):
    """Send a link message and read the whole LinkReply: (socket, header+reply bytes, reply)."""
    sock = raw_connect(address)
    sock.sendall(payload)
    data = b""
    with gevent.Timeout(5):
        while len(data) < LINK_HEADER_SIZE or len(data) < LINK_HEADER_SIZE + SpiceLinkHeader.decode(data).size:
            chunk = sock.recv(4096)
            assert chunk, "server closed before its LinkReply"
            data += chunk
    reply = SpiceLinkReply.decode(data[LINK_HEADER_SIZE:])
    assert reply.error == LinkErr.OK
    return sock, data, reply


# --- link header and link message ----------------------------------------------------------------


def test_bad_magic(server, bystander, logs):
    payload = bytearray(link_mess_bytes(0, ChannelType.MAIN))
    payload[:4] = b"RFB "
    code, peer = refused(server.address, bytes(payload))
    assert code == LinkErr.INVALID_MAGIC
    wait_for_log(logs, peer, "link refused", "magic")


def test_wrong_major_version(server, bystander, logs):
    payload = bytearray(link_mess_bytes(0, ChannelType.MAIN))
    payload[4:8] = struct.pack("<I", 3)
    code, peer = refused(server.address, bytes(payload))
    assert code == LinkErr.VERSION_MISMATCH
    wait_for_log(logs, peer, "link refused", "major version 3")


@pytest.mark.parametrize("size", [17, 4097, 0xFFFFFFFF])
def test_link_size_out_of_bounds(server, bystander, logs, size):
    payload = bytearray(link_mess_bytes(0, ChannelType.MAIN))
    payload[12:16] = struct.pack("<I", size)
    code, peer = refused(server.address, bytes(payload))
    assert code == LinkErr.INVALID_DATA
    wait_for_log(logs, peer, "link refused", f"link size {size}")


@pytest.mark.parametrize("counts", [(2, 1), (0, 3), (1025, 0)], ids=["past-end", "channel-past-end", "over-1024"])
def test_caps_counts_past_the_message(server, bystander, logs, counts):
    # A message with room for one caps word claiming more.
    body = bytearray(link_mess_bytes(0, ChannelType.MAIN, common_caps=(0x09,))[LINK_HEADER_SIZE:])
    body[6:14] = struct.pack("<II", *counts)
    payload = SpiceLinkHeader(size=len(body)).encode() + bytes(body)
    code, peer = refused(server.address, payload)
    assert code == LinkErr.INVALID_DATA
    wait_for_log(logs, peer, "link refused", "caps")


# --- authentication ------------------------------------------------------------------------------


def test_garbage_ticket(server, bystander, logs):
    sock, _, _ = link_to_reply(server.address, link_mess_bytes(0, ChannelType.MAIN))
    peer = peer_of(sock)
    # AUTH_SPICE, then no valid OAEP block
    result = send_until_closed(sock, struct.pack("<I", 1) + os.urandom(128))
    assert result == struct.pack("<I", LinkErr.PERMISSION_DENIED)
    wait_for_log(logs, peer, "link refused", "PERMISSION_DENIED", "decrypt")


def test_replayed_ticket(server, bystander, logs):
    # Link A goes through with the right password; its encrypted ticket is recorded on the way.
    link = ClientLink(0, ChannelType.MAIN, 0, password=PASSWORD)
    first, reply_bytes, _ = link_to_reply(server.address, link.data_to_send())
    link.receive_data(reply_bytes)
    assert link.next_event() is None
    recorded = link.data_to_send()  # auth mechanism word + 128-byte ticket for A's key
    assert len(recorded) == 4 + 128
    first.sendall(recorded)
    assert recv_exactly(first, 4) == struct.pack("<I", LinkErr.OK)
    first.close()
    # Link B replays it: B's fresh key cannot decrypt it.
    second, _, _ = link_to_reply(server.address, link_mess_bytes(0, ChannelType.MAIN))
    peer = peer_of(second)
    result = send_until_closed(second, recorded)
    assert result == struct.pack("<I", LinkErr.PERMISSION_DENIED)
    wait_for_log(logs, peer, "link refused", "PERMISSION_DENIED")


def test_wrong_password(server, bystander, logs):
    with pytest.raises(LinkError) as err:
        RawChannel.link(server.address, 0, ChannelType.MAIN, 0, password="not-" + PASSWORD)
    assert err.value.code == LinkErr.PERMISSION_DENIED
    wait_for_log(logs, "127.0.0.1", "link refused", "invalid password")


# --- which channel -------------------------------------------------------------------------------


def test_unknown_connection_id_on_port_link(server, bystander, logs):
    unknown = 0x5EED0001
    while unknown in server.sessions:
        unknown += 1
    code, peer = refused_after_ticket(server.address, unknown, ChannelType.PORT, ECHO)
    assert code == LinkErr.BAD_CONNECTION_ID
    wait_for_log(logs, peer, "link refused", "BAD_CONNECTION_ID")


@pytest.mark.parametrize(
    "channel_type, channel_id",
    [(ChannelType.PORT, 7), (ChannelType.DISPLAY, 0), (ChannelType.USBREDIR, 0)],
    ids=["port-7", "display", "usbredir"],
)
def test_unknown_channel(server, bystander, logs, channel_type, channel_id):
    session = bystander.session.session_id
    code, peer = refused_after_ticket(server.address, session, channel_type, channel_id)
    assert code == LinkErr.CHANNEL_NOT_AVAILABLE
    wait_for_log(logs, peer, "link refused", "CHANNEL_NOT_AVAILABLE")


def test_port_already_connected(server, bystander):
    session = bystander.session.session_id
    code, _ = refused_after_ticket(server.address, session, ChannelType.PORT, SINK)
    assert code == LinkErr.CHANNEL_NOT_AVAILABLE


# --- after the link ------------------------------------------------------------------------------


def _bad_main(server, payload: bytes) -> tuple[MainSession, str]:
    """A fresh session whose main channel sends ``payload`` raw; returns once the server closed it."""
    session = MainSession(server.address, password=PASSWORD)
    peer = peer_of(session.main.sock)
    session.main.send_bytes(payload)
    session.main.wait_closed(5)
    wait_until(lambda: session.session_id not in server.sessions, what="the bad session to end")
    session.close()
    return session, peer


def test_message_over_main_channel_limit(server, bystander, logs):
    # AGENT_DATA announcing one byte more than the main channel accepts; the body never comes.
    _, peer = _bad_main(server, struct.pack("<HI", MsgcMain.AGENT_DATA, MAIN_MAX_MESSAGE + 1))
    wait_for_log(logs, peer, "protocol error, disconnecting", f"exceeds the limit of {MAIN_MAX_MESSAGE}")


def test_message_at_main_channel_limit_is_accepted(server, bystander):
    # The limit itself is legal: an AGENT_DATA of exactly 26624 bytes is read (and dropped: no agent).
    session = MainSession(server.address, password=PASSWORD)
    session.main.send_raw(MsgcMain.AGENT_DATA, bytes(MAIN_MAX_MESSAGE))
    assert session.attach_channels()  # still served
    session.close()


@pytest.mark.parametrize("msg_type", [999, MsgcMain.CLIENT_INFO], ids=["unknown-999", "unhandled-client-info"])
def test_unknown_message_type_on_main(server, bystander, logs, msg_type):
    _, peer = _bad_main(server, struct.pack("<HI", msg_type, 8) + bytes(8))
    wait_for_log(logs, peer, "protocol error, disconnecting")


GARBAGE = bytes.fromhex("deadbeef") * 16  # mini header: type 0xadde, size 0xefbeadde


def test_garbage_after_the_link(server, bystander, logs):
    _, peer = _bad_main(server, GARBAGE)
    wait_for_log(logs, peer, "protocol error, disconnecting")


def test_garbage_glued_to_the_ticket(server, bystander, logs):
    # Arrives in the same segment as the ticket: the link machine's ``trailing`` bytes.
    link = ClientLink(0, ChannelType.MAIN, 0, password=PASSWORD)
    sock, reply_bytes, _ = link_to_reply(server.address, link.data_to_send())
    peer = peer_of(sock)
    link.receive_data(reply_bytes)
    assert link.next_event() is None
    answer = send_until_closed(sock, link.data_to_send() + GARBAGE)
    assert answer[:4] == struct.pack("<I", LinkErr.OK)  # the link itself was fine
    wait_for_log(logs, peer, "protocol error, disconnecting")


def test_garbage_on_a_port_channel(server, bystander, logs):
    session = MainSession(server.address, password=PASSWORD)
    port = session.open_port(ECHO)
    peer = peer_of(port.sock)
    port.send_bytes(struct.pack("<HI", 0x4242, 4) + b"junk")
    port.wait_closed(5)
    wait_for_log(logs, peer, "protocol error, disconnecting", "unknown message type")
    # Only the port connection went: the session and its main channel are still served.
    assert session.session_id in server.sessions
    assert session.attach_channels()
    session.close()


# --- stalls --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["mid-header", "before-ticket", "mid-ticket"])
def test_client_stalls_mid_handshake(server, bystander, logs, stage):
    mess = link_mess_bytes(0, ChannelType.MAIN)
    if stage == "mid-header":
        sock = raw_connect(server.address)
        sock.sendall(mess[:10])
    else:
        sock, _, _ = link_to_reply(server.address, mess)
        if stage == "mid-ticket":
            sock.sendall(struct.pack("<I", 1) + bytes(60))
    peer = peer_of(sock)
    try:
        answer = read_until_closed(sock, timeout=LINK_TIMEOUT + 10)
    finally:
        sock.close()
    assert answer == b""  # a timed-out link gets no reply (spice-server's behaviour as well)
    wait_for_log(logs, peer, "link timed out")  # the link deadline closed it, nothing else


@pytest.mark.parametrize("channel", ["main", "port"])
def test_client_stalls_mid_message(server, bystander, logs, channel):
    session = MainSession(server.address, password=PASSWORD)
    raw = session.main if channel == "main" else session.open_port(SINK)
    peer = peer_of(raw.sock)
    # A header announcing 1000 bytes, then 10 of them, then nothing.
    msg_type = MsgcMain.AGENT_DATA if channel == "main" else 101
    raw.send_bytes(struct.pack("<HI", msg_type, 1000) + bytes(10))
    raw.wait_closed(STALL_TIMEOUT + 5)
    wait_for_log(logs, peer, "protocol error, disconnecting", "stalled")
    session.close()


def test_idle_client_between_messages_is_not_dropped(server, bystander):
    """The stall timeout is for a message left half-sent, not for a quiet channel."""
    session = MainSession(server.address, password=PASSWORD)
    echo = session.open_port(ECHO)
    gevent.sleep(STALL_TIMEOUT * 3)
    assert echo_roundtrip(echo, b"still here") == b"still here"
    session.close()


# --- and the server is still there ---------------------------------------------------------------


def test_server_still_serves_new_sessions(server):
    """Runs last in this module: after every case above, new sessions link and echo."""
    sessions = [MainSession(server.address, password=PASSWORD) for _ in range(3)]
    for session in sessions:
        assert {c.id for c in session.attach_channels()} == {ECHO, SINK}
        echo = session.open_port(ECHO)
        payload = os.urandom(300_000)
        assert echo_roundtrip(echo, payload) == payload
    for session in sessions:
        session.close()
    wait_until(lambda: not server.sessions, what="every session to end")


def test_our_own_protocol_bug_is_not_blamed_on_the_client(server, bystander, logs, monkeypatch):
    """A LocalProtocolError is a bug here: logged as internal, never as the client's protocol
    error; it ends that connection only."""
    from spicewire.errors import LocalProtocolError
    from spicewire.protocol import messages as m
    from spicewire.server.session import MainConnection

    handle = MainConnection.handle

    def buggy(self, msgs):
        if any(isinstance(msg, m.MsgcMainAttachChannels) for msg in msgs):
            raise LocalProtocolError("a bug planted by the test")
        return handle(self, msgs)

    monkeypatch.setattr(MainConnection, "handle", buggy)
    _, peer = _bad_main(server, struct.pack("<HI", MsgcMain.ATTACH_CHANNELS, 0))
    line = wait_for_log(logs, peer, "internal error", "a bug planted by the test")
    assert "protocol error" not in line
    assert not any(f"[{peer}" in r.getMessage() and "protocol error" in r.getMessage() for r in logs.records)
