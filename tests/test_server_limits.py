"""The server's size and count limits, each tested on both sides: at the limit and one over (and
one under where that differs from the limit)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import gevent
import pytest
from gevent import socket
from gevent.server import StreamServer

from spicewire.client import migration as client_migration
from spicewire.server import budget as budget_module
from spicewire.server import net
from spicewire.server.budget import DEFAULT_SHARE, FALLBACK_LIMIT, MemoryBudget, default_limit
from spicewire.server.events import EVENTS_LOST, QUEUE_LIMIT
from spicewire.server.heap import TRIM_AFTER
from spicewire.server.migration import orchestrator
from spicewire.server.migration.orchestrator import UNREACHABLE_TRIES
from tests.serverkit import running_server, wait_until
from tests.test_migration import Node, connect, echo_ok, only_entry

pytestmark = pytest.mark.usefixtures("within_30_s")

MIB = 1 << 20
LANDING_REPORTS = "/migration/completed"  # s1's "have they landed?" request to s2


# --- QUEUE_LIMIT: a follower's event queue ---------------------------------------------------------


@pytest.mark.parametrize("emitted, lost", [(QUEUE_LIMIT - 1, 0), (QUEUE_LIMIT, 0), (QUEUE_LIMIT + 1, 1)],
                         ids=["one-under", "at-the-limit", "one-over"])
def test_a_server_s_follower_holds_queue_limit_events_and_loses_the_oldest_past_it(emitted, lost):
    """The server's own bus: a follower that reads nothing keeps QUEUE_LIMIT events; one more drops
    the oldest, and the next read says so."""
    with running_server() as server:
        follower = server.events.subscribe()
        for n in range(emitted):
            server.events.emit("tick", n=n)
        got = follower.get(timeout=0)
    assert [e["count"] for e in got if e["event"] == EVENTS_LOST] == ([lost] if lost else [])
    assert [e["n"] for e in got if e["event"] == "tick"] == list(range(lost, emitted))


# --- TRIM_AFTER: freed heap back to the system -----------------------------------------------------


@pytest.mark.parametrize("freed, trims", [(TRIM_AFTER - 1, 0), (TRIM_AFTER, 1), (TRIM_AFTER + 1, 1)],
                         ids=["one-under", "at-the-limit", "one-over"])
def test_the_server_trims_the_heap_once_trim_after_bytes_were_released(monkeypatch, freed, trims):
    """Released while the server still holds other bytes (all released trims sooner, at TRIM_IDLE):
    one byte short of TRIM_AFTER is no trim, TRIM_AFTER or more is one."""
    ran: list[str] = []
    # A recorder instead of malloc_trim: memory_freed looks the name up in net each time.
    monkeypatch.setattr(net, "release_free_memory", lambda: ran.append("trim"))
    with running_server() as server:
        still_held = MIB
        server.budget.reserve(freed + still_held)
        server.budget.release(freed)
        server.memory_freed()
        gevent.get_hub().threadpool.join()  # the trim, if any, runs in a worker thread
        assert ran == ["trim"] * trims
        server.budget.release(still_held)


# --- FALLBACK_LIMIT: the budget when the machine's memory cannot be read ---------------------------


def phys_pages(pages: int | None) -> Callable[[str | int], int]:
    """os.sysconf as on a machine whose SC_PHYS_PAGES says ``pages`` (-1: a known name without a
    value; None: a name the platform does not have); every other name as it is."""
    real = os.sysconf

    def sysconf(name: str | int) -> int:
        if name != "SC_PHYS_PAGES":
            return real(name)
        if pages is None:
            raise ValueError("unrecognized configuration name")
        return pages

    return sysconf


@pytest.mark.parametrize("sysconf", [phys_pages(None), phys_pages(-1), phys_pages(0)],
                         ids=["no-such-name", "no-value", "zero-pages"])
def test_a_server_that_cannot_read_the_machine_s_memory_has_the_fallback_budget(monkeypatch, sysconf):
    monkeypatch.setattr(budget_module.os, "sysconf", sysconf)
    assert default_limit() == FALLBACK_LIMIT
    with running_server() as server:
        assert server.budget.limit == FALLBACK_LIMIT


def test_one_page_of_memory_is_read_and_not_the_fallback(monkeypatch):
    """The other side: the smallest memory that can be read is a quarter of it, however small."""
    page = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(budget_module.os, "sysconf", phys_pages(1))
    assert MemoryBudget().limit == page // DEFAULT_SHARE != FALLBACK_LIMIT


# --- UNREACHABLE_TRIES: s1 asking s2 whether the sessions landed -----------------------------------


class FlakyDestinationControl:
    """s2's control API behind a proxy that resets the first ``refusals`` landing-report requests, as
    a destination that cannot be reached (or gives them ``answer``: an error), and passes everything
    else on to s2."""

    def __init__(self, target: tuple[str, int], refusals: int, answer: bytes | None = None) -> None:
        self.target, self.refusals = target, refusals
        self.answer = answer  # what a refusal says instead of a reset
        self.refused = 0
        self.answered = 0  # landing-report requests s2 answered
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.address = self.server.address[:2]

    def _handle(self, sock: socket.socket, _addr: tuple[str, int]) -> None:
        with sock:
            request = bytearray()
            while b"\r\n\r\n" not in request and (chunk := sock.recv(65536)):
                request += chunk
            head = bytes(request).partition(b"\r\n\r\n")[0].decode("latin-1")
            path = head.split()[1]
            if path.startswith(LANDING_REPORTS) and self.refused < self.refusals:
                self.refused += 1
                if self.answer is not None:
                    sock.sendall(self.answer)
                    return
                # A reset, not an error status: s1 counts only requests that fail to get through.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                           if line.lower().startswith("content-length:")), 0)
            while len(request) < len(head) + 4 + length and (chunk := sock.recv(65536)):
                request += chunk
            with socket.create_connection(self.target, timeout=10) as s2:
                s2.sendall(request)
                while chunk := s2.recv(65536):
                    sock.sendall(chunk)
            if path.startswith(LANDING_REPORTS):
                self.answered += 1

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def slow_client_switch(monkeypatch):
    """The client holds on to s1 a while into the switch (it relays each MIGRATE_DATA late), so
    that s1 asks s2 while it can still take the session back."""
    relay = client_migration.MigrationDriver._relay

    def late_relay(self, ev):
        gevent.sleep(0.5)
        return relay(self, ev)

    monkeypatch.setattr(client_migration.MigrationDriver, "_relay", late_relay)


def migrate_through_flaky(s1: Node, s2: Node, refusals: int, answer: bytes | None = None,
                          ) -> tuple[dict, FlakyDestinationControl]:
    """s1's /migrate report of a seamless migration to s2, whose control API s1 reaches through a
    FlakyDestinationControl (returned too, stopped)."""
    flaky = FlakyDestinationControl(s2.control_address, refusals, answer)
    try:
        return s1.api.post_json("/migrate", {
            "to": "{}:{}".format(*s2.address), "to_control": "{}:{}".format(*flaky.address),
            "mode": "seamless", "timeout": 10, "to_peer_token": s2.peer_token,
        }), flaky
    finally:
        flaky.stop()


@pytest.mark.usefixtures("slow_client_switch")
def test_a_session_lands_when_s2_answers_after_unreachable_tries_minus_one_failed_requests(nodes):
    s1, s2 = nodes(2)
    session = connect(s1)
    report, flaky = migrate_through_flaky(s1, s2, UNREACHABLE_TRIES - 1)
    assert flaky.refused == UNREACHABLE_TRIES - 1 and flaky.answered >= 1
    entry = only_entry(report)
    assert report["migrated"] == 1 and entry["error"] is None, report
    assert session.connected_to == s2.address
    echo_ok(session)
    session.close()


@pytest.mark.usefixtures("slow_client_switch")
def test_unreachable_tries_failed_requests_in_a_row_count_s2_as_gone_and_s1_takes_the_session_back(nodes):
    s1, s2 = nodes(2)
    session = connect(s1)
    report, flaky = migrate_through_flaky(s1, s2, UNREACHABLE_TRIES + 5)
    # s1 stopped asking at the limit: the requests past it were never made.
    assert flaky.refused == UNREACHABLE_TRIES and flaky.answered == 0
    entry = only_entry(report)
    assert report["migrated"] == 0 and report["rolled_back"] == 1, report
    assert entry["error"].startswith("rolled back: the destination is unreachable at {}:{}".format(*flaky.address))
    wait_until(lambda: not session.migrating, what="the client to take s1's MIGRATE_CANCEL")
    assert session.connected_to == s1.address
    echo_ok(session)
    session.close()


def test_a_session_whose_client_left_before_s2_could_be_asked_is_lost_with_the_reason(nodes, monkeypatch):
    """The client is on s2 before s1 asks (s1 waits for it to leave): s1 can no longer take the
    session back, nor learn where it went. The report counts it lost and says why, the unreachable
    destination, rather than that it never arrived: here it did."""
    monkeypatch.setattr(orchestrator, "FIRST_ASK_WITHIN", 60.0)  # s1 asks only once the client left
    s1, s2 = nodes(2)
    session = connect(s1)
    report, flaky = migrate_through_flaky(s1, s2, UNREACHABLE_TRIES + 5)
    assert flaky.refused == UNREACHABLE_TRIES and report["lost"] == 1, report
    unreachable = "the destination is unreachable at {}:{}".format(*flaky.address)
    assert only_entry(report)["error"].startswith(
        f"lost: the client left the source and the destination never reported its arrival: {unreachable}"), report
    assert session.connected_to == s2.address
    echo_ok(session)
    session.close()


@pytest.mark.usefixtures("slow_client_switch")
@pytest.mark.parametrize("answers", [UNREACHABLE_TRIES - 1, UNREACHABLE_TRIES], ids=["one-under", "at-the-limit"])
def test_error_answers_count_as_failed_requests(nodes, answers):
    """An s2 that answers "have they landed?" with an error, time after time, cannot say either: past
    UNREACHABLE_TRIES of them in a row s1 takes the session back, where it asked until the deadline."""
    s1, s2 = nodes(2)
    session = connect(s1)
    error = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    report, flaky = migrate_through_flaky(s1, s2, answers, error)
    assert flaky.refused == answers, report
    entry = only_entry(report)
    if answers < UNREACHABLE_TRIES:
        assert report["migrated"] == 1 and entry["error"] is None, report
        assert session.connected_to == s2.address
    else:
        assert report["rolled_back"] == 1 and flaky.answered == 0, report
        assert entry["error"].startswith("rolled back: the destination cannot say how it went"), report
        wait_until(lambda: not session.migrating, what="the client to take s1's MIGRATE_CANCEL")
        assert session.connected_to == s1.address
    echo_ok(session)
    session.close()
