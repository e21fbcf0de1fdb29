"""Link stage rules of PROTOCOL.md section 1, one test per rule."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spicewire.errors import LinkError, LocalProtocolError, RemoteProtocolError
from spicewire.protocol.enums import ChannelType, LinkErr
from spicewire.protocol.link import (
    CLIENT_COMMON_CAPS,
    SERVER_COMMON_CAPS,
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

# 1.9 worked bytes
MAIN_LINK = bytes.fromhex(
    "52454451 02000000 02000000 1a000000"
    "00000000 01 00 01000000 01000000 12000000"
    "0d000000 0f000000"
)
PORT_LINK = bytes.fromhex(
    "52454451 02000000 02000000 16000000"
    "44332211 0a 00 01000000 00000000 12000000 09000000"
)
REPLY_HEADER_186 = bytes.fromhex("52 45 44 51 02 00 00 00 02 00 00 00 ba 00 00 00")
DER_PREFIX_1024 = bytes.fromhex("30 81 9f 30 0d 06 09 2a 86 48 86 f7 0d 01 01 01 05 00 03 81 8d 00")
MAIN_REPLY_CAPS = bytes.fromhex("01 00 00 00 01 00 00 00 b2 00 00 00 0b 00 00 00 09 00 00 00")

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
KEYS = [new_link_key(), new_link_key()]  # generated once: keygen is the slow part of a link


def key_a() -> rsa.RSAPrivateKey:
    return KEYS[0]


def key_b() -> rsa.RSAPrivateKey:
    return KEYS[1]


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def der(key: rsa.RSAPrivateKey) -> bytes:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(serialization.Encoding.DER, spki)


def error_reply(code: int) -> bytes:
    return REPLY_HEADER_186[:12] + u32(178) + u32(code) + bytes(174)


def link(mess: bytes, *, major: int = 2, minor: int = 2, size: int | None = None) -> bytes:
    size = len(mess) if size is None else size
    return SpiceLinkHeader(major_version=major, minor_version=minor, size=size).encode() + mess


def raw_mess(ncommon: int, nchannel: int, offset: int, caps: bytes = b"") -> bytes:
    """A MAIN LinkMess with hand-picked counts and offset."""
    return struct.pack("<IBBIII", 0, ChannelType.MAIN, 0, ncommon, nchannel, offset) + caps


def drain(machine) -> list:
    events = []
    while (event := machine.next_event()) is not None:
        events.append(event)
    return events


def requested(data: bytes = MAIN_LINK, **kwargs) -> ServerLink:
    """A server link that has read ``data`` and waits for the owner's answer."""
    server = ServerLink(0.0, key_factory=key_a, **kwargs)
    server.receive_data(data, 0.0)
    assert kinds(drain(server)) == [LinkRequested]
    return server


def accepted(data: bytes = MAIN_LINK, **kwargs) -> ServerLink:
    server = requested(data, **kwargs)
    server.accept((0x09,))
    server.data_to_send()
    return server


def encrypt(plaintext: bytes) -> bytes:
    return KEYS[0].public_key().encrypt(plaintext, OAEP)


def send_ticket(server: ServerLink, plaintext: bytes, now: float = 0.0, word: bytes = u32(1)):
    server.receive_data(word + encrypt(plaintext), now)
    return drain(server)


def kinds(events: list) -> list[type]:
    return [type(e) for e in events]


def failure(machine, exc_type=RemoteProtocolError):
    with pytest.raises(exc_type) as info:
        drain(machine)
    assert machine.state is LinkState.CLOSED
    return info.value


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]


# --- structures ---------------------------------------------------------------------------------


def test_worked_main_link_parses():
    header = SpiceLinkHeader.decode(MAIN_LINK[:16])
    assert (header.magic, header.major_version, header.minor_version) == (0x51444552, 2, 2)
    assert header.size == 26
    mess = SpiceLinkMess.decode(MAIN_LINK[16:])
    assert mess == SpiceLinkMess(0, ChannelType.MAIN, 0, (0x0D,), (0x0F,))


