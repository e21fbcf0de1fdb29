"""Migration thresholds tested one below, at and one above: the bytes s1 gathers per sendmsg for a
port's streamed MIGRATE_DATA (source.GATHER_BATCH), the reads s2 lands such a body with
(net.LANDING_READ), the inputs' motion count that travels in ICMD as a u16 (MAX_MOTION_COUNT), and
a small backlog's prefaulted buffer that the MIGRATE_DATA arriving outgrows. Each is asserted on
what the code did (the sendmsg calls, the reads offered, the bytes that arrived), never on timing;
thresholds a real body would take too long to cross are monkeypatched smaller."""

from __future__ import annotations

import os

import gevent
import gevent.event
import numpy as np
import pytest

from spicewire import screens
from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.protocol import state_auth
from spicewire.protocol.channel import ChannelConnection
from spicewire.protocol.enums import INPUT_MOTION_ACK_BUNCH, MsgcInputs
from spicewire.protocol.migrate_data import GATHER_SMALL, HeldInput, parse_inputs_migrate_data
from spicewire.server import net
from spicewire.server.display import MAX_MOTION_COUNT, DisplayState, inputs_migrate_data
from spicewire.server.migration import source
from spicewire.server.migration.destination import (
    PREFAULT_MIN,
    PREFAULT_SMALL_MIN,
    Announcement,
    SessionDestination,
    prefault_room,
)
from spicewire.server.migration.source import gathered_segments
from spicewire.tlssocket import send_buffers

from .test_migration import connect, drain_sink, fill_paused_sink, only_entry
from .test_send_buffers import RecordingSocket
from .test_server_display import _inputs, _Sent

BATCH = 4 * GATHER_SMALL  # GATHER_BATCH for these tests: every chunk of GATHER_SMALL goes as a view


pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


# --- s1: GATHER_BATCH bytes of views per sendmsg ---------------------------------------------------


def port_state(pending: list[bytes]) -> mig.PortMigrateData:
    return mig.PortMigrateData(serial=3, client_serial=2, pending=pending)


def framing() -> int:
    """Bytes before the first queued chunk's own, after the header: the container's index and the
    port's record, joined into one piece as they are small."""
    writer = mig.PortMigrateDataWriter(port_state([bytes(GATHER_SMALL)]))
    return writer.size - len(writer.header) - GATHER_SMALL


def sent_as_the_server_does(pieces) -> tuple[RecordingSocket, bytes]:
    """What the server's writer does with send_stream's pieces: a list is one send_buffers
    (recorded, one sendmsg each here), bytes one sendall."""
    sock = RecordingSocket()
    stream = bytearray()
    for piece in pieces:
        if isinstance(piece, list):
            calls = len(sock.calls)
            assert send_buffers(sock, piece) == len(sock.received) - len(stream)  # type: ignore[arg-type]
            assert len(sock.calls) == calls + 1
            stream = bytearray(sock.received)
        else:
            sock.received += piece
            stream += piece
    return sock, bytes(stream)


@pytest.mark.parametrize(("delta", "sendmsgs"), [(-1, 1), (0, 2), (1, 2)])
def test_a_batch_goes_to_the_socket_once_it_holds_gather_batch_bytes(monkeypatch, delta, sendmsgs):
    """The framing and a first chunk make GATHER_BATCH + delta bytes, a last chunk follows: short
    of a batch, both go in one sendmsg; from a whole batch on, the last chunk goes in a second."""
    monkeypatch.setattr(source, "GATHER_BATCH", BATCH)
    pending = [os.urandom(BATCH + delta - framing()), os.urandom(GATHER_SMALL)]
    whole = mig.build_port_migrate_data(port_state(pending)).tobytes()
    sock, stream = sent_as_the_server_does(gathered_segments(mig.PortMigrateDataWriter(port_state(pending))))
    assert stream == whole
    assert len(sock.calls) == sendmsgs
    first = sum(map(len, sock.calls[0]))
    assert first == (BATCH + delta if sendmsgs == 2 else len(whole) - 8)


