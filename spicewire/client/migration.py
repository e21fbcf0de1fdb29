"""The gevent side of a client migration: ClientMigration (protocol.migration) decides, this module
does what its events say - links to s2, the seamless handshake, channel switches, the MIGRATE_DATA
pass-through - and writes the migration report.

The MIGRATE_DATA body is never held: its header is read from s1, a header of the same size is
written to s2, and the body follows in chunks of at most RELAY_CHUNK bytes as they arrive. The
machine is handed a ``StreamedBody`` (it asks a body for its size only); the ``RelayMigrateData``
it answers with is the moment to stream.

Writes of a channel are serialised by its RLock, and routing happens under that lock, so a message
the machine sent to s1 is on the wire before a MIGRATE_FLUSH_MARK, and one routed to s2 follows the
MIGRATE_DATA and the retained messages.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol, assert_never

import gevent
import gevent.event
import gevent.pool
from gevent import socket
from gevent.socket import wait_read, wait_write

from spicewire import codec
from spicewire.client.channels import ChannelClient, PortChannel
from spicewire.client.endpoint import Endpoint
from spicewire.client.tls import is_tls
from spicewire.errors import LocalProtocolError, ProtocolError, RemoteProtocolError, SpiceError
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType, MigrateFlags, Msg, Msgc, MsgMain
from spicewire.protocol.framing import (
    MessageReader,
    MessageWriter,
    RawMessage,
)
from spicewire.protocol.link import LinkEstablished
from spicewire.protocol.migration import (
    CONFIRM_GRACE,
    HANDSHAKE_TIMEOUT,
    MAIN,
    ROLLBACK_TIMEOUT,
    AwaitConfirmation,
    AwaitRollback,
    Channel,
    ClientMigration,
    ClientOutput,
    ClientState,
    CloseSource,
    DropDestination,
    DropMigrateData,
    LinkDestination,
    MigrationCompleted,
    MigrationDstInfo,
    MigrationMode,
    Peer,
    RelayMigrateData,
    ResetChannels,
    RolledBack,
    Send,
    SessionLost,
    SwitchChannel,
    SwitchHost,
)
from spicewire.turns import BulkTurns

log = logging.getLogger(__name__)
_P = ParamSpec("_P")

RELAY_CHUNK = 1 << 20
HEADER_READ = 64 << 10
"""What pass_through asks of s1 per read while it waits for a MIGRATE_DATA header: recv(n) makes
an n-byte object before it reads, and a RELAY_CHUNK one (1 MiB) cost some 25 us per call, twice
per channel at the switch (the read that would block, then the one that gets the header), for
the 10-byte header of a body that is mostly a few dozen bytes. A larger body is relayed after it."""
_FINAL = (ClientState.IDLE, ClientState.MIGRATED, ClientState.HOST_SWITCHED)
_CAN_ROLL_BACK = (ClientState.CONNECTED_SEAMLESS, ClientState.CONFIRMING, ClientState.ROLLING_BACK)


def channel_name(key: Channel) -> str:
    return f"{ChannelType(key[0]).name.lower()}:{key[1]}"


@dataclass(frozen=True, slots=True)
class StreamedBody:
    """Stands in for a MIGRATE_DATA body that is passed through: ``first`` came with the header,
    the rest is still unread on ``source``."""

    size: int
    first: bytes
    source: socket.socket

    def __len__(self) -> int:
        return self.size

    @property
    def rest(self) -> int:
        """Body bytes still to be read from ``source``."""
        return self.size - len(self.first)


class MigrationOwner(Protocol):
    """What the driver asks of the session it migrates (ClientSession, which imports this module)."""

    @property
    def session_id(self) -> int: ...

    @property
    def endpoint(self) -> Endpoint: ...

    @property
    def password(self) -> str | None: ...

    @property
    def timeout(self) -> float: ...

    def channel(self, key: Channel) -> ChannelClient: ...

    def channel_caps(self, channel_type: int) -> list[int]: ...

    def on_message(self, ch: ChannelClient, msg: m.Message) -> None: ...

    def migration_connected(self, driver: MigrationDriver) -> None: ...

    def migration_finished(self, driver: MigrationDriver) -> None: ...

    def switch_host(self, dst: MigrationDstInfo, driver: MigrationDriver) -> None: ...

    def close(self) -> None: ...


@dataclass
class _Parked:
    """A link to s2, frozen until its channel switches."""

    sock: socket.socket
    established: LinkEstablished
    writer: MessageWriter  # DST_DO_SEAMLESS goes out before main switches


@dataclass
class _Report:
    destination: str | None = None
    mode: str | None = None
    result: str = "in progress"
    relayed: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    kept_unread: dict[str, int] = field(default_factory=dict)
    begin_to_connected: float | None = None
    migrate_to_switched: dict[str, float] = field(default_factory=dict)
    total: float | None = None
    peak_relay_buffer: int = 0
    resent_to_s1: dict[str, int] = field(default_factory=dict)  # rolled back: messages s2 may have had too
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["timings"] = {
            "begin_to_connected": out.pop("begin_to_connected"),
            "migrate_to_switched": out.pop("migrate_to_switched"),
            "total": out.pop("total"),
        }
        return out


class MigrationDriver:
    """One migration attempt of a ClientSession, from MIGRATE_BEGIN (or SWITCH_HOST) to its end."""

    def __init__(self, session: MigrationOwner, channels: Iterable[Channel], server_main_caps: Sequence[int]) -> None:
        self.session = session
        # The deadlines are the machine's; they are read here at each start so that tests can shorten them.
        self.machine = ClientMigration(
            session.session_id, channels, server_main_caps, handshake_timeout=HANDSHAKE_TIMEOUT,
            confirm_grace=CONFIRM_GRACE, rollback_timeout=ROLLBACK_TIMEOUT,
        )
        self.report = _Report()
        self.endpoint: Endpoint | None = None  # s2, as BEGIN named it
        self.finished = False
        self._t0 = time.monotonic()
        self._attempt = 0  # bumped by DropDestination: late link results are stale
        self._parked: dict[Channel, _Parked] = {}
        self._s1: dict[Channel, tuple[socket.socket, LinkEstablished]] = {}
        self._greenlets = gevent.pool.Group()
        self._relays: dict[Channel, gevent.event.Event] = {}
        self._migrate_at: dict[Channel, float] = {}
        self._result = "cancelled"
        self._s2_broken: str | None = None  # a relay into s2 failed; the machine hears of it next
        self._timer: gevent.Greenlet | None = None  # armed from machine.get_timer() after every run
        self._watcher: gevent.Greenlet | None = None  # reads s1's main once main is on s2
        self._back_on_s1 = gevent.event.Event()  # s2 failed and every channel reads s1 again

    @property
    def waiting_main_init(self) -> bool:
        return self.machine.state is ClientState.WAIT_MAIN_INIT

    # --- inputs from the session ---------------------------------------------------------------

    def receive(self, peer: Peer, key: Channel, msg: m.Message) -> None:
        if isinstance(msg, m.MsgMigrate):
            self._migrate_at[key] = time.monotonic()
            if not msg.flags & MigrateFlags.NEED_FLUSH:
                # A channel that sends no FLUSH_MARK (the cursor; the display, whose data came with
                # its MIGRATE) switches once the readers woken with it have sent theirs: each of
                # those starts a round trip through s1 on s2's way to the session, and this switch
                # (and relay) fits in while they are under way. The hub runs the readers of one
                # wake-up last in first out: main, whose MIGRATE s1 sends first, would go last.
                # sleep(0), not idle(): back right after those readers, not once the loop is idle.
                gevent.sleep(0)
        elif isinstance(msg, m.MsgMainMigrateEnd):  # semi-seamless: every channel moves from here
            self._migrate_at.update(dict.fromkeys(self.machine.channels, time.monotonic()))
        self._run(self.machine.receive, peer, key, msg, now=time.monotonic())

    def send(self, ch: ChannelClient, msg: m.Message) -> None:
        """An application (or channel) message; the caller holds ``ch.write_lock``."""
        self.execute(self.machine.send(ch.key, msg))

    def pass_through(self, ch: ChannelClient) -> None:
        """``ch`` paused after MIGRATE(NEED_DATA_TRANSFER): the next message from s1 must be
        MIGRATE_DATA; relay it to s2 unparsed, or hand anything else back to the parser."""
        conn, s1 = ch.channel, ch.sock
        header_size, mini = conn.header_size, conn.expects_mini_header
        pending = bytearray(conn.take_unparsed())
        _recv_until(s1, pending, header_size, f"s1 closed {channel_name(ch.key)} before its MIGRATE_DATA")
        header = codec.parse_header(pending, 0, mini)
        if header is None:  # _recv_until returned: header_size bytes are there, a whole header
            raise LocalProtocolError(f"{channel_name(ch.key)}: {header_size} bytes hold no header of this mode")
        msg_type, size = header if mini else header[1:3]
        if msg_type != Msg.MIGRATE_DATA:
            self._not_migrate_data(ch, header_size, msg_type, size, pending)
            return
        conn.passed_through()
        with memoryview(pending) as view:
            first = view[header_size : header_size + size].tobytes()
        extra = len(pending) - header_size - len(first)
        if extra:  # s1 sends nothing after MIGRATE_DATA (5.9.4)
            self.note_dropped(ch.key, partial_in_bytes=extra)
        del pending
        self._relays[ch.key] = done = gevent.event.Event()
        try:
            with ch.write_lock:  # app writes routed to s2 from now on wait for the relay
                self._run(self.machine.migrate_data, ch.key, StreamedBody(size, first, s1), now=time.monotonic())
        except OSError as err:  # s1 went away mid-relay: the session cannot go on
            self.report.errors.append(f"{channel_name(ch.key)}: MIGRATE_DATA relay: {err}")
            self.finish("failed")
            raise
        finally:
            done.set()

    def _not_migrate_data(
        self, ch: ChannelClient, header_size: int, msg_type: int, size: int, pending: bytearray
    ) -> None:
        """5.4 step 2: anything else is logged and dropped - even a PING goes unanswered - and the
        switch of this channel is aborted: it stays on s1 and parsing resumes after the message."""
        conn = ch.channel
        if size > conn.max_size:
            raise RemoteProtocolError(f"{size}-byte message type {msg_type} where MIGRATE_DATA must follow MIGRATE")
        end = header_size + size
        _recv_until(ch.sock, pending, end, f"s1 closed {channel_name(ch.key)} inside a message")
        what = f"{channel_name(ch.key)}: message type {msg_type} where MIGRATE_DATA must follow MIGRATE (dropped)"
        log.error("%s", what)
        self.report.errors.append(what)
        self._run(self.machine.not_migrate_data, ch.key)
        conn.passed_through()
        for msg in conn.resume(pending[end:]):
            self.session.on_message(ch, msg)

    # --- running the machine -------------------------------------------------------------------

    def _run(self, fn: Callable[_P, list[ClientOutput]], *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            events = fn(*args, **kwargs)
        except ProtocolError as err:
            # The machine has failed for good: the migration ends here, where each channel stands.
            whose = "the servers broke" if isinstance(err, RemoteProtocolError) else "we broke"
            log.error("migration failed, %s the protocol: %s", whose, err)
            self.report.errors.append(str(err))
            self.close()
            self.finish("failed")
            return
        self.execute(events)

    def execute(self, events: list[ClientOutput]) -> None:
        for ev in events:
            match ev:
                case Send():
                    self._send(ev)
                case RelayMigrateData():
                    self._relay(ev)
                case LinkDestination():
                    self._link_destination(ev)
                case DropDestination():
                    self._drop(ev)
                case ResetChannels():
                    self._reset(ev)
                case SwitchChannel():
                    self._switch(ev)
                case CloseSource():
                    self._close_source(ev)
                case MigrationCompleted():
                    self._completed(ev)
                case SwitchHost():
                    self._switch_host(ev)
                case AwaitConfirmation():
                    self._await_confirmation(ev)
                case AwaitRollback():
                    self._await_rollback(ev)
                case DropMigrateData():
                    self._drop_migrate_data(ev)
                case RolledBack():
                    self._rolled_back(ev)
                case SessionLost():
                    self._lost(ev)
                case _:
                    assert_never(ev)
        if self._s2_broken is not None:
            reason, self._s2_broken = self._s2_broken, None
            self.s2_failed(reason)
        if not self.finished and self.machine.state is ClientState.IDLE:
            # Asked of the machine, not of the events: a nested run may get here first.
            self.finish("rolled-back" if self.machine.rolled_back else self._result)
        self._arm_timer()

    def _arm_timer(self) -> None:
        _kill(self._timer)
        self._timer = None
        deadline = self.machine.get_timer()
        if deadline is not None and not self.finished:
            self._timer = gevent.spawn_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now, deadline = time.monotonic(), self.machine.get_timer()
        if self.machine.state is ClientState.HANDSHAKE and deadline is not None and now >= deadline:
            self.report.errors.append(f"seamless handshake: s2 main did not answer within {HANDSHAKE_TIMEOUT:g} s")
        self._run(self.machine.handle_timer, now)

    def s2_spoke(self) -> None:
        """s2's main channel said something after main switched to it."""
        self._run(self.machine.s2_spoke)

    def s2_failed(self, reason: str) -> bool:
        """A connection to s2 broke. True when the migration goes back to s1 (every channel then
        reads its s1 socket again), False when it is too early or too late for that."""
        if self.finished or self.machine.state not in _CAN_ROLL_BACK:
            return False
        if self.machine.state is not ClientState.ROLLING_BACK:
            log.warning("migration: s2 failed (%s); back to s1", reason)
            self.report.errors.append(f"s2 failed: {reason}")
            try:
                self._run(self.machine.s2_failed, now=time.monotonic())
            finally:
                self._back_on_s1.set()
        return True

    def wait_back_on_s1(self, timeout: float) -> None:
        """Until the greenlet that took the migration back has moved every channel to s1."""
        self._back_on_s1.wait(timeout)

    def close(self) -> None:
        """The session closes mid-migration: let go of every s2 link and any s1 socket left."""
        _kill(self._timer)
        _kill(self._watcher)
        self._drop(DropDestination())
        self._close_s1()

    def finish(self, result: str) -> None:
        if self.finished:
            return
        self.finished = True
        _kill(self._timer)
        for key, count in self.machine.last_resent.items():
            if count:
                self.report.resent_to_s1[channel_name(key)] = count
        self.report.result = result
        self.report.total = time.monotonic() - self._t0
        self.session.migration_finished(self)

    # --- events --------------------------------------------------------------------------------

    def _send(self, ev: Send) -> None:
        ch = self.session.channel(ev.channel)
        msg = ev.message
        if ev.peer is Peer.S2 and ev.channel in self._parked:  # DST_DO_SEAMLESS, before main switches
            parked = self._parked[ev.channel]
            parked.sock.sendall(parked.writer.frame(msg.TYPE, msg.wire_body()))
        elif ev.peer is Peer.S2 and self._s2_broken is not None:
            pass  # kept by the machine; it goes to s1 if the migration rolls back
        elif ev.peer is Peer.S2:
            # Retained messages released after a MIGRATE_DATA relay run in the channel's reader:
            # it must not block writing them while s2 waits for it to read.
            ch.write_soon(msg)
        else:
            ch.write_now(msg)
        if isinstance(msg, (m.MsgcMainMigrateConnected, m.MsgcMainMigrateConnectedSeamless)):
            self.report.begin_to_connected = time.monotonic() - self._t0
            mode = self.machine.mode
            if mode is None:
                raise LocalProtocolError(f"{type(msg).__name__} went out while the machine had decided no mode")
            self.report.mode = mode.label
            self.session.migration_connected(self)
        elif isinstance(msg, m.MsgcMainMigrateConnectError):
            self._result = "connect-error"

    def _link_destination(self, ev: LinkDestination) -> None:
        self.endpoint = s2 = self.session.endpoint.destination(ev.dst_info)
        self.report.destination = str(s2)
        for key in ev.channels:
            self._greenlets.spawn(self._link, key, s2, ev.connection_id, self._attempt)

    def _link(self, key: Channel, s2: Endpoint, connection_id: int, attempt: int) -> None:
        try:
            sock, est = s2.link(connection_id, *key, password=self.session.password,
                                channel_caps=self.session.channel_caps(key[0]), timeout=self.session.timeout)
        except (OSError, SpiceError) as err:
            if attempt == self._attempt:
                self.report.errors.append(f"link {channel_name(key)} to s2: {err}")
                self._run(self.machine.s2_link_failed, key)
            return
        if attempt != self._attempt:
            sock.close()
            return
        self._parked[key] = _Parked(sock, est, MessageWriter(est.send_mini_header))
        if key == MAIN:
            self._run(self.machine.s2_linked, MAIN, est.channel_caps, now=time.monotonic())
            if self.machine.state is ClientState.HANDSHAKE:
                self._greenlets.spawn(self._handshake, attempt)
        else:
            self._run(self.machine.s2_linked, key)

    def _handshake(self, attempt: int) -> None:
        """5.2 step 4: s2 main answers DST_DO_SEAMLESS; anything else is logged and dropped. The
        machine's handshake timer ends the wait (DropDestination kills this greenlet)."""
        parked = self._parked[MAIN]
        reader = MessageReader(parked.established.expect_mini_header)
        reader.feed(parked.established.trailing)
        try:
            for raw in _messages(parked.sock, reader):
                cls = m.lookup(ChannelType.MAIN, m.S2C, raw.type)
                if cls in (m.MsgMainMigrateDstSeamlessAck, m.MsgMainMigrateDstSeamlessNack):
                    break
                log.warning("dropping message type %d from s2 main during the handshake", raw.type)
            else:
                raise ConnectionError("s2 closed main during the seamless handshake")
        except (OSError, SpiceError) as err:
            if attempt == self._attempt:
                self.report.errors.append(f"seamless handshake: {err}")
                self._run(self.machine.s2_link_failed, MAIN)
            return
        parked.established = dataclasses.replace(parked.established, trailing=reader.take_buffered())
        if attempt == self._attempt:
            self._run(self.machine.receive, Peer.S2, MAIN, cls())

    def _drop(self, ev: DropDestination) -> None:
        self._attempt += 1
        current = gevent.getcurrent()
        for greenlet in list(self._greenlets):
            if greenlet is not current:
                greenlet.kill(block=False)
        for parked in self._parked.values():
            parked.sock.close()
        self._parked.clear()

    def _reset(self, ev: ResetChannels) -> None:
        """Semi-seamless 5.3 step 1: s1 goes. Main's socket is closed here (its reader is the caller
        and switches next); the others are frozen and park once they have read what s1 sent. (Nothing
        is held back yet: before END every channel writes to s1 straight away.)"""
        main = self.session.channel(MAIN)
        self.note_dropped(MAIN, partial_in_bytes=main.channel.buffered)
        main.sock.close()
        for key in self.machine.channels:
            if key != MAIN:
                self.session.channel(key).freeze()

    def _switch(self, ev: SwitchChannel) -> None:
        ch = self.session.channel(ev.channel)
        if ev.peer is Peer.S1:  # MIGRATE_CANCEL after this channel had switched, or s2 failed
            if ev.channel == MAIN:
                self._stop_watching()  # main's reader takes s1's main connection back
            sock, est = self._s1.pop(ev.channel)
            ch.sock.close()
            ch.sock, ch.established = sock, est
            ch.channel.rebind(send_mini=est.send_mini_header, expect_mini=est.expect_mini_header)
            ch.peer = Peer.S1
            return
        parked = self._parked.pop(ev.channel)
        est = parked.established
        if self.machine.mode is MigrationMode.SEAMLESS:
            self._s1[ev.channel] = (ch.sock, ch.established)  # closed by CloseSource
            if ev.channel == MAIN:
                self._watcher = gevent.spawn(self._watch_s1_main, ch.sock, ch.established)
            ch.attach(parked.sock, est, keep_state=True)
        elif ev.channel == MAIN:
            ch.attach(parked.sock, est)  # semi-seamless takes serials and queue from s2-main too
            ch.reset_state()
        else:
            ch.resume(parked.sock, est)
            self.report.kept_unread[channel_name(ev.channel)] = ch.unread if isinstance(ch, PortChannel) else 0
        ch.peer = Peer.S2
        self._switched(ev.channel)

    def _watch_s1_main(self, sock: socket.socket, established: LinkEstablished) -> None:
        """Seamless, once main is on s2: s1's main sends nothing more unless s1 takes the session
        back (MAIN_MIGRATE_CANCEL, also when s2 went silent rather than away). Its end means s1 let
        go, which it does once s2 reported the session restored."""
        reader = MessageReader(established.expect_mini_header)
        reader.adopt_next_serial()  # s1 numbered on while main was away
        try:
            for raw in _messages(sock, reader):
                if raw.type == MsgMain.MIGRATE_CANCEL:
                    self._watcher = None
                    if self.s2_failed("s1 cancelled the migration"):
                        self._run(self.machine.receive, Peer.S1, MAIN, m.MsgMainMigrateCancel())
                    return
                log.warning("dropping message type %d from s1 main after main switched", raw.type)
        except (OSError, SpiceError) as err:  # a broken or garbled s1 main is s1 letting go too
            log.info("s1 main after main switched: %s", err)
        self._watcher = None
        self._run(self.machine.s1_let_go)  # nothing to go back to

    def _stop_watching(self) -> None:
        watcher, self._watcher = self._watcher, None
        _kill(watcher, block=True)

    def _switched(self, key: Channel) -> None:
        start = self._migrate_at.get(key, self._t0)
        self.report.migrate_to_switched[channel_name(key)] = time.monotonic() - start

    def _relay(self, ev: RelayMigrateData) -> None:
        """Header for s2 (its header mode, the channel's serial), then the body as it arrives."""
        body, ch = ev.body, self.session.channel(ev.channel)
        if not isinstance(body, StreamedBody):
            raise LocalProtocolError(f"{type(body).__name__} as MIGRATE_DATA body: pass_through hands on StreamedBody")
        out, what = ch.sock, channel_name(ch.key)
        try:
            try:
                # Header and what already arrived in one write: a small MIGRATE_DATA is one segment.
                out.sendall(ch.channel.send_streamed(Msgc.MIGRATE_DATA, body.size) + body.first)
            except OSError as err:
                raise _s2_write_failed(body.source, body.rest, what, err) from err
            if body.rest:
                peak = relay(body.source, out, body.rest, what)
                self.report.peak_relay_buffer = max(self.report.peak_relay_buffer, len(body.first), peak)
            self.report.relayed[what] = body.size
            self._switched(ch.key)
        except DestinationFailed as err:  # the whole body was read from s1; s2 did not take it
            self.report.errors.append(f"{what}: MIGRATE_DATA relay: {err}")
            self._s2_broken = f"MIGRATE_DATA relay on {what}: {err}"
        finally:
            self._relays[ch.key].set()  # before any CloseSource later in this run waits for it

    def _await_confirmation(self, ev: AwaitConfirmation) -> None:
        log.debug("every channel is on s2; s1's sockets stay until s2 speaks or the grace is over")

    def _await_rollback(self, ev: AwaitRollback) -> None:
        log.debug("back on s1's sockets, waiting for its MIGRATE_CANCEL")

    def _lost(self, ev: SessionLost) -> None:
        self.report.errors.append(ev.reason)
        self.finish("failed")
        gevent.spawn(self.session.close)

    def _drop_migrate_data(self, ev: DropMigrateData) -> None:
        body = ev.body
        if isinstance(body, StreamedBody) and body.rest:
            _discard(body.source, body.rest, channel_name(ev.channel))
        self.note_dropped(ev.channel, migrate_data_bytes=len(body))

    def _rolled_back(self, ev: RolledBack) -> None:
        pass  # the machine says so itself (``rolled_back``), which ``finish`` reads

    def _close_source(self, ev: CloseSource) -> None:
        for done in self._relays.values():  # the last one is done: it is what switched last
            done.wait()
        self._stop_watching()
        self._close_s1()

    def _close_s1(self) -> None:
        for sock, _ in self._s1.values():
            sock.close()
        self._s1.clear()

    def _completed(self, ev: MigrationCompleted) -> None:
        self.report.mode = ev.mode.label
        self.finish("completed")

    def _switch_host(self, ev: SwitchHost) -> None:
        self.report.mode = MigrationMode.SWITCH_HOST.label
        # The session's new server once it completes (migration_finished takes it, and says so).
        self.endpoint = self.session.endpoint.destination(ev.dst_info)
        self.report.destination = str(self.endpoint)
        self.session.switch_host(ev.dst_info, self)

    def note_dropped(self, key: Channel, **counts: int) -> None:
        for name, value in counts.items():
            if value:
                entry = self.report.dropped.setdefault(channel_name(key), {})
                entry[name] = entry.get(name, 0) + value


