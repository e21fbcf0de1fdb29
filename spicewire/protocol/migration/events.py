"""What goes into the migration roles (inputs, each with its origin) and what comes out (outputs,
in the order they must happen, one typed union per role)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, TypeAlias

from spicewire.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from spicewire.protocol.enums import MIGRATE_FLAGS_MASK, MigrateFlags
from spicewire.protocol.messages import Message, MigrationDstInfo
from spicewire.protocol.migration.rules import Channel, MigrationMode

# --- inputs ----------------------------------------------------------------------------------


class Origin(Enum):
    """Where a table input comes from, which says who broke the rules when a state refuses it."""

    LOCAL = "local"  # we decided, or our owner asked or reported something
    REMOTE = "remote"  # the peer sent it
    TIMER = "timer"  # a deadline we set passed

    @property
    def error(self) -> type[ProtocolError]:
        return RemoteProtocolError if self is Origin.REMOTE else LocalProtocolError


class Migrate(Enum):
    """SPICE_MSG_MIGRATE, one member per flag combination: the flags decide what follows (5.4)."""

    PLAIN = MigrateFlags(0)
    NEED_FLUSH = MigrateFlags.NEED_FLUSH
    NEED_DATA_TRANSFER = MigrateFlags.NEED_DATA_TRANSFER
    NEED_FLUSH_AND_DATA_TRANSFER = MigrateFlags.NEED_FLUSH | MigrateFlags.NEED_DATA_TRANSFER

    @classmethod
    def of(cls, flags: int, origin: Origin) -> Migrate:
        """The member for ``flags``; flags beyond the known ones are ``origin``'s fault."""
        if int(flags) & ~int(MIGRATE_FLAGS_MASK):  # ~ of an IntFlag stays inside its known bits
            raise origin.error(f"MIGRATE flags {flags:#x} beyond {int(MIGRATE_FLAGS_MASK):#x}")
        return cls(MigrateFlags(flags))


@dataclass(frozen=True, slots=True)
class Received:
    """A message the peer sent, by class (SPICE_MSG_MIGRATE by its flags)."""

    what: type[Message] | Migrate

    @property
    def origin(self) -> Origin:
        return Origin.REMOTE

    def __str__(self) -> str:
        return f"received {getattr(self.what, '__name__', None) or self.what}"


@dataclass(frozen=True, slots=True)
class Sent:
    """A message we write that moves the machine (SPICE_MSG_MIGRATE, MIGRATE_DATA)."""

    what: type[Message] | Migrate

    @property
    def origin(self) -> Origin:
        return Origin.LOCAL

    def __str__(self) -> str:
        return f"sent {getattr(self.what, '__name__', None) or self.what}"


class _Labelled(Enum):
    """An input that is not a message: a command, an owner's report, a follow-up the machine fires
    itself, or a deadline."""

    def __init__(self, label: str, origin: Origin) -> None:
        self.label = label
        self.origin = origin

    def __str__(self) -> str:
        return self.label


_L, _R, _T = Origin.LOCAL, Origin.REMOTE, Origin.TIMER


class SourceInput(_Labelled):
    BEGIN_SEAMLESS = ("begin seamless", _L)
    BEGIN_SEMI_SEAMLESS = ("begin semi-seamless", _L)
    BEGIN_SWITCH_HOST = ("begin switch-host", _L)
    CANCEL = ("cancel", _L)
    FINISH = ("finish", _L)
    FINISH_SWITCH_HOST = ("finish switch-host", _L)
    FINISH_STAY = ("finish stay", _L)
    ALL_CHANNELS_SWITCHED = ("all channels switched", _L)
    ROLL_BACK = ("roll back", _L)
    CLIENT_DISCONNECTED = ("client disconnected", _L)
    DEADLINE = ("deadline passed", _T)


class DestinationInput(_Labelled):
    DO_SEAMLESS_REFUSED = ("DST_DO_SEAMLESS refused", _R)
    END_WITHOUT_CAP = ("MIGRATE_END from a client without SEMI_SEAMLESS_MIGRATE", _R)
    ALL_RESTORED = ("all restored", _L)
    ATTACH = ("attach", _L)
    ATTACH_WAITING = ("attach waiting", _L)
    WAIT_FOR_MIGRATE_DATA = ("wait for migrate data", _L)


class ClientInput(_Labelled):
    S2_MAIN_LINKED = ("s2 main linked", _L)
    S2_MAIN_LINKED_SEAMLESS = ("s2 main linked (SEAMLESS_MIGRATE)", _L)
    S2_LINKED = ("s2 linked", _L)
    S2_LINK_FAILED = ("s2 link failed", _L)
    ALL_LINKED = ("all linked", _L)
    END_FROM_OLD_SERVER = ("MAIN_MIGRATE_END from a server without SEMI_SEAMLESS_MIGRATE", _R)
    ALL_SWITCHED = ("all switched", _L)
    S2_SPOKE = ("s2 spoke", _L)
    S2_FAILED = ("s2 failed", _L)
    S1_LET_GO = ("s1 closed main after main switched", _L)
    ALL_BACK = ("all back", _L)
    HANDSHAKE_TIMEOUT = ("no DST_SEAMLESS_ACK/NACK in time", _T)
    CONFIRMATION_DUE = ("confirmation grace over", _T)
    ROLLBACK_TIMEOUT = ("no MIGRATE_CANCEL from s1 in time", _T)


