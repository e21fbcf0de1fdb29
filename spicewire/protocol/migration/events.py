"""What the migration roles give back: outputs, in the order they must happen."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from spicewire.protocol.messages import Message, MigrationDstInfo
from spicewire.protocol.migration.rules import Channel, MigrationMode


class Peer(Enum):
    """Which server a client-side message travels to or came from."""

    S1 = "s1"
    S2 = "s2"


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
    (``s2_spoke``), or until s1 lets go or a grace period passes (``confirmation_due``)."""


@dataclass(frozen=True, slots=True)
class AwaitRollback:
    """Client: s2 failed; every channel reads s1 again. Wait (bounded) for s1's MIGRATE_CANCEL."""


@dataclass(frozen=True, slots=True)
class DropMigrateData:
    """Client, rolling back: this MIGRATE_DATA from s1 has nowhere to go; read it and drop it."""

    channel: Channel
    data: Any


@dataclass(frozen=True, slots=True)
class RolledBack:
    """Client: s1 took the session back; the migration ended without moving it."""


@dataclass(frozen=True, slots=True)
class SwitchHost:
    """Client: destroy non-main channels, reconnect main to ``dst_info`` with connection_id 0 (a new
    session; 5.6)."""

    dst_info: MigrationDstInfo
    connection_id: int = 0
