"""A session that lands on s2 by migration starts its devices only once the migration completed
there, as a VM resumes on its destination only then. Before, s2 offered a restored backlog to a
running device as soon as the port's MIGRATE_DATA was restored: a sink hashing PUMP_TURN bytes per
turn held the hub while main's MIGRATE_DATA waited, and the landing (the downtime's end) with it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import pytest

from spicewire import devices
from spicewire.server.session import Limits, PortState

from .serverkit import wait_until
from .test_migration import Node, connect, only_entry

MIB = 1 << 20
PROBE = "landing-probe"
KIND = "landing-probe-sink"


pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


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


@pytest.fixture
def probe_nodes():
    """make(precopy_on) -> two in-process servers with one port, a ProbeSink."""
    made: list[Node] = []

    def make(precopy_on: bool) -> tuple[Node, Node]:
        made.extend(Node(Limits(to_device=64 * MIB), [(PROBE, KIND)], precopy=precopy_on) for _ in range(2))
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



class MakesOnRoom(devices.Device):
    """Makes its data only when told of room (a device may: on_room is the plug-in API's call)."""

    kind = "makes-on-room"

    def __init__(self) -> None:
        super().__init__()
        self.told: list[int] = []

    def write(self, data: memoryview) -> int:
        return len(data)

    def on_room(self) -> None:
        assert self.port is not None
        self.told.append(self.port.room)


@pytest.mark.parametrize("how", ["rolled back (resume_device)", "landed (release_held)"])
def test_a_device_that_starts_again_is_told_of_the_room_a_drain_found_while_it_was_stopped(how):
    device = MakesOnRoom()
    port = PortState(0, "maker", device, Limits(to_device=1 << 20, to_client=1 << 20))
    if how.startswith("rolled"):
        port.stop_device()
    else:
        port.hold()
    port.on_drained()  # the client-bound queue drained meanwhile: the device is not told yet
    assert device.told == []
    port.resume_device() if how.startswith("rolled") else port.release_held()
    assert device.told == [1 << 20]
