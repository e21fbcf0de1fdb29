"""Migration rules of PROTOCOL.md sections 5-7 (roles) and 6 (migrate-data formats), one per test."""

from __future__ import annotations

import dataclasses
import itertools
import struct
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spicewire.errors import (
    CodecError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from spicewire.protocol.caps import caps_to_words
from spicewire.protocol.enums import ChannelType, MainCap, MigrateFlags
from spicewire.protocol.messages import (
    C2S,
    S2C,
    MigrationDstInfo,
    MsgcMainMigrateConnected,
    MsgcMainMigrateConnectedSeamless,
    MsgcMainMigrateConnectError,
    MsgcMainMigrateDstDoSeamless,
    MsgcMainMigrateEnd,
    MsgcMainMouseModeRequest,
    MsgcMigrateData,
    MsgcMigrateFlushMark,
    MsgcPong,
    MsgcSpicevmcData,
    MsgMainInit,
    MsgMainMigrateBegin,
    MsgMainMigrateBeginSeamless,
    MsgMainMigrateCancel,
    MsgMainMigrateDstSeamlessAck,
    MsgMainMigrateDstSeamlessNack,
    MsgMainMigrateEnd,
    MsgMainMigrateSwitchHost,
    MsgMainMultiMediaTime,
    MsgMigrate,
    MsgMigrateData,
    MsgPing,
    MsgPortInit,
    MsgSpicevmcData,
    decode,
    encode,
)
from spicewire.protocol.migration import (
    DEFAULT_MAIN_INIT,
    MAIN,
    AttachChannel,
    AwaitConfirmation,
    AwaitRollback,
    CharDeviceMigrateData,
    ClientChannelInput,
    ClientInput,
    ClientMigration,
    ClientOutput,
    ClientState,
    CloseSource,
    ConnectComplete,
    DestinationInput,
    DestinationMigration,
    DestinationOutput,
    DestinationState,
    DisconnectClient,
    DropDestination,
    DropMigrateData,
    LinkDestination,
    MainMigrateData,
    Migrate,
    MigrateDataMagic,
    MigrateDataRequested,
    MigrationCompleted,
    MigrationMode,
    Origin,
    Peer,
    PortMigrateData,
    PortMigrateDataWriter,
    Received,
    RelayMigrateData,
    ResetChannels,
    RestoreMigrateData,
    RolledBack,
    Send,
    Sent,
    SessionLost,
    SourceInput,
    SourceMigration,
    SourceOutput,
    SourceState,
    SwitchChannel,
    SwitchHost,
    build_main_migrate_data,
    build_port_migrate_data,
    build_spicevmc_migrate_data,
    parse_main_migrate_data,
    parse_migrate_data,
    parse_port_migrate_data,
    parse_spicevmc_migrate_data,
)
from spicewire.protocol.migration.client import CONFIRM_GRACE, HANDSHAKE_TIMEOUT, ROLLBACK_TIMEOUT

PORT = (ChannelType.PORT, 0)
CURSOR = (ChannelType.CURSOR, 0)
DST = MigrationDstInfo(port=5901, sport=0, host="s2.example")
SESSION_ID = 0x11223344

SEMI = caps_to_words([MainCap.SEMI_SEAMLESS_MIGRATE])
SEAMLESS_CLIENT = caps_to_words(
    [MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.AGENT_CONNECTED_TOKENS, MainCap.SEAMLESS_MIGRATE]
)
SERVER_CAPS = caps_to_words([MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.SEAMLESS_MIGRATE])  # 0x09 (8)

SVMD_ABC = bytes.fromhex(
    "53 56 4d 44 01 00 00 00 01 00 00 00 01 ff ff ff ff ff ff ff ff"
    "03 00 00 00 00 00 00 00 21 00 00 00 61 62 63"
)
SVMD = build_spicevmc_migrate_data()
MNMD = build_main_migrate_data()


def sends(out, peer=None):
    return [(item.channel, item.message) for item in out if isinstance(item, Send) and item.peer == peer]


def events(out):
    return [item for item in out if not isinstance(item, Send)]


# --- s1 -----------------------------------------------------------------------------------------


def source(caps=SEAMLESS_CLIENT, channels=(PORT,)):
    return SourceMigration(channels, caps)


def connected_source(seamless=True, channels=(PORT,)):
    src = source(channels=channels)
    src.begin(DST, MigrationMode.SEAMLESS if seamless else MigrationMode.SEMI_SEAMLESS, now=0.0)
    src.receive(MAIN, MsgcMainMigrateConnectedSeamless() if seamless else MsgcMainMigrateConnected())
    return src


def test_source_begins_seamless_only_with_agent_connected_tokens_and_seamless_migrate():
    out = source().begin(DST, MigrationMode.SEAMLESS, now=0.0)
    assert sends(out) == [(MAIN, MsgMainMigrateBeginSeamless(DST, src_mig_version=1))]


@pytest.mark.parametrize("missing", [MainCap.AGENT_CONNECTED_TOKENS, MainCap.SEAMLESS_MIGRATE])
def test_source_without_either_seamless_cap_begins_semi_seamless(missing):
    caps = caps_to_words({0, 2, 3} - {missing})
    src = source(caps)
    assert sends(src.begin(DST, MigrationMode.SEAMLESS, now=0.0)) == [(MAIN, MsgMainMigrateBegin(DST))]
    assert src.mode is MigrationMode.SEMI_SEAMLESS


def test_source_with_seamless_disabled_begins_semi_seamless():
    out = source().begin(DST, MigrationMode.SEMI_SEAMLESS, now=0.0)
    assert sends(out) == [(MAIN, MsgMainMigrateBegin(DST))]


def test_source_without_semi_seamless_cap_sends_no_begin_and_switches_host_at_finish():
    src = source(caps=())
    assert src.begin(DST, MigrationMode.SEAMLESS, now=0.0) == [ConnectComplete(False, False)]
    assert src.mode is MigrationMode.SWITCH_HOST
    assert sends(src.finish(now=1.0)) == [(MAIN, MsgMainMigrateSwitchHost(DST))]


def test_source_connected_reports_connect_complete_and_stops_the_timer():
    src = source()
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)
    assert src.get_timer() == 10.0
    assert src.receive(MAIN, MsgcMainMigrateConnectedSeamless()) == [ConnectComplete(True, True)]
    assert src.get_timer() is None and src.state is SourceState.CONNECTED_SEAMLESS


def test_source_semi_seamless_finish_sends_main_migrate_end_only():
    src = connected_source(seamless=False)
    assert src.finish(now=5.0) == [Send(MAIN, MsgMainMigrateEnd())]
    assert src.state is SourceState.WAIT_DISCONNECT


def test_source_seamless_nack_answer_connected_falls_back_to_semi_seamless_end():
    src = source()
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)
    assert src.receive(MAIN, MsgcMainMigrateConnected()) == [ConnectComplete(True, False)]
    assert src.finish(now=1.0) == [Send(MAIN, MsgMainMigrateEnd())]


def test_source_seamless_finish_sends_migrate_with_channel_flags_on_every_channel_main_first():
    src = connected_source(channels=(PORT, CURSOR))
    assert sends(src.finish(now=1.0)) == [
        (MAIN, MsgMigrate(MigrateFlags.NEED_FLUSH | MigrateFlags.NEED_DATA_TRANSFER)),
        (PORT, MsgMigrate(3)),
        (CURSOR, MsgMigrate(0)),
    ]


def test_source_flush_mark_asks_the_owner_for_migrate_data():
    src = connected_source()
    src.finish(now=1.0)
    assert src.receive(PORT, MsgcMigrateFlushMark()) == [MigrateDataRequested(PORT)]
    assert src.send(PORT, MsgMigrateData(SVMD)) == [Send(PORT, MsgMigrateData(SVMD))]


def test_source_data_only_flags_ask_for_migrate_data_without_flush_mark():
    src = SourceMigration([PORT], SEAMLESS_CLIENT, channel_flags={PORT: MigrateFlags.NEED_DATA_TRANSFER})
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)
    src.receive(MAIN, MsgcMainMigrateConnectedSeamless())
    assert MigrateDataRequested(PORT) in src.finish(now=1.0)


def test_source_client_data_between_migrate_and_flush_mark_is_accepted():
    src = connected_source()
    src.finish(now=1.0)
    assert src.receive(PORT, MsgcSpicevmcData(b"late")) == []


