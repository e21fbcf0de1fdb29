"""Many small backlogs (issue 13's 500 sessions x 1 MiB): s2 faults in the buffer of every port's
MIGRATE_DATA large enough to land in one of its own, the small ones a worker-thread job per
PREFAULT_BATCH bytes; the bytes prefaulted are counted as announcements come and go; and neither
side leaves the cyclic collector frozen once its migrations are over."""

from __future__ import annotations

import gc
import mmap

import gevent
import numpy as np
import pytest

from spicewire.server.migration import destination, orchestrator
from spicewire.server.migration.destination import (
    PREFAULT_MIN,
    PREFAULT_SMALL_MIN,
    Announcement,
    prefault_room,
)

from .serverkit import wait_until
from .test_migration import SINK, SINK_ID, connect, drain_sink, fill_paused_sink, only_entry
from .test_migration_control import MIGRATION, announce


@pytest.fixture(autouse=True)
def deadline(request):
    with gevent.Timeout(30, AssertionError(f"{request.node.name} took longer than 30 s")):
        yield


@pytest.mark.parametrize("size", [PREFAULT_SMALL_MIN - 1, PREFAULT_SMALL_MIN, PREFAULT_SMALL_MIN + 1,
                                  PREFAULT_MIN - 1, PREFAULT_MIN, PREFAULT_MIN + 1])
def test_the_room_prefaulted_for_a_backlog_on_both_sides_of_each_threshold(size):
    room = prefault_room(size)
    if size < PREFAULT_SMALL_MIN:
        assert room == 0  # copied out of the read buffer: a buffer of its own would go unused
    elif size < PREFAULT_MIN:
        # The framing of chunks of 512 bytes and more, not the 4 MiB a big backlog gets.
        assert size + size // 32 <= room < size + size // 16 + (1 << 20)
    else:
        assert room >= size + (4 << 20)


def prefaulted_now(ann: Announcement, cid: int) -> np.ndarray | None:
    job = ann.buffers.get(cid)
    if job is None:
        return None
    job.wait()
    return job.get()


@pytest.mark.parametrize("size", [PREFAULT_SMALL_MIN - 1, PREFAULT_SMALL_MIN, 1 << 20])
def test_an_announced_small_backlog_gets_its_buffer_faulted_in_and_gives_it_back(nodes, size):
    (s2,) = nodes(1)
    manager, budget = s2.spice.migration, s2.spice.budget
    used = budget.used
    announce(s2, 0x5A11, in_flight=size, ttl=0.3)
    ann = manager.announcements[0x5A11]
    buffer = prefaulted_now(ann, SINK_ID)
    room = prefault_room(size)
    if size < PREFAULT_SMALL_MIN:
        assert buffer is None and manager.prefaulted == 0 and budget.used == used
    else:
        assert buffer is not None and len(buffer) == room
        assert ann.prefaulted == manager.prefaulted == room and budget.used == used + room
    wait_until(lambda: 0x5A11 not in manager.announcements, what="the announcement to expire")
    assert manager.prefaulted == 0 and budget.used == used and ann.buffers == {}


@pytest.mark.parametrize(("ports", "jobs"), [(5, 2), (6, 2), (7, 3)])
def test_small_backlogs_are_faulted_in_a_job_per_batch(nodes, monkeypatch, ports, jobs):
    """One announcement, a batch of three rooms: one port short of two batches, two exactly, one more."""
    (s2,) = nodes(1)
    size = 1 << 20
    monkeypatch.setattr(orchestrator, "PREFAULT_BATCH", 3 * prefault_room(size))
    calls: list[list[int]] = []
    real = orchestrator._prefaulted_each

    def counted(sizes: list[int]) -> list[np.ndarray]:
        calls.append(sizes)
        return real(sizes)

    monkeypatch.setattr(orchestrator, "_prefaulted_each", counted)
    s2.api.post_json("/migration/announce", {"migration": MIGRATION, "ttl": 30, "sessions": [
        {"session_id": f"{0x5B00 + n:08x}", "ports": [[SINK_ID, SINK, "sink", size]]} for n in range(ports)]})
    buffers = [prefaulted_now(s2.spice.migration.announcements[0x5B00 + n], SINK_ID) for n in range(ports)]
    assert len(calls) == jobs and sum(map(len, calls)) == ports
    assert all(buffer is not None and len(buffer) == prefault_room(size) for buffer in buffers)
    assert len({buffer.ctypes.data for buffer in buffers}) == ports  # one buffer each, none shared


def test_a_failed_batch_leaves_its_ports_to_fresh_memory(nodes, monkeypatch):
    (s2,) = nodes(1)

    def refused(sizes: list[int]) -> list[np.ndarray]:
        raise OSError("no memory for a prefault")

    monkeypatch.setattr(orchestrator, "_prefaulted_each", refused)
    announce(s2, 0x5C00, in_flight=1 << 20)
    ann = s2.spice.migration.announcements[0x5C00]
    ann.buffers[SINK_ID].wait()
    got = ann.take_buffer(SINK_ID, 1000)
    assert len(got) == 1000  # np.empty, as without a prefault


def in_mapped_memory(buffer: np.ndarray) -> bool:
    base = buffer
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def test_a_1_mib_backlog_lands_in_its_prefaulted_buffer_and_is_restored_whole(nodes, monkeypatch):
    s1, s2 = nodes(2)
    landed: list[bool] = []
    real_take = destination.Announcement.take_buffer

    def take_buffer(self, channel_id: int, size: int) -> np.ndarray:
        buffer = real_take(self, channel_id, size)
        landed.append(in_mapped_memory(buffer))
        return buffer

    monkeypatch.setattr(destination.Announcement, "take_buffer", take_buffer)
    session = connect(s1)
    digest = fill_paused_sink(s1, session, 1 << 20)
    assert only_entry(s1.migrate_to(s2))["migrated"]
    assert landed == [True]
    drain_sink(s2, session.session_id, 1 << 20, digest)
    session.close()


def test_neither_side_leaves_the_collector_frozen_or_paused(nodes):
    s1, s2 = nodes(2)
    session = connect(s1)
    assert gc.get_freeze_count() == 0
    announce(s2, 0x5D00, in_flight=1 << 20, ttl=30)
    assert gc.get_freeze_count() > 0  # s2 expects a migration
    s2.spice.migration.end_announcement(0x5D00)
    assert gc.get_freeze_count() == 0
    assert only_entry(s1.migrate_to(s2))["migrated"]
    wait_until(lambda: not s2.spice.migration.announcements, what="s2's announcement to end")
    assert gc.get_freeze_count() == 0 and gc.isenabled()  # s1 paused it for the switch only
    session.close()
