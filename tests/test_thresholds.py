"""Size thresholds tested one below, at and one above: how the server reads a connection
(FIRST_READ, FLOOD_MESSAGES), how s2 checks a MIGRATE_DATA's HMAC (AUTH_IN_THREAD, LANDED_STEP),
how large a pre-copy index may be (MAX_INDEX), how large a screen may be (screens.MAX_SIDE, for a
server's screen and a migrated one alike), and how much of a frame flush_now writes in its own turn
(what the socket takes: one byte less than the frame, all of it, one byte more). Each is asserted
on what the code did (the reads it made, the thread that hashed), never on timing."""

from __future__ import annotations

import io
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from spicewire import screens
from spicewire.protocol import messages as m
from spicewire.protocol import state_auth
from spicewire.protocol.enums import ChannelType
from spicewire.server import net
from spicewire.server.display import announce_screen, announced_screen
from spicewire.server.migration.common import MAIN
from spicewire.server.migration.destination import AUTH_IN_THREAD, LANDED_STEP, LandingMac, SessionDestination
from spicewire.server.migration.precopy import MAX_INDEX, receive_port_precopy
from spicewire.server.net import FIRST_READ, FLOOD_MESSAGES, ServerConfig, SpiceServer

from .serverkit import ECHO, SINK, MainSession, PortChannel, running_server, wait_until

KEY = bytes(range(32))


pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


# --- reading a connection ------------------------------------------------------------------------


@pytest.fixture
def reads(monkeypatch):
    """(bytes, messages) of every read the server's connections make, in order."""
    made: list[tuple[int, int]] = []
    real = net.next_read_size

    def recorded(n: int, count: int) -> int:
        made.append((n, count))
        return real(n, count)

    monkeypatch.setattr(net, "next_read_size", recorded)
    return made


class CountingPort(PortChannel):
    """A port channel that counts the bytes it wrote since its link (an ACK_SYNC the link's last
    bytes called for too)."""

    sent = 0

    def _write(self, data) -> None:
        self.sent += len(data)
        super()._write(data)


def unread_port(server, session: MainSession, channel_id: int) -> CountingPort:
    """A port linked just now. Nothing yields between its link and the caller's next writes (a
    gevent send yields only when the socket is full), so the server's first read of it comes
    after them, and finds them all."""
    port = CountingPort.link(server.address, session.session_id, ChannelType.PORT, channel_id, auto_ack=False)
    assert port.channel.sends_mini_header  # a header is 6 bytes
    port.flush()
    return port


@pytest.mark.parametrize("size", [FIRST_READ - 1, FIRST_READ, FIRST_READ + 1])
def test_a_connections_first_read_takes_at_most_first_read_bytes(reads, size):
    """A client's first bytes after the link, all there at once: the server's first read takes
    FIRST_READ of them at most, whatever the client had sent."""
    with running_server() as server:
        session = MainSession(server.address)
        reads.clear()  # the main channel is quiet: what comes now are the port's reads
        sink = unread_port(server, session, SINK)
        sink.send(m.MsgcSpicevmcData(bytes(size - sink.sent - 6)))
        assert sink.sent == size
        wait_until(lambda: sum(n for n, _ in reads) == size, what="the port's bytes to be read")
        assert reads[0][0] == min(size, FIRST_READ), reads
        session.close()


@pytest.mark.parametrize("count", [FLOOD_MESSAGES - 1, FLOOD_MESSAGES, FLOOD_MESSAGES + 1])
def test_a_read_of_more_than_flood_messages_counts_as_a_flood_read(reads, count):
    with running_server() as server:
        session = MainSession(server.address)
        floods = server.flood_reads
        reads.clear()
        port = unread_port(server, session, ECHO)
        for _ in range(count - port.channel.serial_out):
            port.channel.send(m.MsgcAck())
        port.flush()
        assert port.channel.serial_out == count and port.sent <= FIRST_READ  # one read takes them all
        wait_until(lambda: sum(n for n, _ in reads) == port.sent, what="the ACKs to be read")
        assert reads == [(port.sent, count)]
        assert server.flood_reads - floods == (1 if count > FLOOD_MESSAGES else 0)
        session.close()


# --- s2 hashing a MIGRATE_DATA -------------------------------------------------------------------


class RecordingMac:
    """A StateMac's update, recorded: how many bytes each piece held and which thread fed it.
    ``in_thread`` as a StateMac's: whether its update is worth a worker thread."""

    def __init__(self, in_thread: bool = True) -> None:
        self.pieces: list[tuple[int, int]] = []  # (bytes, thread id)
        self.trailer_size = state_auth.trailer_size(state_auth.VERSION)
        self.in_thread = in_thread

    def update(self, data) -> None:
        self.pieces.append((memoryview(data).nbytes, threading.get_ident()))