class ClientChannelInput(_Labelled):
    SWITCH = ("switch", _L)
    FREEZE = ("freeze", _L)
    SWITCH_BACK = ("switch back", _L)
    RETURN = ("return", _L)
    RESUME = ("resume", _L)
    MIGRATE_DATA_FOR_NOBODY = ("MIGRATE_DATA for nobody", _R)
    NOT_MIGRATE_DATA = ("not MIGRATE_DATA after MIGRATE", _R)


Input: TypeAlias = Received | Sent | SourceInput | DestinationInput | ClientInput | ClientChannelInput


# --- outputs ---------------------------------------------------------------------------------


class Peer(Enum):
    """Which server a client-side message travels to or came from."""

    S1 = "s1"
    S2 = "s2"


class MigrateDataBody(Protocol):
    """A MIGRATE_DATA body as the client machine holds it: opaque (6), so only its size is asked.
    bytes qualify; an owner that streams the body passes its own handle."""

    def __len__(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``message`` on ``channel`` (for the client: on its connection to ``peer``)."""

    channel: Channel
    message: Message
    peer: Peer | None = None


@dataclass(frozen=True, slots=True)
class ConnectComplete:
    """s1: the connect phase is over (answer, error or timeout); QEMU's migrate_connect_complete."""

    success: bool
    seamless: bool


@dataclass(frozen=True, slots=True)
class MigrateDataRequested:
    """s1: build this channel's MIGRATE_DATA now (it must cover every client message received so
    far) and pass it to ``send``; nothing else may be sent on the channel."""

    channel: Channel


@dataclass(frozen=True, slots=True)
class DisconnectClient:
    """s1: the client did not leave within 10 s of the end of migration."""


@dataclass(frozen=True, slots=True)
class AttachChannel:
    """s2: start reading a parked link and run the channel's on-connect; with
    ``wait_for_migrate_data`` hold its device I/O until its state is restored (5.7)."""

    channel: Channel
    wait_for_migrate_data: bool


@dataclass(frozen=True, slots=True)
class RestoreMigrateData:
    """s2: restore ``channel`` from ``data``, already validated by ``parse_migrate_data``."""

    channel: Channel
    data: Any


@dataclass(frozen=True, slots=True)
class MigrationCompleted:
    """s2 / client: the session now lives on s2."""

    mode: MigrationMode


@dataclass(frozen=True, slots=True)
class LinkDestination:
    """Client: link these channels to s2 (``dst_info``) with ``connection_id``; report each with
    ``s2_linked`` or ``s2_link_failed`` and keep the connections frozen (nothing read or written)."""

    dst_info: MigrationDstInfo
    connection_id: int
    channels: tuple[Channel, ...]


@dataclass(frozen=True, slots=True)
class DropDestination:
    """Client: close every s2 connection; the session stays on s1."""


@dataclass(frozen=True, slots=True)
class ResetChannels:
    """Client, semi-seamless: close every s1 socket, discard unsent queues, clear channel state."""


@dataclass(frozen=True, slots=True)
class SwitchChannel:
    """Client: move ``channel`` onto its connection to ``peer`` and start reading it."""

    channel: Channel
    peer: Peer


@dataclass(frozen=True, slots=True)
class CloseSource:
    """Client, seamless: s2 has the session (it spoke, or the wait for it ended); close the s1
    connections."""


@dataclass(frozen=True, slots=True)
class AwaitConfirmation:
    """Client, seamless: every channel has switched; keep the s1 connections until s2's main speaks
    (``s2_spoke``), until s1 lets go (``s1_let_go``) or until a grace period passes (the timer)."""


@dataclass(frozen=True, slots=True)
class AwaitRollback:
    """Client: s2 failed; every channel reads s1 again. Wait for s1's MIGRATE_CANCEL (bounded by the
    machine's timer)."""


@dataclass(frozen=True, slots=True)
class RelayMigrateData:
    """Client: write ``body`` to s2 as ``channel``'s MIGRATE_DATA, byte for byte; it follows the
    channel's SwitchChannel and precedes what the channel retained meanwhile."""

    channel: Channel
    body: MigrateDataBody


@dataclass(frozen=True, slots=True)
class DropMigrateData:
    """Client, rolling back: this MIGRATE_DATA from s1 has nowhere to go; read it and drop it."""

    channel: Channel
    body: MigrateDataBody


@dataclass(frozen=True, slots=True)
class RolledBack:
    """Client: s1 took the session back; the migration ended without moving it."""


@dataclass(frozen=True, slots=True)
class SwitchHost:
    """Client: destroy non-main channels, reconnect main to ``dst_info`` with connection_id 0 (a new
    session; 5.6)."""

    dst_info: MigrationDstInfo
    connection_id: int = 0


@dataclass(frozen=True, slots=True)
class SessionLost:
    """Client, rolling back: s1 never took the session back; it is over on both servers."""

    reason: str


SourceOutput: TypeAlias = Send | ConnectComplete | MigrateDataRequested | DisconnectClient
DestinationOutput: TypeAlias = Send | AttachChannel | RestoreMigrateData | MigrationCompleted
ClientOutput: TypeAlias = (
    Send | LinkDestination | DropDestination | ResetChannels | SwitchChannel | CloseSource | MigrationCompleted
    | SwitchHost | AwaitConfirmation | AwaitRollback | RelayMigrateData | DropMigrateData | RolledBack
    | SessionLost
)
