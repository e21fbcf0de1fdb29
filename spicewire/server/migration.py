"""Migration on the server side: the roles of protocol/migration.py wired to sessions and sockets.

- ``SessionSource`` (s1) drives one session's SourceMigration: BEGIN, the connect answer,
  SPICE_MSG_MIGRATE or MIGRATE_END, and MIGRATE_DATA streamed out of the session's buffers.
- ``SessionTarget`` (s2) drives one migrating session's DestinationMigration: parked links,
  DO_SEAMLESS, MIGRATE_DATA restored into the port buffers, MAIN_INIT after a semi-seamless END.
- ``MigrationManager`` (one per server) keeps the announcements s2 accepts migrating clients by,
  takes the device state s1 sends (the part of a VM migration QEMU would carry), and runs the
  whole migration of every session for ``POST /migrate`` and ``spicewire migrate``.

Order, as the issue and QEMU's lessons demand: announce to s2, BEGIN every session, wait for every
client's answer, and only then stop the devices, move their state and start post-migration. A
client that could not reach s2 simply stays on s1, its devices running.
"""

from __future__ import annotations

import gc
import json
import logging
import mmap
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import assert_never

import gevent
import gevent.event
import numpy as np
from gevent import socket

from spicewire import codec, devices
from spicewire.addresses import Address
from spicewire.errors import ProtocolError, SpiceError
from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.protocol.enums import ChannelType, Msg
from spicewire.server.session import PortConnection, PortState, Session, multi_media_time

log = logging.getLogger(__name__)

MAIN = mig.MAIN
MAX_MIGRATE_DATA = 0xFFFFFFFF
STREAM_MIGRATE_DATA = 1 << 20  # port MIGRATE_DATA at least this large is streamed segment by segment
_SOURCE_MESSAGES = (m.MsgcMainMigrateConnected, m.MsgcMainMigrateConnectedSeamless,
                    m.MsgcMainMigrateConnectError, m.MsgcMigrateFlushMark)
_TARGET_MAIN_MESSAGES = (m.MsgcMainMigrateDstDoSeamless, m.MsgcMainMigrateEnd, m.MsgcMigrateData)


class MigrationError(SpiceError):
    """A migration could not start or its servers could not talk to each other."""


def _port_channel(channel_id: int) -> mig.Channel:
    return (ChannelType.PORT, channel_id)


