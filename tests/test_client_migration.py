"""The client follows migrations (PROTOCOL.md 5.2-5.6): against scripted fake servers, and against
QEMU -> QEMU migrations (seamless, semi-seamless, connect error)."""

from __future__ import annotations

import hashlib
import os
import struct
import time
import tracemalloc

import gevent
import gevent.event
import gevent.queue
import gevent.server
import pytest
from gevent import socket

from spicewire.client import MAIN_CAPS, ClientSession
from spicewire.protocol import messages as m
from spicewire.protocol.caps import caps_to_words, has_cap
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import ChannelType, MainCap, Msg, Msgc
from spicewire.protocol.framing import MINI_HEADER
from spicewire.protocol.link import LinkEstablished, LinkRequested, ServerLink
from spicewire.protocol.migration import build_main_migrate_data

from . import peers
from .peers import echo_bios
from .peers.qemu import QemuSpice, SpicePort, free_port
from .serverkit import read_exactly, recv_exactly, refused_port

SESSION_ID = 0x5EED1234
PORT_NAME = "org.test.echo"
BIG = 64 << 20


# --- scripted servers ------------------------------------------------------------------------


class FakeConn:
    """One linked channel of a FakeServer: framed messages both ways, or raw bytes."""

    def __init__(self, sock: socket.socket, req: LinkRequested, est: LinkEstablished) -> None:
        self.sock, self.req, self.key = sock, req, (req.channel_type, req.channel_id)
        self.channel = ChannelConnection(Side.SERVER, req.channel_type, req.channel_id,
                                         send_mini=est.send_mini_header, expect_mini=est.expect_mini_header)
        self.pending = bytearray(est.trailing)

    def send(self, msg: m.Message) -> None:
        self.channel.send(msg)
        self.sock.sendall(b"".join(self.channel.data_to_send()))

    def messages(self):
        """Decoded client messages until the client closes."""
        if self.pending:
            yield from self.channel.receive_data(bytes(self.pending))
            self.pending.clear()
        while data := self.sock.recv(65536):
            yield from self.channel.receive_data(data)

    def recv_exact(self, n: int) -> bytes:
        while len(self.pending) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("client closed")
            self.pending += data
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out


def main_listing(*channel_types: int, session_id: int = SESSION_ID):
    """A scripted main channel: MAIN_INIT, then a channel 0 of each of ``channel_types`` when the
    client asks which channels there are."""
    listed = tuple(m.ChannelId(t, 0) for t in channel_types)

    def main(server, conn):
        conn.send(m.MsgMainInit(session_id, 0, 1, 1, 0, 10, 0, 0))
        for msg in conn.messages():
            if isinstance(msg, m.MsgcMainAttachChannels):
                conn.send(m.MsgMainChannelsList(listed))

    return main


class FakeServer:
    """Links every channel (no password), then runs ``handlers[channel_type](server, conn)``."""

    def __init__(self, handlers, main_caps=(MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.SEAMLESS_MIGRATE)) -> None:
        self.handlers = handlers
        self.main_caps = caps_to_words(main_caps)
        self.conns: dict[tuple, FakeConn] = {}
        self.linked = gevent.event.Event()
        self.events = gevent.queue.Queue()
        # A script that stops at a point of interest (s1 before its MIGRATE_DATA, s2 before its
        # MAIN_INIT) waits here; a test clears it to make writes inside that window, then sets it.
        self.gate = gevent.event.Event()
        self.gate.set()
        self.failures: list[str] = []  # scripts that broke; a test fails on any (``check``)
        self.listener = gevent.server.StreamServer(("127.0.0.1", 0), self._serve)
        self.listener.start()
        self.port = self.listener.server_port

    def _serve(self, sock, addr) -> None:
        link = ServerLink(time.time())
        while True:
            event = link.next_event()
            sock.sendall(link.data_to_send())
            if isinstance(event, LinkRequested):
                req = event
                link.accept(self.main_caps if req.channel_type == ChannelType.MAIN else ())
                sock.sendall(link.data_to_send())
            elif isinstance(event, LinkEstablished):
                break
            else:
                data = sock.recv(65536)
                if not data:
                    return
                link.receive_data(data, time.time())
        conn = FakeConn(sock, req, event)
        self.conns[conn.key] = conn
        name = ChannelType(req.channel_type).name.lower()
        try:
            self.handlers[req.channel_type](self, conn)
        except OSError as err:  # the client hung up, or stop() closed the socket: how scripts end
            self.events.put(("hung up", name, str(err)))
        except Exception as err:  # an assertion in a script runs in its own greenlet: say so
            self.failures.append(f"{name}: {err!r}")
            raise
        finally:
            sock.close()
            self.events.put(("closed", name))

    def stop(self) -> None:
        self.listener.stop()
        for conn in self.conns.values():
            conn.sock.close()

    def check(self) -> None:
        assert not self.failures, self.failures


