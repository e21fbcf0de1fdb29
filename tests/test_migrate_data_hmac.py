"""Authenticated migrate data (issues 9 and 13): s1 appends a MAC to every MIGRATE_DATA it sends
through the client, with a key it gave s2 in the announcement; s2 restores nothing that fails it.
Version 1 is HMAC-SHA256, version 2 a Poly1305 and version 3 an AES-GMAC, each of those two under
a one-time key derived per (session, channel); the two servers agree on one, so a pair of which one
speaks less still migrates.

A client that rewrites MIGRATE_DATA on the way (queued bytes, serials, main's body) is caught under
every version: the session fails on s2 with that reason and s1 takes it back with every byte it held.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import struct
import threading
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace

import gevent
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305
from gevent import socket
from gevent.server import StreamServer

from spicewire.control.client import ControlClient
from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.protocol import state_auth
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import ChannelType, Msgc
from spicewire.server.migration import source as source_module
from spicewire.server.migration.common import channel_of
from spicewire.server.migration.destination import Announcement, SessionDestination
from spicewire.server.migration.source import gathered_segments

from .serverkit import TIMEOUT, wait_until
from .test_migration import connect, drain_sink, echo_ok, fill_paused_sink, only_entry
from .test_precopy import MIB, making_pnodes

KEY = bytes(range(32))
pnodes = pytest.fixture(making_pnodes, name="pnodes")
SINK_CHANNEL = (ChannelType.PORT, 1)


pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


def other_version(version: int) -> int:
    """Another version than ``version`` (the next one, round)."""
    versions = state_auth.VERSIONS
    return versions[(versions.index(version) + 1) % len(versions)]


def keys(version: int, secret: bytes = KEY) -> tuple[state_auth.MigrationKey, state_auth.MigrationKey]:
    """s1's key and s2's for one migration: the same secret, each handing out a channel's MAC once."""
    return state_auth.MigrationKey(secret, version), state_auth.MigrationKey(secret, version)


@pytest.fixture
def macs_made(monkeypatch) -> list[int]:
    """The version of every MAC either side made, in order."""
    versions: list[int] = []
    real = state_auth.MigrationKey.mac

    def recorded(self, session_id, channel):
        mac = real(self, session_id, channel)
        versions.append(mac.version)
        return mac

    monkeypatch.setattr(state_auth.MigrationKey, "mac", recorded)
    return versions


@pytest.fixture(params=state_auth.VERSIONS, ids=[f"v{v}" for v in state_auth.VERSIONS])
def auth_version(request, monkeypatch, macs_made):
    """The state_auth version the pair speaks: below the newest, an s2 that speaks no more (s1
    offers the newest). At the end, every MAC either side made was of that version."""
    if request.param < state_auth.VERSION:
        real = state_auth.negotiate
        monkeypatch.setattr(state_auth, "negotiate", lambda offered: min(real(offered), request.param))
    yield request.param
    assert macs_made and set(macs_made) == {request.param}, macs_made


# --- the trailer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", state_auth.VERSIONS)
def test_a_sealed_body_opens_to_itself(version):
    body = os.urandom(1000)
    s1_key, s2_key = keys(version)
    data = body + state_auth.seal(s1_key, 7, SINK_CHANNEL, body)
    assert len(data) == len(body) + state_auth.trailer_size(version)
    assert data[len(body):len(body) + 4] == state_auth.TAGS[version]
    assert bytes(state_auth.unseal(s2_key, 7, SINK_CHANNEL, data)) == body


def test_each_version_s_trailer_is_the_documented_mac():
    """Each trailer as the module documents it, computed here with other APIs than the streamed
    ones the servers use: HMAC-SHA256 over context and body; Poly1305 (one-shot), and the tag of an
    AES-256-GCM encryption of nothing with the body as associated data and a zero nonce, each under
    HMAC-SHA256(secret, tag | context)."""
    body, session, channel = os.urandom(3000), 0x01020304, (10, 1)
    context = struct.pack("<IBB", session, *channel)

    def one_time(tag: bytes) -> bytes:
        return hmac.digest(KEY, tag + context, "sha256")

    expected = {
        1: b"SWMA" + hmac.digest(KEY, b"SWMC" + context + body, "sha256"),
        2: b"SWM2" + Poly1305.generate_tag(one_time(b"SWM2"), body),
        3: b"SWM3" + AESGCM(one_time(b"SWM3")).encrypt(bytes(12), b"", body),
    }
    assert set(expected) == set(state_auth.VERSIONS)
    for version, trailer in expected.items():
        assert state_auth.seal(keys(version)[0], session, channel, body) == trailer, version


