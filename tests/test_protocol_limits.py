"""Size limits, each tested on both sides: a message exactly at the limit is taken, one unit over is
refused with the documented error. Each limit is named as the code names it, never restated."""

from __future__ import annotations

import logging
import os
import struct

import lz4.block  # type: ignore[import-untyped]
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from spicewire.client import ClientSession
from spicewire.client import graphics as client_graphics
from spicewire.errors import CodecError, LocalProtocolError, RemoteProtocolError
from spicewire.protocol import graphics as g
from spicewire.protocol import link as link_module
from spicewire.protocol import messages as m
from spicewire.protocol.enums import (
    LINK_HEADER_SIZE,
    MAX_CAPS_WORDS,
    MAX_LINK_SIZE,
    MAX_PASSWORD_LENGTH,
    ChannelType,
    LinkErr,
    MsgcSpicevmc,
    SurfaceFlags,
    SurfaceFormat,
)
from spicewire.protocol.link import (
    CLIENT_COMMON_CAPS,
    SERVER_COMMON_CAPS,
    Caps,
    ClientLink,
    LinkEstablished,
    LinkRequested,
    LinkState,
    ServerLink,
    SpiceLinkHeader,
    SpiceLinkMess,
    SpiceLinkReply,
    new_link_key,
)
from spicewire.server.net import SpiceServer
from spicewire.server.session import PORT_MAX_MESSAGE, Limits
from tests.serverkit import (
    SINK,
    MainSession,
    port_state,
    raw_connect,
    read_until_closed,
    recv_exactly,
    running_server,
    sha256,
    wait_until,
)
from tests.test_client_migration import FakeServer, main_listing

KEY = new_link_key()  # made once: key generation is the slow part of a link
BOUND = 10.0  # every wait on a socket ends by then


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def framed(body: bytes, size: int | None = None) -> bytes:
    return SpiceLinkHeader(size=len(body) if size is None else size).encode() + body


def main_mess(length: int | None = None, common_caps: Caps = CLIENT_COMMON_CAPS, channel_caps: Caps = ()) -> bytes:
    """A MAIN SpiceLinkMess with its caps, padded with zeros to ``length`` bytes (the caps' offset
    says where they are; what follows them is ignored, as by spice-server)."""
    body = SpiceLinkMess(0, ChannelType.MAIN, 0, common_caps, channel_caps).encode()
    return body if length is None else body + bytes(length - len(body))


def server_events(server: ServerLink) -> list:
    events = []
    while (event := server.next_event()) is not None:
        events.append(event)
    return events


def link_in_memory(client: ClientLink, server: ServerLink) -> LinkEstablished:
    """Shuttle the bytes of one handshake between the two machines; the client's LinkEstablished."""
    for _ in range(4):  # a handshake takes two round trips
        if data := client.data_to_send():
            server.receive_data(data, 0.0)
        for server_event in server_events(server):
            if isinstance(server_event, LinkRequested):
                server.accept()
        if data := server.data_to_send():
            client.receive_data(data)
        if isinstance(event := client.next_event(), LinkEstablished):
            return event
    raise AssertionError(f"no link after four turns: client {client.state.name}, server {server.state.name}")


# --- MAX_LINK_SIZE: the SpiceLinkMess with its caps (PROTOCOL.md 1.1) -------------------------------
# The link machine's header check is tested on both sides in test_link.py; these test the parser's
# own check, which the machine never lets a long message reach, and the server over a socket.


@pytest.mark.parametrize("length", [MAX_LINK_SIZE - 1, MAX_LINK_SIZE])
def test_link_mess_parser_takes_a_message_up_to_max_link_size(length):
    assert SpiceLinkMess.decode(main_mess(length)).common_caps == CLIENT_COMMON_CAPS


def test_link_mess_parser_refuses_one_byte_over_max_link_size_as_invalid_data():
    with pytest.raises(RemoteProtocolError) as refused:
        SpiceLinkMess.decode(main_mess(MAX_LINK_SIZE + 1))
    assert refused.value.link_error == LinkErr.INVALID_DATA


@pytest.fixture(scope="module")
def server():
    # Room in to_device beyond PORT_MAX_MESSAGE, so that it is the port's limit; no key pool, whose
    # threads would make 64 keys nobody here uses.
    budget = 4 * PORT_MAX_MESSAGE  # fixed, not a quarter of whatever RAM the machine has
    with running_server(limits=Limits(to_device=2 * PORT_MAX_MESSAGE), memory_budget=budget, key_pool=0) as srv:
        yield srv


