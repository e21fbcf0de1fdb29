"""spice-gtk follows `spicewire serve` migrations (PROTOCOL.md 5, 5.9) while data streams.

Two `spicewire serve` processes with an echo and a sink port; spice-gtk (the driver in streaming
mode) writes the echo stream to s1 and checks every echoed byte while the test migrates the
session with ``POST /migrate``, back and forth.  Where each channel is connected is read both
from spice-gtk (the driver's ``peers``: each channel's socket) and from /proc (the driver process'
TCP connections).

After a seamless migration spice-gtk 0.42 closes its s1 main connection only when s2 next sends
something on main: the hidden migration session's main channel sleeps on the s2 main socket it had
handed over (spice-channel.c: spice_channel_disconnect sets a MIGRATING channel READY without a
wakeup). spice-server as s2 sends MULTI_MEDIA_TIME at once, and so does spicewire's s2;
``test_seamless_source_lets_go_of_the_session_once_it_landed`` holds s1 to letting go at once.
"""

import time

import pytest

from . import peers
from .peers.spicegtk import start_driver
from .served import TOKEN
from .serverkit import refused_port

pytestmark = pytest.mark.peer

ECHO = "org.spicewire.echo"
PORTS = ("--disable-ticketing", "--port-channel", f"{ECHO}=echo", "--port-channel", "org.spicewire.sink=sink")
CHANNELS = 3  # main + two ports


def migrate(src, dst, mode="seamless", to_port=None, timeout=10.0) -> dict:
    body = {"to": f"127.0.0.1:{to_port or dst.address[1]}", "to_control": f"127.0.0.1:{dst.control[1]}",
            "mode": mode, "timeout": timeout, "to_token": TOKEN}
    return src.request("POST", "/migrate", body, timeout=timeout + 30)


def sessions(served) -> list[dict]:
    return served.get("/sessions")["sessions"]


def wait_for(predicate, timeout: float, what: str, driver=None):
    """``driver``: on a timeout, the failure also says what the driver was doing."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = f"; the driver: {driver.last_words()}" if driver is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{said}")
        time.sleep(0.05)


def echoed_bytes(served, driver) -> int:
    """What the echo device(s) on ``served`` have taken so far; fails if the driver ended."""
    if driver.proc.poll() is not None:
        pytest.fail(f"driver ended early: {driver.report()}")
    return sum(p["device"]["bytes_in"] for s in sessions(served) for p in s["ports"] if p["name"] == ECHO)


def wait_streaming(served, driver, more: int = 1) -> None:
    """Until the echo device on ``served`` has taken ``more`` bytes beyond what it had (the driver
    is streaming there)."""
    before = echoed_bytes(served, driver)
    wait_for(lambda: echoed_bytes(served, driver) >= before + more, 20, f"{more} more bytes of the stream", driver)


def connections_to(driver, served) -> int:
    return sum(1 for _, port in driver.connections() if port == served.address[1])


def assert_landed(report: dict, mode: str) -> dict:
    assert report["migrated"] == 1 and report["stayed"] == 0, report
    (entry,) = report["sessions"]
    assert entry["migrated"] and entry["mode"] == mode and entry["error"] is None, report
    assert entry["downtime_s"] >= 0 and entry["pre_migration_s"] > 0, report  # durations: see make bench
    return entry


def assert_whole_session_on(served, session_id: str) -> None:
    (session,) = sessions(served)
    assert session["session_id"] == session_id and session["migration"] is None, session
    assert session["main"] is not None
    assert [p["connected"] for p in session["ports"]] == [True, True], session


def migration_ends(rep: dict) -> list[dict]:
    """The driver's migration-state -> none notifications (one per finished migration)."""
    return [e for e in rep["events"] if e["what"] == "session-notify" and e["prop"] == "migration-state"
            and e["value"] == "none"]


def echo_port(served) -> dict:
    (session,) = sessions(served)
    return next(p for p in session["ports"] if p["name"] == ECHO)


def echo_lever(served, session_id: str, lever: str) -> dict:
    """Pause or resume the echo device: paused, it is a guest that stops reading its port."""
    return served.request("POST", f"/sessions/{session_id}/ports/{ECHO}/{lever}")["device"]