@contextmanager
def collector_paused():
    """For the downtime's bursts of small objects (a chunk list per MIGRATE_DATA): the cyclic
    collector would otherwise walk the whole heap in the middle of them, several ms in a big server."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --- s1 ----------------------------------------------------------------------------------------


class SessionSource:
    """s1's side of one session's migration."""

    def __init__(self, manager: MigrationManager, session: Session, timeout: float) -> None:
        self.manager = manager
        self.session = session
        self.ports = {cid: port for cid, port in session.ports.items() if port.connection is not None}
        channels = [MAIN, *(_port_channel(cid) for cid in self.ports)]
        self.machine = mig.SourceMigration(channels, session.main.client_caps, timeout=timeout)
        self.connected = gevent.event.AsyncResult()  # the ConnectComplete
        self.finished = gevent.event.Event()  # the client left s1 (or the attempt ended)
        self.times: dict[str, float] = {"begin": time.time()}
        self.moved = 0  # MIGRATE_DATA body bytes sent
        self.dropped = 0  # in-flight bytes a semi-seamless migration throws away
        self.error: str | None = None
        self.rolled_back = False
        self._timer: gevent.Greenlet | None = None
        self.pack_buffers: PackBuffers | None = None  # the migration's, for a big MIGRATE_DATA
        session.main.intercept = partial(self._intercept, MAIN)
        for cid, port in self.ports.items():
            port.connection.intercept = partial(self._intercept, _port_channel(cid))

    def begin(self, dst_info: m.MigrationDstInfo, mode: mig.MigrationMode) -> None:
        self._apply(self.machine.begin(dst_info, mode, time.monotonic()))

    def stop_devices(self) -> None:
        """The VM pauses: devices neither take nor make data; the sockets are still read."""
        for port in self.session.ports.values():
            port.device_stopped = True

    def resume_devices(self) -> None:
        for port in self.session.ports.values():
            port.device_stopped = False
            port.pump()
            port.flush_to_client()

    def finish(self, switch_host: bool = False) -> None:
        """Post-migration. ``switch_host`` (5.6): the client drops everything and links to s2 as a
        new session."""
        self.times["migrate_sent"] = time.time()
        if switch_host or self.machine.mode is mig.MigrationMode.SEMI_SEAMLESS:
            # 5.3: every channel is reset on the client; what sits in our buffers is lost.
            self.dropped = self.session.in_flight
        self._apply(self.machine.finish(time.monotonic(), switch_host=switch_host))

    def cancel(self, reason: str) -> None:
        self.error = reason
        # Nothing to cancel once post-migration has begun (that is a rollback) or the machine failed.
        if self.machine.allows(mig.SourceInput.CANCEL):
            self._apply(self.machine.cancel())
        self.detach()
        self.resume_devices()

    @property
    def can_roll_back(self) -> bool:
        """The protocol allows it (SourceMigration.can_roll_back) and the client still holds its
        connections here."""
        return self.machine.can_roll_back and not self.finished.is_set() and self.session.main is not None

    def roll_back(self, reason: str) -> None:
        """s2 failed before it had the session: resume it here as it was at SPICE_MSG_MIGRATE (the
        port buffers MIGRATE_DATA was built from are still ours) and send the client MIGRATE_CANCEL,
        which brings it back to its connections here."""
        self.error = f"rolled back: {reason}"
        self.rolled_back = True
        self._apply(self.machine.roll_back())
        connections = [self.session.main, *(p.connection for p in self.session.ports.values())]
        for conn in connections:
            if conn is not None:
                conn.channel.adopt_peer_serials()
        self.detach()
        self.resume_devices()
        log.warning("session %08x: migration rolled back: %s", self.session.id, reason)

    def detach(self) -> None:
        if self.session.main is not None:
            self.session.main.intercept = None
            self.session.main.frozen = False
        for port in self.session.ports.values():
            port.frozen = False
            if port.connection is not None:
                port.connection.intercept = None
        if self.session.migration is self:
            self.session.migration = None
        if self._timer is not None:
            self._timer.kill(block=False)
        self.finished.set()
        if not self.connected.ready():
            self.connected.set(mig.ConnectComplete(False, False))

    def client_gone(self) -> None:
        self.times["client_left"] = time.time()
        if self.machine.mode is mig.MigrationMode.SEMI_SEAMLESS and "migrate_sent" in self.times:
            # Whatever the client still wrote until it left is dropped as well.
            self.dropped = max(self.dropped, self.session.in_flight)
        if self.error is None and not self.connected.ready():
            self.error = "the client disconnected before answering"
        if not self.machine.failed:
            self._apply(self.machine.client_disconnected())
        self.detach()

    @property
    def switched(self) -> bool:
        """Post-migration is done on this side: END or every MIGRATE_DATA went out (or it ended)."""
        return self.finished.is_set() or self.machine.state in (
            mig.SourceState.WAIT_DISCONNECT, mig.SourceState.DONE, mig.SourceState.IDLE)

    def status(self) -> dict:
        return {"role": "source", "state": self.machine.state.name, "mode": _mode(self.machine.mode),
                "moved": self.moved, "dropped": self.dropped, "times": self.times, "error": self.error}

    # --- the machine's outputs ---------------------------------------------------------------

    def _intercept(self, channel: mig.Channel, msg: m.Message) -> bool:
        try:
            outputs = self.machine.receive(channel, msg)  # raises for anything after FLUSH_MARK
        except ProtocolError:
            self._arm_timer()  # the machine failed: it has no deadline left
            raise
        self._apply(outputs)
        return isinstance(msg, _SOURCE_MESSAGES)

    def _apply(self, outputs: list[mig.SourceOutput]) -> None:
        for item in outputs:
            match item:
                case mig.Send():
                    self._send(item.channel, item.message)
                case mig.ConnectComplete():
                    self.times["connected"] = time.time()
                    if not self.connected.ready():
                        self.connected.set(item)
                case mig.MigrateDataRequested():
                    self._send_migrate_data(item.channel)
                case mig.DisconnectClient():
                    if self.session.main is not None:
                        self.session.main.transport.close("the client did not leave after the migration")
                case _:
                    assert_never(item)
        self._arm_timer()

    def _send(self, channel: mig.Channel, msg: m.Message) -> None:
        if channel == MAIN:
            main = self.session.main
            if main is None:
                return
            main.channel.send(msg)
            main.frozen = main.frozen or isinstance(msg, m.MsgMigrate)
            main.transport.flush()
            return
        port = self.ports[channel[1]]
        if isinstance(msg, m.MsgMigrate):
            port.frozen = True  # device data queued from now on travels in MIGRATE_DATA
        if port.connection is not None:
            port.connection.channel.send(msg)
            port.connection.transport.flush()

    def _send_migrate_data(self, channel: mig.Channel) -> None:
        if channel == MAIN:
            body = mig.build_main_migrate_data()  # no guest agent: the empty MNMD of 6.2
            self.moved += len(body)
            self._apply(self.machine.send(MAIN, m.MsgMigrateData(body)))
            return
        port = self.ports[channel[1]]
        conn = port.connection
        if conn is None:
            return
        ch = conn.channel
        state = mig.PortMigrateData(
            ack_generation=ch.ack_generation, ack_window=ch.ack_window, serial=ch.serial_out + 1,
            client_serial=ch.serial_in, pending=list(port.to_device), to_client=list(port.to_client),
        )
        with collector_paused():
            writer = mig.PortMigrateDataWriter(state)
        self.moved += writer.size
        if writer.size < STREAM_MIGRATE_DATA:  # small: one frame, one write, the least latency
            body = b"".join(piece.tobytes() for piece in writer.segments())
            self._apply(self.machine.send(channel, m.MsgMigrateData(body)))
            return
        outputs = self.machine.migrate_data_streamed(channel)
        header = ch.send_streamed(Msg.MIGRATE_DATA, writer.size)  # with what was queued before it
        segments = pipelined_segments(writer, self.pack_buffers)
        conn.transport.send_stream(header, segments, len(header) + writer.size)
        self._apply(outputs)

    def _arm_timer(self) -> None:
        deadline = self.machine.get_timer()
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None
        if deadline is not None:
            self._timer = gevent.spawn_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.machine.handle_timer(time.monotonic()))


# --- s2 ----------------------------------------------------------------------------------------


@dataclass
class Announcement:
    """A session s1 said will migrate here: its id and the ports (and devices) it has."""

    session_id: int
    ports: list[tuple[int, str, str]]  # channel id, name, device kind
    expires: float  # time.monotonic()
    device_state: dict[int, list] = field(default_factory=dict)  # channel id -> saved chunks
    session: Session | None = None
    # Memory for each big port's MIGRATE_DATA, faulted in during pre-migration: fresh pages cost
    # more to touch than the bytes cost to receive, and the downtime should pay for neither.
    buffers: dict[int, gevent.event.AsyncResult] = field(default_factory=dict)

    def take_buffer(self, channel_id: int, size: int) -> np.ndarray:
        ready = self.buffers.pop(channel_id, None)
        if ready is not None and ready.ready() and ready.successful() and len(ready.value) >= size:
            return ready.value[:size]
        return np.empty(size, dtype=np.uint8)


def prefaulted(size: int) -> np.ndarray:
    """Anonymous memory the kernel maps in at once (MAP_POPULATE), in a worker thread."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, size, flags=flags), dtype=np.uint8)


