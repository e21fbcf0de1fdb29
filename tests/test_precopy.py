"""Pre-copy of queued port bytes (issue 13): a big port's backlog reaches s2 over the
server-to-server path during pre-migration, and MIGRATE_DATA carries only the tail and a reference.

Every test checks the guarantee by SHA-256 of what the sink finally takes: nothing lost, nothing
repeated, in order; and that the pre-copy did (or, in the fallbacks, did not) carry the bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest

from spicewire import devices
from spicewire.control.client import ControlClient
from spicewire.errors import CodecError
from spicewire.protocol import migration as mig
from spicewire.server.migration import orchestrator, precopy
from spicewire.server.migration import source as source_module
from spicewire.server.session import Limits

from .serverkit import wait_until
from .test_migration import (
    PORTS,
    SINK,
    Node,
    Proc,
    connect,
    drain_sink,
    echo_ok,
    fill_paused_sink,
    only_entry,
)

MIB = 1 << 20


pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


class PNode(Node):
    """An in-process server whose pre-copy can be turned off (ServerConfig.precopy)."""

    def __init__(self, *, precopy_on: bool = True, limits: Limits | None = None) -> None:
        super().__init__(limits or Limits(to_device=64 * MIB), PORTS, precopy=precopy_on)


def making_pnodes():
    """make(*flags) -> one PNode per flag (pre-copy on or off), each stopped at the end."""
    made: list[PNode] = []

    def make(*flags: bool, **kw) -> list[PNode]:
        made.extend(PNode(precopy_on=flag, **kw) for flag in flags)
        return made[-len(flags):]

    yield make
    for node in made:
        node.stop()


pnodes = pytest.fixture(making_pnodes, name="pnodes")


@pytest.fixture
def s2_proc(tmp_path):
    """s2 as a ``spicewire serve`` of its own, which a test can kill."""
    proc = Proc(tmp_path, "s2", buffer_mib=64)
    yield proc
    proc.stop()


@pytest.fixture
def precopied(monkeypatch):
    """The bytes each pre-copy sent, in order (the orchestrator's calls, recorded)."""
    sent: list[int] = []
    real = orchestrator.precopy_ports

    def record(migration, sources, *prepare):
        sent.append(real(migration, sources, *prepare))
        return sent[-1]

    monkeypatch.setattr(orchestrator, "precopy_ports", record)
    return sent


@pytest.fixture
def port_bodies(monkeypatch):
    """The size of every port MIGRATE_DATA s1 builds, and whether it referenced a pre-copy."""
    built: list[tuple[int, bool]] = []
    real = mig.PortMigrateDataWriter

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, state, *args, **kw) -> None:
            super().__init__(state, *args, **kw)
            built.append((self.size, state.precopy is not None))

    monkeypatch.setattr(source_module.mig, "PortMigrateDataWriter", Recording)
    return built


def test_a_paused_backlog_is_precopied_and_migrate_data_carries_only_a_reference(pnodes, precopied, port_bodies):
    s1, s2 = pnodes(True, True)
    session = connect(s1)
    size = 24 * MIB
    digest = fill_paused_sink(s1, session, size)
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    assert precopied == [size]
    sink_bodies = [b for b in port_bodies if b[1]]
    assert len(sink_bodies) == 1 and sink_bodies[0][0] < 64 << 10  # the reference, not the bytes
    drain_sink(s2, session.session_id, size, digest)
    session.close()


# --- rounds: appends and consumption while the session runs -------------------------------------


@pytest.fixture
def after_round(monkeypatch):
    """``after_round.append(fn)``: fn(round number) runs once that pre-copy round reached s2, before
    s1 looks at the queues again (the session keeps running meanwhile in any case)."""
    actions: list = []
    rounds = [0]
    real = ControlClient.post_stream

    def post_stream(self, path, pieces, size, timeout=None):
        answer = real(self, path, pieces, size, timeout)
        rounds[0] += 1
        if actions:
            actions.pop(0)(rounds[0])
        return answer

    monkeypatch.setattr(ControlClient, "post_stream", post_stream)
    return actions


def paused_backlog(pnodes, first: int):
    """Two servers with pre-copy on, and a session on s1 whose paused sink holds ``first`` random
    bytes: (s1, s2, session, its sink port, the SHA-256 of everything written to it so far)."""
    s1, s2 = pnodes(True, True)
    session = connect(s1)
    digest = hashlib.sha256()
    fill_paused_sink(s1, session, first, digest=digest)
    return s1, s2, session, session.open_port(SINK), digest


def write_sink(node, session, sink, size: int, digest, queued_before: int) -> None:
    """Write ``size`` more random bytes to the (paused or limited) sink and wait until s1 queued them."""
    data = os.urandom(size)
    sink.write(data)
    digest.update(data)
    wait_until(lambda: node.port(session.session_id, SINK)["to_device_bytes"] >= queued_before + size, 20,
               what="the appended bytes queued on s1")


def sink_port(node, session):
    return node.spice.sessions[session.session_id].ports[SINK_ID]


SINK_ID = 1