@pytest.mark.parametrize(("delta", "sendmsgs"), [(-1, 1), (0, 1), (1, 2)])
def test_a_chunk_longer_than_gather_batch_is_cut_into_views_of_a_batch(monkeypatch, delta, sendmsgs):
    """One queued chunk of GATHER_BATCH + delta bytes: whole in one sendmsg up to a batch, its
    last byte in a second one above; no sendmsg is empty."""
    monkeypatch.setattr(source, "GATHER_BATCH", BATCH)
    pending = [os.urandom(BATCH + delta)]
    whole = mig.build_port_migrate_data(port_state(pending)).tobytes()
    sock, stream = sent_as_the_server_does(gathered_segments(mig.PortMigrateDataWriter(port_state(pending))))
    assert stream == whole
    assert len(sock.calls) == sendmsgs
    assert all(len(view) <= BATCH for call in sock.calls for view in call)
    assert all(sum(map(len, call)) for call in sock.calls)


@pytest.mark.parametrize("version", state_auth.VERSIONS)
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_the_gathered_batches_and_their_mac_open_on_s2(monkeypatch, version, delta):
    """Whichever MAC (fed on the hub, or by a worker thread while the batch is sent), around a
    batch boundary: the stream s2 gets opens to the packed body."""
    monkeypatch.setattr(source, "GATHER_BATCH", BATCH)
    pending = [os.urandom(BATCH + delta - framing()), os.urandom(BATCH + delta), os.urandom(GATHER_SMALL)]
    whole = mig.build_port_migrate_data(port_state(pending)).tobytes()
    s1_key, s2_key = state_auth.MigrationKey(bytes(32), version), state_auth.MigrationKey(bytes(32), version)

    def send() -> bytes:
        writer = mig.PortMigrateDataWriter(port_state(pending))
        return sent_as_the_server_does(gathered_segments(writer, s1_key.mac(5, (10, 0))))[1]

    assert bytes(state_auth.unseal(s2_key, 5, (10, 0), gevent.spawn(send).get())) == whole


# --- the inputs' motion count in ICMD: a u16 -------------------------------------------------------


U16_MAX = 0xFFFF  # SpiceMigrateDataInputs.motion_count is a uint16_t


@pytest.mark.parametrize("count", [U16_MAX - 1, U16_MAX, U16_MAX + 1])
def test_the_motion_count_travels_clamped_to_a_u16_and_s2_acknowledges_what_came(count):
    """A frozen inputs channel's count only grows; past what ICMD's u16 holds it goes as the
    largest count there is (not a refused MIGRATE_DATA), and s2 answers each bunch of it."""
    assert MAX_MOTION_COUNT == U16_MAX
    s1 = DisplayState(screens.factory("paint", 64, 64)())
    s1.motion_count = count
    s1.held = [HeldInput(MsgcInputs.MOUSE_MOTION, m.MsgcInputsMouseMotion(dx=1, dy=2, buttons=0).encode())]
    carried = parse_inputs_migrate_data(inputs_migrate_data(s1))
    assert carried.record.motion_count == min(count, U16_MAX)
    assert carried.held == s1.held
    s2, on_s2 = DisplayState(screens.factory("paint", 64, 64)()), _Sent()
    s2.motion_count = carried.record.motion_count  # what SessionDestination._restore_graphics does
    _inputs(s2, on_s2, announce=False)
    assert on_s2.acks() == min(count, U16_MAX) // INPUT_MOTION_ACK_BUNCH
    assert s2.motion_count == min(count, U16_MAX) % INPUT_MOTION_ACK_BUNCH


