"""The channel's explicit operations for the edges: nothing outside protocol/ touches its reader
or writer, so each thing the edges need is an operation here, tested against the wire."""

import numpy as np
import pytest

from spicewire._codec_layout import FULL_HEADER
from spicewire.errors import LocalProtocolError, MessageTooLarge
from spicewire.protocol import messages as m
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import ChannelType, MigrateFlags, Msg, Msgc
from spicewire.protocol.framing import MessageReader, MessageWriter

BULK = MessageReader.BULK_BODY


def server(limit: int = 1 << 20, mini: bool = True) -> ChannelConnection:
    return ChannelConnection(Side.SERVER, ChannelType.PORT, 0, send_mini=mini, expect_mini=mini, max_size=limit)


def client(mini: bool = True) -> ChannelConnection:
    return ChannelConnection(Side.CLIENT, ChannelType.PORT, 0, send_mini=mini, expect_mini=mini)


def pattern(size: int, salt: int = 0) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[salt : salt + size]


def receive_in_pieces(ch: ChannelConnection, wire: bytes, piece: int) -> list[m.Message]:
    """What an edge does: receive straight into a large body when the channel offers one."""
    out, pos = [], 0
    while pos < len(wire):
        target = ch.receive_buffer(piece)
        if target is None:
            out += ch.receive_data(wire[pos : pos + piece])
            pos += min(piece, len(wire) - pos)
        else:
            n = min(len(target), len(wire) - pos)
            target[:n] = wire[pos : pos + n]
            out += ch.received_into(n)
            pos += n
    return out


@pytest.mark.parametrize("size", [BULK - 1, BULK, 512 << 10, 4 << 20])
def test_data_after_a_restored_migrate_data_arrives_byte_for_byte(size):
    """The seamless-restore regression: DATA of 256 KiB and more after MIGRATE_DATA was gathered
    into float64 memory and reached the device with the right length and the wrong bytes."""
    prepared = np.zeros(8 << 20, dtype=np.uint8)
    ch = server(limit=8 << 20)
    ch.expect_migrate_data(16 << 20, lambda n: prepared[:n])
    writer = MessageWriter(mini=True)
    migrate_data, data = pattern(2 << 20, 1), pattern(size, 2)
    wire = writer.frame(Msgc.MIGRATE_DATA, migrate_data) + writer.frame(Msgc.MIGRATE_DATA + 96, data)
    got = receive_in_pieces(ch, wire, 65_536)
    assert [type(msg) for msg in got] == [m.MsgcMigrateData, m.MsgcSpicevmcData]
    assert bytes(got[0].data) == migrate_data and bytes(got[1].data) == data
    assert ch.bytes_in == len(wire)


def test_only_the_expected_migrate_data_may_exceed_the_channel_limit():
    ch = server(limit=1000)
    ch.expect_migrate_data(4 << 20)
    writer = MessageWriter(mini=True)
    got = ch.receive_data(writer.frame(Msgc.MIGRATE_DATA, pattern(1 << 20)))
    assert len(got) == 1
    with pytest.raises(MessageTooLarge):
        ch.receive_data(writer.frame(Msgc.MIGRATE_DATA, pattern(1001)))


def test_expected_migrate_data_adopts_the_clients_serial():
    ch = server(mini=False)
    writer = MessageWriter(mini=False)
    writer.continue_serials(40)  # what the client numbered on its connection to the source
    ch.expect_migrate_data(1 << 20)
    got = ch.receive_data(writer.frame(Msgc.MIGRATE_DATA, b"state") + writer.frame(Msgc.ACK))
    assert isinstance(got[0], m.MsgcMigrateData) and ch.serial_in == 42


def test_restore_migrated_goes_on_from_the_source_serial_and_generation():
    ch = server(mini=False)
    ch.restore_migrated(serial_out=17, ack_generation=3)
    ch.send(m.MsgSpicevmcData(b"x"))
    reader = MessageReader(mini=False)
    reader.adopt_next_serial()
    reader.feed(b"".join(ch.data_to_send()))
    assert next(iter(reader)).serial == 18 and ch.ack_generation == 3
    ch.set_ack(20)
    assert ch.ack_generation == 4


def test_send_streamed_puts_queued_messages_first_and_counts_the_body():
    ch = server(mini=False)
    ch.send(m.MsgSpicevmcData(b"queued"))
    before = ch.bytes_out
    head = ch.send_streamed(Msg.MIGRATE_DATA, 5)
    assert ch.data_to_send() == []
    reader = MessageReader(mini=False)
    reader.feed(head + b"state")
    queued, streamed = list(reader)
    assert (queued.serial, bytes(queued.body)) == (1, b"queued")
    assert (streamed.serial, streamed.type, bytes(streamed.body)) == (2, Msg.MIGRATE_DATA, b"state")
    assert ch.bytes_out == before + FULL_HEADER.size + 5  # the queued message was counted when sent


def test_client_passes_migrate_data_through_and_parses_on_after_it():
    ch = client(mini=False)
    writer = MessageWriter(mini=False)
    migrate = writer.frame(Msg.MIGRATE, MigrateFlags.NEED_DATA_TRANSFER.to_bytes(4, "little"))
    body = writer.frame(Msg.MIGRATE_DATA, b"S" * 100)
    after = writer.frame(Msg.MIGRATE_DATA + 99, b"after")
    got = ch.receive_data(migrate + body[:10])
    assert isinstance(got[-1], m.MsgMigrate) and ch.paused
    with pytest.raises(LocalProtocolError):
        ch.receive_data(b"more")
    assert ch.take_unparsed() == body[:10]
    ch.passed_through()  # the edge relayed the whole MIGRATE_DATA itself
    (data,) = ch.resume(after)
    assert bytes(data.data) == b"after" and ch.serial_in == 3


def test_take_unparsed_is_only_for_a_paused_channel():
    with pytest.raises(LocalProtocolError):
        client().take_unparsed()


def test_receive_buffer_offers_at_most_its_limit_of_a_large_body_under_way():
    ch = server(limit=4 * BULK)
    frame = MessageWriter(mini=True).frame(Msgc.MIGRATE_DATA + 96, pattern(2 * BULK))
    assert ch.receive_buffer() is None  # no body under way: receive into a buffer of one's own
    ch.receive_data(frame[:100])
    left = 2 * BULK - (100 - MessageReader(mini=True).header_size)
    assert len(ch.receive_buffer(left - 1)) == left - 1  # just under what is left: the limit
    assert len(ch.receive_buffer(left)) == left
    assert len(ch.receive_buffer(left + 1)) == left  # just over: only what the body still needs
    target = ch.receive_buffer(left + 1)
    target[:] = frame[100:]
    (data,) = ch.received_into(left)
    assert bytes(data.data) == pattern(2 * BULK) and ch.receive_buffer() is None
