"""The event stream (``GET /events``): what QMP's SPICE events say, per channel and per migration,
with a bounded queue per follower."""

from __future__ import annotations

import gevent
import pytest

from spicewire.client import ClientSession
from spicewire.control.events import follow
from spicewire.control.server import ControlServer
from spicewire.errors import MigrationError
from spicewire.server import events
from spicewire.server.events import EventBus
from tests.serverkit import wait_until
from tests.test_migration import ECHO, Node

pytestmark = pytest.mark.usefixtures("within_30_s")


class Follower:
    """``follow`` in a greenlet of its own, collecting what arrives."""

    def __init__(self, node: Node, token: str | None = None) -> None:
        self.events: list[dict] = []
        self.node = node
        before = node.spice.events.subscribers
        self.greenlet = gevent.spawn(self._run, token)
        wait_until(lambda: node.spice.events.subscribers > before or self.greenlet.dead, what="the subscription")

    def _run(self, token: str | None) -> None:
        for event in follow(*self.node.control_address, token=token):
            self.events.append(event)

    def kinds(self, **match) -> list[str]:
        return [e["event"] for e in self.events if all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, kind: str, **match) -> dict:
        wait_until(lambda: kind in self.kinds(**match), what=f"a {kind} event matching {match}")
        return next(e for e in self.events if e["event"] == kind and all(e.get(k) == v for k, v in match.items()))