# --- helpers -------------------------------------------------------------------------------------


def _kill(greenlet: gevent.Greenlet | None, block: bool = False) -> None:
    """Kill ``greenlet`` unless it is gone or is the one running (which is on its way out)."""
    if greenlet is not None and greenlet is not gevent.getcurrent():
        greenlet.kill(block=block)


def _messages(sock: socket.socket, reader: MessageReader) -> Iterator[RawMessage]:
    """Whole messages from ``sock``, through ``reader``, until the peer closes."""
    while True:
        raw = reader.next_message()
        if raw is not None:
            yield raw
            continue
        data = sock.recv(65536)
        if not data:
            return
        reader.feed(data)


def _recv_until(sock: socket.socket, pending: bytearray, size: int, closed: str) -> None:
    """Receive into ``pending`` until it holds ``size`` bytes; ``closed`` says what an EOF means."""
    while len(pending) < size:
        data = sock.recv(HEADER_READ)
        if not data:
            raise ConnectionError(closed)
        pending += data


# --- moving a MIGRATE_DATA body from s1 to s2 ---------------------------------------------------


def relay(source: socket.socket, out: socket.socket, count: int, what: str) -> int:
    """Move ``count`` bytes from ``source`` to ``out``; returns the most bytes the client held.

    On Linux the bytes go through a pipe with splice(2): the body never enters this process, whose
    memory stays flat however large it is (on loopback it is about as fast as copying, not faster).
    Elsewhere, if splice is refused, or when either side is TLS (whose records must be decrypted
    and encrypted again), they are copied through one RELAY_CHUNK buffer."""
    if _SPLICE and not (is_tls(source) or is_tls(out)):
        try:
            _splice_relay(source, out, count, what)
            return 0
        except _SpliceRefused as err:  # before any byte moved: copying does the same job
            log.debug("%s: splice refused (%s); copying instead", what, err)
    return _copy_relay(source, out, count, what)


