"""Every parser a peer can reach, fuzzed on both codec backends within a bounded budget.

Each target is a function of bytes that asserts the parser's contract: only its documented errors
escape (CodecError for bodies, RemoteProtocolError/LinkError for links and streams, a 4xx for the
control API, never a 500), and where the same bytes can arrive split differently, every split gives
the same result. Each target runs its committed corpus (tests/corpus/<target>/), then byte
mutations of its valid seeds, then Hypothesis (fuzzing.py says how the budget is bounded).
Regenerate the seeds with ``python -m tests.test_fuzz_parsers``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import random
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spicewire import codec
from spicewire.errors import (
    CodecError,
    LinkError,
    LocalProtocolError,
    MessageTooLarge,
    RemoteProtocolError,
)
from spicewire.protocol import framing, graphics
from spicewire.protocol import messages as m
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import ChannelType, LinkErr, SurfaceFormat
from spicewire.protocol.framing import MessageReader
from spicewire.protocol.link import (
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
from spicewire.protocol.migrate_data import (
    CharDeviceMigrateData,
    HeldInput,
    MainMigrateData,
    PortMigrateData,
    build_inputs_migrate_data,
    build_main_migrate_data,
    build_port_migrate_data,
    build_spicevmc_migrate_data,
    parse_migrate_data,
)

from . import fuzzing
from .fuzzing import budget, corpus, mutations, run
from .guarded import GuardedArena
from .wire_strategies import C_TEXT, wire_values

backend = fuzzing.backend  # the fixture: every target runs on each codec backend

MUTATIONS_PER_SEED = 60
EXAMPLES = 150
KEY = new_link_key()  # one key for every fuzzed link: RSA generation would dominate the run


def chunks(data: bytes, sizes: tuple[int, ...]) -> Iterator[bytes]:
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos : pos + n]
        pos, i = pos + n, i + 1


SPLITS = ((1 << 30,), (1,), (3, 7, 64))  # whole, byte by byte, and uneven pieces


# --- link: ServerLink ----------------------------------------------------------------------------


def _answer_request(link: ServerLink, event: LinkRequested) -> None:
    """The owner's answer, picked by the request's ids so that every answer gets exercised."""
    choice = event.connection_id % 4
    if choice == 0:
        link.accept()
    elif choice == 1:
        link.reject(LinkErr.BAD_CONNECTION_ID)
    elif choice == 2:
        link.close_without_reply()
    else:  # the ids are looked at after the ticket (LinkAuthenticated)
        link.accept(decide_after_ticket=True)


def drive_server_link(data: bytes, sizes: tuple[int, ...]) -> tuple:
    link = ServerLink(0.0, password="secret", key_factory=lambda: KEY)
    events, out, error = [], bytearray(), None
    trailing = b""
    pieces = list(chunks(data, sizes))
    try:
        for i, piece in enumerate(pieces):
            link.receive_data(piece, 1.0)
            while (event := link.next_event()) is not None:
                if isinstance(event, LinkRequested):
                    _answer_request(link, event)
                elif isinstance(event, LinkEstablished):
                    # What follows belongs to the channel, however it was split.
                    trailing = event.trailing + b"".join(pieces[i + 1 :])
                    event = dataclasses.replace(event, trailing=b"")
                elif event.channel_id % 2:  # LinkAuthenticated: the owner's verdict after the ticket
                    link.establish()
                else:
                    link.refuse(LinkErr.PERMISSION_DENIED)
                events.append(event)
                out += link.data_to_send()
            if trailing or link.state is LinkState.ESTABLISHED:
                break
        link.handle_timer(11.0)  # a handshake not over by its deadline fails
    except (RemoteProtocolError, LinkError) as err:  # LinkTimeout is a RemoteProtocolError
        error = (type(err), getattr(err, "link_error", None) or getattr(err, "code", None))
        assert link.state is LinkState.CLOSED and link.get_timer() is None
        out += link.data_to_send()
        link.receive_data(b"\x00" * 300, 2.0)  # a failed link takes nothing more
        assert link.next_event() is None and link.data_to_send() == b""
    out += link.data_to_send()
    return events, error, link.state, bytes(out), trailing


def check_link_server(data: bytes) -> None:
    outcomes = [drive_server_link(data, sizes) for sizes in SPLITS]
    assert outcomes[1:] == outcomes[:-1], "the same bytes split differently gave another result"


def link_mess(connection_id: int, channel_type: int, channel_id: int, common=(0x0B,), channel=()) -> bytes:
    body = SpiceLinkMess(connection_id, channel_type, channel_id, tuple(common), tuple(channel)).encode()
    return SpiceLinkHeader(size=len(body)).encode() + body


def link_server_seeds() -> list[bytes]:
    mechanism = struct.pack("<I", 1)
    ticket = bytes(range(128))
    seeds = []
    for cid in range(4):
        seeds.append(link_mess(cid, ChannelType.MAIN, 0) + mechanism + ticket)
        seeds.append(link_mess(cid + 4, ChannelType.PORT, 1, common=(0x02,), channel=(1, 2)) + ticket)
    seeds.append(link_mess(0, ChannelType.MAIN, 0)[:-3])
    return seeds


# --- link: ClientLink ----------------------------------------------------------------------------


def drive_client_link(data: bytes, sizes: tuple[int, ...]) -> tuple:
    link = ClientLink(7, ChannelType.MAIN, 0, password="pw")
    sent = len(link.data_to_send())
    events, error, trailing = [], None, b""
    pieces = list(chunks(data, sizes))
    try:
        for i, piece in enumerate(pieces):
            link.receive_data(piece)
            while (event := link.next_event()) is not None:
                assert isinstance(event, LinkEstablished)
                trailing = event.trailing + b"".join(pieces[i + 1 :])
                events.append(event.common_caps + event.channel_caps)
            if link.state is LinkState.ESTABLISHED:
                break
    except (RemoteProtocolError, LinkError) as err:
        error = type(err)
        assert link.state is LinkState.CLOSED
        link.receive_data(b"\x00" * 300)
        assert link.next_event() is None
    sent += len(link.data_to_send())  # OAEP is randomized: only the amount is the same every time
    return events, error, link.state, sent, trailing


def check_link_client(data: bytes) -> None:
    outcomes = [drive_client_link(data, sizes) for sizes in SPLITS]
    assert outcomes[1:] == outcomes[:-1], "the same bytes split differently gave another result"


def server_reply(error: int = LinkErr.OK, common=(0x0B,), channel=(0x1F,)) -> bytes:
    from cryptography.hazmat.primitives import serialization

    pub = KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = SpiceLinkReply(error, pub, tuple(common), tuple(channel)).encode()
    return SpiceLinkHeader(size=len(body)).encode() + body


def link_client_seeds() -> list[bytes]:
    return [
        server_reply() + struct.pack("<I", 0) + b"\x09\x00\x00\x00\x00\x00",
        server_reply(common=(0x09,)) + struct.pack("<I", 0),
        server_reply() + struct.pack("<I", LinkErr.PERMISSION_DENIED),
        server_reply(LinkErr.BAD_CONNECTION_ID),
        server_reply(common=(0x01,)),
    ]


# --- every channel's messages ----------------------------------------------------------------------

CHANNEL_TYPES = (
    ChannelType.MAIN, ChannelType.DISPLAY, ChannelType.INPUTS, ChannelType.CURSOR, ChannelType.PORT,
    ChannelType.USBREDIR, ChannelType.WEBDAV,
)
MESSAGE_KEYS = sorted(
    (int(ct), int(direction), number)
    for ct in CHANNEL_TYPES for direction in m.Direction for number in m.message_table(ct, direction)
)


def _minimal_field(kind: object, values: dict) -> object:
    if isinstance(kind, m.Scalar):
        return 1
    if isinstance(kind, m.FixedBytes):
        return bytes(range(kind.n))
    if isinstance(kind, m.Rest):
        return b"payload"
    if isinstance(kind, m.Padding):
        return 4
    if isinstance(kind, (m.CString, m.Pointer)):
        return "name"
    if isinstance(kind, (m.Array, m.CountedArray)):
        return (minimal(kind.item), minimal(kind.item))
    if isinstance(kind, m.When):
        return 1 if kind.predicate(values[kind.on]) else None
    if isinstance(kind, m.SubMessages):
        return (framing.SubMessage(1, b"ab"),)
    if isinstance(kind, m.Nested):
        return minimal(kind.cls)
    raise AssertionError(f"no value for the wire kind {kind!r}: add one")


def minimal(cls: type[m.WireStruct]) -> m.WireStruct:
    """A valid instance of ``cls`` with every optional part present: a deterministic seed."""
    values: dict = {}
    for name, kind in cls.LAYOUT:
        values[name] = _minimal_field(kind, values)
    for name, kind in cls.LAYOUT:
        if isinstance(kind, m.CountedArray):
            values[kind.on] = len(values[name])
    return cls(**values)


def check_message(data: bytes) -> None:
    if len(data) < 4:
        return
    index, direction, number = struct.unpack_from("<BBH", data)
    channel_type = CHANNEL_TYPES[index % len(CHANNEL_TYPES)]
    body = data[4:]
    cls = m.lookup(channel_type, m.Direction(direction % 2), number)
    if cls is None:
        with pytest.raises(CodecError):
            m.decode(channel_type, m.Direction(direction % 2), number, body)
        return
    try:
        msg = cls.decode(body)
    except CodecError:
        return
    # What was read, written back, reads the same (the bytes may differ: trailing bytes go).
    assert cls.decode(msg.encode()) == msg


def message_case(key: tuple[int, int, int], body: bytes) -> bytes:
    channel_type, direction, number = key
    return struct.pack("<BBH", CHANNEL_TYPES.index(channel_type), direction, number) + body


def message_seeds() -> list[bytes]:
    seeds = []
    for key in MESSAGE_KEYS:
        cls = m.lookup(key[0], m.Direction(key[1]), key[2])
        seeds.append(message_case(key, minimal(cls).encode()))
    return seeds


@st.composite
def message_inputs(draw: Callable) -> bytes:
    key = draw(st.sampled_from(MESSAGE_KEYS))
    cls = m.lookup(key[0], m.Direction(key[1]), key[2])
    if draw(st.booleans()):
        body = draw(wire_values(cls)).encode()
        cut = draw(st.integers(0, len(body)))
        return message_case(key, body[:cut] + draw(st.binary(max_size=8)))
    return message_case(key, draw(st.binary(max_size=96)))


# --- ChannelConnection.receive_data: arbitrary streams in both header modes ------------------------

STREAM_CHANNELS = (ChannelType.MAIN, ChannelType.PORT, ChannelType.DISPLAY, ChannelType.INPUTS, ChannelType.CURSOR)
STREAM_MAX = 4096  # a small limit, so that MessageTooLarge is in reach
STREAM_BULK = 64  # bodies from this size go the bulk path (received straight into their buffer)


def drive_channel(flags: int, stream: bytes, sizes: tuple[int, ...]) -> tuple:
    side = Side.SERVER if flags & 1 else Side.CLIENT
    mini = bool(flags & 2)
    conn = ChannelConnection(side, STREAM_CHANNELS[(flags >> 2) % len(STREAM_CHANNELS)],
                             send_mini=mini, expect_mini=mini, max_size=STREAM_MAX)
    received, error = [], None
    try:
        for piece in chunks(stream, sizes):
            while piece:
                view = conn.receive_buffer()
                if view is None:
                    received += conn.receive_data(piece)
                    piece = b""
                else:
                    n = min(len(view), len(piece))
                    view[:n] = piece[:n]
                    received += conn.received_into(n)
                    piece = piece[n:]
                while conn.paused:  # a client after MIGRATE(NEED_DATA_TRANSFER): the owner parses on
                    received += conn.resume(conn.take_unparsed())
    except (RemoteProtocolError, MessageTooLarge) as err:
        error = type(err)
        with pytest.raises(LocalProtocolError):
            conn.receive_data(b"\x00" * 16)  # the incoming half refuses everything after an error
    return received, error, b"".join(conn.data_to_send()), conn.serial_in


def check_channel(data: bytes) -> None:
    if not data:
        return
    saved = MessageReader.BULK_BODY
    MessageReader.BULK_BODY = STREAM_BULK
    try:
        outcomes = [drive_channel(data[0], data[1:], sizes) for sizes in SPLITS]
    finally:
        MessageReader.BULK_BODY = saved
    rest = [outcome[1:] for outcome in outcomes]
    assert rest[1:] == rest[:-1], "the same bytes split differently gave another result"
    # A call that raises hands out nothing, so the messages that arrived with the bad one in the
    # same read end with the connection; read byte by byte, each came in a call of its own.
    bytewise = outcomes[1][0]
    for received, *_ in outcomes:
        assert received == bytewise[: len(received)]
        assert outcomes[0][1] is not None or received == bytewise


def frame_stream(flags: int, msgs: list[tuple[int, bytes]]) -> bytes:
    writer = framing.MessageWriter(bool(flags & 2))
    return bytes([flags]) + b"".join(writer.frame(t, body) for t, body in msgs)


def channel_seeds() -> list[bytes]:
    ping = m.MsgPing(1, 2, 8).encode()
    seeds = []
    for flags in range(4):
        incoming = m.C2S if flags & 1 else m.S2C
        for index, channel_type in enumerate(STREAM_CHANNELS):
            table = m.message_table(channel_type, incoming)
            msgs = [(number, minimal(cls).encode()) for number, cls in sorted(table.items())[:6]]
            seeds.append(frame_stream(flags | index << 2, msgs))
        seeds.append(frame_stream(flags, [(4, ping), (101, b"x" * 100), (1, m.MsgMigrate(3).encode()), (4, ping)]))
    return seeds


@st.composite
def channel_inputs(draw: Callable) -> bytes:
    flags = draw(st.integers(0, 255))
    incoming = m.C2S if flags & 1 else m.S2C
    table = m.message_table(STREAM_CHANNELS[(flags >> 2) % len(STREAM_CHANNELS)], incoming)
    msgs = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()) and table:
            number, cls = draw(st.sampled_from(sorted(table.items())))
            msgs.append((number, draw(wire_values(cls)).encode()))
        else:
            msgs.append((draw(st.integers(0, 0xFFFF)), draw(st.binary(max_size=80))))
    stream = frame_stream(flags, msgs)
    return stream[: draw(st.integers(0, len(stream)))] + draw(st.binary(max_size=8))


# --- migrate data (SWPD, SVMD, MNMD, SWDD, ICMD + SWIH) and the graphics payloads -------------------

MIGRATE_CHANNELS = (
    ChannelType.MAIN, ChannelType.DISPLAY, ChannelType.INPUTS, ChannelType.PORT, ChannelType.USBREDIR,
    ChannelType.WEBDAV, ChannelType.SMARTCARD, ChannelType.CURSOR, ChannelType.RECORD,
)
ARENA = GuardedArena(1 << 16)


def check_migrate_data(data: bytes) -> None:
    if not data or len(data) > ARENA.capacity:
        return
    channel_type = MIGRATE_CHANNELS[data[0] % len(MIGRATE_CHANNELS)]
    # The body ends at an inaccessible page: the compiled codec reading past it kills the run.
    body = ARENA.at_end(data[1:]).data
    with contextlib.suppress(CodecError):  # the one error a body may raise
        parse_migrate_data(channel_type, body)


def check_draw_copy(data: bytes) -> None:
    try:
        draw = graphics.parse_draw_copy(data)
    except CodecError:
        return
    assert draw.pixels.shape[2] == 4 and draw.pixels.dtype == np.uint8


def check_cursor(data: bytes) -> None:
    try:
        shape = graphics.parse_cursor(data)
    except CodecError:
        return
    assert shape is None or (shape.pixels.ndim == 3 and shape.pixels.shape[2] == 4)


def migrate_data_seeds() -> list[bytes]:
    at = {channel_type: bytes([i]) for i, channel_type in enumerate(MIGRATE_CHANNELS)}
    port = PortMigrateData(3, 10, 1234, 99, device_state=b'{"bytes_in": 4}', pending=[b"abc", b"de"],
                           to_client=[b"xyz"])
    main = MainMigrateData(CharDeviceMigrateData(write_data=b"agent"), True, 4, bytes(8), False, b"part")
    display = graphics.DisplayMigrateData(9, 2, 20, 7, (graphics.SurfaceInfo(0, 64, 48, 32),))
    return [
        at[ChannelType.MAIN] + build_main_migrate_data(),
        at[ChannelType.MAIN] + build_main_migrate_data(main),
        at[ChannelType.PORT] + build_spicevmc_migrate_data(CharDeviceMigrateData(write_data=b"pending")),
        at[ChannelType.PORT] + build_port_migrate_data(port).tobytes(),
        at[ChannelType.PORT] + build_port_migrate_data(port, segment=100).tobytes(),
        at[ChannelType.USBREDIR] + build_spicevmc_migrate_data(),
        at[ChannelType.DISPLAY] + display.encode(),
        at[ChannelType.INPUTS] + build_inputs_migrate_data(3, [HeldInput(101, struct.pack("<IH", 30, 0)),
                                                                HeldInput(112, b"\x01\x00\x00\x00\x02\x00\x00\x00")]),
        at[ChannelType.INPUTS] + graphics.InputsMigrateData(1).encode(),
        at[ChannelType.SMARTCARD] + b"SCMD\x01\x00\x00\x00",
    ]


def draw_copy_seeds() -> list[bytes]:
    pixels = np.arange(6 * 5 * 4, dtype=np.uint8).reshape(6, 5, 4)
    box = graphics.Rect(2, 3, 8, 8)
    return [bytes(graphics.encode_draw_copy(1, box, pixels)), graphics.encode_draw_copy_lz4(0, box, pixels),
            graphics.encode_draw_copy_lz4(0, box, pixels, block_bytes=20)]


def cursor_seeds() -> list[bytes]:
    shape = graphics.CursorShape(np.full((3, 2, 4), 200, dtype=np.uint8), 1, 2, unique=5)
    return [graphics.encode_cursor(shape), graphics.encode_cursor(None)]


# --- the device-state container, the display pre-copy and every control API body --------------------

MIGRATION = "0123456789abcdef"
TOKEN = "fuzz-token"
SESSION = 0x00C0FFEE
# A display channel's record as s1 sends it in the device state (DISPLAY_STATE_VERSION).
DISPLAY_RECORD = graphics.DisplayMigrateData(serial=9, ack_generation=1, ack_window=20, client_serial=2, surfaces=(
    graphics.SurfaceInfo(0, 32, 16, SurfaceFormat.XRGB32),)).encode()
ANNOUNCEMENT = {"migration": MIGRATION, "ttl": 3600, "sessions": [{
    "session_id": f"{SESSION:08x}",
    "ports": [[0, "org.spicewire.echo", "echo", 0], [1, "org.spicewire.sink", "sink", 0]],
    "display": {"kind": "clock", "width": 32, "height": 16},
}]}


@dataclass
class Answer:
    status: int
    body: object


def wsgi(app, method: str, target: str, body: bytes) -> Answer:
    """One request straight through the control server's WSGI application, without a socket."""
    path, _, query = target.partition("?")
    environ = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body), "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "0", "wsgi.url_scheme": "http",
        "HTTP_AUTHORIZATION": f"Bearer {TOKEN}",
    }
    status: list[int] = []
    chunks_out = app(environ, lambda line, headers, exc_info=None: status.append(int(line.split()[0])))
    data = b"".join(chunks_out)
    try:
        answer = json.loads(data)
    except ValueError:
        answer = data
    return Answer(status[0], answer)


