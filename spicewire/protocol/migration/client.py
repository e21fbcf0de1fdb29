"""The client: ClientMigration, what spice-gtk does between the two servers (PROTOCOL.md 5.2-5.6),
and the rollback spicewire adds."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum, auto
from typing import ClassVar

from spicewire.errors import LocalProtocolError, RemoteProtocolError
from spicewire.protocol.caps import has_cap
from spicewire.protocol.enums import MainCap
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
    ClientChannelInput,
    ClientInput,
    ClientOutput,
    CloseSource,
    DropDestination,
    DropMigrateData,
    LinkDestination,
    Migrate,
    MigrateDataBody,
    MigrationCompleted,
    Origin,
    Peer,
    Received,
    RelayMigrateData,
    ResetChannels,
    RolledBack,
    Send,
    SessionLost,
    SwitchChannel,
    SwitchHost,
)
from spicewire.protocol.migration.rules import MAIN, Channel, MigrationMode
from spicewire.protocol.migration.table import Table, _Role, entry


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
    LOST = auto()  # final: rolling back, s1 never took the session back
    HOST_SWITCHED = auto()  # final: a new session on the new host


class ClientChannelState(Enum):
    ON_S1 = auto()
    WAIT_MIGRATE_DATA = auto()  # after MIGRATE(NEED_DATA_TRANSFER); outgoing messages retained
    FROZEN = auto()  # semi-seamless, between the reset and MAIN_INIT; outgoing messages retained
    ON_S2 = auto()
    HELD = auto()  # rolling back: on s1's socket again, outgoing messages retained until s1 cancels


_C, _CC = ClientState, ClientChannelState
_PRE_MIGRATION = (_C.LINKING_MAIN, _C.LINKING_MAIN_SEAMLESS, _C.HANDSHAKE, _C.LINKING, _C.LINKING_SEAMLESS)
_I, _CI = ClientInput, ClientChannelInput
(_BEGIN, _BEGIN_SEAMLESS, _CANCEL, _END, _SWITCH_HOST, _ACK, _NACK, _MAIN_INIT, _MIGRATE_DATA) = (
    Received(kind) for kind in (
        MsgMainMigrateBegin, MsgMainMigrateBeginSeamless, MsgMainMigrateCancel, MsgMainMigrateEnd,
        MsgMainMigrateSwitchHost, MsgMainMigrateDstSeamlessAck, MsgMainMigrateDstSeamlessNack, MsgMainInit,
        MsgMigrateData,
    )
)
HANDSHAKE_TIMEOUT = 10.0  # spice-gtk has none; s1 gives up after its own 10 s anyway (7.6)
CONFIRM_GRACE = 10.0
"""After the last switch, s1's sockets are kept until s2's main speaks (ours and spice-server both
send MULTI_MEDIA_TIME once every channel is restored), s1 lets go of main, or this long."""
ROLLBACK_TIMEOUT = 60.0
"""s2 failed mid-migration: how long to wait on s1's sockets for its MIGRATE_CANCEL. Our s1 rolls
back as soon as it learns s2 failed, at the latest at its own migration timeout."""
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

    TABLE: ClassVar[Table] = {
        # 5.2: pre-migration
        (_C.IDLE, _BEGIN): (_C.LINKING_MAIN, "_link_main"),
        (_C.IDLE, _BEGIN_SEAMLESS): (_C.LINKING_MAIN_SEAMLESS, "_link_main"),
        (_C.LINKING_MAIN, _I.S2_MAIN_LINKED): (_C.LINKING, "_link_others"),
        (_C.LINKING_MAIN, _I.S2_MAIN_LINKED_SEAMLESS): (_C.LINKING, "_link_others"),
        (_C.LINKING_MAIN_SEAMLESS, _I.S2_MAIN_LINKED): (_C.LINKING, "_link_others"),  # not seamless, unasked
        (_C.LINKING_MAIN_SEAMLESS, _I.S2_MAIN_LINKED_SEAMLESS): (_C.HANDSHAKE, "_do_seamless"),
        (_C.HANDSHAKE, _I.S2_LINKED): (_C.HANDSHAKE, None),
        (_C.HANDSHAKE, _ACK): (_C.LINKING_SEAMLESS, "_check_all_linked"),
        (_C.HANDSHAKE, _NACK): (_C.LINKING, "_check_all_linked"),
        (_C.LINKING, _I.S2_LINKED): (_C.LINKING, None),
        (_C.LINKING_SEAMLESS, _I.S2_LINKED): (_C.LINKING_SEAMLESS, None),
        (_C.LINKING, _I.ALL_LINKED): (_C.CONNECTED, "_send_connected"),
        (_C.LINKING_SEAMLESS, _I.ALL_LINKED): (_C.CONNECTED_SEAMLESS, "_send_connected"),
        **{(state, _I.S2_LINK_FAILED): (_C.IDLE, "_connect_error") for state in _PRE_MIGRATION},
        **{(state, _CANCEL): (_C.IDLE, "_abort")
           for state in (*_PRE_MIGRATION, _C.CONNECTED, _C.CONNECTED_SEAMLESS)},
        # 5.3: semi-seamless
        (_C.CONNECTED, _END): (_C.WAIT_MAIN_INIT, "_switch_main"),
        (_C.CONNECTED, _I.END_FROM_OLD_SERVER): (_C.CONNECTED, None),  # spice-gtk ignores it
        (_C.WAIT_MAIN_INIT, _MAIN_INIT): (_C.MIGRATED, "_switch_others"),
        # 5.4: seamless, the channel table does the work
        **{(_C.CONNECTED_SEAMLESS, Received(migrate)): (_C.CONNECTED_SEAMLESS, "_channel_input")
           for migrate in Migrate},
        (_C.CONNECTED_SEAMLESS, _MIGRATE_DATA): (_C.CONNECTED_SEAMLESS, "_channel_input"),
        (_C.CONNECTED_SEAMLESS, _I.ALL_SWITCHED): (_C.CONFIRMING, "_await_confirmation"),
        (_C.CONNECTED_SEAMLESS, _I.S2_SPOKE): (_C.CONNECTED_SEAMLESS, "_note_s2_spoke"),
        (_C.CONFIRMING, _I.S2_SPOKE): (_C.MIGRATED, "_seamless_done"),
        (_C.CONFIRMING, _I.CONFIRMATION_DUE): (_C.MIGRATED, "_seamless_done"),
        (_C.CONFIRMING, _I.S1_LET_GO): (_C.MIGRATED, "_seamless_done"),
        # Not in spice-gtk: s2 fails before it confirmed. While s1 still holds the session (our s1
        # keeps it until s2 reports it restored) the client goes back to s1's sockets; s1 answers
        # with MIGRATE_CANCEL once it has resumed the session, and what was retained or written to
        # s2 meanwhile goes to s1 (at least once). Without that CANCEL the session ends.
        (_C.CONNECTED_SEAMLESS, _I.S2_FAILED): (_C.ROLLING_BACK, "_return_to_s1"),
        (_C.CONFIRMING, _I.S2_FAILED): (_C.ROLLING_BACK, "_return_to_s1"),
        (_C.ROLLING_BACK, _I.S2_FAILED): (_C.ROLLING_BACK, None),
        (_C.ROLLING_BACK, _CANCEL): (_C.ROLLING_BACK, "_s1_took_back"),
        (_C.ROLLING_BACK, _I.ALL_BACK): (_C.IDLE, "_rolled_back"),
        (_C.ROLLING_BACK, _MIGRATE_DATA): (_C.ROLLING_BACK, "_channel_input"),
        (_C.ROLLING_BACK, _I.ROLLBACK_TIMEOUT): (_C.LOST, "_lost"),
        # s2 main said neither ACK nor NACK in time: as a failed link
        (_C.HANDSHAKE, _I.HANDSHAKE_TIMEOUT): (_C.IDLE, "_connect_error"),
        # 5.6: switch host, whenever s1 gives up on s2
        **{(state, _SWITCH_HOST): (_C.HOST_SWITCHED, "_switch_host")
           for state in (_C.IDLE, *_PRE_MIGRATION, _C.CONNECTED)},
    }

    CHANNEL_TABLE: ClassVar[Table] = {
        # 5.4: per channel, SPICE_MSG_MIGRATE from s1
        (_CC.ON_S1, Received(Migrate.PLAIN)): (_CC.ON_S2, "_switch"),
        (_CC.ON_S1, Received(Migrate.NEED_FLUSH)): (_CC.ON_S2, "_flush_and_switch"),
        (_CC.ON_S1, Received(Migrate.NEED_DATA_TRANSFER)): (_CC.WAIT_MIGRATE_DATA, None),
        (_CC.ON_S1, Received(Migrate.NEED_FLUSH_AND_DATA_TRANSFER)): (_CC.WAIT_MIGRATE_DATA, "_flush_mark"),
        (_CC.WAIT_MIGRATE_DATA, _MIGRATE_DATA): (_CC.ON_S2, "_switch_with_data"),
        # 5.4 step 2: anything else is dropped and the switch of that channel is aborted; what it
        # retained meanwhile goes to s1 with its next send()
        (_CC.WAIT_MIGRATE_DATA, _CI.NOT_MIGRATE_DATA): (_CC.ON_S1, None),
        # rolling back
        (_CC.ON_S1, _CI.RETURN): (_CC.HELD, None),
        (_CC.ON_S2, _CI.RETURN): (_CC.HELD, "_switch_back"),
        (_CC.WAIT_MIGRATE_DATA, _CI.RETURN): (_CC.WAIT_MIGRATE_DATA, None),
        (_CC.HELD, _CI.RETURN): (_CC.HELD, None),
        (_CC.WAIT_MIGRATE_DATA, _CI.MIGRATE_DATA_FOR_NOBODY): (_CC.HELD, "_drop_migrate_data"),
        (_CC.HELD, _CI.RESUME): (_CC.ON_S1, "_release"),
        (_CC.WAIT_MIGRATE_DATA, _CI.RESUME): (_CC.WAIT_MIGRATE_DATA, None),
        # 5.3: semi-seamless, main at MAIN_MIGRATE_END, the others at MAIN_INIT
        (_CC.ON_S1, _CI.SWITCH): (_CC.ON_S2, "_switch"),
        (_CC.ON_S1, _CI.FREEZE): (_CC.FROZEN, None),
        (_CC.FROZEN, _CI.SWITCH): (_CC.ON_S2, "_switch"),
        # 5.5: MIGRATE_CANCEL switches back whatever had switched
        (_CC.ON_S1, _CI.SWITCH_BACK): (_CC.ON_S1, None),
        (_CC.WAIT_MIGRATE_DATA, _CI.SWITCH_BACK): (_CC.ON_S1, "_release"),
        (_CC.ON_S2, _CI.SWITCH_BACK): (_CC.ON_S1, "_switch_back"),
    }

    def __init__(
        self,
        session_id: int,
        channels: Iterable[Channel],
        server_main_caps: Sequence[int],
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        confirm_grace: float = CONFIRM_GRACE,
        rollback_timeout: float = ROLLBACK_TIMEOUT,
    ) -> None:
        """``channels``: every channel object of the session (5.9.7), main included or not."""
        ordered = [MAIN, *(channel for channel in channels if channel != MAIN)]
        super().__init__(_C.IDLE, dict.fromkeys(ordered, _CC.ON_S1))
        self.session_id = session_id
        self.server_main_caps = tuple(server_main_caps)
        self.handshake_timeout = handshake_timeout
        self.confirm_grace = confirm_grace
        self.rollback_timeout = rollback_timeout
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
        # One deadline at a time, each tied to the state that set it: leaving that state disarms it.
        self._timer: tuple[float, Enum, ClientInput] | None = None
        self._now: float | None = None

    # time

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must be called next, if ever."""
        if self.failed or self._timer is None or self._timer[1] is not self.state:
            return None
        return self._timer[0]

    @entry
    def handle_timer(self, now: float) -> list[ClientOutput]:
        out = self._out
        deadline = self.get_timer()
        if deadline is not None and now >= deadline:
            assert self._timer is not None
            inp, self._timer = self._timer[2], None
            self._now = now
            self._fire(inp)
        return out

    def _arm(self, seconds: float, inp: ClientInput) -> None:
        if self._now is None:
            raise LocalProtocolError(f"{self.state.name} starts a timer: the call that led here needs now")
        self._timer = (self._now + seconds, self.state, inp)

    # inputs

    @entry
    def receive(
        self, peer: Peer, channel: Channel, message: Message, *, now: float | None = None
    ) -> list[ClientOutput]:
        """A message read from ``peer`` on ``channel``. The owner still handles ordinary messages
        (MAIN_INIT included) itself; the migration messages are consumed here. ``now`` is needed
        where a message starts a timer (the last channel switching, s1's CANCEL)."""
        out = self._out
        self._now = now
        kind = type(message)
        state = self._channel_state(channel)
        if peer is Peer.S1:
            if kind is MsgMigrateData:
                raise LocalProtocolError("MIGRATE_DATA goes to migrate_data(): its body is passed on unread")
            if state is _CC.WAIT_MIGRATE_DATA:
                # The owner reports this case with not_migrate_data (5.4 step 2) before decoding.
                raise RemoteProtocolError(f"{kind.__name__} on channel {channel} where MIGRATE_DATA must follow")
            self._check_reads_s1(channel)
            if isinstance(message, MsgMigrate):
                self._fire(Received(Migrate.of(message.flags, Origin.REMOTE)), channel, message)
            elif kind in _S1_SESSION_INPUTS:
                if channel != MAIN:
                    raise RemoteProtocolError(f"{kind.__name__} on channel {channel}")
                if kind is MsgMainMigrateCancel and self.state is _C.CONNECTED_SEAMLESS and self._post_migration:
                    # Post-migration: s1 took the session back, whether or not we saw s2 fail.
                    # MIGRATE_DATA may still be on its way on other channels: they drain it first.
                    self._fire(_I.S2_FAILED)
                end_ignored = kind is MsgMainMigrateEnd and not has_cap(
                    self.server_main_caps, MainCap.SEMI_SEAMLESS_MIGRATE
                )
                self._fire(_I.END_FROM_OLD_SERVER if end_ignored else Received(kind), message)
        elif channel == MAIN and kind in (MsgMainMigrateDstSeamlessAck, MsgMainMigrateDstSeamlessNack, MsgMainInit):
            self._fire(Received(kind), message)
        elif channel == MAIN and self.state in (_C.HANDSHAKE, _C.WAIT_MAIN_INIT):
            raise RemoteProtocolError(f"{kind.__name__} from s2 main in state {self.state.name}")
        elif state is not _CC.ON_S2:
            raise LocalProtocolError(f"channel {channel} is frozen on s2: its connection is not read yet")
        return out

    @entry
    def migrate_data(self, channel: Channel, body: MigrateDataBody, *, now: float | None = None) -> list[ClientOutput]:
        """s1's MIGRATE_DATA on ``channel``. The client never reads the body (6): ``body`` is whatever
        the owner will write to s2 (RelayMigrateData) or drop (DropMigrateData); ``now`` as for receive."""
        out = self._out
        self._now = now
        self._check_reads_s1(channel)
        self._fire(_MIGRATE_DATA, channel, body)
        return out

    def _check_reads_s1(self, channel: Channel) -> None:
        if self._channel_state(channel) not in (_CC.ON_S1, _CC.WAIT_MIGRATE_DATA, _CC.HELD):
            raise LocalProtocolError(f"channel {channel} has left s1: its s1 connection is not read")

    @entry
    def not_migrate_data(self, channel: Channel) -> list[ClientOutput]:
        """s1 sent something other than MIGRATE_DATA after MIGRATE(NEED_DATA_TRANSFER) on
        ``channel`` (the owner drops it unread, 5.4 step 2): that channel's switch is aborted and
        it stays on s1; what it retained meanwhile goes to s1 with its next send()."""
        out = self._out
        if self._channel_state(channel) is not _CC.WAIT_MIGRATE_DATA:
            raise LocalProtocolError(f"channel {channel} does not wait for MIGRATE_DATA")
        self._fire_channel(channel, _CI.NOT_MIGRATE_DATA)
        return out

    @entry
    def s2_linked(
        self, channel: Channel, main_caps: Sequence[int] = (), *, now: float | None = None
    ) -> list[ClientOutput]:
        """The link of ``channel`` to s2 succeeded; for main, ``main_caps`` are s2's main caps
        (with SEAMLESS_MIGRATE, the handshake and its timer start: pass ``now``)."""
        out = self._out
        self._now = now
        if channel == MAIN:
            seamless = has_cap(main_caps, MainCap.SEAMLESS_MIGRATE)
            self._fire(_I.S2_MAIN_LINKED_SEAMLESS if seamless else _I.S2_MAIN_LINKED)
        else:
            if channel not in self._pending_links:
                raise LocalProtocolError(f"no link of channel {channel} to s2 is pending")
            self._pending_links.discard(channel)
            self._fire(_I.S2_LINKED)
        self._check_all_linked()
        return out

    @entry
    def s2_spoke(self) -> list[ClientOutput]:
        """s2's main channel sent something after main switched: it has the session (s2 speaks
        once every channel is restored; spice-gtk too lets go of s1 only then)."""
        out = self._out
        if self.state in (_C.CONNECTED_SEAMLESS, _C.CONFIRMING):
            self._fire(_I.S2_SPOKE)
        return out

    @entry
    def s1_let_go(self) -> list[ClientOutput]:
        """s1 closed its main connection after main switched: s2 has the session, there is nothing
        to go back to."""
        out = self._out
        if self.state is _C.CONFIRMING:
            self._fire(_I.S1_LET_GO)
        return out

    @entry
    def s2_failed(self, *, now: float | None = None) -> list[ClientOutput]:
        """A connection to s2 broke during seamless post-migration, before s2 confirmed (the wait
        for s1's CANCEL starts: pass ``now``)."""
        out = self._out
        self._now = now
        self._fire(_I.S2_FAILED)
        return out

    @entry
    def s2_link_failed(self, channel: Channel) -> list[ClientOutput]:
        """TCP error, 10 s connect timeout or a non-OK link result on the way to s2."""
        out = self._out
        self._fire(_I.S2_LINK_FAILED)
        return out

    @entry
    def send(self, channel: Channel, message: Message) -> list[ClientOutput]:
        """Every message the owner writes on a channel: routed to the server the channel is on, or
        retained while the channel is between servers."""
        out = self._out
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

    def _link_main(self, message: MsgMainMigrateBegin | MsgMainMigrateBeginSeamless) -> None:
        self.dst_info, self._destination_open = message.dst_info, True
        self._src_version = getattr(message, "src_mig_version", 0)
        self._out.append(LinkDestination(message.dst_info, self.session_id, (MAIN,)))

    def _link_others(self) -> None:
        others = tuple(channel for channel in self.channels if channel != MAIN)
        self._pending_links = set(others)
        if others:
            if self.dst_info is None:
                raise LocalProtocolError("no s2 to link to: MIGRATE_BEGIN never came")
            self._out.append(LinkDestination(self.dst_info, self.session_id, others))

    def _do_seamless(self) -> None:
        self._out.append(Send(MAIN, MsgcMainMigrateDstDoSeamless(self._src_version), Peer.S2))
        self._arm(self.handshake_timeout, _I.HANDSHAKE_TIMEOUT)
        self._link_others()

    def _check_all_linked(self, answer: Message | None = None) -> None:
        if self.state in (_C.LINKING, _C.LINKING_SEAMLESS) and not self._pending_links:
            self._fire(_I.ALL_LINKED)

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
            self._fire_channel(channel, _CI.SWITCH_BACK)
        self._reset_attempt()

    def _reset_attempt(self) -> None:
        self.mode, self._pending_links, self._destination_open = None, set(), False
        self._post_migration = False
        self._out.append(DropDestination())

    def _switch_main(self, message: Message) -> None:
        self._out.append(ResetChannels())
        self._retained = {channel: [] for channel in self.channels}  # 5.3 step 1: unsent queues go
        self._fire_channel(MAIN, _CI.SWITCH)
        for channel in self.channels:
            if channel != MAIN:
                self._fire_channel(channel, _CI.FREEZE)
        self._out.append(Send(MAIN, MsgcMainMigrateEnd(), Peer.S2))

    def _switch_others(self, message: MsgMainInit) -> None:
        self.session_id = message.session_id
        for channel in self.channels:
            if channel != MAIN:
                self._fire_channel(channel, _CI.SWITCH)
        self._out.append(MigrationCompleted(MigrationMode.SEMI_SEAMLESS))

    def _channel_input(self, channel: Channel, message: MsgMigrate | MigrateDataBody) -> None:
        """``message``: s1's MIGRATE, or the body of its MIGRATE_DATA (see migrate_data)."""
        if self.state is _C.ROLLING_BACK:  # MIGRATE_DATA of a channel that had not switched yet
            self._fire_channel(channel, _CI.MIGRATE_DATA_FOR_NOBODY, message)
            if self._cancelled:
                self._resume(channel)
                self._check_all_back()
            return
        self._post_migration = True
        if isinstance(message, MsgMigrate):
            self._fire_channel(channel, Received(Migrate.of(message.flags, Origin.REMOTE)))
        else:
            self._fire_channel(channel, _MIGRATE_DATA, message)
        if all(state is _CC.ON_S2 for state in self.channels.values()):
            self._fire(_I.ALL_SWITCHED)

    def _await_confirmation(self) -> None:
        if self._s2_spoke:
            self._fire(_I.S2_SPOKE)
        else:
            self._arm(self.confirm_grace, _I.CONFIRMATION_DUE)
            self._out.append(AwaitConfirmation())

    def _note_s2_spoke(self) -> None:
        self._s2_spoke = True

    def _seamless_done(self) -> None:
        self._unconfirmed = {channel: [] for channel in self.channels}
        self._out.append(CloseSource())
        self._out.append(MigrationCompleted(MigrationMode.SEAMLESS))

    def _return_to_s1(self) -> None:
        for channel in self.channels:
            self._fire_channel(channel, _CI.RETURN)
        self._arm(self.rollback_timeout, _I.ROLLBACK_TIMEOUT)
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
            self._fire_channel(channel, _CI.RESUME)

    def _check_all_back(self) -> None:
        if self._cancelled and all(state is _CC.ON_S1 for state in self.channels.values()):
            self._fire(_I.ALL_BACK)

    def _rolled_back(self) -> None:
        self._cancelled = False
        self.rolled_back = True
        self._reset_attempt()
        self._out.append(RolledBack())

    def _lost(self) -> None:
        self._out.append(SessionLost(f"s1 did not take the session back within {self.rollback_timeout:g} s"))

    def _switch_host(self, message: MsgMainMigrateSwitchHost) -> None:
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

    def _switch_with_data(self, channel: Channel, body: MigrateDataBody) -> None:
        self._out.append(SwitchChannel(channel, Peer.S2))
        # The body goes back byte for byte: it is opaque to the client (6).
        self._out.append(RelayMigrateData(channel, body))
        self._release(channel)

    def _switch_back(self, channel: Channel) -> None:
        self._out.append(SwitchChannel(channel, Peer.S1))

    def _drop_migrate_data(self, channel: Channel, body: MigrateDataBody) -> None:
        self._out.append(DropMigrateData(channel, body))

    def _release(self, channel: Channel) -> None:
        state = self.channels[channel]
        peer = Peer.S2 if state is _CC.ON_S2 else Peer.S1
        retained, self._retained[channel] = self._retained[channel], []
        self._out.extend(Send(channel, message, peer) for message in retained)
        if peer is Peer.S2 and self.state in (_C.CONNECTED_SEAMLESS, _C.CONFIRMING):
            self._unconfirmed[channel] += retained