def pattern_chunks(total: int, block: memoryview):
    """``total`` bytes of a repeating random block, each repetition stamped with its index, so a
    lost, doubled or swapped chunk changes the digest; no chunk is ever materialised."""
    index, sent = 0, 0
    while sent < total:
        stamp = struct.pack("<Q", index)
        part = block[: min(len(block), total - sent)]
        yield stamp[: len(part)]
        if len(part) > 8:
            yield part[8:]
        sent += len(part)
        index += 1


def s1_main(server: FakeServer, conn: FakeConn) -> None:
    conn.send(m.MsgMainInit(SESSION_ID, 0, 1, 1, 0, 10, 0, 0))
    for msg in conn.messages():
        server.events.put(("s1", "main", type(msg).__name__))
        if isinstance(msg, m.MsgcMainAttachChannels):
            conn.send(m.MsgMainChannelsList((m.ChannelId(ChannelType.PORT, 0),)))
        elif isinstance(msg, m.MsgcMigrateFlushMark):
            conn.send(m.MsgMigrateData(build_main_migrate_data()))


def pass_gate(server: FakeServer) -> None:
    if not server.gate.wait(30):
        raise RuntimeError("the test never opened the script's gate")


def s1_port(server: FakeServer, conn: FakeConn) -> None:
    conn.send(m.MsgPortInit(PORT_NAME, 1))
    server.linked.set()
    for msg in conn.messages():
        if isinstance(msg, m.MsgcSpicevmcData):
            server.port_data.append(bytes(msg.data))
            if not server.migrating:  # s1 sends nothing after MIGRATE
                conn.send(m.MsgSpicevmcData(bytes(msg.data)))  # the "device" echoes
        elif isinstance(msg, m.MsgcMigrateFlushMark):
            server.events.put(("s1", "port", "MsgcMigrateFlushMark"))
            pass_gate(server)  # writes made meanwhile wait in the client for s2
            digest = hashlib.sha256()
            conn.sock.sendall(conn.channel.send_streamed(Msg.MIGRATE_DATA, server.big_size))
            for piece in pattern_chunks(server.big_size, server.block):
                digest.update(piece)
                conn.sock.sendall(piece)
            server.sent_digest = digest.hexdigest()


def s2_main(server: FakeServer, conn: FakeConn) -> None:
    assert conn.req.connection_id == SESSION_ID
    for msg in conn.messages():
        server.events.put(("s2", "main", type(msg).__name__))
        if isinstance(msg, m.MsgcMainMigrateDstDoSeamless):
            conn.send(m.MsgMainMigrateDstSeamlessAck())
        elif isinstance(msg, m.MsgcMainMigrateEnd):  # semi-seamless (5.3)
            pass_gate(server)  # writes made meanwhile wait in the client
            conn.send(m.MsgMainInit(SESSION_ID, 0, 1, 1, 0, 10, 0, 0))
            server.conns[ChannelType.PORT, 0].send(m.MsgPortInit(PORT_NAME, 1))


def s2_port_semi_seamless(server: FakeServer, conn: FakeConn) -> None:
    for msg in conn.messages():
        if isinstance(msg, m.MsgcSpicevmcData):
            server.port_data.append(bytes(msg.data))
            conn.send(m.MsgSpicevmcData(b"s2:" + bytes(msg.data)))