def test_worked_port_link_parses():
    assert SpiceLinkHeader.decode(PORT_LINK[:16]).size == 22
    mess = SpiceLinkMess.decode(PORT_LINK[16:])
    assert mess == SpiceLinkMess(0x11223344, ChannelType.PORT, 0, (0x09,), ())


def test_client_link_encodes_worked_main_link():
    client = ClientLink(0, ChannelType.MAIN, 0, common_caps=(0x0D,), channel_caps=(0x0F,))
    assert client.data_to_send() == MAIN_LINK


def test_client_default_common_caps_are_spice_gtk_0x09():
    assert CLIENT_COMMON_CAPS == (0x09,)
    assert ClientLink(0x11223344, ChannelType.PORT, 0).data_to_send() == PORT_LINK


def test_error_reply_is_zero_but_the_code():
    assert SpiceLinkReply(LinkErr.INVALID_DATA).encode() == u32(3) + bytes(174)


def test_reply_round_trips():
    reply = SpiceLinkReply(LinkErr.OK, der(KEYS[0]), SERVER_COMMON_CAPS, (0x09,))
    assert SpiceLinkReply.decode(reply.encode()) == reply


# --- server reply -------------------------------------------------------------------------------


def test_server_reply_matches_worked_bytes():
    server = requested()
    server.accept((0x09,))
    out = server.data_to_send()
    assert out[:16] == REPLY_HEADER_186
    assert out[16:20] == u32(0)
    assert out[20:182].startswith(DER_PREFIX_1024)
    assert out[182:] == MAIN_REPLY_CAPS


def test_server_common_caps_are_0x0b():
    assert SERVER_COMMON_CAPS == (0x0B,)


def test_server_generates_a_fresh_rsa_1024_key_per_link():
    keys = []
    for _ in range(2):
        server = ServerLink(0.0)
        server.receive_data(MAIN_LINK, 0.0)
        drain(server)
        server.accept()
        keys.append(server.data_to_send()[20:182])
    assert keys[0] != keys[1]
    assert all(serialization.load_der_public_key(k).key_size == 1024 for k in keys)


def test_accept_refuses_a_key_that_is_not_162_bytes_of_der():
    small_exponent = rsa.generate_private_key(public_exponent=3, key_size=1024)
    server = ServerLink(0.0, key_factory=lambda: small_exponent)
    server.receive_data(MAIN_LINK, 0.0)
    drain(server)
    with pytest.raises(LocalProtocolError):
        server.accept()


# --- full handshake -----------------------------------------------------------------------------


def feed(machine, data: bytes, cuts: list[int], receive) -> tuple[list, bytes]:
    """Feed ``data`` in pieces; return the events and the bytes left over once established."""
    events, rest = [], b""
    for piece in pieces(data, cuts):
        if machine.state is LinkState.ESTABLISHED:
            rest += piece
            continue
        receive(piece)
        events += drain(machine)
    return events, rest


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.lists(st.integers(0, 400), max_size=6), min_size=4, max_size=4))
def test_full_handshake_with_any_byte_split(cuts):
    client = ClientLink(0, ChannelType.MAIN, 0, password="secret", channel_caps=(0x0F,))
    server = ServerLink(0.0, password="secret", key_factory=key_a)

    def to_server(data: bytes) -> None:
        server.receive_data(data, 1.0)

    events, _ = feed(server, client.data_to_send(), cuts[0], to_server)
    assert events == [LinkRequested(0, ChannelType.MAIN, 0, (0x09,), (0x0F,))]
    server.accept((0x09,))
    assert feed(client, server.data_to_send(), cuts[1], client.receive_data) == ([], b"")

    (server_done,), rest = feed(server, client.data_to_send() + b"MAIN-INIT?", cuts[2], to_server)
    assert server_done.trailing + rest == b"MAIN-INIT?"
    expected = LinkEstablished(0, 1, 0, (0x09,), (0x0F,), True, True, server_done.trailing)
    assert server_done == expected

    to_client = client.receive_data
    (client_done,), rest = feed(client, server.data_to_send() + b"\x67\x00", cuts[3], to_client)
    assert client_done.trailing + rest == b"\x67\x00"
    expected = LinkEstablished(0, 1, 0, (0x0B,), (0x09,), True, True, client_done.trailing)
    assert client_done == expected


