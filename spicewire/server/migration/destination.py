"""s2's side of one migrating session, from its MAIN link to MigrationCompleted: parked links,
DO_SEAMLESS, MIGRATE_DATA restored into the port buffers, MAIN_INIT after a semi-seamless END."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, assert_never

import gevent
import gevent.event
import numpy as np

from spicewire.errors import LocalProtocolError, PeerFault
from spicewire.logs import context, iso_times, session_label
from spicewire.protocol import graphics, state_auth
from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.protocol.enums import ChannelType
from spicewire.protocol.framing import MessageReader
from spicewire.protocol.migrate_data import InputsState
from spicewire.server import events
from spicewire.server.display import (
    DIRECT_DISPLAY_MIGRATE_FLAGS,
    GRAPHICS_MAX_MESSAGE,
    DisplayConnection,
    DisplayState,
    GraphicsConnection,
    restore_display_channel,
)
from spicewire.server.migration.common import MAIN, channel_of, collector_paused, mode_label, port_channel, prefaulted
from spicewire.server.migration.precopy import PrecopyMismatch, restore_precopy, tail_room
from spicewire.server.session import Limits, MainConnection, PortConnection, Session, multi_media_time

if TYPE_CHECKING:
    from spicewire.server.migration.orchestrator import MigrationManager

log = logging.getLogger(__name__)

PREFAULT_MIN = 4 << 20  # a backlog this large gets a worker-thread job of its own to fault its buffer in
PREFAULT_SMALL_MIN = MessageReader.BULK_BODY
"""Smaller backlogs get no buffer faulted in ahead: their MIGRATE_DATA is copied out of the read
buffer, never landed in a buffer of its own."""
PREFAULT_BATCH = 64 << 20  # the buffers of backlogs under PREFAULT_MIN, faulted in per worker-thread job


def prefault_room(size: int) -> int:
    """Bytes s2 faults in ahead for the MIGRATE_DATA of a port that announced ``size`` queued
    bytes (0: none). Receiving into fresh pages costs this machine about three times what
    receiving into faulted ones does, and the faults are paid in the downtime. A big backlog gets
    room for the SWPD framing and for what arrives until FLUSH_MARK; a small one a tighter fit
    (the framing of chunks averaging 512 bytes or more), as 500 of them must not hold 4 MiB
    each: a body that outgrows it lands in fresh memory, as without it."""
    if size >= PREFAULT_MIN:
        return int(size * 1.02) + (4 << 20)
    if size >= PREFAULT_SMALL_MIN:
        return size + size // 32 + (64 << 10)
    return 0
_DESTINATION_MAIN_MESSAGES = (m.MsgcMainMigrateDstDoSeamless, m.MsgcMainMigrateEnd, m.MsgcMigrateData)


AUTH_IN_THREAD = 1 << 20  # MIGRATE_DATA at least this large is checked off the hub
LANDED_STEP = 4 << 20  # a landing body is hashed in worker-thread jobs of at least this much
STOPPED_READ_ALLOWANCE = 256 << 20
"""What s1 may read from a port's client between reporting the port's backlog (the device state)
and the client's FLUSH_MARK. s1 reads a stopped port without a limit (the FLUSH_MARK is behind that
data), and a client writing flat out on loopback put 115 MB there under load; the TCP buffers alone
would be ~10 MiB. Bounding that read on s1 would let this shrink to the pipe."""


def migrate_data_limit(in_flight: int, limits: Limits) -> int:
    """The largest MIGRATE_DATA s2 takes for a port s1 said holds ``in_flight`` bytes (in its
    announcement, and again in the device state, once the device stopped).

    The payload is that plus what can join it before the client's FLUSH_MARK: a full buffer each
    way (the port's limits; s1 and s2 are assumed to run with the same ones) and what s1 reads
    from the stopped port meanwhile (``STOPPED_READ_ALLOWANCE``).
    The SWPD framing around it is its 8-byte header, the 64-byte state record, one 32-byte
    container header per segment and a 16-byte index entry per chunk; chunks are the client's
    messages and the device's writes, counted as averaging at least 128 bytes (an eighth more),
    and 1 MiB covers the fixed parts. Anything larger is not this port's state."""
    payload = in_flight + limits.to_device + limits.to_client + STOPPED_READ_ALLOWANCE
    return payload + payload // 8 + (1 << 20)


@dataclass
class Announcement:
    """A session s1 said will migrate here, in its migration ``migration_id``: its id and the
    ports (and devices) it has."""

    session_id: int
    ports: list[tuple[int, str, str]]  # channel id, name, device kind
    expires: float  # time.monotonic()
    migration_id: str
    in_flight: dict[int, int] = field(default_factory=dict)  # channel id -> bytes s1 had buffered
    ticket: str | None = None  # the password the client linked with on s1, accepted from it here too
    client: str | None = None  # the client's host as s1 saw it: its target link must come from there
    target_claimed: bool = False  # a target link passed its ticket: no second one is taken
    device_state: dict[int, list] = field(default_factory=dict)  # channel id -> saved chunks
    # The session's screen, made when it is announced: the pre-copy and the delta land in it before
    # (or after) the client's main link creates the session.
    display: DisplayState | None = None
    # s1 sends the display channel's record in the device state, and its MIGRATE only switches it
    # (DISPLAY_STATE_VERSION): the display waits for no MIGRATE_DATA here.
    display_direct: bool = False
    session: Session | None = None
    # Memory for each big port's MIGRATE_DATA, faulted in during pre-migration: fresh pages cost
    # more to touch than the bytes cost to receive, and the downtime should pay for neither.
    buffers: dict[int, gevent.event.AsyncResult[np.ndarray]] = field(default_factory=dict)
    # The migration's key, with the version s2 agreed to check: every MIGRATE_DATA of the session
    # must carry its MAC, each channel's once (state_auth).
    state_key: state_auth.MigrationKey | None = None
    # (channel id, "to_device"|"to_client") -> the bytes s1 pre-copied (precopy.HeldRegion).
    precopied: dict[tuple[int, str], Any] = field(default_factory=dict)
    prefaulted: int = 0  # bytes of those buffers, counted against the orchestrator's PREFAULT_BUDGET
    # channel id -> the most memory owed for the MIGRATE_DATA tail of a port whose pre-copy took
    # over its buffer, faulted in (precopy.tail_room of it) once s1 asks whether this server is
    # prepared, before its last round: beside the first round, the faults took the pre-copy a
    # fifth of its rate (precopy._grow).
    tail_rooms: dict[int, int] = field(default_factory=dict)

    def take_buffer(self, channel_id: int, size: int) -> np.ndarray:
        job = self.buffers.pop(channel_id, None)
        if job is not None:
            # A prefault still under way (a short pre-migration) is waited for: a fresh buffer
            # beside it would fault every page again, in the downtime, while the prefault's own
            # pages stayed mapped until it ended: twice the body's memory, and slower.
            job.wait()
        buffer = job.get() if job is not None and job.successful() else None
        if buffer is not None and len(buffer) >= size:
            return buffer[:size]
        return np.empty(size, dtype=np.uint8)

    def fault_in_tail_rooms(self, hold: Callable[[Announcement, int], bool]) -> None:
        """Start faulting in the owed tail rooms (``tail_rooms``), each in a worker thread, as far
        as ``hold`` (MigrationManager.hold_for) finds memory for them in the budget. A tail
        without its room lands in fresh memory, as without a pre-copy."""
        pool = gevent.get_hub().threadpool
        for channel_id, most in self.tail_rooms.items():
            regions = [held for (cid, _), held in self.precopied.items() if cid == channel_id]
            room = tail_room(most, regions)
            if hold(self, room):
                self.buffers[channel_id] = pool.spawn(prefaulted, room)
            else:
                log.info("session %s port %d: no room in the memory budget for a %d-byte MIGRATE_DATA tail "
                         "ahead; it lands in memory taken as it arrives", session_label(self.session_id),
                         channel_id, room)
        self.tail_rooms.clear()

    def release(self) -> None:
        """The migration is over for this session: its prefaulted memory and saved state go."""
        self.buffers.clear()
        self.tail_rooms.clear()
        self.device_state.clear()
        self.precopied.clear()
        self.display = None
        self.session = None


class LandingMac:
    """The MAC of one port's large MIGRATE_DATA, computed while the body lands in ``buffer``
    (the array the reader received it into: state, then the trailer), so that once the last byte
    arrives only the last read's worth is left to hash, not the whole body. Pieces are fed one at a
    time, in order (a MAC is fed sequentially): in worker-thread jobs when its update lets go of
    the GIL, on the hub after each read otherwise (StateMac.in_thread)."""

    def __init__(self, mac: state_auth.StateMac, buffer: np.ndarray, progress: Callable[[], int]) -> None:
        self.buffer = buffer
        self._mac = mac
        self._progress = progress  # bytes of the body received so far
        self._end = len(buffer) - mac.trailer_size  # the trailer is compared, not hashed
        self._hashed = 0
        self.ahead = 0  # what was hashed before the last byte arrived
        self._worker: gevent.Greenlet[[], None] | None = None

    def landed(self) -> None:
        """More of the body arrived. A MAC that holds the GIL hashes it at once, on the hub, while
        the read's bytes are still in the cache (a step later they came back from memory, and
        s2 received some 10% slower); one that lets go of it, in a worker thread once a step's
        worth waits."""
        if not self._mac.in_thread:
            if (end := self._landed()) > self._hashed:
                self._mac.update(self.buffer[self._hashed : end].data)
                self._hashed = end
        elif (self._worker is None or self._worker.dead) and self._landed() - self._hashed >= LANDED_STEP:
            self._worker = gevent.spawn(self._catch_up)

    def holds(self, data: m.Data) -> bool:
        """Whether ``data`` is the body that landed in this buffer (and not another one)."""
        view = np.frombuffer(data, dtype=np.uint8)
        return len(view) == len(self.buffer) and view.ctypes.data == self.buffer.ctypes.data

    def finish(self) -> state_auth.StateMac:
        """The MAC fed the whole body: what is pending is waited for, what is left is hashed."""
        if self._worker is not None:
            self._worker.join()
        self.ahead = self._hashed
        rest = self.buffer[self._hashed : self._end].data
        if len(rest) >= AUTH_IN_THREAD and self._mac.in_thread:
            gevent.get_hub().threadpool.apply(self._mac.update, (rest,))
        else:
            self._mac.update(rest)
        self._hashed = self._end
        self._let_go()
        return self._mac

    def cancel(self) -> None:
        """The migration ended: a running job is the last."""
        self._end = self._hashed
        self._let_go()

    def _let_go(self) -> None:
        """Drop the body and the reader: the worker greenlet and this object point at each other,
        and a body left in that cycle (hundreds of MiB of an aborted transfer) would wait for the
        cyclic collector instead of going with its connection."""
        self.buffer = np.empty(0, dtype=np.uint8)
        self._progress = _nothing_landed
        self._worker = None

    def _landed(self) -> int:
        return min(self._progress(), self._end)

    def _catch_up(self) -> None:
        pool = gevent.get_hub().threadpool
        while (end := self._landed()) - self._hashed >= LANDED_STEP:
            pool.apply(self._mac.update, (self.buffer[self._hashed : end].data,))
            self._hashed = end


def _nothing_landed() -> int:
    return 0


def _landing_buffer(destination: weakref.ref[SessionDestination], handler: weakref.ref[PortConnection],
                    ann: Announcement, size: int) -> np.ndarray:
    """``SessionDestination.landing_buffer``, reached through weak references (see its caller)."""
    dest, port = destination(), handler()
    if dest is None or port is None:  # the link or the migration is gone: the body goes nowhere
        return np.empty(size, dtype=np.uint8)
    return dest.landing_buffer(port, ann, size)


class SessionDestination:
    """s2's side of one migrating session, from its MAIN link to MigrationCompleted."""

    def __init__(self, manager: MigrationManager, session: Session) -> None:
        self.manager = manager
        self.session = session
        self._machine: mig.DestinationMigration | None = None  # once main has linked
        self.links: dict[mig.Channel, PortConnection | GraphicsConnection] = {}
        self.times: dict[str, float] = {"linked": time.time()}
        self.restored = 0  # bytes restored from MIGRATE_DATA
        self.landing: dict[mig.Channel, LandingMac] = {}  # a port's MIGRATE_DATA being hashed as it lands
        self.hashed_ahead = 0  # bytes of MIGRATE_DATA bodies whose MAC was computed as they landed
        self._display_waiting: DisplayConnection | None = None  # DISPLAY_STATE_VERSION: started at _completed

    @property
    def machine(self) -> mig.DestinationMigration:
        if self._machine is None:
            raise LocalProtocolError(f"session {self.session.id:08x}: no main link yet, so no migration")
        return self._machine

    @property
    def main(self) -> MainConnection:
        if self.session.main is None:
            raise LocalProtocolError(f"session {self.session.id:08x} has no main connection")
        return self.session.main

    def main_linked(self) -> None:
        main = self.main
        main.arriving = True
        main.intercept = self._intercept_main
        ann = self.manager.announcements.get(self.session.id)
        direct = ann is not None and ann.display_direct
        self._machine = mig.DestinationMigration(
            self.session.id, main.client_caps, seamless_enabled=self.manager.seamless_enabled,
            main_init=main.main_init(),
            channel_flags={(ChannelType.DISPLAY, 0): DIRECT_DISPLAY_MIGRATE_FLAGS} if direct else None,
        )
        self._prepare_mac(MAIN)

    def port_linked(self, handler: PortConnection | GraphicsConnection) -> None:
        if self.machine.failed:
            handler.transport.close("this session's migration here has already failed")
            return
        channel = channel_of(handler)
        handler.parked = True
        handler.intercept = partial(self._intercept_port, channel)
        handler.on_closed = self._link_closed
        self.links[channel] = handler
        self._prepare_mac(channel)
        self._apply(self.machine.channel_linked(channel))

    def _prepare_mac(self, channel: mig.Channel) -> None:
        """The MAC of a channel's MIGRATE_DATA (a large port body's landing MAC too), made in
        pre-migration (MigrationKey.prepare), not in the downtime. A channel linked again after
        its MAC was taken gets none: its MIGRATE_DATA is refused when it comes."""
        ann = self.manager.announcements.get(self.session.id)
        if ann is not None and ann.state_key is not None:
            ann.state_key.prepare(self.session.id, channel)

    def release(self) -> None:
        """Unhook this migration from the session's connections. The hooks and the links form
        cycles (connection -> intercept -> this -> links -> connection); left in place, a closed
        connection's buffers, a half-received MIGRATE_DATA above all, would wait for the cyclic
        collector instead of going with it."""
        for handler in self.links.values():
            handler.intercept = None
            handler.on_closed = None
            if isinstance(handler, PortConnection):
                handler.on_bulk = None
        self.links.clear()
        for landing in self.landing.values():
            landing.cancel()
        self.landing.clear()
        if self.session.main is not None:
            self.session.main.intercept = None
        if self.session.migration is self:
            self.session.migration = None

    def in_flight_reported(self, channel_id: int) -> None:
        """s1 said (with the device state) how much the port holds now: a port already waiting
        for its MIGRATE_DATA waits for one up to the new bound."""
        handler = self.links.get(port_channel(channel_id))
        if isinstance(handler, PortConnection) and handler.waiting_for_migrate_data:
            self._expect_migrate_data(handler)

    def status(self) -> dict[str, Any]:
        return {"role": "destination", "state": self._machine.state.name if self._machine else "LINKING",
                "restored": self.restored,
                "hashed_ahead": self.hashed_ahead, "times": iso_times(self.times)}

    def _intercept_main(self, msg: m.Message) -> bool:
        if isinstance(msg, m.MsgcMigrateData):
            authentic = self._authentic(MAIN, msg)
            if authentic is None:
                return True
            msg = authentic
        self._apply(self._receive(MAIN, msg))
        return isinstance(msg, _DESTINATION_MAIN_MESSAGES)

    def _intercept_port(self, channel: mig.Channel, msg: m.Message) -> bool:
        if isinstance(msg, m.MsgcMigrateData):
            authentic = self._authentic(channel, msg)
            if authentic is None:
                return True
            with collector_paused():
                self._apply(self._receive(channel, authentic))
            return True
        self._apply(self._receive(channel, msg))  # raises for data before MIGRATE_DATA
        return False

    def _authentic(self, channel: mig.Channel, msg: m.MsgcMigrateData) -> m.MsgcMigrateData | None:
        """The MIGRATE_DATA without its trailer once its MAC is checked (state_auth), or None when
        it fails (a second one for the channel too): then the session fails here, nothing restored,
        and s1 takes it back. A large
        body is checked by a worker thread, so other sessions go on meanwhile; one received into
        the buffer prepared for it was hashed as it landed (LandingMac), and only its tail is left."""
        ann = self.manager.announcements.get(self.session.id)
        key = ann.state_key if ann is not None else None
        if key is None:
            return msg
        data = msg.data
        landing = self.landing.pop(channel, None)
        handler = self.links.get(channel)
        if isinstance(handler, PortConnection):
            handler.on_bulk = None
        try:
            if landing is not None and landing.holds(data):
                body = state_auth.opened(landing.finish(), data)
                self.hashed_ahead += landing.ahead
            else:
                mac = key.mac(self.session.id, channel)
                if len(data) >= AUTH_IN_THREAD and mac.in_thread:
                    body = gevent.get_hub().threadpool.apply(state_auth.unsealed, (mac, data))
                else:
                    body = state_auth.unsealed(mac, data)
        except state_auth.StateAuthError as err:
            what = "main" if channel == MAIN else f"channel {channel[0]}:{channel[1]}"
            self._fail(f"the MIGRATE_DATA of {what} failed authentication, nothing restored: {err}")
            return None
        return m.MsgcMigrateData(body)

    def _receive(self, channel: mig.Channel, msg: m.Message) -> list[mig.DestinationOutput]:
        try:
            return self.machine.receive(channel, msg)
        except PeerFault as err:
            # The connection that broke the migration reports the fault itself.
            self._fail(f"the client broke the migration: {err}")
            raise

    def _link_closed(self, handler: PortConnection | GraphicsConnection) -> None:
        """A port link ended before its state was restored here (a MIGRATE_DATA over its bound, the
        client gone, a broken socket): the session can no longer be restored whole, so it fails
        now rather than when s1 aborts it or its announcement expires."""
        landing = isinstance(handler, GraphicsConnection) and handler.waiting_for_landing
        if handler.parked or handler.waiting_for_migrate_data or landing:
            what = f"port {handler.port.channel_id}" if isinstance(handler, PortConnection) else handler.name
            self._fail(f"{what} closed before its state was restored")

    def _fail(self, reason: str) -> None:
        """The session cannot be restored here: all of it ends, and s1 learns why."""
        if self.session.migration is not self:
            return  # already ended
        self.manager.failed[self.session.id] = reason
        self.manager.end_announcement(self.session.id)
        log.warning("session %08x: %s", self.session.id, reason, extra=context(self.session.id))
        self.manager.server.metrics.migration("destination", None, "failed")
        self.release()
        self.session.close_ports(reason)
        if self.session.main is not None:
            self.session.main.transport.close(reason)

    def _apply(self, outputs: list[mig.DestinationOutput]) -> None:
        for item in outputs:
            if self.session.migration is not self:
                return  # it failed on the way (a pre-copy that does not match): nothing more happens
            match item:
                case mig.Send():
                    self.main.channel.send(item.message)  # s2 only ever writes on main
                    self.main.transport.flush()
                case mig.AttachChannel():
                    self._attach(self.links[item.channel], item.wait_for_migrate_data)
                case mig.RestoreMigrateData():
                    handler = self.links.get(item.channel)
                    if isinstance(handler, PortConnection):
                        self._restore_port(handler, item.data)
                    elif handler is not None:  # main has no state here: no guest agent, the empty MNMD
                        self._restore_graphics(handler, item.data)
                case mig.MigrationCompleted():
                    self._completed(item.mode)
                case _:
                    assert_never(item)

    def _attach(self, handler: PortConnection | GraphicsConnection, wait_for_data: bool) -> None:
        handler.parked = False
        if wait_for_data:
            # Read, but only MIGRATE_DATA may come, and it may be as large as the port's backlog.
            handler.waiting_for_migrate_data = True
            self._expect_migrate_data(handler)
        elif isinstance(handler, DisplayConnection) and self.machine.mode is mig.MigrationMode.SEAMLESS:
            # DISPLAY_STATE_VERSION: its record came in the device state; it starts from it once the
            # session has landed, when the screen runs here.
            handler.waiting_for_landing = True
            self._display_waiting = handler
        else:
            # A channel without state to transfer (the cursor): after a seamless switch the client
            # keeps it as it was and must get no second INIT; after a semi-seamless one it reset it.
            handler.start(announce=self.machine.mode is not mig.MigrationMode.SEAMLESS)
        handler.transport.resume_reading()

    def _expect_migrate_data(self, handler: PortConnection | GraphicsConnection) -> None:
        if isinstance(handler, GraphicsConnection):
            handler.channel.expect_migrate_data(GRAPHICS_MAX_MESSAGE)
            return
        cid = handler.port.channel_id
        ann = self.manager.announcements.get(self.session.id)
        # Weak: the reader keeps ``into`` until the body is whole, and a strong path from it back
        # to the connection would hold a half-received body in a cycle after its link closed.
        into = partial(_landing_buffer, weakref.ref(self), weakref.ref(handler), ann) if ann is not None else None
        in_flight = ann.in_flight.get(cid, 0) if ann is not None else 0
        # More than s1 said is a MessageTooLarge: the client's fault, and the end of this port's
        # link, never a buffer of whatever size it names.
        handler.channel.expect_migrate_data(migrate_data_limit(in_flight, handler.port.limits), into)

    def landing_buffer(self, handler: PortConnection, ann: Announcement, size: int) -> np.ndarray:
        """The memory a port's large MIGRATE_DATA lands in, its MAC computed as it fills."""
        buffer = ann.take_buffer(handler.port.channel_id, size)
        # take_buffer may wait for a prefault: a migration that ended meanwhile was released
        # already, and nothing would cancel a LandingMac made for it now.
        if ann.state_key is not None and size > ann.state_key.trailer_size and self.session.migration is self:
            channel = channel_of(handler)
            try:
                mac = ann.state_key.mac(self.session.id, channel)
            except state_auth.KeyReuse:
                return buffer  # a second body for the channel: _authentic refuses it once it is whole
            landing = LandingMac(mac, buffer[:size], handler.channel.bulk_progress)
            self.landing[channel] = landing
            handler.on_bulk = landing.landed
        return buffer

    def _restore_port(self, handler: PortConnection, data: mig.PortMigrateData) -> None:
        port, ch = handler.port, handler.channel
        pending_chunks, to_client_chunks = data.pending, data.to_client
        if data.precopy is not None:
            ann = self.manager.announcements.get(self.session.id)
            try:
                if ann is None:
                    raise PrecopyMismatch(f"port {port.channel_id}: MIGRATE_DATA names pre-copied bytes, and this "
                                          "server holds none for the session")
                pending_chunks, to_client_chunks = restore_precopy(ann, port.channel_id, data)
            except PrecopyMismatch as err:
                self._fail(f"the pre-copy does not match, nothing restored: {err}")
                return
        handler.waiting_for_migrate_data = False
        pending = sum(memoryview(c).nbytes for c in pending_chunks)
        to_client = sum(memoryview(c).nbytes for c in to_client_chunks)
        port.restore(pending_chunks, to_client_chunks, pending, to_client)
        ch.restore_migrated(serial_out=data.serial, ack_generation=data.ack_generation)
        self.restored += pending + to_client
        # No PORT_INIT: after a seamless switch the client keeps the port's name and state (spice-gtk
        # logs a critical for a second one, 5.9 item 8).
        handler.start(announce=False)

    def _restore_graphics(self, handler: GraphicsConnection, data: Any) -> None:
        """The display's place in its stream (the pixels came before, in the pre-copy and the
        delta), or the inputs' motion count and what the client typed while the screen was stopped."""
        state = handler.state
        handler.waiting_for_migrate_data = False
        if isinstance(data, graphics.DisplayMigrateData) and isinstance(handler, DisplayConnection):
            restore_display_channel(handler, data)
        elif isinstance(data, InputsState):
            state.motion_count = data.record.motion_count
            state.held.extend(data.held)
        else:
            raise LocalProtocolError(f"no restore for {type(data).__name__} on the {handler.name} channel")
        handler.start(announce=False)

    def _start_display(self, handler: DisplayConnection) -> None:
        """DISPLAY_STATE_VERSION: the display goes on from the record s1 sent in the device state.
        The client numbered on from its connection to s1 (full headers): its next serial is taken."""
        self._display_waiting = None
        handler.waiting_for_landing = False
        record = handler.state.migrated_channel
        if record is None:  # s1 had no display linked when it stopped: the client gets it anew
            log.warning("session %08x: no display record came with the device state; the display restarts",
                        self.session.id, extra=context(self.session.id))
        else:
            restore_display_channel(handler, record)
        handler.channel.adopt_peer_serials()
        handler.start(announce=False)

    def _completed(self, mode: mig.MigrationMode) -> None:
        self.times["completed"] = time.time()
        session = self.session
        if mode is mig.MigrationMode.SEAMLESS:
            # As spice-server's s2 does (5.4); spice-gtk also lets go of its s1 main connection
            # only once s2's main channel has said something.
            self.main.channel.send(m.MsgMainMultiMediaTime(multi_media_time()))
            self.main.transport.flush()
        self.main.arriving = False
        if self._display_waiting is not None:
            self._start_display(self._display_waiting)
        self.release()
        if session.display is not None:
            server = self.manager.server
            session.display.attach_to(session, server.config.server_name, server.listen_label)
            session.display.resume()  # the screen runs here now: held inputs, then the frames
        session.migrations.append({"role": "destination", "mode": mode_label(mode), "restored": self.restored,
                                   "hashed_ahead": self.hashed_ahead, "times": iso_times(self.times)})
        self.manager.completed[session.id] = session.migrations[-1]
        self.manager.end_announcement(session.id)  # live now: nothing of its migration may reach it
        server = self.manager.server
        server.metrics.migration("destination", mode_label(mode), "migrated")
        server.events.emit(events.MIGRATION_COMPLETED, session_id=session_label(session.id), role="destination",
                           mode=mode_label(mode), client=session.client, restored_bytes=self.restored)
        # s2 cannot see the downtime (it starts at s1's SPICE_MSG_MIGRATE): s1's line gives it.
        log.info("session %08x migrated here from %s: %s, %d bytes restored, %.3f ms after its main linked",
                 session.id, session.client, mode_label(mode), self.restored,
                 (self.times["completed"] - self.times["linked"]) * 1000, extra=context(session.id))
        # Only now, as a VM resumes on its destination once its migration completed: a device
        # consuming what the migration brought (a sink hashing hundreds of MiB, PUMP_TURN per hub
        # turn) would otherwise take turns of the hub from the landing.
        for port in session.ports.values():
            port.release_held()
