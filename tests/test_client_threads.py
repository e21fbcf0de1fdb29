"""The client for any program (spicewire.client.connect): its I/O runs in a thread of its own, so a
program that never enters gevent - here its main thread sits in time.sleep - still follows
migrations; every call works from any thread; its errors say what happened.

The servers are ``spicewire serve`` subprocesses: servers on this thread's gevent hub would stop
while the main thread sleeps in time.sleep, as the application's own thread does here.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import gevent
import pytest

from spicewire.client import ClientSession, PortChannel, ThreadedSession, connect
from spicewire.errors import LocalProtocolError, ReadTimeout, SessionClosed, SpiceTimeout

from .served import TOKEN, Served
from .serverkit import refused_port

ECHO = "org.test.echo"
BOUND = 30.0  # every wait in this file ends by then


def migrate(s1: Served, s2: Served, mode: str = "seamless") -> dict:
    return s1.request("POST", "/migrate", {
        "to": "{}:{}".format(*s2.address), "to_control": "{}:{}".format(*s2.control),
        "mode": mode, "timeout": 10, "to_token": TOKEN,
    }, timeout=BOUND)


def wait_for(predicate, what: str) -> None:
    """Poll ``predicate`` in time.sleep, as a program outside gevent would, up to BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def spice_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("spicewire-client")]


@pytest.fixture
def no_thread_left():
    before = set(threading.enumerate())
    yield
    assert spice_threads() == []
    assert set(threading.enumerate()) <= before


@pytest.fixture
def session(serve, no_thread_left):
    s1 = serve("--disable-ticketing")
    with connect(*s1.address, timeout=10) as session:
        yield session, s1


class EchoStream:
    """A writer thread and a reader thread on one echo port, checking every byte in order. The
    reader ends once the writer has ended and every byte it wrote came back."""

    def __init__(self, session: ThreadedSession) -> None:
        self.port = session.open_port(ECHO)
        self.sent = bytearray()  # written and not matched yet
        self.totals = {"sent": 0, "checked": 0}
        self.room = threading.Condition()  # the writer keeps at most 4 MiB unmatched
        self.stop = threading.Event()
        self.writing = True  # until the writer thread ends: no piece is counted after that
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._guard, args=(fn,)) for fn in (self._write, self._read)]
        for t in self.threads:
            t.start()

    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as err:
            self.errors.append(err)
            self.stop.set()
            with self.room:
                self.room.notify_all()

    def _write(self) -> None:
        rng = random.Random(7)
        block = os.urandom(1 << 16)
        try:
            while not self.stop.is_set():
                n = rng.randint(1, len(block))
                start = rng.randint(0, len(block) - n)
                piece = block[start : start + n]
                with self.room:
                    self.room.wait_for(
                        lambda: self.stop.is_set() or self.totals["sent"] - self.totals["checked"] < 4 << 20,
                        timeout=BOUND)
                    self.sent.extend(piece)
                    self.totals["sent"] += n
                    self.room.notify_all()  # a reader waiting for bytes owed
                self.port.write(piece)
        finally:
            with self.room:
                self.writing = False
                self.room.notify_all()

    def _read(self) -> None:
        while self._owed():
            got = self.port.read(None, timeout=BOUND)
            assert got, "the echo stream ended"
            with self.room:
                assert got == bytes(self.sent[: len(got)]), f"stream differs at byte {self.totals['checked']}"
                del self.sent[: len(got)]
                self.totals["checked"] += len(got)
                self.room.notify_all()

    def _owed(self) -> bool:
        """Until bytes are owed (True), or the writer ended and every byte came back (False). A
        read begun with every byte matched would wait for the writer's next piece, and if stop is
        set before the writer counts it, that piece never comes: the read ran into its timeout
        while finish() waited (seen on a loaded machine, after the last migration)."""
        with self.room:
            assert self.room.wait_for(lambda: self.totals["sent"] > self.totals["checked"] or not self.writing,
                                      timeout=BOUND), f"the writer wrote nothing for {BOUND:g} s"
            return self.totals["sent"] > self.totals["checked"]

    def checked(self) -> int:
        with self.room:
            return self.totals["checked"]

    def finish(self) -> None:
        self.stop.set()
        with self.room:
            self.room.notify_all()  # a writer waiting for room stops now
        for t in self.threads:
            t.join(BOUND)
        assert not any(t.is_alive() for t in self.threads), "the stream threads did not end"
        assert not self.errors, self.errors
        assert self.totals["checked"] == self.totals["sent"] > 0 and not self.sent