class ControlTarget:
    """An in-process server and its control API, with one migration announced (a session with two
    ports and a screen), as s2 has it while s1 sends device state. ``/migrate`` stops at the
    orchestrator: what is fuzzed is the request body, not a migration to wherever it names."""

    def __init__(self) -> None:
        from spicewire.control.server import ControlServer
        from spicewire.server.net import ServerConfig, SpiceServer

        self.spice = SpiceServer(ServerConfig(host="127.0.0.1", port=0, port_channels=[
            ("org.spicewire.echo", "echo"), ("org.spicewire.sink", "sink")]))
        self.control = ControlServer(self.spice, "127.0.0.1", 0, token=TOKEN)  # the peer token too
        self.migrations: list[tuple] = []
        self.spice.migration.migrate = self._migrate  # type: ignore[method-assign]
        self.announce()

    def announce(self) -> None:
        answer = wsgi(self.control, "POST", "/migration/announce", json.dumps(ANNOUNCEMENT).encode())
        assert answer.status == 200, answer

    def _migrate(self, to, to_control, mode, timeout, token, **kwargs) -> dict:
        import math

        assert isinstance(to[0], str) and 0 <= to[1] <= 65535 and 0 < to_control[1] <= 65535
        assert isinstance(timeout, float) and 0 < timeout < math.inf and (token is None or isinstance(token, str))
        self.migrations.append((to, to_control, mode, timeout))
        return {"sessions": []}

    def post(self, target: str, body: bytes) -> Answer:
        return wsgi(self.control, "POST", target, body)

    def close(self) -> None:
        for sid in list(self.spice.migration.announcements):
            self.spice.migration.end_announcement(sid)


