"""Port-channel flow control (PROTOCOL.md 7.1, 7.4), checked against the server's own state:
client->device backpressure (a paused sink), device->client backpressure (a client that does not
read an echo), and the ACK window (a client that does not ACK)."""

from __future__ import annotations

import hashlib
import os

import gevent
import pytest

from spicewire.protocol import messages as m
from spicewire.server.net import RECV_BUFFER
from tests.serverkit import (
    ECHO,
    SINK,
    Limits,
    MainSession,
    PortChannel,
    echo_roundtrip,
    port_state,
    running_server,
    sha256,
    wait_until,
)

CHUNK = PortChannel.CHUNK  # client DATA message size
HEADER = 6  # mini header
# Client socket buffers fixed small, so that backpressure reaches the sending greenlet before
# loopback autotuning (tcp_rmem up to 32 MiB here) has swallowed the whole transfer.
CLIENT_SOCKET_BUFFER = 64 << 10


class Sender:
    """Sends ``data`` as DATA messages from a greenlet, counting what got past sendall."""

    def __init__(self, port: PortChannel, data: bytes, chunk: int = CHUNK) -> None:
        self.sent = 0
        self.greenlet = gevent.spawn(self._run, port, data, chunk)

    def _run(self, port, data, chunk):
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            port.send_data(view[start : start + chunk])
            self.sent = start + len(view[start : start + chunk])

    def join(self, timeout: float = 20.0) -> None:
        self.greenlet.get(timeout=timeout)

    def kill(self) -> None:
        self.greenlet.kill(block=False)


