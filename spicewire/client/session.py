"""gevent client: links channels with protocol.link.ClientLink, runs each channel's messages through
protocol.channel.ChannelConnection, and follows migrations (client.migration).

A ClientSession runs in the hub of the thread that made it and follows migrations only while that
hub runs: for gevent programs. Any other program uses spicewire.client.connect (client.threaded),
which runs a ClientSession in an I/O thread of its own, or spicewire.aio.

    session = ClientSession("127.0.0.1", 5900, password=None)
    session.connect()
    port = session.open_port("org.spicewire.echo")
    port.write(b"hello")
    port.read(5, timeout=5)
    session.wait_migrated(timeout=30)   # -> the report of the migration that completed
    session.close()
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, TypedDict, TypeVar

import gevent
import gevent.event
from gevent import socket

from spicewire.client.channels import (
    ChannelClient,
    MainChannel,
    PortChannel,
    check_thread,
    close_socket,
    thread_ident,
)
from spicewire.client.endpoint import Endpoint, channel_names
from spicewire.client.graphics import CHANNEL_CAPS, CursorChannel, DisplayChannel, InputsChannel, WatchedChannel
from spicewire.client.migration import MigrationDriver, channel_name
from spicewire.client.tls import ClientTls
from spicewire.errors import LocalProtocolError, ProtocolError, SpiceError
from spicewire.protocol import messages as m
from spicewire.protocol.caps import caps_to_words
from spicewire.protocol.enums import ChannelType, MainCap
from spicewire.protocol.migration import MAIN, Channel, MigrationDstInfo, Peer

log = logging.getLogger(__name__)
SWITCH_BACK_WAIT = 5.0  # s2 failed: how long a channel waits for the rollback to give it back its s1 socket

# Caps this client honours: it follows both migration modes and keeps the agent token count.
MAIN_CAPS = (
    MainCap.SEMI_SEAMLESS_MIGRATE,
    MainCap.NAME_AND_UUID,
    MainCap.AGENT_CONNECTED_TOKENS,
    MainCap.SEAMLESS_MIGRATE,
)
# Messages the migration driver consumes (5.2-5.6).
_MIGRATION_MESSAGES = (
    m.MsgMigrate, m.MsgMigrateData, m.MsgMainMigrateBegin, m.MsgMainMigrateBeginSeamless,
    m.MsgMainMigrateCancel, m.MsgMainMigrateEnd, m.MsgMainMigrateSwitchHost,
)
_STARTS_MIGRATION = (m.MsgMainMigrateBegin, m.MsgMainMigrateBeginSeamless, m.MsgMainMigrateSwitchHost)
_W = TypeVar("_W", bound=WatchedChannel)


class TlsOptions(TypedDict, total=False):
    """ClientSession's TLS keywords, which connect() and spicewire.aio.connect pass on."""

    tls_port: int
    ca_file: str | None
    host_subject: str | None
    secure_channels: Iterable[str]


