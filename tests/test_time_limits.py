"""Time limits, and the control API's size limits on migration inputs, each tested on both sides:
just under, at and just over. Time is fed explicitly (the migration machines take ``now``) or read
from a fake clock, and timeouts are read off fakes that record them: no test races the wall clock."""

from __future__ import annotations

import contextlib
import json
import math
import socket as std_socket
import types

import gevent.event
import pytest
from gevent import socket

from spicewire.control.server import MAX_IN_FLIGHT, MAX_PRECOPY, ControlServer
from spicewire.logs import session_label
from spicewire.protocol.caps import caps_to_words
from spicewire.protocol.enums import MainCap
from spicewire.protocol.messages import (
    MigrationDstInfo,
    MsgcMainMigrateConnected,
    MsgcMainMigrateConnectedSeamless,
    MsgcMigrateFlushMark,
    MsgMigrateData,
)
from spicewire.protocol.migration import (
    MAIN,
    MIGRATE_TIMEOUT,
    ConnectComplete,
    DisconnectClient,
    MigrationMode,
    SourceMigration,
    SourceState,
    build_main_migrate_data,
)
from spicewire.server.migration import orchestrator
from spicewire.server.migration.orchestrator import LANDING_MARGIN, STATUS_TIMEOUT, MigrationManager, Peer
from tests.serverkit import running_server, wait_until

pytestmark = pytest.mark.usefixtures("within_30_s")

DST = MigrationDstInfo(port=5901, sport=0, host="s2.example")
SEMI_CLIENT = caps_to_words([MainCap.SEMI_SEAMLESS_MIGRATE])
SEAMLESS_CLIENT = caps_to_words(
    [MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.AGENT_CONNECTED_TOKENS, MainCap.SEAMLESS_MIGRATE])
OLD_CLIENT: list[int] = []  # no migration caps: it can only switch host
STARTED = 1000.0  # when each timer was armed; not 0, so a deadline that forgets ``now`` shows
TICK = 1e-3  # "just over" a time limit; "just under" is the float right below it


def just_under(t: float) -> float:
    return math.nextafter(t, -math.inf)


# --- MIGRATE_TIMEOUT: s1's machine waits this long for the client's answer, then for it to leave ----


def waiting_for_connect(caps, mode: MigrationMode) -> SourceMigration:
    src = SourceMigration((), caps)
    src.begin(DST, mode, now=STARTED)
    return src


def connected(seamless: bool) -> SourceMigration:
    src = SourceMigration((), SEAMLESS_CLIENT if seamless else SEMI_CLIENT)
    src.begin(DST, MigrationMode.SEAMLESS if seamless else MigrationMode.SEMI_SEAMLESS, now=0.0)
    src.receive(MAIN, MsgcMainMigrateConnectedSeamless() if seamless else MsgcMainMigrateConnected())
    return src


def seamless_switching() -> SourceMigration:
    """SPICE_MSG_MIGRATE sent; main's FLUSH_MARK not back yet."""
    src = connected(seamless=True)
    src.finish(now=STARTED)
    return src


def seamless_switched() -> SourceMigration:
    """Every MIGRATE_DATA sent: the client should leave now, on the timer the switch armed."""
    src = seamless_switching()
    src.receive(MAIN, MsgcMigrateFlushMark())
    src.send(MAIN, MsgMigrateData(build_main_migrate_data()))
    return src


def semi_seamless_ended() -> SourceMigration:
    src = connected(seamless=False)
    src.finish(now=STARTED)
    return src


def switched_host() -> SourceMigration:
    src = SourceMigration((), OLD_CLIENT)
    src.begin(DST, MigrationMode.SEAMLESS, now=0.0)  # no BEGIN reaches this client: no timer either
    src.finish(now=STARTED)
    return src