@pytest.mark.parametrize("room", [None, 5 * MIB], ids=["room", "region-full"])
def test_bytes_appended_during_the_precopy_go_in_later_rounds_and_the_tail(pnodes, precopied, after_round,
                                                                          port_bodies, monkeypatch, room):
    """After round 1 the client writes 3 MiB (round 2 carries them), after round 2 another 8 MiB
    (round 3 carries them), after round 3 less than PRECOPY_SETTLED (MIGRATE_DATA carries them).
    With a region of ``room`` bytes beyond the first queue, round 3 carries what still fits,
    MIGRATE_DATA the rest."""
    if room is not None:
        monkeypatch.setattr(precopy, "_capacity", lambda queued: queued + room)
    first = 24 * MIB
    s1, s2, session, sink, digest = paused_backlog(pnodes, first)
    last = precopy.PRECOPY_SETTLED // 2
    for queued, more in ((first, 3 * MIB), (first + 3 * MIB, 8 * MIB), (first + 11 * MIB, last)):
        after_round.append(lambda n, queued=queued, more=more: write_sink(s1, session, sink, more, digest, queued))
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    total = first + 11 * MIB + last
    held = first + 11 * MIB if room is None else first + room
    assert precopied == [held]
    body, referenced = max(port_bodies)  # the sink's (the echo port's is its record alone)
    assert referenced and total - held <= body < total - held + (1 << 12)
    drain_sink(s2, session.session_id, total, digest.hexdigest())
    session.close()


@pytest.mark.parametrize("later, tail, cap, room, fits", [
    (2 * MIB, 3 * MIB, None, 4 * MIB, True),  # twice the later round holds the tail
    (2 * MIB, 5 * MIB, None, 4 * MIB, False),  # a tail larger than that lands in fresh memory
    (2 * MIB, 3 * MIB, 2 * MIB, 2 * MIB, False),  # TAIL_ROOM caps it
    (0, 512 << 10, None, precopy.TAIL_ROOM_MIN, True),  # no later round: TAIL_ROOM_MIN
], ids=["sized", "outgrown", "capped", "least"])
def test_the_tail_room_is_sized_by_the_later_rounds_and_faulted_in_between_rounds(
        pnodes, after_round, monkeypatch, later, tail, cap, room, fits):
    """The pre-copy takes over the port's announced buffer. The memory for its MIGRATE_DATA tail is
    twice the largest round after the first (TAIL_ROOM_MIN at least, TAIL_ROOM at most), faulted
    in between rounds, never while s2 receives one; the tail lands in it when it fits, in fresh
    memory when not. Every byte arrives, in order."""
    from spicewire.server.migration import destination

    if cap is not None:
        monkeypatch.setattr(precopy, "TAIL_ROOM", cap)
    receiving, faulted, landed = [False], [], []
    real_receive, real_prefaulted, real_take = precopy.receive_port_precopy, destination.prefaulted, \
        destination.Announcement.take_buffer

    def receive_port_precopy(*args):
        receiving[0] = True
        try:
            return real_receive(*args)
        finally:
            receiving[0] = False

    def prefaulted(size):
        faulted.append((size, receiving[0], real_prefaulted(size)))
        return faulted[-1][2]

    def take_buffer(ann, channel_id, size):
        landed.append(real_take(ann, channel_id, size))
        return landed[-1]

    monkeypatch.setattr("spicewire.control.server.receive_port_precopy", receive_port_precopy)
    monkeypatch.setattr(destination, "prefaulted", prefaulted)
    monkeypatch.setattr(destination.Announcement, "take_buffer", take_buffer)
    # the region holds the first queue and the later round: what comes after is the tail
    monkeypatch.setattr(precopy, "_capacity", lambda queued: queued + later)
    first = 24 * MIB
    s1, s2, session, sink, digest = paused_backlog(pnodes, first)
    if later:
        after_round.append(lambda n: write_sink(s1, session, sink, later, digest, first))
    after_round.append(lambda n: write_sink(s1, session, sink, tail, digest, first + later))
    report = s1.migrate_to(s2)
    entry = only_entry(report)
    assert entry["migrated"], entry
    assert report["precopied_bytes"] == first + later and report["prepare_s"] > 0
    assert [(size, during) for size, during, _ in faulted] == [(room, False)]
    into_tail_room = [np.shares_memory(buffer, faulted[0][2]) for buffer in landed if len(buffer) >= tail]
    assert into_tail_room == [fits]
    drain_sink(s2, session.session_id, first + later + tail, digest.hexdigest())
    session.close()


def test_what_is_queued_while_s2_prepares_goes_in_the_last_round_not_the_tail(pnodes, precopied, port_bodies,
                                                                             monkeypatch):
    """s1 waits for s2's landing memory before the last round: the 2 MiB the client writes during
    that wait are pre-copied by it, and MIGRATE_DATA carries only the reference."""
    first, more = 20 * MIB, 2 * MIB
    s1, s2, session, sink, digest = paused_backlog(pnodes, first)
    real = orchestrator.MigrationManager._await_landing_memory
    asked: list[int] = []

    def await_landing_memory(migration, ready):
        real(migration, ready)
        asked.append(migration.precopied)
        if len(asked) == 2:  # the pre-copy's ask, between its rounds
            write_sink(s1, session, sink, more, digest, first)

    monkeypatch.setattr(orchestrator.MigrationManager, "_await_landing_memory", staticmethod(await_landing_memory))
    report = s1.migrate_to(s2)
    entry = only_entry(report)
    assert entry["migrated"], entry
    assert len(asked) == 2 and precopied == [first + more]
    body, referenced = max(port_bodies)
    assert referenced and body < 64 << 10
    drain_sink(s2, session.session_id, first + more, digest.hexdigest())
    session.close()


