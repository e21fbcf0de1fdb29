"""What every migration role decides the same way as spice-server: the mode a client gets (5.1),
each channel's MIGRATE flags (5.4), the 10 s timeout (7.6) and what MAIN_INIT says."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

from spicewire.protocol.caps import has_cap
from spicewire.protocol.enums import MIGRATE_FLAGS_MASK, ChannelType, MainCap, MigrateFlags, MouseMode
from spicewire.protocol.messages import MsgMainInit
from spicewire.protocol.migrate_data import SPICEVMC_CHANNELS

Channel = tuple[int, int]
"""(channel_type, channel_id)."""
MAIN: Channel = (ChannelType.MAIN, 0)
MIGRATE_TIMEOUT = 10.0
"""spice-server's MIGRATE_TIMEOUT: the connect wait and the wait for the client to leave (7.6). The
machines' default only: spicewire's servers give each session's machine what is left of the
``/migrate`` call's timeout instead."""

_WITH_DATA = (
    frozenset({ChannelType.MAIN, ChannelType.INPUTS, ChannelType.DISPLAY, ChannelType.SMARTCARD}) | SPICEVMC_CHANNELS
)


def default_migrate_flags(channel_type: int) -> MigrateFlags:
    """spice-server's per-channel flags (5.4): channels with in-flight state flush and transfer it."""
    return MigrateFlags(MIGRATE_FLAGS_MASK) if channel_type in _WITH_DATA else MigrateFlags(0)


class MigrationMode(IntEnum):
    """Ordered: a higher mode keeps more state."""

    SWITCH_HOST = 0
    SEMI_SEAMLESS = 1
    SEAMLESS = 2

    @property
    def label(self) -> str:
        """As the command line, the control API and the reports spell it: "semi-seamless"."""
        return self.name.lower().replace("_", "-")


def choose_mode(client_main_caps: Sequence[int], allowed: MigrationMode) -> MigrationMode:
    """The mode spice-server picks for a client (5.1), capped at ``allowed``."""
    if (
        allowed >= MigrationMode.SEAMLESS
        # AGENT_CONNECTED_TOKENS too: agent tokens stay valid if the agent (dis)connects meanwhile
        and has_cap(client_main_caps, MainCap.AGENT_CONNECTED_TOKENS)
        and has_cap(client_main_caps, MainCap.SEAMLESS_MIGRATE)
    ):
        return MigrationMode.SEAMLESS
    if allowed >= MigrationMode.SEMI_SEAMLESS and has_cap(client_main_caps, MainCap.SEMI_SEAMLESS_MIGRATE):
        return MigrationMode.SEMI_SEAMLESS
    return MigrationMode.SWITCH_HOST


def main_init(
    session_id: int, mouse_mode: int = MouseMode.SERVER, multi_media_time: int = 0, display_channels_hint: int = 0,
) -> MsgMainInit:
    """MAIN_INIT as a server without agent or guest RAM hint sends it: a new session's first
    message, and s2's answer to a semi-seamless MIGRATE_END (5.3), with the migrated session's id."""
    return MsgMainInit(
        session_id=session_id, display_channels_hint=display_channels_hint,
        supported_mouse_modes=MouseMode.SERVER | MouseMode.CLIENT,
        current_mouse_mode=mouse_mode, agent_connected=0, agent_tokens=10, multi_media_time=multi_media_time,
        ram_hint=0,
    )