def s2_port(server: FakeServer, conn: FakeConn) -> None:
    """The first client message must be MIGRATE_DATA; its body is hashed as it comes."""
    assert conn.req.connection_id == SESSION_ID
    msg_type, size = MINI_HEADER.unpack(conn.recv_exact(MINI_HEADER.size))
    server.events.put(("s2", "port", f"type {msg_type}"))
    digest, left = hashlib.sha256(), size
    if conn.pending:
        head = bytes(conn.pending[:left])
        del conn.pending[: len(head)]
        digest.update(head)
        left -= len(head)
    buf = bytearray(256 << 10)
    while left:
        n = conn.sock.recv_into(buf, min(len(buf), left))
        if n == 0:
            raise ConnectionError("client closed inside MIGRATE_DATA")
        digest.update(memoryview(buf)[:n])
        left -= n
    server.received = (msg_type, size, digest.hexdigest())
    server.events.put(("s2", "port", "MIGRATE_DATA received"))
    # Every channel is restored: a real s2 says so on main (spice-server and ours: MULTI_MEDIA_TIME).
    if not getattr(server, "silent_main", False):
        server.conns[ChannelType.MAIN, 0].send(m.MsgMainMultiMediaTime(1))
    conn.send(m.MsgPortInit("ignored after a seamless migration", 1))
    conn.channel.passed_through()  # MIGRATE_DATA was read raw
    for msg in conn.messages():
        if isinstance(msg, m.MsgcSpicevmcData):
            server.port_data.append(bytes(msg.data))
            conn.send(m.MsgSpicevmcData(b"s2:" + bytes(msg.data)))


@pytest.fixture
def fake_pair():
    s1 = FakeServer({ChannelType.MAIN: s1_main, ChannelType.PORT: s1_port})
    s2 = FakeServer({ChannelType.MAIN: s2_main, ChannelType.PORT: s2_port})
    s1.big_size, s1.block = BIG, memoryview(os.urandom(1 << 20))
    s1.migrating, s1.port_data, s2.port_data = False, [], []
    yield s1, s2
    s1.stop()
    s2.stop()
    s1.check()
    s2.check()


def seen(queue, event, timeout: float = 5.0) -> bool:
    """Whether ``event`` arrives on ``queue`` within ``timeout`` (earlier events are skipped)."""
    try:
        with gevent.Timeout(timeout):
            while queue.get() != event:
                pass
    except gevent.Timeout:
        return False
    return True


def wait_links_closed(server, timeout: float = 5.0) -> None:
    """Until ``server`` has seen both the client's main and port links close."""
    closed = set()
    with gevent.Timeout(timeout):
        while closed != {("closed", "main"), ("closed", "port")}:
            event = server.events.get()
            if event[0] == "closed":
                closed.add(event)


def dst_info(port: int) -> m.MigrationDstInfo:
    return m.MigrationDstInfo(port, 0, "127.0.0.1")


# --- rules, against scripted servers ---------------------------------------------------------


def test_client_advertises_the_migration_caps_it_honours():
    words = caps_to_words(MAIN_CAPS)
    assert all(has_cap(words, cap) for cap in MainCap)


