"""The client: ClientMigration, what spice-gtk does between the two servers (PROTOCOL.md 5.2-5.6),
and the rollback spicewire adds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import Enum, auto
from typing import ClassVar

from spicewire.errors import LocalProtocolError, RemoteProtocolError
from spicewire.protocol.caps import has_cap
from spicewire.protocol.enums import MIGRATE_FLAGS_MASK, MainCap
from spicewire.protocol.messages import (
    Message,
    MigrationDstInfo,
    MsgcMainMigrateConnected,
    MsgcMainMigrateConnectedSeamless,
    MsgcMainMigrateConnectError,
    MsgcMainMigrateDstDoSeamless,
    MsgcMainMigrateEnd,
    MsgcMigrateData,
    MsgcMigrateFlushMark,
    MsgMainInit,
    MsgMainMigrateBegin,
    MsgMainMigrateBeginSeamless,
    MsgMainMigrateCancel,
    MsgMainMigrateDstSeamlessAck,
    MsgMainMigrateDstSeamlessNack,
    MsgMainMigrateEnd,
    MsgMainMigrateSwitchHost,
    MsgMigrate,
    MsgMigrateData,
)
from spicewire.protocol.migration.events import (
    AwaitConfirmation,
    AwaitRollback,
    CloseSource,
    DropDestination,
    DropMigrateData,
    LinkDestination,
    MigrationCompleted,
    Peer,
    ResetChannels,
    RolledBack,
    Send,
    SwitchChannel,
    SwitchHost,
)
from spicewire.protocol.migration.rules import MAIN, Channel, MigrationMode
from spicewire.protocol.migration.table import _migrate_input, _Role


class ClientState(Enum):
    IDLE = auto()
    LINKING_MAIN = auto()  # after MAIN_MIGRATE_BEGIN
    LINKING_MAIN_SEAMLESS = auto()  # after MAIN_MIGRATE_BEGIN_SEAMLESS
    HANDSHAKE = auto()  # DST_DO_SEAMLESS sent; other links proceed meanwhile
    LINKING = auto()  # semi-seamless, other links pending
    LINKING_SEAMLESS = auto()
    CONNECTED = auto()  # CONNECTED sent on s1
    CONNECTED_SEAMLESS = auto()  # CONNECTED_SEAMLESS sent on s1; channels switch one by one
    WAIT_MAIN_INIT = auto()  # semi-seamless: main on s2, MSGC_MAIN_MIGRATE_END sent
    CONFIRMING = auto()  # seamless: every channel on s2; s1's sockets are kept until s2's main speaks
    ROLLING_BACK = auto()  # s2 failed before it confirmed: back on s1's sockets, waiting for its CANCEL
    MIGRATED = auto()  # final: a next migration needs a new machine, with s2 as its s1
    HOST_SWITCHED = auto()  # final: a new session on the new host


class ClientChannelState(Enum):
    ON_S1 = auto()
    WAIT_MIGRATE_DATA = auto()  # after MIGRATE(NEED_DATA_TRANSFER); outgoing messages retained
    FROZEN = auto()  # semi-seamless, between the reset and MAIN_INIT; outgoing messages retained
    ON_S2 = auto()
    HELD = auto()  # rolling back: on s1's socket again, outgoing messages retained until s1 cancels


_C, _CC = ClientState, ClientChannelState
_PRE_MIGRATION = (_C.LINKING_MAIN, _C.LINKING_MAIN_SEAMLESS, _C.HANDSHAKE, _C.LINKING, _C.LINKING_SEAMLESS)
_S2_MAIN_WITH_CAP = "s2 main linked (SEAMLESS_MIGRATE)"
_END_FROM_OLD_SERVER = "MAIN_MIGRATE_END from a server without SEMI_SEAMLESS_MIGRATE"
# Messages only the machine writes, so their order cannot be broken from outside.
_CLIENT_MACHINE_ONLY = (
    MsgcMigrateFlushMark, MsgcMigrateData, MsgcMainMigrateConnected, MsgcMainMigrateConnectedSeamless,
    MsgcMainMigrateConnectError, MsgcMainMigrateDstDoSeamless, MsgcMainMigrateEnd,
)
_S1_SESSION_INPUTS = (
    MsgMainMigrateBegin, MsgMainMigrateBeginSeamless, MsgMainMigrateCancel, MsgMainMigrateEnd,
    MsgMainMigrateSwitchHost,
)


class ClientMigration(_Role):
    """The client (spice-gtk's behaviour, 5.2-5.6) for one session."""

    TABLE: ClassVar[Mapping[tuple, tuple]] = {
        # 5.2: pre-migration
        (_C.IDLE, MsgMainMigrateBegin): (_C.LINKING_MAIN, "_link_main"),
        (_C.IDLE, MsgMainMigrateBeginSeamless): (_C.LINKING_MAIN_SEAMLESS, "_link_main"),
        (_C.LINKING_MAIN, "s2 main linked"): (_C.LINKING, "_link_others"),
        (_C.LINKING_MAIN, _S2_MAIN_WITH_CAP): (_C.LINKING, "_link_others"),
        (_C.LINKING_MAIN_SEAMLESS, "s2 main linked"): (_C.LINKING, "_link_others"),  # not seamless, unasked
        (_C.LINKING_MAIN_SEAMLESS, _S2_MAIN_WITH_CAP): (_C.HANDSHAKE, "_do_seamless"),
        (_C.HANDSHAKE, "s2 linked"): (_C.HANDSHAKE, None),
        (_C.HANDSHAKE, MsgMainMigrateDstSeamlessAck): (_C.LINKING_SEAMLESS, "_check_all_linked"),
        (_C.HANDSHAKE, MsgMainMigrateDstSeamlessNack): (_C.LINKING, "_check_all_linked"),
        (_C.LINKING, "s2 linked"): (_C.LINKING, None),
        (_C.LINKING_SEAMLESS, "s2 linked"): (_C.LINKING_SEAMLESS, None),
        (_C.LINKING, "all linked"): (_C.CONNECTED, "_send_connected"),
        (_C.LINKING_SEAMLESS, "all linked"): (_C.CONNECTED_SEAMLESS, "_send_connected"),
        **{(state, "s2 link failed"): (_C.IDLE, "_connect_error") for state in _PRE_MIGRATION},
        **{(state, MsgMainMigrateCancel): (_C.IDLE, "_abort")
           for state in (*_PRE_MIGRATION, _C.CONNECTED, _C.CONNECTED_SEAMLESS)},
        # 5.3: semi-seamless
        (_C.CONNECTED, MsgMainMigrateEnd): (_C.WAIT_MAIN_INIT, "_switch_main"),
        (_C.CONNECTED, _END_FROM_OLD_SERVER): (_C.CONNECTED, None),  # spice-gtk ignores it
        (_C.WAIT_MAIN_INIT, MsgMainInit): (_C.MIGRATED, "_switch_others"),
        # 5.4: seamless, the channel table does the work
        (_C.CONNECTED_SEAMLESS, MsgMigrate): (_C.CONNECTED_SEAMLESS, "_channel_input"),
        (_C.CONNECTED_SEAMLESS, MsgMigrateData): (_C.CONNECTED_SEAMLESS, "_channel_input"),
        (_C.CONNECTED_SEAMLESS, "all switched"): (_C.CONFIRMING, "_await_confirmation"),
        (_C.CONNECTED_SEAMLESS, "s2 spoke"): (_C.CONNECTED_SEAMLESS, "_note_s2_spoke"),
        (_C.CONFIRMING, "s2 spoke"): (_C.MIGRATED, "_seamless_done"),
        (_C.CONFIRMING, "confirmation due"): (_C.MIGRATED, "_seamless_done"),
        # Not in spice-gtk: s2 fails before it confirmed. While s1 still holds the session (our s1
        # keeps it until s2 reports it restored) the client goes back to s1's sockets; s1 answers
        # with MIGRATE_CANCEL once it has resumed the session, and what was retained or written to
        # s2 meanwhile goes to s1 (at least once). Without that CANCEL the session ends.
        (_C.CONNECTED_SEAMLESS, "s2 failed"): (_C.ROLLING_BACK, "_return_to_s1"),
        (_C.CONFIRMING, "s2 failed"): (_C.ROLLING_BACK, "_return_to_s1"),
        (_C.ROLLING_BACK, "s2 failed"): (_C.ROLLING_BACK, None),
        (_C.ROLLING_BACK, MsgMainMigrateCancel): (_C.ROLLING_BACK, "_s1_took_back"),
        (_C.ROLLING_BACK, "all back"): (_C.IDLE, "_rolled_back"),
        (_C.ROLLING_BACK, MsgMigrateData): (_C.ROLLING_BACK, "_channel_input"),
        # 5.6: switch host, whenever s1 gives up on s2
        **{(state, MsgMainMigrateSwitchHost): (_C.HOST_SWITCHED, "_switch_host")
           for state in (_C.IDLE, *_PRE_MIGRATION, _C.CONNECTED)},
    }

    CHANNEL_TABLE: ClassVar[Mapping[tuple, tuple]] = {
        # 5.4: per channel, SPICE_MSG_MIGRATE from s1
        (_CC.ON_S1, "MIGRATE"): (_CC.ON_S2, "_switch"),
        (_CC.ON_S1, "MIGRATE(NEED_FLUSH)"): (_CC.ON_S2, "_flush_and_switch"),
        (_CC.ON_S1, "MIGRATE(NEED_DATA_TRANSFER)"): (_CC.WAIT_MIGRATE_DATA, None),
        (_CC.ON_S1, "MIGRATE(NEED_FLUSH|NEED_DATA_TRANSFER)"): (_CC.WAIT_MIGRATE_DATA, "_flush_mark"),
        (_CC.WAIT_MIGRATE_DATA, MsgMigrateData): (_CC.ON_S2, "_switch_with_data"),
        # rolling back
        (_CC.ON_S1, "return"): (_CC.HELD, None),
        (_CC.ON_S2, "return"): (_CC.HELD, "_switch_back"),
        (_CC.WAIT_MIGRATE_DATA, "return"): (_CC.WAIT_MIGRATE_DATA, None),
        (_CC.HELD, "return"): (_CC.HELD, None),
        (_CC.WAIT_MIGRATE_DATA, "MIGRATE_DATA for nobody"): (_CC.HELD, "_drop_migrate_data"),
        (_CC.HELD, "resume"): (_CC.ON_S1, "_release"),
        (_CC.WAIT_MIGRATE_DATA, "resume"): (_CC.WAIT_MIGRATE_DATA, None),
        # 5.3: semi-seamless, main at MAIN_MIGRATE_END, the others at MAIN_INIT
        (_CC.ON_S1, "switch"): (_CC.ON_S2, "_switch"),
        (_CC.ON_S1, "freeze"): (_CC.FROZEN, None),
        (_CC.FROZEN, "switch"): (_CC.ON_S2, "_switch"),
        # 5.5: MIGRATE_CANCEL switches back whatever had switched
        (_CC.ON_S1, "switch back"): (_CC.ON_S1, None),
        (_CC.WAIT_MIGRATE_DATA, "switch back"): (_CC.ON_S1, "_release"),
        (_CC.ON_S2, "switch back"): (_CC.ON_S1, "_switch_back"),
    }

    def __init__(self, session_id: int, channels: Iterable[Channel], server_main_caps: Sequence[int]) -> None:
        """``channels``: every channel object of the session (5.9.7), main included or not."""
        ordered = [MAIN, *(channel for channel in channels if channel != MAIN)]
        super().__init__(_C.IDLE, dict.fromkeys(ordered, _CC.ON_S1))
        self.session_id = session_id
        self.server_main_caps = tuple(server_main_caps)
        self.mode: MigrationMode | None = None
        self.dst_info: MigrationDstInfo | None = None
        self._src_version = 0
        self._pending_links: set[Channel] = set()
        self._destination_open = False
        self._retained: dict[Channel, list[Message]] = {channel: [] for channel in ordered}
        # Written to s2 before it confirmed: sent to s1 again if the migration rolls back.
        self._unconfirmed: dict[Channel, list[Message]] = {channel: [] for channel in ordered}
        self._s2_spoke = False
        self._post_migration = False  # SPICE_MSG_MIGRATE arrived: some channel has begun to switch
        self._cancelled = False  # rolling back: s1's CANCEL came; channels resume as they drain
        self.rolled_back = False  # this attempt ended back on s1 after s1's CANCEL
        self.last_resent: dict[Channel, int] = {}  # after a rollback: messages written to s2 and resent

    # inputs

    def receive(self, peer: Peer, channel: Channel, message: Message) -> list:
        """A message read from ``peer`` on ``channel``. The owner still handles ordinary messages
        (MAIN_INIT included) itself; the migration messages are consumed here."""
        out = self._begin_call()
        kind = type(message)
        state = self._channel_state(channel)
        if peer is Peer.S1:
            if state is _CC.WAIT_MIGRATE_DATA and kind is not MsgMigrateData:
                # 5.4 step 2: the switch is aborted and the channel stays on s1; messages retained
                # meanwhile go to s1 with the next send().
                self.channels[channel] = _CC.ON_S1
                raise RemoteProtocolError(f"{kind.__name__} on channel {channel} where MIGRATE_DATA must follow MIGRATE")
            if state not in (_CC.ON_S1, _CC.WAIT_MIGRATE_DATA, _CC.HELD):
                raise LocalProtocolError(f"channel {channel} has left s1: its s1 connection is not read")
            if kind in (MsgMigrate, MsgMigrateData):
                self._fire(kind, channel, message)
            elif kind in _S1_SESSION_INPUTS:
                if channel != MAIN:
                    raise RemoteProtocolError(f"{kind.__name__} on channel {channel}")
                if kind is MsgMainMigrateCancel and self.state is _C.CONNECTED_SEAMLESS and self._post_migration:
                    # Post-migration: s1 took the session back, whether or not we saw s2 fail.
                    # MIGRATE_DATA may still be on its way on other channels: they drain it first.
                    self._fire("s2 failed")
                end_ignored = kind is MsgMainMigrateEnd and not has_cap(
                    self.server_main_caps, MainCap.SEMI_SEAMLESS_MIGRATE
                )
                self._fire(_END_FROM_OLD_SERVER if end_ignored else kind, message, error=RemoteProtocolError)
        elif channel == MAIN and kind in (MsgMainMigrateDstSeamlessAck, MsgMainMigrateDstSeamlessNack, MsgMainInit):
            self._fire(kind, message)
        elif channel == MAIN and self.state in (_C.HANDSHAKE, _C.WAIT_MAIN_INIT):
            raise RemoteProtocolError(f"{kind.__name__} from s2 main in state {self.state.name}")
        elif state is not _CC.ON_S2:
            raise LocalProtocolError(f"channel {channel} is frozen on s2: its connection is not read yet")
        return out

    def s2_linked(self, channel: Channel, main_caps: Sequence[int] = ()) -> list:
        """The link of ``channel`` to s2 succeeded; for main, ``main_caps`` are s2's main caps."""
        out = self._begin_call()
        if channel == MAIN:
            self._fire(_S2_MAIN_WITH_CAP if has_cap(main_caps, MainCap.SEAMLESS_MIGRATE) else "s2 main linked")
        else:
            if channel not in self._pending_links:
                raise LocalProtocolError(f"no link of channel {channel} to s2 is pending")
            self._pending_links.discard(channel)
            self._fire("s2 linked")
        self._check_all_linked()
        return out

    def s2_spoke(self) -> list:
        """s2's main channel sent something after main switched: it has the session (s2 speaks
        once every channel is restored; spice-gtk too lets go of s1 only then)."""
        out = self._begin_call()
        if self.state in (_C.CONNECTED_SEAMLESS, _C.CONFIRMING):
            self._fire("s2 spoke")
        return out

    def confirmation_due(self) -> list:
        """s2 said nothing within the grace the owner allows after the last switch: done anyway."""
        out = self._begin_call()
        if self.state is _C.CONFIRMING:
            self._fire("confirmation due")
        return out

    def s2_failed(self) -> list:
        """A connection to s2 broke during seamless post-migration, before s2 confirmed."""
        out = self._begin_call()
        self._fire("s2 failed")
        return out

    def s2_link_failed(self, channel: Channel) -> list:
        """TCP error, 10 s connect timeout or a non-OK link result on the way to s2."""
        out = self._begin_call()
        self._fire("s2 link failed")
        return out

    def send(self, channel: Channel, message: Message) -> list:
        """Every message the owner writes on a channel: routed to the server the channel is on, or
        retained while the channel is between servers."""
        out = self._begin_call()
        if isinstance(message, _CLIENT_MACHINE_ONLY):
            raise LocalProtocolError(f"{type(message).__name__} is sent by the migration machine, not the owner")
        state = self._channel_state(channel)
        if state in (_CC.WAIT_MIGRATE_DATA, _CC.FROZEN, _CC.HELD):
            self._retained[channel].append(message)
        else:
            self._release(channel)
            out.append(Send(channel, message, Peer.S2 if state is _CC.ON_S2 else Peer.S1))
            if state is _CC.ON_S2 and self.state in (_C.CONNECTED_SEAMLESS, _C.CONFIRMING):
                self._unconfirmed[channel].append(message)
        return out

    # session actions

    def _link_main(self, message: Message) -> None:
        self.dst_info, self._destination_open = message.dst_info, True
        self._src_version = getattr(message, "src_mig_version", 0)
        self._out.append(LinkDestination(self.dst_info, self.session_id, (MAIN,)))

    def _link_others(self) -> None:
        others = tuple(channel for channel in self.channels if channel != MAIN)
        self._pending_links = set(others)
        if others:
            self._out.append(LinkDestination(self.dst_info, self.session_id, others))

    def _do_seamless(self) -> None:
        self._out.append(Send(MAIN, MsgcMainMigrateDstDoSeamless(self._src_version), Peer.S2))
        self._link_others()

    def _check_all_linked(self, answer: Message | None = None) -> None:
        if self.state in (_C.LINKING, _C.LINKING_SEAMLESS) and not self._pending_links:
            self._fire("all linked")

    def _send_connected(self) -> None:
        seamless = self.state is _C.CONNECTED_SEAMLESS
        self.mode = MigrationMode.SEAMLESS if seamless else MigrationMode.SEMI_SEAMLESS
        connected = MsgcMainMigrateConnectedSeamless() if seamless else MsgcMainMigrateConnected()
        self._out.append(Send(MAIN, connected, Peer.S1))

    def _connect_error(self) -> None:
        self._out.append(Send(MAIN, MsgcMainMigrateConnectError(), Peer.S1))
        self._reset_attempt()

    def _abort(self, message: Message) -> None:
        for channel in self.channels:
            self._fire_channel(channel, "switch back")
        self._reset_attempt()

    def _reset_attempt(self) -> None:
        self.mode, self._pending_links, self._destination_open = None, set(), False
        self._post_migration = False
        self._out.append(DropDestination())

    def _switch_main(self, message: Message) -> None:
        self._out.append(ResetChannels())
        self._retained = {channel: [] for channel in self.channels}  # 5.3 step 1: unsent queues go
        self._fire_channel(MAIN, "switch")
        for channel in self.channels:
            if channel != MAIN:
                self._fire_channel(channel, "freeze")
        self._out.append(Send(MAIN, MsgcMainMigrateEnd(), Peer.S2))

    def _switch_others(self, message: Message) -> None:
        self.session_id = message.session_id
        for channel in self.channels:
            if channel != MAIN:
                self._fire_channel(channel, "switch")
        self._out.append(MigrationCompleted(MigrationMode.SEMI_SEAMLESS))

    def _channel_input(self, channel: Channel, message: Message) -> None:
        if self.state is _C.ROLLING_BACK:  # MIGRATE_DATA of a channel that had not switched yet
            self._fire_channel(channel, "MIGRATE_DATA for nobody", message)
            if self._cancelled:
                self._resume(channel)
                self._check_all_back()
            return
        self._post_migration = True
        if type(message) is MsgMigrate:
            if message.flags & ~MIGRATE_FLAGS_MASK:
                raise RemoteProtocolError(f"MIGRATE flags {message.flags:#x} on channel {channel}")
            self._fire_channel(channel, _migrate_input(message.flags), error=RemoteProtocolError)
        else:
            self._fire_channel(channel, MsgMigrateData, message)
        if all(state is _CC.ON_S2 for state in self.channels.values()):
            self._fire("all switched")

    def _await_confirmation(self) -> None:
        if self._s2_spoke:
            self._fire("s2 spoke")
        else:
            self._out.append(AwaitConfirmation())

    def _note_s2_spoke(self) -> None:
        self._s2_spoke = True

    def _seamless_done(self) -> None:
        self._unconfirmed = {channel: [] for channel in self.channels}
        self._out.append(CloseSource())
        self._out.append(MigrationCompleted(MigrationMode.SEAMLESS))

    def _return_to_s1(self) -> None:
        for channel in self.channels:
            self._fire_channel(channel, "return")
        self._out.append(AwaitRollback())

    def _s1_took_back(self, message: Message) -> None:
        self._cancelled = True
        self.last_resent = {channel: len(sent) for channel, sent in self._unconfirmed.items()}
        for channel in self.channels:
            self._resume(channel)
        self._check_all_back()

    def _resume(self, channel: Channel) -> None:
        """Rolled back: a channel back on s1 (not one still draining its MIGRATE_DATA) sends s1 first
        what s2 may never have received, then what it held meanwhile."""
        if self.channels[channel] is _CC.HELD:
            self._retained[channel][:0] = self._unconfirmed[channel]
            self._unconfirmed[channel] = []
            self._fire_channel(channel, "resume")

    def _check_all_back(self) -> None:
        if self._cancelled and all(state is _CC.ON_S1 for state in self.channels.values()):
            self._fire("all back")

    def _rolled_back(self) -> None:
        self._cancelled = False
        self.rolled_back = True
        self._reset_attempt()
        self._out.append(RolledBack())

    def _switch_host(self, message: Message) -> None:
        if self._destination_open:
            self._reset_attempt()
        self.session_id = 0
        self._out.append(SwitchHost(message.dst_info))

    # channel actions

    def _flush_mark(self, channel: Channel) -> None:
        # Written at once, ahead of the queued messages, which stay retained for s2.
        self._out.append(Send(channel, MsgcMigrateFlushMark(), Peer.S1))

    def _switch(self, channel: Channel) -> None:
        self._out.append(SwitchChannel(channel, Peer.S2))
        self._release(channel)

    def _flush_and_switch(self, channel: Channel) -> None:
        self._flush_mark(channel)
        self._switch(channel)

    def _switch_with_data(self, channel: Channel, message: MsgMigrateData) -> None:
        self._out.append(SwitchChannel(channel, Peer.S2))
        # The body goes back byte for byte: it is opaque to the client (6).
        self._out.append(Send(channel, MsgcMigrateData(message.data), Peer.S2))
        self._release(channel)

    def _switch_back(self, channel: Channel) -> None:
        self._out.append(SwitchChannel(channel, Peer.S1))

    def _drop_migrate_data(self, channel: Channel, message: MsgMigrateData) -> None:
        self._out.append(DropMigrateData(channel, message.data))

    def _release(self, channel: Channel) -> None:
        state = self.channels[channel]
        peer = Peer.S2 if state is _CC.ON_S2 else Peer.S1
        retained, self._retained[channel] = self._retained[channel], []
        self._out.extend(Send(channel, message, peer) for message in retained)
        if peer is Peer.S2 and self.state in (_C.CONNECTED_SEAMLESS, _C.CONFIRMING):
            self._unconfirmed[channel] += retained