# --- s2: a landing MIGRATE_DATA is read LANDING_READ at most at a time -----------------------------


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_a_landing_body_is_offered_landing_read_bytes_a_read(nodes, monkeypatch, delta):
    """Once the MIGRATE_DATA's head arrived, LANDING_READ is set to what is left of its body
    + delta: every read into the body is offered the lesser of the two (first one byte short of
    the rest, then the rest; or all the rest at once, as much as the socket holds of it), and the
    body lands intact."""
    backlog = 1 << 20
    armed: dict = {}
    offers: list[tuple[int, int, int]] = []  # (limit, bytes left of the body, bytes offered)
    real_landing = SessionDestination.landing_buffer
    real_next = net.next_read_size
    real_offer = ChannelConnection.receive_buffer

    def landing_buffer(self, handler, ann, size):
        armed.update(channel=handler.channel, size=size, reader=gevent.getcurrent())
        return real_landing(self, handler, ann, size)

    def next_read_size(n, count):
        # The landing connection's first turn after the head: what is left of the body is known.
        if armed.get("reader") is gevent.getcurrent() and "left" not in armed:
            armed["left"] = armed["size"] - armed["channel"].bulk_progress()
            monkeypatch.setattr(net, "LANDING_READ", armed["left"] + delta)
        return real_next(n, count)

    def receive_buffer(self, limit=8 << 20):
        view = real_offer(self, limit)
        if view is not None and self is armed.get("channel"):
            offers.append((limit, armed["size"] - self.bulk_progress(), len(view)))
        return view

    monkeypatch.setattr(SessionDestination, "landing_buffer", landing_buffer)
    monkeypatch.setattr(net, "next_read_size", next_read_size)
    monkeypatch.setattr(ChannelConnection, "receive_buffer", receive_buffer)
    s1, s2 = nodes(2)
    session = connect(s1)
    digest = fill_paused_sink(s1, session, backlog)
    assert only_entry(s1.migrate_to(s2))["migrated"]
    left, limit = armed["left"], armed["left"] + delta
    assert left > net.RECV_BUFFER  # the head's read brought only the start of the body
    assert offers[0] == (limit, left, min(limit, left))
    assert all(offered == min(limit, rest) for _, rest, offered in offers)
    assert {asked for asked, _, _ in offers} == {limit}
    if delta < 0:
        assert len(offers) >= 2  # the body's last byte comes in a read of its own, at the earliest
    drain_sink(s2, session.session_id, backlog, digest)
    session.close()


# --- s2: a small backlog's prefaulted buffer, and the MIGRATE_DATA that arrives --------------------


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_a_migrate_data_that_outgrows_its_prefaulted_buffer_lands_intact_in_fresh_memory(nodes, monkeypatch, delta):
    """A small backlog's buffer is faulted in for what the announcement said; what arrives may be
    more (the client wrote on until FLUSH_MARK). The prefaulted buffer is cut to the body's size
    + delta: one byte short, the body lands in memory of its own; from its size on, in the
    prefaulted pages. Byte-exact either way."""
    backlog = 1 << 20
    assert PREFAULT_SMALL_MIN <= backlog < PREFAULT_MIN
    landed: list[tuple[bool, int]] = []  # (in the prefaulted pages, body size)
    real_take = Announcement.take_buffer

    def take_buffer(self, channel_id: int, size: int) -> np.ndarray:
        job = self.buffers[channel_id]
        prefaulted = job.get()  # the announcement's small-backlog prefault, waited for
        assert len(prefaulted) == prefault_room(backlog) > size + 1
        cut: gevent.event.AsyncResult[np.ndarray] = gevent.event.AsyncResult()
        cut.set(prefaulted[: size + delta])
        self.buffers[channel_id] = cut
        buffer = real_take(self, channel_id, size)
        landed.append((buffer.ctypes.data == prefaulted.ctypes.data, size))
        return buffer

    monkeypatch.setattr(Announcement, "take_buffer", take_buffer)
    s1, s2 = nodes(2)
    session = connect(s1)
    digest = fill_paused_sink(s1, session, backlog)
    assert only_entry(s1.migrate_to(s2))["migrated"]
    ((in_prefaulted, size),) = landed
    assert size > backlog
    assert in_prefaulted == (delta >= 0)
    drain_sink(s2, session.session_id, backlog, digest)
    session.close()