NO_ANSWER = [ConnectComplete(False, False)]  # the connect failed: the client switches host at the end
CLIENT_STAYED = [DisconnectClient()]
TIMED_PHASES = {
    "connect-semi-seamless": (lambda: waiting_for_connect(SEMI_CLIENT, MigrationMode.SEMI_SEAMLESS),
                              SourceState.WAIT_CONNECT, NO_ANSWER, SourceState.NOT_CONNECTED),
    "connect-seamless": (lambda: waiting_for_connect(SEAMLESS_CLIENT, MigrationMode.SEAMLESS),
                         SourceState.WAIT_CONNECT_SEAMLESS, NO_ANSWER, SourceState.NOT_CONNECTED),
    "seamless-switching": (seamless_switching, SourceState.MIGRATING, CLIENT_STAYED, SourceState.DONE),
    "seamless-switched": (seamless_switched, SourceState.WAIT_DISCONNECT, CLIENT_STAYED, SourceState.DONE),
    "semi-seamless-end": (semi_seamless_ended, SourceState.WAIT_DISCONNECT, CLIENT_STAYED, SourceState.DONE),
    "switch-host": (switched_host, SourceState.WAIT_DISCONNECT, CLIENT_STAYED, SourceState.DONE),
}


@pytest.mark.parametrize("phase", TIMED_PHASES)
def test_s1_s_machine_waits_migrate_timeout_and_not_a_moment_less(phase):
    make, waiting, _, _ = TIMED_PHASES[phase]
    src = make()
    deadline = STARTED + MIGRATE_TIMEOUT
    assert src.state is waiting and src.get_timer() == deadline
    assert src.handle_timer(now=just_under(deadline)) == []
    assert src.state is waiting and src.get_timer() == deadline


@pytest.mark.parametrize("late", [0.0, TICK], ids=["at", "just-over"])
@pytest.mark.parametrize("phase", TIMED_PHASES)
def test_once_migrate_timeout_passed_s1_s_machine_gives_up_once(phase, late):
    """Waiting for the answer: the connect failed. Waiting for the client to leave: it is
    disconnected. Either way the timer is spent: a later call does nothing more."""
    make, _, outcome, after = TIMED_PHASES[phase]
    src = make()
    now = STARTED + MIGRATE_TIMEOUT + late
    assert src.handle_timer(now=now) == outcome
    assert src.state is after and src.get_timer() is None
    assert src.handle_timer(now=now + MIGRATE_TIMEOUT) == []


# --- LANDING_MARGIN: s1 decides whether the sessions landed before its machines disconnect them -----


REPORT = {"mode": "seamless", "times": {"completed": "2026-01-01T00:00:00.000000Z"}}  # s2's "it landed"


class FakeClock:
    """orchestrator's ``time`` as one test sees it: ``monotonic`` reads ``now``, which the fakes move."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock(0.0)
    # orchestrator calls time.monotonic() through its module global each time.
    monkeypatch.setattr(orchestrator, "time", fake)
    return fake


class SwitchedSession:
    """What _land and _wait_landed use of server.migration.source.SessionSource: a seamless session
    whose client switched and left s1 (so s1 asks s2 at once), on a real machine whose own timer
    would disconnect it at MIGRATE_TIMEOUT after the switch."""

    def __init__(self, sid: int, switched_at: float = STARTED) -> None:
        self.session = types.SimpleNamespace(id=sid, main=None)
        self.machine = connected(seamless=True)
        self.machine.finish(now=switched_at)
        self.machine.receive(MAIN, MsgcMigrateFlushMark())
        self.machine.send(MAIN, MsgMigrateData(build_main_migrate_data()))
        self.finished = gevent.event.Event()
        self.finished.set()
        self.rolled_back: list[str] = []

    @property
    def can_roll_back(self) -> bool:
        return self.machine.can_roll_back

    def roll_back(self, why: str) -> None:
        self.rolled_back.append(why)


class DeadlineRecorder:
    """MigrationManager as _land uses it, its _wait_landed replaced: notes the deadline it is given
    and answers that every session landed."""

    def __init__(self) -> None:
        self.deadlines: list[float] = []

    def _wait_landed(self, _migration, sources: list[SwitchedSession], deadline: float) -> dict:
        self.deadlines.append(deadline)
        return {session_label(s.session.id): REPORT for s in sources}


@pytest.mark.parametrize("end_after_margin, end_binds", [(-TICK, True), (0.0, True), (TICK, False)],
                         ids=["migration-ends-just-before", "at", "migration-ends-just-after"])
def test_s1_asks_s2_until_landing_margin_before_the_first_machine_timer_or_the_migration_s_end(
        end_after_margin, end_binds):
    sources = [SwitchedSession(1, switched_at=STARTED + 1), SwitchedSession(2, switched_at=STARTED)]
    first_timer = sources[1].machine.get_timer()
    end = first_timer - LANDING_MARGIN + end_after_margin
    manager = DeadlineRecorder()
    landed = MigrationManager._land(manager, Peer(None, "m1", end), sources, end)
    assert sorted(landed) == ["00000001", "00000002"]
    assert manager.deadlines == [end if end_binds else first_timer - LANDING_MARGIN]


class LandsAt:
    """s2's /migration/completed: the session lands at ``lands_at``. Each request takes from the
    clock's ``now`` to the next of ``request_times`` (then TICK each): the times s1 asks at are
    chosen by the test, whatever the machine's speed."""

    def __init__(self, clock: FakeClock, lands_at: float, request_times: list[float]) -> None:
        self.clock, self.lands_at = clock, lands_at
        self.later = iter(request_times)
        self.address = "s2"
        self.asked_at: list[float] = []
        self.timeouts: list[float] = []

    def get_json(self, path: str, timeout: float) -> dict:
        self.asked_at.append(self.clock.now)
        self.timeouts.append(timeout)
        ids = path.split("ids=", 1)[1].split(",")
        answer = dict.fromkeys(ids, REPORT) if self.clock.now >= self.lands_at else {}
        self.clock.now = next(self.later, self.clock.now + TICK)
        return answer


