"""s1: SourceMigration (PROTOCOL.md 5.2-5.6)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import Enum, auto
from typing import ClassVar

from spicewire.errors import LocalProtocolError, RemoteProtocolError
from spicewire.protocol.caps import has_cap
from spicewire.protocol.enums import MIGRATE_FLAGS_MASK, MIGRATION_PROTOCOL_VERSION, MainCap, MigrateFlags
from spicewire.protocol.messages import (
    Message,
    MigrationDstInfo,
    MsgcMainMigrateConnected,
    MsgcMainMigrateConnectedSeamless,
    MsgcMainMigrateConnectError,
    MsgcMigrateFlushMark,
    MsgMainMigrateBegin,
    MsgMainMigrateBeginSeamless,
    MsgMainMigrateCancel,
    MsgMainMigrateEnd,
    MsgMainMigrateSwitchHost,
    MsgMigrate,
    MsgMigrateData,
)
from spicewire.protocol.migration.events import (
    ConnectComplete,
    DisconnectClient,
    Migrate,
    MigrateDataRequested,
    Origin,
    Received,
    Send,
    Sent,
    SourceInput,
    SourceOutput,
)
from spicewire.protocol.migration.rules import (
    MAIN,
    MIGRATE_TIMEOUT,
    Channel,
    MigrationMode,
    choose_mode,
    default_migrate_flags,
)
from spicewire.protocol.migration.table import Table, _Role, entry


class SourceState(Enum):
    IDLE = auto()
    WAIT_CONNECT = auto()  # MAIN_MIGRATE_BEGIN sent, 10 s timer
    WAIT_CONNECT_SEAMLESS = auto()  # MAIN_MIGRATE_BEGIN_SEAMLESS sent, 10 s timer
    CONNECTED = auto()  # the client holds s2 links: semi-seamless at the end
    CONNECTED_SEAMLESS = auto()
    NOT_CONNECTED = auto()  # CONNECT_ERROR, timeout or no BEGIN possible: switch host at the end
    MIGRATING = auto()  # SPICE_MSG_MIGRATE sent on every channel
    WAIT_DISCONNECT = auto()  # the client should leave within 10 s
    DONE = auto()


class SourceChannelState(Enum):
    NORMAL = auto()
    WAIT_FLUSH_MARK = auto()
    WAIT_FLUSH_MARK_THEN_DATA = auto()
    MIGRATE_DATA_DUE = auto()  # the owner builds MIGRATE_DATA; nothing else may be sent
    SWITCHED = auto()  # the client left this channel for s2


_S, _SC = SourceState, SourceChannelState
_I = SourceInput
_BEGIN_INPUTS = {
    MigrationMode.SEAMLESS: _I.BEGIN_SEAMLESS,
    MigrationMode.SEMI_SEAMLESS: _I.BEGIN_SEMI_SEAMLESS,
    MigrationMode.SWITCH_HOST: _I.BEGIN_SWITCH_HOST,
}
_ANSWERS = (MsgcMainMigrateConnected, MsgcMainMigrateConnectedSeamless, MsgcMainMigrateConnectError)
_CONNECTED, _CONNECTED_SEAMLESS, _CONNECT_ERROR = (Received(kind) for kind in _ANSWERS)
_FLUSH_MARK = Received(MsgcMigrateFlushMark)
_MIGRATE_DATA = Sent(MsgMigrateData)


class SourceMigration(_Role):
    """s1 for one client session."""

    TABLE: ClassVar[Table] = {
        # 5.2: BEGIN in the best mode the client allows; without SEMI_SEAMLESS_MIGRATE nothing is sent
        (_S.IDLE, _I.BEGIN_SEAMLESS): (_S.WAIT_CONNECT_SEAMLESS, "_send_begin"),
        (_S.IDLE, _I.BEGIN_SEMI_SEAMLESS): (_S.WAIT_CONNECT, "_send_begin"),
        (_S.IDLE, _I.BEGIN_SWITCH_HOST): (_S.NOT_CONNECTED, "_connect_failed"),
        (_S.WAIT_CONNECT_SEAMLESS, _CONNECTED_SEAMLESS): (_S.CONNECTED_SEAMLESS, "_connect_succeeded"),
        (_S.WAIT_CONNECT_SEAMLESS, _CONNECTED): (_S.CONNECTED, "_connect_succeeded"),  # s2 NACKed
        (_S.WAIT_CONNECT_SEAMLESS, _CONNECT_ERROR): (_S.NOT_CONNECTED, "_connect_failed"),
        (_S.WAIT_CONNECT_SEAMLESS, _I.DEADLINE): (_S.NOT_CONNECTED, "_connect_failed"),
        (_S.WAIT_CONNECT, _CONNECTED): (_S.CONNECTED, "_connect_succeeded"),
        (_S.WAIT_CONNECT, _CONNECT_ERROR): (_S.NOT_CONNECTED, "_connect_failed"),
        (_S.WAIT_CONNECT, _I.DEADLINE): (_S.NOT_CONNECTED, "_connect_failed"),
        # an answer nobody waits for: a success is cancelled, an error ignored (as spice-server)
        (_S.IDLE, _CONNECTED): (_S.IDLE, "_send_cancel"),
        (_S.IDLE, _CONNECTED_SEAMLESS): (_S.IDLE, "_send_cancel"),
        (_S.IDLE, _CONNECT_ERROR): (_S.IDLE, None),
        (_S.NOT_CONNECTED, _CONNECTED): (_S.NOT_CONNECTED, "_send_cancel"),
        (_S.NOT_CONNECTED, _CONNECTED_SEAMLESS): (_S.NOT_CONNECTED, "_send_cancel"),
        (_S.NOT_CONNECTED, _CONNECT_ERROR): (_S.NOT_CONNECTED, None),
        # migrate_end(completed=0), or a second begin before the end
        (_S.WAIT_CONNECT, _I.CANCEL): (_S.IDLE, "_send_cancel"),
        (_S.WAIT_CONNECT_SEAMLESS, _I.CANCEL): (_S.IDLE, "_send_cancel"),
        (_S.CONNECTED, _I.CANCEL): (_S.IDLE, "_send_cancel"),
        (_S.CONNECTED_SEAMLESS, _I.CANCEL): (_S.IDLE, "_send_cancel"),
        (_S.NOT_CONNECTED, _I.CANCEL): (_S.IDLE, None),
        # migrate_end(completed=1)
        (_S.CONNECTED, _I.FINISH): (_S.WAIT_DISCONNECT, "_send_migrate_end"),  # 5.3
        (_S.CONNECTED_SEAMLESS, _I.FINISH): (_S.MIGRATING, "_send_migrate"),  # 5.4
        (_S.CONNECTED, _I.FINISH_SWITCH_HOST): (_S.WAIT_DISCONNECT, "_send_switch_host"),  # no SEMI cap
        (_S.CONNECTED, _I.FINISH_STAY): (_S.IDLE, "_send_cancel"),
        (_S.NOT_CONNECTED, _I.FINISH_SWITCH_HOST): (_S.WAIT_DISCONNECT, "_send_switch_host"),  # 5.6
        (_S.NOT_CONNECTED, _I.FINISH_STAY): (_S.IDLE, None),
        (_S.MIGRATING, _I.ALL_CHANNELS_SWITCHED): (_S.WAIT_DISCONNECT, None),
        (_S.MIGRATING, _I.DEADLINE): (_S.DONE, "_disconnect"),
        (_S.WAIT_DISCONNECT, _I.DEADLINE): (_S.DONE, "_disconnect"),
        # Ours, not spice-server's: s2 failed before it had the session, and the client is still
        # here (seamless only: semi-seamless reset the client's channels at END). Only once every
        # MIGRATE_DATA went out, so that no FLUSH_MARK can follow the CANCEL.
        (_S.WAIT_DISCONNECT, _I.ROLL_BACK): (_S.IDLE, "_roll_back"),
        # The client may leave at any time; whatever was under way is over.
        **{(state, _I.CLIENT_DISCONNECTED): (_S.DONE, "_stop_timer") for state in _S},
    }

    CHANNEL_TABLE: ClassVar[Table] = {
        # 5.4: SPICE_MSG_MIGRATE with the channel's flags
        (_SC.NORMAL, Sent(Migrate.PLAIN)): (_SC.SWITCHED, None),
        (_SC.NORMAL, Sent(Migrate.NEED_FLUSH)): (_SC.WAIT_FLUSH_MARK, None),
        (_SC.NORMAL, Sent(Migrate.NEED_DATA_TRANSFER)): (_SC.MIGRATE_DATA_DUE, "_request_migrate_data"),
        (_SC.NORMAL, Sent(Migrate.NEED_FLUSH_AND_DATA_TRANSFER)): (_SC.WAIT_FLUSH_MARK_THEN_DATA, None),
        (_SC.WAIT_FLUSH_MARK, _FLUSH_MARK): (_SC.SWITCHED, None),
        (_SC.WAIT_FLUSH_MARK_THEN_DATA, _FLUSH_MARK): (_SC.MIGRATE_DATA_DUE, "_request_migrate_data"),
        # sent by the owner through send()
        (_SC.MIGRATE_DATA_DUE, _MIGRATE_DATA): (_SC.SWITCHED, None),
    }

    def __init__(
        self,
        channels: Iterable[Channel],
        client_main_caps: Sequence[int],
        *,
        channel_flags: Mapping[Channel, int] | None = None,
        timeout: float = MIGRATE_TIMEOUT,
    ) -> None:
        """``channels``: every channel the client has open (main is added, and goes first)."""
        ordered = [MAIN, *(channel for channel in channels if channel != MAIN)]
        super().__init__(_S.IDLE, dict.fromkeys(ordered, _SC.NORMAL))
        flags = dict(channel_flags or {})
        self.flags = {ch: MigrateFlags(flags.get(ch, default_migrate_flags(ch[0]))) for ch in ordered}
        if any(int(value) & ~int(MIGRATE_FLAGS_MASK) for value in self.flags.values()):
            raise LocalProtocolError(f"migrate flags beyond {MIGRATE_FLAGS_MASK!r}: {self.flags}")
        self.client_main_caps = tuple(client_main_caps)
        self.timeout = timeout
        self.mode: MigrationMode | None = None
        self.dst_info: MigrationDstInfo | None = None
        self._deadline: float | None = None
        self._now = 0.0
        self._flushed: set[Channel] = set()

    # commands

    @property
    def takes_channels(self) -> bool:
        """Whether a channel the client links now can still migrate with the others: until the
        switch (SPICE_MSG_MIGRATE, MIGRATE_END or SWITCH_HOST) goes out."""
        return self.error is None and self.state not in (_S.MIGRATING, _S.WAIT_DISCONNECT, _S.DONE)

    @entry
    def channel_linked(self, channel: Channel, flags: int | None = None) -> list[SourceOutput]:
        """A channel the client linked after the migration began (spice-gtk links a port channel
        it learned of late here, and its twin on s2): it gets its MIGRATE at the switch like the
        others, with ``flags`` or its type's. Only while ``takes_channels``."""
        if not self.takes_channels or channel in self.channels:
            raise LocalProtocolError(f"channel {channel} cannot join the migration in state {self.state.name}")
        value = MigrateFlags(flags if flags is not None else default_migrate_flags(channel[0]))
        if int(value) & ~int(MIGRATE_FLAGS_MASK):
            raise LocalProtocolError(f"migrate flags beyond {MIGRATE_FLAGS_MASK!r}: {value!r}")
        self.channels[channel] = _SC.NORMAL
        self.flags[channel] = value
        return self._out

    @entry
    def begin(self, dst_info: MigrationDstInfo, mode: MigrationMode, now: float) -> list[SourceOutput]:
        """spice_server_migrate_connect; ``mode`` is the best the owner allows (QEMU
        seamless-migration=on -> SEAMLESS), the client's caps may lower it (``self.mode``)."""
        out = self._out
        if self.state in (_S.WAIT_CONNECT, _S.WAIT_CONNECT_SEAMLESS, _S.CONNECTED, _S.CONNECTED_SEAMLESS,
                          _S.NOT_CONNECTED):
            self._fire(_I.CANCEL)  # 5.2 step 2: the previous attempt is cancelled first
        self.dst_info, self._now = dst_info, now
        self.mode = choose_mode(self.client_main_caps, mode)
        self._fire(_BEGIN_INPUTS[self.mode])
        return out

    @entry
    def cancel(self) -> list[SourceOutput]:
        """migrate_end(completed=0): the VM stays here."""
        out = self._out
        self._fire(_I.CANCEL)
        return out

    @entry
    def finish(self, now: float, switch_host: bool = True) -> list[SourceOutput]:
        """migrate_end(completed=1). Without a working s2 connection the client is sent
        MIGRATE_SWITCH_HOST, or with ``switch_host=False`` stays on this server. Before a seamless
        finish the owner sends any partially read guest-agent chunk as AGENT_DATA (5.4)."""
        out = self._out
        self._now = now
        fallback = self.state is _S.NOT_CONNECTED or (
            # 5.3: END only reaches a client with SEMI_SEAMLESS_MIGRATE (a seamless client without it
            # that got a NACK)
            self.state is _S.CONNECTED and not has_cap(self.client_main_caps, MainCap.SEMI_SEAMLESS_MIGRATE)
        )
        self._fire((_I.FINISH_SWITCH_HOST if switch_host else _I.FINISH_STAY) if fallback else _I.FINISH)
        return out

    @entry
    def client_disconnected(self) -> list[SourceOutput]:
        """The client's main connection closed, whenever that happens: the migration is over."""
        out = self._out
        self._fire(_I.CLIENT_DISCONNECTED)
        return out

    @property
    def can_roll_back(self) -> bool:
        """Seamless, and every MIGRATE_DATA has gone out, so no FLUSH_MARK can come after the
        CANCEL (the owner adds whether the client is still connected)."""
        return self.mode is MigrationMode.SEAMLESS and self.allows(_I.ROLL_BACK)

    @entry
    def roll_back(self) -> list[SourceOutput]:
        """Seamless post-migration failed on s2's side: the session resumes here. Every channel is
        back to normal and the client is sent MIGRATE_CANCEL, which takes it back to our sockets."""
        out = self._out
        if self.mode is not MigrationMode.SEAMLESS:
            raise LocalProtocolError(f"a {self.mode.label if self.mode else 'no'} migration cannot roll back")
        self._fire(_I.ROLL_BACK)
        return out

    def get_timer(self) -> float | None:
        return None if self.failed else self._deadline

    @entry
    def handle_timer(self, now: float) -> list[SourceOutput]:
        out = self._out
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            self._fire(_I.DEADLINE)
        return out

    @entry
    def receive(self, channel: Channel, message: Message) -> list[SourceOutput]:
        """Every client message on a session channel; those migration does not care about pass."""
        out = self._out
        kind = type(message)
        self._channel_state(channel)
        if kind in _ANSWERS:
            self._fire(Received(kind), message)
        elif kind is MsgcMigrateFlushMark:
            self._fire_channel(channel, _FLUSH_MARK)
            self._flushed.add(channel)
            self._check_all_switched()
        elif channel in self._flushed:
            # The client writes FLUSH_MARK last on s1; everything after belongs to s2.
            raise RemoteProtocolError(f"{kind.__name__} on channel {channel} after MIGRATE_FLUSH_MARK")
        return out

    @entry
    def send(self, channel: Channel, message: Message) -> list[SourceOutput]:
        """Every message the owner writes on a session channel goes through here (5.9.4)."""
        out = self._out
        kind = type(message)
        state = self._channel_state(channel)
        if kind is MsgMigrate or (state is _SC.NORMAL and kind is MsgMigrateData):
            raise LocalProtocolError(f"{kind.__name__} is sent by the migration machine, not the owner")
        if state is _SC.NORMAL:
            out.append(Send(channel, message))
            return out
        if kind is not MsgMigrateData:
            raise LocalProtocolError(
                f"{kind.__name__} on channel {channel} in state {state.name}: only MIGRATE_DATA may follow MIGRATE"
            )
        self._fire_channel(channel, _MIGRATE_DATA)
        out.append(Send(channel, message))
        self._check_all_switched()
        return out

    @entry
    def migrate_data_streamed(self, channel: Channel) -> list[SourceOutput]:
        """The owner wrote this channel's MIGRATE_DATA itself, its body streamed as it was packed:
        the same step as ``send`` with the message, without handing the body over."""
        out = self._out
        self._fire_channel(channel, _MIGRATE_DATA)
        self._check_all_switched()
        return out

    # actions

    @property
    def _s2(self) -> MigrationDstInfo:
        if self.dst_info is None:
            raise LocalProtocolError("no s2 to migrate to: begin() was never called")
        return self.dst_info

    def _send_begin(self) -> None:
        begin: Message
        if self.state is _S.WAIT_CONNECT_SEAMLESS:
            begin = MsgMainMigrateBeginSeamless(self._s2, MIGRATION_PROTOCOL_VERSION)
        else:
            begin = MsgMainMigrateBegin(self._s2)
        self._out.append(Send(MAIN, begin))
        self._deadline = self._now + self.timeout

    def _connect_succeeded(self, message: Message) -> None:
        self._deadline = None
        seamless = type(message) is MsgcMainMigrateConnectedSeamless
        self.mode = MigrationMode.SEAMLESS if seamless else MigrationMode.SEMI_SEAMLESS
        self._out.append(ConnectComplete(True, seamless))

    def _connect_failed(self, message: Message | None = None) -> None:
        self._deadline = None
        self.mode = MigrationMode.SWITCH_HOST
        self._out.append(ConnectComplete(False, False))

    def _send_cancel(self, message: Message | None = None) -> None:
        self._deadline = None
        self._out.append(Send(MAIN, MsgMainMigrateCancel()))

    def _send_migrate_end(self) -> None:
        self._out.append(Send(MAIN, MsgMainMigrateEnd()))
        self._deadline = self._now + self.timeout

    def _send_switch_host(self) -> None:
        self.mode = MigrationMode.SWITCH_HOST
        self._out.append(Send(MAIN, MsgMainMigrateSwitchHost(self._s2)))
        self._deadline = self._now + self.timeout

    def _roll_back(self) -> None:
        self._deadline = None
        self._flushed.clear()
        self.channels = dict.fromkeys(self.channels, _SC.NORMAL)
        self._out.append(Send(MAIN, MsgMainMigrateCancel()))

    def _send_migrate(self) -> None:
        self._deadline = self._now + self.timeout
        for channel in self.channels:  # main first
            self._out.append(Send(channel, MsgMigrate(self.flags[channel])))
            self._fire_channel(channel, Sent(Migrate.of(self.flags[channel], Origin.LOCAL)))
        self._check_all_switched()

    def _request_migrate_data(self, channel: Channel) -> None:
        self._out.append(MigrateDataRequested(channel))

    def _check_all_switched(self) -> None:
        if self.state is _S.MIGRATING and all(s is _SC.SWITCHED for s in self.channels.values()):
            self._fire(_I.ALL_CHANNELS_SWITCHED)

    def _disconnect(self) -> None:
        self._out.append(DisconnectClient())

    def _stop_timer(self) -> None:
        self._deadline = None