HELD = 256 << 10  # what the paused echo holds on s1 before the first migration (the driver writes up to 1 MiB ahead)


def test_seamless_migrations_back_and_forth_keep_the_echo_stream_byte_exact(serve):
    """The first migration leaves with the echo paused and spice-gtk's bytes held on s1, so that
    one is sure to carry port data in MIGRATE_DATA (the others carry whatever the timing left
    queued, often nothing); s2 resumes the echo and the stream goes on."""
    peers.require("spicegtk")
    servers = [serve(*PORTS), serve(*PORTS)]
    driver = start_driver(servers[0].address[1], port_name=ECHO, expect_echo=True, stream_seconds=90, timeout=20)
    with driver:
        wait_streaming(servers[0], driver)
        session_id = sessions(servers[0])[0]["session_id"]
        assert echo_lever(servers[0], session_id, "pause")["paused"] is True
        held = wait_for(lambda: (n := echo_port(servers[0])["to_device_bytes"]) >= HELD and n,
                        10, f"{HELD} bytes held for the paused echo", driver)
        entries = []
        for n in range(5):
            src, dst = servers[n % 2], servers[(n + 1) % 2]
            wait_for(lambda dst=dst: not sessions(dst), 5, "the old server to drop the session")
            entries.append(assert_landed(migrate(src, dst), "seamless"))
            assert entries[-1]["bytes_dropped"] == 0
            if n == 0:  # what the paused echo held travelled, and the echo is still paused on s2
                assert entries[0]["in_flight_bytes_moved"] >= held, (held, entries[0])
                assert echo_port(dst)["device"]["paused"] is True
                assert echo_lever(dst, session_id, "resume")["paused"] is False
            assert_whole_session_on(dst, session_id)
            wait_for(lambda dst=dst: connections_to(driver, dst) == CHANNELS, 5, "every channel on the destination")
            # at most the abandoned main connection is left on the source, and it goes
            assert connections_to(driver, src) <= 1
            wait_for(lambda src=src: not sessions(src), 5, "the source to drop the session")
            assert connections_to(driver, src) == 0
        wait_streaming(servers[1], driver, more=1 << 20)  # stream on the last server too
        driver.stop_stream()
        rep = driver.report()
    last = servers[1]
    assert rep["ok"], rep
    stream = rep["stream"]
    assert stream["mismatch"] is None and stream["byte_exact"], stream
    assert len(stream["epochs"]) == 1 and stream["bytes_echoed"] == stream["bytes_written"] > 8 << 20, stream
    assert rep["port_inits"] == 1  # no PORT_INIT after a seamless switch (5.9 item 8)
    ends = migration_ends(rep)
    assert len(ends) == 5, rep["events"]
    for n, end in enumerate(ends):
        port = servers[(n + 1) % 2].address[1]
        assert set(end["peers"].values()) == {f"127.0.0.1:{port}"} and end["session_port"] == str(port), end
    assert set(rep["peers"].values()) == {f"127.0.0.1:{last.address[1]}"}, rep["peers"]
    assert rep["session_port"] == str(last.address[1])


def test_seamless_source_lets_go_of_the_session_once_it_landed(serve):
    peers.require("spicegtk")
    s1, s2 = serve(*PORTS), serve(*PORTS)
    driver = start_driver(s1.address[1], port_name=ECHO, expect_echo=True, stream_seconds=30, timeout=20)
    with driver:
        wait_streaming(s1, driver)
        assert_landed(migrate(s1, s2), "seamless")
        wait_for(lambda: not sessions(s1), 20, "s1 to drop the session")
        wait_streaming(s2, driver, more=1 << 20)
        driver.stop_stream()
        rep = driver.report()
    assert rep["ok"], rep
    # s1 let go because the session landed (it closed, or spice-gtk left), not because its
    # post-migration timer ran out while spice-gtk held its s1 main connection
    assert "did not leave after the migration" not in s1.output(), s1.output()