@pytest.mark.parametrize("flushed", [False, True])
def test_source_refuses_to_send_anything_but_migrate_data_after_migrate(flushed):
    src = connected_source()
    src.finish(now=1.0)
    if flushed:  # MIGRATE_DATA is due
        src.receive(PORT, MsgcMigrateFlushMark())
    with pytest.raises(LocalProtocolError):
        src.send(PORT, MsgSpicevmcData(b"x"))


def test_source_refuses_migrate_data_before_the_flush_mark():
    src = connected_source()
    src.finish(now=1.0)
    with pytest.raises(LocalProtocolError):
        src.send(PORT, MsgMigrateData(SVMD))


def test_source_refuses_to_send_anything_after_migrate_data():
    src = connected_source()
    src.finish(now=1.0)
    src.receive(PORT, MsgcMigrateFlushMark())
    src.send(PORT, MsgMigrateData(SVMD))
    with pytest.raises(LocalProtocolError):
        src.send(PORT, MsgMigrateData(SVMD))


def test_source_seamless_rolls_back_to_normal_with_migrate_cancel():
    src = connected_source()
    src.finish(now=1.0)
    for channel, body in ((MAIN, MNMD), (PORT, SVMD)):
        src.receive(channel, MsgcMigrateFlushMark())
        src.send(channel, MsgMigrateData(body))
    assert src.can_roll_back
    assert src.roll_back() == [Send(MAIN, MsgMainMigrateCancel())]
    assert src.state is SourceState.IDLE and src.get_timer() is None
    assert src.receive(PORT, MsgcSpicevmcData(b"again")) == []  # no longer "after FLUSH_MARK"
    assert src.send(PORT, MsgSpicevmcData(b"x")) == [Send(PORT, MsgSpicevmcData(b"x"))]


def test_source_semi_seamless_cannot_roll_back():
    src = connected_source(seamless=False)
    src.finish(now=1.0)
    assert not src.can_roll_back
    with pytest.raises(LocalProtocolError):
        src.roll_back()


def test_source_rolls_back_only_once_every_migrate_data_went_out():
    """Before that, a FLUSH_MARK could still arrive after the CANCEL."""
    src = connected_source()
    src.finish(now=1.0)
    src.receive(PORT, MsgcMigrateFlushMark())
    src.send(PORT, MsgMigrateData(SVMD))
    assert src.state is SourceState.MIGRATING and not src.can_roll_back
    with pytest.raises(LocalProtocolError):
        src.roll_back()


def test_source_refuses_owner_sent_migrate():
    with pytest.raises(LocalProtocolError):
        connected_source().send(PORT, MsgMigrate(3))


def test_source_flush_mark_without_migrate_is_a_remote_error():
    with pytest.raises(RemoteProtocolError):
        connected_source().receive(PORT, MsgcMigrateFlushMark())


def test_source_flush_mark_after_migrate_without_need_flush_is_a_remote_error():
    src = connected_source(channels=(PORT, CURSOR))
    src.finish(now=1.0)
    with pytest.raises(RemoteProtocolError):
        src.receive(CURSOR, MsgcMigrateFlushMark())


def test_source_second_flush_mark_is_a_remote_error():
    src = connected_source()
    src.finish(now=1.0)
    src.receive(PORT, MsgcMigrateFlushMark())
    with pytest.raises(RemoteProtocolError):
        src.receive(PORT, MsgcMigrateFlushMark())


def test_source_client_message_after_flush_mark_is_a_remote_error():
    src = connected_source()
    src.finish(now=1.0)
    src.receive(PORT, MsgcMigrateFlushMark())
    with pytest.raises(RemoteProtocolError):
        src.receive(PORT, MsgcSpicevmcData(b"x"))


def test_source_waits_for_disconnect_once_every_channel_switched_then_disconnects_after_10s():
    src = connected_source(channels=(PORT, CURSOR))
    src.finish(now=1.0)
    for channel, body in ((MAIN, MNMD), (PORT, SVMD)):
        src.receive(channel, MsgcMigrateFlushMark())
        src.send(channel, MsgMigrateData(body))
    assert src.state is SourceState.WAIT_DISCONNECT
    assert src.handle_timer(now=10.9) == []
    assert src.handle_timer(now=11.0) == [DisconnectClient()]
    assert src.state is SourceState.DONE


def test_source_client_leaving_in_time_ends_migration_without_disconnect():
    src = connected_source(seamless=False)
    src.finish(now=1.0)
    src.client_disconnected()
    assert src.state is SourceState.DONE and src.get_timer() is None


def test_source_connect_error_then_finish_sends_switch_host():
    src = source()
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)
    assert src.receive(MAIN, MsgcMainMigrateConnectError()) == [ConnectComplete(False, False)]
    assert src.finish(now=1.0) == [Send(MAIN, MsgMainMigrateSwitchHost(DST))]


def test_source_connect_error_then_finish_without_switch_host_stays():
    src = source()
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)
    src.receive(MAIN, MsgcMainMigrateConnectError())
    assert src.finish(now=1.0, switch_host=False) == []
    assert src.state is SourceState.IDLE


def test_source_connect_timeout_reports_failure_and_switches_host_at_finish():
    src = source()
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)
    assert src.handle_timer(now=9.99) == []
    assert src.handle_timer(now=10.0) == [ConnectComplete(False, False)]
    assert src.finish(now=20.0) == [Send(MAIN, MsgMainMigrateSwitchHost(DST))]


@pytest.mark.parametrize("late", [MsgcMainMigrateConnected(), MsgcMainMigrateConnectedSeamless()])
def test_source_late_connected_after_timeout_is_answered_with_cancel(late):
    src = source()
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)
    src.handle_timer(now=10.0)
    assert src.receive(MAIN, late) == [Send(MAIN, MsgMainMigrateCancel())]


def test_source_late_connect_error_after_timeout_is_ignored():
    src = source()
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)
    src.handle_timer(now=10.0)
    assert src.receive(MAIN, MsgcMainMigrateConnectError()) == []


@pytest.mark.parametrize("answered", [False, True])
def test_source_cancel_sends_migrate_cancel(answered):
    src = source()
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)
    if answered:
        src.receive(MAIN, MsgcMainMigrateConnectedSeamless())
    assert src.cancel() == [Send(MAIN, MsgMainMigrateCancel())]
    assert src.state is SourceState.IDLE and src.get_timer() is None


def test_source_second_begin_cancels_the_first():
    src = source()
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)
    assert sends(src.begin(DST, MigrationMode.SEMI_SEAMLESS, now=1.0)) == [
        (MAIN, MsgMainMigrateCancel()), (MAIN, MsgMainMigrateBegin(DST)),
    ]
    assert src.get_timer() == 11.0


def test_source_connected_seamless_answer_to_plain_begin_is_a_remote_error():
    src = source()
    src.begin(DST, MigrationMode.SEMI_SEAMLESS, now=0.0)
    with pytest.raises(RemoteProtocolError):
        src.receive(MAIN, MsgcMainMigrateConnectedSeamless())


def test_source_finish_before_the_connect_answer_is_a_local_error():
    src = source()
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)
    with pytest.raises(LocalProtocolError):
        src.finish(now=1.0)


# --- s2 -----------------------------------------------------------------------------------------


def destination(caps=SEAMLESS_CLIENT, **kwargs):
    dst = DestinationMigration(SESSION_ID, caps, **kwargs)
    dst.channel_linked(PORT)
    return dst


def seamless_destination():
    dst = destination()
    dst.receive(MAIN, MsgcMainMigrateDstDoSeamless(1))
    return dst


def test_destination_main_link_with_connection_id_zero_is_not_a_migration():
    with pytest.raises(LocalProtocolError):
        DestinationMigration(0, SEAMLESS_CLIENT)


def test_destination_parks_links_before_seamless_is_agreed():
    dst = DestinationMigration(SESSION_ID, SEAMLESS_CLIENT)
    assert dst.channel_linked(PORT) == []


def test_destination_do_seamless_acks_and_attaches_parked_channels_waiting_for_data():
    out = destination().receive(MAIN, MsgcMainMigrateDstDoSeamless(1))
    assert out == [AttachChannel(PORT, wait_for_migrate_data=True), Send(MAIN, MsgMainMigrateDstSeamlessAck())]


def test_destination_do_seamless_with_newer_version_is_nacked():
    dst = destination()
    assert dst.receive(MAIN, MsgcMainMigrateDstDoSeamless(2)) == [Send(MAIN, MsgMainMigrateDstSeamlessNack())]
    assert dst.state is DestinationState.SEMI_SEAMLESS