PREFAULT_MIN = 4 << 20  # smaller backlogs are not worth a thread
LANDING_MARGIN = 0.5  # s
STATUS_TIMEOUT = 2.0  # for one "have they landed?" request to s2
UNREACHABLE_TRIES = 3  # consecutive refused status requests after which s2 counts as gone
MAX_PREPARED_STREAMS = 2  # s1 prepares segment buffers for this many big MIGRATE_DATA at once


class SessionTarget:
    """s2's side of one migrating session, from its MAIN link to MigrationCompleted."""

    def __init__(self, manager: MigrationManager, session: Session) -> None:
        self.manager = manager
        self.session = session
        self.machine: mig.DestinationMigration | None = None
        self.links: dict[mig.Channel, PortConnection] = {}
        self.times: dict[str, float] = {"linked": time.time()}
        self.restored = 0  # bytes restored from MIGRATE_DATA

    def main_linked(self) -> None:
        main = self.session.main
        main.target = True
        main.intercept = self._intercept_main
        self.machine = mig.DestinationMigration(
            self.session.id, main.client_caps, seamless_enabled=self.manager.seamless_enabled,
            main_init=main.main_init(),
        )

    def port_linked(self, handler: PortConnection) -> None:
        channel = _port_channel(handler.port.channel_id)
        handler.parked = True
        handler.intercept = partial(self._intercept_port, channel)
        self.links[channel] = handler
        self._apply(self.machine.channel_linked(channel))

    def status(self) -> dict:
        return {"role": "destination", "state": self.machine.state.name if self.machine else "LINKING",
                "restored": self.restored, "times": self.times}

    def _intercept_main(self, msg: m.Message) -> bool:
        self._apply(self.machine.receive(MAIN, msg))
        return isinstance(msg, _TARGET_MAIN_MESSAGES)

    def _intercept_port(self, channel: mig.Channel, msg: m.Message) -> bool:
        if isinstance(msg, m.MsgcMigrateData):
            with collector_paused():
                self._apply(self.machine.receive(channel, msg))
            return True
        self._apply(self.machine.receive(channel, msg))  # raises for data before MIGRATE_DATA
        return False

    def _apply(self, outputs: list[mig.DestinationOutput]) -> None:
        for item in outputs:
            match item:
                case mig.Send():
                    self.session.main.channel.send(item.message)  # s2 only ever writes on main
                    self.session.main.transport.flush()
                case mig.AttachChannel():
                    self._attach(self.links[item.channel], item.wait_for_migrate_data)
                case mig.RestoreMigrateData():
                    if item.channel != MAIN:  # no guest agent: main's state is the empty MNMD
                        self._restore_port(self.links[item.channel], item.data)
                case mig.MigrationCompleted():
                    self._completed(item.mode)
                case _:
                    assert_never(item)

    def _attach(self, handler: PortConnection, wait_for_data: bool) -> None:
        handler.parked = False
        if wait_for_data:
            # Read, but only MIGRATE_DATA may come, and it may be as large as the port's backlog.
            handler.waiting_for_migrate_data = True
            ann = self.manager.announcements.get(self.session.id)
            into = partial(ann.take_buffer, handler.port.channel_id) if ann is not None else None
            handler.channel.expect_migrate_data(MAX_MIGRATE_DATA, into)
        else:
            handler.start()
        handler.transport.resume_reading()

    def _restore_port(self, handler: PortConnection, data: mig.PortMigrateData) -> None:
        port, ch = handler.port, handler.channel
        handler.waiting_for_migrate_data = False
        pending, to_client = data.pending_size, data.to_client_size
        port.restore(data.pending, data.to_client, pending, to_client)
        ch.restore_migrated(serial_out=data.serial, ack_generation=data.ack_generation)
        self.restored += pending + to_client
        # No PORT_INIT: after a seamless switch the client keeps the port's name and state (spice-gtk
        # logs a critical for a second one, 5.9 item 8).
        handler.start(announce=False)
        port.pump()

    def _completed(self, mode: mig.MigrationMode) -> None:
        self.times["completed"] = time.time()
        session = self.session
        if mode is mig.MigrationMode.SEAMLESS:
            # As spice-server's s2 does (5.4); spice-gtk also lets go of its s1 main connection
            # only once s2's main channel has said something.
            session.main.channel.send(m.MsgMainMultiMediaTime(multi_media_time()))
            session.main.transport.flush()
        session.main.target = False
        session.main.intercept = None
        for handler in self.links.values():
            handler.intercept = None
        session.migration = None
        session.migrations.append({"role": "destination", "mode": _mode(mode), "restored": self.restored,
                                   "times": self.times})
        self.manager.completed[session.id] = session.migrations[-1]
        log.info("session %08x migrated here (%s), %d bytes restored", session.id, _mode(mode), self.restored)