class DestinationFailed(ConnectionError):
    """Writing to s2 failed mid-relay. The rest of the body has been read from s1 and dropped, so
    the s1 connection is at a message boundary again."""


def _s2_write_failed(source: socket.socket, left: int, what: str, err: OSError) -> DestinationFailed:
    """Writing to s2 failed with ``left`` body bytes still on s1: read and drop them, so the s1
    connection is at a message boundary for whoever reads it next."""
    _discard(source, left, what)
    return DestinationFailed(f"writing to s2: {err}")


def _discard(source: socket.socket, count: int, what: str) -> None:
    scratch = bytearray(min(RELAY_CHUNK, count))
    while count:
        n = source.recv_into(scratch, min(len(scratch), count))
        if n == 0:
            raise ConnectionError(f"s1 closed {what} {count} bytes before the end of MIGRATE_DATA")
        count -= n


class _SpliceRefused(Exception):
    """splice(2) is not possible for these sockets before any byte moved."""


_SPLICE = hasattr(os, "splice") and hasattr(os, "pipe2")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def _splice_relay(source: socket.socket, out: socket.socket, count: int, what: str) -> None:
    src, dst = source.fileno(), out.fileno()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            pipe_size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, RELAY_CHUNK)
        except OSError:
            pipe_size = 65536  # the default; pipe-max-size may be lower than a RELAY_CHUNK
        left = count
        turns = BulkTurns()
        while left:
            if source.fileno() != src:
                raise ConnectionError(f"{what}: s1's connection was closed during the relay")
            try:
                n = os.splice(src, w, min(left, pipe_size), flags=_SPLICE_FLAGS)
            except BlockingIOError:
                _wait_ready(source, src, wait_read)
                continue
            except OSError as err:
                if left == count and err.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise _SpliceRefused(err.strerror) from err
                raise
            if n == 0:
                raise ConnectionError(f"s1 closed {what} {left} bytes before the end of MIGRATE_DATA")
            left -= n
            piece = n
            try:
                while n:
                    try:
                        n -= _splice_out(out, r, dst, n)
                    except BlockingIOError:
                        _wait_ready(out, dst, wait_write)
            except OSError as err:
                raise _s2_write_failed(source, left, what, err) from err
            turns.share(piece)  # the process's other sessions get a turn (turns.py)
    finally:
        os.close(r)
        os.close(w)


