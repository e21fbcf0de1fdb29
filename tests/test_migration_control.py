"""The server-to-server half of the control API under a caller that is not the source: every call
carries the migration's id, announcements live only as long as their migration, every s1->s2
call is bounded by the requested timeout, and MIGRATE_DATA is bounded by what was announced."""

from __future__ import annotations

import gc
import json
import weakref

import gevent
import gevent.event
import numpy as np
import pytest
from gevent import socket

from spicewire import _codec_layout as layout
from spicewire import codec
from spicewire.client import ClientSession
from spicewire.control.client import ControlClient
from spicewire.errors import MigrationError
from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.protocol.enums import ChannelType, Msgc
from spicewire.protocol.migrate_data import PortMigrateData, PortMigrateDataWriter, build_port_migrate_data
from spicewire.server.migration import destination, orchestrator, pack_device_states
from spicewire.server.migration.common import port_channel
from spicewire.server.migration.destination import migrate_data_limit
from spicewire.server.session import Limits

from .serverkit import PortChannel, read_until_closed, refused_port, wait_until
from .test_migration import (
    ECHO,
    ECHO_ID,
    SINK,
    SINK_ID,
    connect,
    drain_sink,
    echo_ok,
    fill_paused_sink,
    only_entry,
)

MIGRATION, OTHER = "00112233445566ff", "ffeeddccbbaa9900"


@pytest.fixture(autouse=True)
def deadline(request):
    with gevent.Timeout(30, AssertionError(f"{request.node.name} took longer than 30 s")):
        yield


def announce(node, session_id: int, migration: str = MIGRATION, in_flight: int = 0, ttl: float = 30) -> dict:
    return node.api.post_json("/migration/announce", {"migration": migration, "ttl": ttl, "sessions": [
        {"session_id": f"{session_id:08x}",
         "ports": [[ECHO_ID, ECHO, "echo", 0], [SINK_ID, SINK, "sink", in_flight]]}]})


def raw_post(node, path: str, body: bytes | str, content_type: str = "application/json") -> tuple[int, dict]:
    """Like ControlClient, but answers the status and body of any status."""
    data = body.encode() if isinstance(body, str) else body
    try:
        return 200, ControlClient(*node.control_address, token=node.api.token, timeout=20)._request(
            "POST", path, data, content_type)
    except MigrationError as err:
        status = int(str(err).split(": ", 1)[1].split()[0])
        return status, {"error": str(err)}


def sink_state(bytes_in: int, session_id: int) -> bytes:
    from spicewire.devices import SinkDevice

    sink = SinkDevice()
    sink.bytes_in = bytes_in
    port = type("P", (), {"device": sink, "in_flight": 0})()
    fake = type("Saved", (), {"id": session_id, "ports": {SINK_ID: port}})()
    return pack_device_states([fake])


def link_target(s2, session_id: int, migration: str = MIGRATION, in_flight: int = 0):
    """A raw client linking to s2 as the migrating client would, after s1's announcement."""
    announce(s2, session_id, migration, in_flight)
    main = PortChannel.link(s2.address, session_id, ChannelType.MAIN, 0,
                            channel_caps=ClientSession.channel_caps(ChannelType.MAIN))
    main.send(m.MsgcMainMigrateDstDoSeamless(mig.MIGRATION_PROTOCOL_VERSION))
    main.expect(m.MsgMainMigrateDstSeamlessAck)
    return main


def migrate_data_head(port: PortChannel, size: int) -> bytes:
    if port.established.send_mini_header:
        return layout.MINI_HEADER.pack(Msgc.MIGRATE_DATA, size)
    return layout.FULL_HEADER.pack(1, Msgc.MIGRATE_DATA, size, 0)


# --- identity: only the migration that announced a session reaches it --------------------------


def test_a_caller_without_the_migration_id_changes_nothing(nodes):
    (s2,) = nodes(1)
    announce(s2, 0x1234)
    ann = s2.spice.migration.announcements[0x1234]
    status, body = raw_post(s2, f"/migration/device-state?migration={OTHER}", sink_state(99, 0x1234),
                            "application/octet-stream")
    assert status == 404 and "no migration" in body["error"]
    status, body = raw_post(s2, "/migration/abort", json.dumps({"migration": OTHER, "sessions": ["00001234"]}))
    assert status == 404
    status, body = raw_post(s2, "/migration/abort", json.dumps({"sessions": ["00001234"]}))
    assert status == 400 and "migration must be" in body["error"]
    assert s2.spice.migration.announcements[0x1234] is ann and ann.device_state == {}
    assert s2.spice.migration.expects(0x1234)


