"""Devices behind port channels: their write/room contract and their saved state."""

import hashlib
import json
import os

import pytest

from spicewire import devices


class FakePort:
    """The Port a device sees: a client-bound queue with a fixed room."""

    def __init__(self, room: int = 1 << 30) -> None:
        self._room = room
        self.sent = bytearray()
        self.pumps = 0

    @property
    def room(self) -> int:
        return max(0, self._room - len(self.sent))

    def send(self, data) -> None:
        self.sent += data

    def pump(self) -> None:
        self.pumps += 1


def attached(kind: str, room: int = 1 << 30, **kwargs):
    device = devices.factory(kind)(**kwargs)
    port = FakePort(room)
    device.attach(port)
    return device, port


def test_every_registered_kind_is_known():
    assert {"echo", "sink", "source"} <= set(devices.kinds())


def test_an_unknown_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="echo"):
        devices.factory("teleporter")


def test_echo_sends_back_what_it_takes():
    echo, port = attached("echo")
    assert echo.write(memoryview(b"hello")) == 5
    assert bytes(port.sent) == b"hello"


def test_echo_takes_only_what_the_client_queue_has_room_for():
    echo, port = attached("echo", room=3)
    assert echo.write(memoryview(b"hello")) == 3
    assert echo.write(memoryview(b"lo")) == 0
    assert bytes(port.sent) == b"hel"


def test_echo_asks_for_more_when_room_returns():
    echo, port = attached("echo")
    echo.on_room()
    assert port.pumps == 1


def test_a_paused_echo_takes_nothing_and_resuming_pumps_the_port():
    echo, port = attached("echo")
    echo.pause()
    assert echo.write(memoryview(b"abc")) == 0 and echo.status()["paused"] is True
    echo.on_room()  # room returning does not wake a paused echo
    assert port.pumps == 0
    echo.resume()
    assert port.pumps == 1 and echo.write(memoryview(b"abc")) == 3 and bytes(port.sent) == b"abc"


def test_a_restored_echo_stays_paused_and_one_saved_before_echoes_paused_runs():
    first, _ = attached("echo")
    first.write(memoryview(b"12345"))
    first.pause()
    second, _ = attached("echo")
    second.restore(first.save())
    assert second.paused and second.status()["bytes_out"] == 5
    older = {"kind": "echo", "bytes_in": 5, "bytes_out": 5}  # a spicewire whose echoes could not pause
    third, _ = attached("echo")
    third.restore([json.dumps(older).encode()])
    assert not third.paused and third.status()["bytes_in"] == 5


def test_sink_counts_and_hashes_what_it_consumes():
    sink, _ = attached("sink")
    data = os.urandom(100_000)
    for i in range(0, len(data), 7_000):
        assert sink.write(memoryview(data[i : i + 7_000])) == len(data[i : i + 7_000])
    status = sink.status()
    assert status["bytes_in"] == len(data)
    assert status["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_paused_sink_takes_nothing_and_resuming_pumps_the_port():
    sink, port = attached("sink")
    sink.pause()
    assert sink.write(memoryview(b"abc")) == 0
    sink.resume()
    assert port.pumps == 1 and sink.write(memoryview(b"abc")) == 3


def test_a_restored_sink_continues_the_same_sha256():
    data = os.urandom(300_001)
    first, _ = attached("sink")
    first.write(memoryview(data[:123_457]))
    first.pause()
    second, _ = attached("sink")
    second.restore(first.save())
    assert second.paused
    second.resume()
    second.write(memoryview(data[123_457:]))
    assert second.status()["bytes_in"] == len(data)
    assert second.status()["sha256"] == hashlib.sha256(data).hexdigest()


def test_restoring_into_another_kind_is_refused():
    sink, _ = attached("sink")
    echo, _ = attached("echo")
    with pytest.raises(ValueError, match="sink"):
        echo.restore(sink.save())


@pytest.mark.parametrize("kind", ["echo", "sink", "source"])
@pytest.mark.parametrize("state", [b"[]", b'"sink"', b"7", b"null"])
def test_a_saved_state_that_is_not_an_object_is_refused(kind, state):
    """A device state comes from another server: whatever its shape, restore refuses it with a
    ValueError or TypeError (a 400 to that server), never another exception (a 500). Hypothesis
    found the JSON list."""
    device = devices.factory(kind)()
    with pytest.raises(TypeError, match="saved state is a JSON object"):
        device.restore([state, *device.save()[1:]])


@pytest.mark.parametrize(("kind", "field", "value"), [
    ("sink", "bytes_in", "12"), ("sink", "bytes_out", -1), ("sink", "bytes_in", True), ("sink", "paused", 1),
    ("source", "rate", 1.5), ("source", "limit", None), ("source", "paused", "no"), ("echo", "bytes_out", [3]),
    ("echo", "paused", "yes"),
])
def test_a_saved_field_of_the_wrong_type_is_refused(kind, field, value):
    device = devices.factory(kind)()
    saved = device.save()
    state = json.loads(saved[0])
    state[field] = value
    with pytest.raises(ValueError, match=field):
        devices.factory(kind)().restore([json.dumps(state).encode(), *saved[1:]])


def test_source_pattern_is_deterministic_and_seekable():
    whole = devices.source_pattern(0, 3 << 20)
    assert devices.source_pattern(12345, 1000) == whole[12345:13345]
    assert devices.source_pattern((1 << 20) - 10, 20) == whole[(1 << 20) - 10 : (1 << 20) + 10]


def test_source_emits_at_its_rate():
    source, port = attached("source", rate=1000)
    source.tick(10.0)
    source.tick(12.5)
    assert len(port.sent) == 2500
    assert bytes(port.sent) == devices.source_pattern(0, 2500)


def test_source_stops_at_its_limit_and_respects_room():
    source, port = attached("source", room=300, rate=0, limit=1000)
    source.tick(1.0)
    assert len(port.sent) == 300


def test_a_restored_source_continues_the_stream_where_it_stopped():
    first, port1 = attached("source", rate=1000)
    first.tick(0.0)
    first.tick(1.0)
    second, port2 = attached("source", rate=1000)
    second.restore(first.save())
    second.tick(50.0)
    second.tick(51.0)
    assert bytes(port1.sent + port2.sent) == devices.source_pattern(0, 2000)
