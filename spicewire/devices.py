"""The things behind a port channel, and the plug-in API for writing more.

A device sees its port through three calls: ``port.send(data)`` queues bytes for the client,
``port.room`` says how many more bytes the port will queue right now, and ``port.pump()`` asks
the port to offer its buffered client bytes again (after the device stopped taking them). The port
offers client bytes with ``device.write(view)``, which returns how many it took: taking fewer is
how a device pushes back, and the port then buffers, up to its limit, before it stops reading the
client's socket. Nothing is ever dropped.

Register a new kind with ``@register("name")``; ``--port-channel NAME=KIND`` then creates one
instance per session.

Migration moves a device with its VM: ``save()`` returns the state as a list of buffers (the first
a small JSON record, any bulk state after it) and ``restore(chunks)`` on a fresh instance of the
same kind on the destination takes it back; the list travels in one ``codec.pack_chunks``
container. A restored device continues its streams exactly where the saved one stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from rehashes import PySha256  # SHA-256 whose running state can be saved: a sink's digest migrates


class Port(Protocol):
    """What a device may ask of the port channel it sits behind."""

    @property
    def room(self) -> int: ...

    def send(self, data: bytes | memoryview) -> None: ...

    def pump(self) -> None: ...


class Device:
    """Base device: subclasses override ``write`` and whatever else they need."""

    kind = "device"
    wants_ticks = False  # whether the server should call tick(now) periodically

    def __init__(self) -> None:
        self.port: Port | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    def attach(self, port: Port) -> None:
        self.port = port

    def detach(self) -> None:
        self.port = None

    def write(self, data: memoryview) -> int:
        """Take bytes from the client; return how many were taken (0 pushes back)."""
        raise NotImplementedError

    def on_room(self) -> None:
        """The client-bound queue drained below its limit."""

    def tick(self, now: float) -> None:
        """Periodic call for devices with ``wants_ticks``."""

    def pause(self) -> None:
        raise NotImplementedError(f"a {self.kind} device cannot be paused")

    def resume(self) -> None:
        raise NotImplementedError(f"a {self.kind} device cannot be resumed")

    def status(self) -> dict:
        return {"kind": self.kind, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}

    def save(self) -> list[bytes]:
        return [json.dumps(self.state()).encode()]

    def restore(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Take the state ``save`` made; a state that is not one raises ValueError or TypeError
        (it came from another server: a migration refuses it, it does not crash on it)."""
        self.load_state(saved_object(chunks[0], f"a {self.kind} device's"))

    def state(self) -> dict:
        """The JSON part of the saved state; subclasses extend it."""
        return {"kind": self.kind, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}

    def load_state(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"cannot restore a {state.get('kind')!r} device into a {self.kind!r} one")
        self.bytes_in = count_field(state, "bytes_in")
        self.bytes_out = count_field(state, "bytes_out")


class PausableDevice(Device):
    """A device the control API can pause and resume; whether it is paused travels in its state.
    What a pause stops is the subclass's (it checks ``paused``): a sink or an echo takes no client
    bytes, a source emits nothing. Resuming offers the port's buffered client bytes again."""

    # False for a kind that learnt to pause later: an older server's state of it has no flag
    PAUSED_IN_EVERY_STATE = True

    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if self.port is not None:
            self.port.pump()

    def status(self) -> dict:
        return {**super().status(), "paused": self.paused}

    def state(self) -> dict:
        return {**super().state(), "paused": self.paused}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.paused = (self.PAUSED_IN_EVERY_STATE or "paused" in state) and flag_field(state, "paused")


def saved_object(chunk: bytes | memoryview, whose: str) -> dict:
    """The JSON object a saved state's first chunk holds."""
    state = json.loads(bytes(chunk))
    if not isinstance(state, dict):
        raise TypeError(f"{whose} saved state is a JSON object, not {type(state).__name__}")
    return state