def test_another_migration_can_neither_feed_nor_abort_a_session_it_did_not_announce(nodes):
    (s2,) = nodes(1)
    announce(s2, 0x1234)
    announce(s2, 0x5678, migration=OTHER)
    answer = s2.api.post_bytes(f"/migration/device-state?migration={OTHER}", sink_state(99, 0x1234))
    assert answer["restored"] == 0 and answer["skipped"][0]["session_id"] == "00001234"
    assert s2.spice.migration.announcements[0x1234].device_state == {}
    assert s2.api.post_json("/migration/abort", {"migration": OTHER, "sessions": ["00001234"]}) == {"aborted": 0}
    assert s2.spice.migration.expects(0x1234)
    # Nor can it announce that session as its own.
    status, body = raw_post(s2, "/migration/announce", json.dumps(
        {"migration": OTHER, "sessions": [{"session_id": "00001234", "ports": [[0, ECHO, "echo"]]}]}))
    assert status == 409 and "another migration" in body["error"]


def test_device_state_raises_the_ports_bound_to_what_s1_holds_once_stopped(nodes):
    (s2,) = nodes(1)
    announce(s2, 0x1234)
    state = sink_state(1, 0x1234)
    chunks = codec.unpack_chunks(state)
    index = json.loads(bytes(chunks[0]))
    index[0]["in_flight"] = 40 << 20
    body = codec.pack_chunks([json.dumps(index).encode(), *map(bytes, chunks[1:])]).tobytes()
    assert s2.api.post_bytes(f"/migration/device-state?migration={MIGRATION}", body)["restored"] == 1
    assert s2.spice.migration.announcements[0x1234].in_flight[SINK_ID] == 40 << 20


def test_completed_answers_a_migration_only_for_its_own_sessions(nodes):
    (s2,) = nodes(1)
    announce(s2, 0x1234)
    s2.spice.migration.failed[0x1234] = "the client left"
    assert s2.api.get_json(f"/migration/completed?migration={OTHER}&ids=00001234") == {}
    answer = s2.api.get_json(f"/migration/completed?migration={MIGRATION}&ids=00001234")
    assert answer == {"00001234": {"failed": "the client left"}}


def test_a_bad_announce_registers_nothing(nodes):
    (s2,) = nodes(1)
    main = link_target(s2, 0x4321, migration=OTHER)  # lives on s2 now (arriving)
    for second, status in [({"session_id": "00004321", "ports": [[0, ECHO, "echo"]]}, 409),
                           ({"session_id": "00009999", "ports": [[0, ECHO, "tape"]]}, 400)]:
        got, _ = raw_post(s2, "/migration/announce", json.dumps({"migration": MIGRATION, "ttl": 30, "sessions": [
            {"session_id": "00001234", "ports": [[SINK_ID, SINK, "sink", 64 << 20]]}, second]}))
        assert got == status
        assert 0x1234 not in s2.spice.migration.announcements and 0x9999 not in s2.spice.migration.announcements
    main.close()


def test_device_state_for_a_session_that_already_migrated_changes_nothing(nodes):
    s1, s2 = nodes(2)
    session = connect(s1)
    digest = fill_paused_sink(s1, session, 1 << 20)
    report = s1.migrate_to(s2)
    assert only_entry(report)["migrated"], report
    sid = session.session_id
    # The announcement ended with its migration: the id proves nothing any more.
    assert sid not in s2.spice.migration.announcements
    status, _ = raw_post(s2, f"/migration/device-state?migration={report['migration_id']}", sink_state(0, sid),
                         "application/octet-stream")
    assert status == 404
    status, _ = raw_post(s2, "/migration/abort", json.dumps({"migration": report["migration_id"],
                                                             "sessions": [f"{sid:08x}"]}))
    assert status == 404
    drain_sink(s2, sid, 1 << 20, digest)  # the sink kept its bytes and was not paused
    echo_ok(session)
    session.close()


def test_an_announcement_expires_and_frees_its_buffers(nodes):
    (s2,) = nodes(1)
    announce(s2, 0x1234, in_flight=8 << 20, ttl=0.2)
    ann = s2.spice.migration.announcements[0x1234]
    assert ann.buffers  # a prefaulted buffer for the sink's announced backlog
    wait_until(lambda: 0x1234 not in s2.spice.migration.announcements, what="the sweep")
    assert ann.buffers == {} and not s2.spice.migration.expects(0x1234)


