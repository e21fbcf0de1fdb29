"""A large body moving through one connection (s1 streaming a port's MIGRATE_DATA, s2 landing it)
gives the other greenlets a turn every net.BULK_TURN bytes, not after every sendmsg or read: the
count of BulkTurns around the threshold, and migrations with the threshold below one batch (a turn
after each, as before) and above the whole body (none inside it), both intact."""

from __future__ import annotations

import sys

import gevent
import pytest

from spicewire.server import net
from spicewire.server.migration import source

from .test_migration import connect, drain_sink, fill_paused_sink, only_entry
from .test_precopy import MIB, making_pnodes

pnodes = pytest.fixture(making_pnodes, name="pnodes")

BODY = 6 * MIB  # over source.STREAM_MIGRATE_DATA: streamed in GATHER_BATCH batches, landed in bulk reads


pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


@pytest.mark.parametrize(("moved", "due"), [(net.BULK_TURN - 1, False), (net.BULK_TURN, True),
                                            (net.BULK_TURN + 1, True)])
def test_a_turn_is_due_from_bulk_turn_bytes_on(moved, due):
    turns = net.BulkTurns()
    assert turns.moved(moved) is due
    assert turns.unturned == (0 if due else moved)  # counted from 0 again once a turn is due


def test_bytes_add_up_to_a_turn_and_restart_forgets_them():
    turns = net.BulkTurns()
    assert not turns.moved(net.BULK_TURN // 2)
    assert turns.moved(net.BULK_TURN - net.BULK_TURN // 2)
    assert not turns.moved(net.BULK_TURN - 1)
    turns.restart()
    assert not turns.moved(net.BULK_TURN - 1)


@pytest.fixture
def turns_taken(monkeypatch):
    """The idle() calls of the connections' write and read loops, by loop, as they happen."""
    taken = {"_write_loop": 0, "_serve": 0}
    real = gevent.idle

    def counted(*args):
        caller = sys._getframe(1).f_code.co_name
        if caller in taken:
            taken[caller] += 1
        return real(*args)

    monkeypatch.setattr(net.gevent, "idle", counted)
    return taken


def test_a_large_body_takes_turns_by_bulk_turn(pnodes, monkeypatch, turns_taken):
    """One migration with BULK_TURN under one batch (a turn after every sendmsg and every landing
    read), one back with it over the whole body (no turn inside it): the second takes at least a
    turn per batch fewer on each side, and both arrive whole."""
    assert BODY > source.STREAM_MIGRATE_DATA
    s1, s2 = pnodes(False, False)
    session = connect(s1)
    digest = fill_paused_sink(s1, session, BODY)
    monkeypatch.setattr(net, "BULK_TURN", 1)
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    each = dict(turns_taken)
    for loop in turns_taken:
        turns_taken[loop] = 0
    monkeypatch.setattr(net, "BULK_TURN", 2 * BODY)
    entry = only_entry(s2.migrate_to(s1))
    assert entry["migrated"], entry
    batches = BODY // source.GATHER_BATCH
    assert each["_write_loop"] - turns_taken["_write_loop"] >= batches - 1, (each, turns_taken)
    assert each["_serve"] > turns_taken["_serve"], (each, turns_taken)
    drain_sink(s1, session.session_id, BODY, digest)
    session.close()
