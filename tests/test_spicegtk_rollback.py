"""spice-gtk when s2 dies in the middle of a seamless switch (our s1 rolls the session back)."""

import contextlib
import socket
import struct
import threading

import pytest

from . import peers
from .peers.spicegtk import start_driver
from .test_spicegtk_migration import ECHO, PORTS, connections_to, migrate, sessions, wait_for, wait_streaming

pytestmark = pytest.mark.peer

PORT_CHANNEL = 10
LINK_TAIL = 4 + 128  # auth mechanism word and the RSA-encrypted ticket, after the link message


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class KillAtMigrateData:
    """A proxy in front of s2 that, the moment a port channel's client sends its first message after
    linking (the MIGRATE_DATA of a seamless switch), cuts every connection and kills s2."""

    def __init__(self, target, victim) -> None:
        self.target, self.victim = target, victim
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()
        self.socks: list = []
        self.killed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client) -> None:
        upstream = socket.create_connection(self.target)
        self.socks += [client, upstream]
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        # a side that goes away (the kill does that to all of them) ends this connection's part
        with contextlib.suppress(OSError):
            head = recv_exact(client, 16)
            mess = recv_exact(client, struct.unpack_from("<I", head, 12)[0])
            upstream.sendall(head + mess)
            if mess[4] != PORT_CHANNEL:
                self._pump(client, upstream)
                return
            upstream.sendall(recv_exact(client, LINK_TAIL))
            client.recv(1, socket.MSG_PEEK)  # the first message: kill s2 before it gets there
            self.kill()

    def _pump(self, src, dst) -> None:
        with contextlib.suppress(OSError):  # as in _handle: a side went away
            while data := src.recv(65536):
                dst.sendall(data)

    def kill(self) -> None:
        if self.killed.is_set():
            return
        self.victim.proc.kill()
        for sock in self.socks:
            with contextlib.suppress(OSError):  # it may be shut down or reset already
                sock.shutdown(socket.SHUT_RDWR)
        self.killed.set()

    def stop(self) -> None:
        self.server.close()


def test_spicegtk_loses_the_session_when_s2_dies_mid_switch_and_s1_lets_it_go(serve):
    """What spice-gtk 0.42 does, measured: the moment an s2 connection breaks in the middle of a
    seamless switch it drops its s1 connections too, before s1 could take the session back. The
    session is lost, as it would be with spice-server; s1 sees the client leave and lets the
    session go at once, so no half session is left behind."""
    peers.require("spicegtk")
    s1, s2 = serve(*PORTS), serve(*PORTS)
    driver = start_driver(s1.address[1], port_name=ECHO, expect_echo=True, stream_seconds=20, timeout=20)
    proxy = KillAtMigrateData(s2.address, s2)
    try:
        with driver:
            wait_streaming(s1, driver)
            report = migrate(s1, s2, to_port=proxy.address[1], timeout=10)
            assert proxy.killed.is_set()
            (entry,) = report["sessions"]
            assert report["lost"] == 1 and report["rolled_back"] == 0 and not entry["migrated"], report
            # found out from the client leaving (a timeout would say so), whatever it took
            assert entry["error"].startswith("lost: the client left the source"), report
            wait_for(lambda: not sessions(s1), 5, "s1 to let the session go")
            assert connections_to(driver, s1) == 0
            driver.stop_stream()
            rep = driver.report()
    finally:
        proxy.stop()
    assert not rep["ok"], rep  # its port channels went with s2 ("closed" or "not opened")
    assert rep["stream"]["mismatch"] is None, rep["stream"]  # lost, never garbled