def test_destination_do_seamless_with_seamless_disabled_is_nacked():
    dst = destination(seamless_enabled=False)
    assert dst.receive(MAIN, MsgcMainMigrateDstDoSeamless(1)) == [Send(MAIN, MsgMainMigrateDstSeamlessNack())]


def test_destination_second_do_seamless_is_a_remote_error():
    dst = destination()
    dst.receive(MAIN, MsgcMainMigrateDstDoSeamless(2))
    with pytest.raises(RemoteProtocolError):
        dst.receive(MAIN, MsgcMainMigrateDstDoSeamless(1))


def test_destination_link_after_ack_is_attached_waiting_and_data_less_channels_plainly():
    dst = seamless_destination()
    assert dst.channel_linked((ChannelType.INPUTS, 0)) == [AttachChannel((ChannelType.INPUTS, 0), True)]
    assert dst.channel_linked(CURSOR) == [AttachChannel(CURSOR, False)]


def test_destination_restores_each_channel_and_completes_after_the_last():
    dst = seamless_destination()
    out = dst.receive(PORT, MsgcMigrateData(SVMD_ABC))
    assert len(out) == 1 and out[0].channel == PORT and bytes(out[0].data.write_data) == b"abc"
    out = dst.receive(MAIN, MsgcMigrateData(MNMD))
    assert out == [RestoreMigrateData(MAIN, MainMigrateData()), MigrationCompleted(MigrationMode.SEAMLESS)]
    assert dst.state is DestinationState.MIGRATED


def test_destination_invalid_migrate_data_is_a_remote_error():
    with pytest.raises(RemoteProtocolError):
        seamless_destination().receive(PORT, MsgcMigrateData(b"XXXX" + SVMD[4:]))


def test_destination_migrate_data_on_a_channel_not_waiting_is_a_remote_error():
    dst = seamless_destination()
    dst.receive(PORT, MsgcMigrateData(SVMD))
    with pytest.raises(RemoteProtocolError):
        dst.receive(PORT, MsgcMigrateData(SVMD))


def test_destination_migrate_data_on_a_channel_without_data_transfer_is_ignored():
    dst = seamless_destination()
    dst.channel_linked(CURSOR)
    assert dst.receive(CURSOR, MsgcMigrateData(b"")) == []


def test_destination_data_before_migrate_data_is_a_remote_error():
    with pytest.raises(RemoteProtocolError):
        seamless_destination().receive(PORT, MsgcSpicevmcData(b"early"))


def test_destination_main_message_before_main_migrate_data_is_a_remote_error():
    with pytest.raises(RemoteProtocolError):
        seamless_destination().receive(MAIN, MsgcMainMouseModeRequest(2))


def test_destination_main_migrate_end_sends_main_init_with_the_session_id_and_attaches_parked():
    out = destination().receive(MAIN, MsgcMainMigrateEnd())
    assert out == [
        Send(MAIN, dataclasses.replace(DEFAULT_MAIN_INIT, session_id=SESSION_ID)),
        AttachChannel(PORT, wait_for_migrate_data=False),
        MigrationCompleted(MigrationMode.SEMI_SEAMLESS),
    ]


def test_destination_main_migrate_end_after_nack_is_semi_seamless():
    dst = destination()
    dst.receive(MAIN, MsgcMainMigrateDstDoSeamless(2))
    assert MigrationCompleted(MigrationMode.SEMI_SEAMLESS) in dst.receive(MAIN, MsgcMainMigrateEnd())


def test_destination_main_migrate_end_after_ack_is_a_remote_error():
    dst = seamless_destination()
    dst.receive(MAIN, MsgcMigrateData(MNMD))
    with pytest.raises(RemoteProtocolError):
        dst.receive(MAIN, MsgcMainMigrateEnd())


def test_destination_main_migrate_end_from_a_client_without_semi_cap_is_ignored():
    dst = destination(caps=())
    assert dst.receive(MAIN, MsgcMainMigrateEnd()) == []
    assert dst.state is DestinationState.PRE_MIGRATION


def test_destination_other_main_message_before_the_switch_is_a_remote_error():
    with pytest.raises(RemoteProtocolError):
        destination().receive(MAIN, MsgcPong(1, 2))


def test_destination_reading_a_parked_link_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        destination().receive(PORT, MsgcSpicevmcData(b"x"))


# --- client -------------------------------------------------------------------------------------


def client(channels=(PORT,), server_caps=SERVER_CAPS, **timers):
    return ClientMigration(SESSION_ID, channels, server_caps, **timers)


def linked_client(seamless=True, s2_caps=SERVER_CAPS, answer=MsgMainMigrateDstSeamlessAck, **timers):
    cli = client(**timers)
    begin = MsgMainMigrateBeginSeamless(DST, 1) if seamless else MsgMainMigrateBegin(DST)
    cli.receive(Peer.S1, MAIN, begin)
    cli.s2_linked(MAIN, s2_caps, now=0.0)
    if cli.state is ClientState.HANDSHAKE:
        cli.receive(Peer.S2, MAIN, answer())
    cli.s2_linked(PORT)
    return cli


@pytest.mark.parametrize("begin", [MsgMainMigrateBegin(DST), MsgMainMigrateBeginSeamless(DST, 1)])
def test_client_begin_links_main_to_s2_with_the_session_id(begin):
    assert client().receive(Peer.S1, MAIN, begin) == [LinkDestination(DST, SESSION_ID, (MAIN,))]


def test_client_seamless_main_link_to_s2_with_seamless_cap_sends_do_seamless_then_links_the_rest():
    cli = client()
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBeginSeamless(DST, 1))
    assert cli.s2_linked(MAIN, SERVER_CAPS, now=0.0) == [
        Send(MAIN, MsgcMainMigrateDstDoSeamless(1), Peer.S2),
        LinkDestination(DST, SESSION_ID, (PORT,)),
    ]


def test_client_without_s2_seamless_cap_goes_semi_seamless_without_asking():
    cli = client()
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBeginSeamless(DST, 1))
    assert cli.s2_linked(MAIN, SEMI) == [LinkDestination(DST, SESSION_ID, (PORT,))]
    assert cli.s2_linked(PORT) == [Send(MAIN, MsgcMainMigrateConnected(), Peer.S1)]


def test_client_semi_seamless_begin_never_sends_do_seamless():
    cli = client()
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBegin(DST))
    assert sends(cli.s2_linked(MAIN, SERVER_CAPS, now=0.0), Peer.S2) == []


def test_client_ack_and_all_links_send_connected_seamless():
    cli = client()
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBeginSeamless(DST, 1))
    cli.s2_linked(MAIN, SERVER_CAPS, now=0.0)
    assert cli.receive(Peer.S2, MAIN, MsgMainMigrateDstSeamlessAck()) == []
    assert cli.s2_linked(PORT) == [Send(MAIN, MsgcMainMigrateConnectedSeamless(), Peer.S1)]


def test_client_waits_for_the_handshake_answer_even_when_every_link_is_done():
    cli = client()
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBeginSeamless(DST, 1))
    cli.s2_linked(MAIN, SERVER_CAPS, now=0.0)
    assert cli.s2_linked(PORT) == []
    assert cli.receive(Peer.S2, MAIN, MsgMainMigrateDstSeamlessAck()) == [
        Send(MAIN, MsgcMainMigrateConnectedSeamless(), Peer.S1)
    ]


def test_client_nack_sends_connected():
    cli = linked_client(answer=MsgMainMigrateDstSeamlessNack)
    assert cli.state is ClientState.CONNECTED and cli.mode is MigrationMode.SEMI_SEAMLESS


def test_client_handshake_accepts_only_ack_or_nack_from_s2():
    cli = client()
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBeginSeamless(DST, 1))
    cli.s2_linked(MAIN, SERVER_CAPS, now=0.0)
    with pytest.raises(RemoteProtocolError):
        cli.receive(Peer.S2, MAIN, MsgMainMultiMediaTime(1))


@pytest.mark.parametrize("failing", [MAIN, PORT])
def test_client_any_link_failure_sends_connect_error_and_drops_s2(failing):
    cli = client()
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBeginSeamless(DST, 1))
    if failing == PORT:
        cli.s2_linked(MAIN, SERVER_CAPS, now=0.0)
    assert cli.s2_link_failed(failing) == [Send(MAIN, MsgcMainMigrateConnectError(), Peer.S1), DropDestination()]
    assert cli.state is ClientState.IDLE