def landing(body: int, arrived: int, in_thread: bool = True) -> tuple[LandingMac, RecordingMac]:
    """A LandingMac over a body of ``body`` bytes (plus its trailer) of which ``arrived`` came."""
    mac = RecordingMac(in_thread)
    buffer = np.zeros(body + state_auth.trailer_size(state_auth.VERSION), dtype=np.uint8)
    return LandingMac(mac, buffer, lambda: arrived), mac  # type: ignore[arg-type]


@pytest.mark.parametrize("arrived", [LANDED_STEP - 1, LANDED_STEP, LANDED_STEP + 1])
def test_a_landing_body_is_hashed_ahead_once_landed_step_bytes_wait(arrived):
    """For a MAC whose update lets go of the GIL (v1's HMAC): under LANDED_STEP waiting, nothing
    is hashed until the body is whole; from it on, what arrived is hashed in a worker thread
    before the last byte comes."""
    mac_of, mac = landing(3 * LANDED_STEP, arrived, in_thread=True)
    mac_of.landed()
    mac_of.finish()
    ahead = arrived if arrived >= LANDED_STEP else 0
    assert mac_of.ahead == ahead
    assert sum(n for n, _ in mac.pieces) == 3 * LANDED_STEP  # the whole body, once
    if ahead:
        n, thread = mac.pieces[0]
        assert n == ahead and thread != threading.get_ident()


@pytest.mark.parametrize("arrived", [1, LANDED_STEP - 1, LANDED_STEP, LANDED_STEP + 1])
def test_a_mac_that_holds_the_gil_hashes_each_read_on_the_hub_as_it_lands(arrived):
    """v2's Poly1305 (holds the GIL): every read is hashed on the hub right after it, whatever
    its size (LANDED_STEP is the worker thread's), and a read that brought nothing new adds no piece."""
    mac_of, mac = landing(3 * LANDED_STEP, arrived, in_thread=False)
    mac_of.landed()
    mac_of.landed()
    assert mac.pieces == [(arrived, threading.get_ident())]
    mac_of.finish()
    assert mac_of.ahead == arrived
    assert sum(n for n, _ in mac.pieces) == 3 * LANDED_STEP  # the whole body, once


@pytest.mark.parametrize("in_thread", [True, False], ids=["thread-mac", "hub-mac"])
@pytest.mark.parametrize("rest", [AUTH_IN_THREAD - 1, AUTH_IN_THREAD, AUTH_IN_THREAD + 1])
def test_the_tail_left_to_hash_moves_to_a_thread_from_auth_in_thread_bytes(rest, in_thread):
    """For a MAC worth a worker thread only: one that holds the GIL hashes every tail on the hub."""
    mac_of, mac = landing(rest, 0, in_thread)
    mac_of.finish()
    ((n, thread),) = mac.pieces
    assert n == rest
    assert (thread != threading.get_ident()) == (in_thread and rest >= AUTH_IN_THREAD)


@pytest.mark.parametrize("version", state_auth.VERSIONS)
@pytest.mark.parametrize("size", [AUTH_IN_THREAD - 1, AUTH_IN_THREAD, AUTH_IN_THREAD + 1])
def test_a_migrate_data_from_auth_in_thread_bytes_is_checked_in_a_thread(monkeypatch, size, version):
    """A MIGRATE_DATA that did not land in a prepared buffer (main's, a small port's): checked on
    the hub under AUTH_IN_THREAD bytes (sealed), in a worker thread from it on under version 1
    (HMAC-SHA256 lets go of the GIL); on the hub at any size under version 2 (Poly1305 does not)."""
    threads: list[int] = []
    real = state_auth.unsealed

    def unsealed(*args):
        threads.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(state_auth, "unsealed", unsealed)
    session = SimpleNamespace(id=7)
    # s1's key and s2's: the same secret, each handing out MAIN's MAC once.
    s1_key, s2_key = (state_auth.MigrationKey(KEY, version) for _ in range(2))
    manager = SimpleNamespace(announcements={7: SimpleNamespace(state_key=s2_key)})
    arriving = SessionDestination(manager, session)  # type: ignore[arg-type]
    body = bytes(size - s1_key.trailer_size)
    opened = arriving._authentic(MAIN, m.MsgcMigrateData(body + state_auth.seal(s1_key, 7, MAIN, body)))
    assert opened is not None and bytes(opened.data) == body
    assert (threads[0] != threading.get_ident()) == (version == 1 and size >= AUTH_IN_THREAD)