_CONTROL: ControlTarget | None = None


def control_target(fresh: bool = False) -> ControlTarget:
    """The shared target; ``fresh``: its session announced anew, so that no earlier input decides
    what this one does (Hypothesis replays an input and needs the same answer)."""
    global _CONTROL
    if _CONTROL is None:
        _CONTROL = ControlTarget()
    if fresh:
        _CONTROL.spice.migration.end_announcement(SESSION)
    if SESSION not in _CONTROL.spice.migration.announcements:
        _CONTROL.announce()  # a fuzzed abort ended it, or fresh
    return _CONTROL


@pytest.fixture(scope="module", autouse=True)
def _close_control_target():
    yield
    global _CONTROL
    if _CONTROL is not None:
        _CONTROL.close()
        _CONTROL = None


def _refused(answer: Answer) -> bool:
    return 400 <= answer.status < 500


def _snapshot(target: ControlTarget) -> tuple:
    """What a device-state batch or a pre-copy may change of the announced session."""
    ann = target.spice.migration.announcements[SESSION]
    screen = ann.display.screen
    digest = hashlib.sha256()  # the pixels by digest: a failing comparison is reported at once
    for plane in (screen.framebuffer, ann.display.damage.shadow):
        digest.update(plane.tobytes())
    return (
        {cid: [bytes(c) for c in chunks] for cid, chunks in ann.device_state.items()}, dict(ann.in_flight),
        digest.hexdigest(), json.dumps(screen.state()), ann.display.migrated_channel,
    )