@pytest.mark.parametrize("lands_after_margin, lands", [(-TICK, True), (0.0, True), (TICK, False)],
                         ids=["just-under", "at", "just-over"])
def test_a_session_that_lands_by_landing_margin_before_its_machine_s_timer_stays_on_s2_a_later_one_is_rolled_back(
        clock, lands_after_margin, lands):
    source = SwitchedSession(1)
    decision = source.machine.get_timer() - LANDING_MARGIN
    clock.now = decision - 2 * TICK
    s2 = LandsAt(clock, decision + lands_after_margin, request_times=[decision - TICK, decision])
    manager = types.SimpleNamespace(_wait_landed=MigrationManager._wait_landed)
    landed = MigrationManager._land(manager, Peer(s2, "m1", math.inf), [source], math.inf)
    if lands:
        assert landed == {"00000001": REPORT} and source.rolled_back == []
    else:  # s1 asked up to the margin, and no further
        assert s2.asked_at == [decision - 2 * TICK, decision - TICK, decision] and landed == {}
        assert source.rolled_back == ["the destination did not take the session in time"]
    # At the decision the client could still be taken back: its machine had not disconnected it.
    assert source.machine.handle_timer(now=decision) == [] and source.can_roll_back


# --- STATUS_TIMEOUT: one request to s2, never past the deadline -----------------------------------


@pytest.mark.parametrize("left, timeout", [
    (STATUS_TIMEOUT + TICK, STATUS_TIMEOUT), (STATUS_TIMEOUT, STATUS_TIMEOUT),
    (just_under(STATUS_TIMEOUT), just_under(STATUS_TIMEOUT)),
], ids=["just-over", "at", "just-under"])
def test_a_have_they_landed_request_waits_status_timeout_or_what_is_left_if_less(clock, left, timeout):
    source = SwitchedSession(1)
    s2 = LandsAt(clock, lands_at=0.0, request_times=[])
    landed = MigrationManager._wait_landed(Peer(s2, "m1", math.inf), [source], deadline=left)
    assert landed == {"00000001": REPORT} and s2.timeouts == [timeout]


class AbortRecorder:
    """s2's /migration/abort: notes each request's timeout."""

    address = "s2"

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def post_json(self, path: str, body: dict, timeout: float) -> dict:
        self.timeouts.append(timeout)
        return {}


@pytest.mark.parametrize("left, timeout", [
    (STATUS_TIMEOUT + TICK, STATUS_TIMEOUT), (STATUS_TIMEOUT, STATUS_TIMEOUT),
    (just_under(STATUS_TIMEOUT), just_under(STATUS_TIMEOUT)), (TICK, TICK),
], ids=["just-over", "at", "just-under", "a-moment-left"])
def test_s1_tells_s2_to_forget_sessions_within_status_timeout_or_what_is_left_if_less(clock, left, timeout):
    s2 = AbortRecorder()
    MigrationManager._forget_announced(Peer(s2, "m1", left), ["00000001"])
    assert s2.timeouts == [timeout]  # sent before the call returned: within the migration's time