# --- the manager --------------------------------------------------------------------------------


class MigrationManager:
    """One server's migrations, as source and as destination."""

    def __init__(self, server) -> None:
        self.server = server
        self.seamless_enabled = True
        self.announcements: dict[int, Announcement] = {}
        self.completed: dict[int, dict] = {}  # session id -> its last destination report
        self.failed: dict[int, str] = {}  # session id -> why its migration here broke off

    # --- destination -------------------------------------------------------------------------

    def announce(self, sessions: list[dict], ttl: float) -> int:
        expires = time.monotonic() + ttl
        for entry in sessions:
            sid = int(entry["session_id"])
            if sid == 0 or sid in self.server.sessions:
                raise MigrationError(f"session {sid:08x} cannot migrate here: it is in use")
            ports = [(int(p[0]), str(p[1]), str(p[2])) for p in entry["ports"]]
            for _, _, kind in ports:
                devices.factory(kind)  # unknown kinds fail the announcement, not the migration
            ann = self.announcements[sid] = Announcement(sid, ports, expires)
            self.completed.pop(sid, None)  # an earlier visit's report must not answer for this one
            self.failed.pop(sid, None)
            for port in entry["ports"]:
                in_flight = int(port[3]) if len(port) > 3 else 0
                if in_flight >= PREFAULT_MIN:
                    # Room for the SWPD framing around the bytes, and for what arrives until FLUSH_MARK.
                    size = int(in_flight * 1.02) + (4 << 20)
                    ann.buffers[int(port[0])] = gevent.get_hub().threadpool.spawn(prefaulted, size)
        return len(sessions)

    def expects(self, session_id: int) -> bool:
        ann = self.announcements.get(session_id)
        if ann is None or ann.session is not None:
            return False
        if time.monotonic() > ann.expires:
            del self.announcements[session_id]
            return False
        return True

    def target_session(self, session_id: int) -> Session | None:
        ann = self.announcements.get(session_id)
        if ann is None or ann.session is not None:
            return None
        limits = self.server.config.limits
        session = Session(
            id=session_id,
            ports={cid: PortState(cid, name, devices.factory(kind)(), limits) for cid, name, kind in ann.ports},
        )
        for cid, chunks in ann.device_state.items():
            session.ports[cid].device.restore(chunks)
        ann.session = session
        session.migration = SessionTarget(self, session)
        return session

    def target_main_linked(self, session: Session) -> None:
        session.migration.main_linked()

    def port_linked(self, session: Session, handler: PortConnection) -> None:
        if isinstance(session.migration, SessionTarget):
            session.migration.port_linked(handler)

    def receive_device_states(self, body) -> int:
        """The saved devices of announced sessions (``pack_device_states``)."""
        chunks = codec.unpack_chunks(body)
        index = json.loads(bytes(chunks[0]))
        # Every entry is checked before any is used: a batch is taken whole or not at all, and a
        # device never restores from chunks its index only promised.
        plan, pos = [], 1
        for entry in index:
            sid, cid, count = int(entry["session_id"]), int(entry["port"]), int(entry["chunks"])
            ann = self.announcements.get(sid)
            if ann is None:
                raise MigrationError(f"device state for session {sid:08x}, which was not announced")
            if cid not in {port[0] for port in ann.ports}:
                raise MigrationError(f"device state for port {cid} of session {sid:08x}, which has no such port")
            if count < 0 or pos + count > len(chunks):
                raise MigrationError(f"device state index promises {count} chunks at {pos}; the body holds {len(chunks)}")
            plan.append((ann, cid, [bytes(c) for c in chunks[pos : pos + count]]))
            pos += count
        if pos != len(chunks):
            raise MigrationError(f"device state body holds {len(chunks) - pos} chunks no index entry names")
        for ann, cid, saved in plan:
            ann.device_state[cid] = saved
            if ann.session is not None:
                ann.session.ports[cid].device.restore(saved)
        return len(plan)

    def session_ended(self, session: Session) -> None:
        if isinstance(session.migration, SessionSource):
            session.migration.client_gone()
        elif isinstance(session.migration, SessionTarget):
            log.warning("session %08x: the client left before its migration here completed", session.id)
            self.failed[session.id] = "the client left the destination before the migration completed"
            session.migration = None
        ann = self.announcements.get(session.id)
        if ann is not None and ann.session is session:
            del self.announcements[session.id]

    def abort(self, session_ids: list[int]) -> int:
        """s1 rolled these sessions back: end what exists of them here, forget their announcements."""
        aborted = 0
        for sid in session_ids:
            ann = self.announcements.pop(sid, None)
            session = ann.session if ann is not None else None
            if session is None or not isinstance(session.migration, SessionTarget):
                continue
            self.failed[sid] = "aborted by the source"
            session.close_ports("the source took the session back")
            if session.main is not None:
                session.main.transport.close("the source took the session back")
            aborted += 1
        return aborted

    # --- source: the whole migration ---------------------------------------------------------

    def migrate(
        self, to: tuple[str, int], to_control: tuple[str, int], mode: mig.MigrationMode, timeout: float = 30.0,
        to_token: str | None = None,
    ) -> dict:
        """Migrate every session to ``to``; returns the report ``spicewire migrate`` prints.

        Phases, in order: announce to s2, pre-migration (BEGIN, every client's answer), the device
        state, the switch, the landing. Whatever fails in any of them, and however, no session is
        left half migrated here (``_undo``): a later migration finds every session as it was."""
        started = time.time()
        sessions = [s for s in self.server.sessions.values() if s.main is not None and s.migration is None]
        peer = ControlClient(*to_control, token=to_token)
        sources: list[SessionSource] = []  # filled as they are made, so a failure finds them all
        announced = False
        try:
            self._announce(peer, sessions, timeout)
            announced = True
            ready, switch_host, deadline = self._pre_migrate(sessions, sources, to, mode, timeout)
            pre_migration = time.time() - started
            ready, moved_devices = self._move_device_states(peer, ready)
            for source in ready:
                source.finish()
            for source in switch_host:
                source.finish(switch_host=True)
            landed = self._land(peer, ready, deadline, timeout)
        except BaseException as err:
            reason = f"the migration failed: {type(err).__name__}: {err}"
            for source in sources:
                self._undo(source, reason)
            if announced and sessions and isinstance(err, Exception):
                self._forget_announced(peer, sessions)
            raise
        report: dict = {"to": str(Address(*to)), "mode_requested": _mode(mode), "sessions": []}
        if ready and len(landed) < len(ready):
            report["error"] = f"{len(ready) - len(landed)} sessions did not arrive on the destination in time"
        for source in sources:
            report["sessions"].append(self._session_report(source, landed.get(f"{source.session.id:08x}")))
        report.update(
            pre_migration_s=round(pre_migration, 6),
            total_s=round(time.time() - started, 6),
            device_state_bytes=moved_devices,
            migrated=sum(1 for s in report["sessions"] if s["migrated"]),
            switched_host=sum(1 for s in report["sessions"] if s["mode"] == "switch-host"),
            lost=sum(1 for s in report["sessions"] if (s["error"] or "").startswith("lost")),
            rolled_back=sum(1 for s in report["sessions"] if (s["error"] or "").startswith("rolled back")),
            stayed=sum(1 for s in report["sessions"] if not s["migrated"] and s["mode"] != "switch-host"
                       and not (s["error"] or "").startswith("lost")),
        )
        return report

    @staticmethod
    def _announce(peer: ControlClient, sessions: list[Session], timeout: float) -> None:
        try:
            peer.post_json("/migration/announce", {
                "ttl": timeout + 60,
                "sessions": [{"session_id": s.id, "ports": [[cid, p.name, p.device.kind, p.in_flight]
                                                            for cid, p in s.ports.items()]}
                             for s in sessions],
            })
        except OSError as err:
            raise MigrationError(f"cannot reach the destination's control API at {peer.address}: {err}") from None

    def _pre_migrate(
        self, sessions: list[Session], sources: list[SessionSource], to: tuple[str, int], mode: mig.MigrationMode,
        timeout: float,
    ) -> tuple[list[SessionSource], list[SessionSource], float]:
        """BEGIN every session and wait for every client's answer; returns the sessions whose client
        reached s2, those that can only switch host at the end, and the migration's deadline."""
        dst = m.MigrationDstInfo(port=to[1], sport=0, host=to[0], cert_subject=None)
        big = sum(1 for s in sessions for p in s.ports.values() if p.in_flight >= PackBuffers.SIZE)
        pack_buffers = PackBuffers(2 * min(big, MAX_PREPARED_STREAMS))
        for session in sessions:
            source = SessionSource(self, session, timeout)
            source.pack_buffers = pack_buffers
            session.migration = source
            sources.append(source)
            source.begin(dst, mode)
        # A client without SEMI_SEAMLESS_MIGRATE gets no BEGIN (5.1): it can only be told to
        # reconnect to s2 from scratch, at the end, losing its state (5.6).
        switch_host = [s for s in sources if s.machine.mode is mig.MigrationMode.SWITCH_HOST]
        deadline = time.monotonic() + timeout
        for source in sources:  # the machine answers ConnectComplete(False) at its own timeout
            if source not in switch_host:
                source.connected.wait(max(0.0, deadline - time.monotonic()) + 1.0)
        ready = [s for s in sources if s.connected.ready() and s.connected.value.success]
        for source in sources:
            if source not in ready and source not in switch_host:
                # Never a lossy fallback for a client that tried: it stays here, working.
                source.error = source.error or "the client could not connect to the destination"
                source.cancel(source.error)
        return ready, switch_host, deadline

    @staticmethod
    def _move_device_states(peer: ControlClient, ready: list[SessionSource]) -> tuple[list[SessionSource], int]:
        """Stop the devices (the VM pauses) and send their state to s2; a session whose state did
        not get there stays here. Returns the sessions that go on, and the bytes sent."""
        if not ready:
            return ready, 0
        for source in ready:
            source.stop_devices()
        state = pack_device_states(s.session for s in ready)
        try:
            peer.post_bytes("/migration/device-state", state)
        except (MigrationError, OSError) as err:
            for source in ready:
                source.cancel(f"device state could not reach the destination: {err}")
            return [], 0
        return ready, len(state)

    def _land(self, peer: ControlClient, ready: list[SessionSource], deadline: float, timeout: float) -> dict:
        """Wait until s2 has every session; roll back those it did not take. Returns s2's reports
        of the sessions that landed, by hex id."""
        # Decide before the machines' own post-migration timers would disconnect the clients: a
        # session that did not land can still be taken back then.
        timers = [t for t in (s.machine.get_timer() for s in ready) if t is not None]
        landing = min([time.monotonic() + timeout, *(t - LANDING_MARGIN for t in timers)])
        answers = self._wait_landed(peer, ready, landing) if ready else {}
        landed = {sid: entry for sid, entry in answers.items() if "failed" not in entry}
        rolled_back = []
        for source in ready:
            sid = f"{source.session.id:08x}"
            if sid not in landed and source.can_roll_back:
                why = answers.get(sid, {}).get("failed") or "the destination did not take the session in time"
                source.roll_back(why)
                rolled_back.append(sid)
        if rolled_back:
            try:
                peer.post_json("/migration/abort", {"sessions": rolled_back}, timeout=STATUS_TIMEOUT)
            except (MigrationError, OSError) as err:
                log.info("could not tell the destination to drop %d sessions: %s", len(rolled_back), err)
        for source in ready:
            main = source.session.main
            if f"{source.session.id:08x}" in landed and main is not None:
                # It lives on s2 now; a client still holding an s1 socket has no use for it.
                main.transport.close("the session migrated away")
        for source in ready:  # their final counts (what a semi-seamless switch dropped) come at the end
            source.finished.wait(max(0.0, min(1.0, deadline + timeout - time.monotonic())))
        return landed

    @staticmethod
    def _undo(source: SessionSource, reason: str) -> None:
        """Give a session back to s1 after a failure anywhere in the migration: cancelled before
        post-migration, rolled back after it where a seamless switch still can be. A session whose
        client was already sent away (END, or MIGRATE_DATA it can no longer take back) is left to
        its machine, whose timer disconnects a client that does not leave."""
        if source.session.migration is not source:
            return  # already over: cancelled, rolled back, or its client left
        try:
            if source.can_roll_back:
                source.roll_back(reason)
                return
            if "migrate_sent" not in source.times:
                source.cancel(reason)
                return
        except Exception:
            log.exception("session %08x: the migration could not be undone cleanly; detaching it", source.session.id)
            source.error = source.error or reason
            source.detach()
            source.resume_devices()

    @staticmethod
    def _forget_announced(peer: ControlClient, sessions: list[Session]) -> None:
        """s2 may hold announcements (and half sessions) of a migration that failed here."""
        ids = [f"{s.id:08x}" for s in sessions]
        try:
            peer.post_json("/migration/abort", {"sessions": ids}, timeout=STATUS_TIMEOUT)
        except (MigrationError, OSError) as err:
            log.info("could not tell the destination to drop %d announced sessions: %s", len(ids), err)

    @staticmethod
    def _wait_landed(peer: ControlClient, sources: list[SessionSource], deadline: float) -> dict:
        """Ask the destination until every session has completed there or the deadline passed."""
        ids = ",".join(f"{s.session.id:08x}" for s in sources)
        landed: dict = {}
        # Asking s2 costs it CPU right when it restores; ask once everything has left here.
        while not all(s.switched for s in sources) and time.monotonic() < deadline:
            gevent.sleep(0.001)
        delay, unreachable = 0.002, 0
        while True:
            try:
                # A short timeout: a destination that hangs must not outlast the deadline.
                wait = min(STATUS_TIMEOUT, max(0.2, deadline - time.monotonic()))
                landed = peer.get_json(f"/migration/completed?ids={ids}", timeout=wait)
                unreachable = 0
            except MigrationError as err:
                log.warning("cannot ask the destination how the migration went: %s", err)
            except OSError as err:
                unreachable += 1
                log.warning("cannot ask the destination how the migration went: %s", err)
                if unreachable >= UNREACHABLE_TRIES:  # gone: what has not landed never will
                    return {sid: {"failed": f"the destination is unreachable: {err}"}
                            for sid in (f"{s.session.id:08x}" for s in sources) if sid not in landed} | landed
            if len(landed) == len(sources) or time.monotonic() > deadline:
                return landed
            if all(s.finished.is_set() for s in sources):
                delay = 0.05  # every client left s1; a late one on s2 is all that can change
            gevent.sleep(delay)
            delay = min(delay * 2, 0.05)

    @staticmethod
    def _session_report(source: SessionSource, landed: dict | None) -> dict:
        times = source.times
        switched_host = source.machine.mode is mig.MigrationMode.SWITCH_HOST and "migrate_sent" in times
        entry = {
            "session_id": f"{source.session.id:08x}",
            "migrated": landed is not None,
            "mode": landed["mode"] if landed else ("switch-host" if switched_host else None),
            "in_flight_bytes_moved": source.moved,
            "bytes_dropped": source.dropped,
            "error": source.error,
        }
        if "connected" in times:
            entry["pre_migration_s"] = round(times["connected"] - times["begin"], 6)
        if not landed and "migrate_sent" in times and "client_left" in times and not switched_host:
            entry["error"] = entry["error"] or "lost: the client left the source but never arrived on the destination"
        if landed and "migrate_sent" in times:
            entry["downtime_s"] = round(landed["times"]["completed"] - times["migrate_sent"], 6)
            entry["total_s"] = round(landed["times"]["completed"] - times["begin"], 6)
        return entry