def _post_refused_whole(path: str, data: bytes) -> None:
    """A 200, or a 4xx that left the announced session as it was: a batch is refused whole."""
    target = control_target(fresh=True)
    before = _snapshot(target)
    answer = target.post(f"{path}?migration={MIGRATION}", data)
    assert answer.status == 200 or _refused(answer), answer
    if answer.status != 200:
        assert _snapshot(target) == before, f"a refused batch changed the session: {answer.body}"


def check_device_state(data: bytes) -> None:
    _post_refused_whole("/migration/device-state", data)


def check_display_precopy(data: bytes) -> None:
    _post_refused_whole("/migration/display-precopy", data)


def device_state_seeds() -> list[bytes]:
    echo_state = b'{"bytes": 3}'
    index = [
        {"session_id": f"{SESSION:08x}", "port": 0, "chunks": 1, "in_flight": 5},
        {"session_id": f"{SESSION:08x}", "port": 1, "chunks": 0},
        {"session_id": "00000001", "port": 0, "chunks": 1},
        {"session_id": f"{SESSION:08x}", "display": True, "chunks": 4, "screen_chunks": 0},
        {"session_id": f"{SESSION:08x}", "display": True, "chunks": 5, "screen_chunks": 0, "channel": True},
    ]
    no_tiles = [np.zeros(0, dtype=np.uint8).tobytes()] * 4
    return [
        codec.pack_chunks([json.dumps(index[4:]).encode(), *no_tiles, DISPLAY_RECORD]).tobytes(),
        codec.pack_chunks([json.dumps(index[:2]).encode(), echo_state]).tobytes(),
        codec.pack_chunks([json.dumps(index[:3]).encode(), echo_state, b"{}"]).tobytes(),
        codec.pack_chunks([json.dumps(index[3:]).encode(), *no_tiles]).tobytes(),
        codec.pack_chunks([b"[]"]).tobytes(),
    ]