@pytest.mark.parametrize("left", [0.0, -TICK], ids=["none-left", "past-the-end"])
def test_with_no_time_left_s1_tells_s2_to_forget_sessions_in_the_background_within_status_timeout(clock, left):
    s2 = AbortRecorder()
    MigrationManager._forget_announced(Peer(s2, "m1", left), ["00000001"])
    wait_until(lambda: s2.timeouts, what="the abort sent in the background")
    assert s2.timeouts == [STATUS_TIMEOUT]


# --- MAX_PRECOPY and MAX_IN_FLIGHT: sizes the control API takes from s1 ----------------------------


PEER_TOKEN = "peer-token"
MIGRATION = "0123456789abcdef"  # no migration of that id runs on the server


@pytest.fixture(scope="module")
def control():
    # A small memory budget: a 1 TiB backlog at MAX_IN_FLIGHT is announced, never prefaulted.
    with running_server(memory_budget=64 << 20, key_pool=0) as spice:
        server = ControlServer(spice, "127.0.0.1", 0, peer_token=PEER_TOKEN)
        server.start()
        try:
            yield server
        finally:
            server.stop()


def answer_to(control: ControlServer, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Status and JSON body of one request; the client sends nothing after ``body``."""
    with socket.create_connection(control.address, timeout=10) as sock:
        sock.sendall(head + body)
        sock.shutdown(std_socket.SHUT_WR)
        answer = bytearray()
        with contextlib.suppress(ConnectionResetError):  # a server that closes with the body unread
            while chunk := sock.recv(65536):
                answer += chunk
    status_line, _, payload = bytes(answer).partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


def precopy_head(length: int) -> bytes:
    return (b"POST /migration/port-precopy?migration=%s HTTP/1.1\r\nConnection: close\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (MIGRATION.encode(), PEER_TOKEN.encode(),
                                                                          length))


def test_a_port_precopy_round_of_max_precopy_bytes_passes_the_size_check(control):
    # None of it is sent: past the size it is the unknown migration that is refused.
    status, answer = answer_to(control, precopy_head(MAX_PRECOPY))
    assert status == 404 and f"no migration {MIGRATION} in progress" in answer["error"], answer


def test_a_port_precopy_round_one_byte_over_max_precopy_is_413(control):
    status, answer = answer_to(control, precopy_head(MAX_PRECOPY + 1))
    assert status == 413, answer
    assert answer["error"] == f"body of {MAX_PRECOPY + 1} bytes is over the limit of {MAX_PRECOPY}"


def announce(control: ControlServer, session_id: int, in_flight: int) -> tuple[int, dict]:
    body = json.dumps({"migration": MIGRATION, "ttl": 30, "sessions": [
        {"session_id": session_label(session_id), "ports": [[0, "org.spicewire.sink", "sink", in_flight]]},
    ]}).encode()
    head = (b"POST /migration/announce HTTP/1.1\r\nConnection: close\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (PEER_TOKEN.encode(), len(body)))
    return answer_to(control, head, body)


@pytest.mark.parametrize("in_flight, session_id", [(MAX_IN_FLIGHT - 1, 0x1001), (MAX_IN_FLIGHT, 0x1002)],
                         ids=["one-under", "at"])
def test_an_announced_port_backlog_of_max_in_flight_bytes_is_taken(control, in_flight, session_id):
    status, answer = announce(control, session_id, in_flight)
    assert status == 200 and answer["announced"] == 1, answer
    assert control.spice.migration.announcements[session_id].in_flight == {0: in_flight}


def test_an_announced_port_backlog_one_byte_over_max_in_flight_is_a_400(control):
    status, answer = announce(control, 0x2000, MAX_IN_FLIGHT + 1)
    assert status == 400 and answer["error"].startswith("bad announcement: session 00002000 needs ports as"), answer
    assert 0x2000 not in control.spice.migration.announcements