def limit_sink(node, session, take: int) -> None:
    """Let s1's paused sink take exactly ``take`` more bytes now (the device consuming part of a
    queue during pre-migration), then stop again."""
    port = sink_port(node, session)
    device, left = port.device, [take]
    real = device.write

    def write(data):
        n = min(len(data), left[0])
        if not n:
            return 0
        device.paused = False
        try:
            taken = real(data[:n])
        finally:
            device.paused = True
        left[0] -= taken
        return taken

    device.write = write
    port.pump()  # PUMP_TURN bytes now, the rest on the hub's next turns
    wait_until(lambda: left[0] == 0, what=f"the sink to take {take} bytes")


@pytest.mark.parametrize("consumed", [5 * MIB + 123, 24 * MIB, 30 * MIB])
def test_what_the_device_consumed_during_the_precopy_is_trimmed_on_s2(pnodes, precopied, after_round, consumed):
    """Part of the pre-copied bytes, all of them, and beyond them into bytes queued after round 1
    (round 2 then starts the region afresh past what s2 held)."""
    first = 24 * MIB
    s1, s2, session, sink, digest = paused_backlog(pnodes, first)

    def consume_then_append(n):
        write_sink(s1, session, sink, 8 * MIB, digest, first)
        limit_sink(s1, session, consumed)

    after_round.append(consume_then_append)
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    total = first + 8 * MIB
    assert s2.port(session.session_id, SINK)["to_device_bytes"] == total - consumed
    drain_sink(s2, session.session_id, total, digest.hexdigest())
    session.close()


@pytest.mark.parametrize("queued, precopied_too", [(precopy.PRECOPY_MIN - 1, False), (precopy.PRECOPY_MIN, True),
                                                    (precopy.PRECOPY_MIN + 1, True)])
def test_only_ports_holding_at_least_precopy_min_are_precopied(pnodes, precopied, queued, precopied_too):
    s1, s2 = pnodes(True, True)
    session = connect(s1)
    digest = fill_paused_sink(s1, session, queued, block=queued)
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    assert precopied == ([queued] if precopied_too else [0])
    drain_sink(s2, session.session_id, queued, digest)
    session.close()


@pytest.mark.parametrize("appended, another_round", [(precopy.PRECOPY_SETTLED - 1, False),
                                                      (precopy.PRECOPY_SETTLED, True),
                                                      (precopy.PRECOPY_SETTLED + 1, True)])
def test_a_round_that_would_carry_less_than_precopy_settled_is_left_to_migrate_data(
        pnodes, precopied, after_round, appended, another_round):
    first = 20 * MIB
    s1, s2, session, sink, digest = paused_backlog(pnodes, first)
    after_round.append(lambda n: write_sink(s1, session, sink, appended, digest, first))
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    assert precopied == [first + appended if another_round else first]
    drain_sink(s2, session.session_id, first + appended, digest.hexdigest())
    session.close()


@pytest.mark.parametrize("rounds", [3, 4], ids=["one-round-short", "rounds-enough"])
def test_the_precopy_stops_after_precopy_rounds_and_leaves_the_rest_to_migrate_data(
        pnodes, precopied, after_round, monkeypatch, rounds):
    """The client writes 2 MiB (above PRECOPY_SETTLED) after each of rounds 1 to 3: 4 rounds carry
    them all; with PRECOPY_ROUNDS one short, the last 2 MiB are left to MIGRATE_DATA."""
    monkeypatch.setattr(precopy, "PRECOPY_ROUNDS", rounds)
    first, more = 20 * MIB, 2 * MIB
    s1, s2, session, sink, digest = paused_backlog(pnodes, first)
    for n in range(3):
        after_round.append(lambda _, queued=first + n * more: write_sink(s1, session, sink, more, digest, queued))
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    assert precopied == [first + (rounds - 1) * more]
    drain_sink(s2, session.session_id, first + 3 * more, digest.hexdigest())
    session.close()


def batch_source(framebuffer: int | None):
    """A stand-in SessionSource with a screen of ``framebuffer`` bytes (None: no display)."""
    screen = SimpleNamespace(framebuffer=SimpleNamespace(nbytes=framebuffer))
    display = None if framebuffer is None else SimpleNamespace(screen=screen)
    return SimpleNamespace(session=SimpleNamespace(display=display))


@pytest.mark.parametrize("extra, batches", [(-1, 1), (0, 1), (1, 2)])
def test_precopy_batches_hold_at_most_precopy_batch_bytes_of_pictures(extra, batches):
    """Each screen counts twice its framebuffer; two screens of PRECOPY_BATCH in all share a request."""
    quarter = orchestrator.PRECOPY_BATCH // 4
    sources = [batch_source(quarter), batch_source(None), batch_source(quarter + extra)]
    grouped = orchestrator.precopy_batches(sources)  # type: ignore[arg-type]
    assert len(grouped) == batches and [s for batch in grouped for s in batch] == sources


def test_a_screen_above_precopy_batch_goes_alone():
    sources = [batch_source(orchestrator.PRECOPY_BATCH), batch_source(1)]
    assert orchestrator.precopy_batches(sources) == [sources[:1], sources[1:]]  # type: ignore[arg-type]


