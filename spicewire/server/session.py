"""Sessions and their channels, without sockets.

A session is what one client's main link created: its main channel and one port per configured
port channel. A port's device and the bytes buffered around it live in ``PortState``, which
belongs to the session and outlives any one connection of that channel (and is what migration
moves). A connection is driven by the network layer through the ``Transport`` it is given.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import gevent
import numpy as np

from spicewire.devices import Device
from spicewire.errors import RemoteProtocolError
from spicewire.logs import iso_utc, session_label
from spicewire.protocol import messages as m
from spicewire.protocol.caps import has_cap
from spicewire.protocol.channel import ChannelConnection
from spicewire.protocol.enums import ChannelType, MainCap, MouseMode, MsgSpicevmc
from spicewire.protocol.migration.rules import main_init
from spicewire.server.budget import MemoryBudget

if TYPE_CHECKING:
    from spicewire.server.display import DisplayState

log = logging.getLogger(__name__)

PUMP_TURN = 1 << 20
"""Client bytes offered to a device per turn of the hub. A port restored from a migration, or a
paused device resumed, can hold a GiB, in pieces as large as a pre-copied region: offered at once,
a sink hashed it all in one turn while every other session of the server waited (~0.6 s a GiB), and
on s2 before the migration was reported complete. 4 MiB turns still held the hub ~2.7 ms each: a
bystander's echo took 2.9-3.4 ms (p50) while a sink drained 512 MiB, against 0.8-0.9 ms with 1 MiB
turns, which drain about 10% slower (0.46-0.50 s against 0.38-0.45 s)."""

# spice-server's spicevmc DATA bodies are at most this long (7.4); spice-gtk reads any size.
MAX_DATA_MESSAGE = 65568
# Receive limits per channel: spice-server's on main (2: 4096 + 11 * 2048); ports take any DATA a
# client sends in one message, up to this.
MAIN_MAX_MESSAGE = 26624
PORT_MAX_MESSAGE = 64 << 20


# One piece of a body the caller streams (Transport.send_stream): anything the socket can send,
# or a list of such buffers that go out together (one sendmsg), in order.
Segment: TypeAlias = bytes | memoryview | np.ndarray | list[bytes | memoryview]


class Transport(Protocol):
    """What the network layer offers one channel connection."""

    pending_write: int

    def flush(self) -> None:
        """Move the channel's framed output to the socket writer."""

    def flush_now(self) -> None:
        """As flush, writing at once what the socket takes when the writer holds nothing."""

    def send_stream(self, header: bytes, pieces: Iterable[Segment], size: int) -> None:
        """Write ``header`` (from ChannelConnection.send_streamed), then each piece in turn, asking
        for the next only once the one before is written; ``size`` is header plus body."""

    def resume_reading(self) -> None:
        """Reading had stopped for backpressure; it may go on."""

    def close(self, reason: str) -> None: ...


class SessionMigration(Protocol):
    """What a session sees of the migration under way (s1's source or s2's destination side)."""

    def status(self) -> dict[str, Any]: ...