def display_precopy_seeds() -> list[bytes]:
    surface = bytes(32 * 16 * 4)
    return [
        codec.pack_chunks([json.dumps([f"{SESSION:08x}"]).encode(), surface, surface]).tobytes(),
        codec.pack_chunks([json.dumps(["00000001"]).encode(), b"", b""]).tobytes(),
        codec.pack_chunks([json.dumps([f"{SESSION:08x}"]).encode(), b"short", surface]).tobytes(),
    ]


CONTROL_PATHS = (
    "/password", "/migrate", "/migration/announce", f"/migration/device-state?migration={MIGRATION}",
    f"/migration/display-precopy?migration={MIGRATION}", "/migration/abort",
    f"/sessions/{SESSION:08x}/ports/org.spicewire.echo/pause", f"/sessions/{SESSION:08x}/ports/x/resume",
)


def post_paths() -> list[str]:
    """Every POST endpoint the control server has (new ones are fuzzed without a change here), with
    its ``{parameters}`` filled in."""
    paths = set(CONTROL_PATHS)
    for endpoint in control_target().control.router.endpoints():
        method, _, pattern = endpoint.partition(" ")
        if method == "POST":
            paths.add(pattern.replace("{session}", f"{SESSION:08x}").replace("{port}", "org.spicewire.echo")
                      .replace("{", "").replace("}", ""))
    return sorted(paths)