def test_s1_aborts_on_s2_every_announced_session_that_did_not_move(nodes):
    s1, s2 = nodes(2)
    session = connect(s1)
    with refused_port() as nobody:  # the client cannot reach s2's SPICE port: it stays on s1
        report = s1.migrate_to(s2, to=("127.0.0.1", nobody))
    assert report["stayed"] == 1
    assert not s2.spice.migration.announcements
    echo_ok(session)
    session.close()


# --- timeouts that hold ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "-1", "0", "1e400"])
def test_only_finite_positive_timeouts_are_accepted(nodes, value):
    s1, s2 = nodes(2)
    (host, port), (chost, cport) = s2.address, s2.control_address
    body = f'{{"to": "{host}:{port}", "to_control": "{chost}:{cport}", "timeout": {value}}}'
    status, answer = raw_post(s1, "/migrate", body)
    assert status == 400 and "timeout must be a finite number" in answer["error"], answer


def test_an_unreachable_destination_control_api_is_a_502_naming_it(nodes):
    s1, s2 = nodes(2)
    session = connect(s1)
    with refused_port() as nobody:
        status, answer = raw_post(s1, "/migrate", json.dumps(
            {"to": "{}:{}".format(*s2.address), "to_control": f"127.0.0.1:{nobody}", "timeout": 5}))
    assert status == 502 and f"127.0.0.1:{nobody}" in answer["error"], answer
    echo_ok(session)
    session.close()


def test_a_destination_that_never_answers_the_announcement_is_a_502_within_the_timeout(nodes):
    """A listener that takes the connection and never answers: the old fixed 30 s per call (and a
    500) became the requested timeout and a 502 naming it (the test's client gives up at 20 s)."""
    s1, s2 = nodes(2)
    session = connect(s1)
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)
    try:
        host, port = mute.getsockname()
        status, answer = raw_post(s1, "/migrate", json.dumps(
            {"to": "{}:{}".format(*s2.address), "to_control": f"{host}:{port}", "timeout": 1}))
    finally:
        mute.close()
    assert status == 502 and f"{host}:{port}" in answer["error"] and "within" in answer["error"], answer
    assert s1.sessions()[session.session_id]["migration"] is None
    echo_ok(session)
    session.close()


def test_a_frozen_destination_cannot_hold_the_devices_beyond_the_timeout(nodes, monkeypatch):
    """s2 takes the announcement and the clients, then never answers the device state. /migrate
    answers within its timeout (the test's HTTP client gives up at 20 s, the old fixed bound was
    30 s per call), and the devices run again on s1."""
    s1, s2 = nodes(2)
    session = connect(s1)
    release = gevent.event.Event()
    stopped_during_call = []

    def frozen(migration_id, body):
        stopped_during_call.append(s1.sessions()[session.session_id]["ports"][0]["device_stopped"])
        release.wait()
        raise MigrationError("released")

    monkeypatch.setattr(s2.spice.migration, "receive_device_states", frozen)
    try:
        status, report = raw_post(s1, "/migrate", json.dumps(
            {"to": "{}:{}".format(*s2.address), "to_control": "{}:{}".format(*s2.control_address), "timeout": 3,
             "to_peer_token": s2.peer_token}))
    finally:
        release.set()
    assert stopped_during_call == [True]
    assert status == 200 and report["stayed"] == 1, report
    entry = only_entry(report)
    assert entry["error"].startswith("device state could not reach the destination at "), entry
    assert "{}:{}".format(*s2.control_address) in entry["error"]
    view = s1.sessions()[session.session_id]
    assert not any(p["device_stopped"] for p in view["ports"])
    echo_ok(session)
    session.close()


# --- MIGRATE_DATA bounded by the announcement -------------------------------------------------


