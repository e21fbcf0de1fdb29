"""Any state x any input, as h2's state-machine tests: every sans-I/O machine is driven into every
state it can reach by sequences of inputs it accepts, then given every input it has (every message
class, command and timer) in each of them.

Each input is either a transition or the documented error: RemoteProtocolError (or LinkError, a
ticket refused) when the peer sent it, LocalProtocolError when we did. A machine that raised for
its peer's input refuses everything after, and nothing else ever escapes (no AttributeError,
KeyError or AssertionError). The search also checks that every state of every machine is reachable
this way, so a state that loses its way in goes noticed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from spicewire.errors import (
    LinkError,
    LinkTimeout,
    LocalProtocolError,
    MessageTooLarge,
    RemoteProtocolError,
    SpiceError,
)
from spicewire.protocol import messages as m
from spicewire.protocol.caps import caps_to_words
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import ChannelType, LinkErr, MainCap, MigrateFlags
from spicewire.protocol.framing import MessageReader, MessageWriter
from spicewire.protocol.link import ClientLink, LinkState, ServerLink, SpiceLinkHeader
from spicewire.protocol.migrate_data import PortMigrateData, build_port_migrate_data
from spicewire.protocol.migration import (
    MAIN,
    ClientChannelState,
    ClientMigration,
    ClientOutput,
    ClientState,
    DestinationChannelState,
    DestinationMigration,
    DestinationOutput,
    DestinationState,
    MigrationDstInfo,
    MigrationMode,
    Peer,
    SourceChannelState,
    SourceMigration,
    SourceOutput,
    SourceState,
    build_main_migrate_data,
    build_spicevmc_migrate_data,
)

from .test_fuzz_parsers import KEY, link_mess, minimal, server_reply

PORT = (ChannelType.PORT, 0)
DST = MigrationDstInfo(port=5901, sport=0, host="s2.example")
SEAMLESS_CLIENT = caps_to_words(
    [MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.AGENT_CONNECTED_TOKENS, MainCap.SEAMLESS_MIGRATE]
)
SERVER_CAPS = caps_to_words([MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.SEAMLESS_MIGRATE])

PEER, OURS, TIMER = "peer", "ours", "timer"


@dataclass(frozen=True)
class Call:
    """One input: ``apply(machine)`` runs it; ``whose`` says who is at fault if it is refused, and
    ``owner_broke(machine)`` (for a peer's message) whether the owner broke its own contract
    first by reading a connection it had been told not to read, when LocalProtocolError is right."""

    name: str
    apply: Callable[[Any], Any]
    whose: str
    owner_broke: Callable[[Any], bool] = field(default=lambda machine: False)


@dataclass
class Search:
    """Breadth first over the configurations a machine reaches by accepted inputs."""

    make: Callable[[], Any]
    calls: Sequence[Call]
    key: Callable[[Any], Hashable]
    clone: Callable[[Any, list[Call]], Any]
    max_depth: int = 10
    max_configs: int = 1500
    seen: dict[Hashable, list[Call]] = field(default_factory=dict)
    ended: set[Hashable] = field(default_factory=set)  # configurations an input failed into

    @property
    def reached(self) -> set[Hashable]:
        return set(self.seen) | self.ended

    def run(self, check: Callable[[Any, Any, Call, BaseException | None], None]) -> None:
        start = self.make()
        self.seen[self.key(start)] = []
        frontier: list[tuple[Any, list[Call]]] = [(start, [])]
        for _ in range(self.max_depth):
            later = []
            for machine, path in frontier:
                for call in self.calls:
                    after = self.clone(machine, path)
                    error: BaseException | None = None
                    try:
                        result = call.apply(after)
                    except SpiceError as err:  # which ones are right is check's to say
                        error, result = err, None
                    check(machine, after, call, error if error is not None else result)
                    key = self.key(after)
                    if error is not None:
                        self.ended.add(key)
                    elif key not in self.seen and len(self.seen) < self.max_configs:
                        self.seen[key] = [*path, call]
                        later.append((after, [*path, call]))
            frontier = later
            if not frontier:
                break


def _replay(make: Callable[[], Any]) -> Callable[[Any, list[Call]], Any]:
    """A configuration rebuilt by running its path again (every call on it was accepted): the
    machines hold RSA keys and memoryviews, which do not deep-copy."""

    def clone(machine: Any, path: list[Call]) -> Any:
        fresh = make()
        for call in path:
            call.apply(fresh)
        return fresh

    return clone


def _errors_for(call: Call, before: Any) -> tuple[type[BaseException], ...]:
    if call.whose == PEER:
        return (RemoteProtocolError, LocalProtocolError) if call.owner_broke(before) else (RemoteProtocolError,)
    return (LocalProtocolError,)


# --- the migration roles ---------------------------------------------------------------------------


def role_check(outputs: type, extra: Callable[[Any], None] = lambda machine: None):
    def check(before: Any, after: Any, call: Call, result: Any) -> None:
        if isinstance(result, BaseException):
            allowed = _errors_for(call, before)
            assert isinstance(result, allowed), f"{call.name} in {before.state.name}: {result!r}, not {allowed}"
            assert after.failed and after.error is result
            assert _timer(after) is None
            for later in _sample(CALLS_OF[type(after)]):
                with pytest.raises(LocalProtocolError, match="already failed"):
                    later.apply(after)
            return
        assert not after.failed
        assert isinstance(result, list) and all(isinstance(item, outputs) for item in result), (call.name, result)
        extra(after)

    return check


def _timer(role: Any) -> float | None:
    return getattr(role, "get_timer", lambda: None)()  # the destination has no deadline of its own


def _sample(calls: Sequence[Call]) -> list[Call]:
    """Some of each kind of input: the refusal after a failure is one wrapper around every entry."""
    return [*calls[::9], *(call for call in calls if call.whose == TIMER)]


def _messages(channel_type: int, direction: m.Direction) -> list[m.Message]:
    return [minimal(cls) for _, cls in sorted(m.message_table(channel_type, direction).items())]


# Variants whose fields decide the transition, beside each class's minimal instance.
C2S_MAIN = [*_messages(ChannelType.MAIN, m.C2S), m.MsgcMainMigrateDstDoSeamless(99),
            m.MsgcMigrateData(build_main_migrate_data())]
C2S_PORT = [*_messages(ChannelType.PORT, m.C2S), m.MsgcMigrateData(build_spicevmc_migrate_data()),
            m.MsgcMigrateData(build_port_migrate_data(PortMigrateData()).tobytes())]
S2C_MAIN = [*_messages(ChannelType.MAIN, m.S2C), *(m.MsgMigrate(flags) for flags in (0, 1, 2, 3, 4)),
            m.MsgMainMigrateBegin(DST), m.MsgMainMigrateBeginSeamless(DST, 1), m.MsgMainMigrateSwitchHost(DST)]
S2C_PORT = [*_messages(ChannelType.PORT, m.S2C), *(m.MsgMigrate(flags) for flags in (0, 1, 2, 3))]
ROLE_CHANNELS = ((MAIN, C2S_MAIN, S2C_MAIN), (PORT, C2S_PORT, S2C_PORT))


def _name(msg: m.Message) -> str:
    return f"{type(msg).__name__}({msg.flags})" if isinstance(msg, m.MsgMigrate) else type(msg).__name__


def source_calls() -> list[Call]:
    calls = [Call(f"begin {mode.label}", lambda s, mode=mode: s.begin(DST, mode, now=0.0), OURS)
             for mode in MigrationMode]
    calls += [
        Call("cancel", lambda s: s.cancel(), OURS),
        Call("finish", lambda s: s.finish(now=1.0), OURS),
        Call("finish, staying", lambda s: s.finish(now=1.0, switch_host=False), OURS),
        Call("roll back", lambda s: s.roll_back(), OURS),
        Call("client disconnected", lambda s: s.client_disconnected(), OURS),
        Call("timer, early", lambda s: s.handle_timer(2.0), TIMER),
        Call("timer, late", lambda s: s.handle_timer(100.0), TIMER),
    ]
    for channel, incoming, outgoing in ROLE_CHANNELS:
        calls += [Call(f"receive {channel} {_name(msg)}", lambda s, c=channel, msg=msg: s.receive(c, msg), PEER)
                  for msg in incoming]
        sends = [m.MsgMigrateData(b"state"), m.MsgMigrate(3), m.MsgPing(1, 2, 0), outgoing[-1]]
        calls += [Call(f"send {channel} {_name(msg)}", lambda s, c=channel, msg=msg: s.send(c, msg), OURS)
                  for msg in sends]
        calls.append(Call(f"migrate data streamed {channel}", lambda s, c=channel: s.migrate_data_streamed(c), OURS))
    return calls


def destination_calls() -> list[Call]:
    def unread(channel):  # a parked link, or none: the owner must not be reading it
        return lambda d: d.channels.get(channel) in (None, DestinationChannelState.PARKED)

    calls = [Call("port linked", lambda d: d.channel_linked(PORT), OURS)]
    for channel, incoming, _ in ROLE_CHANNELS:
        calls += [Call(f"receive {channel} {_name(msg)}", lambda d, c=channel, msg=msg: d.receive(c, msg), PEER,
                       unread(channel)) for msg in incoming]
    return calls


_CC = ClientChannelState
_READS_S1 = (_CC.ON_S1, _CC.WAIT_MIGRATE_DATA, _CC.HELD)


def _s1_unread(channel):
    return lambda c: c.channels[channel] not in _READS_S1


def _s2_unread(channel):
    # s2's main is read during the seamless handshake and while MAIN_INIT is awaited, every channel
    # once it has switched; the other links to s2 stay frozen until then.
    def unread(c):
        return c.channels[channel] is not _CC.ON_S2 and not (
            channel == MAIN and c.state in (ClientState.HANDSHAKE, ClientState.WAIT_MAIN_INIT))

    return unread


def _always(machine: Any) -> bool:
    return True


def client_calls() -> list[Call]:
    calls = [
        Call("s2 main linked", lambda c: c.s2_linked(MAIN, (), now=0.0), OURS),
        Call("s2 main linked, seamless", lambda c: c.s2_linked(MAIN, SERVER_CAPS, now=0.0), OURS),
        Call("s2 port linked", lambda c: c.s2_linked(PORT, now=0.0), OURS),
        Call("s2 main link failed", lambda c: c.s2_link_failed(MAIN), OURS),
        Call("s2 spoke", lambda c: c.s2_spoke(), OURS),
        Call("s1 let go", lambda c: c.s1_let_go(), OURS),
        Call("s2 failed", lambda c: c.s2_failed(now=0.0), OURS),
        Call("timer, early", lambda c: c.handle_timer(1.0), TIMER),
        Call("timer, late", lambda c: c.handle_timer(1000.0), TIMER),
    ]
    for channel, outgoing, incoming in ROLE_CHANNELS:
        for msg in incoming:
            # s1's MIGRATE_DATA belongs to migrate_data(), unread: through receive it is our mistake
            fault = _always if isinstance(msg, m.MsgMigrateData) else _s1_unread(channel)
            calls.append(Call(f"s1 {channel} {_name(msg)}",
                              lambda c, ch=channel, msg=msg: c.receive(Peer.S1, ch, msg, now=0.0), PEER, fault))
            calls.append(Call(f"s2 {channel} {_name(msg)}",
                              lambda c, ch=channel, msg=msg: c.receive(Peer.S2, ch, msg, now=0.0), PEER,
                              _s2_unread(channel)))
        calls.append(Call(f"s1 {channel} MIGRATE_DATA", lambda c, ch=channel: c.migrate_data(ch, b"body", now=0.0),
                          PEER, _s1_unread(channel)))
        calls.append(Call(f"not MIGRATE_DATA {channel}", lambda c, ch=channel: c.not_migrate_data(ch), OURS))
        calls += [Call(f"send {channel} {_name(msg)}", lambda c, ch=channel, msg=msg: c.send(ch, msg), OURS)
                  for msg in outgoing]
    return calls


CALLS_OF = {
    SourceMigration: source_calls(),
    DestinationMigration: destination_calls(),
    ClientMigration: client_calls(),
}


def _role_key(role: Any, *private: str) -> Hashable:
    return (role.state, tuple(role.channels.items()), role.mode, _timer(role) is not None,
            tuple(repr(getattr(role, name)) for name in private))


ROLE_SEARCHES = {
    "source": (
        # main flushes and sends its data; the port only flushes: every channel state is in reach
        lambda: SourceMigration([PORT], SEAMLESS_CLIENT, channel_flags={PORT: MigrateFlags.NEED_FLUSH}),
        lambda s: _role_key(s, "dst_info", "_flushed"),
        SourceOutput, SourceState, SourceChannelState,
    ),
    "destination": (
        lambda: DestinationMigration(0x1234, SEAMLESS_CLIENT),
        lambda d: _role_key(d),
        DestinationOutput, DestinationState, DestinationChannelState,
    ),
    "client": (
        lambda: ClientMigration(0x1234, [PORT], SERVER_CAPS),
        lambda c: _role_key(c, "_pending_links", "_destination_open", "_s2_spoke", "_post_migration", "_cancelled",
                            "rolled_back", "session_id"),
        ClientOutput, ClientState, ClientChannelState,
    ),
}


@pytest.mark.parametrize("role", ROLE_SEARCHES)
def test_every_reachable_state_of_a_migration_role_takes_every_input_or_refuses_it_properly(role):
    make, key, outputs, states, channel_states = ROLE_SEARCHES[role]
    search = Search(make, CALLS_OF[type(make())], key, _replay(make))
    search.run(role_check(outputs))
    reached = {k[0] for k in search.reached}
    reached_channels = {state for k in search.reached for _, state in k[1]}
    assert reached == set(states), f"never reached: {set(states) - reached}"
    assert reached_channels == set(channel_states), f"never reached: {set(channel_states) - reached_channels}"


# --- the link machines -------------------------------------------------------------------------------

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def _feed_server(data: bytes) -> Callable[[ServerLink], list]:
    def feed(link: ServerLink) -> list:
        link.receive_data(data, 1.0)
        events = []
        while (event := link.next_event()) is not None:
            events.append(event)
        return events

    return feed


def _ticket(secret: bytes) -> Callable[[ServerLink], list]:
    return _feed_server(KEY.public_key().encrypt(secret, _OAEP))  # every link here has KEY


_MESS = link_mess(4, ChannelType.MAIN, 0)  # with PROTOCOL_AUTH_SELECTION: a mechanism word first
_MESS_NO_SELECTION = link_mess(4, ChannelType.MAIN, 0, common=(0x08,))

SERVER_LINK_CALLS = [
    Call("magic", _feed_server(_MESS[:4]), PEER),
    Call("rest of the header", _feed_server(_MESS[4:16]), PEER),
    Call("link message", _feed_server(_MESS[16:]), PEER),
    Call("link message without auth selection", _feed_server(_MESS_NO_SELECTION[16:]), PEER),
    Call("whole request", _feed_server(_MESS), PEER),
    Call("mechanism SPICE", _feed_server(b"\x01\x00\x00\x00"), PEER),
    Call("mechanism SASL", _feed_server(b"\x02\x00\x00\x00"), PEER),
    Call("good ticket", _ticket(b"secret\0"), PEER),
    Call("migration ticket", _ticket(b"moving\0"), PEER),
    Call("wrong ticket", _ticket(b"guess\0"), PEER),
    Call("undecryptable ticket", _feed_server(bytes(128)), PEER),
    Call("bad magic", _feed_server(b"REDQ"), PEER),
    Call("one byte", _feed_server(b"R"), PEER),
    Call("nothing", _feed_server(b""), PEER),
    Call("accept", lambda link: link.accept(), OURS),
    Call("reject", lambda link: link.reject(LinkErr.BAD_CONNECTION_ID), OURS),
    Call("reject with OK", lambda link: link.reject(LinkErr.OK), OURS),
    Call("close without reply", lambda link: link.close_without_reply(), OURS),
    Call("allow migration ticket", lambda link: link.allow_migration_ticket("moving"), OURS),
    Call("timer, early", lambda link: link.handle_timer(5.0), TIMER),
    Call("timer, late", lambda link: link.handle_timer(20.0), TIMER),
    Call("accept, deciding after the ticket", lambda link: link.accept(decide_after_ticket=True), OURS),
    Call("establish", lambda link: link.establish(), OURS),
    Call("refuse", lambda link: link.refuse(LinkErr.BAD_CONNECTION_ID), OURS),
]


def _feed_client(data: bytes) -> Callable[[ClientLink], list]:
    def feed(link: ClientLink) -> list:
        link.receive_data(data)
        events = []
        while (event := link.next_event()) is not None:
            events.append(event)
        return events

    return feed


_REPLY = server_reply()
_ERROR_REPLY = server_reply(LinkErr.BAD_CONNECTION_ID)
_NO_AUTH_REPLY = server_reply(common=(0x01,))

CLIENT_LINK_CALLS = [
    Call("reply header", _feed_client(_REPLY[:16]), PEER),
    Call("error reply header", _feed_client(_ERROR_REPLY[:16]), PEER),
    Call("reply", _feed_client(_REPLY[16:]), PEER),
    Call("error reply", _feed_client(_ERROR_REPLY[16:]), PEER),
    Call("reply without AUTH_SPICE", _feed_client(_NO_AUTH_REPLY[16:]), PEER),
    Call("result OK", _feed_client(b"\x00\x00\x00\x00"), PEER),
    Call("result PERMISSION_DENIED", _feed_client(b"\x07\x00\x00\x00"), PEER),
    Call("bad magic", _feed_client(SpiceLinkHeader(magic=1, size=200).encode()), PEER),
    Call("garbage", _feed_client(bytes(range(40))), PEER),
    Call("nothing", _feed_client(b""), PEER),
    Call("timer, late", lambda link: link.handle_timer(50.0), TIMER),
]


def link_check(calls: list[Call]):
    def check(before: Any, after: Any, call: Call, result: Any) -> None:
        if not isinstance(result, BaseException):
            return
        if call.whose == OURS or (call.whose == PEER and before.state is LinkState.ESTABLISHED):
            # The owner's mistake (or later bytes fed to the link instead of the channel) changes
            # nothing: the link goes on as it was.
            assert isinstance(result, LocalProtocolError), f"{call.name} in {before.state.name}: {result!r}"
            assert after.state is before.state
            return
        allowed = (LinkTimeout,) if call.whose == TIMER else (RemoteProtocolError, LinkError)
        assert isinstance(result, allowed), f"{call.name} in {before.state.name}: {result!r}"
        # A failed link has its error reply queued, then takes nothing and answers nothing.
        assert after.state is LinkState.CLOSED and after.get_timer() is None
        after.data_to_send()
        for later in calls:
            if later.whose == OURS:
                with pytest.raises(LocalProtocolError):
                    later.apply(after)
            else:
                assert not later.apply(after) and after.data_to_send() == b"", later.name
        assert after.state is LinkState.CLOSED

    return check


def _link_key(link: Any) -> Hashable:
    server = isinstance(link, ServerLink)
    return (link.state, link._need, len(link._inbox), server and link._decide_after_ticket,
            server and bool(link._tickets))


def server_link() -> ServerLink:
    return ServerLink(0.0, password="secret", key_factory=lambda: KEY)


def client_link() -> ClientLink:
    return ClientLink(4, ChannelType.MAIN, 0, password="secret", now=0.0, timeout=10.0)


@pytest.mark.parametrize(
    ("make", "calls", "states"),
    [
        (server_link, SERVER_LINK_CALLS, set(LinkState) - {LinkState.REPLY, LinkState.RESULT}),
        (client_link, CLIENT_LINK_CALLS,
         {LinkState.HEADER, LinkState.REPLY, LinkState.RESULT, LinkState.ESTABLISHED, LinkState.CLOSED}),
    ],
    ids=["server", "client"],
)
def test_every_reachable_state_of_a_link_takes_every_input_or_refuses_it_properly(make, calls, states):
    search = Search(make, calls, _link_key, _replay(make), max_depth=8)
    search.run(link_check(calls))
    reached = {key[0] for key in search.reached}
    assert reached == states, f"never reached: {states - reached}"


# --- the channel connection ----------------------------------------------------------------------

BULK = 64  # smaller bodies than this are copied out, larger ones gathered in their own buffer


@dataclass(frozen=True)
class Framed:
    """A message as the peer frames it for this connection's current serial."""

    msg_type: int
    body: bytes
    serial_offset: int = 1
    cut: int | None = None  # only the first ``cut`` bytes arrive

    def __call__(self, conn: ChannelConnection) -> list:
        writer = MessageWriter(conn.expects_mini_header)
        writer.continue_serials(conn.serial_in + self.serial_offset - 1)
        data = writer.frame(self.msg_type, self.body)
        return conn.receive_data(data[: self.cut])


def _fill_bulk(conn: ChannelConnection) -> list:
    view = conn.receive_buffer()
    if view is None:
        return conn.receive_data(b"")
    view[:] = b"\x5a" * len(view)
    return conn.received_into(len(view))


def channel_calls(side: Side, channel_type: int) -> list[Call]:
    incoming = m.C2S if side is Side.SERVER else m.S2C
    outgoing = m.S2C if side is Side.SERVER else m.C2S

    def paused_or_failed(conn: ChannelConnection) -> bool:  # documented LocalProtocolErrors
        return conn.paused or conn.receive_error is not None

    calls = [Call(f"receive {type(msg).__name__}", Framed(msg.TYPE, msg.encode()), PEER, paused_or_failed)
             for msg in _messages(channel_type, incoming)]
    calls += [
        Call("receive MIGRATE(NEED_DATA_TRANSFER)", Framed(1, m.MsgMigrate(MigrateFlags.NEED_DATA_TRANSFER).encode()),
             PEER, paused_or_failed),
        Call("receive half a header", Framed(101, b"x", cut=3), PEER, paused_or_failed),
        Call("receive the start of a bulk body", Framed(101, b"y" * (2 * BULK), cut=BULK), PEER, paused_or_failed),
        Call("receive the rest of a bulk body", _fill_bulk, PEER, paused_or_failed),
        Call("receive an unknown type", Framed(0x7777, b"?"), PEER, paused_or_failed),
        Call("receive a body over the limit", Framed(101, b"z" * 300, cut=20), PEER, paused_or_failed),
        Call("receive a serial out of order", Framed(101, b"s", serial_offset=5), PEER, paused_or_failed),
        Call("set ACK window", lambda c: c.set_ack(4), OURS),
        Call("expect MIGRATE_DATA", lambda c: c.expect_migrate_data(1 << 16), OURS),
        Call("restore migrated", lambda c: c.restore_migrated(serial_out=9, ack_generation=3), OURS),
        Call("adopt peer serials", lambda c: c.adopt_peer_serials(), OURS),
        Call("take unparsed", lambda c: c.take_unparsed(), OURS),
        Call("resume", lambda c: c.resume(b""), OURS),
        Call("rebind", lambda c: c.rebind(send_mini=c.sends_mini_header, expect_mini=c.expects_mini_header), OURS),
        Call("send streamed", lambda c: c.send_streamed(101, 10), OURS),
        Call("data to send", lambda c: c.data_to_send(), OURS),
    ]
    calls += [Call(f"send {type(msg).__name__}", lambda c, msg=msg: c.send(msg), OURS)
              for msg in _messages(channel_type, outgoing)]
    return calls


def channel_check(before: ChannelConnection, after: ChannelConnection, call: Call, result: Any) -> None:
    if not isinstance(result, BaseException):
        return
    if call.whose == OURS or call.owner_broke(before):
        assert isinstance(result, LocalProtocolError), f"{call.name}: {result!r}"
        return
    assert isinstance(result, (RemoteProtocolError, MessageTooLarge)), f"{call.name}: {result!r}"
    assert after.receive_error is result
    for later in (b"", b"\x01\x00\x00\x00\x00\x00"):
        with pytest.raises(LocalProtocolError):
            after.receive_data(later)
    with pytest.raises(LocalProtocolError):
        after.resume(b"")


def _channel_key(conn: ChannelConnection) -> Hashable:
    reader = conn.reader
    return (conn.paused, conn.receive_error is not None, reader._bulk is not None, reader.buffered > 0,
            reader._large is not None, reader._adopt_serial, conn.ack_window > 0, conn.client_window > 0)


@pytest.mark.parametrize("channel_type", [ChannelType.MAIN, ChannelType.PORT, ChannelType.DISPLAY,
                                          ChannelType.INPUTS, ChannelType.CURSOR], ids=lambda t: t.name)
@pytest.mark.parametrize("mini", [True, False], ids=["mini", "full"])
@pytest.mark.parametrize("side", [Side.SERVER, Side.CLIENT], ids=lambda s: s.value)
def test_every_reachable_state_of_a_channel_takes_every_input_or_refuses_it_properly(
    side, mini, channel_type, monkeypatch
):
    monkeypatch.setattr(MessageReader, "BULK_BODY", BULK)

    def make() -> ChannelConnection:
        return ChannelConnection(side, channel_type, send_mini=mini, expect_mini=mini, max_size=256)

    search = Search(make, channel_calls(side, channel_type), _channel_key, _replay(make), max_depth=5)
    search.run(channel_check)
    reached = search.reached
    # Every kind of place the stream can be: between messages, in a header, in a bulk body, failed,
    # and (a client after MIGRATE with NEED_DATA_TRANSFER) paused.
    assert any(key[2] for key in reached) and any(key[3] and not key[2] for key in reached)
    assert (side is Side.CLIENT) == any(key[0] for key in reached)


def test_search_reports_what_escapes():
    """The search itself lets anything but the documented errors through, so the tests above fail."""

    class Broken:
        state = None

    search = Search(Broken, [Call("crash", lambda machine: {}["missing"], PEER)], lambda machine: 0, _replay(Broken))
    with pytest.raises(KeyError):
        search.run(lambda *args: None)



def test_a_channel_whose_stream_failed_refuses_even_valid_bytes_after():
    conn = ChannelConnection(Side.SERVER, ChannelType.PORT)
    writer = MessageWriter(mini=True)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(writer.frame(0x7777, b"?"))  # a server ends on an unknown type
    with pytest.raises(LocalProtocolError, match="takes no more bytes"):
        conn.receive_data(writer.frame(m.MsgcPong.TYPE, m.MsgcPong(1, 2).encode()))
    conn.send(m.MsgPing(3, 4))  # the sending half still works: a goodbye can go out
    assert conn.data_to_send()
