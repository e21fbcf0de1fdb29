"""Migration on the server side: the roles of protocol/migration wired to sessions and sockets.

- ``source.SessionSource`` (s1) drives one session's SourceMigration.
- ``destination.SessionDestination`` (s2) drives one arriving session's DestinationMigration.
- ``orchestrator.MigrationManager`` (one per server) keeps the announcements, takes device state,
  and runs the whole migration of every session.
"""

from spicewire.errors import MigrationError
from spicewire.server.migration.destination import Announcement, SessionDestination
from spicewire.server.migration.orchestrator import MigrationManager
from spicewire.server.migration.source import SessionSource, pack_device_states

__all__ = [
    "Announcement", "MigrationError", "MigrationManager", "SessionDestination", "SessionSource", "pack_device_states",
]