@dataclass
class Limits:
    to_device: int = 8 << 20  # client bytes buffered for a device before the socket stops being read
    to_client: int = 4 << 20  # device bytes queued for a client before the device is told no room
    ack_window: int = 20  # SET_ACK window on port channels (0: no ACK flow control)

    def __post_init__(self) -> None:
        # A zero buffer would stop reading every client at once, and a zero queue would never let a
        # device send: both stall every port, so they are refused where they are made.
        for name in ("to_device", "to_client"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:  # bool is an int to Python, not a size
                raise ValueError(f"Limits.{name} must be a whole number of bytes, at least 1, not {value!r}")
        if type(self.ack_window) is not int or self.ack_window < 0:
            raise ValueError(f"Limits.ack_window must be a whole number of messages, not {self.ack_window!r}")


LetGo: TypeAlias = Callable[[list[deque[Any]], int], None]
"""What takes the queues a port gave up (release_device), and their bytes, to free them: a
server's frees a large backlog a step at a time (heap.Releaser), not at once on the hub."""


def _drop_at_once(held: list[deque[Any]], size: int) -> None:
    """A port made on its own frees what it gave up with its last reference."""


class PortState:
    """One port of a session: its device and the bytes buffered in each direction."""

    def __init__(
        self, channel_id: int, name: str, device: Device, limits: Limits, budget: MemoryBudget | None = None,
        let_go: LetGo = _drop_at_once,
    ) -> None:
        self.channel_id = channel_id
        self.name = name
        self.device = device
        self.limits = limits
        # The server's, shared by every session; a port made on its own counts against its own.
        self.budget = budget if budget is not None else MemoryBudget()
        self.let_go = let_go  # where the queues go once the device is let go of (release_device)
        self.to_device: deque[memoryview] = deque()
        self.to_device_bytes = 0
        self.to_client: deque[bytes | bytearray | memoryview] = deque()
        self.to_client_bytes = 0
        # Every byte ever queued each way: a queue holds the stream's bytes from ``total - bytes``
        # to ``total``, which is how a pre-copy tells what was consumed or added since it.
        self.to_device_total = 0
        self.to_client_total = 0
        self.connection: PortConnection | None = None
        # Migration: a stopped device takes and makes nothing (the VM is paused); a frozen port
        # sends nothing (SPICE_MSG_MIGRATE went out, only MIGRATE_DATA may follow).
        self.device_stopped = False
        self.frozen = False
        # A session landing here by migration: its device starts once the migration completed, as
        # a VM resumes on its destination only then. Unlike a stopped device, the socket is read
        # within the port's limits as usual (the client's bytes queue for the device).
        self.held = False
        self.label = f"port {channel_id} ({name})"  # the session adds its id
        self.failed: str | None = None  # why the device was taken off this port, if it broke
        self._pump_due = False  # the rest of the queue is offered on the hub's next idle turn
        self._turn: Any = None  # the hub loop's idle watcher that runs that turn
        device.attach(self)

    # --- the Port interface devices see ------------------------------------------------------

    @property
    def room(self) -> int:
        pending = self.connection.transport.pending_write if self.connection else 0
        return max(0, self.limits.to_client - self.to_client_bytes - pending)

    def send(self, data: bytes | memoryview) -> None:
        self.to_client.append(bytes(data))
        self.to_client_bytes += len(data)
        self.to_client_total += len(data)
        self.budget.reserve(len(data))
        self.flush_to_client()

    def pump(self) -> None:
        """Offer buffered client bytes to the device until it stops taking them, at most PUMP_TURN
        bytes per turn of the hub: the rest is offered on its next idle turn (_schedule_turn)."""
        self._pump_due = False
        if not self.device_running or not self.attached:
            return
        was_blocked = not self.reading_allowed
        queue = self.to_device
        offered = 0
        try:
            while queue:
                if offered >= PUMP_TURN:
                    self._pump_due = True
                    self._schedule_turn()
                    break
                head = queue[0]
                # A view cut only from an entry over a turn: most are one DATA message.
                taken = self.device.write(head if len(head) <= PUMP_TURN else head[:PUMP_TURN])
                if taken <= 0:
                    break
                offered += taken
                self.to_device_bytes -= taken
                self.budget.release(taken)
                if taken >= len(head):
                    queue.popleft()
                else:
                    queue[0] = head[taken:]
        except Exception as err:
            self.device_failed("write", err)
            return
        if was_blocked and self.reading_allowed and self.connection:
            self.connection.transport.resume_reading()

    @property
    def pump_pending(self) -> bool:
        """Queued client bytes wait to be offered on the hub's next turn (PUMP_TURN)."""
        return self._pump_due

    def _schedule_turn(self) -> None:
        """The next turn runs when the hub is idle, as the connections' next reads do (they wait in
        gevent.idle()). A callback would run before any of them, every turn of the loop: while a
        GiB drained, the port's own client was not read at all, and its bytes piled up in the
        socket (a migration's downtime then had to move them)."""
        if self._turn is None:
            self._turn = gevent.get_hub().loop.idle()
        if not self._turn.active:
            self._turn.start(self._pump_turn)

    def _pump_turn(self) -> None:
        self._turn.stop()  # an idle watcher fires on every idle turn until stopped
        if self._pump_due:  # not already pumped by new bytes meanwhile
            self.pump()

    # --- the device's life --------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether the device is still this port's: once a session ended or the device broke, it is
        let go of, and nothing may reach it any more (a connection can still be delivering bytes
        it read before it was closed)."""
        return self.device.port is self

    def tick(self, now: float) -> None:
        if not self.attached:
            return
        try:
            self.device.tick(now)
        except Exception as err:
            self.device_failed("tick", err)

    def release_device(self) -> None:
        """Let go of the device: nothing reaches it again. What either side had buffered leaves
        the budget at once and goes to ``let_go`` (up to the port's limits of backlog: freed at
        once, it would hold the hub, and every other session, while glibc returns the pages)."""
        self.device.detach()
        held: list[deque[Any]] = [self.to_device, self.to_client]
        size = self.to_device_bytes + self.to_client_bytes
        self.budget.release(size)
        self.to_device, self.to_client = deque(), deque()
        self.to_device_bytes = self.to_client_bytes = 0
        self.let_go(held, size)

    def device_failed(self, call: str, err: Exception) -> None:
        """The device raised ``err`` from ``call``: this port ends, the rest of the session goes on."""
        self.failed = f"the {self.device.kind} device failed in {call}"
        log.error("%s: %s; closing the port", self.label, self.failed, exc_info=err)
        self.release_device()
        if self.connection is not None:
            self.connection.transport.close(self.failed)

    # --- the connection side ------------------------------------------------------------------

    @property
    def reading_allowed(self) -> bool:
        # A stopped device still needs the socket read: the FLUSH_MARK is behind the client's data.
        # The part of a message still being received counts: a port holds at most its limit plus
        # one read, however large the messages (none is larger than the limit: Connection._serve).
        if self.device_stopped:
            return True
        receiving = self.connection.receiving if self.connection is not None else 0
        return self.to_device_bytes + receiving < self.limits.to_device and not self.budget.exhausted

    def from_client(self, data: bytes | bytearray | memoryview) -> None:
        if not self.attached:
            return  # nobody to take it: the session ended or the device failed
        if len(data):
            self.to_device.append(memoryview(data))
            self.to_device_bytes += len(data)
            self.to_device_total += len(data)
            self.budget.reserve(len(data))
            self.pump()

    def flush_to_client(self) -> None:
        conn = self.connection
        if conn is None or self.frozen:
            return
        channel = conn.channel
        sent = False
        # ACKs can only be read from the socket, behind the client's DATA: while reading is
        # stopped for backpressure (to_device full), a closed window would never reopen and the
        # two would wait on each other forever. Then the socket's own backpressure (pending_write
        # counts against room) bounds what goes out, as on spice-server's spicevmc channels.
        while self.to_client and (channel.window_open or not self.reading_allowed):
            data = self.to_client.popleft()
            if len(data) > MAX_DATA_MESSAGE:  # views: slicing bytes would copy the rest each time
                view = memoryview(data)
                self.to_client.appendleft(view[MAX_DATA_MESSAGE:])
                data = view[:MAX_DATA_MESSAGE]
            self.to_client_bytes -= len(data)
            self.budget.release(len(data))  # the connection's queue reserves it as a frame
            channel.send_raw(MsgSpicevmc.DATA, data)
            sent = True
        if sent:
            conn.transport.flush()

    def on_drained(self) -> None:
        """The socket writer caught up: the device may have room again."""
        self.flush_to_client()
        if self.room and self.device_running and self.attached:
            try:
                self.device.on_room()
            except Exception as err:
                self.device_failed("on_room", err)

    @property
    def in_flight(self) -> int:
        """Bytes buffered here in either direction: what a migration moves or drops."""
        return self.to_device_bytes + self.to_client_bytes

    @property
    def device_running(self) -> bool:
        """The device takes and makes data: neither stopped for a migration away nor held until
        one here completes."""
        return not (self.device_stopped or self.held)

    def stop_device(self) -> None:
        """A migration away stops the device (the VM pauses): it neither takes nor makes data
        until ``resume_device``; the socket is still read (the FLUSH_MARK is behind the data)."""
        self.device_stopped = True

    def resume_device(self) -> None:
        """The migration away did not happen: the device goes on with what queued meanwhile."""
        self.device_stopped = False
        self._device_starts()

    def hold(self) -> None:
        """This port lands here by migration: its device waits for ``release_held``."""
        self.held = True

    def release_held(self) -> None:
        """The migration that brought this port completed: the device starts on what it holds."""
        self.held = False
        self._device_starts()

    def _device_starts(self) -> None:
        """The device may run again: it is offered what the client queued meanwhile, and told of
        the room the client-bound queue has (a drain while it was stopped did not tell it, and a
        device that makes data only on_room would otherwise wait for a drain that never comes)."""
        self.pump()
        self.on_drained()

    def restore(
        self, pending: Iterable[bytes | bytearray | memoryview], to_client: Iterable[bytes | bytearray | memoryview],
        pending_bytes: int, to_client_bytes: int,
    ) -> None:
        """Take over the buffers a migration brought (views into its MIGRATE_DATA, no copy)."""
        self.to_device.extend(memoryview(chunk) for chunk in pending)  # devices are offered views
        self.to_device_bytes += pending_bytes
        self.to_device_total += pending_bytes
        self.to_client.extend(to_client)
        self.to_client_bytes += to_client_bytes
        self.to_client_total += to_client_bytes
        self.budget.reserve(pending_bytes + to_client_bytes)

    def status(self) -> dict:
        return {
            "channel_id": self.channel_id,
            "name": self.name,
            "connected": self.connection is not None,
            "to_device_bytes": self.to_device_bytes,
            "to_client_bytes": self.to_client_bytes,
            "device_stopped": self.device_stopped,
            "failed": self.failed,
            "device": self.device.status(),
            "channel": self.connection.channel.state() if self.connection else None,
        }


class PortConnection:
    """A live port-channel connection of a session."""

    def __init__(self, port: PortState, channel: ChannelConnection, transport: Transport) -> None:
        self.port = port
        self.channel = channel
        self.transport = transport
        # Migration hooks: a parked link is neither read nor answered until s2 attaches it; one
        # waiting for its MIGRATE_DATA is read but starts only once restored. ``intercept`` sees
        # every client message first and returns True for those it took.
        self.parked = False
        self.waiting_for_migrate_data = False
        self.intercept: Callable[[m.Message], bool] | None = None
        self.on_closed: Callable[[PortConnection], None] | None = None  # a migration's, while it runs
        # Called after each read straight into a large body (a MIGRATE_DATA landing): s2 checks
        # the body's HMAC as it arrives.
        self.on_bulk: Callable[[], None] | None = None

    def start(self, announce: bool = True) -> None:
        if self.parked or self.waiting_for_migrate_data:
            return
        if not self.port.attached:
            self.transport.close(self.port.failed or "the session ended")
            return
        self.port.connection = self
        if announce:
            self.channel.send(m.MsgPortInit(self.port.name, 1))
        if self.port.limits.ack_window:
            self.channel.set_ack(self.port.limits.ack_window)
        self.port.flush_to_client()
        self.transport.flush()

    @property
    def reading_allowed(self) -> bool:
        return not self.parked and self.port.reading_allowed

    @property
    def receiving(self) -> int:
        """Body bytes of a message received in part: they are held too."""
        return max(0, self.channel.buffered - self.channel.header_size)

    def handle(self, msgs: list[m.Message]) -> None:
        for msg in msgs:
            if self.intercept is not None and self.intercept(msg):
                continue
            if isinstance(msg, m.MsgcSpicevmcData):
                self.port.from_client(msg.data)
            elif isinstance(msg, m.MsgcPortEvent):
                log.debug("port %s event %s", self.port.name, msg.event)
            elif isinstance(msg, m.MsgcSpicevmcCompressedData):
                raise RemoteProtocolError("COMPRESSED_DATA without the LZ4 cap we never advertise")
            elif isinstance(msg, m.MsgcDisconnecting):
                self.transport.close("client is disconnecting")
            else:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} on a port channel")
        self.port.flush_to_client()  # ACKs may have opened the window (the transport flushes after us)

    def on_drained(self) -> None:
        self.port.on_drained()

    def closed(self) -> None:
        if self.port.connection is self:
            self.port.connection = None
        if self.on_closed is not None:
            self.on_closed(self)


class MainConnection:
    """The session's main channel connection."""

    def __init__(
        self, session: Session, channel: ChannelConnection, transport: Transport, client_caps: tuple[int, ...],
    ) -> None:
        self.session = session
        self.channel = channel
        self.transport = transport
        self.client_caps = client_caps
        # Migration hooks: an arriving session gets no MAIN_INIT until the migration says so;
        # ``intercept`` sees every client message first; after SPICE_MSG_MIGRATE (frozen) only
        # the migration writes on this channel.
        self.arriving = False  # s2: the main link of a session still migrating here
        self.frozen = False
        self.intercept: Callable[[m.Message], bool] | None = None

    reading_allowed = True

    def main_init(self) -> m.MsgMainInit:
        return main_init(self.session.id, self.session.mouse_mode, multi_media_time(),
                         display_channels_hint=int(self.session.display is not None))

    def send(self, msg: m.Message) -> None:
        if not self.frozen:
            self.channel.send(msg)

    def start(self) -> None:
        if self.arriving:
            return
        s = self.session
        self.channel.send(self.main_init())
        if has_cap(self.client_caps, MainCap.NAME_AND_UUID):
            self.channel.send(m.MsgMainName(s.server_name))
            self.channel.send(m.MsgMainUuid(s.server_uuid))
        self.transport.flush()

    def handle(self, msgs: list[m.Message]) -> None:
        for msg in msgs:
            if self.intercept is not None and self.intercept(msg):
                continue
            if isinstance(msg, m.MsgcMainAttachChannels):
                self.send(m.MsgMainChannelsList(self.session.channel_ids()))
            elif isinstance(msg, m.MsgcMainMouseModeRequest):
                if msg.mode in (MouseMode.SERVER, MouseMode.CLIENT):
                    self.session.mouse_mode = msg.mode
                    if self.session.display is not None:
                        self.session.display.mouse_mode = MouseMode(msg.mode)
                self.send(m.MsgMainMouseMode(MouseMode.SERVER | MouseMode.CLIENT, self.session.mouse_mode))
            elif isinstance(msg, (m.MsgcMainAgentStart, m.MsgcMainAgentToken, m.MsgcMainAgentData)):
                pass  # no guest agent: AGENT_CONNECTED stays 0, so a client has nothing to send to
            elif isinstance(msg, m.MsgcDisconnecting):
                self.transport.close("client is disconnecting")
            elif isinstance(msg, (m.MsgcMainMigrateConnected, m.MsgcMainMigrateConnectedSeamless)):
                # The answer to a BEGIN we stopped waiting for (timeout, cancel): 5.2 cancels it.
                self.send(m.MsgMainMigrateCancel())
            elif isinstance(msg, m.MsgcMainMigrateConnectError):
                pass  # a late CONNECT_ERROR is ignored (5.2)
            else:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} on the main channel")

    def on_drained(self) -> None:
        pass

    def closed(self) -> None:
        self.session.main_closed(self)


