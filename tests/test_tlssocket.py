"""TlsSocket (spicewire/tlssocket.py): TLS through memory BIOs on a gevent socket. Bytes arrive
intact and in order on both sides of WRITE_CHUNK and RAW_READ; a write holds at most one chunk of
ciphertext; a read gets several records at once; a corrupted record after good ones hands over the
good bytes first, then fails; the end of the stream reads as 0; a refused certificate reaches the
server as the client's alert.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterator

import gevent
import pytest
from gevent import socket

from spicewire import tlssocket
from spicewire.client.tls import CertificateRejected, ClientTls
from spicewire.server.tls import ServerTLS, load_server_tls
from spicewire.tlssocket import RAW_READ, WRITE_CHUNK, TlsSocket

from .tlsca import SUBJECT, SUBJECT_TEXT, TestCA

RECORD = 16 << 10  # TLS's largest record payload


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def server_tls(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    return load_server_tls(str(ca.x509_dir(tmp_path_factory.mktemp("x509"), SUBJECT)))


@pytest.fixture(scope="module")
def client_tls(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> ClientTls:
    return ClientTls(str(ca.write_cert(tmp_path_factory.mktemp("ca") / "ca.pem")), SUBJECT_TEXT)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname(), timeout=10)
    server, _ = listener.accept()
    server.settimeout(10)
    listener.close()
    return server, client


@pytest.fixture
def pair(server_tls: ServerTLS, client_tls: ClientTls) -> Iterator[tuple[TlsSocket, TlsSocket]]:
    """(server side, client side), handshake done."""
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    handshake = gevent.spawn(server.do_handshake)
    client = client_tls.wrap(raw_client, "127.0.0.1")
    handshake.get(timeout=10)
    yield server, client
    server.close()
    client.close()


def read_exactly(sock: TlsSocket, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        assert n, f"EOF after {got} of {size} bytes"
        got += n
    return bytes(buf)


@pytest.mark.parametrize("size", [WRITE_CHUNK - 1, WRITE_CHUNK, WRITE_CHUNK + 1, RAW_READ - 1, RAW_READ,
                                  RAW_READ + 1, 3 * WRITE_CHUNK + 7, 1])
def test_bytes_arrive_intact_both_ways(pair: tuple[TlsSocket, TlsSocket], size: int) -> None:
    server, client = pair
    data = os.urandom(size)
    sender = gevent.spawn(client.sendall, data)
    assert read_exactly(server, size) == data
    sender.get(timeout=10)
    back = gevent.spawn(server.sendall, memoryview(data))
    assert read_exactly(client, size) == data
    back.get(timeout=10)


def ciphertext_held_per_send(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records, for every send a TlsSocket makes, how much ciphertext it held then."""
    held: list[int] = []
    send_pending = TlsSocket._send_pending

    def spy(self: TlsSocket, block: bool = True) -> None:
        held.append(self._outgoing.pending)
        send_pending(self, block)

    monkeypatch.setattr(TlsSocket, "_send_pending", spy)
    return held