def test_client_migrate_cancel_aborts_and_drops_s2():
    cli = linked_client()
    assert cli.receive(Peer.S1, MAIN, MsgMainMigrateCancel(), now=0.0) == [DropDestination()]
    assert cli.state is ClientState.IDLE


def test_client_semi_seamless_end_resets_switches_main_and_sends_migrate_end_on_s2():
    cli = linked_client(seamless=False)
    assert cli.receive(Peer.S1, MAIN, MsgMainMigrateEnd()) == [
        ResetChannels(), SwitchChannel(MAIN, Peer.S2), Send(MAIN, MsgcMainMigrateEnd(), Peer.S2),
    ]
    assert cli.state is ClientState.WAIT_MAIN_INIT


def test_client_semi_seamless_main_init_switches_the_other_channels():
    cli = linked_client(seamless=False)
    cli.receive(Peer.S1, MAIN, MsgMainMigrateEnd())
    assert cli.send(PORT, MsgcSpicevmcData(b"held")) == []
    init = MsgMainInit(SESSION_ID, 0, 3, 1, 0, 10, 0, 0)
    assert cli.receive(Peer.S2, MAIN, init) == [
        SwitchChannel(PORT, Peer.S2),
        Send(PORT, MsgcSpicevmcData(b"held"), Peer.S2),
        MigrationCompleted(MigrationMode.SEMI_SEAMLESS),
    ]


def test_client_semi_seamless_s2_must_send_main_init_first():
    cli = linked_client(seamless=False)
    cli.receive(Peer.S1, MAIN, MsgMainMigrateEnd())
    with pytest.raises(RemoteProtocolError):
        cli.receive(Peer.S2, MAIN, MsgPing(1, 2))


def test_client_ignores_main_migrate_end_from_a_server_without_semi_cap():
    cli = ClientMigration(SESSION_ID, [PORT], server_main_caps=())
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBegin(DST))
    cli.s2_linked(MAIN, ())
    cli.s2_linked(PORT)
    assert cli.receive(Peer.S1, MAIN, MsgMainMigrateEnd()) == []
    assert cli.state is ClientState.CONNECTED


def test_client_migrate_with_need_flush_sends_flush_mark_at_once():
    cli = linked_client()
    assert cli.receive(Peer.S1, PORT, MsgMigrate(3), now=0.0) == [Send(PORT, MsgcMigrateFlushMark(), Peer.S1)]


def test_client_migrate_data_goes_first_on_s2_byte_for_byte_then_retained_messages():
    cli = linked_client()
    cli.receive(Peer.S1, PORT, MsgMigrate(3), now=0.0)
    assert cli.send(PORT, MsgcSpicevmcData(b"queued")) == []
    body = memoryview(SVMD_ABC)
    assert cli.migrate_data(PORT, body, now=0.0) == [
        SwitchChannel(PORT, Peer.S2),
        RelayMigrateData(PORT, body),
        Send(PORT, MsgcSpicevmcData(b"queued"), Peer.S2),
    ]


def test_client_migrate_without_data_transfer_switches_at_once():
    cli = ClientMigration(SESSION_ID, [PORT, CURSOR], SERVER_CAPS)
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBeginSeamless(DST, 1))
    cli.s2_linked(MAIN, SERVER_CAPS, now=0.0)
    cli.receive(Peer.S2, MAIN, MsgMainMigrateDstSeamlessAck())
    cli.s2_linked(PORT), cli.s2_linked(CURSOR)
    assert cli.receive(Peer.S1, CURSOR, MsgMigrate(0), now=0.0) == [SwitchChannel(CURSOR, Peer.S2)]


def test_client_message_other_than_migrate_data_after_migrate_aborts_that_channel_switch():
    cli = linked_client()
    cli.receive(Peer.S1, PORT, MsgMigrate(3), now=0.0)
    cli.send(PORT, MsgcSpicevmcData(b"queued"))
    assert cli.not_migrate_data(PORT) == []
    # the channel stays on s1, with what it held
    assert cli.send(PORT, MsgcSpicevmcData(b"next")) == [
        Send(PORT, MsgcSpicevmcData(b"queued"), Peer.S1), Send(PORT, MsgcSpicevmcData(b"next"), Peer.S1),
    ]


def test_client_not_migrate_data_on_a_channel_not_waiting_for_it_is_a_local_error():
    cli = linked_client()
    with pytest.raises(LocalProtocolError):
        cli.not_migrate_data(PORT)


def test_client_decoded_message_where_migrate_data_must_follow_is_a_remote_error():
    cli = linked_client()
    cli.receive(Peer.S1, PORT, MsgMigrate(3), now=0.0)
    with pytest.raises(RemoteProtocolError):
        cli.receive(Peer.S1, PORT, MsgSpicevmcData(b"x"))


def test_client_migrate_without_connected_seamless_is_a_remote_error():
    cli = linked_client(seamless=False)
    with pytest.raises(RemoteProtocolError):
        cli.receive(Peer.S1, PORT, MsgMigrate(3), now=0.0)


def test_client_migrate_data_without_migrate_is_a_remote_error():
    with pytest.raises(RemoteProtocolError):
        linked_client().migrate_data(PORT, SVMD, now=0.0)


def test_client_migrate_data_through_receive_is_a_local_error():
    """The body is passed on unread (6): MIGRATE_DATA comes in through migrate_data only."""
    cli = linked_client()
    cli.receive(Peer.S1, PORT, MsgMigrate(3), now=0.0)
    with pytest.raises(LocalProtocolError):
        cli.receive(Peer.S1, PORT, MsgMigrateData(SVMD), now=0.0)


def switched_client(**timers):
    cli = linked_client(**timers)
    for channel, body in ((MAIN, MNMD), (PORT, SVMD)):
        cli.receive(Peer.S1, channel, MsgMigrate(3), now=0.0)
        out = cli.migrate_data(channel, body, now=0.0)
    return cli, out


def test_client_last_channel_switched_keeps_s1_until_s2_main_speaks():
    cli, out = switched_client()
    assert events(out)[-1] == AwaitConfirmation() and cli.state is ClientState.CONFIRMING
    assert cli.s2_spoke() == [CloseSource(), MigrationCompleted(MigrationMode.SEAMLESS)]
    assert cli.state is ClientState.MIGRATED


def test_client_s2_that_spoke_before_the_last_switch_completes_it_at_once():
    cli = linked_client()
    cli.receive(Peer.S1, MAIN, MsgMigrate(3), now=0.0)
    cli.migrate_data(MAIN, MNMD, now=0.0)
    assert cli.s2_spoke() == []
    cli.receive(Peer.S1, PORT, MsgMigrate(3), now=0.0)
    out = cli.migrate_data(PORT, SVMD, now=0.0)
    assert events(out)[-2:] == [CloseSource(), MigrationCompleted(MigrationMode.SEAMLESS)]


def test_client_silent_s2_completes_when_the_grace_is_over():
    cli, _ = switched_client()
    assert cli.get_timer() == CONFIRM_GRACE
    assert cli.handle_timer(CONFIRM_GRACE - 0.001) == []
    assert cli.handle_timer(CONFIRM_GRACE) == [CloseSource(), MigrationCompleted(MigrationMode.SEAMLESS)]
    assert cli.get_timer() is None
    assert cli.s1_let_go() == [] and cli.s2_spoke() == []  # late inputs change nothing


def test_client_s1_letting_go_of_main_completes_before_the_grace_is_over():
    cli, _ = switched_client()
    assert cli.s1_let_go() == [CloseSource(), MigrationCompleted(MigrationMode.SEAMLESS)]
    assert cli.get_timer() is None and cli.handle_timer(CONFIRM_GRACE) == []


def test_client_s2_that_speaks_in_the_grace_stops_its_timer():
    cli, _ = switched_client()
    cli.s2_spoke()
    assert cli.get_timer() is None


def test_client_handshake_without_answer_in_time_is_a_connect_error():
    cli = client()
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBeginSeamless(DST, 1))
    cli.s2_linked(MAIN, SERVER_CAPS, now=5.0)
    assert cli.get_timer() == 5.0 + HANDSHAKE_TIMEOUT
    assert cli.handle_timer(5.0 + HANDSHAKE_TIMEOUT) == [
        Send(MAIN, MsgcMainMigrateConnectError(), Peer.S1), DropDestination(),
    ]
    assert cli.state is ClientState.IDLE and cli.get_timer() is None


