"""The table engine the three roles share: ``{(state, input): (next_state, action)}``."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, ClassVar

from spicewire.errors import LocalProtocolError, RemoteProtocolError
from spicewire.protocol.enums import MigrateFlags
from spicewire.protocol.migration.rules import Channel


def _name(item: Any) -> str:
    return item.__name__ if isinstance(item, type) else str(item)


def _lookup(table: Mapping, state: Enum, inp: Any, error: type[Exception], where: str) -> tuple:
    try:
        return table[(state, inp)]
    except KeyError:
        raise error(f"{where}: {_name(inp)} is not allowed in state {state.name}") from None


def _input_error(inp: Any) -> type[Exception]:
    return RemoteProtocolError if isinstance(inp, type) else LocalProtocolError


def _migrate_input(flags: int) -> str:
    """Table input for SPICE_MSG_MIGRATE: the flags decide what follows."""
    flags = MigrateFlags(flags)
    return "MIGRATE" if not flags else f"MIGRATE({'|'.join(f.name for f in MigrateFlags if f in flags)})"


class _Role:
    TABLE: ClassVar[Mapping[tuple, tuple]]
    CHANNEL_TABLE: ClassVar[Mapping[tuple, tuple]]

    def __init__(self, state: Enum, channels: Mapping[Channel, Enum]) -> None:
        self.state = state
        self.channels = dict(channels)
        self._out: list = []

    def _begin_call(self) -> list:
        self._out = []
        return self._out

    def _fire(self, inp: Any, *args: Any, error: type[Exception] | None = None) -> None:
        # The state changes before the action runs, so an action may fire follow-up inputs.
        where = type(self).__name__
        self.state, action = _lookup(self.TABLE, self.state, inp, error or _input_error(inp), where)
        if action:
            getattr(self, action)(*args)

    def _fire_channel(self, channel: Channel, inp: Any, *args: Any, error: type[Exception] | None = None) -> None:
        where = f"{type(self).__name__} channel {channel}"
        state = self._channel_state(channel)
        self.channels[channel], action = _lookup(self.CHANNEL_TABLE, state, inp, error or _input_error(inp), where)
        if action:
            getattr(self, action)(channel, *args)

    def _channel_state(self, channel: Channel) -> Enum:
        try:
            return self.channels[channel]
        except KeyError:
            raise LocalProtocolError(f"channel {channel} is not part of this session") from None