@dataclass
class Session:
    id: int
    ports: dict[int, PortState]
    server_name: str = "spicewire"
    server_uuid: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    mouse_mode: int = MouseMode.SERVER
    main: MainConnection | None = None
    client: str | None = None  # the main channel's peer, HOST:PORT
    created: float = field(default_factory=time.time)
    on_end: Callable[[Session], None] | None = None
    migration: SessionMigration | None = None  # the migration of this session under way, on s1 or s2
    migrations: list[dict] = field(default_factory=list)  # reports of the finished ones
    display: DisplayState | None = None  # its screen, with the display, inputs and cursor channels

    def __post_init__(self) -> None:
        for port in self.ports.values():
            port.label = f"session {self.id:08x} {port.label}"  # as the connection logs name it

    def main_closed(self, conn: MainConnection) -> None:
        if self.main is conn:
            self.main = None
            if self.on_end is not None:
                self.on_end(self)

    @property
    def in_flight(self) -> int:
        return sum(port.in_flight for port in self.ports.values())

    @property
    def wants_ticks(self) -> bool:
        """Whether the server's tick loop has anything to do here: a screen, or a port whose
        device wants ticks."""
        return self.display is not None or any(port.device.wants_ticks for port in self.ports.values())

    def channel_ids(self) -> tuple[m.ChannelId, ...]:
        """What CHANNELS_LIST offers: the display's three channels, if it has a screen, and its ports."""
        graphics = (ChannelType.DISPLAY, ChannelType.INPUTS, ChannelType.CURSOR) if self.display is not None else ()
        return (*(m.ChannelId(kind, 0) for kind in graphics), *(m.ChannelId(ChannelType.PORT, p) for p in self.ports))

    def close_ports(self, reason: str) -> None:
        """Close every channel but main."""
        for port in self.ports.values():
            if port.connection is not None:
                port.connection.transport.close(reason)
        if self.display is not None:
            self.display.close_connections(reason)

    def status(self) -> dict:
        return {
            "session_id": session_label(self.id),
            "client": self.client,
            "created": iso_utc(self.created),
            "main": self.main.channel.state() if self.main else None,
            "ports": [p.status() for p in self.ports.values()],
            "display": self.display.status() if self.display is not None else None,
            "migration": self.migration.status() if self.migration is not None else None,
            "migrations": self.migrations,
        }


def multi_media_time() -> int:
    """The server's multimedia clock in ms, 400 ms behind as spice-server reports it (4.2)."""
    return int(time.monotonic() * 1000 - 400) & 0xFFFFFFFF


def new_session_id(taken: Collection[int]) -> int:
    """A random non-zero u32 not in use (spice-gtk takes 0 to mean 'new session')."""
    while True:
        candidate = secrets.randbits(32)
        if candidate and candidate not in taken:
            return candidate