def test_client_handshake_answer_stops_its_timer():
    cli = client()
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBeginSeamless(DST, 1))
    cli.s2_linked(MAIN, SERVER_CAPS, now=5.0)
    cli.receive(Peer.S2, MAIN, MsgMainMigrateDstSeamlessAck())
    assert cli.get_timer() is None


def test_client_a_timer_needs_now_from_the_call_that_starts_it():
    cli = client()
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBeginSeamless(DST, 1))
    with pytest.raises(LocalProtocolError):
        cli.s2_linked(MAIN, SERVER_CAPS)


def test_client_rollback_without_cancel_from_s1_in_time_loses_the_session():
    cli, _ = switched_client()
    cli.s2_failed(now=100.0)
    assert cli.get_timer() == 100.0 + ROLLBACK_TIMEOUT
    assert cli.handle_timer(100.0 + ROLLBACK_TIMEOUT - 1) == []
    [lost] = cli.handle_timer(100.0 + ROLLBACK_TIMEOUT)
    assert isinstance(lost, SessionLost) and cli.state is ClientState.LOST


# The three timers with configured values, just before and at each deadline.


def test_client_configured_handshake_timeout_fires_at_its_deadline_not_before():
    cli = client(handshake_timeout=0.5)
    cli.receive(Peer.S1, MAIN, MsgMainMigrateBeginSeamless(DST, 1))
    cli.s2_linked(MAIN, SERVER_CAPS, now=5.0)
    assert cli.handle_timer(5.499) == [] and cli.state is ClientState.HANDSHAKE
    assert cli.handle_timer(5.5) == [Send(MAIN, MsgcMainMigrateConnectError(), Peer.S1), DropDestination()]


def test_client_configured_confirm_grace_fires_at_its_deadline_not_before():
    cli, _ = switched_client(confirm_grace=0.25)
    assert cli.handle_timer(0.249) == [] and cli.state is ClientState.CONFIRMING
    assert cli.handle_timer(0.25) == [CloseSource(), MigrationCompleted(MigrationMode.SEAMLESS)]


def test_client_configured_rollback_timeout_fires_at_its_deadline_not_before():
    cli, _ = switched_client(rollback_timeout=0.75)
    cli.s2_failed(now=100.0)
    assert cli.handle_timer(100.749) == [] and cli.state is ClientState.ROLLING_BACK
    [lost] = cli.handle_timer(100.75)
    assert isinstance(lost, SessionLost) and cli.state is ClientState.LOST


def test_client_cancel_from_s1_in_time_stops_the_rollback_timer():
    cli, _ = switched_client()
    cli.s2_failed(now=100.0)
    cli.receive(Peer.S1, MAIN, MsgMainMigrateCancel(), now=101.0)
    assert cli.state is ClientState.IDLE and cli.get_timer() is None


@pytest.mark.parametrize("when", ["port waiting for MIGRATE_DATA", "all switched"])
def test_client_s2_failure_returns_to_s1_and_resends_after_its_cancel(when):
    """Written to s2 before it confirmed, retained meanwhile: both go to s1 after its CANCEL, in
    that order, ahead of anything newer."""
    cli = linked_client()
    cli.receive(Peer.S1, MAIN, MsgMigrate(3), now=0.0)
    cli.migrate_data(MAIN, MNMD, now=0.0)
    cli.receive(Peer.S1, PORT, MsgMigrate(3), now=0.0)
    if when == "all switched":
        cli.migrate_data(PORT, SVMD, now=0.0)
        assert cli.send(PORT, MsgcSpicevmcData(b"to s2")) == [Send(PORT, MsgcSpicevmcData(b"to s2"), Peer.S2)]
    out = cli.s2_failed(now=0.0)
    assert cli.state is ClientState.ROLLING_BACK
    switched_back = [SwitchChannel(MAIN, Peer.S1)] + ([SwitchChannel(PORT, Peer.S1)] if when == "all switched" else [])
    assert out == [*switched_back, AwaitRollback()]
    assert cli.send(PORT, MsgcSpicevmcData(b"held")) == []
    if when != "all switched":  # s1 still sends the port's MIGRATE_DATA: it is read and dropped
        assert cli.migrate_data(PORT, SVMD, now=0.0) == [DropMigrateData(PORT, SVMD)]
    out = cli.receive(Peer.S1, MAIN, MsgMainMigrateCancel(), now=0.0)
    resent = [MsgcSpicevmcData(b"to s2")] if when == "all switched" else []
    assert [ev for ev in out if isinstance(ev, Send)] == [
        Send(PORT, msg, Peer.S1) for msg in (*resent, MsgcSpicevmcData(b"held"))
    ]
    assert DropDestination() in out and out[-1] == RolledBack()
    assert cli.state is ClientState.IDLE
    assert cli.send(PORT, MsgcSpicevmcData(b"next")) == [Send(PORT, MsgcSpicevmcData(b"next"), Peer.S1)]


def test_client_cancel_before_a_migrate_data_arrived_waits_to_drain_it():
    """s1's CANCEL can overtake the MIGRATE_DATA of another channel (another socket): the rollback
    ends only once that channel has read and dropped it; the channel's messages wait until then."""
    cli = linked_client()
    cli.receive(Peer.S1, MAIN, MsgMigrate(3), now=0.0)
    cli.migrate_data(MAIN, MNMD, now=0.0)
    cli.receive(Peer.S1, PORT, MsgMigrate(3), now=0.0)
    cli.send(PORT, MsgcSpicevmcData(b"held"))
    assert cli.s2_failed(now=0.0) == [SwitchChannel(MAIN, Peer.S1), AwaitRollback()]
    out = cli.receive(Peer.S1, MAIN, MsgMainMigrateCancel(), now=0.0)
    assert RolledBack() not in out
    assert cli.state is ClientState.ROLLING_BACK
    assert cli.send(PORT, MsgcSpicevmcData(b"more")) == []
    out = cli.migrate_data(PORT, SVMD, now=0.0)
    assert out[0] == DropMigrateData(PORT, SVMD)
    assert [ev for ev in out if isinstance(ev, Send)] == [
        Send(PORT, MsgcSpicevmcData(b"held"), Peer.S1), Send(PORT, MsgcSpicevmcData(b"more"), Peer.S1),
    ]
    assert out[-1] == RolledBack() and cli.state is ClientState.IDLE


def test_client_s2_failure_after_it_confirmed_is_not_a_rollback():
    cli, _ = switched_client()
    cli.s2_spoke()
    with pytest.raises(LocalProtocolError):
        cli.s2_failed(now=0.0)


def test_client_refuses_owner_sent_migration_messages():
    with pytest.raises(LocalProtocolError):
        client().send(PORT, MsgcMigrateFlushMark())


@pytest.mark.parametrize("linking", [False, True])
def test_client_switch_host_reconnects_with_connection_id_zero(linking):
    cli = client()
    if linking:
        cli.receive(Peer.S1, MAIN, MsgMainMigrateBegin(DST))
    out = cli.receive(Peer.S1, MAIN, MsgMainMigrateSwitchHost(DST))
    assert out[-1] == SwitchHost(DST, connection_id=0)
    assert (DropDestination() in out) is linking
    assert cli.session_id == 0 and cli.state is ClientState.HOST_SWITCHED


# --- migrate-data formats -----------------------------------------------------------------------


def test_migrate_data_magics_are_the_ascii_tags_as_little_endian_u32():
    assert (MigrateDataMagic.MAIN, MigrateDataMagic.SPICEVMC) == (0x444D4E4D, 0x444D5653)
    assert (MigrateDataMagic.SMARTCARD, MigrateDataMagic.DISPLAY, MigrateDataMagic.INPUTS) == (
        0x444D4353, 0x444D4344, 0x444D4349,
    )


def test_svmd_with_three_pending_bytes_is_the_36_byte_vector():
    assert build_spicevmc_migrate_data(CharDeviceMigrateData(write_data=b"abc")) == SVMD_ABC


def test_svmd_with_nothing_pending_is_33_bytes_with_null_pointer():
    assert SVMD_ABC[:21] + bytes(12) == SVMD


def test_svmd_parses_the_vector_pointing_into_the_body():
    device = parse_spicevmc_migrate_data(SVMD_ABC)
    assert device == CharDeviceMigrateData(write_data=device.write_data)
    assert bytes(device.write_data) == b"abc" and device.write_data.obj is SVMD_ABC