def test_seamless_migrate_data_is_streamed_byte_exact_with_little_buffered(fake_pair):
    """64 MiB of port MIGRATE_DATA goes s1 -> client -> s2 unchanged while the client holds a few
    hundred KiB; writes made during the switch reach s2 after the MIGRATE_DATA, in order."""
    s1, s2 = fake_pair
    with ClientSession("127.0.0.1", s1.port) as session:
        port = session.open_port(PORT_NAME)
        port.write(b"before")
        assert read_exactly(port, 6) == b"before"
        s1.port_data.clear()
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMainMigrateBeginSeamless(dst_info(s2.port), 1))
        assert session.migration_connected_event.wait(5)
        assert seen(s1.events, ("s1", "main", "MsgcMainMigrateConnectedSeamless"))

        tracemalloc.start()
        tracemalloc.reset_peak()
        # Writes in three windows: s1 takes the first, the client holds the second while s1 keeps
        # its MIGRATE_DATA back (after the port's flush mark), s2 takes the third after the switch.
        to_s1, held, after = ([b"%d;" % i for i in r] for r in (range(10), range(10, 30), range(30, 40)))
        for w in to_s1:
            port.write(w)
        assert wait_for(lambda: sum(map(len, s1.port_data)) == len(b"".join(to_s1)), 10), s1.port_data
        s1.migrating = True
        s1.gate.clear()
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMigrate(3))
        s1.conns[ChannelType.PORT, 0].send(m.MsgMigrate(3))
        assert seen(s1.events, ("s1", "port", "MsgcMigrateFlushMark"))
        gevent.spawn(lambda: [port.write(w) for w in held]).get(timeout=10)  # bounded: none may block
        s1.gate.set()
        report = session.wait_migrated(timeout=60)
        for w in after:
            port.write(w)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

        assert report is not None and report["mode"] == "seamless"
        assert s2.received == (Msgc.MIGRATE_DATA, BIG, s1.sent_digest)
        assert report["relayed"] == {"main:0": 65, "port:0": BIG}
        assert report["peak_relay_buffer"] <= 2 << 20  # one relay chunk, never the whole message
        assert peak < 8 << 20, f"client peak {peak} bytes while relaying {BIG}"
        assert wait_for(lambda: sum(map(len, s2.port_data)) == len(b"".join(held + after)), 10), s2.port_data
        # each write reached exactly one server, in order: s1 up to its flush mark, then s2
        assert b"".join(s1.port_data) == b"".join(to_s1)
        assert b"".join(s2.port_data) == b"".join(held + after)
        assert session.connected_to == ("127.0.0.1", s2.port)
        assert port.sock.getpeername()[1] == s2.port
        # s1 echoed what it took before MIGRATE, s2 echoes everything it took, prefixed
        echoes = b"".join(to_s1) + b"".join(b"s2:" + w for w in held + after)
        assert read_exactly(port, len(echoes)) == echoes
        port.write(b"after")
        assert read_exactly(port, 8) == b"s2:after"


def test_seamless_completes_after_the_grace_when_s2_never_speaks(fake_pair, monkeypatch):
    """s1's sockets stay open after the last switch until s2's main speaks; one that never does is
    taken as done after CONFIRM_GRACE, and only then are s1's sockets closed."""
    from spicewire.client import migration as client_migration

    # Long enough that the checks right after the relay always fall inside it; nothing but the
    # grace can end this migration, since s2 stays silent and s1 keeps its sockets open.
    monkeypatch.setattr(client_migration, "CONFIRM_GRACE", 3.0)
    s1, s2 = fake_pair
    s1.big_size, s2.silent_main = 1 << 20, True
    with ClientSession("127.0.0.1", s1.port) as session:
        port = session.open_port(PORT_NAME)
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMainMigrateBeginSeamless(dst_info(s2.port), 1))
        assert session.migration_connected_event.wait(5)
        s1.migrating = True
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMigrate(3))
        s1.conns[ChannelType.PORT, 0].send(m.MsgMigrate(3))
        assert seen(s2.events, ("s2", "port", "MIGRATE_DATA received"))
        assert session.migrating and not session.migrations  # still waiting for s2 to speak
        assert all(event[0] != "closed" for event in list(s1.events.queue)), "s1 let go before the grace"
        report = session.wait_migrated(timeout=30)
        assert report is not None and report["result"] == "completed"
        wait_links_closed(s1)
        assert port.sock.getpeername()[1] == s2.port


def test_agent_connected_tokens_replace_the_token_count(fake_pair):
    s1, _ = fake_pair
    with ClientSession("127.0.0.1", s1.port) as session:
        assert session.main.agent_tokens == 10  # MAIN_INIT
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMainAgentConnectedTokens(7))
        assert wait_for(lambda: session.main.agent_tokens == 7, 5)  # replaces (7.3)
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMainAgentToken(3))
        assert wait_for(lambda: session.main.agent_tokens == 10, 5)  # adds


def test_closing_the_session_mid_migration_closes_the_s2_links(fake_pair):
    s1, s2 = fake_pair
    session = ClientSession("127.0.0.1", s1.port).connect()
    session.open_port(PORT_NAME)
    s1.conns[ChannelType.MAIN, 0].send(m.MsgMainMigrateBeginSeamless(dst_info(s2.port), 1))
    assert session.migration_connected_event.wait(5)
    session.close()
    wait_links_closed(s2)