# --- fallbacks -------------------------------------------------------------------------------------


def test_s2_killed_during_the_precopy_leaves_the_session_on_s1_with_nothing_lost(pnodes, s2_proc, after_round):
    (s1,) = pnodes(True)
    s2 = s2_proc
    session = connect(s1)
    size = 24 * MIB
    digest = fill_paused_sink(s1, session, size)
    after_round.append(lambda n: s2.kill())
    entry = only_entry(s1.migrate_to(s2))
    assert not entry["migrated"] and entry["error"], entry
    assert session.session_id in s1.sessions()
    drain_sink(s1, session.session_id, size, digest)
    echo_ok(session)
    session.close()


def test_a_precopy_s2_refuses_sends_the_whole_state_through_the_client(pnodes, precopied, port_bodies, monkeypatch):
    s1, s2 = pnodes(True, True)
    session = connect(s1)
    size = 24 * MIB
    digest = fill_paused_sink(s1, session, size)

    def broken(*args):
        raise ValueError("no room for it")

    monkeypatch.setattr("spicewire.control.server.receive_port_precopy", broken)
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    assert precopied == [0]
    assert [referenced for _, referenced in port_bodies] == [False] * len(port_bodies)
    assert max(body for body, _ in port_bodies) >= size
    drain_sink(s2, session.session_id, size, digest)
    session.close()


@pytest.mark.parametrize("short", [0, 1], ids=["fits", "a-byte-short"])
def test_the_precopys_memory_on_s2_is_held_in_its_budget_and_a_round_it_cannot_hold_is_refused(
        pnodes, precopied, after_round, port_bodies, short, caplog):
    """Round 1 outgrows the announcement's buffer: s2 adds a SEGMENT, held in its memory budget
    until the session landed. With a budget a byte short of it, s2 refuses the round (507), and
    the whole state goes through the client. Every byte arrives either way, and s2's budget holds
    nothing of the migration afterwards."""
    from spicewire.server.migration.destination import prefault_room

    first, more = 24 * MIB, 8 * MIB
    s1, s2, session, sink, digest = paused_backlog(pnodes, first)
    budget = s2.spice.budget
    # Room for the announcement's buffer and a SEGMENT beside it, or a byte less. (What lands
    # after may take the total past the limit: bytes accepted are never refused.)
    budget.limit = prefault_room(first) + precopy.SEGMENT - short
    after_round.append(lambda n: write_sink(s1, session, sink, more, digest, first))
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    if short:
        assert precopied == [first]  # round 0 went; round 1 was refused, and the rest with it
        assert "507" in caplog.text and "no room in this server's memory budget" in caplog.text
        assert [referenced for _, referenced in port_bodies] == [False] * len(port_bodies)
        assert budget.peak < prefault_room(first) + precopy.SEGMENT
    else:
        assert precopied == [first + more]
        assert budget.peak >= prefault_room(first) + precopy.SEGMENT
    assert s2.spice.migration.prefaulted == 0  # the announcement ended: what it held went back
    drain_sink(s2, session.session_id, first + more, digest.hexdigest())
    wait_until(lambda: budget.used == 0, what="s2's budget to hold nothing once the sink drained")
    session.close()


def test_a_tail_room_the_budget_cannot_hold_is_not_faulted_in():
    """The tail rooms s2 faults in before the last round count in its budget; one that does not fit
    is left out (its tail lands in memory taken as it arrives), the next one is still tried."""
    from spicewire.server.budget import MemoryBudget

    ann, manager = announced_echo(Limits(to_device=64 * MIB), 8 * MIB, MemoryBudget(3 * MIB))
    # port 1's later rounds ask 4 MiB of room; ports 0 and 2 had none, and get TAIL_ROOM_MIN
    ann.precopied[(1, "to_device")] = precopy.HeldRegion(64 * MIB, "xxh3-128", later_round=2 * MIB)
    ann.tail_rooms = {0: 8 * MIB, 1: 8 * MIB, 2: 8 * MIB}
    ann.fault_in_tail_rooms(manager.hold_for)
    assert sorted(ann.buffers) == [0, 2] and not ann.tail_rooms
    assert manager.server.budget.used == ann.prefaulted == 2 * precopy.TAIL_ROOM_MIN
    assert manager.server.budget.refused == 1
    for job in ann.buffers.values():
        assert len(job.get(timeout=10)) == precopy.TAIL_ROOM_MIN


@pytest.mark.parametrize("older", ["no-precopy", "no-features"])
def test_an_s2_without_precopy_gets_the_whole_state_through_the_client(pnodes, precopied, port_bodies, monkeypatch,
                                                                        older):
    """``--no-precopy`` on s2, and an older spicewire s2 whose announcement answer names nothing
    beyond the baseline (then MIGRATE_DATA carries no HMAC either, as that s2 expects)."""
    s1, s2 = pnodes(True, older != "no-precopy")
    if older == "no-features":  # it neither knows the key nor says it takes anything
        manager = s2.spice.migration
        real_announce = manager.announce
        monkeypatch.setattr(manager, "announce", lambda migration, sessions, ttl, **offers:
                            real_announce(migration, sessions, ttl))
        monkeypatch.setattr(manager, "features", lambda state_key, **offers: {})
    session = connect(s1)
    size = 24 * MIB
    digest = fill_paused_sink(s1, session, size)
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    assert precopied == []
    assert not any(referenced for _, referenced in port_bodies) and max(b for b, _ in port_bodies) >= size
    drain_sink(s2, session.session_id, size, digest)
    session.close()