class PackBuffers:
    """Segment buffers for pipelined_segments, faulted in by worker threads during pre-migration:
    fresh pages cost this machine about as much to touch as to fill (some 2 ms per MiB), and the
    downtime should pay for neither. One migration's; buffers go back here after each stream."""

    SIZE = mig.SWPD_SEGMENT  # a container is at most this large unless one chunk is larger

    def __init__(self, count: int = 0) -> None:
        pool = gevent.get_hub().threadpool
        self._free = [pool.spawn(prefaulted, self.SIZE) for _ in range(count)]

    def take(self, size: int) -> np.ndarray:
        while self._free:
            job = self._free.pop()
            if job.ready() and job.successful() and len(job.value) >= size:
                return job.value
        return np.empty(size, dtype=np.uint8)

    def give_back(self, buffer: np.ndarray) -> None:
        if len(buffer) == self.SIZE:
            done = gevent.event.AsyncResult()
            done.set(buffer)
            self._free.append(done)


def pipelined_segments(writer: mig.PortMigrateDataWriter, spare: PackBuffers | None = None):
    """The writer's segments, each packed in a worker thread into one of two buffers while the one
    before it is being sent: pack_chunks copies without the GIL, so the copy and the socket overlap
    instead of taking turns. A segment is asked for only once the previous one is sent, so the
    buffer being packed is never the one on the wire."""
    yield np.frombuffer(writer.header, dtype=np.uint8)
    pool = gevent.get_hub().threadpool
    spare = spare or PackBuffers()
    buffers = [spare.take(writer.largest_container) for _ in range(2)]
    try:
        groups = writer.chunk_groups()
        job = pool.spawn(codec.pack_chunks, next(groups), buffers[0])
        turn = 0
        for group in groups:
            packed = job.get()
            turn ^= 1
            job = pool.spawn(codec.pack_chunks, group, buffers[turn])
            yield packed
        yield job.get()
    finally:
        for buffer in buffers:
            spare.give_back(buffer)