def test_header_modes_follow_each_sides_mini_header_bit():
    client = ClientLink(0, ChannelType.MAIN, 0, common_caps=(0x01,))
    server = ServerLink(0.0, key_factory=key_a)
    server.receive_data(client.data_to_send(), 0.0)
    drain(server)
    server.accept()
    client.receive_data(server.data_to_send())
    drain(client)
    server.receive_data(client.data_to_send(), 0.0)
    (server_done,) = drain(server)
    client.receive_data(server.data_to_send())
    (client_done,) = drain(client)
    assert (server_done.send_mini_header, server_done.expect_mini_header) == (False, True)
    assert (client_done.send_mini_header, client_done.expect_mini_header) == (True, False)


def test_trailing_bytes_after_ticket_are_handed_over():
    server = accepted()
    server.receive_data(u32(1) + encrypt(b"\0") + b"framed", 0.0)
    (done,) = drain(server)
    assert done.trailing == b"framed"
    assert server.data_to_send() == u32(0)


def test_bytes_after_establishment_belong_to_the_channel():
    server = accepted()
    send_ticket(server, b"\0")
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more", 0.0)


# --- tickets (1.6) ------------------------------------------------------------------------------


def test_correct_password_is_accepted():
    server = accepted(password="secret")
    assert kinds(send_ticket(server, b"secret\0")) == [LinkEstablished]
    assert server.data_to_send() == u32(0)


def test_password_matches_without_trailing_nul():
    server = accepted(password="secret")
    assert kinds(send_ticket(server, b"secret")) == [LinkEstablished]


def test_password_compares_as_c_string_up_to_first_nul():
    server = accepted(password="secret")
    assert kinds(send_ticket(server, b"secret\0junk")) == [LinkEstablished]


def test_wrong_password_is_permission_denied():
    server = accepted(password="secret")
    server.receive_data(u32(1) + encrypt(b"guess\0"), 0.0)
    assert failure(server, LinkError).code == LinkErr.PERMISSION_DENIED
    assert server.data_to_send() == u32(LinkErr.PERMISSION_DENIED)


def test_password_prefix_is_denied():
    server = accepted(password="secret")
    server.receive_data(u32(1) + encrypt(b"secre\0"), 0.0)
    assert failure(server, LinkError).code == LinkErr.PERMISSION_DENIED


def test_empty_configured_password_denies_everyone():
    server = accepted(password="")
    server.receive_data(u32(1) + encrypt(b"\0"), 0.0)
    assert failure(server, LinkError).code == LinkErr.PERMISSION_DENIED


def test_password_is_valid_until_its_expiry():
    assert send_ticket(accepted(password="s", password_expiry=50.0), b"s\0", now=50.0)


def test_expired_password_is_denied():
    server = accepted(password="s", password_expiry=50.0)
    server.receive_data(u32(1) + encrypt(b"s\0"), 50.5)
    assert failure(server, LinkError).code == LinkErr.PERMISSION_DENIED


@pytest.mark.parametrize(
    "plaintext",
    [b"\0", b"anything\0", b"", bytes(range(1, 80))],
    ids=["nul", "text", "empty", "79-bytes"],
)
def test_disabled_ticketing_accepts_any_decryptable_ticket(plaintext):
    assert kinds(send_ticket(accepted(), plaintext)) == [LinkEstablished]


def test_undecryptable_ticket_is_denied_even_with_ticketing_disabled():
    server = accepted()
    server.receive_data(u32(1) + bytes(128), 0.0)
    assert failure(server, LinkError).code == LinkErr.PERMISSION_DENIED
    assert server.data_to_send() == u32(LinkErr.PERMISSION_DENIED)


