"""Message framing after link, PROTOCOL.md section 2 (vectors from 4.5)."""

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spicewire.errors import CodecError, LocalProtocolError, MessageTooLarge, RemoteProtocolError
from spicewire.protocol.enums import Msg, Msgc, MsgMain
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
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
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
    # Reading, or refusing with one of these two, are both right; any other exception fails the test.
    with contextlib.suppress(CodecError, RemoteProtocolError):
        for chunk in chunks:
            reader.feed(chunk)
            for msg in reader:
                msg.sub_messages()


@given(body=st.binary(max_size=64), offset=st.integers(0, 70))
def test_garbage_sub_message_list_raises_only_codec_error(body, offset):
    with contextlib.suppress(CodecError):  # refusing garbage is fine; any other exception fails
        parse_sub_message_list(body, offset)


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
    writer.continue_serials(1)
    partial = writer.frame(2, b"bc")
    reader = MessageReader(mini=True)
    reader.feed(MessageWriter(mini=True).frame(1, b"a") + partial[:5])
    assert reader.next_message().type == 1
    assert reader.take_buffered() == partial[:5]
    assert reader.buffered == 0


def test_adopt_serial_takes_the_next_full_header_serial_as_given():
    writer = MessageWriter(mini=False)
    writer.continue_serials(41)
    reader = MessageReader(mini=False)
    reader.adopt_next_serial()
    reader.feed(writer.frame(1, b"") + writer.frame(1, b""))
    assert [msg.serial for msg in reader] == [42, 43]


# --- one announced large message (a MIGRATE_DATA into prepared memory) ----------------------------

BULK = MessageReader.BULK_BODY


def _pattern(size: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(size))


@pytest.mark.parametrize("size", [BULK - 1, BULK, BULK + 1])
def test_bodies_on_both_sides_of_the_bulk_threshold_arrive_intact_in_any_split(size):
    body = _pattern(size)
    frame = MessageWriter(mini=True).frame(101, body)
    reader = MessageReader(mini=True)
    got = []
    for start in range(0, len(frame), 65_537):  # splits that straddle the header and the body
        reader.feed(frame[start : start + 65_537])
        got.extend(reader)
    assert len(got) == 1 and bytes(got[0].body) == body


def test_expected_large_message_goes_into_the_prepared_buffer_and_only_that_one():
    prepared = np.zeros(4 * BULK, dtype=np.uint8)
    handed = []

    def into(size):
        handed.append(size)
        return prepared[:size]

    reader = MessageReader(mini=True, max_size=BULK)
    reader.expect_large(Msgc.MIGRATE_DATA, 4 * BULK, into)
    big, after = _pattern(3 * BULK), _pattern(BULK)[::-1]
    writer = MessageWriter(mini=True)
    reader.feed(writer.frame(Msgc.MIGRATE_DATA, big) + writer.frame(101, after))
    first, second = list(reader)
    assert handed == [3 * BULK]
    assert bytes(first.body) == big and bytes(prepared[: 3 * BULK]) == big
    # The next bulk body gets memory of its own, and the reader's own limit is back.
    assert bytes(second.body) == after and not np.shares_memory(np.frombuffer(second.body, np.uint8), prepared)
    reader.feed(writer.frame(Msgc.MIGRATE_DATA, b"x" * (BULK + 1)))
    with pytest.raises(MessageTooLarge):
        reader.next_message()


def test_other_messages_before_the_expected_one_keep_the_normal_limit():
    reader = MessageReader(mini=True, max_size=100)
    reader.expect_large(Msgc.MIGRATE_DATA, 10 * BULK)
    writer = MessageWriter(mini=True)
    reader.feed(writer.frame(Msgc.ACK, b"") + writer.frame(Msgc.MIGRATE_DATA, _pattern(2 * BULK)))
    ack, data = list(reader)
    assert ack.type == Msgc.ACK and bytes(data.body) == _pattern(2 * BULK)
    reader.feed(writer.frame(101, b"x" * 101))
    with pytest.raises(MessageTooLarge):
        reader.next_message()


@pytest.mark.parametrize("limit", [200, 2 * BULK])  # a body copied out, and one gathered in bulk
def test_the_expected_message_may_be_exactly_its_limit_and_not_one_byte_more(limit):
    writer = MessageWriter(mini=True)
    reader = MessageReader(mini=True, max_size=100)
    reader.expect_large(Msgc.MIGRATE_DATA, limit)
    reader.feed(writer.frame(Msgc.MIGRATE_DATA, _pattern(limit)))
    assert bytes(reader.next_message().body) == _pattern(limit)

    reader = MessageReader(mini=True, max_size=100)
    reader.expect_large(Msgc.MIGRATE_DATA, limit)
    reader.feed(writer.frame(Msgc.MIGRATE_DATA, _pattern(limit + 1)))
    with pytest.raises(MessageTooLarge) as exc:
        reader.next_message()
    assert (exc.value.size, exc.value.limit) == (limit + 1, limit)


@pytest.mark.parametrize(
    "make",
    [
        lambda size: np.empty(size),  # float64: the right count of elements, 8 bytes each
        lambda size: np.empty(size // 2, dtype=np.uint16),
        lambda size: np.empty(size - 1, dtype=np.uint8),
        lambda size: np.empty((2, size), dtype=np.uint8)[:, 0],  # not contiguous
        lambda size: bytearray(size),
    ],
)
def test_a_prepared_buffer_that_is_not_flat_bytes_of_the_size_is_refused(make):
    reader = MessageReader(mini=True)
    reader.expect_large(Msgc.MIGRATE_DATA, 4 * BULK, make)
    reader.feed(MessageWriter(mini=True).frame(Msgc.MIGRATE_DATA, _pattern(BULK)))
    with pytest.raises(LocalProtocolError):
        reader.next_message()


def test_skip_message_counts_a_message_taken_off_the_stream():
    writer = MessageWriter(mini=False)
    frames = [writer.frame(1, b"a"), writer.frame(1, b"b"), writer.frame(1, b"c")]
    reader = MessageReader(mini=False)
    reader.feed(frames[0])
    assert next(iter(reader)).serial == 1
    reader.skip_message()  # frames[1] went elsewhere, unparsed
    reader.feed(frames[2])
    assert next(iter(reader)).serial == 3


def test_writer_continues_serials_and_never_goes_back():
    writer = MessageWriter(mini=False)
    writer.continue_serials(10)
    writer.continue_serials(4)
    assert writer.serial == 10
    reader = MessageReader(mini=False)
    reader.adopt_next_serial()
    reader.feed(writer.frame(1, b""))
    assert next(iter(reader)).serial == 11
