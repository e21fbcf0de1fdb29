"""Message framing after link, PROTOCOL.md section 2 (vectors from 4.5)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spicewire.errors import CodecError, LocalProtocolError, MessageTooLarge, RemoteProtocolError
from spicewire.protocol.enums import Msg, MsgMain
from spicewire.protocol.framing import (
    FULL_HEADER,
    MINI_HEADER,
    MessageReader,
    MessageWriter,
    RawMessage,
    SubMessage,
    encode_sub_message_list,
    parse_sub_message_list,
)

MAIN_INIT_BODY = bytes.fromhex(
    "44 33 22 11 00 00 00 00 01 00 00 00 01 00 00 00 00 00 00 00 0a 00 00 00 00 10 00 00 00 00 00 00"
)
MINI_MAIN_INIT = bytes.fromhex("67 00 20 00 00 00") + MAIN_INIT_BODY
FULL_MAIN_INIT = bytes.fromhex("01 00 00 00 00 00 00 00 67 00 20 00 00 00 00 00 00 00") + MAIN_INIT_BODY


def full_header(serial, msg_type, size, sub_list=0):
    return FULL_HEADER.pack(serial, msg_type, size, sub_list)


def test_mini_header_vector():
    assert MessageWriter(mini=True).frame(MsgMain.INIT, MAIN_INIT_BODY) == MINI_MAIN_INIT
    reader = MessageReader(mini=True)
    reader.feed(MINI_MAIN_INIT)
    assert list(reader) == [RawMessage(1, MsgMain.INIT, MAIN_INIT_BODY)]


def test_full_header_vector():
    assert MessageWriter(mini=False).frame(MsgMain.INIT, MAIN_INIT_BODY) == FULL_MAIN_INIT
    reader = MessageReader(mini=False)
    reader.feed(FULL_MAIN_INIT)
    assert list(reader) == [RawMessage(1, MsgMain.INIT, MAIN_INIT_BODY, 0)]


def test_mini_header_serials_are_counted_from_one():
    reader = MessageReader(mini=True)
    reader.feed(MINI_HEADER.pack(Msg.PING, 0) * 3)
    assert [msg.serial for msg in reader] == [1, 2, 3]
    assert reader.serial == 3


def test_writer_serials_start_at_one_and_increment():
    writer = MessageWriter(mini=False)
    frames = [writer.frame(1), writer.frame(2)]
    assert [FULL_HEADER.unpack_from(frame)[0] for frame in frames] == [1, 2]


def test_writer_counts_implicit_serials_with_mini_headers():
    writer = MessageWriter(mini=True)
    writer.frame(1)
    writer.frame(1)
    assert writer.serial == 2  # WAIT_FOR_CHANNELS and ACKs refer to them


def test_full_header_first_serial_must_be_one():
    reader = MessageReader(mini=False)
    reader.feed(full_header(2, Msg.PING, 0))
    with pytest.raises(RemoteProtocolError):
        reader.next_message()


def test_full_header_serial_must_increment_by_one():
    reader = MessageReader(mini=False)
    reader.feed(full_header(1, Msg.PING, 0) + full_header(3, Msg.PING, 0))
    assert reader.next_message().serial == 1
    with pytest.raises(RemoteProtocolError):
        reader.next_message()


def test_incomplete_header_or_body_yields_nothing_yet():
    reader = MessageReader(mini=True)
    reader.feed(MINI_MAIN_INIT[:5])
    assert reader.next_message() is None
    reader.feed(MINI_MAIN_INIT[5:-1])
    assert reader.next_message() is None
    reader.feed(MINI_MAIN_INIT[-1:])
    assert reader.next_message().body == MAIN_INIT_BODY
    assert reader.next_message() is None


def test_empty_body_is_a_message():
    reader = MessageReader(mini=True)
    reader.feed(MINI_HEADER.pack(MsgMain.MIGRATE_END, 0))
    assert reader.next_message() == RawMessage(1, MsgMain.MIGRATE_END, b"")


def test_body_larger_than_max_size_raises_message_too_large_on_the_header():
    reader = MessageReader(mini=True, max_size=31)
    reader.feed(MINI_MAIN_INIT[:6])  # the body has not even arrived
    with pytest.raises(MessageTooLarge) as info:
        reader.next_message()
    assert (info.value.size, info.value.limit) == (32, 31)


def test_body_of_exactly_max_size_is_accepted():
    reader = MessageReader(mini=True, max_size=32)
    reader.feed(MINI_MAIN_INIT)
    assert reader.next_message().body == MAIN_INIT_BODY


def test_message_too_large_reports_its_stream_offset():
    reader = MessageReader(mini=True, max_size=32)
    reader.feed(MINI_MAIN_INIT + MINI_HEADER.pack(1, 33))
    reader.next_message()
    with pytest.raises(MessageTooLarge) as info:
        reader.next_message()
    assert info.value.offset == len(MINI_MAIN_INIT)


def test_reader_advances_an_offset_and_compacts_only_past_half():
    reader = MessageReader(mini=True)
    small = MINI_HEADER.pack(1, 2) + b"ab"
    reader.feed(small * 10 + MINI_HEADER.pack(1, 100))  # a last, incomplete message
    size = len(reader._buf)
    for _ in range(5):
        reader.next_message()
    assert len(reader._buf) == size  # nothing sliced off yet
    assert reader._offset == 5 * len(small)
    for _ in range(5):
        reader.next_message()
    assert reader._offset == 0 and len(reader._buf) == MINI_HEADER.size  # compacted once
    assert reader.buffered == MINI_HEADER.size


def test_bodies_stay_intact_when_the_buffer_is_reused():
    reader = MessageReader(mini=True)
    reader.feed(MINI_HEADER.pack(1, 3) + b"abc" + MINI_HEADER.pack(1, 3) + b"d")
    first = reader.next_message()
    assert reader.next_message() is None
    reader.feed(b"ef" + MINI_HEADER.pack(1, 3) + b"ghi")
    rest = list(reader)
    assert [first.body] + [msg.body for msg in rest] == [b"abc", b"def", b"ghi"]


def test_mini_header_cannot_carry_a_sub_list():
    with pytest.raises(LocalProtocolError):
        MessageWriter(mini=True).frame(1, b"xx", sub_list=1)


def test_sub_list_of_full_header_points_into_the_body():
    subs = (SubMessage(7, b"hello"), SubMessage(8, b""))
    body = b"main" + encode_sub_message_list(subs, base=4)
    reader = MessageReader(mini=False)
    reader.feed(MessageWriter(mini=False).frame(101, body, sub_list=4))
    msg = reader.next_message()
    assert msg.sub_list == 4
    assert msg.sub_messages() == subs


def test_message_without_sub_list_has_no_sub_messages():
    assert RawMessage(1, 1, b"abc").sub_messages() == ()


def test_list_body_starts_with_the_sub_message_list():
    body = bytes.fromhex("01 00  06 00 00 00  03 00 02 00 00 00  68 69")
    assert parse_sub_message_list(body) == (SubMessage(3, b"hi"),)
    assert encode_sub_message_list([SubMessage(3, b"hi")]) == body


@pytest.mark.parametrize(
    "body",
    [
        b"\x01",  # count cut short
        bytes.fromhex("02 00 06 00 00 00"),  # offset table longer than the body
        bytes.fromhex("01 00 09 00 00 00"),  # sub-message header past the end
        bytes.fromhex("01 00 06 00 00 00 03 00 05 00 00 00 68 69"),  # sub-message body past the end
    ],
)
def test_sub_message_list_out_of_bounds_is_rejected(body):
    with pytest.raises(CodecError):
        parse_sub_message_list(body)


def test_sub_list_offset_past_body_is_rejected():
    with pytest.raises(CodecError):
        RawMessage(1, 1, b"abc", sub_list=3).sub_messages()


# --- properties ------------------------------------------------------------------------------

messages = st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=12)


@given(mini=st.booleans(), msgs=messages, data=st.data())
def test_any_split_of_the_stream_gives_the_same_messages(mini, msgs, data):
    writer = MessageWriter(mini)
    stream = b"".join(writer.frame(msg_type, body) for msg_type, body in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = MessageReader(mini)
    received = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        reader.feed(stream[start:end])
        received.extend(reader)
    assert [(m.serial, m.type, m.body) for m in received] == [
        (serial, msg_type, body) for serial, (msg_type, body) in enumerate(msgs, 1)
    ]
    assert reader.buffered == 0


@given(subs=st.lists(st.builds(SubMessage, st.integers(0, 0xFFFF), st.binary(max_size=20)), max_size=5),
       base=st.integers(0, 8))
def test_sub_message_list_round_trips(subs, base):
    body = bytes(base) + encode_sub_message_list(subs, base=base)
    assert parse_sub_message_list(body, base) == tuple(subs)


@given(mini=st.booleans(), max_size=st.integers(0, 64), chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_garbage_raises_only_codec_or_remote_protocol_errors(mini, max_size, chunks):
    reader = MessageReader(mini, max_size=max_size)
    try:
        for chunk in chunks:
            reader.feed(chunk)
            for msg in reader:
                msg.sub_messages()
    except (CodecError, RemoteProtocolError):
        pass


@given(body=st.binary(max_size=64), offset=st.integers(0, 70))
def test_garbage_sub_message_list_raises_only_codec_error(body, offset):
    try:
        parse_sub_message_list(body, offset)
    except CodecError:
        pass


def test_bulk_body_is_gathered_whole_across_any_split():
    body = bytes(range(256)) * 5000  # over BULK_BODY
    stream = MessageWriter(mini=True).frame(2, body) + MessageWriter(mini=True).frame(3, b"next")[0:]
    reader = MessageReader(mini=True)
    got = []
    for i in range(0, len(stream), 99_991):
        reader.feed(stream[i : i + 99_991])
        got.extend(reader)
    assert [(msg.type, bytes(msg.body)) for msg in got] == [(2, body), (3, b"next")]


def test_bulk_body_is_a_view_of_its_own_buffer():
    body = b"\x07" * (MessageReader.BULK_BODY + 1)
    reader = MessageReader(mini=True)
    reader.feed(MessageWriter(mini=True).frame(2, body))
    msg = reader.next_message()
    assert isinstance(msg.body, memoryview) and msg.body == body


def test_buffered_counts_a_half_gathered_bulk_body():
    reader = MessageReader(mini=True)
    frame = MessageWriter(mini=True).frame(2, b"x" * MessageReader.BULK_BODY)
    reader.feed(frame[:1000])
    assert reader.next_message() is None and reader.buffered == 1000


def test_take_buffered_hands_over_unparsed_bytes_in_order():
    writer = MessageWriter(mini=True)
    writer.serial = 1
    partial = writer.frame(2, b"bc")
    reader = MessageReader(mini=True)
    reader.feed(MessageWriter(mini=True).frame(1, b"a") + partial[:5])
    assert reader.next_message().type == 1
    assert reader.take_buffered() == partial[:5]
    assert reader.buffered == 0


def test_adopt_serial_takes_the_next_full_header_serial_as_given():
    writer = MessageWriter(mini=False)
    writer.serial = 41
    reader = MessageReader(mini=False)
    reader.adopt_serial = True
    reader.feed(writer.frame(1, b"") + writer.frame(1, b""))
    assert [msg.serial for msg in reader] == [42, 43]