@pytest.mark.parametrize(("size", "chunks"), [(WRITE_CHUNK - 1, 1), (WRITE_CHUNK, 1), (WRITE_CHUNK + 1, 2)])
def test_a_write_holds_at_most_one_chunk_of_ciphertext(
    pair: tuple[TlsSocket, TlsSocket], monkeypatch: pytest.MonkeyPatch, size: int, chunks: int,
) -> None:
    server, client = pair
    held = ciphertext_held_per_send(monkeypatch)
    reader = gevent.spawn(read_exactly, server, size)
    client.sendall(os.urandom(size))
    reader.get(timeout=10)
    assert len(held) == chunks
    records = -(-min(size, WRITE_CHUNK) // RECORD)
    assert max(held) <= min(size, WRITE_CHUNK) + records * 64  # a record's header, tag and type


def test_one_read_takes_many_records_and_no_more_than_asked(pair: tuple[TlsSocket, TlsSocket]) -> None:
    server, client = pair
    data = os.urandom(8 * RECORD)
    client.sendall(data)
    # Everything sent is in the kernel's buffer once a byte of the last record is readable.
    first = read_exactly(server, 1)
    buf = bytearray(len(data))
    n = server.recv_into(buf)
    assert n > RECORD  # several records decrypted in one call (SSLSocket returns one)
    rest = read_exactly(server, len(data) - 1 - n)
    assert first + bytes(buf[:n]) + rest == data
    client.sendall(b"abcdef")
    assert server.recv(2) == b"ab"
    assert server.recv(10) == b"cdef"  # the rest of a record waits for the next call


def test_the_end_of_the_stream_reads_as_zero(pair: tuple[TlsSocket, TlsSocket]) -> None:
    server, client = pair
    client.sendall(b"last words")
    socket.socket.shutdown(client, socket.SHUT_WR)
    assert read_exactly(server, 10) == b"last words"
    assert server.recv_into(bytearray(10)) == 0
    assert server.recv(10) == b""


def test_good_records_before_a_corrupted_one_are_read_first(pair: tuple[TlsSocket, TlsSocket]) -> None:
    server, client = pair
    good = os.urandom(3 * RECORD)
    client.sendall(good)
    # A record forged in place of the next one: the right header, a body that fails its tag.
    forged = memoryview(bytes([23, 3, 3, 0x40, 0x11]) + os.urandom(0x4011))
    while forged:  # past the TLS layer: the plain socket's send
        forged = forged[socket.socket.send(client, forged) :]
    got = read_exactly(server, len(good))  # every good byte, though the bad record came with them
    assert hashlib.sha256(got).digest() == hashlib.sha256(good).digest()
    with pytest.raises(ssl.SSLError) as err:
        server.recv_into(bytearray(RECORD))
    assert err.value.reason == "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"


def test_a_refused_certificate_reaches_the_server_as_the_clients_alert(
    server_tls: ServerTLS, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    stranger = ClientTls(str(TestCA().write_cert(tmp_path_factory.mktemp("other") / "ca.pem")), SUBJECT_TEXT)
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    handshake = gevent.spawn(server.do_handshake)
    with pytest.raises(CertificateRejected):
        stranger.wrap(raw_client, "127.0.0.1")
    with pytest.raises(ssl.SSLError) as err:
        handshake.get(timeout=10)
    assert err.value.reason == "TLSV1_ALERT_UNKNOWN_CA"  # sent before the client closed
    server.close()


def test_plain_bytes_fail_the_servers_handshake(server_tls: ServerTLS) -> None:
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    raw_client.sendall(b"REDQ" + bytes(20))  # a SPICE link header where a ClientHello belongs
    with pytest.raises(ssl.SSLError) as err:
        server.do_handshake()
    assert err.value.reason == "WRONG_VERSION_NUMBER"
    server.close()
    raw_client.close()


def test_a_handshake_cut_short_is_an_eof(server_tls: ServerTLS) -> None:
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    raw_client.close()
    with pytest.raises(ssl.SSLEOFError):
        server.do_handshake()
    server.close()


def test_one_raw_buffer_serves_every_socket_of_a_thread() -> None:
    view = tlssocket._raw_buffer()
    assert len(view) == RAW_READ
    assert tlssocket._raw_buffer() is view


@pytest.mark.parametrize(("size", "sends"), [(WRITE_CHUNK - 1, 1), (WRITE_CHUNK, 1), (WRITE_CHUNK + 1, 2)])
def test_many_buffers_go_out_one_chunk_of_records_at_a_time(
    pair: tuple[TlsSocket, TlsSocket], monkeypatch: pytest.MonkeyPatch, size: int, sends: int,
) -> None:
    server, client = pair
    data = os.urandom(size)
    piece = 64 << 10  # a pre-copy queue's views
    buffers = [memoryview(data)[start : start + piece] for start in range(0, size, piece)]
    held = ciphertext_held_per_send(monkeypatch)
    reader = gevent.spawn(read_exactly, server, size)
    client.send_buffers(buffers)
    assert reader.get(timeout=10) == data
    assert len(held) == sends
    assert max(held) <= WRITE_CHUNK + (WRITE_CHUNK // RECORD) * 64  # each record's header, tag and type


def test_a_socket_nobody_handshook_runs_the_handshake_at_its_first_read_or_write(
    server_tls: ServerTLS, client_tls: ClientTls,
) -> None:
    """As an HTTPS server's accepted socket: the handshake runs inside the first read's deadline."""
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    first_read = gevent.spawn(read_exactly, server, 5)
    client = TlsSocket(raw_client, client_tls._context, server_side=False, server_hostname="127.0.0.1")
    client.sendall(b"hello")
    assert first_read.get(timeout=10) == b"hello"
    assert server.version() == client.version() == "TLSv1.3"
    server.close()
    client.close()


def test_plain_bytes_at_a_first_read_fail_it(server_tls: ServerTLS) -> None:
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    raw_client.sendall(b"POST /migration/port-precopy HTTP/1.1\r\n\r\n")  # HTTP where a ClientHello belongs
    with pytest.raises(ssl.SSLError) as err:
        server.recv_into(bytearray(100))
    assert err.value.reason == "HTTP_REQUEST"
    server.close()
    raw_client.close()


def test_an_https_control_api_reads_through_a_tls_socket_and_logs_plain_http(
    ca: TestCA, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    """The control API's accepted HTTPS connections are TlsSockets (a pre-copy body is read 256 KiB
    of records a system call); plain HTTP to it ends that connection with a log line, and the
    API keeps answering."""
    from spicewire.control.client import ControlClient, control_tls_context
    from spicewire.control.server import ControlServer
    from spicewire.server.net import ServerConfig, SpiceServer

    x509 = str(ca.x509_dir(tmp_path_factory.mktemp("control"), SUBJECT))
    spice = SpiceServer(ServerConfig(host="127.0.0.1", port=0, tls_port=0, x509_dir=x509))
    assert spice.tls is not None
    control = ControlServer(spice, token="t", tls=spice.tls.context)
    control.start()
    try:
        host, port = control.address
        client = ControlClient(host, port, "t", timeout=10, tls=control_tls_context(x509))
        wraps: list[TlsSocket] = []
        init = TlsSocket.__init__

        def spy(self: TlsSocket, *args: object, **kwargs: object) -> None:
            init(self, *args, **kwargs)  # type: ignore[arg-type]
            wraps.append(self)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(TlsSocket, "__init__", spy)
            assert client.get_json("/status")["tls_listen"] is not None
        assert len(wraps) == 2  # the client's end and the server's
        with caplog.at_level("INFO", logger="spicewire.control.server"):
            plain = socket.create_connection((host, port), timeout=10)
            plain.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            assert plain.recv(100) == b""
            plain.close()
        assert any("TLS: HTTP_REQUEST" in r.getMessage() for r in caplog.records), caplog.text
        assert client.get_json("/status")["tls_listen"] is not None
    finally:
        control.stop()