# --- a pre-copy round's index --------------------------------------------------------------------


@pytest.mark.parametrize("index_size", [MAX_INDEX - 1, MAX_INDEX, MAX_INDEX + 1])
def test_a_precopy_index_over_max_index_bytes_is_refused(index_size):
    """The index (JSON, an empty list padded with spaces here) is read up to MAX_INDEX bytes; one
    more and the round is refused before any of it is read."""
    index = b"[]".ljust(index_size)
    body = index_size.to_bytes(4, "little") + index
    stream = io.BytesIO(body)
    if index_size > MAX_INDEX:
        with pytest.raises(ValueError, match=f"index of {index_size} bytes"):
            receive_port_precopy(SimpleNamespace(announcements={}), "m", stream, len(body))
        assert stream.tell() == 4
    else:
        assert json.loads(index) == []
        assert receive_port_precopy(SimpleNamespace(announcements={}), "m", stream, len(body)) == {
            "held": 0, "capacities": []}



# --- a screen's size -----------------------------------------------------------------------------


@pytest.mark.parametrize("side", [screens.MAX_SIDE - 1, screens.MAX_SIDE, screens.MAX_SIDE + 1])
def test_a_screen_a_server_starts_with_is_one_its_migration_can_announce(side):
    """One limit for both: a server starts with a screen up to screens.MAX_SIDE pixels a side,
    and s2 takes the announcement of that screen (its own factory making the same size); one
    pixel more and the server refuses to start, so no screen runs that could not migrate."""
    for width, height in ((side, 1), (1, side)):
        config = ServerConfig(host="127.0.0.1", port=0, display="paint", display_size=(width, height))
        if side > screens.MAX_SIDE:
            with pytest.raises(ValueError, match="a screen must be"):
                SpiceServer(config)
            with pytest.raises(ValueError):
                announced_screen({"kind": "paint", "width": width, "height": height})
            continue
        SpiceServer(config)  # accepted: its sessions would get this screen
        state = SimpleNamespace(screen=screens.factory("paint", width, height)())
        made = announced_screen(announce_screen(state))()  # type: ignore[arg-type]
        assert (made.kind, made.width, made.height) == ("paint", width, height)


# --- flush_now: what the socket takes in the migration's own turn --------------------------------


class TakesAtMost:
    """A server connection's socket that takes at most ``room`` bytes in a send that must not
    wait (``timeout=0.0``, flush_now's), as a full socket buffer does; every other write is the
    real socket's."""

    def __init__(self, sock, room: int) -> None:
        self._sock, self.room, self.taken = sock, room, []

    def send(self, data, flags=0, timeout=None):
        if timeout == 0.0:
            part = bytes(data[: self.room])
            self.taken.append(len(part))
            return self._sock.send(part, flags) if part else 0
        return self._sock.send(data, flags)

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest.mark.parametrize("room_delta", [-1, 0, 1])
def test_flush_now_writes_what_the_socket_takes_and_the_writer_the_rest(room_delta):
    """A frame one byte larger than the socket takes at once, exactly its size, one byte smaller:
    flush_now sends that much in its own turn, leaves the rest queued (and counted) for the writer,
    and the client gets the message whole, once, in order."""
    payload = bytes(range(256)) * 16
    with running_server() as server, MainSession(server.address) as session:
        port = session.open_port(ECHO)
        port.send_data(b"ready")
        assert port.read_data(5) == b"ready"  # linked, and the server's writer waits for more
        conn = server.sessions[session.session_id].ports[ECHO].connection
        transport = conn.transport
        wait_until(lambda: transport._writer_waiting, what="the writer to wait")
        frame_size = len(payload) + 6  # mini header
        real, limited = transport.sock, TakesAtMost(transport.sock, frame_size + room_delta)
        transport.sock = limited
        before = server.budget.used
        try:
            conn.channel.send(m.MsgSpicevmcData(payload))
            transport.flush_now()
            sent = min(frame_size, frame_size + room_delta)
            assert limited.taken == [sent]
            assert transport.pending_write == frame_size - sent  # the rest waits for the writer
        finally:
            transport.sock = real
        assert port.read_data(len(payload)) == payload
        wait_until(lambda: transport.pending_write == 0 and server.budget.used == before,
                   what="the writer to send the rest and release it")
        port.send_data(b"after")
        assert port.read_data(5) == b"after"  # nothing repeated or left behind