@pytest.mark.parametrize(
    "body",
    [
        SVMD_ABC[:32],  # shorter than 33
        b"SVMX" + SVMD_ABC[4:],  # magic
        SVMD_ABC[:4] + struct.pack("<I", 2) + SVMD_ABC[8:],  # newer header version
        SVMD_ABC[:8] + struct.pack("<I", 2) + SVMD_ABC[12:],  # newer char device version
        SVMD_ABC[:12] + b"\0" + SVMD_ABC[13:],  # connected = 0
        SVMD_ABC[:29] + struct.pack("<I", 34) + SVMD_ABC[33:],  # data runs past the end
        SVMD_ABC[:29] + struct.pack("<I", 8) + SVMD_ABC[33:],  # data inside the fixed part
    ],
)
def test_svmd_invalid_bodies_are_codec_errors(body):
    with pytest.raises(CodecError):
        parse_spicevmc_migrate_data(body)


def test_mnmd_without_agent_is_the_65_byte_empty_form():
    assert b"MNMD" + struct.pack("<II", 1, 1) + bytes(53) == MNMD


def test_mnmd_round_trips_agent_write_data_then_partial_header():
    state = MainMigrateData(
        agent=CharDeviceMigrateData(True, 7, 3, 2, b"to-agent"), client_agent_started=True,
        chunk_header_size=8, chunk_header=b"\1\0\0\0\x10\0\0\0", msg_header_done=False,
        msg_header_partial=b"partial", msg_remaining=5, msg_filter_result=3,
        client_msg_remaining=9, client_msg_filter_result=1,
    )
    body = build_main_migrate_data(state)
    assert body[65:] == b"to-agent" + b"partial"
    assert struct.unpack_from("<I", body, 29) == (65,) and struct.unpack_from("<I", body, 51) == (73,)
    parsed = parse_main_migrate_data(body)
    assert parsed == dataclasses.replace(
        state,
        agent=dataclasses.replace(state.agent, write_data=parsed.agent.write_data),
        msg_header_partial=parsed.msg_header_partial,
    )
    assert bytes(parsed.agent.write_data) == b"to-agent" and bytes(parsed.msg_header_partial) == b"partial"


@pytest.mark.parametrize(
    "body",
    [
        MNMD[:64],
        MNMD[:33] + b"\0" + struct.pack("<I", 9) + MNMD[38:],  # chunk header size > 8
        MNMD[:47] + struct.pack("<I", 20) + MNMD[51:],  # partial header of a whole header's size
        MNMD[:47] + struct.pack("<II", 4, 60) + MNMD[55:],  # partial header past the end
        MNMD[:59] + b"\4" + MNMD[60:],  # filter result
    ],
)
def test_mnmd_invalid_bodies_are_codec_errors(body):
    with pytest.raises(CodecError):
        parse_main_migrate_data(body)


chunks = st.lists(st.binary(max_size=300), max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    pending=chunks, device_state=st.binary(max_size=64),
    numbers=st.tuples(*[st.integers(0, 2**32 - 1)] * 4, *[st.integers(0, 2**64 - 1)] * 2),
)
def test_swpd_round_trips(pending, device_state, numbers):
    generation, window, client_tokens, send_tokens, serial, client_serial = numbers
    state = PortMigrateData(generation, window, serial, client_serial, client_tokens, send_tokens,
                            device_state, pending)
    body = build_port_migrate_data(state)
    assert bytes(body[:8]) == b"SWPD\1\0\0\0"
    parsed = parse_port_migrate_data(bytes(body))
    assert [bytes(c) for c in parsed.pending] == pending and bytes(parsed.device_state) == device_state
    assert (parsed.ack_generation, parsed.ack_window, parsed.serial, parsed.client_serial,
            parsed.num_client_tokens, parsed.num_send_tokens) == (generation, window, serial, client_serial,
                                                                  client_tokens, send_tokens)


def test_swpd_parse_is_zero_copy():
    body = build_port_migrate_data(PortMigrateData(pending=[b"a" * 4096, b"b" * 100]))
    parsed = parse_port_migrate_data(body)
    first = np.frombuffer(parsed.pending[0], dtype=np.uint8)
    assert np.shares_memory(first, body)


def test_swpd_in_many_segments_round_trips_pending_and_client_bound_data():
    pending = [bytes([i]) * (300 + i) for i in range(50)]
    to_client = [b"out" * 100, b"put"]
    body = build_port_migrate_data(PortMigrateData(pending=pending, to_client=to_client), segment=2048)
    parsed = parse_port_migrate_data(body)
    assert [bytes(c) for c in parsed.pending] == pending
    assert [bytes(c) for c in parsed.to_client] == to_client


def test_swpd_writer_knows_its_size_first_and_drains_the_queues_it_packs():
    from collections import deque

    pending = deque(bytes([i]) * 1000 for i in range(40))
    writer = PortMigrateDataWriter(PortMigrateData(pending=pending), segment=4096)
    size = writer.size
    sizes_seen = []
    body = bytearray()
    for piece in writer.segments():
        body += piece.tobytes()
        sizes_seen.append(len(pending))
    assert len(body) == size and len(pending) == 0
    assert sizes_seen[1] < 40  # the first container popped what it packed
    assert len(parse_port_migrate_data(bytes(body)).pending) == 40


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.__setitem__(slice(0, 4), b"SWPX"),
        lambda b: b.__setitem__(slice(4, 8), struct.pack("<I", 2)),
        lambda b: b.extend(b"trailing"),
        lambda b: b.__setitem__(slice(-4, None), b"\0\0\0\0") or b.__setitem__(slice(8, 12), b"XXXX"),
    ],
    ids=["magic", "version", "trailing-bytes", "container"],
)
def test_swpd_invalid_bodies_are_codec_errors(mutate):
    body = bytearray(build_port_migrate_data(PortMigrateData(pending=[b"abc"])))
    mutate(body)
    with pytest.raises(CodecError):
        parse_port_migrate_data(body)


def test_swpd_pending_counts_must_match_the_chunks():
    body = bytearray(build_port_migrate_data(PortMigrateData(pending=[b"abc"])))
    record = bytes(body).index(struct.pack("<QI", 3, 1))  # pending_size, pending_count
    body[record : record + 8] = struct.pack("<Q", 4)
    with pytest.raises(CodecError):
        parse_port_migrate_data(body)


def test_port_channel_migrate_data_is_parsed_as_svmd_or_swpd_by_magic():
    assert isinstance(parse_migrate_data(ChannelType.PORT, SVMD), CharDeviceMigrateData)
    swpd = build_port_migrate_data(PortMigrateData())
    assert isinstance(parse_migrate_data(ChannelType.PORT, swpd), PortMigrateData)


# --- the three roles wired together -------------------------------------------------------------