def check_control(data: bytes) -> None:
    target_line, _, body = data.partition(b"\n")
    target = target_line.decode("latin-1")
    if not target.startswith("/"):
        return
    answer = control_target().post(target, body)
    assert answer.status == 200 or _refused(answer), answer


def control_case(path: str, body: object) -> bytes:
    text = body if isinstance(body, bytes) else json.dumps(body).encode()
    return path.encode() + b"\n" + text


def control_seeds() -> list[bytes]:
    return [
        control_case("/password", {"password": "hunter2", "expires_in": 30}),
        control_case("/password", {"expires_in": None}),
        control_case("/migrate", {"to": "127.0.0.1:5901", "to_control": "127.0.0.1:8001", "mode": "seamless",
                                  "timeout": 2, "to_token": "t", "to_tls_port": 5902, "to_cert_subject": "CN=s2"}),
        control_case("/migration/announce", {**ANNOUNCEMENT, "migration": "fedcba9876543210", "sessions": [
            {"session_id": "00000002", "ports": [[0, "p", "echo", 10]], "ticket": "abc"}]}),
        control_case("/migration/abort", {"migration": "fedcba9876543210", "sessions": ["00000002"]}),
        control_case("/migrate", b"[" * 5000),
        control_case("/password", b"\xff\xfe{"),
    ]


