"""The client library against our own server and against QEMU's spice-server."""

import hashlib
import os

import gevent
import pytest

from spicewire.client import ClientSession, channels
from spicewire.errors import LinkError
from spicewire.protocol.enums import ChannelType, LinkErr
from spicewire.server import ServerConfig, SpiceServer

from . import peers
from .peers import echo_bios
from .peers.qemu import QemuSpice, SpicePort
from .serverkit import read_exactly

PORTS = [("org.spicewire.echo", "echo"), ("org.spicewire.sink", "sink")]


@pytest.fixture
def server():
    srv = SpiceServer(ServerConfig(port=0, port_channels=PORTS))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def password_server():
    srv = SpiceServer(ServerConfig(port=0, password="s3cret", port_channels=PORTS))
    srv.start()
    yield srv
    srv.stop()


def test_client_learns_session_id_and_port_channels(server):
    with ClientSession(*server.address) as session:
        assert session.session_id in server.sessions
        assert session.channels == [(ChannelType.PORT, 0), (ChannelType.PORT, 1)]
        assert session.main.name == "spicewire"  # NAME_AND_UUID is advertised and honoured
        assert len(session.main.uuid) == 16
        # main's reads go first in a loop turn (see the test below); the ports' do not
        assert session.main.sock._read_event.priority == channels.FIRST_READ_PRIORITY
        port = session.open_port("org.spicewire.sink")
        assert port.sock._read_event.priority == 0


def test_client_finds_a_port_by_name(server):
    with ClientSession(*server.address) as session:
        port = session.open_port("org.spicewire.sink")
        assert (port.name, port.opened, port.channel.channel_id) == ("org.spicewire.sink", True, 1)


def test_client_echo_round_trip_is_byte_exact(server):
    data = os.urandom(3 << 20)
    with ClientSession(*server.address) as session:
        port = session.open_port("org.spicewire.echo")
        writer = gevent.spawn(port.write, data)
        assert read_exactly(port, len(data), timeout=20) == data
        writer.get(timeout=5)


@pytest.mark.parametrize("offset", [-1, 0, 1], ids=["under", "at", "over"])
def test_client_write_splits_at_a_small_data_chunk_and_the_echo_is_intact(server, monkeypatch, offset):
    """PortChannel.write sends DATA pieces of at most DATA_CHUNK bytes: one byte under and at it is
    one message, one byte over is two; the server echoes the bytes whole either way."""
    chunk = 8
    monkeypatch.setattr(channels, "DATA_CHUNK", chunk)
    data = os.urandom(chunk + offset)
    with ClientSession(*server.address) as session:
        port = session.open_port("org.spicewire.echo")
        pieces = []
        send = port.send
        monkeypatch.setattr(port, "send", lambda msg: (pieces.append(len(msg.data)), send(msg)))
        port.write(data)
        assert pieces == ([chunk, 1] if offset > 0 else [len(data)])
        assert read_exactly(port, len(data), timeout=10) == data


def test_client_data_reaches_the_sink_intact(server):
    data = os.urandom(1 << 20)
    with ClientSession(*server.address) as session:
        port = session.open_port("org.spicewire.sink")
        port.write(data)
        sink = server.sessions[session.session_id].ports[1].device
        with gevent.Timeout(10):
            while sink.bytes_in < len(data):
                gevent.sleep(0.01)
        assert sink.status()["sha256"] == hashlib.sha256(data).hexdigest()


def test_client_with_the_right_password_links(password_server):
    with ClientSession(*password_server.address, password="s3cret") as session:
        assert session.open_port("org.spicewire.echo").name == "org.spicewire.echo"


def test_client_with_a_wrong_password_is_refused(password_server):
    with pytest.raises(LinkError) as err:
        ClientSession(*password_server.address, password="wrong").connect()
    assert err.value.code == LinkErr.PERMISSION_DENIED


def test_client_asking_for_a_missing_port_name_says_which_exist(server):
    with ClientSession(*server.address) as session, pytest.raises(LookupError, match=r"org\.spicewire\.echo"):
        session.open_port("org.nothing")


@pytest.mark.peer
def test_client_links_main_and_port_to_qemu_spice_server():
    """Our side of the protocol against the reference server: links, PORT_INIT, and an echo
    through a guest (a BIOS that echoes COM1)."""
    peers.require("qemu")
    with (QemuSpice(ports=[SpicePort("org.test.echo", "isa")], bios=echo_bios.build(), lifetime=120) as q,
          ClientSession("127.0.0.1", q.spice_port) as session):
        assert session.session_id != 0
        assert (ChannelType.PORT, 0) in session.channels
        port = session.open_port("org.test.echo")
        assert port.opened
        payload = b"spicewire through QEMU\n" * 40
        port.write(payload)
        assert read_exactly(port, len(payload), timeout=30) == payload


@pytest.mark.parametrize("first", [True, False], ids=["main-read-first", "as-libev-orders"])
def test_main_is_read_before_the_channels_ready_in_the_same_loop_turn(first):
    """At a seamless switch s1 sends main's MIGRATE before the other channels'. libev runs a
    turn's ready sockets last-ready first, so without ``read_first`` main's would be read last
    (and its FLUSH_MARK round trip, which the switch waits for, start last)."""
    from gevent import socket

    pairs = {name: socket.socketpair() for name in ("main", "inputs", "cursor")}
    if first:
        channels.read_first(pairs["main"][0])
    woke: list[str] = []

    def reader(name: str) -> None:
        pairs[name][0].recv(16)
        woke.append(name)

    readers = [gevent.spawn(reader, name) for name in pairs]
    gevent.sleep(0)  # every reader now waits on its socket
    for name in pairs:  # main's MIGRATE first, then the others', all ready by the next turn
        pairs[name][1].send(b"MIGRATE")
    gevent.joinall(readers, timeout=5)
    assert sorted(woke) == sorted(pairs)
    assert woke.index("main") == (0 if first else len(pairs) - 1), woke
    for a, b in pairs.values():
        a.close()
        b.close()
