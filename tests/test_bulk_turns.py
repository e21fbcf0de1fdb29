"""A large body moving through one connection (s1 streaming a port's MIGRATE_DATA or a pre-copy
round, s2 landing either) gives the other greenlets a turn every turns.BULK_TURN bytes, not after
every sendmsg or read, and not only when a socket runs full or dry: the count of BulkTurns around
the threshold, the pre-copy's send and receive loops with peers that never block, and migrations
with the threshold below one batch (a turn after each) and above the whole body (none inside it),
both intact."""

from __future__ import annotations

import io
import sys

import gevent
import numpy as np
import pytest
import xxhash

from spicewire import tlssocket, turns
from spicewire.server import net
from spicewire.server.migration import precopy, source

from .test_migration import connect, drain_sink, fill_paused_sink, only_entry
from .test_precopy import MIB, making_pnodes

pnodes = pytest.fixture(making_pnodes, name="pnodes")

BODY = 6 * MIB  # over source.STREAM_MIGRATE_DATA: streamed in GATHER_BATCH batches, landed in bulk reads


pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


@pytest.mark.parametrize(("moved", "due"), [(turns.BULK_TURN - 1, False), (turns.BULK_TURN, True),
                                            (turns.BULK_TURN + 1, True)])
def test_a_turn_is_due_from_bulk_turn_bytes_on(moved, due):
    counter = turns.BulkTurns()
    assert counter.moved(moved) is due
    assert counter.unturned == (0 if due else moved)  # counted from 0 again once a turn is due


def test_bytes_add_up_to_a_turn_and_restart_forgets_them():
    counter = turns.BulkTurns()
    assert not counter.moved(turns.BULK_TURN // 2)
    assert counter.moved(turns.BULK_TURN - turns.BULK_TURN // 2)
    assert not counter.moved(turns.BULK_TURN - 1)
    counter.restart()
    assert not counter.moved(turns.BULK_TURN - 1)


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


class NeverFull:
    """A socket that takes every byte at once: the sender would never have to wait for it."""

    def __init__(self) -> None:
        self.sent = 0

    def sendmsg(self, views) -> int:
        n = sum(memoryview(v).nbytes for v in views)
        self.sent += n
        return n


@pytest.mark.parametrize(("size", "expected"), [(turns.BULK_TURN - 1, 0), (turns.BULK_TURN, 1),
                                                (turns.BULK_TURN + 1, 1), (3 * turns.BULK_TURN, 3)])
def test_a_streamed_body_to_a_socket_that_never_blocks_gives_a_turn_every_bulk_turn(gevent_idles, size, expected):
    """send_batches (the control client's streamed bodies: a pre-copy round): 64 KiB views in 1 MiB
    batches; without the turns, a loopback peer that keeps up would leave the others no turn at all."""
    piece = memoryview(bytes(64 << 10))
    views = [piece] * (size // len(piece)) + ([piece[: size % len(piece)]] if size % len(piece) else [])
    batches = [views[i : i + 16] for i in range(0, len(views), 16)]
    sock = NeverFull()
    assert tlssocket.send_batches(sock, batches) == size == sock.sent
    assert gevent_idles[0] == expected


@pytest.mark.parametrize(("size", "expected"), [(turns.BULK_TURN - 1, 0), (turns.BULK_TURN, 1),
                                                (3 * turns.BULK_TURN + 5, 3)])
def test_a_pre_copy_round_landing_from_a_socket_that_never_runs_dry_gives_a_turn_every_bulk_turn(
        gevent_idles, size, expected):
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    into = np.zeros(size, dtype=np.uint8)
    digest = xxhash.xxh3_128()
    precopy._receive_hashed(io.BytesIO(data.tobytes()), into, digest)
    assert np.array_equal(into, data) and digest.digest() == xxhash.xxh3_128(data).digest()
    assert gevent_idles[0] == expected


def test_a_large_body_takes_turns_by_bulk_turn(pnodes, monkeypatch, turns_taken):
    """One migration with BULK_TURN under one batch (a turn after every sendmsg and every landing
    read), one back with it over the whole body (no turn inside it): the second takes at least a
    turn per batch fewer on each side, and both arrive whole."""
    assert BODY > source.STREAM_MIGRATE_DATA
    s1, s2 = pnodes(False, False)
    session = connect(s1)
    digest = fill_paused_sink(s1, session, BODY)
    monkeypatch.setattr(turns, "BULK_TURN", 1)
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    each = dict(turns_taken)
    for loop in turns_taken:
        turns_taken[loop] = 0
    monkeypatch.setattr(turns, "BULK_TURN", 2 * BODY)
    entry = only_entry(s2.migrate_to(s1))
    assert entry["migrated"], entry
    batches = BODY // source.GATHER_BATCH
    assert each["_write_loop"] - turns_taken["_write_loop"] >= batches - 1, (each, turns_taken)
    assert each["_serve"] > turns_taken["_serve"], (each, turns_taken)
    drain_sink(s1, session.session_id, BODY, digest)
    session.close()


@pytest.mark.parametrize(("size", "expected"), [(turns.BULK_TURN - 1, 0), (turns.BULK_TURN, 1),
                                                (3 * turns.BULK_TURN + 5, 3)])
def test_a_control_api_body_from_a_peer_that_never_runs_dry_gives_a_turn_every_bulk_turn(gevent_idles, size,
                                                                                        expected):
    """Request.body (device states, display pre-copies: up to 64 MiB) reads 1 MiB at a time."""
    from spicewire.control.server import Request

    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    request = Request("POST", "/migration/device-state",
                      {"CONTENT_LENGTH": str(size), "wsgi.input": io.BytesIO(data)})
    assert bytes(request.body(size)) == data
    assert gevent_idles[0] == expected