def test_a_program_sleeping_in_time_sleep_follows_seamless_migrations_back_and_forth(serve, no_thread_left):
    s1, s2 = serve("--disable-ticketing"), serve("--disable-ticketing")
    with connect(*s1.address) as session:
        stream = EchoStream(session)
        here, there = s1, s2
        try:
            for _ in range(4):  # s1 -> s2 -> s1 -> s2 -> s1
                before = stream.checked()
                wait_for(lambda before=before: stream.checked() > before + (256 << 10) or stream.errors,
                         "the stream to move")
                result: dict = {}
                migrator = threading.Thread(target=lambda h=here, t=there, r=result: r.update(migrate(h, t)))
                migrator.start()
                # The application's own thread does nothing but sleep while the migration runs:
                # the client answers BEGIN, relays MIGRATE_DATA and switches in its I/O thread.
                wait_for(lambda m=migrator: not m.is_alive(), "the migration")
                assert result["migrated"] == 1, result
                assert session.wait_migrated(BOUND) is not None
                assert not stream.errors, stream.errors
                here, there = there, here
        finally:
            stream.finish()
        assert [r["result"] for r in session.migrations] == ["completed"] * 4
        assert all(r["mode"] == "seamless" and not r["errors"] for r in session.migrations)
        assert session.connected_to == s1.address
        assert stream.totals["checked"] > 1 << 20


def test_a_sleeping_program_follows_a_semi_seamless_migration_too(serve, no_thread_left):
    s1, s2 = serve("--disable-ticketing"), serve("--disable-ticketing")
    with connect(*s1.address) as session:
        port = session.open_port(ECHO)
        result: dict = {}
        migrator = threading.Thread(target=lambda: result.update(migrate(s1, s2, "semi-seamless")))
        migrator.start()
        wait_for(lambda: not migrator.is_alive(), "the migration")
        assert result["migrated"] == 1, result
        assert session.wait_migrated(BOUND)["mode"] == "semi-seamless"
        assert session.connected_to == s2.address
        port.write(b"on s2")  # the same port object, re-linked on s2
        assert port.read(5, timeout=BOUND) == b"on s2"


def test_a_read_in_one_thread_gets_what_another_thread_wrote(session):
    session, _ = session
    port = session.open_port(ECHO)
    data = os.urandom(3 << 20)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(port.read(len(data), timeout=BOUND)))
    reader.start()
    port.write(data)
    reader.join(BOUND)
    assert got == [data]


def test_writes_from_several_threads_arrive_whole_each(session, monkeypatch):
    session, _ = session
    port = session.open_port(ECHO)
    send = PortChannel.send

    def send_after_a_yield(self, msg):
        gevent.sleep(0)  # in the I/O thread: as a send that blocks on a full socket would
        send(self, msg)

    monkeypatch.setattr(PortChannel, "send", send_after_a_yield)
    size = 1 << 20  # 16 of the client's 64 KiB DATA messages each
    blocks = [bytes([i]) * size for i in range(4)]
    writers = [threading.Thread(target=port.write, args=(block,)) for block in blocks]
    for t in writers:
        t.start()
    got = port.read(4 * size, timeout=BOUND)
    for t in writers:
        t.join(BOUND)
    pieces = [got[i : i + size] for i in range(0, len(got), size)]
    assert sorted(pieces) == blocks  # each write in one piece, in whatever order the threads came