def test_migrate_data_beyond_the_announcement_is_refused_before_any_buffer_is_made(nodes, caplog):
    """One byte more than the announcement allows: the port link ends as the client's protocol
    error (MessageTooLarge) and no buffer of that size exists; the session's migration fails at
    once (s1 learns why), without waiting for s1's abort or the announcement's expiry."""
    (s2,) = nodes(1)
    sid = 0x51DE0003
    main = link_target(s2, sid)  # the sink announced with nothing in flight
    sink = PortChannel.link(s2.address, sid, ChannelType.PORT, SINK_ID)
    limit = migrate_data_limit(0, s2.spice.config.limits)
    sink.send_bytes(migrate_data_head(sink, limit + 1))
    read_until_closed(sink.sock)
    assert any("protocol error" in r.getMessage() and f"exceeds the limit of {limit}" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    read_until_closed(main.sock)
    assert "closed before its state was restored" in s2.spice.migration.failed[sid]
    assert sid not in s2.spice.migration.announcements
    wait_until(lambda: not s2.spice.sessions, what="the arriving session to end")


def test_migrate_data_exactly_at_the_bound_is_restored(nodes, monkeypatch):
    """The other side of the bound: a MIGRATE_DATA of exactly the limit is read and restored (the
    allowance for what s1 reads from a stopped port is made small, so the limit is a few MiB)."""
    monkeypatch.setattr(destination, "STOPPED_READ_ALLOWANCE", 0)
    (s2,) = nodes(1, limits=Limits(to_device=1 << 20, to_client=1 << 20))
    sid = 0x51DE0004
    main = link_target(s2, sid)
    sink = PortChannel.link(s2.address, sid, ChannelType.PORT, SINK_ID)
    limit = migrate_data_limit(0, s2.spice.config.limits)
    framing = PortMigrateDataWriter(PortMigrateData(pending=[b""])).size
    state = PortMigrateData(pending=[bytes(limit - framing)])
    assert PortMigrateDataWriter(state).size == limit
    sink.send_bytes(migrate_data_head(sink, limit) + build_port_migrate_data(state).tobytes())
    arriving = s2.spice.sessions[sid].migration
    wait_until(lambda: arriving.restored == limit - framing, what="the sink's state to be restored")
    assert sid not in s2.spice.migration.failed
    sink.close()
    main.close()


def memory_behind(buffer: np.ndarray) -> list:
    """``buffer`` and every object its memory comes from (arrays it views, the mapping)."""
    chain: list = []
    obj = buffer
    while obj is not None:
        chain.append(obj)
        obj = obj.base if isinstance(obj, np.ndarray) else obj.obj if isinstance(obj, memoryview) else None
    return chain


def body_received(node, session_id: int) -> int:
    """Bytes of the sink's MIGRATE_DATA body ``node`` has received so far (looked up each time:
    a test that kept the connection would keep what it holds)."""
    return node.spice.sessions[session_id].migration.links[port_channel(SINK_ID)].channel.bulk_progress()


@pytest.fixture
def body_buffers(monkeypatch):
    """Weak references to the memory s2 takes for MIGRATE_DATA bodies (prefaulted for an
    announcement, or taken when the body comes), and the (size, memory) of each body that took
    some, with the cyclic collector off: a buffer kept in a reference cycle then stays, every
    time, instead of when the collector happens not to run."""
    refs: list[weakref.ref] = []
    real_take, real_prefaulted = destination.Announcement.take_buffer, orchestrator.prefaulted

    def take_buffer(self, channel_id: int, size: int) -> np.ndarray:
        buffer = real_take(self, channel_id, size)
        refs.extend(weakref.ref(obj) for obj in memory_behind(buffer))
        taken.append((size, refs[-1]))
        return buffer

    def prefaulted(size: int) -> np.ndarray:
        buffer = real_prefaulted(size)
        refs.extend(weakref.ref(obj) for obj in memory_behind(buffer))
        return buffer

    monkeypatch.setattr(destination.Announcement, "take_buffer", take_buffer)
    taken: list[tuple[int, weakref.ref]] = []  # each body's size and where its memory comes from
    monkeypatch.setattr(orchestrator, "prefaulted", prefaulted)
    gc.disable()
    try:
        yield refs, taken
    finally:
        gc.enable()


def test_aborted_migrate_data_transfers_leave_no_memory_behind(nodes, body_buffers):
    """Three clients each send half of a 64 MiB MIGRATE_DATA the announcement allowed, then go:
    with no session left, nothing holds the memory their halves landed in (no buffer waits for
    the collector), and s2's memory budget has every byte back."""
    buffers, taken = body_buffers
    (s2,) = nodes(1, limits=Limits(to_device=1 << 20, to_client=1 << 20))
    size = 64 << 20
    half = b"\0" * (size // 2)
    budget = s2.spice.budget.used
    for n in range(3):
        sid = 0x7E570000 + n
        main = link_target(s2, sid, in_flight=size)
        sink = PortChannel.link(s2.address, sid, ChannelType.PORT, SINK_ID)
        sink.send_bytes(migrate_data_head(sink, size) + half)
        wait_until(lambda sid=sid: body_received(s2, sid) == len(half), what="s2 to receive the half body")
        assert len(taken) == n + 1 and taken[-1][0] == size and taken[-1][1]() is not None, taken
        sink.sock.shutdown(socket.SHUT_RDWR)
        sink.close()
        main.close()
        wait_until(lambda: not s2.spice.sessions and not s2.spice.migration.announcements,
                   what="the session and its announcement to go")
    wait_until(lambda: all(ref() is None for ref in buffers) and s2.spice.budget.used == budget,
               what="the bodies' memory to be let go and the budget to have it back")
