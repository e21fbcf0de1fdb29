"""s2's side of one migrating session, from its MAIN link to MigrationCompleted: parked links,
DO_SEAMLESS, MIGRATE_DATA restored into the port buffers, MAIN_INIT after a semi-seamless END."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, assert_never

import gevent
import gevent.event
import numpy as np

from spicewire.errors import LocalProtocolError, PeerFault
from spicewire.logs import context, iso_times, session_label
from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.server import events
from spicewire.server.migration.common import MAIN, collector_paused, mode_label, port_channel
from spicewire.server.session import MainConnection, PortConnection, Session, multi_media_time

if TYPE_CHECKING:
    from spicewire.server.migration.orchestrator import MigrationManager

log = logging.getLogger(__name__)

MAX_MIGRATE_DATA = 0xFFFFFFFF
PREFAULT_MIN = 4 << 20  # smaller backlogs are not worth a thread
_DESTINATION_MAIN_MESSAGES = (m.MsgcMainMigrateDstDoSeamless, m.MsgcMainMigrateEnd, m.MsgcMigrateData)


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
    buffers: dict[int, gevent.event.AsyncResult[np.ndarray]] = field(default_factory=dict)

    def take_buffer(self, channel_id: int, size: int) -> np.ndarray:
        job = self.buffers.pop(channel_id, None)
        buffer = job.get() if job is not None and job.ready() and job.successful() else None
        if buffer is not None and len(buffer) >= size:
            return buffer[:size]
        return np.empty(size, dtype=np.uint8)


class SessionDestination:
    """s2's side of one migrating session, from its MAIN link to MigrationCompleted."""

    def __init__(self, manager: MigrationManager, session: Session) -> None:
        self.manager = manager
        self.session = session
        self._machine: mig.DestinationMigration | None = None  # once main has linked
        self.links: dict[mig.Channel, PortConnection] = {}
        self.times: dict[str, float] = {"linked": time.time()}
        self.restored = 0  # bytes restored from MIGRATE_DATA

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
        self._machine = mig.DestinationMigration(
            self.session.id, main.client_caps, seamless_enabled=self.manager.seamless_enabled,
            main_init=main.main_init(),
        )

    def port_linked(self, handler: PortConnection) -> None:
        if self.machine.failed:
            handler.transport.close("this session's migration here has already failed")
            return
        channel = port_channel(handler.port.channel_id)
        handler.parked = True
        handler.intercept = partial(self._intercept_port, channel)
        self.links[channel] = handler
        self._apply(self.machine.channel_linked(channel))

    def status(self) -> dict[str, Any]:
        return {"role": "destination", "state": self._machine.state.name if self._machine else "LINKING",
                "restored": self.restored, "times": iso_times(self.times)}

    def _intercept_main(self, msg: m.Message) -> bool:
        self._apply(self._receive(MAIN, msg))
        return isinstance(msg, _DESTINATION_MAIN_MESSAGES)

    def _intercept_port(self, channel: mig.Channel, msg: m.Message) -> bool:
        if isinstance(msg, m.MsgcMigrateData):
            with collector_paused():
                self._apply(self._receive(channel, msg))
            return True
        self._apply(self._receive(channel, msg))  # raises for data before MIGRATE_DATA
        return False

    def _receive(self, channel: mig.Channel, msg: m.Message) -> list[mig.DestinationOutput]:
        try:
            return self.machine.receive(channel, msg)
        except PeerFault as err:
            # The client broke the migration: the session cannot be restored here. All of it ends
            # (the connection that broke it reports the fault), and s1 learns it failed.
            reason = f"the client broke the migration: {err}"
            self.manager.failed[self.session.id] = reason
            log.warning("session %08x: %s", self.session.id, reason, extra=context(self.session.id))
            self.manager.server.metrics.migration("destination", None, "failed")
            self.session.close_ports(reason)
            self.main.transport.close(reason)
            raise

    def _apply(self, outputs: list[mig.DestinationOutput]) -> None:
        for item in outputs:
            match item:
                case mig.Send():
                    self.main.channel.send(item.message)  # s2 only ever writes on main
                    self.main.transport.flush()
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
            self.main.channel.send(m.MsgMainMultiMediaTime(multi_media_time()))
            self.main.transport.flush()
        self.main.arriving = False
        self.main.intercept = None
        for handler in self.links.values():
            handler.intercept = None
        session.migration = None
        session.migrations.append({"role": "destination", "mode": mode_label(mode), "restored": self.restored,
                                   "times": iso_times(self.times)})
        self.manager.completed[session.id] = session.migrations[-1]
        server = self.manager.server
        server.metrics.migration("destination", mode_label(mode), "migrated")
        server.events.emit(events.MIGRATION_COMPLETED, session_id=session_label(session.id), role="destination",
                           mode=mode_label(mode), client=session.client, restored_bytes=self.restored)
        # s2 cannot see the downtime (it starts at s1's SPICE_MSG_MIGRATE): s1's line gives it.
        log.info("session %08x migrated here from %s: %s, %d bytes restored, %.3f ms after its main linked",
                 session.id, session.client, mode_label(mode), self.restored,
                 (self.times["completed"] - self.times["linked"]) * 1000, extra=context(session.id))
