"""Shorthands over serverkit's raw client for tests that only need a session and a port."""

from __future__ import annotations

from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType
from tests import serverkit

TIMEOUT = 5.0


def RawChannel(address, connection_id: int, channel_type: int, channel_id: int = 0,
               password=None) -> serverkit.RawChannel:
    """One linked channel; its socket gives up after TIMEOUT so a test fails rather than hangs."""
    raw = serverkit.RawChannel.link(address, connection_id, channel_type, channel_id, password=password)
    raw.sock.settimeout(TIMEOUT)
    return raw


def open_session(address, password=None) -> tuple[serverkit.RawChannel, int]:
    """Link a main channel (connection id 0: a new session); return it and the session id."""
    main = RawChannel(address, 0, ChannelType.MAIN, password=password)
    return main, main.expect(m.MsgMainInit).session_id