def test_replayed_ticket_from_another_link_is_denied():
    client = ClientLink(0, ChannelType.MAIN, 0, password="secret")
    first = requested(client.data_to_send(), password="secret")
    first.accept()
    client.receive_data(first.data_to_send())
    drain(client)
    recorded = client.data_to_send()
    first.receive_data(recorded, 0.0)
    assert kinds(drain(first)) == [LinkEstablished]

    replay = ServerLink(0.0, password="secret", key_factory=key_b)
    replay.receive_data(ClientLink(0, ChannelType.MAIN, 0).data_to_send(), 0.0)
    drain(replay)
    replay.accept()
    replay.data_to_send()
    replay.receive_data(recorded, 0.0)
    assert failure(replay, LinkError).code == LinkErr.PERMISSION_DENIED


# --- auth mechanism (1.5) -----------------------------------------------------------------------


def test_auth_mechanism_sasl_is_invalid_data():
    server = accepted()
    server.receive_data(u32(2), 0.0)
    assert failure(server).link_error == LinkErr.INVALID_DATA
    assert server.data_to_send() == error_reply(LinkErr.INVALID_DATA)


def test_unknown_auth_mechanism_is_invalid_data():
    server = accepted()
    server.receive_data(u32(7), 0.0)
    assert failure(server).link_error == LinkErr.INVALID_DATA


def test_ticket_follows_reply_directly_without_client_auth_selection():
    mess = SpiceLinkMess(0, ChannelType.MAIN, 0, (0x08,), ()).encode()
    server = accepted(link(mess))
    assert kinds(send_ticket(server, b"\0", word=b"")) == [LinkEstablished]


# --- header and LinkMess checks (1.1, 1.2) ------------------------------------------------------


def assert_error_reply(data: bytes, code: LinkErr) -> None:
    server = ServerLink(0.0, key_factory=key_a)
    server.receive_data(data, 0.0)
    assert failure(server).link_error == code
    assert server.data_to_send() == error_reply(code)


def test_bad_magic_is_invalid_magic_after_four_bytes():
    assert_error_reply(b"GET ", LinkErr.INVALID_MAGIC)


def test_major_version_mismatch_is_version_mismatch():
    assert_error_reply(link(MAIN_LINK[16:], major=1), LinkErr.VERSION_MISMATCH)


def test_major_version_zero_is_closed_without_reply():
    server = ServerLink(0.0)
    server.receive_data(link(MAIN_LINK[16:], major=0), 0.0)
    assert failure(server).link_error is None
    assert server.data_to_send() == b""


def test_minor_version_is_not_checked():
    requested(link(MAIN_LINK[16:], minor=77))


def test_link_size_below_18_is_invalid_data():
    assert_error_reply(link(b"", size=17), LinkErr.INVALID_DATA)


def test_link_size_above_4096_is_invalid_data():
    assert_error_reply(link(b"", size=4097), LinkErr.INVALID_DATA)


def test_link_size_4096_is_accepted():
    requested(link(raw_mess(0, 0, 0) + bytes(4096 - 18)))


@pytest.mark.parametrize("ncommon, nchannel", [(1025, 0), (0, 1025)])
def test_more_than_1024_caps_words_is_invalid_data(ncommon, nchannel):
    assert_error_reply(link(raw_mess(ncommon, nchannel, 18) + bytes(4000)), LinkErr.INVALID_DATA)


def test_caps_offset_below_18_is_invalid_data():
    assert_error_reply(link(raw_mess(1, 0, 17, u32(9))), LinkErr.INVALID_DATA)


def test_caps_beyond_link_size_are_invalid_data():
    assert_error_reply(link(raw_mess(1, 1, 18, u32(9))), LinkErr.INVALID_DATA)


def test_caps_offset_is_ignored_without_caps():
    assert requested(link(raw_mess(0, 0, 0xFFFFFFFF))).state is LinkState.VALIDATING