# JSON a careless or hostile caller might send: the known fields with values of any type. Integers
# stay small where they would size an allocation (a screen, a prefault): that is the budget's
# business (issue 9), not the parser's.
_KEYS = ("password", "expires_in", "to", "to_control", "mode", "timeout", "to_token", "to_tls_port",
         "to_cert_subject", "migration", "sessions", "ttl", "session_id", "ports", "ticket", "display", "kind",
         "width", "height")
_SCALARS = (
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.sampled_from([-1, 2**31, 2**32, 2**40 + 1, 2**64])
    | st.floats(allow_nan=True, allow_infinity=True) | C_TEXT
    | st.sampled_from([MIGRATION, f"{SESSION:08x}", "00000000", "127.0.0.1:1", "seamless", "echo", "clock"])
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS) | C_TEXT, inner, max_size=5),
    max_leaves=12,
)


@st.composite
def control_inputs(draw: Callable) -> bytes:
    path = draw(st.sampled_from(post_paths()))
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return control_case(path, draw(st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=6)))
    if kind == 1:
        return control_case(path, draw(_JSON))
    return control_case(path, draw(st.binary(max_size=64)))


_LABELS = st.sampled_from([f"{SESSION:08x}", "00000001", "00000000", "xyz", 7])


@st.composite
def device_state_inputs(draw: Callable) -> bytes:
    """Batches shaped like pack_device_states: port and screen entries, their chunks right or not."""
    index, chunks = [], []
    screen = control_target().spice.migration.announcements[SESSION].display.screen
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            count = draw(st.integers(0, 2))
            index.append({"session_id": draw(_LABELS), "port": draw(st.sampled_from([0, 1, 2, -1, "0"])),
                          "chunks": count, "in_flight": draw(st.sampled_from([0, 5, -1, 2**70, "x"]))})
            chunks += [draw(st.sampled_from([b"{}", b'{"bytes_in": 3}', b"[]"]) | st.binary(max_size=16))
                       for _ in range(count)]
            continue
        screen_chunks = draw(st.integers(0, 2))
        label = draw(st.just(f"{SESSION:08x}") | _LABELS)
        channel = draw(st.sampled_from([None, None, True, 1, "x"]))  # the display record (DISPLAY_STATE_VERSION)
        index.append({"session_id": label, "display": True, "screen_chunks": screen_chunks,
                      "chunks": screen_chunks + draw(st.sampled_from([4, 4, 3, 5])) + (channel is True),
                      **({} if channel is None else {"channel": channel})})
        state = dict(screen.state())
        if draw(st.booleans()):
            state[draw(st.sampled_from(sorted(state)))] = draw(_JSON)
        chunks += [json.dumps(state).encode() if draw(st.booleans()) else draw(st.binary(max_size=16))
                   for _ in range(screen_chunks)]
        for _ in range(2):  # a tile delta: int32 (row, column) pairs, then the tiles' bytes
            tile = bytes([draw(st.integers(0, 255))]) * (32 * 16 * 4)  # the screen is one tile
            if draw(st.booleans()):  # a right one: the one tile, or none
                pairs, data = draw(st.sampled_from([(((0, 0),), tile), ((), b"")]))
            else:
                pairs = draw(st.lists(st.tuples(st.integers(-1, 2), st.integers(-1, 2)), max_size=2))
                data = draw(st.sampled_from([b"", tile, tile[1:]]))
            chunks += [struct.pack(f"<{2 * len(pairs)}i", *[v for pair in pairs for v in pair]), data]
        if channel is True:
            records = st.sampled_from([DISPLAY_RECORD, DISPLAY_RECORD[:-1], b"SWDD"]) | st.binary(max_size=40)
            chunks.append(draw(records))
    index_bytes = json.dumps(index).encode() if draw(st.integers(0, 9)) else draw(st.binary(max_size=12))
    return codec.pack_chunks([index_bytes, *chunks]).tobytes()