@pytest.mark.parametrize("version", state_auth.VERSIONS)
@pytest.mark.parametrize("change", ["body byte", "tag byte", "trailer cut", "no trailer", "other session",
                                    "other channel", "other key", "other version"])
def test_a_body_that_does_not_match_its_tag_is_refused(change, version):
    body = bytearray(os.urandom(1000))
    data = bytearray(body + state_auth.seal(keys(version)[0], 7, SINK_CHANNEL, bytes(body)))
    key, session, channel = keys(version)[1], 7, SINK_CHANNEL
    if change == "body byte":
        data[500] ^= 1
    elif change == "tag byte":
        data[-1] ^= 1
    elif change == "trailer cut":
        data = data[:-1]
    elif change == "no trailer":
        data = body
    elif change == "other session":
        session = 8
    elif change == "other channel":
        channel = (ChannelType.PORT, 2)
    elif change == "other key":
        key = keys(version, bytes(32))[1]
    else:
        key = keys(other_version(version))[1]
    with pytest.raises(state_auth.StateAuthError):
        state_auth.unseal(key, session, channel, bytes(data))


@pytest.mark.parametrize("version", state_auth.VERSIONS)
def test_the_streamed_mac_is_the_mac_of_the_whole_body(version):
    """Computed batch by batch as the queue views go out (no second pass), it is the tag of the
    body. The batches are fed from a worker thread under version 1 (HMAC-SHA256 lets go of the GIL),
    on the hub right after the socket's copy under versions 2 and 3 (from the cache)."""
    pending = [os.urandom(n) for n in (3 * MIB, 5, 9 * MIB + 1)]
    writer = mig.PortMigrateDataWriter(mig.PortMigrateData(serial=5, pending=pending))
    whole = mig.build_port_migrate_data(mig.PortMigrateData(serial=5, pending=pending)).tobytes()
    s1_key, s2_key = keys(version)
    fed_from: set[int] = set()  # the threads that fed the segments (the header is fed on the hub)

    def stream():
        mac = s1_key.mac(9, SINK_CHANNEL)
        real = mac.update

        def update(piece):
            if len(memoryview(piece)) > len(writer.header):
                fed_from.add(threading.get_ident())
            real(piece)

        mac.update = update  # type: ignore[method-assign]
        pieces = gathered_segments(writer, mac=mac)
        return b"".join(b"".join(map(bytes, p)) if isinstance(p, list) else bytes(p) for p in pieces)

    sent = gevent.spawn(stream).get()
    assert sent[:-state_auth.trailer_size(version)] == whole
    assert bytes(state_auth.unseal(s2_key, 9, SINK_CHANNEL, sent)) == whole
    assert fed_from and (threading.get_ident() in fed_from) == (version != 1)


# --- one key, one body per channel ---------------------------------------------------------------


@pytest.mark.parametrize("version", state_auth.VERSIONS)
def test_a_key_tags_each_sessions_channel_once(version):
    """A one-time key that tagged two bodies gives away enough to forge a third: s1's key refuses
    a second body for a (session, channel) before tagging it; other pairs each get theirs once."""
    s1_key = keys(version)[0]
    state_auth.seal(s1_key, 7, SINK_CHANNEL, b"first")
    with pytest.raises(state_auth.KeyReuse):
        state_auth.seal(s1_key, 7, SINK_CHANNEL, b"second")
    with pytest.raises(state_auth.KeyReuse):
        s1_key.mac(7, (int(ChannelType.PORT), 1))  # the same pair, spelled with plain ints
    state_auth.seal(s1_key, 7, (ChannelType.PORT, 2), b"other channel")
    state_auth.seal(s1_key, 8, SINK_CHANNEL, b"other session")


@pytest.mark.parametrize("version", state_auth.VERSIONS)
def test_a_prepared_mac_is_the_pairs_one_use(version):
    """prepare makes a pair's MAC ahead; mac hands that one out, once, and the body it tags opens
    under s2's key. Preparing again, or after the MAC was taken, makes none."""
    s1_key, s2_key = keys(version)
    s1_key.prepare(7, SINK_CHANNEL)
    s1_key.prepare(7, SINK_CHANNEL)
    mac = s1_key.mac(7, SINK_CHANNEL)
    mac.update(b"body")
    assert bytes(state_auth.unseal(s2_key, 7, SINK_CHANNEL, b"body" + mac.trailer())) == b"body"
    s1_key.prepare(7, SINK_CHANNEL)
    with pytest.raises(state_auth.KeyReuse):
        s1_key.mac(7, SINK_CHANNEL)


