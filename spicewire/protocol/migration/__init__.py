"""Migration (PROTOCOL.md sections 5-7) as three sans-I/O roles, one object per client session:

- ``SourceMigration`` (s1, ``source.py``): BEGIN, the connect wait, END / SPICE_MSG_MIGRATE /
  SWITCH_HOST, and per channel the MIGRATE -> FLUSH_MARK -> MIGRATE_DATA handover.
- ``DestinationMigration`` (s2, ``destination.py``): the migrating session from its MAIN link
  (connection_id != 0) until MAIN_INIT (semi-seamless) or the last MIGRATE_DATA (seamless).
- ``ClientMigration`` (``client.py``): what spice-gtk does between the two servers.

No role touches a socket or a clock. Every method returns, in order, what must happen next
(``events.py``). Time only enters as ``now`` arguments; ``get_timer()`` says when to call
``handle_timer(now)``. Each role has an explicit table ``{(state, input): (next_state, action)}``
run by ``table.py``; a pair missing from a table is an illegal sequence.

The migrate-data bodies themselves are in ``protocol/migrate_data.py``; they are re-exported here
so that adapters find everything migration needs in one place.
"""

from spicewire.protocol.enums import MIGRATION_PROTOCOL_VERSION
from spicewire.protocol.messages import MigrationDstInfo
from spicewire.protocol.migrate_data import (
    CHAR_DEVICE_VERSION,
    MAIN_MIGRATE_DATA_SIZE,
    MIGRATE_DATA_VERSION,
    NO_CHAR_DEVICE,
    SPICEVMC_MIGRATE_DATA_SIZE,
    SWPD_SEGMENT,
    U32_MAX,
    Buffer,
    CharDeviceMigrateData,
    MainMigrateData,
    MigrateDataMagic,
    PortMigrateData,
    PortMigrateDataWriter,
    build_main_migrate_data,
    build_port_migrate_data,
    build_spicevmc_migrate_data,
    parse_main_migrate_data,
    parse_migrate_data,
    parse_migrate_data_header,
    parse_port_migrate_data,
    parse_spicevmc_migrate_data,
)
from spicewire.protocol.migration.client import ClientChannelState, ClientMigration, ClientState
from spicewire.protocol.migration.destination import (
    DEFAULT_MAIN_INIT,
    DestinationChannelState,
    DestinationMigration,
    DestinationState,
)
from spicewire.protocol.migration.events import (
    AttachChannel,
    AwaitConfirmation,
    AwaitRollback,
    CloseSource,
    ConnectComplete,
    DisconnectClient,
    DropDestination,
    DropMigrateData,
    LinkDestination,
    MigrateDataRequested,
    MigrationCompleted,
    Peer,
    ResetChannels,
    RestoreMigrateData,
    RolledBack,
    Send,
    SwitchChannel,
    SwitchHost,
)
from spicewire.protocol.migration.rules import (
    MAIN,
    MIGRATE_TIMEOUT,
    Channel,
    MigrationMode,
    choose_mode,
    default_migrate_flags,
)
from spicewire.protocol.migration.source import SourceChannelState, SourceMigration, SourceState

__all__ = [
    "CHAR_DEVICE_VERSION",
    "DEFAULT_MAIN_INIT",
    "MAIN",
    "MAIN_MIGRATE_DATA_SIZE",
    "MIGRATE_DATA_VERSION",
    "MIGRATE_TIMEOUT",
    "MIGRATION_PROTOCOL_VERSION",
    "NO_CHAR_DEVICE",
    "SPICEVMC_MIGRATE_DATA_SIZE",
    "SWPD_SEGMENT",
    "U32_MAX",
    "AttachChannel",
    "AwaitConfirmation",
    "AwaitRollback",
    "Buffer",
    "Channel",
    "CharDeviceMigrateData",
    "ClientChannelState",
    "ClientMigration",
    "ClientState",
    "CloseSource",
    "ConnectComplete",
    "DestinationChannelState",
    "DestinationMigration",
    "DestinationState",
    "DisconnectClient",
    "DropDestination",
    "DropMigrateData",
    "LinkDestination",
    "MainMigrateData",
    "MigrateDataMagic",
    "MigrateDataRequested",
    "MigrationCompleted",
    "MigrationDstInfo",
    "MigrationMode",
    "Peer",
    "PortMigrateData",
    "PortMigrateDataWriter",
    "ResetChannels",
    "RestoreMigrateData",
    "RolledBack",
    "Send",
    "SourceChannelState",
    "SourceMigration",
    "SourceState",
    "SwitchChannel",
    "SwitchHost",
    "build_main_migrate_data",
    "build_port_migrate_data",
    "build_spicevmc_migrate_data",
    "choose_mode",
    "default_migrate_flags",
    "parse_main_migrate_data",
    "parse_migrate_data",
    "parse_migrate_data_header",
    "parse_port_migrate_data",
    "parse_spicevmc_migrate_data",
]
