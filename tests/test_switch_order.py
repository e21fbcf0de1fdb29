"""What s1 does in the downtime of a seamless switch, in an order that keeps it short: the MIGRATEs
that start a round trip through the client go first, and s2 is asked whether the sessions landed
only once their clients left s1 (or after FIRST_ASK_WITHIN for a client that stays)."""

from __future__ import annotations

import types

import gevent
import gevent.event

from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.protocol.enums import ChannelType, MigrateFlags
from spicewire.server.migration import orchestrator
from spicewire.server.migration.orchestrator import MigrationManager, Peer
from spicewire.server.migration.source import _round_trip_first

MAIN, DISPLAY, INPUTS, CURSOR = ((int(t), 0) for t in (ChannelType.MAIN, ChannelType.DISPLAY, ChannelType.INPUTS,
                                                      ChannelType.CURSOR))


def test_flush_mark_migrates_go_first_the_rest_keep_their_order():
    both = MigrateFlags.NEED_FLUSH | MigrateFlags.NEED_DATA_TRANSFER
    outputs = [mig.Send(MAIN, m.MsgMigrate(both)), mig.Send(DISPLAY, m.MsgMigrate(MigrateFlags.NEED_DATA_TRANSFER)),
               mig.Send(INPUTS, m.MsgMigrate(both)), mig.Send(CURSOR, m.MsgMigrate(0)),
               mig.MigrateDataRequested(DISPLAY)]
    ordered = sorted(outputs, key=_round_trip_first)
    assert [o.channel for o in ordered] == [MAIN, INPUTS, DISPLAY, CURSOR, DISPLAY]
    assert isinstance(ordered[-1], mig.MigrateDataRequested)


class Destination:
    """s2's /migration/completed, noting whether every client had left s1 when it was asked."""

    def __init__(self, sources: list) -> None:
        self.sources = sources
        self.address = "s2"
        self.asked_after_all_left: list[bool] = []

    def get_json(self, path: str, timeout: float) -> dict:
        self.asked_after_all_left.append(all(s.finished.is_set() for s in self.sources))
        ids = path.split("ids=", 1)[1].split(",")
        report = {"mode": "seamless", "times": {"completed": "2026-01-01T00:00:00.000000Z"}}
        return dict.fromkeys(ids, report)


def source(sid: int):
    return types.SimpleNamespace(session=types.SimpleNamespace(id=sid), switched=True,
                                 finished=gevent.event.Event())


def test_s2_is_asked_once_every_client_left_s1(monkeypatch):
    # A bound far beyond the test: only the clients leaving may end the wait, however loaded the machine.
    monkeypatch.setattr(orchestrator, "FIRST_ASK_WITHIN", 60.0)
    sources = [source(1), source(2)]
    peer = Destination(sources)
    leaving = gevent.spawn(lambda: [gevent.sleep(0.001) or s.finished.set() for s in sources])
    landed = MigrationManager._wait_landed(Peer(peer, "m1", float("inf")), sources, float("inf"))
    leaving.join()
    assert peer.asked_after_all_left == [True]
    assert sorted(landed) == ["00000001", "00000002"]


def test_a_client_that_stays_on_s1_is_asked_about_after_the_bound(monkeypatch):
    # Its session failed on s2 and it waits for a rollback: s1 must still learn that, before the deadline.
    monkeypatch.setattr(orchestrator, "FIRST_ASK_WITHIN", 0.01)
    sources = [source(1), source(2)]
    sources[0].finished.set()
    peer = Destination(sources)
    landed = MigrationManager._wait_landed(Peer(peer, "m1", float("inf")), sources, float("inf"))
    assert peer.asked_after_all_left == [False]
    assert sorted(landed) == ["00000001", "00000002"]
