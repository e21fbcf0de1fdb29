"""A port offers its device at most PUMP_TURN queued bytes per turn of the hub, the rest on the
next turns: a GiB restored by a migration, or piled up behind a paused sink, must not hold every
other session of the server (and s2's completion of the migration) for the time a device takes it."""

from __future__ import annotations

import gevent
import pytest

from spicewire.devices import Device
from spicewire.server import session as session_module
from spicewire.server.session import Limits, PortState

from .serverkit import wait_until

TURN = session_module.PUMP_TURN


class Taker(Device):
    """Takes everything it is offered and records each offer's size."""

    def __init__(self) -> None:
        super().__init__()
        self.offers: list[int] = []
        self.taken = bytearray()

    def write(self, data: memoryview) -> int:
        self.offers.append(len(data))
        self.taken += data
        return len(data)


def port_with(device: Device) -> PortState:
    return PortState(0, "taker", device, Limits(to_device=4 * TURN, to_client=1 << 20))


@pytest.mark.parametrize("size", [TURN - 1, TURN, TURN + 1])
def test_a_turn_offers_pump_turn_bytes_and_the_next_turn_the_rest(size):
    device = Taker()
    port = port_with(device)
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    port.from_client(data)
    assert len(device.taken) == min(size, TURN)  # this turn
    assert port.pump_pending == (size > TURN)
    assert port.to_device_bytes == size - len(device.taken)
    wait_until(lambda: not port.pump_pending, what="the next turn")
    assert bytes(device.taken) == data and port.to_device_bytes == 0


def test_one_large_queue_entry_is_offered_a_turn_at_a_time():
    device = Taker()
    port = port_with(device)
    port.from_client(bytes(2 * TURN + 5))  # one message, one queue entry
    wait_until(lambda: not port.pump_pending, what="the queue to drain")
    assert device.offers == [TURN, TURN, 5]


def test_a_device_that_stops_taking_leaves_nothing_scheduled():
    class Half(Taker):
        def write(self, data: memoryview) -> int:
            room = TURN // 2 - len(self.taken)
            return super().write(data[:room]) if room > 0 else 0

    device = Half()
    port = port_with(device)
    port.from_client(bytes(TURN + 1))
    assert len(device.taken) == TURN // 2
    assert not port.pump_pending and port.to_device_bytes == TURN + 1 - TURN // 2


def test_new_bytes_pumped_meanwhile_take_the_scheduled_turn():
    """A pump that new client bytes start before the scheduled turn runs does its work: the
    scheduled turn then finds nothing due and offers nothing twice."""
    device = Taker()
    port = port_with(device)
    port.from_client(bytes(TURN + 10))
    assert port.pump_pending
    port.from_client(bytes(7))  # pumps now: the rest of the first bytes and these
    assert len(device.taken) == TURN + 17 and not port.pump_pending
    offers = list(device.offers)
    gevent.idle()  # where the scheduled turn runs
    gevent.idle()
    assert device.offers == offers


def test_a_draining_queue_leaves_the_connections_their_turns():
    """A connection reads again from gevent.idle() (net.Connection._serve). The rest of a large
    queue waits for the same idle turns: as a callback it ran before them every time, and the
    port's own client was not read until the whole queue had drained."""
    reader_turns = [0]

    class Recording(Taker):
        """Notes, at each offer, how many turns the reader has had."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[int] = []

        def write(self, data: memoryview) -> int:
            self.seen.append(reader_turns[0])
            return super().write(data)

    def reader() -> None:
        while True:
            gevent.idle()
            reader_turns[0] += 1

    device = Recording()
    port = port_with(device)
    greenlet = gevent.spawn(reader)
    try:
        gevent.idle()  # the reader waits in its idle turn, as a connection between reads
        port.from_client(bytes(3 * TURN + 1))
        wait_until(lambda: not port.pump_pending, what="the queue to drain")
    finally:
        greenlet.kill()
    assert device.offers == [TURN, TURN, TURN, 1]
    # One reader turn per later offer at least; callbacks made these [n, n, n, n].
    assert device.seen[-1] - device.seen[1] >= 2, f"the reader's turns at each offer: {device.seen}"