def test_caps_offset_past_18_is_honoured():
    server = ServerLink(0.0)
    server.receive_data(link(raw_mess(1, 1, 22, bytes(4) + u32(9) + u32(0x0F))), 0.0)
    assert drain(server) == [LinkRequested(0, 1, 0, (0x09,), (0x0F,))]


# --- owner answers (1.4, 1.8) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "code", [LinkErr.BAD_CONNECTION_ID, LinkErr.CHANNEL_NOT_AVAILABLE, LinkErr.NEED_SECURED]
)
def test_reject_sends_error_reply_and_closes(code):
    server = requested(PORT_LINK)
    server.reject(code)
    assert server.data_to_send() == error_reply(code)
    assert server.state is LinkState.CLOSED


def test_close_without_reply_sends_nothing():
    server = requested(PORT_LINK)
    server.close_without_reply()
    assert server.data_to_send() == b""
    assert server.state is LinkState.CLOSED


def test_answers_outside_a_link_request_are_local_errors():
    server = ServerLink(0.0)
    for answer in (server.accept, server.close_without_reply, lambda: server.reject(LinkErr.ERROR)):
        with pytest.raises(LocalProtocolError):
            answer()


def test_bytes_before_the_answer_wait_for_it():
    server = requested(MAIN_LINK + u32(1) + encrypt(b"\0"))
    server.accept()
    assert kinds(drain(server)) == [LinkEstablished]


def test_closed_link_ignores_further_bytes():
    server = ServerLink(0.0)
    server.receive_data(b"XXXX", 0.0)
    failure(server)
    server.receive_data(MAIN_LINK, 0.0)
    assert drain(server) == []


# --- handshake timeout --------------------------------------------------------------------------


def test_handshake_times_out_at_deadline():
    server = ServerLink(100.0, timeout=10.0)
    assert server.get_timer() == 110.0
    server.handle_timer(109.9)
    with pytest.raises(RemoteProtocolError):
        server.handle_timer(110.0)
    assert server.state is LinkState.CLOSED
    assert server.data_to_send() == b""


def test_timer_stops_once_established():
    server = accepted()
    send_ticket(server, b"\0")
    assert server.get_timer() is None
    server.handle_timer(1e9)


# --- client (1.4-1.7 from the client's side) ----------------------------------------------------


def reply(error=LinkErr.OK, pub_key=None, common=SERVER_COMMON_CAPS, channel=(0x09,)) -> bytes:
    pub_key = der(KEYS[0]) if pub_key is None else pub_key
    body = SpiceLinkReply(error, pub_key, common, channel).encode()
    return SpiceLinkHeader(size=len(body)).encode() + body


REPLY = reply()


def client_after(data: bytes, **kwargs) -> ClientLink:
    client = ClientLink(0, ChannelType.MAIN, 0, **kwargs)
    client.data_to_send()
    client.receive_data(data)
    return client


def test_client_sends_auth_word_and_ticket_back_to_back():
    client = client_after(reply())
    assert drain(client) == []
    out = client.data_to_send()
    assert out[:4] == u32(1) and len(out) == 132


def test_client_omits_auth_word_without_server_auth_selection():
    client = client_after(reply(common=(0x0A,)))
    drain(client)
    assert len(client.data_to_send()) == 128


def test_client_ticket_is_password_plus_nul():
    client = client_after(reply(), password="secret")
    drain(client)
    assert KEYS[0].decrypt(client.data_to_send()[4:], OAEP) == b"secret\0"


def test_client_ticket_without_password_is_a_single_nul():
    client = client_after(reply())
    drain(client)
    assert KEYS[0].decrypt(client.data_to_send()[4:], OAEP) == b"\0"


def test_client_refuses_password_longer_than_60():
    ClientLink(0, 1, 0, password="x" * 60)
    with pytest.raises(LocalProtocolError):
        ClientLink(0, 1, 0, password="x" * 61)