def test_anything_but_migrate_data_after_migrate_keeps_the_channel_on_s1(fake_pair):
    s1, s2 = fake_pair
    with ClientSession("127.0.0.1", s1.port) as session:
        port = session.open_port(PORT_NAME)
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMainMigrateBeginSeamless(dst_info(s2.port), 1))
        assert session.migration_connected_event.wait(5)
        s1_port_conn = s1.conns[ChannelType.PORT, 0]
        s1_port_conn.send(m.MsgMigrate(2))  # NEED_DATA_TRANSFER only: no flush mark, no data
        s1_port_conn.send(m.MsgSpicevmcData(b"not migrate data"))
        s1_port_conn.send(m.MsgSpicevmcData(b"next"))
        assert read_exactly(port, 4) == b"next"  # the offending message is dropped (5.4 step 2)
        assert any("MIGRATE_DATA must follow MIGRATE" in e for e in session._migration.report.errors)
        assert port.peer.value == "s1" and port.sock.getpeername()[1] == s1.port
        port.write(b"still s1")
        assert read_exactly(port, 8) == b"still s1"


def test_link_failure_answers_connect_error_and_the_session_stays(fake_pair):
    s1, _ = fake_pair
    with refused_port() as closed, ClientSession("127.0.0.1", s1.port) as session:
        port = session.open_port(PORT_NAME)
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMainMigrateBegin(dst_info(closed)))
        with gevent.Timeout(5):
            while not session.migrations:
                gevent.sleep(0.01)
        assert session.migrations[-1]["result"] == "connect-error"
        assert seen(s1.events, ("s1", "main", "MsgcMainMigrateConnectError"))
        port.write(b"ping")
        assert read_exactly(port, 4) == b"ping"


# --- against QEMU ----------------------------------------------------------------------------


def qemu_pair(seamless: bool, lifetime: float = 120.0):
    """s1 and s2 (waiting for the VM on ``s2.incoming_port``), not started yet."""
    opts = f"seamless-migration={'on' if seamless else 'off'}"
    port = [SpicePort(PORT_NAME, "isa")]
    bios = echo_bios.build()
    s1 = QemuSpice(ports=port, bios=bios, spice_opts=opts, lifetime=lifetime)
    s2 = QemuSpice(ports=port, bios=bios, spice_opts=opts, lifetime=lifetime, incoming=True)
    return s1, s2


def echo(port, payload: bytes, timeout: float = 20.0) -> bool:
    port.write(payload)
    return port.read(len(payload), timeout=timeout) == payload


