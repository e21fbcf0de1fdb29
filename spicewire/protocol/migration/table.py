"""The table engine the three roles share: ``{(state, input): (next_state, action)}``.

A pair missing from a table is an illegal sequence; the input's origin says whose fault it is
(RemoteProtocolError for the peer's, LocalProtocolError for ours). A role whose call raised a
ProtocolError has failed for good, as an h11 connection in state ERROR: every later call is refused.
The failure is a flag beside the role's state rather than a state of its own, so the state still
says where it stopped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from spicewire.errors import LocalProtocolError, ProtocolError
from spicewire.protocol.migration.events import Input
from spicewire.protocol.migration.rules import Channel

Transition = tuple[Enum, str | None]
"""(next state, name of the action method or None)."""
Table = Mapping[tuple[Enum, Input], Transition]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_RoleT = TypeVar("_RoleT", bound="_Role")


def entry(method: Callable[Concatenate[_RoleT, _P], _R]) -> Callable[Concatenate[_RoleT, _P], _R]:
    """A public input of a role: refused once the role has failed, and the role fails when it raises."""

    @functools.wraps(method)
    def call(self: _RoleT, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self.error is not None:
            raise LocalProtocolError(f"{type(self).__name__} already failed ({self.error}); it takes no more input")
        self._out = []
        try:
            return method(self, *args, **kwargs)
        except ProtocolError as err:
            self.error = err
            raise

    return call


class _Role:
    TABLE: ClassVar[Table]
    CHANNEL_TABLE: ClassVar[Table]

    def __init__(self, state: Enum, channels: Mapping[Channel, Enum]) -> None:
        self.state = state
        self.channels = dict(channels)
        self.error: ProtocolError | None = None
        """The error that ended this role, if one did."""
        self._out: list[Any] = []

    @property
    def failed(self) -> bool:
        return self.error is not None

    def allows(self, inp: Input) -> bool:
        """Whether the role's state takes ``inp`` now (for owners that only act when it does)."""
        return self.error is None and (self.state, inp) in self.TABLE

    def _fire(self, inp: Input, *args: Any) -> None:
        # The state changes before the action runs, so an action may fire follow-up inputs.
        self.state, action = _lookup(self.TABLE, self.state, inp, type(self).__name__)
        if action:
            getattr(self, action)(*args)

    def _fire_channel(self, channel: Channel, inp: Input, *args: Any) -> None:
        where = f"{type(self).__name__} channel {channel}"
        self.channels[channel], action = _lookup(self.CHANNEL_TABLE, self._channel_state(channel), inp, where)
        if action:
            getattr(self, action)(channel, *args)

    def _channel_state(self, channel: Channel) -> Enum:
        try:
            return self.channels[channel]
        except KeyError:
            raise LocalProtocolError(f"channel {channel} is not part of this session") from None


def _lookup(table: Table, state: Enum, inp: Input, where: str) -> Transition:
    try:
        return table[(state, inp)]
    except KeyError:
        raise inp.origin.error(f"{where}: {inp} is not allowed in state {state.name}") from None