def link_reply_from(server: SpiceServer, payload: bytes) -> SpiceLinkReply:
    """What the server answers ``payload`` with: its LinkReply (1.4)."""
    sock = raw_connect(server.address, BOUND)
    try:
        sock.sendall(payload)
        header = SpiceLinkHeader.decode(recv_exactly(sock, LINK_HEADER_SIZE, BOUND))
        reply = SpiceLinkReply.decode(recv_exactly(sock, header.size, BOUND))
        if reply.error != LinkErr.OK:
            assert read_until_closed(sock, BOUND) == b"", "more after an error reply"
        return reply
    finally:
        sock.close()


def test_server_answers_a_link_message_of_max_link_size(server):
    assert link_reply_from(server, framed(main_mess(MAX_LINK_SIZE))).error == LinkErr.OK


def test_server_refuses_a_link_message_one_byte_over_max_link_size(server):
    # The header alone: the server answers it without reading a body, which would then be unread.
    assert link_reply_from(server, framed(b"", size=MAX_LINK_SIZE + 1)).error == LinkErr.INVALID_DATA


# --- MAX_CAPS_WORDS: caps words per kind (PROTOCOL.md 1.2) ---------------------------------------


SMALL_CAPS_LIMIT = 3


@pytest.fixture
def small_caps_limit(monkeypatch):
    # At its real value MAX_CAPS_WORDS words cannot fit in MAX_LINK_SIZE bytes, so a count one over
    # is refused as caps past the message anyway: only a smaller limit shows the count check alone.
    # SpiceLinkMess.decode reads link.MAX_CAPS_WORDS when it runs.
    monkeypatch.setattr(link_module, "MAX_CAPS_WORDS", SMALL_CAPS_LIMIT)


def server_after(mess: bytes) -> ServerLink:
    server = ServerLink(0.0, key_factory=lambda: KEY)
    server.receive_data(framed(mess), 0.0)
    return server


@pytest.mark.parametrize("ncommon, nchannel", [
    (SMALL_CAPS_LIMIT, 0), (0, SMALL_CAPS_LIMIT), (SMALL_CAPS_LIMIT, SMALL_CAPS_LIMIT),
])
def test_link_takes_max_caps_words_of_each_kind(small_caps_limit, ncommon, nchannel):
    common, channel = (1,) * ncommon, (2,) * nchannel
    (requested,) = server_events(server_after(main_mess(None, common, channel)))
    assert (requested.common_caps, requested.channel_caps) == (common, channel)


@pytest.mark.parametrize("ncommon, nchannel", [(SMALL_CAPS_LIMIT + 1, 0), (0, SMALL_CAPS_LIMIT + 1)])
def test_link_refuses_one_caps_word_over_max_caps_words_as_invalid_data(small_caps_limit, ncommon, nchannel):
    server = server_after(main_mess(None, (1,) * ncommon, (2,) * nchannel))  # all the words fit in the message
    with pytest.raises(RemoteProtocolError, match="caps words exceed") as refused:
        server_events(server)
    assert refused.value.link_error == LinkErr.INVALID_DATA
    assert SpiceLinkReply.decode(server.data_to_send()[LINK_HEADER_SIZE:]).error == LinkErr.INVALID_DATA
    assert server.state is LinkState.CLOSED


def reply_bytes(common: Caps, channel: Caps, extra: bytes = b"") -> bytes:
    pub_key = KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return framed(SpiceLinkReply(LinkErr.OK, pub_key, common, channel).encode() + extra)


# The most caps a server can send: MAX_CAPS_WORDS of each kind (what the client's size check is made of).
FULL_COMMON = SERVER_COMMON_CAPS + (0,) * (MAX_CAPS_WORDS - len(SERVER_COMMON_CAPS))
FULL_CHANNEL = (0,) * MAX_CAPS_WORDS


def test_client_takes_a_reply_with_max_caps_words_of_each_kind():
    client = ClientLink(0, ChannelType.MAIN, 0)
    client.receive_data(reply_bytes(FULL_COMMON, FULL_CHANNEL) + u32(LinkErr.OK))
    established = client.next_event()
    assert isinstance(established, LinkEstablished)
    assert (established.common_caps, established.channel_caps) == (FULL_COMMON, FULL_CHANNEL)


@pytest.mark.parametrize("channel, extra", [
    (FULL_CHANNEL, b"\0"), ((*FULL_CHANNEL, 0), b""),
], ids=["one-byte", "one-channel-word"])
def test_client_refuses_a_reply_longer_than_max_caps_words_of_each_kind(channel, extra):
    client = ClientLink(0, ChannelType.MAIN, 0)
    client.receive_data(reply_bytes(FULL_COMMON, channel, extra))
    with pytest.raises(RemoteProtocolError, match="reply size"):
        client.next_event()
    assert client.state is LinkState.CLOSED


