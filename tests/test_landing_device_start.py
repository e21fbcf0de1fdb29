"""A session that lands on s2 by migration starts its devices only once the migration completed
there, as a VM resumes on its destination only then. Before, s2 offered a restored backlog to a
running device as soon as the port's MIGRATE_DATA was restored: a sink hashing PUMP_TURN bytes per
turn held the hub while main's MIGRATE_DATA waited, and the landing (the downtime's end) with it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import gevent
import pytest

from spicewire import devices
from spicewire.control.client import ControlClient
from spicewire.control.server import ControlServer
from spicewire.server.net import ServerConfig, SpiceServer
from spicewire.server.session import Limits

from .serverkit import wait_until
from .test_migration import PEER_TOKEN, Node, connect, only_entry

MIB = 1 << 20
PROBE = "landing-probe"
KIND = "landing-probe-sink"


@pytest.fixture(autouse=True)
def deadline():
    with gevent.Timeout(60, AssertionError("the test took longer than 60 s")):
        yield


# Servers are told apart by their memory budget, which every port of a server shares.
STALLED: set[int] = set()  # the budgets of servers where a ProbeSink takes nothing
LANDED: dict[int, Callable[[], bool]] = {}  # budget -> has the session landed on that server?
WRITES: list[tuple[int, bool]] = []  # (budget, landed) at each write a ProbeSink took


@devices.register(KIND)
class ProbeSink(devices.SinkDevice):
    """A running sink that takes nothing where STALLED says so (a backlog then waits in a port
    whose device is not paused); elsewhere it takes everything and records whether the session
    had landed there."""

    def write(self, data: memoryview) -> int:
        budget = id(self.port.budget)  # type: ignore[union-attr]
        if budget in STALLED:
            return 0
        landed = LANDED.get(budget)
        WRITES.append((budget, landed is not None and landed()))
        return super().write(data)


class ProbeNode(Node):
    """An in-process server with one port, a ProbeSink, and pre-copy on or off."""

    def __init__(self, precopy_on: bool) -> None:
        self.spice = SpiceServer(ServerConfig(host="127.0.0.1", port=0, port_channels=[(PROBE, KIND)],
                                              limits=Limits(to_device=64 * MIB), precopy=precopy_on))
        self.spice.start()
        self.control = ControlServer(self.spice, "127.0.0.1", 0, peer_token=PEER_TOKEN)
        self.control.start()
        self.api = ControlClient(*self.control.address, token=PEER_TOKEN, timeout=60)
        self.address = self.spice.address
        self.control_address = self.control.address


@pytest.fixture
def probe_nodes():
    made: list[ProbeNode] = []

    def make(precopy_on: bool) -> tuple[ProbeNode, ProbeNode]:
        made.extend(ProbeNode(precopy_on) for _ in range(2))
        return made[-2], made[-1]

    WRITES.clear()
    yield make
    for node in made:
        node.stop()
    STALLED.clear()
    LANDED.clear()


@pytest.mark.parametrize("precopy_on", [True, False], ids=["precopy", "no-precopy"])
def test_a_running_device_takes_nothing_on_s2_before_the_session_landed(probe_nodes, precopy_on):
    s1, s2 = probe_nodes(precopy_on)
    STALLED.add(id(s1.spice.budget))
    session = connect(s1)
    sid = session.session_id
    LANDED[id(s2.spice.budget)] = lambda: sid in s2.spice.migration.completed
    port = session.open_port(PROBE)
    digest, size, block = hashlib.sha256(), 24 * MIB, os.urandom(MIB)
    for _ in range(size // MIB):
        port.write(block)
        digest.update(block)
    wait_until(lambda: s1.port(sid, PROBE)["to_device_bytes"] == size, what="the backlog on s1")
    assert not s1.port(sid, PROBE)["device"]["paused"]  # running, just not taking

    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    wait_until(lambda: s2.port(sid, PROBE)["device"]["bytes_in"] == size, what="s2's device to take the backlog")
    assert s2.port(sid, PROBE)["device"]["sha256"] == digest.hexdigest()
    on_s2 = [landed for budget, landed in WRITES if budget == id(s2.spice.budget)]
    assert on_s2 and all(on_s2), f"{on_s2.count(False)} of {len(on_s2)} writes came before the landing"
    session.close()