class Corrupting:
    """A pre-copy body whose data byte at ``skip`` (counted after the index) changes on the way."""

    def __init__(self, stream, skip: int) -> None:
        self.stream, self.skip, self.done = stream, skip, False

    def read(self, n: int) -> bytes:  # the index: passed as it is
        return self.stream.read(n)

    def readinto(self, view) -> int:
        n = getattr(self.stream, "rfile", self.stream).readinto(view)
        if not self.done and self.skip < n:
            view[self.skip] ^= 0xFF
            self.done = True
        elif not self.done:
            self.skip -= n
        return n


def older_digests(node, monkeypatch) -> None:
    """``node`` answers announcements as a spicewire from before the digest choice: it names no
    digest (so it speaks SHA-256)."""
    manager = node.spice.migration
    real = manager.features

    def features(state_key, **offers):
        answer = real(state_key, **offers)
        del answer["port_precopy_digests"]
        return answer

    monkeypatch.setattr(manager, "features", features)


@pytest.mark.parametrize("kind", ["xxh3-128", "sha256"])
def test_a_corrupted_precopy_is_a_clear_error_on_s2_nothing_restored_and_s1_takes_the_session_back(
        pnodes, monkeypatch, caplog, kind):
    s1, s2 = pnodes(True, True)
    if kind == "sha256":
        older_digests(s2, monkeypatch)
    session = connect(s1)
    size = 24 * MIB
    digest = fill_paused_sink(s1, session, size)
    real = precopy.receive_port_precopy
    sizes = []

    def corrupted(manager, migration, stream, body_size):
        sizes.append(body_size)
        return real(manager, migration, Corrupting(stream, 4096), body_size)

    monkeypatch.setattr("spicewire.control.server.receive_port_precopy", corrupted)
    with caplog.at_level("WARNING"):
        entry = only_entry(s1.migrate_to(s2))
    assert sizes and not entry["migrated"], entry
    assert entry["error"].startswith("rolled back") and f"digest ({kind}) does not match" in entry["error"], entry
    assert any("pre-copy does not match" in r.getMessage() for r in caplog.records)
    # s2 dropped what it held: no announcement, no session, nothing pre-copied left
    assert not s2.spice.migration.announcements
    wait_until(lambda: session.session_id not in s2.spice.sessions, 10, what="s2 to drop the half session")
    assert session.session_id in s1.sessions() and s1.port(session.session_id, SINK)["to_device_bytes"] == size
    # and a migration without the fault then moves it, pre-copied, back and forth
    monkeypatch.setattr("spicewire.control.server.receive_port_precopy", real)
    assert only_entry(s1.migrate_to(s2))["migrated"]
    assert only_entry(s2.migrate_to(s1))["migrated"]
    drain_sink(s1, session.session_id, size, digest)
    session.close()


def test_rollback_after_the_precopy_drops_s2s_copy_and_keeps_every_byte_on_s1(pnodes, precopied, monkeypatch):
    """s2 fails the session after the sink's MIGRATE_DATA went out (its link closes): s1 rolls
    back; s2's pre-copied bytes go with the announcement."""
    s1, s2 = pnodes(True, True)
    session = connect(s1)
    size = 24 * MIB
    digest = fill_paused_sink(s1, session, size)
    held: list = []
    real_restore = precopy.restore_precopy

    def fail_instead(ann, channel_id, data):
        held.append(sum(region.length for region in ann.precopied.values()))
        raise precopy.PrecopyMismatch("the test fails this restore")

    monkeypatch.setattr("spicewire.server.migration.destination.restore_precopy", fail_instead)
    entry = only_entry(s1.migrate_to(s2))
    assert not entry["migrated"] and entry["error"].startswith("rolled back"), entry
    assert held == [size] and precopied == [size]
    assert not s2.spice.migration.announcements
    wait_until(lambda: session.session_id not in s2.spice.sessions, 10, what="s2 to drop the half session")
    monkeypatch.setattr("spicewire.server.migration.destination.restore_precopy", real_restore)
    drain_sink(s1, session.session_id, size, digest)
    echo_ok(session)
    session.close()


# --- spice-gtk -------------------------------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize("precopy_on, size", [(True, precopy.PRECOPY_MIN), (True, precopy.PRECOPY_MIN - 1),
                                               (False, 20 * MIB)],
                         ids=["precopy-min", "under-precopy-min", "no-precopy"])
