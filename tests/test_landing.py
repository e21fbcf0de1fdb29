"""Where s2 lands a port's large MIGRATE_DATA: in the announcement's prefaulted buffer, waited
for when the prefault is still under way (a fresh buffer beside it would fault every page again,
in the downtime, and double the memory), and through reads of up to net.LANDING_READ bytes, where
any other body gets at most net.RECV_BUFFER a read."""

from __future__ import annotations

from types import SimpleNamespace

import gevent
import gevent.event
import numpy as np
import pytest

from spicewire.protocol import state_auth
from spicewire.protocol.channel import ChannelConnection
from spicewire.protocol.enums import ChannelType
from spicewire.server import net
from spicewire.server.migration.destination import Announcement, SessionDestination

from .serverkit import MainSession, PortChannel, wait_until
from .test_migration import SINK_ID, connect, drain_sink, fill_paused_sink, only_entry
from .test_precopy import MIB, making_pnodes

pnodes = pytest.fixture(making_pnodes, name="pnodes")

SIZE = 1 << 16


pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


def announcement_with(job: gevent.event.AsyncResult) -> Announcement:
    ann = Announcement(0x1A4D0000, [], expires=0.0, migration_id="m")
    ann.buffers[3] = job
    return ann


def test_a_prefault_under_way_is_waited_for_and_its_memory_used():
    job: gevent.event.AsyncResult[np.ndarray] = gevent.event.AsyncResult()
    ann = announcement_with(job)
    memory = np.zeros(SIZE, dtype=np.uint8)
    gevent.spawn(job.set, memory)  # runs only once take_buffer waits
    assert not job.ready()
    got = ann.take_buffer(3, SIZE - 10)
    assert len(got) == SIZE - 10 and got.ctypes.data == memory.ctypes.data
    assert 3 not in ann.buffers  # one body only


@pytest.mark.parametrize("prefaulted", [SIZE - 1, SIZE, SIZE + 1])
def test_a_prefault_is_used_when_the_body_fits_it(prefaulted):
    job: gevent.event.AsyncResult[np.ndarray] = gevent.event.AsyncResult()
    memory = np.zeros(prefaulted, dtype=np.uint8)
    job.set(memory)
    got = announcement_with(job).take_buffer(3, SIZE)
    assert len(got) == SIZE
    assert (got.ctypes.data == memory.ctypes.data) == (prefaulted >= SIZE)


def test_a_failed_prefault_gives_a_buffer_of_its_own():
    job: gevent.event.AsyncResult[np.ndarray] = gevent.event.AsyncResult()
    gevent.spawn(job.set_exception, MemoryError("no room to prefault"))
    got = announcement_with(job).take_buffer(3, SIZE)
    assert len(got) == SIZE and got.flags.writeable


@pytest.mark.parametrize("ended", [False, True])
def test_a_migration_that_ended_during_the_wait_gets_no_landing_hash(ended):
    """The body still gets its buffer; only a migration still under way hashes it as it lands
    (one released meanwhile would leave a LandingMac nothing cancels)."""
    job: gevent.event.AsyncResult[np.ndarray] = gevent.event.AsyncResult()
    ann = announcement_with(job)
    ann.state_key = state_auth.MigrationKey(bytes(state_auth.KEY_SIZE), state_auth.VERSION)
    session = SimpleNamespace(id=ann.session_id, migration=None)
    arriving = SessionDestination(SimpleNamespace(), session)  # type: ignore[arg-type]
    session.migration = arriving
    handler = SimpleNamespace(port=SimpleNamespace(channel_id=3), channel=SimpleNamespace(bulk_progress=lambda: 0),
                              channel_type=ChannelType.PORT, on_bulk=None)

    def prefault_done() -> None:
        if ended:
            session.migration = None
        job.set(np.zeros(SIZE, dtype=np.uint8))

    gevent.spawn(prefault_done)
    buffer = arriving.landing_buffer(handler, ann, SIZE)  # type: ignore[arg-type]
    assert len(buffer) == SIZE
    assert (handler.on_bulk is None) == ended and bool(arriving.landing) != ended


@pytest.fixture
def bulk_reads(monkeypatch):
    """(limit asked, bytes offered) of every read into a large body, on every node."""
    made: list[tuple[int, int]] = []
    real = ChannelConnection.receive_buffer

    def recorded(self, limit: int = 8 << 20):
        view = real(self, limit)
        if view is not None:
            made.append((limit, len(view)))
        return view

    monkeypatch.setattr(ChannelConnection, "receive_buffer", recorded)
    return made


def test_migrate_data_lands_in_large_reads_and_other_bodies_do_not(pnodes, bulk_reads):
    """A port's 2 MiB DATA bodies are read RECV_BUFFER at most at a time; the sink's MIGRATE_DATA
    (over twice LANDING_READ) is offered LANDING_READ at once, never more, and arrives intact."""
    size = 2 * net.LANDING_READ + MIB
    s1, s2 = pnodes(False, False)
    other = MainSession(s1.address)
    sink = PortChannel.link(s1.address, other.session_id, ChannelType.PORT, SINK_ID)
    sink.send_data(bytes(4 * MIB), chunk=2 * MIB)
    wait_until(lambda: sum(n for _, n in bulk_reads) >= 4 * MIB - 2 * net.RECV_BUFFER, what="the DATA bodies")
    assert {limit for limit, _ in bulk_reads} == {net.RECV_BUFFER}
    assert max(n for _, n in bulk_reads) == net.RECV_BUFFER
    sink.close()
    other.close()
    session = connect(s1)
    digest = fill_paused_sink(s1, session, size)
    bulk_reads.clear()
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    landing = [n for limit, n in bulk_reads if limit == net.LANDING_READ]
    assert max(landing) == net.LANDING_READ  # the body's first read after its head
    assert max(n for _, n in bulk_reads) <= net.LANDING_READ
    drain_sink(s2, session.session_id, size, digest)
    session.close()