def test_channels_report_connected_initialized_and_disconnected_like_qmp(new_node):
    s1 = new_node()
    follower = Follower(s1)
    session = ClientSession(*s1.address, timeout=10).connect()
    session.open_port(ECHO)
    sid = f"{session.session_id:08x}"
    connected = follower.wait_for(events.CONNECTED, channel="main")
    assert connected["session_id"] == sid and connected["client"].startswith("127.0.0.1:")
    assert connected["ts"].endswith("Z")
    follower.wait_for(events.INITIALIZED, channel="main")
    follower.wait_for(events.INITIALIZED, channel=f"port 0 ({ECHO})")
    session.close()
    follower.wait_for(events.DISCONNECTED, channel="main", session_id=sid)
    seqs = [e["seq"] for e in follower.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # Per channel, in the order QMP gives them.
    main = follower.kinds(channel="main")
    assert main == [events.CONNECTED, events.INITIALIZED, events.DISCONNECTED]
    follower.greenlet.kill()


def test_a_migration_is_started_and_completed_on_s1_and_completed_on_s2(new_node):
    s1, s2 = new_node(), new_node()
    on_s1, on_s2 = Follower(s1), Follower(s2)
    session = ClientSession(*s1.address, timeout=10).connect()
    echo = session.open_port(ECHO)
    echo.write(b"ping")
    assert echo.read(4, timeout=10) == b"ping"
    sid = f"{session.session_id:08x}"
    report = s1.migrate_to(s2)
    assert report["migrated"] == 1, report
    started = on_s1.wait_for(events.MIGRATION_STARTED, session_id=sid)
    assert started["mode"] == "seamless" and started["to"] == "{}:{}".format(*s2.address)
    done = on_s1.wait_for(events.MIGRATION_COMPLETED, session_id=sid)
    assert done["result"] == "migrated" and done["mode"] == "seamless" and done["downtime_s"] > 0
    arrived = on_s2.wait_for(events.MIGRATION_COMPLETED, session_id=sid)
    assert arrived["role"] == "destination" and arrived["mode"] == "seamless"
    on_s2.wait_for(events.CONNECTED, session_id=sid, channel="main")
    session.close()
    for follower in (on_s1, on_s2):
        follower.greenlet.kill()


def test_a_failed_migration_is_an_event_naming_the_unreachable_destination(new_node):
    s1 = new_node()
    follower = Follower(s1)
    session = ClientSession(*s1.address, timeout=10).connect()
    gone = new_node()
    gone.stop()  # its control address now refuses
    with pytest.raises(MigrationError):
        s1.migrate_to(gone)
    failed = follower.wait_for(events.MIGRATION_FAILED, session_id=f"{session.session_id:08x}")
    assert "{}:{}".format(*gone.control_address) in failed["error"]
    session.close()
    follower.greenlet.kill()


def test_a_slow_follower_loses_the_oldest_events_and_is_told_how_many():
    bus = EventBus(limit=3)
    sub = bus.subscribe()
    for n in range(5):
        bus.emit("tick", n=n)
    got = sub.get(timeout=0)
    assert got[0]["event"] == events.EVENTS_LOST and got[0]["count"] == 2
    assert [e["n"] for e in got[1:]] == [2, 3, 4]  # the newest ones, in order
    bus.emit("tick", n=5)
    assert [e["event"] for e in sub.get(timeout=0)] == ["tick"]  # told once, not again


@pytest.mark.parametrize("emitted, lost", [(3, 0), (4, 1)], ids=["at-the-bound", "one-over"])
def test_the_bound_drops_only_past_it(emitted, lost):
    """A queue exactly full loses nothing; one event more drops the oldest, and says so."""
    bus = EventBus(limit=3)
    sub = bus.subscribe()
    for n in range(emitted):
        bus.emit("tick", n=n)
    got = sub.get(timeout=0)
    notices = [e["count"] for e in got if e["event"] == events.EVENTS_LOST]
    assert notices == ([lost] if lost else [])
    assert [e["n"] for e in got if e["event"] == "tick"] == list(range(lost, emitted))


def test_a_follower_never_holds_more_than_its_bound():
    bus = EventBus(limit=10)
    sub = bus.subscribe()
    for n in range(10_000):
        bus.emit("tick", n=n)
    got = sub.get(timeout=0)
    assert len(got) == 11 and got[0]["count"] == 9_990


def test_a_closed_subscription_gets_nothing_and_emitting_to_nobody_costs_nothing():
    bus = EventBus()
    sub = bus.subscribe()
    sub.close()
    bus.emit("tick")
    assert bus.subscribers == 0 and sub.get(timeout=0) == []


def test_the_stream_needs_the_token_and_ends_when_the_server_stops(new_node):
    s1 = new_node()
    guarded = ControlServer(s1.spice, "127.0.0.1", 0, token="t0k")
    guarded.start()
    with pytest.raises(MigrationError, match="401"):
        next(follow(*guarded.address, token="wrong"))
    stream = follow(*guarded.address, token="t0k")
    reader = gevent.spawn(list, stream)
    wait_until(lambda: s1.spice.events.subscribers == 1, what="the subscription")
    guarded.stop()
    assert reader.get(timeout=5) == []  # ended, without an error
    assert s1.spice.events.subscribers == 0


@pytest.mark.parametrize(
    "entry, kind, result",
    [
        ({"migrated": True, "mode": "seamless", "error": None, "downtime_s": 0.002}, events.MIGRATION_COMPLETED,
         "migrated"),
        ({"migrated": False, "mode": "switch-host", "error": None}, events.MIGRATION_COMPLETED, "switched-host"),
        ({"migrated": False, "mode": None, "error": "rolled back: the destination is unreachable at h:1"},
         events.MIGRATION_ROLLED_BACK, "rolled-back"),
        ({"migrated": False, "mode": None, "error": "lost: the client left the source but never arrived"},
         events.MIGRATION_FAILED, "lost"),
        ({"migrated": False, "mode": None, "error": "the client could not connect to the destination"},
         events.MIGRATION_FAILED, "stayed"),
    ],
)
def test_each_session_outcome_on_s1_is_one_event_and_one_count(new_node, entry, kind, result):
    from spicewire.protocol.migration import MigrationMode

    s1 = new_node()
    sub = s1.spice.events.subscribe()
    full = {"session_id": "aadce55b", "in_flight_bytes_moved": 10, "bytes_dropped": 0, **entry}
    s1.spice.migration._record(full, MigrationMode.SEAMLESS, ("127.0.0.1", 5901))
    (event,) = sub.get(timeout=0)
    assert event["event"] == kind and event["result"] == result and event["session_id"] == "aadce55b"
    mode = entry["mode"] or "seamless"
    labels = {"role": "source", "mode": mode, "result": result}
    assert s1.spice.metrics.registry.get_sample_value("spicewire_migrations_total", labels) == 1