@pytest.mark.parametrize("version", [2, 3])
def test_each_pair_gets_a_key_of_its_own(version):
    """The same body under another session, channel or secret gets another tag: the one-time
    key is derived from all three."""
    body = b"the same body"
    tags = {state_auth.seal(state_auth.MigrationKey(secret, version), session, channel, body)
            for secret, session, channel in [(KEY, 7, SINK_CHANNEL), (KEY, 8, SINK_CHANNEL),
                                             (KEY, 7, (ChannelType.PORT, 2)), (bytes(32), 7, SINK_CHANNEL)]}
    assert len(tags) == 4


def test_s2_refuses_a_second_migrate_data_for_a_channel(monkeypatch):
    """The first body is checked and opened; a second one for the channel (even the same bytes
    again) fails the session, nothing restored from it."""
    s1_key, s2_key = keys(2)
    failed: list[str] = []
    arriving = SessionDestination(SimpleNamespace(announcements={7: SimpleNamespace(state_key=s2_key)}),
                                  SimpleNamespace(id=7))  # type: ignore[arg-type]
    monkeypatch.setattr(arriving, "_fail", failed.append)
    body = os.urandom(100)
    data = body + state_auth.seal(s1_key, 7, mig.MAIN, body)
    opened = arriving._authentic(mig.MAIN, m.MsgcMigrateData(data))
    assert opened is not None and bytes(opened.data) == body and not failed
    assert arriving._authentic(mig.MAIN, m.MsgcMigrateData(data)) is None
    assert len(failed) == 1 and "failed authentication" in failed[0] and "already" in failed[0]


@pytest.mark.parametrize("claimed", [False, True])
def test_a_large_body_lands_hashed_unless_its_channel_had_its_mac_already(claimed):
    """s2 prepares a landing MAC for a large body; for a channel whose MAC this key handed out
    already, the body still gets its buffer and no MAC (_authentic then refuses it whole)."""
    ann = Announcement(0x1A4D0000, [], expires=0.0, migration_id="m")
    ann.state_key = keys(2)[1]
    session = SimpleNamespace(id=ann.session_id, migration=None)
    arriving = SessionDestination(SimpleNamespace(), session)  # type: ignore[arg-type]
    session.migration = arriving
    handler = SimpleNamespace(port=SimpleNamespace(channel_id=3), channel=SimpleNamespace(bulk_progress=lambda: 0),
                              channel_type=ChannelType.PORT, on_bulk=None)
    channel = channel_of(handler)  # type: ignore[arg-type]
    if claimed:
        ann.state_key.mac(ann.session_id, channel)
    buffer = arriving.landing_buffer(handler, ann, 4096)  # type: ignore[arg-type]
    assert len(buffer) == 4096
    assert (channel in arriving.landing) != claimed and (handler.on_bulk is None) == claimed


# --- which version a pair speaks -----------------------------------------------------------------


@pytest.mark.parametrize("offered, checked", [(None, 1), (1, 1), (2, 2), (3, 3), (4, 3), (0, 1), (True, 1),
                                              ("2", 1)])
def test_s2_checks_the_highest_version_both_speak(offered, checked):
    """An older s1 offers nothing (it seals with HMAC-SHA256); a newer one than s2 gets s2's."""
    assert state_auth.negotiate(offered) == checked


@pytest.mark.parametrize("answered, version", [(None, None), (1, 1), (2, 2), (3, 3), (4, None), ("2", None),
                                               (True, None)])
def test_s1_seals_with_the_version_s2_answered(answered, version):
    key = state_auth.MigrationKey.fresh()
    assert key.agree(answered) == (version is not None) and key.version == version
    if version is not None:  # settled once
        assert key.agree(other_version(version)) and key.version == version


def rewrite_announcements(monkeypatch, rewrite: Callable[[dict], dict]) -> None:
    """s1's announcements reach s2 as ``rewrite`` makes them (what an older s1 would send)."""
    real = ControlClient.post_json

    def post_json(self, path, body, **kw):
        return real(self, path, rewrite(body) if path == "/migration/announce" else body, **kw)

    monkeypatch.setattr(ControlClient, "post_json", post_json)