class Simulation:
    """s1 <-> client <-> s2 in memory; every message is encoded and decoded on its way."""

    def __init__(self, port_format="svmd", client_caps=SEAMLESS_CLIENT, s2_seamless=True):
        channels = [MAIN, PORT]
        self.s1 = SourceMigration(channels, client_caps)
        self.client = ClientMigration(SESSION_ID, channels, SERVER_CAPS)
        self.s2: DestinationMigration | None = None
        self.client_caps, self.s2_seamless, self.port_format = client_caps, s2_seamless, port_format
        self.wire: deque = deque()
        self.s1_device_writes: list[bytes] = []  # client->device bytes s1 received but did not write
        self.s2_restored: dict = {}
        self.s2_received: list = []
        self.client_received: list = []
        self.completed: list = []
        self.unread: dict = {MAIN: [], PORT: []}  # s2 -> client bytes waiting in frozen sockets
        self.client_on_s2: set = set()

    # delivery

    def post(self, to, channel, message):
        direction = S2C if to == "client" else C2S
        channel_type = channel[1][0] if to == "client" else channel[0]
        wire = decode(channel_type, direction, message.TYPE, encode(message))
        self.wire.append((to, channel, wire))

    def run(self):
        while self.wire:
            to, channel, message = self.wire.popleft()
            if to == "s1":
                self.s1_outputs(self.s1_receive(channel, message))
            elif to == "s2":
                self.s2_received.append((channel, message))
                self.s2_outputs(self.s2.receive(channel, message))
            else:
                peer, channel = channel
                reads_s2 = channel in self.client_on_s2 or (
                    channel == MAIN and self.client.state is ClientState.HANDSHAKE
                )
                if peer is Peer.S2 and not reads_s2:
                    self.unread[channel].append(message)
                    continue
                self.client_received.append((peer, channel, message))
                if isinstance(message, MsgMigrateData):  # as the client session does: body unread
                    self.client_outputs(self.client.migrate_data(channel, message.data, now=0.0))
                else:
                    self.client_outputs(self.client.receive(peer, channel, message, now=0.0))
                if peer is Peer.S2 and channel == MAIN:  # as the client session does
                    self.client_outputs(self.client.s2_spoke())

    def s1_receive(self, channel, message):
        out = self.s1.receive(channel, message)
        if isinstance(message, MsgcSpicevmcData):
            self.s1_device_writes.append(bytes(message.data))  # the stopped VM does not drain it
        return out

    # owners

    def s1_outputs(self, out):
        for item in out:
            if isinstance(item, Send):
                self.post("client", (Peer.S1, item.channel), item.message)
            elif isinstance(item, ConnectComplete):
                self.completed.append(("s1 connect", item))
            elif isinstance(item, MigrateDataRequested):
                self.s1_outputs(self.s1.send(item.channel, MsgMigrateData(self.migrate_data(item.channel))))

    def migrate_data(self, channel):
        if channel == MAIN:
            return build_main_migrate_data()
        pending = b"".join(self.s1_device_writes)
        if self.port_format == "svmd":
            return build_spicevmc_migrate_data(CharDeviceMigrateData(write_data=pending))
        return bytes(build_port_migrate_data(PortMigrateData(serial=42, pending=self.s1_device_writes)))

    def s2_outputs(self, out):
        for item in out:
            if isinstance(item, Send):
                self.post("client", (Peer.S2, item.channel), item.message)
            elif isinstance(item, AttachChannel) and item.channel == PORT:
                self.s2_outputs([Send(PORT, MsgPortInit("org.spice.test", 1))])  # the channel's on-connect
            elif isinstance(item, RestoreMigrateData):
                self.s2_restored[item.channel] = item.data
            elif isinstance(item, MigrationCompleted):
                self.completed.append(("s2", item))
                if item.mode is MigrationMode.SEAMLESS:  # what our s2 says once it has the session
                    self.post("client", (Peer.S2, MAIN), MsgMainMultiMediaTime(1))

    def client_outputs(self, out):
        for item in out:
            if isinstance(item, RelayMigrateData):
                self.post("s2", item.channel, MsgcMigrateData(item.body))
            elif isinstance(item, Send):
                if item.peer is Peer.S1:
                    self.post("s1", item.channel, item.message)
                else:
                    self.post("s2", item.channel, item.message)
            elif isinstance(item, LinkDestination):
                for channel in item.channels:
                    if channel == MAIN:
                        self.s2 = DestinationMigration(
                            item.connection_id, self.client_caps, seamless_enabled=self.s2_seamless
                        )
                        self.client_outputs(self.client.s2_linked(MAIN, SERVER_CAPS, now=0.0))
                    else:
                        self.s2_outputs(self.s2.channel_linked(channel))
                        self.client_outputs(self.client.s2_linked(channel))
            elif isinstance(item, SwitchChannel):
                self.client_on_s2.add(item.channel)
                held, self.unread[item.channel] = self.unread[item.channel], []
                self.wire.extendleft(("client", (Peer.S2, item.channel), m) for m in reversed(held))
            elif isinstance(item, MigrationCompleted):
                self.completed.append(("client", item))

    def client_send(self, channel, message):
        self.client_outputs(self.client.send(channel, message))


@pytest.mark.parametrize("port_format", ["svmd", "swpd"])
def test_simulation_seamless_moves_in_flight_port_data_and_queued_messages_to_s2(port_format):
    sim = Simulation(port_format)
    sim.s1_outputs(sim.s1.begin(DST, MigrationMode.SEAMLESS, now=0.0))
    sim.run()
    assert sim.completed == [("s1 connect", ConnectComplete(True, True))]
    sim.s1_outputs(sim.s1.finish(now=1.0))
    # The client writes while MIGRATE is in flight (reaches s1 before FLUSH_MARK) ...
    sim.client_send(PORT, MsgcSpicevmcData(b"in-flight"))
    sim.run()
    # ... and after it switched: that goes to s2, after MIGRATE_DATA.
    sim.client_send(PORT, MsgcSpicevmcData(b"after"))
    sim.run()

    done = MigrationCompleted(MigrationMode.SEAMLESS)
    assert sorted(sim.completed[1:]) == [("client", done), ("s2", done)]
    port = sim.s2_restored[PORT]
    pending = port.write_data if port_format == "svmd" else b"".join(bytes(c) for c in port.pending)
    assert bytes(pending) == b"in-flight"
    port_on_s2 = [type(m) for c, m in sim.s2_received if c == PORT]
    assert port_on_s2 == [MsgcMigrateData, MsgcSpicevmcData]
    main_on_s2 = [type(m) for c, m in sim.s2_received if c == MAIN]
    assert main_on_s2 == [MsgcMainMigrateDstDoSeamless, MsgcMigrateData]
    assert sim.s1.state is SourceState.WAIT_DISCONNECT
    assert sim.client.state is ClientState.MIGRATED and sim.s2.state is DestinationState.MIGRATED


def test_simulation_semi_seamless_ends_with_main_init_from_s2():
    sim = Simulation(client_caps=SEMI)
    sim.s1_outputs(sim.s1.begin(DST, MigrationMode.SEAMLESS, now=0.0))
    sim.run()
    sim.s1_outputs(sim.s1.finish(now=1.0))
    sim.run()
    assert sorted(sim.completed[1:]) == [
        ("client", MigrationCompleted(MigrationMode.SEMI_SEAMLESS)),
        ("s2", MigrationCompleted(MigrationMode.SEMI_SEAMLESS)),
    ]
    from_s2 = [(c, type(m)) for p, c, m in sim.client_received if p is Peer.S2]
    assert from_s2 == [(MAIN, MsgMainInit), (PORT, MsgPortInit)]
    assert next(m for p, c, m in sim.client_received if p is Peer.S2).session_id == SESSION_ID
    assert [(c, type(m)) for c, m in sim.s2_received] == [(MAIN, MsgcMainMigrateEnd)]


def test_simulation_s2_nack_falls_back_to_semi_seamless():
    sim = Simulation(s2_seamless=False)
    sim.s1_outputs(sim.s1.begin(DST, MigrationMode.SEAMLESS, now=0.0))
    sim.run()
    assert sim.completed == [("s1 connect", ConnectComplete(True, False))]
    sim.s1_outputs(sim.s1.finish(now=1.0))
    sim.run()
    assert ("client", MigrationCompleted(MigrationMode.SEMI_SEAMLESS)) in sim.completed


# --- every state against every input ------------------------------------------------------------


ROLES = {
    "source": lambda: SourceMigration([PORT, CURSOR], SEAMLESS_CLIENT),
    "destination": lambda: DestinationMigration(SESSION_ID, SEAMLESS_CLIENT),
    "client": lambda: ClientMigration(SESSION_ID, [PORT], SERVER_CAPS),
}


ROLE_INPUTS = {
    ("source", "TABLE"): SourceInput,
    ("source", "CHANNEL_TABLE"): [Sent(migrate) for migrate in Migrate],
    ("destination", "TABLE"): [i for i in DestinationInput if "ATTACH" not in i.name and "WAIT" not in i.name],
    ("destination", "CHANNEL_TABLE"): [i for i in DestinationInput if "ATTACH" in i.name or "WAIT" in i.name],
    ("client", "TABLE"): ClientInput,
    ("client", "CHANNEL_TABLE"): [*ClientChannelInput, *(Received(migrate) for migrate in Migrate)],
}


def test_table_inputs_carry_their_origin():
    assert Received(MsgcMigrateFlushMark).origin is Origin.REMOTE
    assert Sent(Migrate.NEED_FLUSH).origin is Origin.LOCAL
    assert ClientInput.CONFIRMATION_DUE.origin is Origin.TIMER
    assert Origin.TIMER.error is LocalProtocolError and Origin.REMOTE.error is RemoteProtocolError


@pytest.mark.parametrize("flags", [4, 0x80000000])
def test_migrate_flags_beyond_the_known_ones_are_the_senders_fault(flags):
    with pytest.raises(RemoteProtocolError):
        Migrate.of(flags, Origin.REMOTE)
    with pytest.raises(LocalProtocolError):
        Migrate.of(flags, Origin.LOCAL)