RELAY_POLL = 0.2  # how often a relay waiting on a raw fd checks that its socket is still open


def _wait_ready(sock: socket.socket, fd: int, wait: Callable[[int, float], None]) -> None:
    """Wait until ``fd`` is ready. A raw-fd wait is not woken when another greenlet closes the
    socket (a rollback closes s2's sockets under a stalled relay), so it looks now and then; and the
    number is never used once the socket let go of it, as it may belong to a new socket by then."""
    while True:
        if sock.fileno() != fd:
            raise OSError(errno.EBADF, "the socket was closed during the relay")
        try:
            wait(fd, RELAY_POLL)
            return
        except socket.timeout:
            continue


def _splice_out(out: socket.socket, pipe: int, fd: int, count: int) -> int:
    if out.fileno() != fd:
        raise OSError(errno.EBADF, "the socket was closed during the relay")
    return os.splice(pipe, fd, count, flags=_SPLICE_FLAGS)


def _copy_relay(source: socket.socket, out: socket.socket, count: int, what: str) -> int:
    buf = bytearray(min(RELAY_CHUNK, count))
    view = memoryview(buf)
    left = count
    turns = BulkTurns()
    while left:
        n = source.recv_into(buf, min(len(buf), left))
        if n == 0:
            raise ConnectionError(f"s1 closed {what} {left} bytes before the end of MIGRATE_DATA")
        left -= n
        try:
            out.sendall(view[:n])
        except OSError as err:
            raise _s2_write_failed(source, left, what, err) from err
        turns.share(n)
    return len(buf)