def without(body: dict, *keys: str) -> dict:
    return {k: v for k, v in body.items() if k not in keys}


@pytest.mark.parametrize("older, version", [
    ("none", state_auth.VERSION),
    ("s2 speaks 1", 1), ("s1 offers none", 1),  # spicewire from before state_auth 2
    ("s2 speaks 2", 2), ("s1 offers 2", 2),  # from before 3
    ("s2 takes no key", None),  # spicewire from before the MAC: it answers no version, and checks none
])
def test_a_pair_with_an_older_side_migrates_with_the_highest_version_both_speak(pnodes, monkeypatch, macs_made,
                                                                               older, version):
    """s2 answering an older version than s1 offers, or s1 offering an older one (an s1 from before
    state_auth sends none, and seals with HMAC-SHA256): both sides use the highest version both
    speak, and the session migrates intact. An s2 that takes no key gets no MAC. The report names
    the version."""
    if version is None:
        rewrite_announcements(monkeypatch, lambda body: without(body, "state_key", "state_auth"))
    elif older.startswith("s2"):
        real_negotiate = state_auth.negotiate
        monkeypatch.setattr(state_auth, "negotiate", lambda offered: min(real_negotiate(offered), version))
    elif older.startswith("s1"):
        offer = {"state_auth": version} if version > 1 else {}
        rewrite_announcements(monkeypatch, lambda body: {**without(body, "state_auth"), **offer})
    s1, s2 = pnodes(False, False)
    session = connect(s1)
    size = 2 * MIB
    digest = fill_paused_sink(s1, session, size)
    report = s1.migrate_to(s2)
    assert only_entry(report)["migrated"] and report["state_auth"] == version
    drain_sink(s2, session.session_id, size, digest)
    assert set(macs_made) == (set() if version is None else {version}), macs_made
    session.close()


# --- a client that rewrites MIGRATE_DATA ---------------------------------------------------------


class TamperProxy:
    """Between the client and s2: passes everything, except that on each client->s2 connection the
    byte at offset ``at`` is flipped (None: nothing is)."""

    def __init__(self, target, at: int | None) -> None:
        self.target, self.at, self.flipped = target, at, 0
        self.broken: list[OSError] = []
        self._server = StreamServer(("127.0.0.1", 0), self._handle)
        self._server.start()
        self.address = ("127.0.0.1", self._server.server_port)

    def _handle(self, client, _addr) -> None:
        upstream = socket.create_connection(self.target)
        back = gevent.spawn(self._pump, upstream, client, None)
        try:
            self._pump(client, upstream, self.at)
        finally:
            back.join(timeout=5)
            upstream.close()

    def _pump(self, src, dst, at: int | None) -> None:
        seen = 0
        try:
            while data := src.recv(1 << 16):
                if at is not None and seen <= at < seen + len(data):
                    data = bytearray(data)
                    data[at - seen] ^= 0x40
                    self.flipped += 1
                seen += len(data)
                dst.sendall(data)
        except OSError as err:  # a side that closed or reset ends this direction
            self.broken.append(err)
        with contextlib.suppress(OSError):  # the other side may be gone already
            dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._server.stop(timeout=0)


class BodyTamperProxy(TamperProxy):
    """A TamperProxy that flips one byte of a large MIGRATE_DATA body the client relays: the byte
    ``where(size)`` of it (trailer included), found after the header the client framed it with
    (``headers``: header -> body size, recorded from its ChannelConnection). With ``hold``, the
    body's last HELD_TAIL bytes wait until ``hold()`` returns."""

    def __init__(self, target, where, headers: dict[bytes, int], hold=None) -> None:
        self.where, self.headers, self.hold = where, headers, hold
        super().__init__(target, -1)  # any int: _pump's client->s2 direction is the one looked at

    def _pump(self, src, dst, at: int | None) -> None:
        if at is None:
            super()._pump(src, dst, None)
            return
        seen = bytearray()  # this connection's stream so far: a few MiB in these tests
        body = None  # (offset in seen, size) once the header is seen
        held = self.hold is None
        try:
            while data := src.recv(1 << 16):
                start = len(seen)
                seen += data
                if body is None:
                    body = self._locate(seen)
                if body is None:
                    dst.sendall(seen[start:])
                    continue
                flip = body[0] + self.where(body[1])
                if start <= flip < len(seen):
                    seen[flip] ^= 0x40
                    self.flipped += 1
                tail = body[0] + body[1] - HELD_TAIL
                if not held and len(seen) > tail:
                    cut = max(start, tail)
                    dst.sendall(seen[start:cut])
                    self.hold()
                    held, start = True, cut
                dst.sendall(seen[start:])
        except OSError as err:
            self.broken.append(err)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _locate(self, seen: bytearray) -> tuple[int, int] | None:
        for header, size in self.headers.items():
            found = seen.find(header)
            if found >= 0:
                return found + len(header), size
        return None