def wait_for(predicate, timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` while letting the client's greenlets run (QMP calls block the hub)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(step)
    return predicate()


def migrate_vm(s1: QemuSpice, s2: QemuSpice, timeout: float = 30.0, via_port: int | None = None) -> str:
    """Migrate the VM from s1 to s2 (through ``via_port`` if given, a relay to s2's incoming port).

    With the return path, s1 completes, and only then sends the client its MIGRATE, once s2 has
    loaded the device state: without it s1 completes when the stream is written, and s2's
    spice-server, whose char devices run during the load, may put client bytes into a serial port
    whose state the load then overwrites (tests/test_qemu_migration_order.py)."""
    s1.qmp_command("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
    s1.qmp_command("migrate", uri=f"tcp:127.0.0.1:{via_port or s2.incoming_port}")
    status = {}

    def done():
        status.update(s1.qmp_command("query-migrate"))
        return status.get("status") in ("completed", "failed", "cancelled")

    wait_for(done, timeout, step=0.1)
    return status.get("status")


def run_qemu_migration(seamless: bool):
    peers.require("qemu")
    s1, s2 = qemu_pair(seamless)
    with s1, s2, ClientSession("127.0.0.1", s1.spice_port) as session:
        port = session.open_port(PORT_NAME)
        assert echo(port, b"hello s1\n" * 10)
        t0 = time.monotonic()
        s1.qmp_command("client_migrate_info", protocol="spice", hostname="127.0.0.1", port=s2.spice_port)
        assert wait_for(session.migration_connected_event.is_set, 15), session.migrations
        connected = time.monotonic() - t0
        assert migrate_vm(s1, s2) == "completed"
        report = session.wait_migrated(timeout=20)
        assert report is not None, (session.migrations, s1.log(), s2.log())
        after = b"hello s2 after migration\n" * 10
        assert echo(port, after), s2.log()
        on = {ch.sock.getpeername()[1] for _, ch in session.all_channels()}
        assert on == {s2.spice_port}
        report["wall_to_connected"] = connected
        return report


@pytest.mark.peer
def test_client_follows_a_seamless_qemu_migration():
    report = run_qemu_migration(seamless=True)
    assert report["mode"] == "seamless" and report["result"] == "completed"
    assert set(report["relayed"]) == {"main:0", "port:0"}
    assert report["relayed"]["main:0"] >= 65 and report["relayed"]["port:0"] >= 33
    print("seamless report", report)


@pytest.mark.peer
def test_client_follows_a_semi_seamless_qemu_migration():
    report = run_qemu_migration(seamless=False)
    assert report["mode"] == "semi-seamless" and report["result"] == "completed"
    assert report["relayed"] == {}
    print("semi-seamless report", report)


@pytest.mark.peer
def test_qemu_connect_error_keeps_the_session_on_s1():
    peers.require("qemu")
    s1 = QemuSpice(ports=[SpicePort(PORT_NAME, "isa")], bios=echo_bios.build(),
                   spice_opts="seamless-migration=on", lifetime=60)
    with refused_port() as closed, s1, ClientSession("127.0.0.1", s1.spice_port) as session:
        port = session.open_port(PORT_NAME)
        assert echo(port, b"before\n")
        s1.qmp_command("client_migrate_info", protocol="spice", hostname="127.0.0.1", port=closed)
        assert wait_for(lambda: session.migrations, 15)
        assert session.migrations[-1]["result"] == "connect-error"
        assert "Connection refused" in " ".join(session.migrations[-1]["errors"])
        assert not session.migrating
        assert session.connected_to == ("127.0.0.1", s1.spice_port)
        assert echo(port, b"still on s1\n" * 5)


@pytest.mark.peer
def test_client_follows_switch_host_after_a_connect_error():
    """5.5/5.6: the client could not reach s2 when asked, so at the end s1 sends SWITCH_HOST and the
    client starts a new session there (connection id 0) and re-opens its port by name."""
    peers.require("qemu")
    s2_spice = free_port()  # fixed before s2 starts: s1 names it to the client first
    s1, s2 = qemu_pair(True, lifetime=60)
    s2.spice_port = s2_spice
    with s1, ClientSession("127.0.0.1", s1.spice_port) as session:
        port = session.open_port(PORT_NAME)
        assert echo(port, b"before\n")
        old_id = session.session_id
        s1.qmp_command("client_migrate_info", protocol="spice", hostname="127.0.0.1", port=s2_spice)
        assert wait_for(lambda: session.migrations, 15)
        assert session.migrations[-1]["result"] == "connect-error"
        with s2:  # s2 listens only now
            assert migrate_vm(s1, s2) == "completed"
            report = session.wait_migrated(timeout=20)
            assert report is not None, (session.migrations, s1.log())
            assert report["mode"] == "switch-host" and report["result"] == "completed"
            assert session.session_id != old_id
            assert port.name == PORT_NAME
            assert echo(port, b"after switch-host\n" * 5), s2.log()
            assert {ch.sock.getpeername()[1] for _, ch in session.all_channels()} == {s2_spice}
            print("switch-host report", report)


def test_migrate_cancel_drops_the_s2_connections(fake_pair):
    s1, s2 = fake_pair
    with ClientSession("127.0.0.1", s1.port) as session:
        port = session.open_port(PORT_NAME)
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMainMigrateBeginSeamless(dst_info(s2.port), 1))
        assert session.migration_connected_event.wait(5)
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMainMigrateCancel())
        wait_links_closed(s2)
        assert session.migrations[-1]["result"] == "cancelled" and not session.migrating
        port.write(b"on s1")
        assert read_exactly(port, 5) == b"on s1"


def test_semi_seamless_resets_channels_and_sends_frozen_writes_to_s2():
    """5.3: MIGRATE_END -> s1 sockets closed, MSGC_MAIN_MIGRATE_END first on s2 main, MAIN_INIT,
    then the port moves to its parked s2 link; writes made in between go to s2, unread data stays."""
    s1 = FakeServer({ChannelType.MAIN: s1_main, ChannelType.PORT: s1_port})
    s2 = FakeServer({ChannelType.MAIN: s2_main, ChannelType.PORT: s2_port_semi_seamless},
                    main_caps=(MainCap.SEMI_SEAMLESS_MIGRATE,))
    s1.migrating, s1.port_data, s2.port_data = False, [], []
    try:
        with ClientSession("127.0.0.1", s1.port) as session:
            port = session.open_port(PORT_NAME)
            port.write(b"unread on s1")
            with gevent.Timeout(5):
                while port.unread < 12:
                    gevent.sleep(0.01)
            s1.conns[ChannelType.MAIN, 0].send(m.MsgMainMigrateBeginSeamless(dst_info(s2.port), 1))
            assert session.migration_connected_event.wait(5)  # s2 lacks SEAMLESS_MIGRATE: CONNECTED
            assert seen(s1.events, ("s1", "main", "MsgcMainMigrateConnected"))
            s2.gate.clear()  # s2 holds its MAIN_INIT until the write below is made
            s1.conns[ChannelType.MAIN, 0].send(m.MsgMainMigrateEnd())
            assert seen(s2.events, ("s2", "main", "MsgcMainMigrateEnd"))
            port.write(b"while frozen")
            s2.gate.set()
            report = session.wait_migrated(timeout=10)
            assert report["mode"] == "semi-seamless" and report["kept_unread"] == {"port:0": 12}
            assert read_exactly(port, 12) == b"unread on s1"
            assert read_exactly(port, 15) == b"s2:while frozen"
            assert (port.name, port.opened) == (PORT_NAME, True)  # PORT_INIT again, from s2
            assert seen(s1.events, ("closed", "port"))
            assert session.connected_to == ("127.0.0.1", s2.port)
    finally:
        s1.stop()
        s2.stop()
    s1.check()
    s2.check()


@pytest.mark.peer
def test_echo_stream_survives_a_seamless_qemu_migration_without_loss_or_duplication():
    """Writes go on during the whole migration: what s1 had not yet given the guest travels in the
    port's MIGRATE_DATA, later writes wait for s2; the guest echo comes back complete and in order."""
    peers.require("qemu")
    s1, s2 = qemu_pair(True)
    lines = [b"line %05d\n" % i for i in range(400)]
    with s1, s2, ClientSession("127.0.0.1", s1.spice_port) as session:
        port = session.open_port(PORT_NAME)
        assert echo(port, b"warm-up\n")

        def write_all():
            for line in lines:
                port.write(line)
                gevent.sleep(0.002)

        writer = gevent.spawn(write_all)
        s1.qmp_command("client_migrate_info", protocol="spice", hostname="127.0.0.1", port=s2.spice_port)
        assert wait_for(session.migration_connected_event.is_set, 15)
        assert migrate_vm(s1, s2) == "completed"
        report = session.wait_migrated(timeout=20)
        writer.get(timeout=20)
        expected = b"".join(lines)
        got = port.read(len(expected), timeout=20)
        assert report["mode"] == "seamless"
        assert got == expected, (len(got), len(expected))
        print("in-flight report", report)


# --- the MIGRATE_DATA relay itself ------------------------------------------------------------


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
@pytest.mark.parametrize("count", [1, 4095, (3 << 20) + 17])
def test_relay_moves_exactly_count_bytes_and_leaves_the_rest(monkeypatch, use_splice, count):
    """relay() moves ``count`` bytes s1 -> s2 through either path and never reads past them: what
    follows on the s1 socket stays there for the channel's parser."""
    from spicewire.client import migration as client_migration

    monkeypatch.setattr(client_migration, "_SPLICE", use_splice and client_migration._SPLICE)
    payload, after = os.urandom(count), b"next message"
    s1_far, s1_near = socket.socketpair()
    s2_near, s2_far = socket.socketpair()
    writer = gevent.spawn(lambda: s1_far.sendall(payload + after))
    received = bytearray()

    def drain():
        while len(received) < count and (data := s2_far.recv(1 << 20)):
            received.extend(data)

    reader = gevent.spawn(drain)
    held = client_migration.relay(s1_near, s2_near, count, "port:1")
    writer.get(timeout=10)
    reader.get(timeout=10)
    assert bytes(received) == payload
    assert recv_exactly(s1_near, len(after)) == after
    assert held == (0 if use_splice else min(count, client_migration.RELAY_CHUNK))
    for sock in (s1_far, s1_near, s2_near, s2_far):
        sock.close()


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
@pytest.mark.parametrize("offset", [-1, 0, 1], ids=["under", "at", "over"])
def test_relay_on_either_side_of_a_small_relay_chunk(monkeypatch, use_splice, offset):
    """RELAY_CHUNK bounds the copy buffer (and sizes the splice pipe): a body one byte under, at
    and over it moves whole, the rest stays on s1, and the copy holds at most one chunk."""
    from spicewire.client import migration as client_migration

    chunk = 4096  # a page: the smallest pipe F_SETPIPE_SZ gives
    monkeypatch.setattr(client_migration, "RELAY_CHUNK", chunk)
    monkeypatch.setattr(client_migration, "_SPLICE", use_splice and client_migration._SPLICE)
    count = chunk + offset
    payload, after = os.urandom(count), b"next message"
    s1_far, s1_near = socket.socketpair()
    s2_near, s2_far = socket.socketpair()
    s1_far.sendall(payload + after)  # fits the socket buffers: nothing waits on the relay
    held = client_migration.relay(s1_near, s2_near, count, "port:1")
    assert recv_exactly(s2_far, count) == payload
    assert recv_exactly(s1_near, len(after)) == after
    assert held == (0 if use_splice else min(count, chunk))
    for sock in (s1_far, s1_near, s2_near, s2_far):
        sock.close()

@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
def test_a_relay_that_never_waits_gives_the_other_sessions_a_turn_every_bulk_turn(monkeypatch, use_splice,
                                                                                   gevent_idles):
    """A client process may hold many sessions (a gateway): a relay whose sockets never block would
    keep its hub to the body's end. With BULK_TURN a page it yields as it goes (each piece is at most
    a page here, so a turn at least every two); with BULK_TURN over the body, not inside it."""
    from spicewire import turns
    from spicewire.client import migration as client_migration

    chunk = 4096
    monkeypatch.setattr(client_migration, "RELAY_CHUNK", chunk)
    monkeypatch.setattr(client_migration, "_SPLICE", use_splice and client_migration._SPLICE)
    idles = gevent_idles
    count = 5 * chunk
    for bulk_turn, least, most in ((chunk, count // (2 * chunk), count // chunk), (2 * count, 0, 0)):
        monkeypatch.setattr(turns, "BULK_TURN", bulk_turn)
        idles[0] = 0
        payload = os.urandom(count)
        s1_far, s1_near = socket.socketpair()
        s2_near, s2_far = socket.socketpair()
        s1_far.sendall(payload)  # fits the socket buffers: the relay never waits
        client_migration.relay(s1_near, s2_near, count, "port:1")
        assert recv_exactly(s2_far, count) == payload
        assert least <= idles[0] <= most, (bulk_turn, idles[0])
        for sock in (s1_far, s1_near, s2_near, s2_far):
            sock.close()


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
def test_relay_reports_s1_closing_early(monkeypatch, use_splice):
    from spicewire.client import migration as client_migration

    monkeypatch.setattr(client_migration, "_SPLICE", use_splice and client_migration._SPLICE)
    s1_far, s1_near = socket.socketpair()
    s2_near, s2_far = socket.socketpair()
    s1_far.sendall(b"x" * 1000)
    s1_far.close()
    with pytest.raises(ConnectionError, match="s1 closed port:1 24 bytes before the end"):
        client_migration.relay(s1_near, s2_near, 1024, "port:1")
    for sock in (s1_near, s2_near, s2_far):
        sock.close()