@st.composite
def precopy_inputs(draw: Callable) -> bytes:
    """Pre-copies shaped like pack_display_precopy: labels, then two surfaces each, of any size."""
    labels = draw(st.lists(st.just(f"{SESSION:08x}") | _LABELS, max_size=3))
    surface = bytes([draw(st.integers(0, 255))]) * (32 * 16 * 4)
    sizes = st.sampled_from([surface, surface[1:], surface + b"+", b""])
    chunks = [draw(sizes) for _ in range(2 * len(labels) + draw(st.sampled_from([0, 0, 1, -1])))]
    return codec.pack_chunks([json.dumps(labels).encode(), *chunks]).tobytes()


@st.composite
def container_inputs(draw: Callable) -> bytes:
    index = draw(_JSON)
    extra = draw(st.lists(st.binary(max_size=32), max_size=5))
    return codec.pack_chunks([json.dumps(index).encode(), *extra]).tobytes()


# --- the targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    check: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    inputs: st.SearchStrategy[bytes]
    mutations: int = MUTATIONS_PER_SEED


TARGETS = {
    "link_server": Target(check_link_server, link_server_seeds, st.binary(max_size=200).map(
        lambda tail: link_mess(0, ChannelType.MAIN, 0)[:20] + tail) | st.binary(max_size=64), mutations=30),
    "link_client": Target(check_link_client, link_client_seeds, st.binary(max_size=300), mutations=30),
    "messages": Target(check_message, message_seeds, message_inputs(), mutations=4),
    "channel_stream": Target(check_channel, channel_seeds, channel_inputs(), mutations=20),
    "migrate_data": Target(check_migrate_data, migrate_data_seeds, st.tuples(
        st.integers(0, 255), st.binary(max_size=200)).map(lambda t: bytes([t[0]]) + t[1])),
    "draw_copy": Target(check_draw_copy, draw_copy_seeds, st.binary(max_size=200)),
    "cursor": Target(check_cursor, cursor_seeds, st.binary(max_size=60)),
    "device_state": Target(check_device_state, device_state_seeds, device_state_inputs() | container_inputs(),
                           mutations=40),
    "display_precopy": Target(check_display_precopy, display_precopy_seeds, precopy_inputs() | container_inputs(),
                              mutations=40),
    "control": Target(check_control, control_seeds, control_inputs(), mutations=20),
}


@pytest.mark.parametrize("name", TARGETS)
def test_corpus_replays_clean(name, backend):
    """Every committed input: the valid seeds and the inputs that once found a bug."""
    committed = corpus(name)
    assert committed, f"tests/corpus/{name}/ is empty: run python -m tests.test_fuzz_parsers"
    for _, data in committed:
        run(name, TARGETS[name].check, data)


@pytest.mark.parametrize("name", TARGETS)
def test_mutated_seeds_give_only_documented_errors(name, backend):
    target = TARGETS[name]
    rng = random.Random(f"{name}-{backend}")
    for seed in target.seeds():
        for data in mutations(seed, rng, target.mutations * fuzzing.SCALE):
            run(name, target.check, data)


@pytest.mark.parametrize("name", TARGETS)
def test_hypothesis_inputs_give_only_documented_errors(name, backend):
    target = TARGETS[name]

    @budget(EXAMPLES)
    @given(data=target.inputs)
    def fuzz(data):
        run(name, target.check, data)

    fuzz()


def write_seeds() -> None:
    for name, target in TARGETS.items():
        for path in (fuzzing.CORPUS / name).glob("seed-*.bin") if (fuzzing.CORPUS / name).is_dir() else ():
            path.unlink()
        for data in target.seeds():
            fuzzing.save(name, data, prefix="seed")


if __name__ == "__main__":
    write_seeds()
    if _CONTROL is not None:
        _CONTROL.close()
    sys.exit(0)
