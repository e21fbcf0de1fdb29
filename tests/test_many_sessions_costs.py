"""What a migration of many sessions must not pay per session (issue 13's 500 x 1 MiB goal), and
that each shortcut keeps the result: a streamed MIGRATE_DATA's header is in the memory budget like
any queued frame, a numeric address is connected to without a lookup, background link keys come
from child processes and work, and s1 asks s2 only about the sessions it has not heard of yet."""

from __future__ import annotations

import os
import types

import gevent
import gevent.event
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from gevent import socket

from spicewire.client import channels
from spicewire.server.keys import ChildKeys, KeyPool
from spicewire.server.migration.orchestrator import MigrationManager, Peer
from tests.serverkit import MainSession, running_server, wait_until

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def test_a_streamed_message_header_is_reserved_and_released():
    """The header send_stream queues is released by the writer as a frame: reserved as one, the
    budget ends at zero (it used to go 6 bytes short per MIGRATE_DATA and raise at the close)."""
    with running_server() as server:
        session = MainSession(server.address)
        conn = server.sessions[session.session_id].main.transport
        conn.send_stream(b"h" * 6, iter([b"b" * 10]), 16)
        wait_until(lambda: conn.pending_write == 0, what="the streamed message to be written")
        assert conn.queued == 0
        session.main.sock.close()
        wait_until(lambda: not server.connections, what="the connection to end")
        assert server.budget.used == 0


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield server
    server.close()


def test_a_numeric_address_is_connected_to_without_a_lookup(listener, monkeypatch):
    def no_lookup(*args, **kwargs):
        raise AssertionError("a numeric address was looked up")

    monkeypatch.setattr(channels.socket, "getaddrinfo", no_lookup)
    monkeypatch.setattr(channels.socket, "create_connection", no_lookup)
    sock = channels.open_tcp("127.0.0.1", listener.getsockname()[1], 5.0)
    with sock:
        assert sock.family == socket.AF_INET
        assert sock.getpeername() == listener.getsockname()


def test_a_host_name_is_looked_up(listener, monkeypatch):
    asked = []
    real = channels.socket.create_connection

    def lookup(address, timeout):
        asked.append(address)
        return real(address, timeout=timeout)

    monkeypatch.setattr(channels.socket, "create_connection", lookup)
    with channels.open_tcp("localhost", listener.getsockname()[1], 5.0):
        assert asked == [("localhost", listener.getsockname()[1])]


def test_a_refused_numeric_connection_raises_and_leaks_no_socket(listener):
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(ConnectionRefusedError):
        channels.open_tcp("127.0.0.1", port, 5.0)


def test_child_keys_make_working_keys_in_one_reused_child():
    keys = ChildKeys()
    try:
        first, second = keys(), keys()
        assert isinstance(first, rsa.RSAPrivateKey) and first.key_size == 1024
        assert first.private_numbers() != second.private_numbers()  # a fresh key per link
        ticket = first.public_key().encrypt(b"secret", OAEP)
        assert first.decrypt(ticket, OAEP) == b"secret"
        (maker,) = keys._idle  # both came from one child
        pid = maker.pid
    finally:
        keys.close()
    with pytest.raises(ProcessLookupError):  # ended and reaped, not a zombie
        os.kill(pid, 0)


def test_a_pool_without_a_factory_fills_from_children_and_stops_them():
    pool = KeyPool(2, 1, refill_delay=0)
    pool.start()
    try:
        assert pool.wait_full(30)
        background = pool._background
        assert isinstance(background, ChildKeys)
        pids = [maker.pid for maker in background._idle]
        assert pids
    finally:
        pool.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert isinstance(pool.pop(), rsa.RSAPrivateKey)  # on demand, after stop too


class FakeDestination:
    """s2's /migration/completed: each answer lands the next session asked for."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self.address = "s2"

    def get_json(self, path: str, timeout: float) -> dict:
        ids = path.split("ids=", 1)[1].split(",")
        self.asked.append(ids)
        report = {"mode": "seamless", "times": {"completed": "2026-01-01T00:00:00.000000Z"}}
        return {ids[0]: report, "ffffffff": report}  # a session not asked about is not taken


def source(sid: int):
    finished = gevent.event.Event()
    finished.set()
    return types.SimpleNamespace(session=types.SimpleNamespace(id=sid), switched=True, finished=finished)


def test_s1_asks_only_about_sessions_not_heard_of(monkeypatch):
    monkeypatch.setattr(gevent, "sleep", lambda seconds=0: None)
    peer = FakeDestination()
    migration = Peer(peer, "m1", float("inf"))
    sources = [source(sid) for sid in (1, 2, 3)]
    landed = MigrationManager._wait_landed(migration, sources, float("inf"))
    assert peer.asked == [["00000001", "00000002", "00000003"], ["00000002", "00000003"], ["00000003"]]
    assert sorted(landed) == ["00000001", "00000002", "00000003"]