def _mode(mode: mig.MigrationMode | None) -> str | None:
    return None if mode is None else mode.label


def pack_device_states(sessions) -> bytes:
    """Every port device of ``sessions``, saved, in one codec container: chunk 0 is a JSON index
    ``[{"session_id", "port", "chunks"}]``, the saved chunks follow in index order."""
    index, chunks = [], []
    for session in sessions:
        for cid, port in session.ports.items():
            saved = port.device.save()
            index.append({"session_id": session.id, "port": cid, "chunks": len(saved)})
            chunks.extend(saved)
    return codec.pack_chunks([json.dumps(index).encode(), *chunks]).tobytes()


class ControlClient:
    """A minimal HTTP/1.1 client for another server's control API, on gevent sockets (so two
    servers in one process can talk without monkey-patching)."""

    def __init__(self, host: str, port: int, token: str | None = None, timeout: float = 30.0) -> None:
        self.host, self.port, self.token, self.timeout = host, port, token, timeout

    @property
    def address(self) -> str:
        return str(Address(self.host, self.port))

    def get_json(self, path: str, timeout: float | None = None):
        return self._request("GET", path, b"", "application/json", timeout)

    def post_json(self, path: str, body, timeout: float | None = None) -> dict:
        return self._request("POST", path, json.dumps(body).encode(), "application/json", timeout)

    def post_bytes(self, path: str, body: bytes):
        return self._request("POST", path, body, "application/octet-stream")

    def _request(self, method: str, path: str, body: bytes, content_type: str, timeout: float | None = None):
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.address}", "Connection: close",
                f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        if self.token:
            head.append(f"Authorization: Bearer {self.token}")
        with socket.create_connection((self.host, self.port), timeout=timeout or self.timeout) as sock:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            data = bytearray()
            while chunk := sock.recv(65536):
                data += chunk
        status_line, _, rest = bytes(data).partition(b"\r\n")
        _, _, payload = rest.partition(b"\r\n\r\n")
        try:
            status = int(status_line.split()[1])
            answer = json.loads(payload) if payload.strip() else None
        except (IndexError, ValueError) as err:
            raise MigrationError(f"{method} {path}: unreadable answer from {self.address}: {err}") from None
        if status != 200:
            message = answer.get("error") if isinstance(answer, dict) else payload[:200]
            raise MigrationError(f"{method} {path} on {self.address}: {status} {message}")
        return answer