def whole_number(value: object) -> bool:
    """An int of 0 or more, and not a bool: what a count or offset in another server's JSON must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def count_field(state: dict, name: str) -> int:
    """``state[name]``, a whole number of 0 or more (not a bool)."""
    value = state[name]
    if not whole_number(value):
        raise ValueError(f"{name} must be a whole number of 0 or more, not {value!r:.40}")
    return value


def flag_field(state: dict, name: str) -> bool:
    value = state[name]
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, not {value!r:.40}")
    return value


DeviceFactory = Callable[[], Device]
_KINDS: dict[str, DeviceFactory] = {}


def register(kind: str) -> Callable[[type[Device]], type[Device]]:
    def add(cls: type[Device]) -> type[Device]:
        cls.kind = kind
        _KINDS[kind] = cls
        return cls

    return add


def factory(kind: str) -> DeviceFactory:
    try:
        return _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown device kind {kind!r}; known: {', '.join(sorted(_KINDS))}") from None


def kinds() -> list[str]:
    return sorted(_KINDS)


@register("echo")
class EchoDevice(PausableDevice):
    """Sends back everything it receives, as far as the client-bound queue has room. Pausing it
    is a guest that stops reading its port: the client's bytes pile up on the server."""

    PAUSED_IN_EVERY_STATE = False  # echoes could not pause before

    def write(self, data: memoryview) -> int:
        port = self.port
        if port is None:  # the port checks first, so this is our bug, and it must not pass for push-back
            raise RuntimeError("an echo device was offered bytes after it was detached")
        if self.paused:
            return 0
        n = min(len(data), port.room)
        if n:
            port.send(bytes(data[:n]))
            self.bytes_in += n
            self.bytes_out += n
        return n

    def on_room(self) -> None:
        # detached: nothing is buffered for it any more; paused: resume() pumps
        if self.port is not None and not self.paused:
            self.port.pump()


@register("sink")
class SinkDevice(PausableDevice):
    """Consumes everything, keeping a byte count and a SHA-256; pausing makes data pile up."""

    def __init__(self) -> None:
        super().__init__()
        self._sha = PySha256()

    def write(self, data: memoryview) -> int:
        if self.paused:
            return 0
        self._sha.update(bytes(data))
        self.bytes_in += len(data)
        return len(data)

    def status(self) -> dict:
        return {**super().status(), "sha256": self._sha.finalize()}

    def save(self) -> list[bytes]:
        return [*super().save(), self._sha.serialize()]

    def restore(self, chunks: Sequence[bytes | memoryview]) -> None:
        super().restore(chunks)
        self._sha = PySha256.deserialize(bytes(chunks[1]))


_PATTERN = np.random.default_rng(0x5350494345).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()


def source_pattern(offset: int, n: int) -> bytes:
    """Bytes ``offset .. offset+n`` of the endless deterministic stream a source device emits."""
    pieces = []
    size = len(_PATTERN)
    while n > 0:
        start = offset % size
        piece = _PATTERN[start : start + n]
        pieces.append(piece)
        offset += len(piece)
        n -= len(piece)
    return b"".join(pieces)  # one piece (the usual case) is returned as it is


@register("source")
class SourceDevice(PausableDevice):
    """Emits the deterministic ``source_pattern`` stream at ``rate`` bytes/s (0 = as fast as the
    client takes it), up to ``limit`` bytes (0 = forever). Client bytes are consumed and counted."""

    wants_ticks = True
    CHUNK = 64 * 1024

    def __init__(self, rate: int = 1 << 20, limit: int = 0) -> None:
        super().__init__()
        self.rate = rate
        self.limit = limit
        self._started: float | None = None  # when the rate clock started, and bytes_out then
        self._origin = 0

    def write(self, data: memoryview) -> int:
        self.bytes_in += len(data)
        return len(data)

    def tick(self, now: float) -> None:
        if self.port is None or self.paused:
            return
        if self._started is None:
            self._started, self._origin = now, self.bytes_out
        due = self._origin + (now - self._started) * self.rate if self.rate else float("inf")
        if self.limit:
            due = min(due, self.limit)
        while self.bytes_out < due:
            n = int(min(self.CHUNK, due - self.bytes_out, self.port.room))
            if n <= 0:
                return
            self.port.send(source_pattern(self.bytes_out, n))
            self.bytes_out += n

    def on_room(self) -> None:
        pass  # the next tick sends what is due

    def resume(self) -> None:
        super().resume()  # its pump finds nothing: a source takes every client byte at once
        self._started = None  # no burst for the time spent paused

    def status(self) -> dict:
        return {**super().status(), "rate": self.rate}

    def state(self) -> dict:
        return {**super().state(), "rate": self.rate, "limit": self.limit}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.rate, self.limit = count_field(state, "rate"), count_field(state, "limit")
        self._started = None  # the rate clock restarts here, from the restored offset
