"""tlssocket.send_buffers: a list of buffers written in order, never joined, on a plain socket
(SEND_VECTOR of them per sendmsg, what a partial sendmsg left going first in the next) or a
TlsSocket; it returns the bytes it wrote, which the server's writer counts as sent."""

from __future__ import annotations

import os

import gevent
import pytest
from gevent import socket as gsocket

from spicewire.tlssocket import SEND_VECTOR, TlsSocket, send_buffers


class RecordingSocket:
    """Takes at most ``take`` bytes a sendmsg (all by default) and keeps each call's buffers."""

    def __init__(self, take: int | None = None) -> None:
        self.take = take
        self.calls: list[list[bytes]] = []
        self.received = bytearray()

    def sendmsg(self, buffers: list[memoryview]) -> int:
        self.calls.append([bytes(b) for b in buffers])
        joined = b"".join(self.calls[-1])[: self.take]
        self.received += joined
        return len(joined)


@pytest.mark.parametrize(("count", "calls"), [(SEND_VECTOR - 1, 1), (SEND_VECTOR, 1), (SEND_VECTOR + 1, 2)])
def test_a_socket_that_takes_everything_gets_one_sendmsg_per_send_vector_buffers(count, calls):
    buffers = [os.urandom(1 + i % 50) for i in range(count)]
    sock = RecordingSocket()
    assert send_buffers(sock, buffers) == sum(map(len, buffers))  # type: ignore[arg-type]
    assert len(sock.calls) == calls
    assert max(len(call) for call in sock.calls) <= SEND_VECTOR
    assert bytes(sock.received) == b"".join(buffers)


@pytest.mark.parametrize("take", [1, 999, 1000, 1001, 2500])
def test_a_partial_sendmsg_goes_on_from_the_byte_it_stopped_at(take):
    """Around one buffer's length: a send that ends inside a buffer, at its end, or past it."""
    buffers = [os.urandom(1000) for _ in range(5)]
    sock = RecordingSocket(take)
    assert send_buffers(sock, [memoryview(b) for b in buffers]) == 5000  # type: ignore[arg-type]
    assert bytes(sock.received) == b"".join(buffers)
    assert len(sock.calls) == -(-5000 // take)


def test_empty_and_non_byte_buffers_are_written_as_their_bytes():
    words = memoryview(bytearray(range(16))).cast("I")  # 4 items, 16 bytes
    sock = RecordingSocket()
    assert send_buffers(sock, [b"", words, b"ab"]) == 18  # type: ignore[arg-type]
    assert bytes(sock.received) == bytes(range(16)) + b"ab"


@pytest.mark.parametrize("count", [SEND_VECTOR - 1, SEND_VECTOR, SEND_VECTOR + 1, 3 * SEND_VECTOR + 7])
def test_send_buffers_writes_every_buffer_in_order_across_partial_sends(count):
    """Around SEND_VECTOR buffers a sendmsg, through a socket whose buffer takes far less than the
    batch at once: every byte arrives once, in order."""
    buffers = [os.urandom(1000 + i % 7000) for i in range(count)]
    expected = b"".join(buffers)
    left, right = gsocket.socketpair()
    left.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_SNDBUF, 16 << 10)
    reader = gevent.spawn(lambda: b"".join(iter(lambda: right.recv(65536), b"")))
    with left, right:
        assert send_buffers(left, [memoryview(b) for b in buffers]) == len(expected)
        left.shutdown(gsocket.SHUT_WR)
        assert reader.get() == expected


def test_send_buffers_through_tls_writes_every_buffer_in_order(tmp_path):
    """An https control API (no sendmsg through TLS): every buffer's records, in order."""
    from spicewire.control.client import control_tls_context
    from spicewire.server.tls import load_server_tls

    from .test_tls_client import S1_SUBJECT, TestCA, x509_dir

    tls_dir = x509_dir(TestCA(), tmp_path / "x509", S1_SUBJECT)
    far, near = gsocket.socketpair()
    far = load_server_tls(tls_dir).wrap(far)
    accepting = gevent.spawn(far.do_handshake)
    near = TlsSocket(near, control_tls_context(tls_dir), server_side=False, server_hostname="127.0.0.1")
    near.do_handshake()
    accepting.get(timeout=10)
    buffers = [os.urandom(1000 + i * 37) for i in range(SEND_VECTOR + 1)]
    expected = b"".join(buffers)

    def read_all() -> bytes:
        got = bytearray()
        while len(got) < len(expected) and (data := far.recv(65536)):
            got += data
        return bytes(got)

    reader = gevent.spawn(read_all)
    with far, near:
        assert send_buffers(near, [memoryview(b) for b in buffers]) == len(expected)
        assert reader.get(timeout=10) == expected