def test_ports_opened_from_several_threads_are_the_same_object(session):
    session, _ = session
    ports: list = []
    threads = [threading.Thread(target=lambda: ports.append(session.open_port(ECHO))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND)
    assert len(ports) == 4 and all(p._port is ports[0]._port for p in ports)


def test_a_read_timeout_raises_and_leaves_what_arrived_for_the_next_read(session):
    session, _ = session
    port = session.open_port(ECHO)
    port.write(b"abc")
    wait_for(lambda: port.unread == 3, "the echo")
    with pytest.raises(ReadTimeout) as err:
        port.read(4, timeout=0.05)
    assert err.value.available == 3
    assert isinstance(err.value, SpiceTimeout) and isinstance(err.value, TimeoutError)
    assert port.read(3, timeout=BOUND) == b"abc"
    with pytest.raises(ReadTimeout):
        port.read(None, timeout=0.01)


def test_the_end_of_the_stream_is_told_apart_from_a_timeout(session):
    session, s1 = session
    port = session.open_port(ECHO)
    port.write(b"last words")
    wait_for(lambda: port.unread == 10, "the echo")
    s1.stop()  # the server goes away: the channel ends
    wait_for(lambda: port.closed, "the channel to close")
    assert port.read(64, timeout=BOUND) == b"last words"  # fewer than asked: the stream ended
    assert port.read(64, timeout=BOUND) == b""  # and only then b""
    assert list(port) == []
    with pytest.raises(SessionClosed):
        port.write(b"more")


def test_close_from_another_thread_ends_a_waiting_read_and_every_later_call(serve, no_thread_left):
    s1 = serve("--disable-ticketing")
    session = connect(*s1.address)
    port = session.open_port(ECHO)
    outcome: list[BaseException] = []
    submitted = threading.Event()

    def wait_forever() -> None:
        call = port.submit_read(1, None)
        submitted.set()
        try:
            call.result()
        except SessionClosed as err:
            outcome.append(err)

    reader = threading.Thread(target=wait_forever)
    reader.start()
    assert submitted.wait(BOUND)
    assert session.connected_to == s1.address  # queued after the read: the read is waiting now
    assert reader.is_alive()
    closer = threading.Thread(target=session.close)
    closer.start()
    closer.join(BOUND)
    reader.join(BOUND)
    assert not reader.is_alive() and len(outcome) == 1
    assert session.closed
    for call in (lambda: port.read(1, timeout=1), lambda: port.write(b"x"), lambda: session.open_port(ECHO),
                 lambda: session.wait_migrated(1)):
        with pytest.raises(SessionClosed):
            call()
    session.close()  # twice is fine


def test_the_gevent_native_session_refuses_other_threads_with_a_clear_error(serve):
    s1 = serve("--disable-ticketing")
    with ClientSession(*s1.address) as native:
        port = native.open_port(ECHO)
        errors: list[BaseException] = []

        def elsewhere() -> None:
            for call in (lambda: port.read(1, timeout=1), lambda: port.write(b"x"), lambda: native.open_port(ECHO),
                         lambda: native.wait_migrated(1)):
                try:
                    call()
                except LocalProtocolError as err:
                    errors.append(err)

        other = threading.Thread(target=elsewhere)
        other.start()
        other.join(BOUND)
        assert len(errors) == 4 and all("spicewire.client.connect" in str(e) for e in errors)
        port.write(b"here")  # its own thread goes on using it
        assert port.receive(4, timeout=BOUND) == b"here"


def test_a_refused_connect_raises_and_leaves_no_thread(no_thread_left):
    with refused_port() as port, pytest.raises(ConnectionRefusedError):
        connect("127.0.0.1", port, timeout=5)


def test_importing_the_client_patches_nothing():
    code = ("import spicewire, spicewire.client, spicewire.aio, gevent.monkey, socket, threading;"
            "print(gevent.monkey.is_anything_patched(), socket.socket.__module__, threading.Thread.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "socket", "threading"]