# --- MAX_PASSWORD_LENGTH (PROTOCOL.md 1.6) -----------------------------------------------------
# 60 and 61 ASCII characters are tested in test_link.py; the limit is in bytes, as spice-gtk's.

TWO_BYTE_CHARACTER = "\u00e9"  # é: two bytes of UTF-8


def test_a_password_of_max_password_length_bytes_links():
    password = TWO_BYTE_CHARACTER * (MAX_PASSWORD_LENGTH // 2)
    client = ClientLink(0, ChannelType.MAIN, 0, password=password)
    server = ServerLink(0.0, password=password, key_factory=lambda: KEY)
    assert link_in_memory(client, server).channel_type == ChannelType.MAIN


def test_a_password_one_byte_over_max_password_length_is_refused_however_few_characters():
    password = TWO_BYTE_CHARACTER * (MAX_PASSWORD_LENGTH // 2) + "x"
    assert len(password) < MAX_PASSWORD_LENGTH
    with pytest.raises(LocalProtocolError, match="password longer"):
        ClientLink(0, ChannelType.MAIN, 0, password=password)


# --- PORT_MAX_MESSAGE: one DATA message from a client to a port ----------------------------------
# net.py imported the constant by name: nothing is patched; 64 MiB goes through loopback quickly.


def test_a_port_takes_a_data_message_of_port_max_message(server):
    with MainSession(server.address) as session:
        session.attach_channels()
        sink = session.open_port(SINK)
        port = port_state(server, session.session_id, SINK)
        data = os.urandom(PORT_MAX_MESSAGE)
        sink.send_data(data, chunk=len(data))
        wait_until(lambda: port.device.bytes_in == len(data), BOUND, what="the message to reach the sink")
        assert port.device.status()["sha256"] == sha256(data)


def test_a_port_refuses_a_data_message_one_byte_over_port_max_message(server, caplog):
    caplog.set_level(logging.WARNING, logger="spicewire")
    with MainSession(server.address) as session:
        session.attach_channels()
        sink = session.open_port(SINK)
        port = port_state(server, session.session_id, SINK)
        assert sink.established.send_mini_header  # the header below is the mini one: u16 type, u32 size
        # The header alone: the server refuses on the size it announces.
        sink.send_bytes(struct.pack("<HI", MsgcSpicevmc.DATA, PORT_MAX_MESSAGE + 1))
        sink.wait_closed(BOUND)
        assert port.device.bytes_in == 0 and port.to_device_bytes == 0
        assert session.session_id in server.sessions  # the port's connection alone ended
    announced, limit = f"message body of {PORT_MAX_MESSAGE + 1} bytes", f"exceeds the limit of {PORT_MAX_MESSAGE}"
    assert any(announced in r.getMessage() and limit in r.getMessage() for r in caplog.records), caplog.text


# --- LZ4_BLOCK_BYTES: the uncompressed bytes in one block of an LZ4 image -------------------------
# DRAW_COPY with an LZ4 image (CHANNELS.md 1.2): the u32 BinaryData size at 75, top_down and format
# at 79 and 80, then the blocks, each a big-endian u32 length and that many bytes.

LZ4_DATA_SIZE_AT = 75
LZ4_BLOCKS_AT = 81
ROW_PIXELS = 1024  # a row of 4 KiB: LZ4_BLOCK_BYTES is a whole number of them


def lz4_block_sizes(body: bytes) -> list[int]:
    """The uncompressed size of each block; a block that holds more than LZ4_BLOCK_BYTES fails."""
    (data_size,) = struct.unpack_from("<I", body, LZ4_DATA_SIZE_AT)
    pos, end, sizes = LZ4_BLOCKS_AT, LZ4_DATA_SIZE_AT + 4 + data_size, []
    while pos < end:
        (n,) = struct.unpack_from(">I", body, pos)
        block = body[pos + 4 : pos + 4 + n]
        sizes.append(len(lz4.block.decompress(block, uncompressed_size=g.LZ4_BLOCK_BYTES)))
        pos += 4 + n
    assert pos == end
    return sizes


@pytest.mark.parametrize("extra_rows, block_sizes", [
    (-1, [g.LZ4_BLOCK_BYTES - 4 * ROW_PIXELS]),
    (0, [g.LZ4_BLOCK_BYTES]),
    (1, [g.LZ4_BLOCK_BYTES, 4 * ROW_PIXELS]),
], ids=["one-row-under", "at", "one-row-over"])
def test_lz4_images_come_in_blocks_of_at_most_lz4_block_bytes(extra_rows, block_sizes):
    assert g.LZ4_BLOCK_BYTES % (4 * ROW_PIXELS) == 0
    rows = g.LZ4_BLOCK_BYTES // (4 * ROW_PIXELS) + extra_rows
    pixels = np.random.default_rng(rows).integers(0, 256, (rows, ROW_PIXELS, 4), dtype=np.uint8)
    body = g.encode_draw_copy_lz4(0, g.Rect(0, 0, rows, ROW_PIXELS), pixels)
    assert lz4_block_sizes(body) == block_sizes
    np.testing.assert_array_equal(g.parse_draw_copy(body).pixels, pixels)


# --- MAX_PIXELS: the pixels of one DRAW_COPY image -----------------------------------------------
# parse_draw_copy's default max_pixels was copied from MAX_PIXELS when the module loaded, so a
# patch would not reach it; these claim the sizes in a BITMAP's header, without the gigabyte of
# pixels an image that large holds.

IMAGE_WIDTH_AT = 67  # in the Image (at 57), after u64 id, u8 type, u8 flags
BITMAP_X_AT, BITMAP_STRIDE_AT = 77, 85  # in the BitmapData (at 75), after u8 format, u8 flags; y between


def bitmap_header_claiming(width: int) -> bytes:
    """The DRAW_COPY header of a 1-row BITMAP of ``width`` pixels, without the pixels: a 1x1 draw's,
    widened."""
    one_pixel = g.encode_draw_copy(0, g.Rect(0, 0, 1, 1), np.zeros((1, 1, 4), np.uint8))
    body = bytearray(one_pixel[: g.DRAW_COPY_HEADER_SIZE])
    for offset, value in ((IMAGE_WIDTH_AT, width), (BITMAP_X_AT, width), (BITMAP_STRIDE_AT, 4 * width)):
        struct.pack_into("<I", body, offset, value)
    return bytes(body)


def test_an_image_of_max_pixels_passes_the_pixel_cap():
    # It goes on to the pixels, which are missing: the error is about those, not the size.
    with pytest.raises(CodecError, match=f"{g.MAX_PIXELS}x1 bitmap with stride .* needs bytes"):
        g.parse_draw_copy(bitmap_header_claiming(g.MAX_PIXELS))


def test_an_image_one_pixel_over_max_pixels_is_refused():
    with pytest.raises(CodecError, match=f"{g.MAX_PIXELS + 1}x1 pixels is over the limit of {g.MAX_PIXELS}"):
        g.parse_draw_copy(bitmap_header_claiming(g.MAX_PIXELS + 1))


# --- MAX_SURFACE_BYTES: the memory one SURFACE_CREATE makes the client take ------------------------

SMALL_SURFACE_PIXELS = 1000


@pytest.fixture
def small_surface_limit(monkeypatch):
    # At its real value MAX_SURFACE_SIDE binds first (the largest square is exactly MAX_SURFACE_BYTES),
    # and a gigabyte is no size for a test. DisplayChannel reads the module global when it runs.
    monkeypatch.setattr(client_graphics, "MAX_SURFACE_BYTES", 4 * SMALL_SURFACE_PIXELS)


def display_after_surface_create(width: int) -> tuple[BaseException | None, tuple[int, ...] | None]:
    """The client display channel's error and primary's shape once a scripted server sent it
    SURFACE_CREATE of ``width`` x 1: when the primary exists or the channel closed."""

    main = main_listing(ChannelType.DISPLAY)

    def display(_server, conn):
        conn.send(m.MsgDisplaySurfaceCreate(0, width, 1, SurfaceFormat.XRGB32, SurfaceFlags.PRIMARY))
        for _ in conn.messages():
            pass

    fake = FakeServer({ChannelType.MAIN: main, ChannelType.DISPLAY: display})
    try:
        assert fake.port is not None
        with ClientSession("127.0.0.1", fake.port, display=True) as session:
            channel = session.display
            assert channel is not None
            channel.wait(lambda d: d.primary is not None, BOUND)
            return channel.error, None if channel.primary is None else channel.primary.shape
    finally:
        fake.stop()


@pytest.mark.parametrize("width", [SMALL_SURFACE_PIXELS - 1, SMALL_SURFACE_PIXELS], ids=["one-pixel-under", "at"])
def test_a_surface_of_max_surface_bytes_is_made(small_surface_limit, width):
    assert display_after_surface_create(width) == (None, (1, width, 4))


def test_a_surface_one_pixel_over_max_surface_bytes_ends_the_display_channel(small_surface_limit):
    error, shape = display_after_surface_create(SMALL_SURFACE_PIXELS + 1)
    assert isinstance(error, RemoteProtocolError) and "out of range" in str(error)
    assert shape is None