def test_paused_sink_stops_reading_then_delivers_everything():
    limit = 512 << 10
    total = 8 << 20  # far more than the limit plus what kernel buffers on loopback can hold
    with running_server(limits=Limits(to_device=limit, to_client=limit)) as server:
        session = MainSession(server.address)
        sink = session.open_port(SINK, bufsize=CLIENT_SOCKET_BUFFER)
        port = port_state(server, session.session_id, SINK)
        conn = port.connection.transport
        port.device.pause()
        data = os.urandom(total)
        sender = Sender(sink, data)
        try:
            # The server reads until to_device reaches the limit, then stops reading the socket;
            # the paused sink takes nothing, so nothing reopens it.
            wait_until(lambda: not conn.handler.reading_allowed, what="the server to stop reading")
            held = (port.to_device_bytes, port.connection.channel.bytes_in)
            to_device, bytes_in = held
            assert limit <= to_device
            # One recv (RECV_BUFFER) past the limit at most, plus the part of a message that
            # recv completed (its earlier bytes had been read, but were not to_device yet).
            assert to_device <= limit + RECV_BUFFER + CHUNK + HEADER, to_device
            # The client is blocked in sendall: what it got past sendall fills the kernel buffers.
            # The server may have stopped inside the message that sendall is still writing (a
            # port counts a message's received part against its limit).
            assert not sender.greenlet.ready()
            assert sender.sent < total
            assert sender.sent >= bytes_in - HEADER * (bytes_in // CHUNK + 1) - CHUNK
            # A read that should not happen has no event to wait for: give it time to show.
            gevent.sleep(0.5)
            assert (port.to_device_bytes, port.connection.channel.bytes_in) == held, "server read while paused"
            assert port.device.bytes_in == 0

            port.device.resume()
            sender.join()
            wait_until(lambda: port.device.bytes_in == total, what="the sink to take everything")
            assert port.to_device_bytes == 0
            assert port.device.status()["sha256"] == sha256(data)
        finally:
            sender.kill()
            session.close()


@pytest.mark.parametrize("ack_window", [0, 20], ids=["no-acks", "ack-window-20"])
def test_echo_to_a_client_that_does_not_read_stays_bounded(ack_window):
    limit = 256 << 10
    total = 32 << 20
    with running_server(limits=Limits(to_device=limit, to_client=limit, ack_window=ack_window)) as server:
        session = MainSession(server.address)
        echo = session.open_port(ECHO, bufsize=CLIENT_SOCKET_BUFFER)
        port = port_state(server, session.session_id, ECHO)
        conn = port.connection.transport
        data = os.urandom(total)
        sender = Sender(echo, data)
        try:
            def state():
                return port.to_device_bytes, port.to_client_bytes, conn.pending_write, port.device.bytes_in

            # Reading stops once to_device is full, which needs to_client full first: the bounds
            # below hold at every moment, this is the one where they are tight.
            wait_until(lambda: not conn.handler.reading_allowed, what="the server to stop reading")
            to_device, to_client, pending, echoed = state()
            # Device->client: queued + being written stays within the limit (plus the headers of
            # the messages it was cut into, at most 64 KiB each in practice here).
            assert to_client + pending <= limit + HEADER * (limit // 1024 + 64), (to_client, pending)
            # Client->device: the echo refused more, so reading stopped near the limit.
            assert to_device <= limit + RECV_BUFFER + CHUNK + HEADER, to_device
            assert not sender.greenlet.ready() and sender.sent < total
            assert echoed < total

            # Now the client reads: everything comes back, in order.
            back = echo.read_data(total, timeout=30)
            sender.join()
            assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
            wait_until(lambda: port.to_device_bytes == port.to_client_bytes == conn.pending_write == 0)
        finally:
            sender.kill()
            session.close()


def test_ack_window_holds_data_until_acked():
    window = 5
    count = 6 * window
    with running_server(limits=Limits(ack_window=window)) as server:
        session = MainSession(server.address)
        echo = session.open_port(ECHO, auto_ack=False)  # answers SET_ACK, never ACKs by itself
        channel = port_state(server, session.session_id, ECHO).connection.channel
        assert channel.ack_window == window
        wait_until(lambda: channel.client_generation == channel.ack_generation, what="ACK_SYNC")
        payloads = [bytes([i]) * 100 for i in range(count)]
        for p in payloads:  # one DATA message each way per payload
            echo.send_data(p)

        def data_messages(k: int) -> list[bytes]:
            got = echo.read_data(100 * k)  # exactly k messages, however slowly they come
            return [got[i : i + 100] for i in range(0, len(got), 100)]

        def nothing_more() -> None:
            # Absence has no event to wait for: a short look, which can only miss a fault, never
            # invent one.
            assert echo.read_available(0.3) == b"", "the server sent past its ACK window"

        received = data_messages(2 * window)
        # The server stops at 2 x window unacknowledged messages...
        assert channel.unacked == 2 * window and not channel.window_open
        nothing_more()  # ...and stays stopped
        # One ACK releases one window.
        echo.send(m.MsgcAck())
        received += data_messages(window)
        nothing_more()
        assert channel.unacked == 2 * window
        # An ACK in advance counts for nothing (unacked does not go below 0): two ACKs now free
        # only the 2 x window outstanding, and the window refills at once.
        echo.send(m.MsgcAck())
        echo.send(m.MsgcAck())
        received += data_messages(2 * window)
        nothing_more()
        # The rest, one window per ACK.
        while len(received) < count:
            echo.send(m.MsgcAck())
            received += data_messages(min(window, count - len(received)))
        nothing_more()
        assert received == payloads
        session.close()


def test_ack_before_ack_sync_is_ignored():
    """7.1: an ACK whose generation the client has not synced to does not count."""
    window = 4
    with running_server(limits=Limits(ack_window=window)) as server:
        session = MainSession(server.address)
        echo = session.open_port(ECHO, auto_ack=False)
        channel = port_state(server, session.session_id, ECHO).connection.channel
        wait_until(lambda: channel.client_generation == channel.ack_generation)
        channel.client_generation = 0xFFFFFFFF  # as if the ACK_SYNC had not arrived yet
        for i in range(3 * window):
            echo.send_data(bytes([i]) * 10)
        assert len(echo.read_data(2 * window * 10)) == 2 * window * 10
        echo.send(m.MsgcAck())
        # Absence has no event: a short look can only miss a counted ACK, never invent one.
        assert echo.read_available(0.3) == b""
        assert channel.unacked == 2 * window
        session.close()


def test_echo_stream_with_small_limits_and_ack_window_does_not_deadlock():
    """A client that writes and reads at once, with its ACKs queued behind its own DATA: when the
    server stops reading (to_device full) it cannot see those ACKs, so the window must not be
    what holds the echoed data back then (the socket's backpressure bounds it instead)."""
    limit = 256 << 10
    with running_server(limits=Limits(to_device=limit, to_client=limit, ack_window=20)) as server:
        session = MainSession(server.address)
        echo = session.open_port(ECHO)
        data = os.urandom(16 << 20)
        back = echo_roundtrip(echo, data, timeout=30)
        assert sha256(back) == sha256(data)
        session.close()