def test_spicegtk_follows_migrations_back_and_forth_with_and_without_precopy(pnodes, monkeypatch, precopied,
                                                                            port_bodies, precopy_on, size):
    """spice-gtk writes ``size`` bytes into a sink that starts paused, and the session migrates
    three times: MIGRATE_DATA stays one opaque message per channel to it, whichever way the bytes
    go. At PRECOPY_MIN they are pre-copied; a byte less, or with pre-copy off, they are not."""
    from . import peers
    from .peers.spicegtk import start_driver
    from .peers.spicegtk_driver import make_payload

    peers.require("spicegtk")
    real_init = devices.SinkDevice.__init__

    def paused_sink(self) -> None:
        real_init(self)
        self.paused = True

    monkeypatch.setattr(devices.SinkDevice, "__init__", paused_sink)  # every sink starts paused
    nodes = pnodes(precopy_on, precopy_on)
    precopies = precopy_on and size >= precopy.PRECOPY_MIN
    driver = start_driver(nodes[0].address[1], port_name=SINK, send_bytes=size, hold=120, timeout=150)
    with driver:
        def queued():
            sessions = nodes[0].spice.sessions
            return sessions and next(iter(sessions.values())).ports[SINK_ID].to_device_bytes == size

        wait_until(queued, 30, what="spice-gtk's bytes queued in the paused sink")
        (session_id,) = nodes[0].spice.sessions
        for n in range(3):
            src, dst = nodes[n % 2], nodes[(n + 1) % 2]
            entry = only_entry(src.migrate_to(dst))
            assert entry["migrated"] and entry["mode"] == "seamless" and entry["bytes_dropped"] == 0, entry
            wait_until(lambda src=src: session_id not in src.spice.sessions, 10, what="s1 to let go of the session")
            assert dst.port(session_id, SINK)["to_device_bytes"] == size
        assert precopied == ([size] * 3 if precopies else [0] * 3 if precopy_on else [])
        assert any(referenced for _, referenced in port_bodies) == precopies
        drain_sink(nodes[1], session_id, size, hashlib.sha256(make_payload(size)).hexdigest())
        driver.terminate()
        wait_until(lambda: driver.proc.poll() is not None, 20, what="the driver to end")
    assert driver.proc.returncode in (0, 1), driver.report()


# --- both directions, without sockets ---------------------------------------------------------------


class WindowChannel:
    """The port connection's channel as flush_to_client sees it: ``window`` more DATA messages fit."""

    def __init__(self) -> None:
        self.window, self.sent = 0, bytearray()

    @property
    def window_open(self) -> bool:
        return self.window > 0

    def send_raw(self, msg_type, data) -> None:
        self.window -= 1
        self.sent += data


class FakeConnection:
    receiving = 0

    def __init__(self) -> None:
        self.channel = WindowChannel()
        self.transport = self

    pending_write = 0

    def flush(self) -> None:
        """Nothing to move: send_raw kept the bytes."""


class LoopbackPeer:
    """s1's view of s2 with the HTTP left out: each round goes straight into s2's receiving side.
    ``features``: what s2 answered the announcement with."""

    def __init__(self, manager, migration_id: str, after_round, features: dict | None = None) -> None:
        self.id, self.manager, self.after_round, self.rounds = migration_id, manager, after_round, 0
        self.features = {"port_precopy_digests": list(precopy.DIGESTS)} if features is None else features
        self.client = self

    address = "loopback"

    def left(self) -> float:
        return 30.0

    def post_stream(self, path, batches, size, timeout=None):
        body = b"".join(bytes(memoryview(piece)) for batch in batches for piece in batch)
        answer = precopy.receive_port_precopy(self.manager, self.id, io.BytesIO(body), size)
        self.rounds += 1
        self.after_round(self.rounds)
        return answer


def announced_echo(limits: Limits, in_flight: int, budget=None):
    """s2's side of a migration ``"m" * 16`` that announced session 0x1234 with echo port 0, and a
    manager that holds its memory in ``budget`` (MigrationManager.hold_for; no limit unless given)."""
    from spicewire.server.budget import MemoryBudget
    from spicewire.server.migration.destination import Announcement

    ann = Announcement(0x1234, [(0, "echo", "echo")], float("inf"), "m" * 16, {0: in_flight})
    manager = SimpleNamespace(announcements={0x1234: ann}, _prefaulted=0, server=SimpleNamespace(
        config=SimpleNamespace(limits=limits), budget=budget or MemoryBudget(1 << 50)))
    manager.hold_for = partial(orchestrator.MigrationManager.hold_for, manager)
    return ann, manager


@pytest.mark.parametrize("features, kind", [(None, "xxh3-128"), ({}, "sha256")], ids=["digests", "older-s2"])
def test_both_directions_precopy_trim_and_append_and_restore_in_order(features, kind):
    """An echo port holding 20 MiB for the client and 10 MiB for the device; between rounds the
    client reads part of the first, the device takes part of the second and echoes it on. s2's
    queues, from the pre-copied regions and an SWPD version 2, are s1's queues byte for byte:
    with the digest s2 offers, and with SHA-256 for an s2 that offers none."""
    from spicewire.devices import EchoDevice
    from spicewire.server.session import PortState

    limits = Limits(to_device=64 * MIB, to_client=20 * MIB)
    port = PortState(0, "echo", EchoDevice(), limits)
    port.from_client(os.urandom(30 * MIB))
    wait_until(lambda: not port.pump_pending, what="the echo to take what it has room for")  # PUMP_TURN a turn
    assert (port.to_client_bytes, port.to_device_bytes) == (20 * MIB, 10 * MIB)
    source = SimpleNamespace(session=SimpleNamespace(id=0x1234), ports={0: port}, port_precopies={}, moved=0)
    ann, manager = announced_echo(limits, 30 * MIB)
    conn = FakeConnection()

    def between(n: int) -> None:
        if n == 1:
            port.connection = conn
            conn.channel.window = 40  # the client reads 40 messages' worth of the device's bytes
            port.flush_to_client()
            port.pump()  # room again: the echo takes client bytes and queues them for the client
            port.from_client(os.urandom(3 * MIB))
            wait_until(lambda: not port.pump_pending, what="the echo to take what it has room for")

    precopy.precopy_ports(LoopbackPeer(manager, "m" * 16, between, features), [source])
    assert source.port_precopies and source.moved > 30 * MIB
    assert {held.kind for held in ann.precopied.values()} == {kind}
    base = mig.PortMigrateData(serial=9, pending=list(port.to_device), to_client=list(port.to_client))
    body = mig.build_port_migrate_data(source.port_precopies[0].state(base))
    assert len(body) < 4 * MIB  # the reference and the tail, not the queues
    parsed = mig.parse_port_migrate_data(body)
    pending, to_client = precopy.restore_precopy(ann, 0, parsed)
    assert b"".join(bytes(c) for c in pending) == b"".join(bytes(c) for c in port.to_device)
    assert b"".join(bytes(c) for c in to_client) == b"".join(bytes(c) for c in port.to_client)
    assert parsed.precopy.to_client.skip == len(conn.channel.sent) > 0