def test_semi_seamless_migrations_lose_in_flight_data_and_the_echo_resumes(serve):
    peers.require("spicegtk")
    s1, s2 = serve(*PORTS), serve(*PORTS)
    driver = start_driver(s1.address[1], port_name=ECHO, expect_echo=True, stream_seconds=60, resync=True,
                          timeout=20)
    with driver:
        wait_streaming(s1, driver)
        session_id = sessions(s1)[0]["session_id"]
        reports = []
        for src, dst in ((s1, s2), (s2, s1)):
            # semi-seamless: spice-gtk closes every s1 connection, the session goes at once
            entry = assert_landed(migrate(src, dst, "semi-seamless"), "semi-seamless")
            reports.append(entry)
            assert_whole_session_on(dst, session_id)
            wait_for(lambda src=src: not sessions(src), 5, "the source to drop the session")

            def moved(src=src, dst=dst) -> bool:
                return connections_to(driver, dst) == CHANNELS and connections_to(driver, src) == 0

            wait_for(moved, 5, "every channel on the destination", driver)
            wait_streaming(dst, driver, more=2 << 20)  # the echo works on the destination
        driver.stop_stream()
        rep = driver.report()
    assert rep["ok"], rep
    stream = rep["stream"]
    assert stream["mismatch"] is None, stream
    epochs = stream["epochs"]
    assert len(epochs) == 3 and rep["port_inits"] == 3, stream  # PORT_INIT again on each s2 (5.3)
    # In flight when the migration happened: lost by design.  What s1 reports dropped (its own
    # buffers) is part of it; the rest was in socket buffers and spice-gtk's queue.
    # epoch i ended with migration i; the last epoch ended with the test
    for entry, epoch in zip(reports, epochs[:-1], strict=True):
        assert entry["in_flight_bytes_moved"] == 0
        assert epoch["lost"] > 0 and 0 <= entry["bytes_dropped"] <= epoch["lost"], (entry, epoch)
        assert all(r["exact"] for r in epoch.get("stale_ranges", [])), epoch
    # After the last migration the echo is byte-exact again, and plenty of it.
    assert epochs[-1]["lost"] == 0 and epochs[-1]["echoed"] == epochs[-1]["written"] > 1 << 20, epochs
    assert set(rep["peers"].values()) == {f"127.0.0.1:{s1.address[1]}"}, rep["peers"]


def test_spicegtk_stays_on_s1_when_the_destination_is_unreachable(serve):
    peers.require("spicegtk")
    s1, s2 = serve(*PORTS), serve(*PORTS)
    driver = start_driver(s1.address[1], port_name=ECHO, expect_echo=True, stream_seconds=30, timeout=20)
    with driver, refused_port() as closed:  # spice-gtk's link to "s2" fails there
        wait_streaming(s1, driver)
        session_id = sessions(s1)[0]["session_id"]
        report = migrate(s1, s2, to_port=closed)
        assert report["migrated"] == 0 and report["stayed"] == 1, report
        (entry,) = report["sessions"]
        assert not entry["migrated"] and entry["error"] and entry["bytes_dropped"] == 0, report
        assert sessions(s2) == []
        assert_whole_session_on(s1, session_id)
        assert connections_to(driver, s1) == CHANNELS
        # the echo goes on, on s1
        wait_streaming(s1, driver, more=1 << 20)
        # and the session can still migrate for real afterwards
        assert_landed(migrate(s1, s2), "seamless")
        assert_whole_session_on(s2, session_id)
        wait_streaming(s2, driver, more=1 << 20)
        driver.stop_stream()
        rep = driver.report()
    assert rep["ok"], rep
    assert rep["stream"]["byte_exact"] and rep["stream"]["mismatch"] is None, rep["stream"]
    errors = [e for e in rep["events"] if e["what"] == "migration-channel-event" and e["event"].startswith("error")]
    assert errors and errors[0]["channel"] == "main:0" and errors[0]["event"] == "error-connect", rep["events"]
    assert len(migration_ends(rep)) == 2  # the aborted attempt (-> none) and the real one
    assert set(rep["peers"].values()) == {f"127.0.0.1:{s2.address[1]}"}, rep["peers"]