class ClientSession:
    """A client session: the main channel plus whichever port channels are opened.

    Migrations are followed without the application's help: port objects stay valid, writes made
    meanwhile are delivered in order, reads go on. ``migrations`` lists a report per attempt;
    ``migrated`` is set when one completes; ``connected_to`` says which server the session is on.

    TLS as spice-gtk does it: ``port`` 0 means the server has only ``tls_port``; the channels named
    in ``secure_channels`` (``main``, ``port``, or ``all``) always use it; any other channel links
    to the plain port and moves to TLS if the server answers NEED_SECURED. The server's chain must
    lead to ``ca_file``, its certificate have the subject ``host_subject`` (spice-gtk's
    ``k=v,k=v``) or, without one, match the host name.

    ``display=True`` also links the display, inputs and cursor channels the server lists:
    ``display.primary`` is the screen as a numpy array, ``inputs`` sends keys and mouse events,
    ``cursor`` is the pointer. They follow migrations as the ports do.
    """

    def __init__(
        self, host: str, port: int, password: str | None = None, *, timeout: float = 10.0, tls_port: int = 0,
        ca_file: str | None = None, host_subject: str | None = None, secure_channels: Iterable[str] = (),
        display: bool = False,
    ) -> None:
        tls = None if ca_file is None else ClientTls(ca_file, host_subject or None)
        self.endpoint = Endpoint(host, port, tls_port, tls, channel_names(secure_channels))
        self.password = password
        self.timeout = timeout
        self.main: MainChannel | None = None
        self.ports: dict[int, PortChannel] = {}
        self.with_display = display
        self.display: DisplayChannel | None = None
        self.inputs: InputsChannel | None = None
        self.cursor: CursorChannel | None = None
        self.migrations: list[dict[str, Any]] = []
        self.migrated = gevent.event.Event()  # a migration completed; cleared by the next BEGIN
        self.migration_connected_event = gevent.event.Event()  # CONNECTED(_SEAMLESS) went to s1
        self._migration: MigrationDriver | None = None
        self._idle = gevent.event.Event()  # no migration running
        self._idle.set()
        self._thread = thread_ident()  # whose hub runs the session

    @property
    def host(self) -> str:
        return self.endpoint.host

    @property
    def port(self) -> int:
        """The server's plain port (0: it has none)."""
        return self.endpoint.port

    @property
    def _main_channel(self) -> MainChannel:
        """The main channel; using the session before ``connect`` is the caller's bug."""
        if self.main is None:
            raise LocalProtocolError("the session is not connected: call connect() first")
        return self.main

    @property
    def session_id(self) -> int:
        init = self._main_channel.init
        if init is None:  # connect() waits for CHANNELS_LIST, the answer to ATTACH_CHANNELS sent on MAIN_INIT
            raise LocalProtocolError("no session id: the server has sent no MAIN_INIT")
        return init.session_id

    @property
    def migrating(self) -> bool:
        return self._migration is not None

    @property
    def connected_to(self) -> tuple[str, int]:
        """(host, port) of the server every channel's socket is connected to."""
        return self._main_channel.sock.getpeername()[:2]

    def connect(self) -> ClientSession:
        sock, est = self.endpoint.link(0, ChannelType.MAIN, 0, password=self.password,
                                       channel_caps=self.channel_caps(ChannelType.MAIN), timeout=self.timeout)
        self.main = MainChannel(self, sock, est)
        self.main.start()
        if not self.main.listed.wait(self.timeout):
            self.close()
            raise ProtocolError("no MAIN_INIT and CHANNELS_LIST from the server in time")
        if self.with_display:
            try:
                self.display = self._link_graphic(ChannelType.DISPLAY, DisplayChannel)
                self.inputs = self._link_graphic(ChannelType.INPUTS, InputsChannel)
                self.cursor = self._link_graphic(ChannelType.CURSOR, CursorChannel)
            except BaseException:
                self.close()
                raise
        return self

    def _link_graphic(self, channel_type: ChannelType, cls: type[_W]) -> _W | None:
        """The first channel of ``channel_type`` the server lists, linked; None if it lists none."""
        cid = next((cid for ctype, cid in self.channels if ctype == channel_type), None)
        if cid is None:
            return None
        sock, est = self.endpoint.link(self.session_id, channel_type, cid, password=self.password,
                                       channel_caps=self.channel_caps(channel_type), timeout=self.timeout)
        ch = cls(self, sock, est)
        ch.start()
        return ch

    def graphics(self) -> dict[Channel, WatchedChannel]:
        """The display, inputs and cursor channels linked, by key."""
        return {ch.key: ch for ch in (self.display, self.inputs, self.cursor) if ch is not None}

    @staticmethod
    def channel_caps(channel_type: int) -> list[int]:
        return caps_to_words(MAIN_CAPS if channel_type == ChannelType.MAIN else CHANNEL_CAPS.get(channel_type, ()))

    @property
    def channels(self) -> list[tuple[int, int]]:
        return list(self._main_channel.channels or [])

    def channel(self, key: Channel) -> ChannelClient:
        if key == MAIN:
            return self._main_channel
        return self.ports[key[1]] if key[0] == ChannelType.PORT else self.graphics()[key]

    def all_channels(self) -> Iterator[tuple[Channel, ChannelClient]]:
        yield MAIN, self._main_channel
        for cid, port in self.ports.items():
            yield (ChannelType.PORT, cid), port
        yield from self.graphics().items()

    def open_port(self, name: str | None = None, channel_id: int | None = None) -> PortChannel:
        """Link the port channel with ``channel_id``, or find the one named ``name`` (as spice-gtk
        does: link each port and read its PORT_INIT). Waits while a migration runs."""
        check_thread(self._thread)
        if not self._idle.wait(self.timeout):
            raise ProtocolError("a migration is still running")
        candidates = [cid for ctype, cid in self.channels if ctype == ChannelType.PORT]
        if channel_id is not None:
            candidates = [channel_id]
        for cid in candidates:
            port = self.ports.get(cid) or self._link_port(cid)
            if name is None or port.name == name:
                return port
        raise LookupError(f"no port channel named {name!r}; the server has {self.port_names()}")

    def port_names(self) -> list[str | None]:
        return [p.name for p in self.ports.values()]

    def _link_port(self, channel_id: int) -> PortChannel:
        sock, est = self.endpoint.link(self.session_id, ChannelType.PORT, channel_id, password=self.password,
                                       timeout=self.timeout)
        port = PortChannel(self, sock, est)
        port.start()
        if not port.initialised.wait(self.timeout):
            port.close()
            raise ProtocolError(f"port channel {channel_id} sent no PORT_INIT")
        self.ports[channel_id] = port
        return port

    # --- what the channels call ----------------------------------------------------------------

    def route(self, ch: ChannelClient, msg: m.Message) -> None:
        """Every outgoing message: straight out, or through the running migration."""
        while ch.frozen and self._migration is None and not ch.closed.is_set():
            ch.wait_resumed(self.timeout)  # switch-host: the port is being re-opened
        with ch.write_lock:
            if self._migration is not None:
                self._migration.send(ch, msg)
            else:
                ch.write_now(msg)

    def on_message(self, ch: ChannelClient, msg: m.Message) -> None:
        """Every incoming message that ChannelConnection did not answer itself."""
        if self._migration is not None and ch is self.main and ch.peer is Peer.S2:
            self._migration.s2_spoke()
        if isinstance(msg, _MIGRATION_MESSAGES):
            if self._migration is None and ch is self.main and isinstance(msg, _STARTS_MIGRATION):
                self._start_migration()
            if self._migration is None:
                log.warning("%s outside a migration on %s", type(msg).__name__, channel_name(ch.key))
                return
            self._migration.receive(ch.peer, ch.key, msg)
            return
        ch.handle(msg)
        if isinstance(msg, m.MsgMainInit):
            if self._migration is not None and self._migration.waiting_main_init:
                self._migration.receive(ch.peer, MAIN, msg)  # 5.3 step 4: no ATTACH_CHANNELS
            else:
                ch.send(m.MsgcMainAttachChannels())

    def destination_failed(self, ch: ChannelClient, sock: socket.socket, reason: str) -> bool:
        """``ch`` lost ``sock``. True when that was s2 in the middle of a seamless migration that
        now goes back to s1, and ``ch`` reads its s1 connection again."""
        if self._migration is None or ch.peer is not Peer.S2:
            return False
        driver = self._migration
        if not driver.s2_failed(f"{channel_name(ch.key)}: {reason}"):
            return False
        if ch.sock is sock:  # another channel's greenlet is switching every channel back right now
            driver.wait_back_on_s1(SWITCH_BACK_WAIT)
        return ch.sock is not sock

    def pass_through_migrate_data(self, ch: ChannelClient) -> None:
        if self._migration is None:
            raise ProtocolError(f"MIGRATE outside a migration on {channel_name(ch.key)}")
        self._migration.pass_through(ch)

    def note_dropped(self, ch: ChannelClient, **counts: int) -> None:
        if self._migration is not None:
            self._migration.note_dropped(ch.key, **counts)

    # --- migration bookkeeping -----------------------------------------------------------------

    def _start_migration(self) -> None:
        # A graphics channel the server ended (it sent nonsense) has no connection to migrate.
        live = (key for key, ch in self.graphics().items() if not ch.closed.is_set())
        keys = [MAIN, *((ChannelType.PORT, cid) for cid in self.ports), *live]
        self._migration = MigrationDriver(self, keys, self._main_channel.established.channel_caps)
        self._idle.clear()
        self.migrated.clear()
        self.migration_connected_event.clear()

    def migration_connected(self, driver: MigrationDriver) -> None:
        self.migration_connected_event.set()

    def migration_finished(self, driver: MigrationDriver) -> None:
        if self._migration is driver:
            self._migration = None
        report = driver.report.as_dict()
        self.migrations.append(report)
        if report["result"] == "completed":
            if driver.endpoint is not None:  # switch-host moved the session's endpoint itself
                self.endpoint = driver.endpoint
            for _, ch in self.all_channels():
                ch.peer = Peer.S1  # the destination is the source of any next migration
            self.migrated.set()
        self._idle.set()

    def wait_migrated(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The report of the migration that completed, or None if none did within ``timeout``."""
        check_thread(self._thread)
        if not self.migrated.wait(timeout):
            return None
        return self.migrations[-1]

    def switch_host(self, dst: MigrationDstInfo, driver: MigrationDriver) -> None:
        """5.6: a new session on the new host; the ports the application had open are re-opened by
        name (their objects stay, with unread data). Runs in main's reader."""
        names = {cid: port.name for cid, port in self.ports.items()}
        for ch in (*self.ports.values(), *self.graphics().values()):
            ch.freeze()
        self._migration = None  # writes now wait for their port to come back
        main = self._main_channel
        old = main.sock
        endpoint = self.endpoint.destination(dst)
        try:
            sock, est = endpoint.link(0, ChannelType.MAIN, 0, password=self.password,
                                      channel_caps=self.channel_caps(ChannelType.MAIN), timeout=self.timeout)
        except (OSError, SpiceError) as err:
            driver.report.errors.append(f"switch host: {err}")
            driver.finish("failed")
            raise
        self.endpoint = endpoint
        main.listed.clear()
        main.attach(sock, est)
        main.reset_state()
        close_socket(old)
        gevent.spawn(self._reopen_ports, names, driver)

    def _reopen_ports(self, names: dict[int, str | None], driver: MigrationDriver) -> None:
        try:
            if not self._main_channel.listed.wait(self.timeout):
                raise ProtocolError("no CHANNELS_LIST from the new host")
            self._reopen_graphics(driver)
            for old_cid, name in names.items():
                port = self.ports.pop(old_cid)
                for ctype, cid in self.channels:
                    if ctype != ChannelType.PORT or cid in self.ports:
                        continue
                    sock, est = self.endpoint.link(self.session_id, ctype, cid, password=self.password,
                                                   timeout=self.timeout)
                    port.resume(sock, est)
                    port.key = (ctype, cid)
                    if port.initialised.wait(self.timeout) and port.name == name:
                        self.ports[cid] = port
                        break
                    port.freeze()
                else:
                    driver.report.errors.append(f"switch host: no port named {name!r} on the new host")
                    port.close()
        except (OSError, SpiceError) as err:  # reported; the session goes on with what it has
            driver.report.errors.append(f"switch host: {err}")
            driver.finish("failed")
            return
        driver.finish("completed")

    def _reopen_graphics(self, driver: MigrationDriver) -> None:
        """Switch host: each graphics channel links to the first of its type the new host lists."""
        for (ctype, _), ch in self.graphics().items():
            cid = next((cid for listed, cid in self.channels if listed == ctype), None)
            if cid is None:
                driver.report.errors.append(f"switch host: the new host has no {ChannelType(ctype).name} channel")
                ch.close()
                continue
            sock, est = self.endpoint.link(self.session_id, ctype, cid, password=self.password,
                                           channel_caps=self.channel_caps(ctype), timeout=self.timeout)
            ch.resume(sock, est)
            ch.key = (ctype, cid)

    def close(self) -> None:
        if self._migration is not None:
            self._migration.close()
        for ch in (*self.ports.values(), *self.graphics().values()):
            ch.close()
        if self.main is not None:
            self.main.close()

    def __enter__(self) -> ClientSession:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()