def test_swpd_version_2_carries_the_reference_as_chunk_1():
    """The layout by hand: header version 2, then after the 64-byte record the two 56-byte
    directions (start, length, skip, SHA-256)."""
    import struct

    from spicewire import codec
    from spicewire.protocol.migrate_data import PrecopyRef, RegionRef

    ref = PrecopyRef(RegionRef(100, 50, 7, b"\x01" * 32), RegionRef(0, 0, 0, bytes(32)))
    body = mig.build_port_migrate_data(mig.PortMigrateData(pending=[b"tail"], precopy=ref))
    assert bytes(body[:8]) == b"SWPD" + struct.pack("<I", 2)
    chunks = codec.unpack_chunks(memoryview(body)[8:])
    assert bytes(chunks[1]) == struct.pack("<QQQ32s", 100, 50, 7, b"\x01" * 32) + struct.pack("<QQQ32s", 0, 0, 0,
                                                                                               bytes(32))
    assert [bytes(c) for c in chunks[2:]] == [b"tail", b""]
    assert mig.parse_port_migrate_data(body).precopy == ref
    with pytest.raises(CodecError):
        RegionRef(0, 5, 6, bytes(32))  # skips past what it holds


# --- the digest s1 and s2 speak, and the bytes' way through the sockets ----------------------------


@pytest.mark.parametrize("features, kind", [
    ({"port_precopy": 2, "port_precopy_digests": ["xxh3-128", "sha256"]}, "xxh3-128"),
    ({"port_precopy": 2, "port_precopy_digests": ["sha256", "xxh3-128"]}, "xxh3-128"),  # s1's preference
    ({"port_precopy": 2, "port_precopy_digests": ["sha256"]}, "sha256"),
    ({"port_precopy": 2, "port_precopy_digests": ["a-digest-from-later"]}, "sha256"),
    ({"port_precopy": 2, "port_precopy_digests": "xxh3-128"}, "sha256"),  # not a list: not understood
    ({"port_precopy": 2}, "sha256"),  # an s2 from before the choice
])
def test_s1_uses_the_first_digest_it_prefers_that_s2_offers_else_sha256(features, kind):
    assert precopy.choose_digest(features) == kind


def precopy_body(entries: list[dict], data: bytes) -> bytes:
    import json
    import struct

    index = json.dumps(entries).encode()
    return struct.pack("<I", len(index)) + index + data


def echo_entry(length: int, **extra) -> dict:
    return {"session_id": "00001234", "port": 0, "dir": "to_device", "offset": 0, "length": length,
            "capacity": 8 * MIB, **extra}


def test_an_entry_naming_no_digest_is_sha256_and_an_unknown_one_is_refused():
    """An s1 from before the choice names no digest: s2 hashes its bytes with SHA-256. A digest
    s2 never offered is refused before any byte is taken."""
    ann, manager = announced_echo(Limits(to_device=64 * MIB), 8 * MIB)
    data = os.urandom(100_000)
    body = precopy_body([echo_entry(len(data))], data)
    assert precopy.receive_port_precopy(manager, "m" * 16, io.BytesIO(body), len(body))["held"] == 1
    held = ann.precopied[(0, "to_device")]
    assert held.kind == "sha256" and held.digest.digest() == hashlib.sha256(data).digest()
    ann, manager = announced_echo(Limits(to_device=64 * MIB), 8 * MIB)
    body = precopy_body([echo_entry(len(data), digest="md5")], data)
    with pytest.raises(ValueError, match="bad pre-copy entry"):
        precopy.receive_port_precopy(manager, "m" * 16, io.BytesIO(body), len(body))
    assert not ann.precopied


def test_a_round_whose_announcement_ended_meanwhile_is_refused_and_holds_nothing(monkeypatch):
    """The announcement ends (aborted, expired) after the round's entries were checked: the memory
    a segment would need is not reserved for it, as nobody would release it."""
    ann, manager = announced_echo(Limits(to_device=64 * MIB), 8 * MIB)
    real = precopy._target

    def target(*args):
        found = real(*args)
        manager.announcements.clear()  # it ends while the round is read
        return found

    monkeypatch.setattr(precopy, "_target", target)
    data = os.urandom(1000)
    body = precopy_body([echo_entry(len(data))], data)
    with pytest.raises(ValueError, match="migration ended here during its pre-copy"):
        precopy.receive_port_precopy(manager, "m" * 16, io.BytesIO(body), len(body))
    assert manager.server.budget.used == ann.prefaulted == 0