def test_client_requires_auth_spice():
    error = failure(client_after(reply(common=(0x09,))))
    assert "No compatible AUTH mechanism" in str(error)


def test_client_rejects_bad_reply_magic():
    failure(client_after(b"HTTP" + reply()[4:]))


def test_client_rejects_other_major_version():
    failure(client_after(SpiceLinkHeader(major_version=1, size=178).encode()))


def test_client_rejects_reply_size_below_178():
    failure(client_after(SpiceLinkHeader(size=177).encode()))


@pytest.mark.parametrize(
    "code", [LinkErr.NEED_SECURED, LinkErr.BAD_CONNECTION_ID, LinkErr.INVALID_DATA]
)
def test_client_error_reply_is_link_error_with_its_code(code):
    assert failure(client_after(error_reply(code)), LinkError).code == code


def test_client_rejects_invalid_public_key():
    failure(client_after(reply(pub_key=bytes(162))))


def test_client_nonzero_link_result_is_link_error():
    client = client_after(reply() + u32(LinkErr.PERMISSION_DENIED))
    assert failure(client, LinkError).code == LinkErr.PERMISSION_DENIED


def test_client_success_carries_server_caps_and_trailing_bytes():
    (done,) = drain(client_after(reply() + u32(0) + b"\x67\x00"))
    assert (done.common_caps, done.channel_caps, done.trailing) == ((0x0B,), (0x09,), b"\x67\x00")


# --- arbitrary input ----------------------------------------------------------------------------

# Random tails after ever longer valid prefixes, so that every stage sees garbage.
noise = st.one_of(
    st.binary(max_size=400),
    *(
        st.binary(max_size=400).map(prefix.__add__)
        for prefix in (MAIN_LINK[:4], MAIN_LINK[:12], MAIN_LINK[:16], MAIN_LINK, MAIN_LINK + u32(1))
    ),
    st.binary(min_size=128, max_size=200).map((MAIN_LINK + u32(1)).__add__),
)


@settings(deadline=None)
@given(data=noise, cuts=st.lists(st.integers(0, 600), max_size=8))
def test_random_bytes_to_server_only_reach_defined_error_paths(data, cuts):
    server = ServerLink(0.0, password="pw", key_factory=key_a)
    try:
        for piece in pieces(data, cuts):
            server.receive_data(piece, 0.0)
            for event in drain(server):
                assert isinstance(event, LinkRequested)
                server.accept()
                server.data_to_send()
    except RemoteProtocolError as exc:
        expected = b"" if exc.link_error is None else error_reply(exc.link_error)
        assert server.data_to_send() == expected
    except LinkError as exc:
        assert exc.code == LinkErr.PERMISSION_DENIED
        assert server.data_to_send() == u32(LinkErr.PERMISSION_DENIED)
    else:
        assert server.state not in (LinkState.CLOSED, LinkState.ESTABLISHED)
        return
    assert server.state is LinkState.CLOSED


@settings(deadline=None)
@given(data=st.one_of(st.binary(max_size=400), st.binary(max_size=400).map(REPLY[:16].__add__)))
def test_random_bytes_to_client_only_reach_defined_error_paths(data):
    client = client_after(b"")
    try:
        client.receive_data(data)
        drain(client)
    except (RemoteProtocolError, LinkError):
        assert client.state is LinkState.CLOSED


def test_client_link_deadline_is_kept_by_the_machine():
    client = ClientLink(0, ChannelType.MAIN, 0, now=50.0, timeout=5.0)
    assert client.get_timer() == 55.0
    client.handle_timer(54.9)
    assert client.state is not LinkState.CLOSED
    with pytest.raises(RemoteProtocolError):
        client.handle_timer(55.0)
    assert client.state is LinkState.CLOSED and client.get_timer() is None


def test_client_link_without_a_deadline_never_times_out():
    client = ClientLink(0, ChannelType.MAIN, 0)
    assert client.get_timer() is None
    client.handle_timer(1e12)
