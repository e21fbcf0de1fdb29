"""s1's side of one session's migration: BEGIN, the connect answer, SPICE_MSG_MIGRATE or
MIGRATE_END, and MIGRATE_DATA streamed out of the session's buffers."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from functools import partial
from typing import assert_never

import gevent
import gevent.event

from spicewire import codec
from spicewire.errors import MigrationError, ProtocolError
from spicewire.logs import context, iso_times, session_label
from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.protocol import state_auth
from spicewire.protocol.enums import MigrateFlags, Msg
from spicewire.server.display import (
    DIRECT_DISPLAY_MIGRATE_FLAGS,
    DISPLAY_MIGRATE_FLAGS,
    DisplayConnection,
    GraphicsConnection,
    Precopy,
    display_migrate_data,
    inputs_migrate_data,
)
from spicewire.server.migration.common import MAIN, channel_of, collector_paused, mode_label, port_channel
from spicewire.server.migration.precopy import PortPrecopy
from spicewire.server.session import PortConnection, Session

log = logging.getLogger(__name__)

STREAM_MIGRATE_DATA = 1 << 20  # port MIGRATE_DATA at least this large is streamed segment by segment
_SOURCE_MESSAGES = (m.MsgcMainMigrateConnected, m.MsgcMainMigrateConnectedSeamless,
                    m.MsgcMainMigrateConnectError, m.MsgcMigrateFlushMark)


def _round_trip_first(item: mig.SourceOutput) -> int:
    """Sort key: 0 for a MIGRATE that asks the client for a FLUSH_MARK, 1 for anything else."""
    if isinstance(item, mig.Send) and isinstance(item.message, m.MsgMigrate):
        return 0 if item.message.flags & MigrateFlags.NEED_FLUSH else 1
    return 1


class SessionSource:
    """s1's side of one session's migration."""

    def __init__(self, session: Session, timeout: float, display_direct: bool = False) -> None:
        main = session.main
        if main is None:
            raise MigrationError(f"session {session.id:08x} has no main channel to migrate")
        self.session = session
        self.ports = {cid: port for cid, port in session.ports.items() if port.connection is not None}
        display = session.display
        # The display's channels that are up: spice-gtk links them all, a program may link some.
        self.graphics: dict[mig.Channel, GraphicsConnection] = {
            (conn.channel_type, 0): conn for conn in (display.connections if display is not None else ()) if conn.live}
        channels = [MAIN, *self.graphics, *(port_channel(cid) for cid in self.ports)]
        # display_direct (s2 agreed to DISPLAY_STATE_VERSION): the display's record goes in the
        # device state, and its MIGRATE only switches it.
        self.display_direct = display_direct
        flags = {ch: self._display_flags for ch, conn in self.graphics.items() if isinstance(conn, DisplayConnection)}
        self.machine = mig.SourceMigration(channels, main.client_caps, channel_flags=flags, timeout=timeout)
        self.connected: gevent.event.AsyncResult[mig.ConnectComplete] = gevent.event.AsyncResult()
        self.finished = gevent.event.Event()  # the client left s1 (or the attempt ended)
        self.times: dict[str, float] = {"begin": time.time()}
        self.moved = 0  # MIGRATE_DATA body bytes sent
        self.dropped = 0  # in-flight bytes a semi-seamless migration throws away
        self.error: str | None = None
        self.rolled_back = False
        self.not_landed: str | None = None  # why s2 did not report it landed, once the client had left s1
        self._timer: gevent.Greenlet | None = None
        self._timer_at: float | None = None  # the deadline _timer fires at
        main.intercept = partial(self._intercept, MAIN)
        for cid, port in self.ports.items():
            if port.connection is not None:  # all of them: self.ports holds only connected ports
                port.connection.intercept = partial(self._intercept, port_channel(cid))
        for channel, conn in self.graphics.items():
            conn.intercept = partial(self._intercept, channel)
        self.precopy: Precopy | None = None  # the picture as the pre-copy sent it to s2
        self.state_key: state_auth.MigrationKey | None = None  # the migration's: every MIGRATE_DATA gets its MAC
        self.port_precopies: dict[int, PortPrecopy] = {}  # by channel id: the ports s2 holds pre-copied bytes of

    def channel_linked(self, handler: PortConnection | GraphicsConnection) -> None:
        """A channel the client linked to this session after its migration began: spice-gtk links
        a port channel it learned of late, here and to s2, and s2 then waits for its MIGRATE_DATA.
        Until the switch it migrates with the others; after, that link is closed."""
        channel = channel_of(handler)
        if not self.machine.takes_channels or channel in self.machine.channels:
            handler.transport.close("the session is switching to another server")
            return
        flags = self._display_flags if isinstance(handler, DisplayConnection) else None
        self._apply(self.machine.channel_linked(channel, flags))
        if isinstance(handler, PortConnection):
            self.ports[handler.port.channel_id] = handler.port
        else:
            self.graphics[channel] = handler
        handler.intercept = partial(self._intercept, channel)

    @property
    def _display_flags(self) -> int:
        """The display channel's MIGRATE flags: with display_direct its record is in the device
        state, and its MIGRATE only switches it."""
        return DIRECT_DISPLAY_MIGRATE_FLAGS if self.display_direct else DISPLAY_MIGRATE_FLAGS

    @property
    def connect_succeeded(self) -> bool:
        """The client answered BEGIN with CONNECTED (or CONNECTED_SEAMLESS)."""
        complete = self.connected.get(block=False) if self.connected.ready() else None
        return complete is not None and complete.success

    def begin(self, dst_info: m.MigrationDstInfo, mode: mig.MigrationMode) -> None:
        self._apply(self.machine.begin(dst_info, mode, time.monotonic()))

    def stop_devices(self) -> None:
        """The VM pauses: devices neither take nor make data; the sockets are still read."""
        for port in self.session.ports.values():
            port.stop_device()
        if self.session.display is not None:
            self.session.display.stop()
        # Every channel's MAC (a port's streamed body too) is set up now, none in the downtime.
        if self.state_key is not None:
            for channel in (MAIN, *self.graphics, *(port_channel(cid) for cid in self.ports)):
                self.state_key.prepare(self.session.id, channel)

    def display_record(self) -> bytes | None:
        """The display channel's record for the device state (DISPLAY_STATE_VERSION), made once
        the devices stopped; None without a direct display."""
        if not self.display_direct:
            return None
        for conn in self.graphics.values():
            if isinstance(conn, DisplayConnection):
                return display_migrate_data(conn.state, conn.channel)
        return None

    def resume_devices(self) -> None:
        for port in self.session.ports.values():
            port.resume_device()
        if self.session.display is not None:
            self.session.display.resume()

    def finish(self, switch_host: bool = False) -> None:
        """Post-migration. ``switch_host`` (5.6): the client drops everything and links to s2 as a
        new session."""
        self.times["migrate_sent"] = time.time()
        if switch_host or self.machine.mode is mig.MigrationMode.SEMI_SEAMLESS:
            # 5.3: every channel is reset on the client; what sits in our buffers is lost.
            self.dropped = self.session.in_flight
        # Stable: the MIGRATEs asking for a FLUSH_MARK (main, inputs) go out first. Each starts a
        # round trip through the client, which reads its sockets in turn: behind the display's and
        # the cursor's MIGRATE, the inputs' waited ~0.5 ms there.
        self._apply(sorted(self.machine.finish(time.monotonic(), switch_host=switch_host), key=_round_trip_first))

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
        connections = [self.session.main, *(p.connection for p in self.session.ports.values()),
                       *self.graphics.values()]
        for conn in connections:
            if conn is not None:
                conn.channel.adopt_peer_serials()
        self.detach()
        self.resume_devices()
        log.warning("session %08x: migration rolled back: %s", self.session.id, reason, extra=context(self.session.id))

    def detach(self) -> None:
        if self.session.main is not None:
            self.session.main.intercept = None
            self.session.main.frozen = False
        for port in self.session.ports.values():
            port.frozen = False
            if port.connection is not None:
                port.connection.intercept = None
        for conn in self.graphics.values():
            conn.intercept = None
        self.precopy = None
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
        return {"role": "source", "state": self.machine.state.name, "mode": mode_label(self.machine.mode),
                "moved": self.moved, "dropped": self.dropped, "times": iso_times(self.times), "error": self.error}

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
        due: list[mig.Channel] = []
        for item in outputs:
            match item:
                case mig.Send():
                    self._send(item.channel, item.message)
                case mig.ConnectComplete():
                    self.times["connected"] = time.time()
                    if not self.connected.ready():
                        self.connected.set(item)
                case mig.MigrateDataRequested():
                    due.append(item.channel)
                case mig.DisconnectClient():
                    if self.session.main is not None:
                        self.session.main.transport.close("the client did not leave after the migration")
                case _:
                    assert_never(item)
        # Data due with its MIGRATE (the display's) is made once the other channels' MIGRATEs of
        # the batch are out: the client starts on those while it is built.
        for channel in due:
            self._send_migrate_data(channel)
        self._arm_timer()

    def _send(self, channel: mig.Channel, msg: m.Message) -> None:
        # flush_now: the client answers each channel's MIGRATE and relays its MIGRATE_DATA as it
        # comes, so each one written in this turn, not after the writers' turns, shortens the downtime.
        if channel == MAIN:
            main = self.session.main
            if main is None:
                return
            main.channel.send(msg)
            main.frozen = main.frozen or isinstance(msg, m.MsgMigrate)
            main.transport.flush_now()
            return
        if channel in self.graphics:
            graphics = self.graphics[channel]
            if isinstance(msg, m.MsgMigrate):
                graphics.state.frozen.add(graphics.channel_type)  # nothing but its MIGRATE_DATA may follow
            graphics.channel.send(msg)
            graphics.transport.flush_now()
            return
        port = self.ports[channel[1]]
        if isinstance(msg, m.MsgMigrate):
            port.frozen = True  # device data queued from now on travels in MIGRATE_DATA
        if port.connection is not None:
            port.connection.channel.send(msg)
            port.connection.transport.flush_now()

    def _sealed(self, channel: mig.Channel, *pieces: bytes | memoryview) -> bytes:
        """The body of ``pieces``, joined once, with its MAC trailer when s2 checks one."""
        if self.state_key is None:
            return b"".join(pieces)
        mac = self.state_key.mac(self.session.id, channel)
        for piece in pieces:
            mac.update(piece)
        return b"".join([*pieces, mac.trailer()])

    def _send_migrate_data(self, channel: mig.Channel) -> None:
        if channel == MAIN:
            body = mig.build_main_migrate_data()  # no guest agent: the empty MNMD of 6.2
            self.moved += len(body)
            self._apply(self.machine.send(MAIN, m.MsgMigrateData(self._sealed(MAIN, body))))
            return
        if channel in self.graphics:
            graphics = self.graphics[channel]
            body = (display_migrate_data(graphics.state, graphics.channel) if isinstance(graphics, DisplayConnection)
                    else inputs_migrate_data(graphics.state))
            self.moved += len(body)
            self._apply(self.machine.send(channel, m.MsgMigrateData(self._sealed(channel, body))))
            return
        port = self.ports[channel[1]]
        conn = port.connection
        if conn is None:
            return
        ch = conn.channel
        record = mig.PortMigrateData(ack_generation=ch.ack_generation, ack_window=ch.ack_window,
                                     serial=ch.serial_out + 1, client_serial=ch.serial_in)
        precopy = self.port_precopies.get(channel[1])
        # With a pre-copy, s2 holds most of the queues and only what follows goes here, taken
        # from the queues' ends (PortPrecopy.state): a list of a GiB queue's 16,000 views cost
        # the downtime ~0.4 ms for nothing.
        state = (precopy.state(record) if precopy is not None
                 else replace(record, pending=list(port.to_device), to_client=list(port.to_client)))
        with collector_paused():
            writer = mig.PortMigrateDataWriter(state)
        self.moved += writer.size
        if writer.size < STREAM_MIGRATE_DATA:  # small: one frame, one write, the least latency
            # The queue's chunks as views (small ones joined), copied once into the frame's body.
            pieces = [writer.header, *(piece for batch in writer.gathered(GATHER_BATCH) for piece in batch)]
            self._apply(self.machine.send(channel, m.MsgMigrateData(self._sealed(channel, *pieces))))
            return
        outputs = self.machine.migrate_data_streamed(channel)
        mac = None if self.state_key is None else self.state_key.mac(self.session.id, channel)
        size = writer.size + (0 if mac is None else mac.trailer_size)
        header = ch.send_streamed(Msg.MIGRATE_DATA, size)  # with what was queued before it
        conn.transport.send_stream(header, gathered_segments(writer, mac), len(header) + size)
        self._apply(outputs)

    def _arm_timer(self) -> None:
        deadline = self.machine.get_timer()
        if self._timer is not None and self._timer_at == deadline and not self.finished.is_set():
            return  # armed for it already: each channel's switch runs this, under one deadline
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = gevent.spawn_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.machine.handle_timer(time.monotonic()))


GATHER_BATCH = 256 << 10
"""Bytes of queue views per sendmsg in gathered_segments. The MAC reads each batch right after the
socket copied it: the batch and the copy's buffers (512 KiB) are still in the core's cache then.
A MAC read first, from memory, of 1 MiB batches ran at half the rate of a pass over the same bytes
alone (0.45-0.52 s per GiB on s1 in a 1 GiB fallback, on an Intel Xeon VM, against 0.2 s); after
the send, in 256 KiB batches, 0.26 s, and the fallback's downtime fell in 10 of 12 pairs (median
1.08 -> 0.99 s and 1.13 -> 1.08 s in two series of six)."""


def gathered_segments(writer: mig.PortMigrateDataWriter, mac: state_auth.StateMac | None = None,
                      ) -> Iterator[bytes | list[bytes | memoryview]]:
    """The writer's body as batches of views of the queued bytes (PortMigrateDataWriter.gathered),
    one sendmsg each: the socket's copy is the only one, where packing the containers first cost
    a second copy of the state, with streaming stores, and the MAC then read it back from memory.
    With ``mac``: a MAC that holds the GIL (StateMac.in_thread) is fed each batch on the hub right
    after it was sent (GATHER_BATCH); one that lets go of it, by a worker thread while the batch is
    sent. The queued bytes do not change meanwhile, and the jobs run one after another, in order.
    Its trailer follows the last batch."""
    if mac is not None:
        mac.update(writer.header)
    yield writer.header
    pool = gevent.get_hub().threadpool
    hashing: gevent.event.AsyncResult | None = None
    threaded = mac if mac is not None and mac.in_thread else None
    inline = mac if mac is not None and not mac.in_thread else None
    for batch in writer.gathered(GATHER_BATCH):
        if threaded is not None:
            if hashing is not None:
                hashing.get()
            hashing = pool.spawn(_update_all, threaded, batch)
        yield batch
        if inline is not None:
            _update_all(inline, batch)
    if mac is not None:
        if hashing is not None:
            hashing.get()
        yield mac.trailer()


def _update_all(mac: state_auth.StateMac, pieces: list[bytes | memoryview]) -> None:
    for piece in pieces:
        mac.update(piece)


def pack_device_states(sessions: Iterable[Session], precopies: Mapping[int, Precopy] | None = None,
                       display_records: Mapping[int, bytes] | None = None) -> bytes:
    """Every port device of ``sessions``, saved, and the screens that were pre-copied (``precopies``
    by session id), in one codec container: chunk 0 is a JSON index, the saved chunks follow in
    index order. A port's entry is ``{"session_id", "port", "chunks", "in_flight"}``: ``in_flight``
    is what the port holds now that its device stopped, and s2 bounds the port's MIGRATE_DATA by
    it. A screen's is ``{"session_id", "display": true, "chunks", "screen_chunks"}``: the screen's
    own state, then the tiles of its picture and of the client's that changed since the pre-copy
    (``Precopy.delta``), and with ``"channel": true`` one more: the display channel's record
    (``display_records`` by session id, DISPLAY_STATE_VERSION)."""
    index: list[dict] = []
    chunks: list[bytes] = []
    for session in sessions:
        for cid, port in session.ports.items():
            saved = port.device.save()
            index.append({"session_id": session_label(session.id), "port": cid, "chunks": len(saved),
                          "in_flight": port.in_flight})
            chunks.extend(saved)
        precopy = (precopies or {}).get(session.id)
        if precopy is not None and session.display is not None:
            saved = session.display.screen.save()
            delta = precopy.delta(session.display)
            record = (display_records or {}).get(session.id)
            extra = [] if record is None else [record]
            index.append({"session_id": session_label(session.id), "display": True,
                          "chunks": len(saved) + len(delta) + len(extra), "screen_chunks": len(saved),
                          **({"channel": True} if extra else {})})
            chunks.extend([*saved, *delta, *extra])
    return codec.pack_chunks([json.dumps(index).encode(), *chunks]).tobytes()