@pytest.fixture
def migrate_data_headers(monkeypatch):
    """The headers of the large MIGRATE_DATA bodies clients stream in this test -> body size."""
    headers: dict[bytes, int] = {}
    real = ChannelConnection.send_streamed

    def recording(self, msg_type, size):
        framed = real(self, msg_type, size)
        if self.side is Side.CLIENT and msg_type == Msgc.MIGRATE_DATA and size >= MIB:
            headers[framed[-(6 if self.writer.mini else 18):]] = size
        return framed

    monkeypatch.setattr(ChannelConnection, "send_streamed", recording)
    return headers


def assert_taken_back(s1, s2, session, entry, size: int, digest: str) -> None:
    assert not entry["migrated"] and entry["error"].startswith("rolled back"), entry
    assert "failed authentication" in entry["error"], entry
    assert not s2.spice.migration.announcements
    wait_until(lambda: session.session_id not in s2.spice.sessions, 10, what="s2 to drop the half session")
    drain_sink(s1, session.session_id, size, digest)
    echo_ok(session)


@pytest.mark.parametrize("at", [None, 1 * MIB])
def test_queued_bytes_rewritten_by_a_relay_are_caught_and_the_session_stays_on_s1(pnodes, auth_version, at):
    """Without pre-copy the sink's 2 MiB travel in MIGRATE_DATA: the relay flips one of them."""
    s1, s2 = pnodes(False, False)
    session = connect(s1)
    size = 2 * MIB
    digest = fill_paused_sink(s1, session, size)
    proxy = TamperProxy(s2.address, at)
    try:
        entry = only_entry(s1.migrate_to(s2, to=proxy.address))
    finally:
        proxy.stop()
    if at is None:  # the relay itself passes everything
        assert entry["migrated"], entry
        drain_sink(s2, session.session_id, size, digest)
    else:
        assert proxy.flipped == 1
        assert_taken_back(s1, s2, session, entry, size, digest)
    session.close()


@pytest.mark.parametrize("channel", ["main", "sink"])
def test_a_rewritten_serial_or_main_body_is_caught(pnodes, monkeypatch, auth_version, channel):
    """The client changes a small body (main's MNMD, the sink's state record) after s1 sealed it."""
    s1, s2 = pnodes(True, True)
    session = connect(s1)
    size = 256 << 10
    digest = fill_paused_sink(s1, session, size)
    real = source_module.SessionSource._sealed
    target = mig.MAIN if channel == "main" else SINK_CHANNEL

    def rewritten(self, which, *pieces):
        sealed = bytearray(real(self, which, *pieces))
        if which == target:
            sealed[16] ^= 1  # MNMD: the agent's token count; SWPD: inside the state record's serials
        return bytes(sealed)

    monkeypatch.setattr(source_module.SessionSource, "_sealed", rewritten)
    entry = only_entry(s1.migrate_to(s2))
    monkeypatch.setattr(source_module.SessionSource, "_sealed", real)
    assert_taken_back(s1, s2, session, entry, size, digest)
    session.close()


def test_the_same_session_migrates_once_nothing_is_rewritten(pnodes):
    """The check is no obstacle to honest bodies, back and forth, in both modes of the sink."""
    s1, s2 = pnodes(True, True)
    session = connect(s1)
    digest = hashlib.sha256()
    size = 2 * MIB
    fill_paused_sink(s1, session, size, digest=digest)
    for src, dst in ((s1, s2), (s2, s1), (s1, s2)):
        assert only_entry(src.migrate_to(dst))["migrated"]
    drain_sink(s2, session.session_id, size, digest.hexdigest())
    session.close()


LANDED = 12 * MIB  # larger than a few of destination.LANDED_STEP: s2 hashes most of it as it lands
HELD_TAIL = MIB  # what BodyTamperProxy keeps back until s2 has hashed what it received
FLIPS = {  # (body size, trailer size) -> the offset of the byte flipped
    "first body byte": lambda size, trailer: 0,
    "middle": lambda size, trailer: size // 2,
    "last body byte": lambda size, trailer: size - trailer - 1,
    "trailer tag": lambda size, trailer: size - trailer,
    "last trailer byte": lambda size, trailer: size - 1,
}


