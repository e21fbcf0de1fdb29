"""A big port MIGRATE_DATA leaves s1 as batches of views of the queued bytes (one sendmsg each),
never packed into a second copy: the same body byte for byte as the packed segments, each chunk
of GATHER_SMALL bytes or more passed as a view of its own memory, smaller ones joined, every view
at most a batch long."""

from __future__ import annotations

import os

import gevent
import pytest

from spicewire.protocol import migration as mig
from spicewire.protocol import state_auth
from spicewire.protocol.migrate_data import GATHER_SMALL
from spicewire.server.migration.source import GATHER_BATCH, gathered_segments

BATCH = 64 << 10  # small batches keep the bodies of these tests small


def state(pending, to_client=(), device_state=b""):
    return mig.PortMigrateData(serial=3, client_serial=2, pending=list(pending), to_client=list(to_client),
                               device_state=device_state)


def gathered_body(writer: mig.PortMigrateDataWriter, batch: int = BATCH) -> bytes:
    return writer.header + b"".join(bytes(piece) for views in writer.gathered(batch) for piece in views)


@pytest.mark.parametrize("size", [GATHER_SMALL - 1, GATHER_SMALL, GATHER_SMALL + 1])
@pytest.mark.parametrize("segment", [mig.SWPD_SEGMENT, 3 * GATHER_SMALL])  # one container, or many
def test_the_gathered_body_is_the_packed_body(size, segment):
    pending = [os.urandom(n) for n in (size, 5, size, BATCH - 1, BATCH, BATCH + 1, 0, size)]
    to_client = [os.urandom(n) for n in (size, 3 * BATCH + 7)]
    whole = mig.build_port_migrate_data(state(pending, to_client, b"dev"), segment).tobytes()
    writer = mig.PortMigrateDataWriter(state(pending, to_client, b"dev"), segment)
    assert gathered_body(writer) == whole
    assert len(whole) == writer.size


@pytest.mark.parametrize("size, viewed", [(GATHER_SMALL - 1, False), (GATHER_SMALL, True), (GATHER_SMALL + 1, True)])
def test_a_chunk_from_gather_small_on_goes_as_a_view_of_its_memory(size, viewed):
    """One below GATHER_SMALL is copied in with its neighbours (a view each would cost more
    in calls); at and above it, the socket reads the queue's own memory."""
    chunk = os.urandom(size)
    writer = mig.PortMigrateDataWriter(state([b"x" * 7, chunk, b"y" * 9]))
    views = [piece for batch in writer.gathered(BATCH) for piece in batch]
    assert any(isinstance(piece, memoryview) and piece.obj is chunk for piece in views) is viewed


@pytest.mark.parametrize("size", [BATCH - 1, BATCH, BATCH + 1, 3 * BATCH])
def test_no_view_is_longer_than_a_batch_and_only_the_last_batch_is_short(size):
    writer = mig.PortMigrateDataWriter(state([os.urandom(size), os.urandom(GATHER_SMALL), os.urandom(size)]))
    batches = list(writer.gathered(BATCH))
    assert all(len(piece) <= BATCH for batch in batches for piece in batch)
    totals = [sum(len(piece) for piece in batch) for batch in batches]
    assert all(total >= BATCH for total in totals[:-1])
    assert sum(totals) + len(writer.header) == writer.size


@pytest.mark.parametrize("version", state_auth.VERSIONS)
def test_the_streamed_body_opens_on_s2_and_each_batch_is_at_most_gather_batch_of_views(version):
    """gathered_segments: the header, the batches, then the trailer; the bytes s2 gets open to
    the body the packed segments make."""
    pending = [os.urandom(n) for n in (GATHER_BATCH + 1, 64 << 10, 100, 2 * GATHER_BATCH)]
    whole = mig.build_port_migrate_data(state(pending)).tobytes()
    secret = bytes(range(32))
    s1_key, s2_key = state_auth.MigrationKey(secret, version), state_auth.MigrationKey(secret, version)

    def stream() -> list:
        return list(gathered_segments(mig.PortMigrateDataWriter(state(pending)), s1_key.mac(5, (10, 0))))

    pieces = gevent.spawn(stream).get()
    assert pieces[0] == whole[:8]
    assert all(isinstance(batch, list) for batch in pieces[1:-1])
    assert all(len(view) <= GATHER_BATCH for batch in pieces[1:-1] for view in batch)
    sent = b"".join(b"".join(map(bytes, p)) if isinstance(p, list) else bytes(p) for p in pieces)
    assert bytes(state_auth.unseal(s2_key, 5, (10, 0), sent)) == whole