@pytest.mark.parametrize("role", ROLES)
def test_every_pair_missing_from_a_table_is_the_right_protocol_error(role):
    """The input's origin decides: the peer's fault for what it sent, ours for the rest."""
    for table_name in ("TABLE", "CHANNEL_TABLE"):
        table = getattr(type(ROLES[role]()), table_name)
        states = next(iter(table))[0].__class__
        inputs = {inp for _, inp in table} | set(ROLE_INPUTS[role, table_name])
        for state, inp in itertools.product(states, inputs):
            if (state, inp) in table:
                continue
            machine = ROLES[role]()
            expected = inp.origin.error
            with pytest.raises(expected):
                if table_name == "TABLE":
                    machine.state = state
                    machine._fire(inp)
                else:
                    machine.channels[MAIN] = state
                    machine._fire_channel(MAIN, inp)


S1_TO_CLIENT = [
    MsgMainMigrateBegin(DST), MsgMainMigrateBeginSeamless(DST, 1), MsgMainMigrateCancel(), MsgMainMigrateEnd(),
    MsgMainMigrateSwitchHost(DST), MsgMigrate(0), MsgMigrate(1), MsgMigrate(3), MsgPing(1, 2),
]
S2_TO_CLIENT = [MsgMainMigrateDstSeamlessAck(), MsgMainMigrateDstSeamlessNack(), DEFAULT_MAIN_INIT, MsgPing(1, 2)]
CLIENT_TO_SERVER = [
    MsgcMainMigrateConnected(), MsgcMainMigrateConnectedSeamless(), MsgcMainMigrateConnectError(),
    MsgcMigrateFlushMark(), MsgcMigrateData(SVMD), MsgcMigrateData(MNMD), MsgcMigrateData(b"junk"),
    MsgcMainMigrateDstDoSeamless(1), MsgcMainMigrateDstDoSeamless(2), MsgcMainMigrateEnd(), MsgcSpicevmcData(b"x"),
]
channel_st = st.sampled_from([MAIN, PORT])
now_st = st.floats(0, 30)

SOURCE_CALLS = st.one_of(
    st.tuples(st.just("begin"), st.just(DST), st.sampled_from(MigrationMode), now_st),
    st.tuples(st.just("cancel")),
    st.tuples(st.just("finish"), now_st, st.booleans()),
    st.tuples(st.just("handle_timer"), now_st),
    st.tuples(st.just("client_disconnected")),
    st.tuples(st.just("receive"), channel_st, st.sampled_from(CLIENT_TO_SERVER)),
    st.tuples(st.just("send"), channel_st, st.sampled_from([MsgMigrateData(SVMD), MsgPing(1, 2), MsgMigrate(3)])),
)
DESTINATION_CALLS = st.one_of(
    st.tuples(st.just("channel_linked"), st.just(PORT)),
    st.tuples(st.just("receive"), channel_st, st.sampled_from(CLIENT_TO_SERVER)),
)
NOW = {"now": 0.0}  # the calls that may start a client timer
CLIENT_CALLS = st.one_of(
    st.tuples(st.just("receive"), st.just(Peer.S1), channel_st, st.sampled_from(S1_TO_CLIENT), st.just(NOW)),
    st.tuples(st.just("receive"), st.just(Peer.S2), channel_st, st.sampled_from(S2_TO_CLIENT), st.just(NOW)),
    st.tuples(st.just("s2_linked"), channel_st, st.sampled_from([(), SERVER_CAPS]), st.just(NOW)),
    st.tuples(st.just("s2_link_failed"), channel_st),
    st.tuples(st.just("s2_failed"), st.just(NOW)),
    st.tuples(st.just("s2_spoke")),
    st.tuples(st.just("s1_let_go")),
    st.tuples(st.just("migrate_data"), channel_st, st.just(SVMD), st.just(NOW)),
    st.tuples(st.just("not_migrate_data"), channel_st),
    st.tuples(st.just("handle_timer"), now_st),
    st.tuples(st.just("send"), channel_st, st.sampled_from([MsgcSpicevmcData(b"x"), MsgcMigrateFlushMark()])),
)
OUTPUTS = {"source": SourceOutput, "destination": DestinationOutput, "client": ClientOutput}


@settings(max_examples=400, deadline=None)
@given(
    role_calls=st.one_of(
        st.tuples(st.just("source"), st.lists(SOURCE_CALLS, max_size=25)),
        st.tuples(st.just("destination"), st.lists(DESTINATION_CALLS, max_size=25)),
        st.tuples(st.just("client"), st.lists(CLIENT_CALLS, max_size=25)),
    )
)
def test_any_sequence_of_inputs_yields_outputs_or_a_protocol_error_never_a_crash(role_calls):
    """Outputs of the role's own union until a call raises; after that every call is refused."""
    role, calls = role_calls
    machine = ROLES[role]()
    failed = False
    for name, *args in calls:
        kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
        try:
            out = getattr(machine, name)(*args, **kwargs)
        except ProtocolError as err:
            assert not failed or (isinstance(err, LocalProtocolError) and "already failed" in str(err))
            failed = True
            assert machine.failed and getattr(machine, "get_timer", lambda: None)() is None
            continue
        assert not failed
        assert all(isinstance(item, OUTPUTS[role]) for item in out)


# --- a role that raised has failed for good (as h11's ERROR state) --------------------------------


def test_source_that_raised_refuses_every_later_input():
    src = connected_source()
    src.finish(now=1.0)
    with pytest.raises(RemoteProtocolError):
        src.receive(MAIN, MsgcMigrateFlushMark())  # MAIN flushes, but twice is too many
        src.receive(MAIN, MsgcMigrateFlushMark())
    assert src.failed and isinstance(src.error, RemoteProtocolError)
    assert src.get_timer() is None and not src.can_roll_back and not src.allows(SourceInput.CANCEL)
    for call in (lambda: src.handle_timer(100.0), src.client_disconnected, src.cancel,
                 lambda: src.receive(PORT, MsgcSpicevmcData(b"x"))):
        with pytest.raises(LocalProtocolError, match="already failed"):
            call()


def test_destination_that_raised_refuses_every_later_input():
    dst = seamless_destination()
    with pytest.raises(RemoteProtocolError):
        dst.receive(PORT, MsgcMigrateData(b"junk"))
    with pytest.raises(LocalProtocolError, match="already failed"):
        dst.receive(PORT, MsgcMigrateData(SVMD))


def test_client_that_raised_refuses_every_later_input_and_stops_its_timers():
    cli, _ = switched_client()
    assert cli.get_timer() is not None
    with pytest.raises(RemoteProtocolError):
        cli.receive(Peer.S2, MAIN, DEFAULT_MAIN_INIT)  # s2 has no MAIN_INIT to send after a seamless switch
    assert cli.failed and cli.get_timer() is None
    with pytest.raises(LocalProtocolError, match="already failed"):
        cli.send(PORT, MsgcSpicevmcData(b"x"))


def test_a_local_error_fails_the_role_too():
    cli = client()
    with pytest.raises(LocalProtocolError):
        cli.send(PORT, MsgcMigrateFlushMark())
    with pytest.raises(LocalProtocolError, match="already failed"):
        cli.send(PORT, MsgcSpicevmcData(b"x"))


def test_source_flags_beyond_the_known_ones_are_refused():
    with pytest.raises(LocalProtocolError):
        SourceMigration([PORT], SEAMLESS_CLIENT, channel_flags={PORT: 4})


def test_source_migrate_data_streamed_by_the_owner_is_the_same_step_as_sending_it():
    src = connected_source()
    src.finish(now=1.0)
    for channel, body in ((MAIN, MNMD), (PORT, None)):
        src.receive(channel, MsgcMigrateFlushMark())
        if body is None:
            assert src.migrate_data_streamed(channel) == []
        else:
            src.send(channel, MsgMigrateData(body))
    assert src.state is SourceState.WAIT_DISCONNECT
    with pytest.raises(LocalProtocolError):
        src.migrate_data_streamed(PORT)  # once only


def test_source_migrate_data_streamed_before_it_is_due_is_a_local_error():
    src = connected_source()
    src.finish(now=1.0)
    with pytest.raises(LocalProtocolError):
        src.migrate_data_streamed(PORT)


def test_source_client_may_leave_in_any_state():
    for state in SourceState:
        src = source()
        src.state = state
        assert src.client_disconnected() == [] and src.state is SourceState.DONE and src.get_timer() is None