@pytest.mark.parametrize("size", [64 << 10, LANDED], ids=["one frame", "streamed, landed hashed"])
def test_no_mac_is_made_in_the_downtime(pnodes, monkeypatch, size):
    """A MAC's first setup after a while costs ~150 us (cold caches): s1 makes every channel's
    before the stop, s2 as each channel links. So none is made once the MIGRATEs went out: not
    main's, not a port's, whose body goes in one frame or streamed and lands hashed as it comes."""
    made: list[tuple[tuple[int, int], bool]] = []  # (channel, whether a MIGRATE had gone out)
    migrates: list[tuple[int, int]] = []
    real_new, real_send = state_auth.MigrationKey._new, source_module.SessionSource._send

    def new(self, session_id, channel):  # where a key makes a MAC (prepared ahead, or on demand)
        made.append(((int(channel[0]), int(channel[1])), bool(migrates)))
        return real_new(self, session_id, channel)

    def send(self, channel, msg):
        if isinstance(msg, m.MsgMigrate):
            migrates.append(channel)
        return real_send(self, channel, msg)

    monkeypatch.setattr(state_auth.MigrationKey, "_new", new)
    monkeypatch.setattr(source_module.SessionSource, "_send", send)
    s1, s2 = pnodes(False, False)  # no pre-copy: the whole backlog goes in the sink's MIGRATE_DATA
    session = connect(s1)
    digest = fill_paused_sink(s1, session, size)
    assert only_entry(s1.migrate_to(s2))["migrated"]
    drain_sink(s2, session.session_id, size, digest)
    if size >= LANDED:
        assert s2.spice.sessions[session.session_id].migrations[-1]["hashed_ahead"] > 0
    assert migrates, "no MIGRATE was sent"
    made_late = [channel for channel, late in made if late]
    assert not made_late, f"MACs made in the downtime: {made_late}"
    # Each channel's on both sides, once each.
    made_for = Counter(channel for channel, _ in made)
    assert mig.MAIN in made_for and SINK_CHANNEL in made_for and set(made_for.values()) == {2}, made_for
    session.close()


@pytest.mark.parametrize("where", [None, *FLIPS])
def test_a_large_body_checked_as_it_lands_catches_any_rewritten_byte(pnodes, migrate_data_headers, auth_version,
                                                                      where):
    """s2 computes a large body's HMAC while it is received (so the downtime pays only for the
    tail): a byte flipped anywhere, the body's first bytes (which come with the header, by the
    ordinary reader path), its middle, its last, or the trailer, still fails the session there."""
    s1, s2 = pnodes(False, False)
    session = connect(s1)
    digest = fill_paused_sink(s1, session, LANDED)

    def hashed_ahead_on_s2() -> None:
        """The body's tail waits until s2 has hashed at least half of it (or TIMEOUT passed: the
        hashed_ahead check below then fails): how far a worker thread keeps up with the socket
        depends on the machine's load, what it does with a pause does not."""
        def hashed() -> int:
            s2_session = s2.spice.sessions.get(session.session_id)
            destination = s2_session.migration if s2_session is not None else None
            landing = destination.landing.get(SINK_CHANNEL) if destination is not None else None
            return landing._hashed if landing is not None else 0

        with gevent.Timeout(TIMEOUT, False):
            while hashed() < LANDED // 2:
                gevent.sleep(0.005)

    trailer = state_auth.trailer_size(auth_version)
    flip = (lambda size: FLIPS[where](size, trailer)) if where else (lambda size: -(1 << 40))
    proxy = BodyTamperProxy(s2.address, flip, migrate_data_headers,
                            hold=None if where else hashed_ahead_on_s2)
    try:
        entry = only_entry(s1.migrate_to(s2, to=proxy.address))
    finally:
        proxy.stop()
    assert [size for size in migrate_data_headers.values() if size > LANDED], migrate_data_headers
    if where is None:
        assert entry["migrated"], entry
        assert proxy.flipped == 0
        # Most of the body was hashed before its last byte came.
        assert s2.spice.migration.completed[session.session_id]["hashed_ahead"] >= LANDED // 2
        drain_sink(s2, session.session_id, LANDED, digest)
    else:
        assert proxy.flipped == 1
        assert_taken_back(s1, s2, session, entry, LANDED, digest)
    session.close()
