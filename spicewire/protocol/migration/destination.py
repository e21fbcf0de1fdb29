"""s2: DestinationMigration (PROTOCOL.md 5.2-5.4, 5.7)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from enum import Enum, auto
from typing import Any, ClassVar

from spicewire.errors import CodecError, LocalProtocolError, RemoteProtocolError
from spicewire.protocol.caps import has_cap
from spicewire.protocol.enums import MIGRATION_PROTOCOL_VERSION, MainCap, MigrateFlags
from spicewire.protocol.messages import (
    Message,
    MsgcMainMigrateDstDoSeamless,
    MsgcMainMigrateEnd,
    MsgcMigrateData,
    MsgMainInit,
    MsgMainMigrateDstSeamlessAck,
    MsgMainMigrateDstSeamlessNack,
)
from spicewire.protocol.migrate_data import parse_migrate_data
from spicewire.protocol.migration.events import (
    AttachChannel,
    DestinationInput,
    DestinationOutput,
    MigrationCompleted,
    Received,
    RestoreMigrateData,
    Send,
)
from spicewire.protocol.migration.rules import MAIN, Channel, MigrationMode, default_migrate_flags, main_init
from spicewire.protocol.migration.table import Table, _Role, entry


class DestinationState(Enum):
    PRE_MIGRATION = auto()  # MAIN linked with connection_id != 0; no MAIN_INIT
    SEMI_SEAMLESS = auto()  # DST_DO_SEAMLESS was refused: MIGRATE_END comes next
    SEAMLESS = auto()  # ACK sent; waiting for every channel's MIGRATE_DATA
    MIGRATED = auto()


class DestinationChannelState(Enum):
    PARKED = auto()  # link answered OK, socket not read
    ATTACHED = auto()
    WAIT_MIGRATE_DATA = auto()


_D, _DC = DestinationState, DestinationChannelState
_I = DestinationInput
_DO_SEAMLESS, _END, _MIGRATE_DATA = (
    Received(kind) for kind in (MsgcMainMigrateDstDoSeamless, MsgcMainMigrateEnd, MsgcMigrateData)
)

DEFAULT_MAIN_INIT = main_init(0)


class DestinationMigration(_Role):
    """s2 for one migrating client; create it when a MAIN link with connection_id != 0 that s1
    announced arrives (checking the announcement is the owner's job)."""

    TABLE: ClassVar[Table] = {
        # 5.2: s2 on DST_DO_SEAMLESS
        (_D.PRE_MIGRATION, _DO_SEAMLESS): (_D.SEAMLESS, "_ack"),
        (_D.PRE_MIGRATION, _I.DO_SEAMLESS_REFUSED): (_D.SEMI_SEAMLESS, "_nack"),
        # 5.3: semi-seamless
        (_D.PRE_MIGRATION, _END): (_D.MIGRATED, "_send_main_init"),
        (_D.SEMI_SEAMLESS, _END): (_D.MIGRATED, "_send_main_init"),
        (_D.PRE_MIGRATION, _I.END_WITHOUT_CAP): (_D.PRE_MIGRATION, None),  # spice-server warns and ignores it
        (_D.SEMI_SEAMLESS, _I.END_WITHOUT_CAP): (_D.SEMI_SEAMLESS, None),
        # 5.4: seamless
        (_D.SEAMLESS, _I.ALL_RESTORED): (_D.MIGRATED, "_seamless_done"),
    }

    CHANNEL_TABLE: ClassVar[Table] = {
        (_DC.PARKED, _I.ATTACH): (_DC.ATTACHED, "_attach"),
        (_DC.PARKED, _I.ATTACH_WAITING): (_DC.WAIT_MIGRATE_DATA, "_attach"),
        (_DC.ATTACHED, _I.WAIT_FOR_MIGRATE_DATA): (_DC.WAIT_MIGRATE_DATA, None),
        (_DC.WAIT_MIGRATE_DATA, _MIGRATE_DATA): (_DC.ATTACHED, "_restore"),
    }

    def __init__(
        self,
        connection_id: int,
        client_main_caps: Sequence[int],
        *,
        seamless_enabled: bool = True,
        main_init: MsgMainInit = DEFAULT_MAIN_INIT,
        channel_flags: Mapping[Channel, int] | None = None,
    ) -> None:
        if connection_id == 0:
            raise LocalProtocolError("a MAIN link with connection_id 0 starts a new session, not a migration")
        super().__init__(_D.PRE_MIGRATION, {MAIN: _DC.ATTACHED})
        self.connection_id = connection_id
        self.client_main_caps = tuple(client_main_caps)
        self.seamless_enabled = seamless_enabled
        self.main_init = dataclasses.replace(main_init, session_id=connection_id)  # same session id
        self._channel_flags = dict(channel_flags or {})
        self.mode: MigrationMode | None = None

    def flags(self, channel: Channel) -> MigrateFlags:
        return MigrateFlags(self._channel_flags.get(channel, default_migrate_flags(channel[0])))

    @entry
    def channel_linked(self, channel: Channel) -> list[DestinationOutput]:
        """A non-main link with this connection_id; the owner has answered it OK."""
        out = self._out
        if channel in self.channels:
            raise LocalProtocolError(f"channel {channel} is already linked")
        self.channels[channel] = _DC.PARKED
        if self.state is _D.SEAMLESS:
            self._attach_parked(channel)
        elif self.state is _D.MIGRATED:
            self._fire_channel(channel, _I.ATTACH)
        return out

    @entry
    def receive(self, channel: Channel, message: Message) -> list[DestinationOutput]:
        """Every client message on an attached channel of this session."""
        out = self._out
        kind = type(message)
        state = self._channel_state(channel)
        if state is _DC.PARKED:
            raise LocalProtocolError(f"channel {channel} is parked: its socket must not be read yet")
        if isinstance(message, MsgcMigrateData):
            if not self.flags(channel) & MigrateFlags.NEED_DATA_TRANSFER:
                return out  # 5.4: ignored on channels without data transfer
            data = None
            if state is _DC.WAIT_MIGRATE_DATA:
                try:
                    data = parse_migrate_data(channel[0], message.data)
                except CodecError as exc:
                    raise RemoteProtocolError(f"MIGRATE_DATA on channel {channel}: {exc}") from exc
            self._fire_channel(channel, _MIGRATE_DATA, data)
            if self.state is _D.SEAMLESS and _DC.WAIT_MIGRATE_DATA not in self.channels.values():
                self._fire(_I.ALL_RESTORED)
        elif state is _DC.WAIT_MIGRATE_DATA:
            # 5.7: data before the restore would break its empty-queue precondition
            raise RemoteProtocolError(f"{kind.__name__} on channel {channel} before its MIGRATE_DATA")
        elif channel == MAIN and self.state in (_D.PRE_MIGRATION, _D.SEMI_SEAMLESS):
            self._fire(self._main_input(message), message)
        elif kind in (MsgcMainMigrateDstDoSeamless, MsgcMainMigrateEnd):
            self._fire(Received(kind), message)
        return out

    def _main_input(self, message: Message) -> Received | DestinationInput:
        # There is no down-conversion: a newer source gets semi-seamless (6).
        if type(message) is MsgcMainMigrateDstDoSeamless and (
            message.src_version > MIGRATION_PROTOCOL_VERSION or not self.seamless_enabled
        ):
            return _I.DO_SEAMLESS_REFUSED
        if type(message) is MsgcMainMigrateEnd and not has_cap(self.client_main_caps, MainCap.SEMI_SEAMLESS_MIGRATE):
            return _I.END_WITHOUT_CAP
        return Received(type(message))

    def _attach_parked(self, channel: Channel) -> None:
        waits = bool(self.flags(channel) & MigrateFlags.NEED_DATA_TRANSFER)
        self._fire_channel(channel, _I.ATTACH_WAITING if waits else _I.ATTACH)

    def _ack(self, message: Message) -> None:
        self.mode = MigrationMode.SEAMLESS
        for channel, state in list(self.channels.items()):
            if state is _DC.PARKED:
                self._attach_parked(channel)
            elif self.flags(channel) & MigrateFlags.NEED_DATA_TRANSFER:
                self._fire_channel(channel, _I.WAIT_FOR_MIGRATE_DATA)
        self._out.append(Send(MAIN, MsgMainMigrateDstSeamlessAck()))

    def _nack(self, message: Message) -> None:
        self._out.append(Send(MAIN, MsgMainMigrateDstSeamlessNack()))

    def _send_main_init(self, message: Message) -> None:
        self.mode = MigrationMode.SEMI_SEAMLESS
        self._out.append(Send(MAIN, self.main_init))
        for channel, state in list(self.channels.items()):
            if state is _DC.PARKED:
                self._fire_channel(channel, _I.ATTACH)
        self._out.append(MigrationCompleted(MigrationMode.SEMI_SEAMLESS))

    def _attach(self, channel: Channel) -> None:
        self._out.append(AttachChannel(channel, self.channels[channel] is _DC.WAIT_MIGRATE_DATA))

    def _restore(self, channel: Channel, data: Any) -> None:
        self._out.append(RestoreMigrateData(channel, data))

    def _seamless_done(self) -> None:
        self._out.append(MigrationCompleted(MigrationMode.SEAMLESS))
