"""messages.check_decodable: what s2 checks each held input of an inputs MIGRATE_DATA with (in the
downtime) refuses exactly the bodies decode refuses, for every message a client may send on the
inputs channel, at every length around each message's fixed size."""

from __future__ import annotations

import os

import pytest

from spicewire.errors import CodecError
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType
from spicewire.protocol.migrate_data import HeldInput, build_inputs_migrate_data, parse_inputs_migrate_data

C2S = m.Direction.CLIENT_TO_SERVER
INPUTS_TABLE = m.message_table(ChannelType.INPUTS, C2S)


def refuses(check, *args) -> bool:
    try:
        check(*args)
    except CodecError:
        return True
    return False


@pytest.mark.parametrize("msg_type", sorted(INPUTS_TABLE))
def test_refuses_what_decode_refuses(msg_type: int) -> None:
    for length in range(24):
        body = os.urandom(length)
        args = (ChannelType.INPUTS, C2S, msg_type, body)
        assert refuses(m.check_decodable, *args) == refuses(m.decode, *args), (INPUTS_TABLE[msg_type], length)


def test_each_side_of_a_fixed_size() -> None:
    size = len(m.MsgcInputsMousePosition(x=1, y=2, buttons=0, display_id=0).encode())
    msg_type = m.MsgcInputsMousePosition.TYPE
    with pytest.raises(CodecError, match="MsgcInputsMousePosition"):
        m.check_decodable(ChannelType.INPUTS, C2S, msg_type, bytes(size - 1))
    m.check_decodable(ChannelType.INPUTS, C2S, msg_type, bytes(size))
    m.check_decodable(ChannelType.INPUTS, C2S, msg_type, bytes(size + 1))  # decode ignores the rest too


def test_a_data_message_takes_any_body_and_an_unknown_type_none() -> None:
    m.check_decodable(ChannelType.INPUTS, C2S, m.MsgcInputsKeyScancode.TYPE, b"")
    m.check_decodable(ChannelType.INPUTS, C2S, m.MsgcInputsKeyScancode.TYPE, b"\xe0\x48")
    with pytest.raises(CodecError, match="unknown message type"):
        m.check_decodable(ChannelType.INPUTS, C2S, 9999, b"")


def test_held_inputs_too_short_to_decode_are_refused_by_the_parse() -> None:
    good = m.MsgcInputsMouseMotion(dx=1, dy=-1, buttons=0).encode()
    held = [HeldInput(m.MsgcInputsMouseMotion.TYPE, good)] * 12
    assert parse_inputs_migrate_data(build_inputs_migrate_data(2, held)).held == held
    short = [*held, HeldInput(m.MsgcInputsMouseMotion.TYPE, good[:-1])]
    with pytest.raises(CodecError):
        parse_inputs_migrate_data(build_inputs_migrate_data(2, short))