def test_a_region_keeps_the_digest_it_started_with():
    ann, manager = announced_echo(Limits(to_device=64 * MIB), 8 * MIB)
    data = os.urandom(1000)
    body = precopy_body([echo_entry(len(data), digest="xxh3-128")], data)
    precopy.receive_port_precopy(manager, "m" * 16, io.BytesIO(body), len(body))
    body = precopy_body([echo_entry(len(data), digest="sha256", offset=len(data))], data)
    with pytest.raises(ValueError, match="hashed with sha256 for a region hashed with xxh3-128"):
        precopy.receive_port_precopy(manager, "m" * 16, io.BytesIO(body), len(body))
    assert ann.precopied[(0, "to_device")].length == len(data)


@pytest.mark.parametrize("size", [precopy.PIECE - 1, precopy.PIECE, precopy.PIECE + 1, 2 * precopy.PIECE + 5])
def test_s1_hashes_and_batches_and_s2_reads_and_hashes_by_piece(size):
    """Around PIECE: s1's batches hold about PIECE bytes (a longer view split), each hashed once the
    socket has it; s2 hashes each read as it lands; both digests are the whole region's."""
    data = os.urandom(size)
    views = [memoryview(data)[:size // 3], memoryview(data)[size // 3:]]  # one view longer than PIECE
    sent = precopy.DIGESTS["xxh3-128"]()
    batches = list(precopy._hashed(precopy._batches(views, 0, size), sent))
    assert b"".join(bytes(p) for batch in batches for p in batch) == data
    assert all(sum(p.nbytes for p in batch) >= precopy.PIECE for batch in batches[:-1])
    assert max(p.nbytes for batch in batches for p in batch) <= precopy.PIECE
    into = np.zeros(size, np.uint8)
    received = precopy.DIGESTS["xxh3-128"]()
    precopy._receive_hashed(TrickleReader(data), into, received)
    assert into.tobytes() == data
    assert sent.digest() == received.digest() == precopy.DIGESTS["xxh3-128"](data).digest()


def test_s1_hashes_a_batch_only_after_the_socket_took_it():
    """The digest reads a batch right after the socket's copy, while it is cached: when the
    second batch is asked for, the first is in the digest and the second is not."""
    data = os.urandom(precopy.PIECE + 10)
    sent = precopy.DIGESTS["xxh3-128"]()
    batches = precopy._hashed(precopy._batches([memoryview(data)], 0, len(data)), sent)
    next(batches)
    assert sent.digest() == precopy.DIGESTS["xxh3-128"]().digest()
    next(batches)
    assert sent.digest() == precopy.DIGESTS["xxh3-128"](data[:precopy.PIECE]).digest()
    assert list(batches) == []
    assert sent.digest() == precopy.DIGESTS["xxh3-128"](data).digest()


@pytest.mark.parametrize("size", [precopy.RECEIVE_READ - 1, precopy.RECEIVE_READ, precopy.RECEIVE_READ + 1])
def test_s2_offers_each_read_at_most_receive_read_bytes(size):
    data = os.urandom(size)
    offered: list[int] = []

    class Recording(io.BytesIO):
        def readinto(self, view) -> int:
            offered.append(len(view))
            return super().readinto(view)

    into = np.zeros(size, np.uint8)
    received = precopy.DIGESTS["xxh3-128"]()
    precopy._receive_hashed(Recording(data), into, received)
    assert offered == ([precopy.RECEIVE_READ, 1] if size > precopy.RECEIVE_READ else [size])
    assert into.tobytes() == data and received.digest() == precopy.DIGESTS["xxh3-128"](data).digest()


class TrickleReader(io.BytesIO):
    """A socket's reader that hands over at most 100,000 bytes a call, as a socket does."""

    def readinto(self, view) -> int:
        return super().readinto(memoryview(view)[:100_000])


def test_a_body_cut_short_is_an_error_on_s2():
    into = np.zeros(precopy.PIECE + 1, np.uint8)
    with pytest.raises(ValueError, match="ended 1 bytes early"):
        precopy._receive_hashed(io.BytesIO(bytes(precopy.PIECE)), into, precopy.DIGESTS["xxh3-128"]())


@pytest.mark.parametrize("size", [precopy.RECEIVE_READ - 1, precopy.RECEIVE_READ, precopy.RECEIVE_READ + 1])
def test_the_rest_of_a_refused_round_is_read_to_its_end_and_not_past_it(size):
    """discard_body drops exactly ``size`` bytes, RECEIVE_READ at most a read, whatever the socket
    hands over a call; the next request's bytes stay unread. A body that ends early is an error."""
    reader = TrickleReader(bytes(size) + b"NEXT")
    precopy.discard_body(reader, size)
    assert reader.read() == b"NEXT"
    with pytest.raises(ValueError, match="ended 1 bytes early"):
        precopy.discard_body(io.BytesIO(bytes(size - 1)), size)
